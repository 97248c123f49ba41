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
from dataclasses import dataclass, field
from typing import Sequence

import jinja2
import sympy as sp

from . import __version__, blas, build, ir, schedule
from .printer import NEAR_BOUND, VECTOR_MATH_ORDER, GradcCPrinter, IndexPrinter
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
    threads: int = 1  # above 1: OpenMP pragmas for this many threads (see gradc/schedule.py)
    backend: str = "c"  # "blas": matrix products may call the BLAS (gradc/blas.py)


@dataclass
class NestMath:
    """A loop nest as mathematics, for people (``gradc show --view math``)."""

    target: sp.Expr  # out[n, m] as a SymPy Indexed (or a Symbol for a scalar)
    reduce: str | None
    reduced: list[tuple[sp.Symbol, sp.Expr]]  # the loop variables reduced over, with their extents
    expr: sp.Expr  # the body before CSE, operands as Indexed
    temps: list[tuple[sp.Symbol, sp.Expr]]  # the CSE temporaries (shared by a nest's outputs)
    value: sp.Expr  # the body after CSE
    sources: list[tuple[str, int]]


@dataclass
class Update:
    """How one reduction's term reaches its accumulator, in each place of the loop nest."""

    direct_update: str  # a plain innermost loop (or no loop)
    ctype: str = ""  # the rest: lanes only
    lanes: str = ""
    identity: str = ""
    part: str = ""
    lane_update: str = ""
    part_update: str = ""
    tail_update: str = ""
    block_update: str = ""


@dataclass
class Lane:
    """Names of the block/lane loop variables of a vectorised innermost loop."""

    block: str
    end: str
    start: str
    l: str
    block_size: int
    #: a block can end with fewer than a lane's width of elements: not when the extent is a
    #: fixed multiple of the lanes (gcc -O2 -Wall then warns of the empty tail loop it
    #: cannot prove empty, "iteration ... invokes undefined behavior")
    tail: bool = True


#: Operands of a tile to pack: the body line that loads each, to its local and (buffer, offset).
Packed = dict[int, tuple[sp.Symbol, tuple[str, str]]]


@dataclass
class Tile:
    """A contraction computed in register tiles (see ``tile`` in gradc/schedule.py)."""

    outer: list[tuple[str, str]]  # (variable, extent) of the other output loops
    row: tuple[str, str] | None  # the row loop (None: the output has one axis)
    col: tuple[str, str]  # the unit-stride column loop
    reds: list[tuple[str, str]]  # the reduction loops
    rows: int
    cols: int
    blocked: bool  # sums: blocks of the innermost reduction loop go into a double tile
    block_size: int
    #: threads share the column tiles, not the row tiles: a turned tile (schedule's
    #: _turned_tile) has only a few rows, and nothing packed
    parallel_cols: bool
    ctype: str
    identity: str
    tile: str  # names: the register tile, the double tile, loop variables
    wide: str
    row0: str
    col0: str
    row_full: str
    col_full: str
    gi: str
    gj: str
    blk: str
    blk_end: str
    acc: str
    acc_type: str
    tile_update: str  # tile[gi][gj] op= term
    flush: str  # wide[gi][gj] += tile[gi][gj]
    acc_update: str  # the edges: one accumulator per element
    store_tile: str  # out[...] = tile or wide
    store_acc: str
    body: list[str] = field(default_factory=list)  # one point of a full tile: packed operands read from their panels
    edge_body: list[str] = field(default_factory=list)  # one point of a one-row tile: only the column panels
    silent: tuple[str, ...] = ()  # loop variables that body never reads
    edge_silent: tuple[str, ...] = ()  # loop variables that edge_body never reads
    packs: list[str] = field(default_factory=list)  # panel[cols*r + gj] = operand: filling the panels of a column tile
    #: operands strided along the reduction (see row_panels): whether they are read from panels
    #: (``use_panels``, set by ``panel_test``), the lines that fill them, and each row tile's
    #: view of them (a pointer and the distance between reduction steps)
    use_panels: str = ""
    panel_test: str = ""
    row_packs: list[str] = field(default_factory=list)
    row_views: list[str] = field(default_factory=list)
    lanes: int = 0  # "dots": each cell of the tile is a dot product in this many lanes
    tail: bool = True  # "dots": a block can end with fewer than ``lanes`` steps (see Lane.tail)
    lane_update: str = ""
    tail_update: str = ""
    part: str = ""
    l: str = ""
    r_lane: str = ""


@dataclass
class GemmCall:
    """A matrix product handed to the BLAS when :func:`gradc_blas_pays` (templates/blas.c.j2)."""

    comment: str
    m: str
    n: str
    k: str
    lda: str
    ldb: str
    call: str


@dataclass
class Nest:
    """One loop nest (the shapes are in templates/nest.c.j2, the choices in gradc/schedule.py)."""

    comment: list[str]
    init: list[str]  # before the loops: filling an accumulated output with the identity
    loops: list[tuple[str, str]]  # (variable, extent), outermost first
    acc_depth: int  # accumulators are declared inside this many loops
    accs: list[str]
    body: list[str]  # one point: loads, CSE temporaries, stores, reduction terms
    updates: list[Update]
    finish: list[str]  # after the loops inside acc_depth: accumulators to the outputs
    lanes: int  # 0, or the lane count of the innermost loop
    lane: Lane | None
    math: list[NestMath]
    tile: Tile | None = None
    silent: tuple[str, ...] = ()  # loop variables the body never reads: (void) them for -Wunused
    parallel: str = ""  # the OpenMP pragma of the outermost loop (empty: serial)
    starts: list[str] = field(default_factory=list)  # where each loop starts, when not all at 0
    after: list[str] = field(default_factory=list)  # after the loops: chunk partials to the outputs
    gemm: GemmCall | None = None  # backend "blas": the library call that may run instead of the loops
    #: sin/cos in lanes: each block first checks (``near_scan``, ``near_checks``) that every
    #: argument is small enough for the short reduction, then runs ``near_body`` or ``body``
    near: str = ""
    near_scan: list[str] = field(default_factory=list)
    near_checks: list[str] = field(default_factory=list)
    near_body: list[str] = field(default_factory=list)


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
    helpers: set[str]  # vectorisable math functions (templates/vecmath.c.j2) it calls


@dataclass
class Rendered:
    module: str
    c_source: str
    header: str
    cdef: str
    functions: dict[str, list[Function]]  # kernel name -> its lowered entry points
    #: With ``render(units=True)``: the same functions as ``c_source``, one entry point per
    #: translation unit with the header pasted in (the workspace sizes go with the first), so
    #: that the build can run one C compiler per unit side by side and needs no files beside them.
    units: tuple[str, ...] = ()


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


def grouped(c_expr: str) -> str:
    """``c_expr`` ready to be an operand of ``*`` or ``/``: an extent such as ``N - 1`` in parentheses."""
    return c_expr if re.fullmatch(r"\w+", c_expr) else f"({c_expr})"


@functools.lru_cache(maxsize=None)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(build.templates_dir())),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        bytecode_cache=build.template_cache(),
    )
    env.filters["grouped"] = grouped
    return env


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
        #: the IR's dimension symbols -> the C parameters' (integers, never negative)
        self.c_dims = {s: sp.Symbol(d, integer=True, nonnegative=True) for s, d in self.dim_syms.items()}
        self.buffers: dict[int, str] = {}
        self.shapes: dict[str, tuple] = {}
        self.read: set[str] = set()
        self.temps: list[tuple[str, sp.Expr]] = []
        self.panels: dict[sp.Expr, list[str]] = {}  # packing panels by size (see pack)

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
        for group in schedule.groups(order):
            head = group[0]
            if isinstance(head, ir.Reshape):
                self.buffers.setdefault(head.id, self.buffers.get(head.arg.id))
                continue
            if not isinstance(head, ir.Map):
                continue
            for node in group:
                if node.id not in self.buffers:
                    name = self.names.take(node.label())
                    self.buffers[node.id] = name
                    self.temps.append((name, ir.num_elements(node.shape)))
                self.shapes[self.buffers[node.id]] = node.shape
            nests.append(self.nest(group))
            if self.spec.backend == "blas" and len(group) == 1:
                nests[-1].gemm = self.gemm_call(head)
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
            helpers=set(self.fp.helpers),
        )

    def checks(self) -> list[str]:
        conds = [f"{d} < 0" for d in self.spec.dims]
        for cond, _msg in self.spec.constraints:
            conds.append(f"!({self.ip.doprint(cond)})")
        # Two slices often need the same thing (x[1:] - x[:-1]); test it once.
        return list(dict.fromkeys(conds))

    # -- one loop nest per group of nodes (see gradc/schedule.py) ---------------------------
    def loop_names(self, extents, local: Names) -> list[str]:
        names = []
        pool = [c for c in LOOP_VARS] + [f"i{n}" for n in range(len(extents))]
        for extent in extents:
            # A loop over a one-letter named dimension N is called n, so the C reads like the math.
            dim = str(extent).lower() if extent.is_Symbol and len(str(extent)) == 1 else None
            if dim and dim not in local.taken:
                names.append(local.take(dim))
                continue
            while pool and pool[0] in local.taken:
                pool.pop(0)
            names.append(local.take(pool.pop(0)))
        return names

    def nest(self, group: list[ir.Map]) -> Nest:
        head = group[0]
        if len(group) == 1:
            plan = schedule.schedule(head)
        else:
            plan = schedule.Schedule("map", tuple(range(len(head.loop))), 0, schedule.group_lanes(group))
        local = self.names.child()
        loop_vars = self.loop_names(head.loop, local)
        var_syms = [sp.Symbol(v, integer=True) for v in loop_vars]

        loads: dict[tuple[str, str], sp.Symbol] = {}
        load_line: dict[tuple[str, str], int] = {}  # where in the body each operand is read
        operand_keys: list[tuple[str, str]] = []  # the head node's operands, by position
        body: list[str] = []
        indexed: dict[sp.Symbol, sp.Expr] = {}
        exprs = []
        for node in group:
            subs = {}
            for op in node.operands:
                buf = self.buffers[op.node.id]
                self.read.add(buf)
                offset = self.linear(op.node.shape, op.index, var_syms)
                key = (buf, offset)
                if node is head:
                    operand_keys.append(key)
                if key not in loads:
                    load_line[key] = len(body)
                    letters = "".join(
                        loop_vars[a.var] if a.is_plain and len(loop_vars[a.var]) == 1 else ("0" if a.var is None and a.offset == 0 else "")
                        for a in op.index
                    )
                    pretty = f"{buf}_{letters}" if len(letters) == op.node.rank and op.node.rank else buf.lower() if op.node.rank == 0 else f"{buf}_v"
                    name = local.take(pretty if pretty != buf else buf + "_")
                    if op.node.dtype == "bool":
                        body.append(f"const int {name} = {buf}[{offset}] != 0;")
                        loads[key] = sp.Symbol(name)
                    else:
                        body.append(f"const {self.ctype} {name} = {buf}[{offset}];")
                        loads[key] = sp.Symbol(name, real=True)
                    indexed[loads[key]] = self.indexed(buf, op.index, var_syms)
                subs[op.symbol] = loads[key]
            exprs.append(node.expr.xreplace(subs).xreplace(self.c_dims))
        symbols = (sp.Symbol(local.take(f"t{n}"), real=True) for n in range(10**6))
        # Unevaluated products (x*x written out so CSE would share x) confuse sympy.cse's
        # multiset matching and once dropped a factor; f(x)**2 prints as f(x)*f(x), and the
        # C compiler merges the two pure calls.
        temps, values = sp.cse([lower_for_c(e) for e in exprs], symbols=symbols)
        # A nest that calls sin or cos in float32 may take their short reduction (near_path).
        near = self.ctype == "float" and plan.kind not in ("tile", "dots") and (plan.lanes or (plan.kind == "map" and len(head.loop) > 0))
        if near:
            temps, values = self.near_arguments_as_locals(temps, values, symbols)
        printed: dict[int, tuple[str, sp.Expr, str]] = {}  # the body lines that print an expression

        def emit(before: str, expr: sp.Expr, after: str = ";") -> None:
            printed[len(body)] = (before, expr, after)
            body.append(before + self.fp.doprint(expr) + after)

        computed = {}  # each CSE temporary: its expression and its line
        for sym, e in temps:
            kind = "int" if isinstance(e, sp.logic.boolalg.Boolean) else self.ctype
            emit(f"const {kind} {sym} = ", e)
            computed[sym] = (e, body[-1])

        init, accs, finish, updates = [], [], [], []
        reductions = []  # (accumulator, its C type, reduce) of each whole-box or per-output reduction
        lanes = schedule.LANES if plan.lanes else 0
        for node, value in zip(group, values):
            out = self.buffers[node.id]
            out_idx = self.linear(node.shape, node.out_index, var_syms)
            after = " ? 1 : 0;" if node.dtype == "bool" and isinstance(value, sp.logic.boolalg.Boolean) else ";"
            if node.reduce is None:
                emit(f"{out}[{out_idx}] = ", value, after)
                continue
            term = local.take(f"term_{out}")
            emit(f"const {self.ctype} {term} = ", value, after)
            if plan.kind in ("tile", "dots"):
                tile_term = term
                continue
            if plan.kind == "accumulate":
                size = self.index(ir.num_elements(node.shape))
                e = local.take("e")
                init.append(f"for (ptrdiff_t {e} = 0; {e} < {size}; ++{e}) {out}[{e}] = {self.identity(node.reduce)};")
                updates.append(Update(direct_update=self.update(f"{out}[{out_idx}]", term, node.reduce)))
                continue
            acc = local.take(f"acc_{out}")
            acc_type = "double" if node.reduce == "sum" else self.ctype
            accs.append(f"{acc_type} {acc} = {self.identity(node.reduce)};")
            reductions.append((acc, acc_type, node.reduce))
            finish.append(f"{out}[{out_idx}] = {'(' + self.ctype + ')' if acc_type != self.ctype else ''}{acc};")
            if not lanes:
                updates.append(Update(direct_update=self.update(acc, term, node.reduce)))
                continue
            lane_array, part = local.take(f"lanes_{out}"), local.take(f"part_{out}")
            l_var = "gradc_l"
            updates.append(
                Update(
                    direct_update=self.update(acc, term, node.reduce),
                    ctype=self.ctype,
                    lanes=lane_array,
                    identity=self.identity(node.reduce),
                    part=part,
                    lane_update=self.update(f"{lane_array}[{l_var}]", term, node.reduce),
                    part_update=self.update(part, f"{lane_array}[{l_var}]", node.reduce),
                    tail_update=self.update(part, term, node.reduce),
                    block_update=self.update(acc, part, node.reduce),
                )
            )
        tile = None
        if plan.kind in ("tile", "dots"):
            tile = self.tile(group[0], plan, loop_vars, local, tile_term)
            packed = {load_line[k]: (loads[k], k) for k in (operand_keys[i] for i in plan.pack)}
            used: dict[sp.Expr, int] = {}  # the panels of each size this nest has taken (see panel)
            self.pack(tile, packed, body, group[0], used)
            if plan.pack_rows:
                rows = {load_line[operand_keys[i]]: (loads[operand_keys[i]], head.operands[i]) for i in plan.pack_rows}
                self.row_panels(tile, rows, head, var_syms, local, used)
            cell = (tile.row[0] if tile.row else None, tile.col[0])
            tile.silent, tile.edge_silent = _unread(cell, tile.body), _unread(cell, tile.edge_body)
        lane = None
        if lanes:
            v = loop_vars[plan.order[-1]]
            tail = _may_end_short(head.loop[plan.order[-1]], lanes)
            lane = Lane(local.take(f"{v}_block"), local.take(f"{v}_end"), local.take(f"{v}_lane"), "gradc_l", schedule.BLOCK, tail)
        to_math = indexed
        math = [
            NestMath(
                target=self.indexed(self.buffers[node.id], node.out_index, var_syms) if node.rank else sp.Symbol(self.buffers[node.id]),
                reduce=node.reduce,
                reduced=[(var_syms[v], node.loop[v]) for v in node.reduced_vars()] if node.reduce else [],
                expr=expr.xreplace(to_math),
                temps=[(t, e.xreplace(to_math)) for t, e in temps],
                value=value.xreplace(to_math),
                sources=sorted(node.sources),
            )
            for node, expr, value in zip(group, exprs, values)
        ]
        nest = Nest(
            comment=[self.describe(node, loop_vars, var_syms) for node in group],
            init=init,
            loops=[(loop_vars[v], self.index(head.loop[v])) for v in plan.order],
            acc_depth=plan.acc_depth,
            accs=accs,
            body=body,
            updates=updates,
            finish=finish,
            lanes=lanes,
            lane=lane,
            math=math,
            tile=tile,
            silent=_unread(loop_vars, body),
        )
        # Not for tiles and dot products: their templates emit a body of their own.
        if near:
            loaded = {loads[k]: body[load_line[k]] for k in loads}
            self.near_path(nest, local, printed, loaded, computed)
        if self.spec.threads > 1:
            self.parallelise(nest, group, plan, reductions, local)
        return nest

    def near_path(
        self, nest: Nest, local: Names, printed: dict[int, tuple[str, sp.Expr, str]], loaded: dict[sp.Symbol, str], computed: dict[sp.Symbol, tuple[sp.Expr, str]]
    ) -> None:
        """Give a nest that calls sin or cos a second body with their short reduction.

        The exact reduction (any float) is most of the cost of sin and cos; the short one is
        exact only for |x| <= 2^19.  The innermost loop runs in blocks (a laned one already
        does); a block whose arguments are all that small, as nearly every block in practice,
        runs the second body; a block with a larger, infinite or NaN argument runs the first.

        ``printed`` holds the body lines that print an expression, by position, as (text
        before, expression, text after): the second body prints them again with the near
        forms.  Every argument is a local (see near_arguments_as_locals); the scan before each
        block computes it by the same lines as the body, from the operand loads (``loaded``:
        local -> line) and CSE temporaries (``computed``: local -> expression and line) it
        is made of.
        """
        args = list(dict.fromkeys(a for _, e, _ in printed.values() for a in self.fp.near_arguments(e)))
        if not args:
            return
        nest.near = local.take("near")
        if nest.lane is None:  # a plain innermost loop: it runs in blocks, each scanned first
            v = nest.loops[-1][0]
            nest.lane = Lane(local.take(f"{v}_block"), local.take(f"{v}_end"), "", "", schedule.BLOCK)
        needed: set[sp.Symbol] = set()
        todo = [sym for a in args for sym in a.free_symbols]
        while todo:
            sym = todo.pop()
            if sym not in needed:
                needed.add(sym)
                todo.extend(computed[sym][0].free_symbols if sym in computed else ())
        nest.near_scan = [line for sym, line in loaded.items() if sym in needed]
        nest.near_scan += [line for sym, (_, line) in computed.items() if sym in needed]
        # One statement per argument: clang's -Wall warns of a chain of & over calls.
        nest.near_checks = [f"{nest.near} &= (fabsf({self.fp.doprint(a)}) <= {NEAR_BOUND});" for a in args]
        self.fp.near = True
        try:
            nest.near_body = list(nest.body)
            for i, (before, e, after) in printed.items():
                nest.near_body[i] = before + self.fp.doprint(e) + after
        finally:
            self.fp.near = False

    def near_arguments_as_locals(self, temps: list, values: list, symbols) -> tuple[list, list]:
        """The CSE result with every argument of a sin or cos that has a near form made a local
        of its own (from ``symbols``), before the line that calls it.  The C compiler then
        computes each argument by one statement, the same in the scan of near_path and in the
        body: with -ffp-contract=fast it could fuse a*b - c*d differently in two places, and
        a cancelling argument could differ by far more than an ulp."""
        out: list[tuple[sp.Symbol, sp.Expr]] = []
        made: dict[sp.Expr, sp.Symbol] = {}

        def local(arg: sp.Expr) -> sp.Expr:
            if arg.is_Symbol:
                return arg
            if arg not in made:
                made[arg] = next(symbols)
                out.append((made[arg], arg))
            return made[arg]

        def rewrite(e: sp.Expr) -> sp.Expr:
            # Bottom up: the argument of an inner call is a local before the outer one's is made.
            return e.replace(self.fp.has_near_form, lambda call: call.func(local(call.args[0])))

        for sym, e in temps:
            e = rewrite(e)
            out.append((sym, e))
        values = [rewrite(v) for v in values]
        return out, values

    def parallelise(self, nest: Nest, group: list[ir.Map], plan, reductions, local: Names) -> None:
        """Share the nest's outermost loop between threads (see ``parallel_form`` in gradc/schedule.py)."""
        form = schedule.parallel_form(group, plan)
        work = sp.Mul(*group[0].loop)
        if form is None or (work.is_Integer and work < schedule.PARALLEL_MIN_WORK):
            return
        pragma = f"omp parallel for schedule(static) num_threads({self.spec.threads})"
        if not work.is_Integer:
            pragma += f" if({self.index(work)} >= {schedule.PARALLEL_MIN_WORK})"
        nest.parallel = pragma
        if form == "chunks":
            self.chunk(nest, reductions, local)

    def chunk(self, nest: Nest, reductions, local: Names) -> None:
        """The outermost loop in fixed chunks, each with its own partial result of every
        whole-box reduction (a nest of one loop may have none).

        The chunks depend on the extent only, and the partials are combined in chunk order,
        so the result is the same whichever threads, and however many, ran the chunks.
        """
        chunks = schedule.CHUNKS
        v, extent = nest.loops[0]
        c, lo, hi = local.take("chunk"), local.take(f"{v}_lo"), local.take(f"{v}_hi")
        total = grouped(extent)
        if len(nest.loops) == 1:
            # The chunked loop is the vectorised one: chunks of whole blocks keep each element
            # on the path (vector body or scalar tail) it takes on one thread.
            block = schedule.BLOCK
            units = f"(({total} + {block - 1}) / {block})"
            bounds = [f"{c} * {units} / {chunks} * {block}", f"{c} + 1 < {chunks} ? ({c} + 1) * {units} / {chunks} * {block} : {total}"]
        else:
            bounds = [f"{c} * {total} / {chunks}", f"({c} + 1) * {total} / {chunks}"]
        partials = [local.take(acc.replace("acc_", "partials_", 1)) for acc, _, _ in reductions]
        nest.init += [f"{ctype} {p}[{chunks}];" for p, (_, ctype, _) in zip(partials, reductions)]
        nest.after = (
            nest.accs
            + [f"for (ptrdiff_t {c} = 0; {c} < {chunks}; ++{c}) {self.update(acc, f'{p}[{c}]', reduce)}" for p, (acc, _, reduce) in zip(partials, reductions)]
            + nest.finish
        )
        nest.accs = [f"const ptrdiff_t {lo} = {bounds[0]};", f"const ptrdiff_t {hi} = {bounds[1]};"] + nest.accs
        nest.finish = [f"{p}[{c}] = {acc};" for p, (acc, _, _) in zip(partials, reductions)]
        nest.loops = [(c, str(chunks)), (v, hi)] + nest.loops[1:]
        nest.starts = ["0", lo] + ["0"] * (len(nest.loops) - 2)
        nest.acc_depth = 1

    def tile(self, node: ir.Map, plan, loop_vars: list[str], local: Names, term: str) -> Tile:
        row, col = plan.tile
        reds = node.reduced_vars()
        out = self.buffers[node.id]
        var_syms = [sp.Symbol(v, integer=True) for v in loop_vars]
        out_idx = self.linear(node.shape, node.out_index, var_syms)
        names = {k: local.take(k) for k in ("tile", "wide", "row0", "col0", "row_full", "col_full", "gi", "gj", "blk", "blk_end", "acc")}
        dots = plan.kind == "dots"
        # A sum over one fixed extent of at most one block is one block: its double tile would
        # add a single partial sum, the same bits, in more code for the C compiler.
        single_block = len(reds) == 1 and node.loop[reds[0]].is_Integer and int(node.loop[reds[0]]) <= schedule.BLOCK
        blocked = node.reduce == "sum" and (dots or not single_block)
        acc_type = "double" if node.reduce == "sum" else self.ctype
        held = names["wide"] if blocked else names["tile"]
        cast = f"({self.ctype})" if blocked else ""
        cell = f"[{names['gi']}][{names['gj']}]"
        acc_cast = f"({self.ctype})" if acc_type != self.ctype else ""
        extra = {}
        if dots:
            lanes = _fit(schedule.LANES if self.ctype == "float" else schedule.LANES // 2, node.loop[reds[-1]])
            extra = dict(
                lanes=lanes,
                tail=_may_end_short(node.loop[reds[-1]], lanes),
                l=local.take("l"),
                r_lane=local.take(f"{loop_vars[reds[-1]]}_lane"),
                part=local.take("part"),
            )
            lane_cell = f"[{names['gi']}][{names['gj']}][{extra['l']}]"
            extra["lane_update"] = self.update(names["tile"] + lane_cell, term, node.reduce)
            extra["tail_update"] = self.update(extra["part"], term, node.reduce)
        return Tile(
            outer=[(loop_vars[v], self.index(node.loop[v])) for v in plan.order[: plan.acc_depth]],
            row=(loop_vars[row], self.index(node.loop[row])) if row is not None else None,
            col=(loop_vars[col], self.index(node.loop[col])),
            reds=[(loop_vars[v], self.index(node.loop[v])) for v in reds],
            rows=_fit((schedule.TILE_DOTS if dots else schedule.TILE_ROWS) if row is not None else 1, node.loop[row] if row is not None else None),
            cols=_fit(schedule.TILE_DOTS if dots else schedule.TILE_COLS if self.ctype == "float" else schedule.TILE_COLS // 2, node.loop[col]),
            blocked=blocked,
            block_size=schedule.BLOCK,
            parallel_cols=not plan.pack and row is not None and node.loop[row].is_Integer and int(node.loop[row]) < schedule.NARROW,
            ctype=self.ctype,
            identity=self.identity(node.reduce),
            **{k: names[k] for k in ("tile", "wide", "row0", "col0", "row_full", "col_full", "gi", "gj", "blk", "blk_end", "acc")},
            acc_type=acc_type,
            tile_update=self.update(names["tile"] + cell, term, node.reduce),
            flush=f"{names['wide']}{cell} += {names['tile']}{cell};",
            acc_update=self.update(names["acc"], term, node.reduce),
            store_tile=f"{out}[{out_idx}] = {cast}{held}{cell};",
            store_acc=f"{out}[{out_idx}] = {acc_cast}{names['acc']};",
            **extra,
        )

    def pack(self, tile: Tile, packed: Packed, body: list[str], node: ir.Map, used: dict[sp.Expr, int]) -> None:
        """Give the full tiles a body that reads the packed operands from their panels.

        ``packed`` maps the body line that loads an operand to its local and (buffer, offset).
        Each packed operand gets a panel of (reduction extent) x cols elements in the
        workspace, refilled for every column tile: row tiles then read one contiguous vector
        per reduction step instead of a strided (or transposed) row of the operand.
        """
        tile.body = list(body)
        r = tile.reds[0][0]
        size = ir.num_elements([node.loop[v] for v in node.reduced_vars()]) * tile.cols
        for at, (name, (buf, offset)) in sorted(packed.items()):
            panel = self.panel(size, used)
            place = f"{tile.cols}*{r} + {tile.gj}"
            tile.packs.append(f"{panel}[{place}] = {buf}[{offset}];")
            tile.body[at] = f"const {self.ctype} {name} = {panel}[{place}];"
        tile.edge_body = list(tile.body)

    def row_panels(
        self, tile: Tile, rows: dict[int, tuple[sp.Symbol, ir.Operand]], node: ir.Map, var_syms, local: Names, used: dict[sp.Expr, int]
    ) -> None:
        """Let the full tiles read the operands ``rows`` (body line -> local, operand: contiguous
        along the rows, strided along the reduction) through a view of each row tile: a panel
        of (row extent) x (reduction extent) elements, filled once before the column tiles,
        where the reduction steps of a row tile are ``rows`` elements apart, when the operand
        is too large to stay in cache (``schedule.ROW_PANEL_MIN_BYTES``) and several column
        tiles read it; else the operand itself.  The one-row tiles at the bottom edge read
        the operands where they are."""
        row, red = node.out_vars()[-2], node.reduced_vars()[0]
        r, r_extent = tile.reds[0]
        size = ir.num_elements([node.loop[row], node.loop[red]])
        tile.use_panels = local.take("row_panels")
        min_elements = schedule.ROW_PANEL_MIN_BYTES // (4 if self.ctype == "float" else 8)
        # With one column tile the operand is read once either way.
        tile.panel_test = f"{tile.col_full} > {tile.cols} && {self.index(size.xreplace(self.c_dims))} >= {min_elements}"
        first_row = list(var_syms)
        first_row[row], first_row[red] = sp.Symbol(tile.row0, integer=True), sp.Integer(0)
        r_stride = grouped(r_extent)
        for at, (name, op) in sorted(rows.items()):
            buf = self.buffers[op.node.id]
            panel = self.panel(size, used)
            view, step = local.take(f"{buf}_rows"), local.take(f"{buf}_step")
            offset = self.linear(op.node.shape, op.index, var_syms)
            tile.row_packs.append(f"{panel}[{r_stride}*{tile.row0} + {tile.rows}*{r} + {tile.gi}] = {buf}[{offset}];")
            base = self.linear(op.node.shape, op.index, first_row)
            stride = self.index(schedule.coefficient(op.node.shape, op.index, red).xreplace(self.c_dims))
            tile.row_views += [
                f"const {self.ctype} *{view} = {tile.use_panels} ? {panel} + {r_stride}*{tile.row0} : {buf} + {base};",
                f"const ptrdiff_t {step} = {tile.use_panels} ? {tile.rows} : {stride};",
            ]
            tile.body[at] = f"const {self.ctype} {name} = {view}[{step}*{r} + {tile.gi}];"

    def panel(self, size: sp.Expr, used: dict[sp.Expr, int]) -> str:
        """A workspace buffer of ``size`` elements for one packed operand of a nest.

        Nests run one after another, so later nests reuse the panels of earlier ones of the
        same size; ``used`` counts those this nest has already taken.
        """
        same = self.panels.setdefault(size, [])
        if used.get(size, 0) == len(same):
            name = self.names.take("panel")
            self.temps.append((name, size))
            same.append(name)
        used[size] = used.get(size, 0) + 1
        return same[used[size] - 1]

    def identity(self, reduce: str | None) -> str:
        return {"sum": "0", "max": "-INFINITY", "min": "INFINITY"}[reduce]

    def update(self, target: str, term: str, reduce: str) -> str:
        if reduce == "sum":
            return f"{target} += {term};"
        cmp = ">" if reduce == "max" else "<"
        # NaN wins, as in NumPy: once the accumulator is NaN no comparison replaces it.
        return f"{target} = (({term} {cmp} {target}) | ({term} != {term})) ? {term} : {target};"

    def indexed(self, buf: str, index: ir.IndexMap, var_syms) -> sp.Expr:
        if not index:
            return sp.Symbol(buf)
        pos = [(a.offset if a.var is None else a.stride * var_syms[a.var] + a.offset).xreplace(self.c_dims) for a in index]
        return sp.IndexedBase(buf)[tuple(pos)]

    def linear(self, shape, index: ir.IndexMap, var_syms) -> str:
        stride = sp.Integer(1)
        total = sp.Integer(0)
        for extent, a in reversed(list(zip(shape, index))):
            pos = a.offset if a.var is None else a.stride * var_syms[a.var] + a.offset
            total += stride * pos
            stride = stride * extent
        return self.index(total.xreplace(self.c_dims))

    def describe(self, node: ir.Map, loop_vars, var_syms) -> str:
        out = self.buffers[node.id]
        idx = ", ".join(repr_affine(a, loop_vars) for a in node.out_index)
        lhs = f"{out}[{idx}]" if node.rank else out
        red = node.reduced_vars()
        op = {None: "=", "sum": "+=", "max": "max=", "min": "min="}[node.reduce]
        over = f"   (over {', '.join(loop_vars[v] for v in red)})" if red and node.reduce else ""
        operands = {o.symbol: self.indexed(self.buffers[o.node.id], o.index, var_syms) for o in node.operands}
        body = str(node.expr.xreplace(operands))
        if len(body) > 100:
            body = body[:97] + "..."
        where = ""
        locs = sorted(node.sources)
        if locs:
            files = {os.path.basename(f) for f, _ in locs}
            lines = ", ".join(str(l) for l in sorted({l for _, l in locs}))
            where = f"   [{'/'.join(sorted(files))}: line{'s' if ',' in lines else ''} {lines}]"
        return f"{lhs} {op} {body}{over}{where}"

    def gemm_call(self, node: ir.Map) -> GemmCall | None:
        g = blas.as_gemm(node)
        if g is None:
            return None
        a, b, out = self.buffers[g.a.node.id], self.buffers[g.b.node.id], self.buffers[node.id]
        m, n, k = (self.index(e) for e in (g.m, g.n, g.k))
        # Row-major: the leading dimension is the row length of the array as stored, so an
        # operand may be a block of a wider array.
        lda, ldb = (self.index(op.node.shape[1]) for op in (g.a, g.b))
        fn = "GRADC_CBLAS_SGEMM" if self.ctype == "float" else "GRADC_CBLAS_DGEMM"
        alpha = self.fp.doprint(sp.Float(g.alpha) if self.ctype == "float" else g.alpha)
        trans = lambda t: "GRADC_TRANS" if t else "GRADC_NO_TRANS"
        call = (
            f"{fn}(GRADC_ROW_MAJOR, {trans(g.trans_a)}, {trans(g.trans_b)}, (int){grouped(m)}, (int){grouped(n)}, (int){grouped(k)}, "
            f"{alpha}, {a}, (int){grouped(lda)}, {b}, (int){grouped(ldb)}, 0, {out}, (int){grouped(n)})"
        )
        # The C stays ASCII: ^T for a transpose.
        ta, tb = ("^T" if g.trans_a else ""), ("^T" if g.trans_b else "")
        scale = "" if g.alpha == 1 else f"{g.alpha} * "
        return GemmCall(f"{out} = {scale}{a}{ta} * {b}{tb}: by the BLAS when it pays", m, n, k, lda, ldb, call)

    def copy(self, name: str, node: ir.Node) -> Nest:
        src = self.buffers[node.id]
        self.read.add(src)
        e = self.names.child().take("e")
        size = self.index(ir.num_elements(node.shape))
        var = sp.Symbol(e, integer=True)
        math = NestMath(sp.IndexedBase(name)[var], None, [], sp.IndexedBase(src)[var], [], sp.IndexedBase(src)[var], sorted(node.sources))
        return Nest([f"{name} = {src} (output copy)"], [], [(e, size)], 0, [], [f"{name}[{e}] = {src}[{e}];"], [], [], 0, None, [math])


def _may_end_short(extent, lanes: int) -> bool:
    """A loop over ``extent`` in blocks of whole lanes (blocks start at multiples of
    ``schedule.BLOCK``) can end with a tail shorter than ``lanes``: unless the extent is a
    fixed multiple of them.  See ``Lane.tail``."""
    return not (extent.is_Integer and int(extent) % lanes == 0)


def _unread(names, lines: Sequence[str]) -> tuple[str, ...]:
    """Those of ``names`` (loop variables) that ``lines`` never mention: the C needs (void) for them."""
    text = "\n".join(lines)
    return tuple(v for v in names if v and not re.search(rf"\b{v}\b", text))


def _fit(size: int, extent) -> int:
    """A tile side no longer than a fixed extent (ten classes: a tile of 10, not 32 with no full tile)."""
    return int(extent) if extent is not None and extent.is_Integer and 0 < int(extent) < size else size


def repr_affine(a: ir.Affine, loop_vars) -> str:
    if a.var is None:
        return str(a.offset)
    s = loop_vars[a.var] if a.stride == 1 else f"{a.stride}*{loop_vars[a.var]}"
    return s if a.offset == 0 else f"{s} + {a.offset}"


def render(specs: Sequence[KernelSpec], module: str, *, prefix: str = "", units: bool = False) -> Rendered:
    """The ``.c``, the ``.h`` and cffi's declarations for the kernels of one module, and with
    ``units`` the translation units a build compiles (see :attr:`Rendered.units`).

    ``prefix`` is the one the specs' names were given (see :func:`gradc.compiler.lower`);
    the header guard takes it too, so one module compiled with two prefixes links together.
    """
    kernels = []
    functions = {}
    for spec in specs:
        fns = [FunctionLowering(spec, e).lower() for e in spec.entries]
        functions[spec.name] = fns
        ctype = "float" if spec.dtype == "f32" else "double"
        requires = list(dict.fromkeys(IndexPrinter().doprint(cond) for cond, _msg in spec.constraints))
        kernels.append(
            {
                "spec": spec,
                "functions": fns,
                "ctype": ctype,
                "dims_params": ", ".join(f"ptrdiff_t {d}" for d in spec.dims) or "void",
                "invalid": [f"{d} < 0" for d in spec.dims] + [f"!({c})" for c in requires],
                "requires": requires,
                "source": [l.replace("*/", "* /") for l in spec.source.rstrip().splitlines()],
            }
        )
    guard = re.sub(r"\W", "_", prefix + module).upper() + "_H"
    every = [f for fns in functions.values() for f in fns]
    bodies = {f.name: template("function.c.j2").render(f=f) for f in every}
    threads = max((spec.threads for spec in specs), default=1)

    def c_file(selected: Sequence[Function], sizes: bool) -> str:
        """A .c file of the ``selected`` functions (and, with ``sizes``, every *_workspace_size),
        with only the helpers, declarations and BLAS glue those need."""
        names = {f.name for f in selected}
        used = set().union(*(f.helpers for f in selected))
        return template("kernel.c.j2").render(
            module=module,
            version=__version__,
            kernels=[{**k, "bodies": [bodies[f.name] for f in k["functions"] if f.name in names]} for k in kernels],
            sizes=sizes,
            uses_workspace=any(f.workspace_terms for f in (every if sizes else selected)),
            helpers=[h.removeprefix("gradc_") for h in VECTOR_MATH_ORDER if h in used],
            threads=threads,
            blas_ctypes=sorted({k["ctype"] for k in kernels for f in k["functions"] if f.name in names and any(n.gemm for n in f.nests)}),
            min_work=blas.MIN_WORK,
        )

    def pasted(c: str) -> str:
        return c.replace(f'#include "{module}.h"', header, 1)

    ctx = {"module": module, "version": __version__, "kernels": kernels, "guard": guard, "threads": threads}
    c_source = c_file(every, sizes=True)
    header = template("kernel.h.j2").render(**ctx)
    cdef = "\n".join(
        line for line in template("cdef.h.j2").render(**ctx).splitlines() if line.strip()
    )
    built = tuple(pasted(c_file([f], sizes=i == 0)) for i, f in enumerate(every)) if units else ()
    return Rendered(module, c_source, header, cdef, functions, built)
