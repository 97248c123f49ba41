"""Lower a differentiated, fused graph to C99 loop nests and render them with Jinja.

Each :class:`~gradc.ir.Map` becomes one loop nest.  Its body is the node's SymPy
expression after common-subexpression elimination (:func:`sympy.cse`), with placeholders
renamed after the tensors they read (``X_ik`` is ``X[i, k]``).  Buffers take the user's
variable names; temporaries live in a caller-provided workspace.  The templates in
``templates/`` own the layout of the ``.c`` and ``.h`` files; this module only prepares
the data they display.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jinja2
import sympy as sp

from . import __version__, ir
from .printer import GradcCPrinter, IndexPrinter
from .scalar import lower_for_c

LOOP_VARS = "ijklmnpqrstuvw"


@dataclass
class Entry:
    """One generated C function: which inputs it reads and which outputs it writes."""

    suffix: str
    inputs: list[ir.Input]
    outputs: list[tuple[str, ir.Node]]
    doc: str


@dataclass
class KernelSpec:
    name: str
    dtype: str
    dims: list[str]
    constraints: list[tuple[sp.Basic, str]]
    entries: list[Entry]
    source: str = ""
    origin: str = ""


@dataclass
class NestMath:
    """A loop nest as mathematics, for people (``gradc show --view math``)."""

    target: sp.Expr  # out[n, m] as a SymPy Indexed (or a Symbol for a scalar)
    reduce: str | None
    reduced: list[tuple[sp.Symbol, sp.Expr]]  # the loop variables reduced over, with their extents
    expr: sp.Expr  # the body before CSE, operands as Indexed
    temps: list[tuple[sp.Symbol, sp.Expr]]  # the CSE temporaries
    value: sp.Expr  # the body after CSE
    sources: list[tuple[str, int]]

    @property
    def ops_before_cse(self) -> int:
        return int(sp.count_ops(self.expr))

    @property
    def ops_after_cse(self) -> int:
        return int(sum(sp.count_ops(e) for _, e in self.temps) + sp.count_ops(self.value))


@dataclass
class Nest:
    comment: list[str]
    init: str | None
    outer: list[tuple[str, str]]
    acc: str | None
    inner: list[tuple[str, str]]
    body: list[str]
    finish: str | None
    math: NestMath


@dataclass
class Function:
    name: str
    suffix: str  # which entry point: forward, value_and_grad, vjp, jvp, hvp
    doc: list[str]
    params: list[str]
    decl_params: list[str]
    checks: list[str]
    buffers: list[str]
    nests: list[Nest]
    workspace_terms: list[str]
    workspace_elements: sp.Expr  # before the padding of each buffer to 16 elements
    unused: list[str]


@dataclass
class Rendered:
    module: str
    c_source: str
    header: str
    cdef: str
    functions: dict[str, list[Function]]  # kernel name -> its lowered entry points

    def translation_unit(self) -> str:
        """The ``.c`` with its header pasted in, for building without files beside it."""
        return self.c_source.replace(f'#include "{self.module}.h"', self.header, 1)


class Names:
    """Unique, valid C identifiers, derived from preferred (user-given) names."""

    def __init__(self, taken: Sequence[str] = ()):
        self.taken = set(taken)

    def take(self, preferred: str) -> str:
        base = re.sub(r"\W", "_", preferred) or "v"
        if base[0].isdigit():
            base = "v" + base
        if ir.reserved(base):
            base += "_"
        name, n = base, 1
        while name in self.taken:
            name, n = f"{base}_{n}", n + 1
        self.taken.add(name)
        return name

    def child(self) -> "Names":
        return Names(self.taken)


def templates_dir() -> Path:
    """Installed, the templates are the package ``gradc.templates``; in a checkout, ``templates/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "kernel.c.j2").is_file():
            return candidate
    raise FileNotFoundError(f"gradc's C templates are missing (looked in {here / 'templates'} and {here.parent / 'templates'})")


@functools.lru_cache(maxsize=None)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )


def template(name: str) -> jinja2.Template:
    return _env().get_template(name)


# ----------------------------------------------------------------------------- lowering
class FunctionLowering:
    def __init__(self, spec: KernelSpec, entry: Entry):
        self.spec = spec
        self.entry = entry
        self.fp = GradcCPrinter(spec.dtype)
        self.ip = IndexPrinter()
        self.ctype = self.fp.ctype
        self.names = Names(spec.dims)
        self.dim_syms = {ir.dim_symbol(d): d for d in spec.dims}
        self.buffers: dict[int, str] = {}
        self.shapes: dict[str, tuple] = {}
        self.read: set[str] = set()
        self.temps: list[tuple[str, sp.Expr]] = []

    def index(self, expr) -> str:
        return self.ip.doprint(sp.expand(expr))

    def lower(self) -> Function:
        entry = self.entry
        params = [f"ptrdiff_t {d}" for d in self.spec.dims]
        for inp in entry.inputs:
            name = self.names.take(inp.param)
            self.buffers[inp.id] = name
            self.shapes[name] = inp.shape
            params.append(f"const {self.ctype} *{name}")
        out_names = []
        for cname, node in entry.outputs:
            name = self.names.take(cname)
            out_names.append(name)
            params.append(f"{self.ctype} *{name}")
            self.shapes[name] = node.shape
        ws = self.names.take("workspace")
        params.append(f"void *{ws}")

        order = ir.topo_order([n for _, n in entry.outputs])
        copies = []
        for (cname, node), name in zip(entry.outputs, out_names):
            if isinstance(node, ir.Map) and node.id not in self.buffers:
                self.buffers[node.id] = name
            else:
                copies.append((name, node))
        nests = []
        for node in order:
            if isinstance(node, ir.Reshape):
                self.buffers.setdefault(node.id, self.buffers.get(node.arg.id))
                continue
            if not isinstance(node, ir.Map):
                continue
            if node.id not in self.buffers:
                name = self.names.take(node.label())
                self.buffers[node.id] = name
                self.temps.append((name, ir.num_elements(node.shape)))
            self.shapes[self.buffers[node.id]] = node.shape
            nests.append(self.nest(node))
        for name, node in copies:
            nests.append(self.copy(name, node))

        buffers, offset = [], []
        for name, size in self.temps:
            at = " + ".join(offset) if offset else "0"
            buffers.append(f"{self.ctype} *restrict {name} = ({self.ctype} *){ws} + {at};  /* {size} elements */")
            offset.append(f"gradc_round_up({self.index(size)})")
        checks = self.checks()
        restrict_params = [p.replace(" *", " *restrict ") for p in params]
        # An entry need not read every input (a constant Hessian ignores its point).
        unused = [self.buffers[i.id] for i in entry.inputs if self.buffers[i.id] not in self.read]
        if not self.temps:
            unused.append(ws)
        return Function(
            name=f"{self.spec.name}_{entry.suffix}",
            suffix=entry.suffix,
            doc=entry.doc.splitlines(),
            params=restrict_params,
            decl_params=params,
            checks=checks,
            buffers=buffers,
            nests=nests,
            workspace_terms=offset,
            workspace_elements=sp.Add(*(size for _, size in self.temps)),
            unused=unused,
        )

    def checks(self) -> list[str]:
        conds = [f"{d} < 0" for d in self.spec.dims]
        for cond, _msg in self.spec.constraints:
            conds.append(f"!({self.ip.doprint(cond)})")
        return conds

    # -- one loop nest per node --------------------------------------------------------------
    def nest(self, node: ir.Map) -> Nest:
        out = self.buffers[node.id]
        local = self.names.child()
        loop_vars = []
        pool = [c for c in LOOP_VARS] + [f"i{n}" for n in range(len(node.loop))]
        for extent in node.loop:
            # A loop over a one-letter named dimension N is called n, so the C reads like the math.
            dim = str(extent).lower() if extent.is_Symbol and len(str(extent)) == 1 else None
            if dim and dim not in local.taken:
                loop_vars.append(local.take(dim))
                continue
            while pool and pool[0] in local.taken:
                pool.pop(0)
            loop_vars.append(local.take(pool.pop(0)))
        var_syms = [sp.Symbol(v, integer=True) for v in loop_vars]

        body_lines, subs, indexed = [], {}, {}
        for op in node.operands:
            buf = self.buffers[op.node.id]
            self.read.add(buf)
            letters = "".join(loop_vars[a.var] if a.is_plain and len(loop_vars[a.var]) == 1 else ("0" if a.var is None and a.offset == 0 else "") for a in op.index)
            pretty = f"{buf}_{letters}" if len(letters) == op.node.rank and op.node.rank else buf.lower() if op.node.rank == 0 else f"{buf}_v"
            name = local.take(pretty if pretty != buf else buf + "_")
            offset = self.linear(op.node.shape, op.index, var_syms)
            indexed[name] = self.indexed(buf, op.index, var_syms)
            if op.node.dtype == "bool":
                body_lines.append(f"const int {name} = {buf}[{offset}] != 0;")
                subs[op.symbol] = sp.Symbol(name)
            else:
                body_lines.append(f"const {self.ctype} {name} = {buf}[{offset}];")
                subs[op.symbol] = sp.Symbol(name, real=True)
        expr = node.expr.xreplace(subs).xreplace({s: sp.Symbol(d, integer=True, nonnegative=True) for s, d in self.dim_syms.items()})
        temps, (value,) = sp.cse([_expand_small_powers(lower_for_c(expr))], symbols=(sp.Symbol(local.take(f"t{n}"), real=True) for n in range(10**6)))
        for sym, e in temps:
            kind = "int" if isinstance(e, sp.logic.boolalg.Boolean) else self.ctype
            body_lines.append(f"const {kind} {sym} = {self.fp.doprint(e)};")
        if node.dtype == "bool" and isinstance(value, sp.logic.boolalg.Boolean):
            val = f"{self.fp.doprint(value)} ? 1 : 0"
        else:
            val = self.fp.doprint(value)

        comment = [self.describe(node, loop_vars, subs)]
        to_math = {sp.Symbol(n, real=True): v for n, v in indexed.items()} | {sp.Symbol(n): v for n, v in indexed.items()}
        math = NestMath(
            target=self.indexed(out, node.out_index, var_syms) if node.rank else sp.Symbol(out),
            reduce=node.reduce,
            reduced=[(var_syms[v], node.loop[v]) for v in node.reduced_vars()] if node.reduce else [],
            expr=expr.xreplace(to_math),
            temps=[(t, e.xreplace(to_math)) for t, e in temps],
            value=value.xreplace(to_math),
            sources=sorted(node.sources),
        )
        out_idx = self.linear(node.shape, node.out_index, var_syms)
        n_out = len(node.out_vars())
        gather = node.is_gather_form()
        init = None
        if node.reduce is None:
            outer, inner, acc, finish = list(zip(loop_vars, node.loop)), [], None, None
            body_lines.append(f"{out}[{out_idx}] = {val};")
        elif gather:
            outer = list(zip(loop_vars[:n_out], node.loop[:n_out]))
            inner = list(zip(loop_vars[n_out:], node.loop[n_out:]))
            acc_name = local.take("acc")
            acc_type = "double" if node.reduce == "sum" else self.ctype
            acc = f"{acc_type} {acc_name} = {self.identity(node.reduce)};"
            body_lines.append(f"const {acc_type} {local.take('term')} = {val};")
            term = body_lines[-1].split(" = ")[0].split()[-1]
            body_lines.append(self.update(acc_name, term, node.reduce))
            finish = f"{out}[{out_idx}] = ({self.ctype}){acc_name};" if acc_type != self.ctype else f"{out}[{out_idx}] = {acc_name};"
        else:
            size = self.index(ir.num_elements(node.shape))
            e = local.take("e")
            init = f"for (ptrdiff_t {e} = 0; {e} < {size}; ++{e}) {out}[{e}] = {self.identity(node.reduce)};"
            outer, inner, acc, finish = list(zip(loop_vars, node.loop)), [], None, None
            term = local.take("term")
            body_lines.append(f"const {self.ctype} {term} = {val};")
            body_lines.append(self.update(f"{out}[{out_idx}]", term, node.reduce))
        return Nest(
            comment=comment,
            init=init,
            outer=[(v, self.index(x)) for v, x in outer],
            acc=acc,
            inner=[(v, self.index(x)) for v, x in inner],
            body=body_lines,
            finish=finish,
            math=math,
        )

    def identity(self, reduce: str | None) -> str:
        return {"sum": "0", "max": "-INFINITY", "min": "INFINITY"}[reduce]

    def update(self, target: str, term: str, reduce: str) -> str:
        if reduce == "sum":
            return f"{target} += {term};"
        cmp = ">" if reduce == "max" else "<"
        # NaN wins, as in NumPy: once the accumulator is NaN no comparison replaces it.
        return f"if ({term} {cmp} {target} || {term} != {term}) {target} = {term};"

    def indexed(self, buf: str, index: ir.IndexMap, var_syms) -> sp.Expr:
        if not index:
            return sp.Symbol(buf)
        dims = {s: sp.Symbol(d, integer=True, nonnegative=True) for s, d in self.dim_syms.items()}
        pos = [(a.offset if a.var is None else a.stride * var_syms[a.var] + a.offset).xreplace(dims) for a in index]
        return sp.IndexedBase(buf)[tuple(pos)]

    def linear(self, shape, index: ir.IndexMap, var_syms) -> str:
        stride = sp.Integer(1)
        total = sp.Integer(0)
        dims = {s: sp.Symbol(d, integer=True, nonnegative=True) for s, d in self.dim_syms.items()}
        for extent, a in reversed(list(zip(shape, index))):
            pos = a.offset if a.var is None else a.stride * var_syms[a.var] + a.offset
            total += stride * pos
            stride = stride * extent
        return self.index(total.xreplace(dims))

    def describe(self, node: ir.Map, loop_vars, subs) -> str:
        out = self.buffers[node.id]
        idx = ", ".join(repr_affine(a, loop_vars) for a in node.out_index)
        lhs = f"{out}[{idx}]" if node.rank else out
        red = node.reduced_vars()
        op = {None: "=", "sum": "+=", "max": "max=", "min": "min="}[node.reduce]
        over = f"   (over {', '.join(loop_vars[v] for v in red)})" if red and node.reduce else ""
        body = str(node.expr.xreplace(subs))
        if len(body) > 100:
            body = body[:97] + "..."
        where = ""
        locs = sorted(node.sources)
        if locs:
            files = {os.path.basename(f) for f, _ in locs}
            lines = ", ".join(str(l) for l in sorted({l for _, l in locs}))
            where = f"   [{'/'.join(sorted(files))}: line{'s' if ',' in lines else ''} {lines}]"
        return f"{lhs} {op} {body}{over}{where}"

    def copy(self, name: str, node: ir.Node) -> Nest:
        src = self.buffers[node.id]
        self.read.add(src)
        e = self.names.child().take("e")
        size = self.index(ir.num_elements(node.shape))
        var = sp.Symbol(e, integer=True)
        math = NestMath(sp.IndexedBase(name)[var], None, [], sp.IndexedBase(src)[var], [], sp.IndexedBase(src)[var], sorted(node.sources))
        return Nest([f"{name} = {src} (output copy)"], None, [(e, size)], None, [], [f"{name}[{e}] = {src}[{e}];"], None, math)


def _expand_small_powers(expr: sp.Expr) -> sp.Expr:
    """Write ``f(x)**2`` as ``f(x)*f(x)`` so that CSE sees ``f(x)`` twice and computes it once.

    The printer prints small integer powers as products anyway; without this the call
    would be emitted twice, and a C compiler may not merge libm calls (errno).
    """
    return expr.replace(
        lambda e: e.is_Pow and e.exp.is_Integer and 2 <= abs(int(e.exp)) <= 4 and not e.base.is_Atom,
        lambda e: sp.Mul(*[e.base] * abs(int(e.exp)), evaluate=False) ** (1 if e.exp > 0 else -1),
    )


def repr_affine(a: ir.Affine, loop_vars) -> str:
    if a.var is None:
        return str(a.offset)
    s = loop_vars[a.var] if a.stride == 1 else f"{a.stride}*{loop_vars[a.var]}"
    return s if a.offset == 0 else f"{s} + {a.offset}"


def render(specs: Sequence[KernelSpec], module: str) -> Rendered:
    """The ``.c``, the ``.h`` and cffi's declarations for the kernels of one module."""
    kernels = []
    functions = {}
    for spec in specs:
        fns = [FunctionLowering(spec, e).lower() for e in spec.entries]
        functions[spec.name] = fns
        ctype = "float" if spec.dtype == "f32" else "double"
        kernels.append(
            {
                "spec": spec,
                "functions": fns,
                "ctype": ctype,
                "dims_params": ", ".join(f"ptrdiff_t {d}" for d in spec.dims) or "void",
                "dims_args": spec.dims,
                "source": [l.replace("*/", "* /") for l in spec.source.rstrip().splitlines()],
            }
        )
    ctx = {"module": module, "version": __version__, "kernels": kernels, "guard": re.sub(r"\W", "_", module).upper() + "_H"}
    c_source = template("kernel.c.j2").render(**ctx)
    header = template("kernel.h.j2").render(**ctx)
    cdef = "\n".join(
        line for line in template("cdef.h.j2").render(**ctx).splitlines() if line.strip()
    )
    return Rendered(module, c_source, header, cdef, functions)
