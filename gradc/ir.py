"""The tensor graph: named dimensions as SymPy symbols, scalar math as SymPy expressions.

Almost every operation is one node form, :class:`Map`::

    out[π_out(L)]  ⊕=  f( x1[π1(L)], x2[π2(L)], ... )      for every L in the loop space

where ``L`` ranges over a box of loop indices, each ``π`` gives, for every axis of the
tensor it indexes, an :class:`Affine` function of one loop index (or a constant), ``f`` is
a SymPy expression in one placeholder symbol per input, and ``⊕`` is plain assignment or a
``sum``/``max``/``min`` reduction into a freshly initialised output.

Elementwise ops, broadcasting, transposes, reductions, contractions (matmul, einsum),
slices, padding and concatenation are all this one form, and so is the adjoint of each:
the reverse-mode rule maps a Map to Maps (see :mod:`gradc.autodiff`), which is why
gradients can be differentiated again.  The only other node kinds are the kernel's inputs
and :class:`Reshape`, a free reinterpretation of a contiguous buffer.
"""

from __future__ import annotations

import itertools
import keyword
from dataclasses import dataclass
from typing import Iterable, Sequence

import sympy as sp

RESERVED_C_NAMES = set(
    """auto break case char const continue default do double else enum extern float for goto if inline int long
    register restrict return short signed sizeof static struct switch typedef union unsigned void volatile while
    _Bool _Complex _Imaginary bool true false class new delete this template typename namespace operator private
    public protected virtual friend using try catch throw export asm INFINITY NAN""".split()
)
# A local buffer named after an op (`sin`, `exp`) would shadow the <math.h> function it calls.
RESERVED_C_NAMES |= {
    name + suffix
    for name in """sin cos tan asin acos atan atan2 sinh cosh tanh asinh acosh atanh exp exp2 expm1 log log2 log10
    log1p sqrt cbrt pow fabs fmax fmin fma floor ceil round trunc fmod hypot erf erfc tgamma lgamma copysign
    nan nearbyint rint lround remainder""".split()
    for suffix in ("", "f", "l")
} | set("HUGE_VAL HUGE_VALF isnan isinf isfinite signbit fpclassify size_t ptrdiff_t NULL".split())


def reserved(name: str) -> bool:
    """A name generated C or Python glue cannot use for a buffer or a dimension."""
    return name in RESERVED_C_NAMES or keyword.iskeyword(name) or name.startswith("gradc_")


Extent = sp.Expr  # an integer SymPy expression in the named-dimension symbols
Location = tuple[str, int]  # (filename, line) of the DSL code that created a node

REDUCTIONS = (None, "sum", "max", "min")


def dim_symbol(name: str) -> sp.Symbol:
    """The SymPy symbol of a named dimension (a non-negative integer known at call time)."""
    return sp.Symbol(name, integer=True, nonnegative=True)


def as_extent(value) -> Extent:
    return sp.sympify(value)


def same_extent(a: Extent, b: Extent) -> bool:
    return sp.expand(a - b) == 0


@dataclass(frozen=True)
class Affine:
    """One tensor axis indexed by ``stride * L[var] + offset`` (``var=None``: the constant ``offset``)."""

    var: int | None
    stride: int = 1
    offset: Extent = sp.Integer(0)

    def __post_init__(self):
        object.__setattr__(self, "offset", sp.sympify(self.offset))
        if self.var is None:
            object.__setattr__(self, "stride", 0)

    @property
    def is_plain(self) -> bool:
        return self.var is not None and self.stride == 1 and self.offset == 0

    def compose(self, inner: "Affine") -> "Affine":
        """``self`` indexes a tensor whose axis ``self.var`` is itself indexed by ``inner``."""
        if self.var is None:
            return self
        if inner.var is None:
            return Affine(None, 0, self.stride * inner.offset + self.offset)
        return Affine(inner.var, self.stride * inner.stride, self.stride * inner.offset + self.offset)

    def renumber(self, mapping: dict[int, int]) -> "Affine":
        return self if self.var is None else Affine(mapping[self.var], self.stride, self.offset)

    def __repr__(self) -> str:
        if self.var is None:
            return f"{self.offset}"
        s = f"L{self.var}" if self.stride == 1 else f"{self.stride}*L{self.var}"
        return s if self.offset == 0 else f"{s}+{self.offset}"


IndexMap = tuple[Affine, ...]


def identity_map(rank: int) -> IndexMap:
    return tuple(Affine(a) for a in range(rank))


_ids = itertools.count()


class Node:
    """A tensor value in the graph.  ``dtype`` is ``"float"`` or ``"bool"`` (a mask).

    The float precision is a property of the whole compiled kernel, not of each node, so
    that one traced graph can be emitted in float32 or float64.
    """

    shape: tuple[Extent, ...]
    dtype: str
    name: str | None
    loc: Location | None

    def __init__(self, shape: Iterable, dtype: str = "float", name: str | None = None, loc: Location | None = None):
        self.id = next(_ids)
        self.shape = tuple(as_extent(d) for d in shape)
        self.dtype = dtype
        self.name = name
        self.loc = loc
        #: every DSL source line this node computes something for (grows as rewrites merge nodes)
        self.sources: frozenset[Location] = frozenset({loc}) if loc else frozenset()
        #: ids of the traced nodes this node computes (grows as fusion merges nodes)
        self.members: frozenset[int] = frozenset({self.id})

    def inherit(self, *others: "Node") -> "Node":
        """Take the name, hint, source lines and members of the node(s) a rewrite made this one from."""
        for other in others:
            self.name = self.name or other.name
            self.hint = self.hint or other.hint
            self.sources = self.sources | other.sources
            self.members = self.members | other.members
        return self

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def args(self) -> tuple["Node", ...]:
        return ()

    def with_args(self, args: Sequence["Node"]) -> "Node":
        """This node over new arguments (a rewrite rebuilt them).  Maps rebuild themselves."""
        return self

    #: what made the node ("matmul", "sum", ...), for readable names when the user gave none
    hint: str | None = None

    def label(self) -> str:
        return self.name or self.hint or "tmp"


class Input(Node):
    """A kernel parameter (or a cotangent seed supplied by the caller)."""

    def __init__(self, param: str, shape, dtype: str = "float", loc: Location | None = None):
        super().__init__(shape, dtype, param, loc)
        self.param = param

    def __repr__(self) -> str:
        return f"Input({self.param}, {list(self.shape)})"


class Reshape(Node):
    """The same contiguous elements viewed with another shape (costs nothing in C)."""

    def __init__(self, arg: Node, shape, name: str | None = None, loc: Location | None = None):
        super().__init__(shape, arg.dtype, name, loc)
        self.arg = arg

    @property
    def args(self) -> tuple[Node, ...]:
        return (self.arg,)

    def with_args(self, args: Sequence[Node]) -> "Reshape":
        (arg,) = args
        return self if arg is self.arg else Reshape(arg, self.shape, name=self.name, loc=self.loc).inherit(self)

    def __repr__(self) -> str:
        return f"Reshape({self.arg.label()} -> {list(self.shape)})"


class CustomGradient(Node):
    """The value of ``value``, whose gradient is given by the user (``gradc.custom_gradient``).

    ``rule(cotangent)`` returns the adjoint of each of ``inputs``.  Reverse mode never
    enters ``value``'s own graph; forward mode differentiates it (there is no custom
    tangent rule).  After differentiation the node is only an alias of ``value``.
    """

    def __init__(self, value: Node, inputs: Sequence[Node], rule, loc: Location | None = None):
        super().__init__(value.shape, value.dtype, None, loc)
        self.value = value
        self.inputs = tuple(inputs)
        self.rule = rule

    @property
    def args(self) -> tuple[Node, ...]:
        return (self.value, *self.inputs)

    def with_args(self, args: Sequence[Node]) -> "CustomGradient":
        value, *inputs = args
        if value is self.value and all(a is b for a, b in zip(inputs, self.inputs)):
            return self
        return CustomGradient(value, inputs, self.rule, loc=self.loc).inherit(self)

    def __repr__(self) -> str:
        return f"CustomGradient({self.value.label()}; {', '.join(i.label() for i in self.inputs)})"


@dataclass(frozen=True)
class Operand:
    node: Node
    index: IndexMap
    symbol: sp.Symbol


def placeholder(j: int, dtype: str) -> sp.Symbol:
    # Masks are SymPy Booleans so that a condition can be substituted into a Piecewise.
    return sp.Symbol(f"_a{j}") if dtype == "bool" else sp.Symbol(f"_a{j}", real=True)


class Map(Node):
    """``out[out_index(L)] ⊕= expr(operands...)`` over the loop box ``loop`` (see module doc)."""

    def __init__(
        self,
        shape,
        loop: Sequence,
        out_index: IndexMap,
        operands: Sequence[tuple[Node, IndexMap]],
        expr_fn,
        reduce: str | None = None,
        dtype: str = "float",
        name: str | None = None,
        loc: Location | None = None,
    ):
        """``expr_fn`` receives one placeholder symbol per operand and returns the body.

        Operands that are the same node read through the same index map share one
        placeholder, and operands the body does not use are dropped.
        """
        super().__init__(shape, dtype, name, loc)
        assert reduce in REDUCTIONS
        self.loop = tuple(as_extent(e) for e in loop)
        self.out_index = tuple(out_index)
        self.reduce = reduce
        assert len(self.out_index) == len(self.shape), (self.out_index, self.shape)
        seen: dict[tuple[int, IndexMap], sp.Symbol] = {}
        symbols, ops = [], []
        for node, index in operands:
            assert len(index) == node.rank, (node, index)
            key = (node.id, tuple(index))
            if key not in seen:
                seen[key] = placeholder(len(ops), node.dtype)
                ops.append(Operand(node, tuple(index), seen[key]))
            symbols.append(seen[key])
        expr = sp.sympify(expr_fn(*symbols))
        used = expr.free_symbols
        self.operands = tuple(op for op in ops if op.symbol in used)
        self.expr = expr
        if reduce is not None and not self.reduced_vars():
            self.reduce = None if self.is_gather_form() else reduce

    def rebuilt(self, operands: Sequence[tuple[Node, IndexMap]], symbols: Sequence[sp.Symbol], expr: sp.Expr, **changes) -> "Map":
        """This node over new ``operands`` (``symbols`` stand for them in ``expr``), with the
        same loop box, output index and reduction unless ``changes`` (shape, loop) says otherwise;
        it takes this node's name, hint, source lines and members."""
        return Map(
            changes.get("shape", self.shape),
            changes.get("loop", self.loop),
            self.out_index,
            operands,
            lambda *s: expr.xreplace(dict(zip(symbols, s))),
            reduce=self.reduce,
            dtype=self.dtype,
            name=self.name,
            loc=self.loc,
        ).inherit(self)

    # -- structure --------------------------------------------------------------------
    @property
    def args(self) -> tuple[Node, ...]:
        return tuple(op.node for op in self.operands)

    def out_vars(self) -> list[int]:
        # Distinct: a diagonal write (the adjoint of einsum "ii->i") names one loop index twice.
        return list(dict.fromkeys(a.var for a in self.out_index if a.var is not None))

    def reduced_vars(self) -> list[int]:
        used = set(self.out_vars())
        return [v for v in range(len(self.loop)) if v not in used]

    def is_gather_form(self) -> bool:
        """Each output element is written by exactly one contiguous run of the loop box.

        True when every output axis is a distinct plain loop index spanning the whole
        axis (or a constant 0 on an axis of extent 1).  Then the loop nest can keep the
        reduction in a scalar accumulator and needs no separate initialisation pass.
        """
        vars_seen = set()
        for a, extent in zip(self.out_index, self.shape):
            if a.var is None:
                if not (a.offset == 0 and extent == 1):
                    return False
                continue
            if not a.is_plain or a.var in vars_seen or not same_extent(self.loop[a.var], extent):
                return False
            vars_seen.add(a.var)
        return True

    @property
    def is_elementwise(self) -> bool:
        """Assignment over exactly the output's index space, in order (no reduction, no scatter)."""
        return (
            self.reduce is None
            and len(self.loop) == self.rank
            and all(a.var == i and a.is_plain for i, a in enumerate(self.out_index))
            and all(same_extent(e, s) for e, s in zip(self.loop, self.shape))
        )

    def __repr__(self) -> str:
        ops = ", ".join(f"{op.symbol}={op.node.label()}[{', '.join(map(repr, op.index))}]" for op in self.operands)
        return (
            f"Map({self.label()}{list(self.shape)}[{', '.join(map(repr, self.out_index))}] "
            f"{self.reduce or '='} {self.expr} | loop={list(self.loop)} | {ops})"
        )


def canonical(node: Map) -> Map:
    """Renumber the loop so output indices come first, in output-axis order.

    Gather-form nodes then run as "for each output element, accumulate over the rest",
    which keeps the reduction in a register and makes the innermost output loop unit-stride.
    """
    order = node.out_vars() + node.reduced_vars()
    if order == list(range(len(node.loop))):
        return node
    mapping = {old: new for new, old in enumerate(order)}
    subs = {op.symbol: op.symbol for op in node.operands}
    return Map(
        node.shape,
        [node.loop[v] for v in order],
        tuple(a.renumber(mapping) for a in node.out_index),
        [(op.node, tuple(a.renumber(mapping) for a in op.index)) for op in node.operands],
        lambda *syms: node.expr.xreplace(dict(zip(subs, syms))),
        reduce=node.reduce,
        dtype=node.dtype,
        name=node.name,
        loc=node.loc,
    ).inherit(node)


def elementwise(shape, operands: Sequence[tuple[Node, IndexMap]], expr_fn, dtype="float", name=None, loc=None) -> Map:
    shape = tuple(as_extent(d) for d in shape)
    return Map(shape, shape, identity_map(len(shape)), operands, expr_fn, None, dtype, name, loc)


def constant(value, shape=(), loc: Location | None = None) -> Map:
    return elementwise(shape, [], lambda: sp.sympify(value), loc=loc)


def num_elements(shape: Sequence[Extent]) -> Extent:
    return sp.Mul(*shape) if shape else sp.Integer(1)


@dataclass
class Graph:
    """A traced kernel: named inputs and an ordered list of outputs."""

    inputs: list[Input]
    outputs: list[Node]
    output_names: list[str]


def topo_order(roots: Iterable[Node]) -> list[Node]:
    """Every node reachable from ``roots``, producers before consumers (iterative DFS)."""
    order: list[Node] = []
    state: dict[int, int] = {}
    for root in roots:
        stack = [(root, False)]
        while stack:
            node, done = stack.pop()
            if done:
                if state.get(node.id) != 2:
                    state[node.id] = 2
                    order.append(node)
                continue
            if node.id in state:
                continue
            state[node.id] = 1
            stack.append((node, True))
            for arg in reversed(node.args):
                if arg.id not in state:
                    stack.append((arg, False))
    return order


def consumers(order: Sequence[Node]) -> dict[int, list[Node]]:
    users: dict[int, list[Node]] = {n.id: [] for n in order}
    for n in order:
        for a in {a.id: a for a in n.args}.values():
            users[a.id].append(n)
    return users
