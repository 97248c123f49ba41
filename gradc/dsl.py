"""The DSL: tensor annotations, the traced :class:`Tensor`, and the ``gradc.*`` functions.

Tracing runs the user's Python function once on symbolic tensors; each operation adds a
:class:`gradc.ir.Map` (or :class:`gradc.ir.Reshape`) node to the graph.  Python control
flow on Python values simply runs; control flow on a traced tensor is an error that names
the user's file and line.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import inspect
import os
import string
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import sympy as sp

from . import autodiff, ir, rewrite
from .errors import DimensionError, GradcError, ShapeError, TraceError
from .scalar import FiniteOrZero, Relu, Sigmoid, Softplus, StopGradient, expm1, log1p

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- locations
#: Modules of gradc written in the DSL (the kernels it ships): their lines are DSL lines.
_DSL_MODULES = {os.path.join(_PACKAGE_DIR, "optim.py")}


def user_location() -> ir.Location | None:
    """The innermost stack frame outside gradc: where the user's DSL code is."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_PACKAGE_DIR + os.sep) or filename in _DSL_MODULES:
            return (filename, frame.f_lineno)
        frame = frame.f_back
    return None


def _error(cls, message: str) -> GradcError:
    loc = user_location()
    return cls(message, filename=loc[0] if loc else None, lineno=loc[1] if loc else None)


# ----------------------------------------------------------------------------- annotations
@dataclass(frozen=True)
class TensorType:
    """The annotation ``gradc.f32[d0, d1, ...]``: a dtype and a shape of ints and dimension names."""

    dtype: str
    dims: tuple

    def __repr__(self) -> str:
        inner = ", ".join(repr(d) for d in self.dims) if self.dims else "()"
        return f"{self.dtype}[{inner}]"

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(np.float32 if self.dtype == "f32" else np.float64)


class _DType:
    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, dims) -> TensorType:
        if not isinstance(dims, tuple):
            dims = (dims,)
        for d in dims:
            ok = isinstance(d, str) and d.isidentifier() or isinstance(d, int) and not isinstance(d, bool) and d >= 0
            if not ok:
                raise TypeError(
                    f"gradc.{self.name}[...]: a dimension must be a non-negative int or a dimension name "
                    f"(a Python identifier), got {d!r}"
                )
            if isinstance(d, str) and ir.reserved(d):
                raise TypeError(
                    f"gradc.{self.name}[...]: the dimension name {d!r} is reserved in C or Python "
                    f"(it becomes an argument of the generated C function); choose another name"
                )
        return TensorType(self.name, tuple(dims))

    def __repr__(self) -> str:
        return f"gradc.{self.name}"


f32 = _DType("f32")
f64 = _DType("f64")


# ----------------------------------------------------------------------------- dimensions
class Dim:
    """A named dimension (or an expression of them) used as a number inside a kernel.

    It can scale tensors (``gradc.sum(x) / x.shape[0]``) and size reshapes, but its value
    is only known when the kernel is called, so Python cannot loop over it.
    """

    __slots__ = ("expr",)

    def __init__(self, expr):
        self.expr = sp.sympify(expr)

    def _lift(self, other):
        if isinstance(other, Dim):
            return other.expr
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return sp.sympify(other)
        return NotImplemented

    def _binop(self, other, fn):
        o = self._lift(other)
        if o is NotImplemented:
            return NotImplemented
        return _as_dim(fn(self.expr, o))

    def __add__(self, o): return self._binop(o, lambda a, b: a + b)
    def __radd__(self, o): return self._binop(o, lambda a, b: b + a)
    def __sub__(self, o): return self._binop(o, lambda a, b: a - b)
    def __rsub__(self, o): return self._binop(o, lambda a, b: b - a)
    def __mul__(self, o): return self._binop(o, lambda a, b: a * b)
    def __rmul__(self, o): return self._binop(o, lambda a, b: b * a)
    def __truediv__(self, o): return self._binop(o, lambda a, b: a / b)
    def __rtruediv__(self, o): return self._binop(o, lambda a, b: b / a)
    def __floordiv__(self, o): return self._binop(o, lambda a, b: sp.floor(a / b))
    def __neg__(self): return _as_dim(-self.expr)

    def __eq__(self, other):
        o = self._lift(other)
        return o is not NotImplemented and sp.expand(self.expr - o) == 0

    def __hash__(self):
        return hash(self.expr)

    def _concrete(self):
        raise _error(
            DimensionError,
            f"dimension {self.expr} is only known when the kernel is called; it cannot be used as a "
            f"Python int at trace time (use it in arithmetic on tensors or in a reshape instead)",
        )

    def __index__(self): self._concrete()
    def __int__(self): self._concrete()
    def __bool__(self): self._concrete()
    def __float__(self): self._concrete()

    def __repr__(self) -> str:
        return f"Dim({self.expr})"


def _as_dim(expr):
    expr = sp.sympify(expr)
    return int(expr) if expr.is_Integer else Dim(expr)


def _extent_of(d) -> sp.Expr:
    if isinstance(d, Dim):
        return d.expr
    if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
        return sp.Integer(int(d))
    raise _error(TraceError, f"a shape entry must be an int or a dimension, got {d!r}")


# ----------------------------------------------------------------------------- trace state
@dataclass
class TraceState:
    """What one trace records besides the graph: runtime checks on the named dimensions."""

    constraints: list[tuple[sp.Basic, str]] = field(default_factory=list)

    def require(self, condition, message: str) -> None:
        condition = sp.sympify(condition)
        if condition is sp.true:
            return
        if condition is sp.false:
            raise _error(ShapeError, message)
        loc = user_location()
        where = f"{os.path.basename(loc[0])}:{loc[1]}: " if loc else ""
        self.constraints.append((condition, where + message))


_local = threading.local()


@contextlib.contextmanager
def _active(state: TraceState):
    """Record into ``state`` for a while (a trace, or a custom gradient rule run later)."""
    previous = getattr(_local, "state", None)
    _local.state = state
    try:
        yield state
    finally:
        _local.state = previous


def _state() -> TraceState:
    state = getattr(_local, "state", None)
    if state is None:
        raise TraceError("gradc tensors exist only while a kernel is being traced")
    return state


# ----------------------------------------------------------------------------- Tensor
Scalar = (int, float, np.integer, np.floating)


class Tensor:
    """A traced tensor.  Supports NumPy's operators, broadcasting and static indexing."""

    __array_ufunc__ = None  # make ``ndarray * Tensor`` defer to Tensor.__rmul__
    __hash__ = object.__hash__

    def __init__(self, node: ir.Node):
        self.node = node

    # -- shape -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return tuple(_as_dim(d) for d in self.node.shape)

    @property
    def ndim(self) -> int:
        return self.node.rank

    @property
    def dtype(self) -> str:
        return self.node.dtype

    @property
    def size(self):
        return _as_dim(ir.num_elements(self.node.shape))

    def __len__(self) -> int:
        if not self.node.shape:
            raise _error(TraceError, "len() of a 0-d tensor")
        d = self.node.shape[0]
        if not d.is_Integer:
            raise _error(DimensionError, f"len() of a tensor whose first dimension {d} is only known at call time")
        return int(d)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def T(self) -> "Tensor":
        return transpose(self)

    # -- control flow on traced values is not recordable ---------------------------------
    def _no_concrete(self, what: str):
        raise _error(
            TraceError,
            f"{what} of a traced tensor: its value is only known when the kernel runs; "
            f"use gradc.where(condition, a, b) to choose between values",
        )

    def __bool__(self): self._no_concrete("bool() (an `if`, `while`, `and`/`or` or `not`)")
    def __int__(self): self._no_concrete("int()")
    def __float__(self): self._no_concrete("float()")
    def __index__(self): self._no_concrete("using as an index")
    def __array__(self, *a, **k): self._no_concrete("converting to a NumPy array")

    # -- arithmetic ------------------------------------------------------------------------
    def __add__(self, o): return _ewise(lambda a, b: a + b, self, o, hint="add")
    def __radd__(self, o): return _ewise(lambda a, b: a + b, o, self, hint="add")
    def __sub__(self, o): return _ewise(lambda a, b: a - b, self, o, hint="sub")
    def __rsub__(self, o): return _ewise(lambda a, b: a - b, o, self, hint="sub")
    def __mul__(self, o): return _ewise(lambda a, b: a * b, self, o, hint="mul")
    def __rmul__(self, o): return _ewise(lambda a, b: a * b, o, self, hint="mul")
    def __truediv__(self, o): return _ewise(lambda a, b: a / b, self, o, hint="div")
    def __rtruediv__(self, o): return _ewise(lambda a, b: a / b, o, self, hint="div")
    def __pow__(self, o): return _ewise(_power, self, o, hint="pow")
    def __rpow__(self, o): return _ewise(_power, o, self, hint="pow")
    def __neg__(self): return _ewise(lambda a: -a, self, hint="neg")
    def __pos__(self): return self
    def __abs__(self): return abs_(self)
    def __matmul__(self, o): return matmul(self, o)
    def __rmatmul__(self, o): return matmul(o, self)

    def __lt__(self, o): return _compare(sp.StrictLessThan, self, o)
    def __le__(self, o): return _compare(sp.LessThan, self, o)
    def __gt__(self, o): return _compare(sp.StrictGreaterThan, self, o)
    def __ge__(self, o): return _compare(sp.GreaterThan, self, o)
    def __eq__(self, o): return _compare(sp.Eq, self, o)
    def __ne__(self, o): return _compare(sp.Ne, self, o)

    def __and__(self, o): return _logical(sp.And, self, o)
    def __rand__(self, o): return _logical(sp.And, o, self)
    def __or__(self, o): return _logical(sp.Or, self, o)
    def __ror__(self, o): return _logical(sp.Or, o, self)
    def __invert__(self): return _logical(sp.Not, self)

    def __getitem__(self, key): return _getitem(self, key)

    # -- NumPy-style methods -------------------------------------------------------------------
    def sum(self, axis=None, keepdims=False): return sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return max(self, axis, keepdims)
    def min(self, axis=None, keepdims=False): return min(self, axis, keepdims)
    def reshape(self, *shape): return reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)
    def transpose(self, *axes): return transpose(self, axes if axes else None)

    def __repr__(self) -> str:
        shape = ", ".join(str(d) for d in self.node.shape)
        return f"Tensor({self.node.label()}, shape=({shape}), dtype={self.node.dtype})"


def _power(a, b):
    if b == sp.Rational(1, 2):
        return sp.sqrt(a)
    return a**b


# ----------------------------------------------------------------------------- helpers
def _scalar_expr(x) -> sp.Expr | None:
    """A Python number or a dimension as a SymPy constant; None for anything else."""
    if isinstance(x, bool) or isinstance(x, np.bool_):
        return sp.Integer(int(x))
    if isinstance(x, (int, np.integer)):
        return sp.Integer(int(x))
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if x.is_integer() and abs(x) < 2**53:
            return sp.Integer(int(x))
        if np.isnan(x):
            return sp.nan
        if np.isinf(x):
            return sp.oo if x > 0 else -sp.oo
        return sp.Float(repr(x), 17)
    if isinstance(x, Dim):
        return x.expr
    return None


def as_tensor(x) -> Tensor:
    if isinstance(x, Tensor):
        return x
    expr = _scalar_expr(x)
    if expr is not None:
        return Tensor(ir.constant(expr, loc=user_location()))
    if isinstance(x, (np.ndarray, list, tuple)):
        raise _error(
            TraceError,
            "NumPy arrays and lists cannot be captured as constants inside a kernel "
            "(the generated code would grow with the data); pass them as kernel parameters",
        )
    raise _error(TraceError, f"cannot use a {type(x).__name__} as a tensor in a gradc kernel")


def broadcast_shapes(*shapes: Sequence[sp.Expr]) -> tuple[sp.Expr, ...]:
    rank = builtins.max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(rank):
        extent = sp.Integer(1)
        for s in shapes:
            k = axis - (rank - len(s))
            if k < 0:
                continue
            d = s[k]
            if d == 1 or ir.same_extent(d, extent):
                continue
            if extent == 1:
                extent = d
                continue
            pretty = " and ".join("(" + ", ".join(str(x) for x in s) + ("," if len(s) == 1 else "") + ")" for s in shapes)
            raise _error(ShapeError, f"shapes {pretty} cannot be broadcast together (axis {axis - rank}: {extent} vs {d})")
        out.append(extent)
    return tuple(out)


def broadcast_index(shape: Sequence[sp.Expr], out_shape: Sequence[sp.Expr]) -> ir.IndexMap:
    """How an operand of ``shape`` is read when broadcast to ``out_shape`` (loop = output axes)."""
    lead = len(out_shape) - len(shape)
    return tuple(
        ir.Affine(None) if d == 1 and out_shape[lead + k] != 1 else ir.Affine(lead + k) for k, d in enumerate(shape)
    )


def _ewise(fn: Callable, *args, dtype: str = "float", hint: str | None = None, masks_as_bool: bool = False) -> Tensor:
    """An elementwise op: tensors are broadcast, Python numbers and dimensions become constants.

    Masks reach ``fn`` as 0/1 numbers, unless ``masks_as_bool`` (for ops that take a condition).
    """
    tensors = [a for a in args if isinstance(a, Tensor)]
    consts = {}
    for i, a in enumerate(args):
        if not isinstance(a, Tensor):
            e = _scalar_expr(a)
            if e is None:
                as_tensor(a)  # raises the appropriate error
            consts[i] = e
    shape = broadcast_shapes(*(t.node.shape for t in tensors))
    operands = [(t.node, broadcast_index(t.node.shape, shape)) for t in tensors]
    keep = [not (isinstance(a, Tensor) and a.node.dtype == "bool") or masks_as_bool or dtype == "bool" for a in args]

    def body(*syms):
        it = iter(syms)
        vals = []
        for i, a in enumerate(args):
            if i in consts:
                vals.append(consts[i])
            else:
                s = next(it)
                vals.append(s if keep[i] else sp.Piecewise((1, s), (0, True)))
        return fn(*vals)

    return _hinted(ir.elementwise(shape, operands, body, dtype=dtype, loc=user_location()), hint)


def _hinted(node: ir.Node, hint: str | None) -> Tensor:
    node.hint = hint
    return Tensor(node)


def _compare(rel, a, b) -> Tensor:
    return _ewise(lambda x, y: rel(x, y), _as_float(a), _as_float(b), dtype="bool", hint="mask")


def _as_float(x):
    if isinstance(x, Tensor) and x.node.dtype == "bool":
        return _ewise(lambda c: c, x)
    return x


def _as_mask(x) -> Tensor:
    x = as_tensor(x)
    if x.node.dtype == "bool":
        return x
    return _ewise(lambda v: sp.Ne(v, 0), x, dtype="bool")


def _logical(op, *args) -> Tensor:
    masks = [_as_mask(a) for a in args]
    return _ewise(lambda *c: op(*c), *masks, dtype="bool", hint="mask")


def _unary(fn, hint: str):
    def op(x):
        return _ewise(fn, as_tensor(x), hint=hint)

    op.__name__ = op.__qualname__ = hint
    return op


# ----------------------------------------------------------------------------- elementwise
exp = _unary(sp.exp, "exp")
log = _unary(sp.log, "log")
sqrt = _unary(sp.sqrt, "sqrt")
sin = _unary(sp.sin, "sin")
cos = _unary(sp.cos, "cos")
tan = _unary(sp.tan, "tan")
tanh = _unary(sp.tanh, "tanh")
sinh = _unary(sp.sinh, "sinh")
cosh = _unary(sp.cosh, "cosh")
arcsin = _unary(sp.asin, "arcsin")
arccos = _unary(sp.acos, "arccos")
arctan = _unary(sp.atan, "arctan")
abs_ = _unary(sp.Abs, "abs")
sign = _unary(sp.sign, "sign")
square = _unary(lambda x: x**2, "square")
reciprocal = _unary(lambda x: 1 / x, "reciprocal")
sigmoid = _unary(Sigmoid, "sigmoid")
softplus = _unary(Softplus, "softplus")
relu = _unary(Relu, "relu")
log1p = _unary(log1p, "log1p")
expm1 = _unary(expm1, "expm1")
negative = _unary(lambda x: -x, "negative")


def maximum(a, b) -> Tensor:
    """Elementwise max; at ties the gradient is split evenly between ``a`` and ``b``."""
    return _ewise(lambda x, y: sp.Max(x, y), _as_float(a), _as_float(b), hint="maximum")


def minimum(a, b) -> Tensor:
    """Elementwise min; at ties the gradient is split evenly between ``a`` and ``b``."""
    return _ewise(lambda x, y: sp.Min(x, y), _as_float(a), _as_float(b), hint="minimum")


def where(condition, a, b) -> Tensor:
    """Select ``a`` where ``condition`` holds, else ``b``.

    The gradient is selected the same way, so an Inf or NaN in the branch not taken never
    reaches the gradient (``where(x > 0, log(x), 0)`` has gradient 0 at x = 0).
    """
    return _ewise(
        lambda c, x, y: sp.Piecewise((x, c), (y, True)),
        _as_mask(condition),
        _as_float(a),
        _as_float(b),
        hint="where",
        masks_as_bool=True,
    )


def stop_gradient(x) -> Tensor:
    return _ewise(StopGradient, as_tensor(x), hint="stop_gradient")


# ----------------------------------------------------------------------------- reductions
def _axes(x: Tensor, axis) -> tuple[int, ...]:
    rank = x.ndim
    if axis is None:
        return tuple(range(rank))
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    out = []
    for a in axes:
        if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
            raise _error(TraceError, f"axis must be an int or a tuple of ints, got {a!r}")
        if not -rank <= a < rank:
            raise _error(ShapeError, f"axis {a} is out of range for a tensor of rank {rank}")
        a = int(a) % rank
        if a in out:
            raise _error(ShapeError, f"axis {a} is repeated in {axis!r}")
        out.append(a)
    return tuple(sorted(out))


def _reduce(kind: str, x, axis, keepdims: bool) -> Tensor:
    x = _as_float(as_tensor(x))
    axes = _axes(x, axis)
    kept = [a for a in range(x.ndim) if a not in axes]
    order = kept + list(axes)  # loop: kept axes first, so the reduction is innermost
    position = {a: i for i, a in enumerate(order)}
    loop = [x.node.shape[a] for a in order]
    if keepdims:
        shape = [sp.Integer(1) if a in axes else x.node.shape[a] for a in range(x.ndim)]
        out_index = tuple(ir.Affine(None) if a in axes else ir.Affine(position[a]) for a in range(x.ndim))
    else:
        shape = [x.node.shape[a] for a in kept]
        out_index = tuple(ir.Affine(position[a]) for a in kept)
    in_index = tuple(ir.Affine(position[a]) for a in range(x.ndim))
    if kind in ("max", "min"):
        for a in axes:
            _state().require(x.node.shape[a] >= 1, f"{kind}() over an empty axis of length {x.node.shape[a]}")
    node = ir.Map(shape, loop, out_index, [(x.node, in_index)], lambda v: v, reduce=kind, loc=user_location())
    return _hinted(node, kind)


def sum(x, axis=None, keepdims=False) -> Tensor:
    return _reduce("sum", x, axis, keepdims)


def max(x, axis=None, keepdims=False) -> Tensor:
    """Maximum over ``axis``; tied maxima share the gradient equally."""
    return _reduce("max", x, axis, keepdims)


def min(x, axis=None, keepdims=False) -> Tensor:
    """Minimum over ``axis``; tied minima share the gradient equally."""
    return _reduce("min", x, axis, keepdims)


def mean(x, axis=None, keepdims=False) -> Tensor:
    x = as_tensor(x)
    count = ir.num_elements([x.node.shape[a] for a in _axes(x, axis)])
    return sum(x, axis, keepdims) / Dim(count)


def logsumexp(x, axis=None, keepdims=False) -> Tensor:
    """log(sum(exp(x))) with the maximum shifted out, so it neither overflows nor underflows."""
    x = as_tensor(x)
    # A row of -inf (or one +inf) must not shift by itself: -inf - -inf is NaN.
    m = stop_gradient(_ewise(FiniteOrZero, max(x, axis, keepdims=True), hint="peak"))
    s = log(sum(exp(x - m), axis, keepdims=keepdims))
    if keepdims:
        return s + m
    return s + reshape(m, tuple(d for i, d in enumerate(m.shape) if i not in _axes(x, axis)))


# ----------------------------------------------------------------------------- shapes
def transpose(x, axes=None) -> Tensor:
    x = as_tensor(x)
    rank = x.ndim
    if axes is None:
        axes = tuple(reversed(range(rank)))
    axes = tuple(int(a) % rank if rank else int(a) for a in axes)
    if sorted(axes) != list(range(rank)):
        raise _error(ShapeError, f"transpose axes {axes} are not a permutation of the {rank} axes")
    shape = [x.node.shape[a] for a in axes]
    where_ = {a: i for i, a in enumerate(axes)}
    index = tuple(ir.Affine(where_[a]) for a in range(rank))
    return _hinted(ir.elementwise(shape, [(x.node, index)], lambda v: v, dtype=x.node.dtype, loc=user_location()), "transpose")


def reshape(x, shape) -> Tensor:
    x = as_tensor(x)
    if not isinstance(shape, (tuple, list)):
        shape = (shape,)
    total = ir.num_elements(x.node.shape)
    extents, infer = [], None
    for i, d in enumerate(shape):
        if isinstance(d, (int, np.integer)) and int(d) == -1:
            if infer is not None:
                raise _error(ShapeError, "reshape: only one dimension can be -1")
            infer = i
            extents.append(None)
        else:
            extents.append(_extent_of(d))
    if infer is not None:
        known = ir.num_elements([e for e in extents if e is not None])
        inferred = sp.cancel(total / known)
        if not (inferred.is_integer or inferred.is_Integer) or inferred.is_Integer and inferred < 0:
            raise _error(ShapeError, f"reshape: cannot infer -1 for {total} elements into {shape}")
        extents[infer] = inferred
    if not ir.same_extent(ir.num_elements(extents), total):
        old = tuple(x.node.shape)
        raise _error(ShapeError, f"cannot reshape a tensor of shape {old} ({total} elements) into {tuple(extents)}")
    if all(ir.same_extent(a, b) for a, b in zip(extents, x.node.shape)) and len(extents) == x.ndim:
        return x
    return _hinted(ir.Reshape(x.node, extents, loc=user_location()), "reshape")


def broadcast_to(x, shape) -> Tensor:
    x = as_tensor(x)
    target = tuple(_extent_of(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    out = broadcast_shapes(x.node.shape, target)
    if len(out) != len(target) or not all(ir.same_extent(a, b) for a, b in zip(out, target)):
        raise _error(ShapeError, f"cannot broadcast shape {tuple(x.node.shape)} to {target}")
    index = broadcast_index(x.node.shape, target)
    return _hinted(ir.elementwise(target, [(x.node, index)], lambda v: v, dtype=x.node.dtype, loc=user_location()), "broadcast")


def concatenate(tensors, axis=0) -> Tensor:
    """Join along ``axis``: each piece is scattered into its slot of the result."""
    tensors = [_as_float(as_tensor(t)) for t in tensors]
    if not tensors:
        raise _error(ShapeError, "concatenate needs at least one tensor")
    rank = tensors[0].ndim
    if rank == 0:
        raise _error(ShapeError, "zero-dimensional tensors cannot be concatenated")
    axis = _axes(tensors[0], axis)[0]
    for t in tensors[1:]:
        if t.ndim != rank or not all(
            ir.same_extent(a, b) for i, (a, b) in enumerate(zip(t.node.shape, tensors[0].node.shape)) if i != axis
        ):
            raise _error(
                ShapeError,
                f"concatenate: shapes {tuple(tensors[0].node.shape)} and {tuple(t.node.shape)} differ "
                f"outside axis {axis}",
            )
    total = sp.Add(*(t.node.shape[axis] for t in tensors))
    shape = list(tensors[0].node.shape)
    shape[axis] = total
    pieces, offset = [], sp.Integer(0)
    for t in tensors:
        out_index = tuple(ir.Affine(a, 1, offset if a == axis else 0) for a in range(rank))
        piece = ir.Map(shape, t.node.shape, out_index, [(t.node, ir.identity_map(rank))], lambda v: v, reduce="sum", loc=user_location())
        pieces.append(_hinted(piece, "concat"))
        offset = offset + t.node.shape[axis]
    result = pieces[0]
    for p in pieces[1:]:
        result = result + p
    return result


def stack(tensors, axis=0) -> Tensor:
    tensors = [as_tensor(t) for t in tensors]
    if not tensors:
        raise _error(ShapeError, "stack needs at least one tensor")
    rank = tensors[0].ndim + 1
    if not -rank <= axis < rank:
        raise _error(ShapeError, f"stack: axis {axis} is out of range for rank {rank}")
    axis = axis % rank
    key = (slice(None),) * axis + (None,)
    return concatenate([t[key] for t in tensors], axis=axis)


# ----------------------------------------------------------------------------- indexing
def _getitem(x: Tensor, key) -> Tensor:
    if not isinstance(key, tuple):
        key = (key,)
    if builtins.sum(1 for k in key if k is Ellipsis) > 1:
        raise _error(TraceError, "an index can only have a single ellipsis ('...')")
    consumed = builtins.sum(1 for k in key if k is not None and k is not Ellipsis)
    if consumed > x.ndim:
        raise _error(ShapeError, f"too many indices for a tensor of rank {x.ndim}: {consumed}")
    expanded = []
    for k in key:
        if k is Ellipsis:
            expanded.extend([slice(None)] * (x.ndim - consumed))
        else:
            expanded.append(k)
    expanded.extend([slice(None)] * (x.ndim - builtins.sum(1 for k in expanded if k is not None)))

    state = _state()
    shape: list[sp.Expr] = []
    index: list[ir.Affine] = []
    axis = 0
    for k in expanded:
        if k is None:
            shape.append(sp.Integer(1))
            continue
        extent = x.node.shape[axis]
        if isinstance(k, Tensor):
            raise _error(TraceError, "indexing with a traced tensor is not supported yet; use static ints and slices")
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            k = int(k)
            if extent.is_Integer:
                if not -int(extent) <= k < int(extent):
                    raise _error(ShapeError, f"index {k} is out of bounds for axis {axis} with size {extent}")
                index.append(ir.Affine(None, 0, k % int(extent)))
            else:
                pos = extent + k if k < 0 else sp.Integer(k)
                state.require(extent >= (-k if k < 0 else k + 1), f"index {k} needs axis {axis} (size {extent}) to be at least {(-k if k < 0 else k + 1)}")
                index.append(ir.Affine(None, 0, pos))
        elif isinstance(k, slice):
            start, length, step = _slice(k, extent, axis, state)
            index.append(ir.Affine(len(shape), step, start))
            shape.append(length)
        else:
            raise _error(TraceError, f"unsupported index {k!r}: use ints, static slices, None and '...'")
        axis += 1
    return _hinted(ir.elementwise(shape, [(x.node, tuple(index))], lambda v: v, dtype=x.node.dtype, loc=user_location()), "slice")


def _static(v, what: str):
    if v is None:
        return None
    if isinstance(v, Dim):
        return v.expr
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    raise _error(TraceError, f"slice {what} must be a Python int, got {v!r}")


def _slice(k: slice, extent: sp.Expr, axis: int, state: TraceState):
    start, stop, step = _static(k.start, "start"), _static(k.stop, "stop"), _static(k.step, "step")
    step = 1 if step is None else step
    if not isinstance(step, int) or step == 0:
        raise _error(TraceError, f"slice step must be a non-zero Python int, got {k.step!r}")
    if extent.is_Integer and all(v is None or isinstance(v, int) for v in (start, stop)):
        s, e, st = slice(start, stop, step).indices(int(extent))
        return sp.Integer(s), sp.Integer(len(range(s, e, st))), st
    if step != 1:
        raise _error(TraceError, f"slices with a step need a fixed-size axis; axis {axis} has size {extent}")

    def resolve(v, default):
        if v is None:
            return default
        v = sp.sympify(v)
        return extent + v if v.is_Integer and v < 0 else v

    s = resolve(start, sp.Integer(0))
    e = resolve(stop, extent)
    length = sp.expand(e - s)
    state.require(sp.And(s >= 0, e <= extent, length >= 0), f"slice {_fmt_slice(k)} on axis {axis} needs {s} <= {e} <= {extent}")
    return s, length, 1


def _fmt_slice(k: slice) -> str:
    parts = ["" if v is None else str(v) for v in (k.start, k.stop)]
    return ":".join(parts) + ("" if k.step is None else f":{k.step}")


# ----------------------------------------------------------------------------- contractions
def einsum(subscripts: str, *operands) -> Tensor:
    tensors = [_as_float(as_tensor(t)) for t in operands]
    spec = subscripts.replace(" ", "")
    if "->" in spec:
        lhs, rhs = spec.split("->")
    else:
        lhs, rhs = spec, None
    terms = lhs.split(",")
    if len(terms) != len(tensors):
        raise _error(ShapeError, f"einsum '{subscripts}' names {len(terms)} operands but got {len(tensors)}")
    spare = [c for c in string.ascii_letters if c not in spec]
    ell_rank = builtins.max((t.ndim - len(term.replace("...", "")) for term, t in zip(terms, tensors) if "..." in term), default=0)
    ell = "".join(spare[:ell_rank])
    full_terms = []
    for term, t in zip(terms, tensors):
        if "..." in term:
            n = t.ndim - len(term.replace("...", ""))
            term = term.replace("...", ell[ell_rank - n :] if n else "")
        if len(term) != t.ndim or not term.isalpha():
            raise _error(ShapeError, f"einsum '{subscripts}': operand subscripts '{term}' do not match rank {t.ndim}")
        full_terms.append(term)
    if rhs is None:
        counts = {c: "".join(full_terms).count(c) for c in "".join(full_terms)}
        rhs = ell + "".join(sorted(c for c in counts if counts[c] == 1 and c not in ell))
    else:
        rhs = rhs.replace("...", ell)
    extents: dict[str, sp.Expr] = {}
    for term, t in zip(full_terms, tensors):
        for c, d in zip(term, t.node.shape):
            if c not in extents or extents[c] == 1:
                extents[c] = d
            elif d != 1 and not ir.same_extent(extents[c], d):
                raise _error(ShapeError, f"einsum '{subscripts}': index '{c}' has sizes {extents[c]} and {d}")
    for c in rhs:
        if c not in extents:
            raise _error(ShapeError, f"einsum '{subscripts}': output index '{c}' appears in no operand")
    reduced = [c for c in extents if c not in rhs]
    order = list(rhs) + reduced
    var = {c: i for i, c in enumerate(order)}
    ops = []
    for term, t in zip(full_terms, tensors):
        idx = tuple(ir.Affine(None) if d == 1 and extents[c] != 1 else ir.Affine(var[c]) for c, d in zip(term, t.node.shape))
        ops.append((t.node, idx))
    node = ir.Map(
        [extents[c] for c in rhs],
        [extents[c] for c in order],
        ir.identity_map(len(rhs)),
        ops,
        lambda *s: sp.Mul(*s),
        reduce="sum",
        loc=user_location(),
    )
    return _hinted(node, "einsum")


def matmul(a, b) -> Tensor:
    a, b = _as_float(as_tensor(a)), _as_float(as_tensor(b))
    if a.ndim == 0 or b.ndim == 0:
        raise _error(ShapeError, "matmul: operands must be at least 1-D (use * for scalars)")
    ka = a.node.shape[-1]
    kb = b.node.shape[-2] if b.ndim >= 2 else b.node.shape[0]
    if not ir.same_extent(ka, kb):
        raise _error(
            ShapeError,
            f"matmul: shapes {tuple(a.node.shape)} and {tuple(b.node.shape)} do not align "
            f"(contracted dimension {ka} vs {kb})",
        )
    if a.ndim == 1 and b.ndim == 1:
        return _hinted(einsum("k,k->", a, b).node, "matmul")
    if a.ndim == 1:
        return _hinted(einsum("...kj,k->...j", b, a).node, "matmul")
    if b.ndim == 1:
        return _hinted(einsum("...ik,k->...i", a, b).node, "matmul")
    batch = broadcast_shapes(a.node.shape[:-2], b.node.shape[:-2])
    nb = len(batch)
    letters = "abcdefgh"[:nb]
    ta = letters[nb - (a.ndim - 2) :] + "ik"
    tb = letters[nb - (b.ndim - 2) :] + "kj"
    return _hinted(einsum(f"{ta},{tb}->{letters}ij", a, b).node, "matmul")


# ----------------------------------------------------------------------------- differentiation inside kernels
def value_and_grad(fn: Callable, argnums=0) -> Callable:
    """``fn``'s value and its gradient with respect to the argument(s) ``argnums``.

    Works on traced tensors inside a kernel, so a loss can contain a gradient (e.g. a
    gradient penalty).  Like JAX, values ``fn`` captures from outside are constants with
    respect to its arguments.
    """
    single = isinstance(argnums, int)
    nums = (argnums,) if single else tuple(argnums)

    def wrapped(*args):
        if not any(isinstance(a, Tensor) for a in args):
            raise _error(
                TraceError,
                "gradc.grad/value_and_grad work on traced tensors inside a @gradc.kernel; "
                "for NumPy arrays use gradc.compile(kernel).grad(...)",
            )
        tensors = [as_tensor(a) for a in args]
        for i in nums:
            if not -len(tensors) <= i < len(tensors):
                raise _error(TraceError, f"argnums {i} is out of range for {len(tensors)} arguments")
        proxies = list(tensors)
        for i in nums:
            proxies[i] = _ewise(lambda v: v, _as_float(tensors[i]))
        out = fn(*proxies)
        if not isinstance(out, Tensor):
            out = as_tensor(out)
        if out.ndim != 0:
            raise _error(ShapeError, f"gradc.grad needs a function with a scalar (0-d) output, got shape {tuple(out.node.shape)}")
        seed = ir.constant(1, loc=user_location())
        wrt = [proxies[i].node for i in nums]
        # Fused before differentiating, as compile does with a kernel, so that
        # where(z > 0, log(z), 0) differentiates to a choice between 1/z and 0, not to a
        # mask times the Inf of the branch not taken.  Only fn's own nodes are fused.
        order = ir.topo_order([out.node])
        inside = {w.id for w in wrt}
        for node in order:
            if any(a.id in inside for a in node.args):
                inside.add(node.id)
        (value,) = rewrite.fuse([out.node], [n for n in order if n.id not in inside] + wrt)
        grads = tuple(Tensor(g) for g in autodiff.vjp([value], [seed], wrt))
        return Tensor(value), grads[0] if single else grads

    return wrapped


def grad(fn: Callable, argnums=0) -> Callable:
    vg = value_and_grad(fn, argnums)
    return lambda *args: vg(*args)[1]


def custom_gradient(fn: Callable) -> Callable:
    """Give a DSL function a gradient of your own, as TensorFlow's ``tf.custom_gradient``.

    ``fn(*args)`` returns ``(value, grad_fn)``; ``grad_fn(upstream)`` returns the gradient
    of the value, contracted with ``upstream`` (a tensor of the value's shape), with respect
    to each argument: one tensor, or a tuple with one per argument (None for no gradient).
    ``grad_fn`` is DSL code too, so the result can be differentiated again.  Forward mode
    (``jvp``) differentiates ``value`` itself.
    """
    where = (fn.__code__.co_filename, fn.__code__.co_firstlineno)

    def fail(message: str) -> GradcError:
        return ShapeError(f"custom gradient {fn.__name__}: {message}", filename=where[0], lineno=where[1])

    @functools.wraps(fn)
    def wrapped(*args):
        tensors = [_as_float(as_tensor(a)) for a in args]
        # Fresh nodes, so that reverse mode has a boundary: nothing flows into fn's own graph.
        proxies = [_ewise(lambda v: v, t) for t in tensors]
        result = fn(*proxies)
        if not (isinstance(result, tuple) and len(result) == 2 and callable(result[1])):
            raise fail("the function must return (value, grad_fn)")
        value = _as_float(as_tensor(result[0]))
        grad_fn = result[1]
        state = _state()

        def rule(cotangent: ir.Node) -> list[ir.Node | None]:
            with _active(state):
                grads = grad_fn(Tensor(cotangent))
                grads = grads if isinstance(grads, (tuple, list)) else (grads,)
                if len(grads) != len(tensors):
                    raise fail(f"grad_fn returned {len(grads)} gradient(s) for {len(tensors)} argument(s)")
                nodes = []
                for i, (g, t) in enumerate(zip(grads, tensors)):
                    if g is None:
                        nodes.append(None)
                        continue
                    g = _as_float(as_tensor(g))
                    if g.ndim != t.ndim or not all(ir.same_extent(a, b) for a, b in zip(g.node.shape, t.node.shape)):
                        raise fail(
                            f"grad_fn's gradient {i} has shape {tuple(g.node.shape)}, "
                            f"but argument {i} has shape {tuple(t.node.shape)}"
                        )
                    nodes.append(g.node)
            return nodes

        node = ir.CustomGradient(value.node, [t.node for t in tensors], rule, loc=user_location())
        node.hint = fn.__name__
        return Tensor(node)

    return wrapped


# ----------------------------------------------------------------------------- kernels
@dataclass
class Param:
    name: str
    type: TensorType


@dataclass
class Traced:
    """The result of tracing: the graph, its parameters and the runtime checks on dimensions."""

    graph: ir.Graph
    params: list[Param]
    dims: list[str]
    constraints: list[tuple[sp.Basic, str]]
    kernel_name: str
    source_file: str | None
    source_line: int | None
    returns_tuple: bool = False
    #: Whether its nodes are named after the user's variables (not under a C profiler).
    named: bool = True


def _closure_namespace(fn) -> dict:
    ns = {}
    if fn.__closure__:
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__):
            try:
                ns[name] = cell.cell_contents
            except ValueError:
                pass
    return ns


def _params_of(fn) -> list[Param]:
    try:
        annotations = inspect.get_annotations(fn, eval_str=True, locals=_closure_namespace(fn))
    except Exception as exc:  # noqa: BLE001 - any failure to evaluate a user annotation is reported as such
        raise TraceError(
            f"kernel '{fn.__name__}': cannot evaluate its parameter annotations: {exc}",
            filename=fn.__code__.co_filename,
            lineno=fn.__code__.co_firstlineno,
        ) from None
    params = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TraceError(
                f"kernel '{fn.__name__}': *args/**kwargs parameters are not supported",
                filename=fn.__code__.co_filename,
                lineno=fn.__code__.co_firstlineno,
            )
        ann = annotations.get(p.name)
        if not isinstance(ann, TensorType):
            raise TraceError(
                f"kernel '{fn.__name__}': parameter '{p.name}' needs an annotation such as gradc.f32['N'] "
                f"or gradc.f64[3, 4], got {ann!r}",
                filename=fn.__code__.co_filename,
                lineno=fn.__code__.co_firstlineno,
            )
        params.append(Param(p.name, ann))
    return params


class Kernel:
    """A function decorated with ``@gradc.kernel``."""

    def __init__(self, fn: Callable, wrt: str | Sequence[str] | None = None):
        self.fn = fn
        #: The parameters to differentiate with respect to when neither ``gradc.compile`` nor
        #: ``gradc compile --wrt`` says (None: all), so one file can mix a loss with its
        #: forward-only helpers and still compile with one command.
        self.wrt = wrt if wrt is None or isinstance(wrt, str) else list(wrt)
        self.__name__ = fn.__name__
        self.__qualname__ = getattr(fn, "__qualname__", fn.__name__)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn
        self.params = _params_of(fn)
        self._traced: Traced | None = None

    @property
    def name(self) -> str:
        return self.fn.__name__

    def trace(self) -> Traced:
        if self._traced is None:
            self._traced = trace(self.fn, self.params)
        return self._traced

    def retrace(self) -> Traced:
        """Trace again, for when a global or closure value the function reads has changed."""
        self._traced = trace(self.fn, self.params)
        return self._traced

    def __call__(self, *args, **kwargs):
        if any(isinstance(a, Tensor) for a in (*args, *kwargs.values())):
            return self.fn(*args, **kwargs)  # called from another kernel: inline it
        from .compiler import compile as compile_kernel

        # Through compile() every time (a memo lookup by the kernel's fingerprint): a global or
        # closure value the kernel reads may have changed since the last call.
        return compile_kernel(self, wrt=[])(*args, **kwargs)

    def __repr__(self) -> str:
        sig = ", ".join(f"{p.name}: {p.type!r}" for p in self.params)
        return f"<gradc.kernel {self.name}({sig})>"


def kernel(fn: Callable | None = None, *, wrt: str | Sequence[str] | None = None):
    """``@gradc.kernel``, or ``@gradc.kernel(wrt=[...])`` to choose the default ``wrt`` (``[]``: forward only)."""
    if fn is None:
        return lambda f: kernel(f, wrt=wrt)
    if isinstance(fn, Kernel):
        return fn
    k = Kernel(fn, wrt)
    if wrt is not None:
        names = [p.name for p in k.params]
        wanted = [w.strip() for w in wrt.split(",")] if isinstance(wrt, str) else list(wrt)
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise TraceError(
                f"kernel '{fn.__name__}': wrt names {', '.join(map(repr, unknown))}, which {'is' if len(unknown) == 1 else 'are'} "
                f"not parameters (parameters: {', '.join(names)})",
                filename=fn.__code__.co_filename,
                lineno=fn.__code__.co_firstlineno,
            )
    return k


def _tuple_output_names(outs: list, taken: list[str]) -> list[str]:
    """The variables a kernel returns (``return param_new, m_new``) name its outputs in C,
    when they are distinct new names; otherwise ``out0, out1, ...``."""
    names = [o.node.name if isinstance(o, Tensor) and not isinstance(o.node, ir.Input) else None for o in outs]
    if all(names) and len(set(names)) == len(names) and not set(names) & set(taken) and not any(map(ir.reserved, names)):
        return names
    return [f"out{i}" for i in range(len(outs))]


def _name_locals(frame_filter, previous):
    """A profile hook that names traced tensors after the user's local variables and then
    passes the event on to the profile function that was installed before it, if any."""

    def hook(frame, event, arg):
        if event == "return" and frame_filter(frame):
            for name, value in frame.f_locals.items():
                if isinstance(value, Tensor) and value.node.name is None and not name.startswith("_"):
                    value.node.name = name
            if isinstance(arg, Tensor) and arg.node.name is None:
                arg.node.name = "out"
        if previous is not None:
            previous(frame, event, arg)

    return hook


def trace(fn: Callable, params: list[Param]) -> Traced:
    dims: list[str] = []
    inputs = []
    for p in params:
        shape = []
        for d in p.type.dims:
            if isinstance(d, str):
                if d not in dims:
                    dims.append(d)
                shape.append(ir.dim_symbol(d))
            else:
                shape.append(sp.Integer(d))
        inputs.append(ir.Input(p.name, shape, loc=(fn.__code__.co_filename, fn.__code__.co_firstlineno)))
    clash = set(dims) & {p.name for p in params}
    if clash:
        raise TraceError(
            f"kernel '{fn.__name__}': {sorted(clash)} used both as a parameter and as a dimension name",
            filename=fn.__code__.co_filename,
            lineno=fn.__code__.co_firstlineno,
        )
    user_file = fn.__code__.co_filename
    state = TraceState()
    previous_profile = sys.getprofile()
    # A profiler written in C (cProfile) cannot be chained to, nor put back with sys.setprofile:
    # under one, tensors keep their generic names rather than stopping the user's profile.
    naming = previous_profile is None or callable(previous_profile)
    if naming:
        sys.setprofile(_name_locals(lambda f: f.f_code.co_filename == user_file, previous_profile))
    try:
        with _active(state):
            result = fn(*(Tensor(i) for i in inputs))
    finally:
        if naming:
            sys.setprofile(previous_profile)
    loc = (fn.__code__.co_filename, fn.__code__.co_firstlineno)
    if isinstance(result, (tuple, list)):
        outs = list(result)
        names = _tuple_output_names(outs, [p.name for p in params] + dims)
    else:
        outs = [result]
        names = ["out"]
    if not outs:
        raise TraceError(f"kernel '{fn.__name__}' returns nothing", filename=loc[0], lineno=loc[1])
    nodes = []
    for i, o in enumerate(outs):
        if isinstance(o, Tensor):
            nodes.append(_as_float(o).node)
        elif _scalar_expr(o) is not None:
            nodes.append(ir.constant(_scalar_expr(o), loc=loc))
        else:
            raise TraceError(
                f"kernel '{fn.__name__}' must return tensors, got {type(o).__name__} as output {i}",
                filename=loc[0],
                lineno=loc[1],
            )
    graph = ir.Graph(inputs, nodes, names)
    return Traced(graph, params, dims, state.constraints, fn.__name__, loc[0], loc[1], isinstance(result, (tuple, list)), naming)
