"""Loop schedules: the order of each loop nest, which loop is vectorised, which nests share a pass.

A :class:`~gradc.ir.Map` fixes *what* is computed over its loop box; this module decides
*how* the C runs it, so that ``-O3 -march=native`` can vectorise the innermost loop while
the results stay IEEE and reproducible (no ``-ffast-math``):

* ``map``: no reduction; loops in output order, the last (unit-stride) innermost.
* ``reduce``: each output element owns an accumulator; its reduction loops run inside
  its output loops.  When every operand is unit-stride (or invariant) in the innermost
  reduction loop, that loop runs in fixed *lanes*: ``LANES`` independent partial sums
  over blocks of ``BLOCK`` elements, added to a double (or the kernel's precision for
  max/min) accumulator after each block.  Lanes vectorise without reassociating anything
  at run time, and the blocked float32 sums stay accurate to about 1e-7 at any size.
* ``tile``: a contraction whose innermost output axis is unit-stride (a matrix product,
  and both gradients of one): the output is computed in register tiles of
  ``TILE_ROWS`` × ``TILE_COLS`` accumulators, the reduction loop inside, so each loaded
  operand feeds several multiply-adds.  Operands read along the columns and the reduction
  but not the rows (B of A·B, Bᵀ of A·Bᵀ, G of Xᵀ·G) are first *packed*: for each column
  tile, copied into a contiguous panel of the workspace that every row tile then streams
  through (strided or transposed reads happen once, not once per row tile).  An operand
  read along the rows but strided along the reduction (X of Xᵀ·G), when it is too large
  to stay in cache, is packed once into panels of row tiles, which every column tile then
  streams.  Sums are blocked like lanes: each block of ``BLOCK`` reduction steps is added
  into a double tile (a sum over one fixed extent of at most ``BLOCK`` is a single block
  and needs none).
  Rows left over at the bottom edge run as tiles of one row; columns left over at the
  right edge fall back to one accumulator per element.
* ``dots``: a contraction whose operands are contiguous along the reduction but that no
  tile fits: ``TILE_DOTS`` × ``TILE_DOTS`` dot products at once, each in lanes, so every
  loaded vector feeds several of them.
* ``accumulate``: the output is filled with the reduction's identity, then updated in
  place with a unit-stride *output* loop innermost (scatters such as the adjoint of a
  broadcast or a slice).

Nests of the same loop box — elementwise nodes and reductions over the whole box —
run as one pass (a *group*): the value of a loss and its elementwise gradient are
computed from one read of their inputs, with one CSE over all their bodies.

With ``threads=N`` (OpenMP) a nest's outermost loop is shared between threads in static
blocks, when its loop box is big enough to pay for waking them (:data:`PARALLEL_MIN_WORK`)
and its iterations write distinct outputs: each output element is then computed by the
same code in the same order whichever thread runs it.  A reduction over the whole loop
box (a loss) instead splits its outermost loop into :data:`CHUNKS` fixed chunks whose
partial results are combined in chunk order, so it too gives the same bits on every call
and for every thread count.  So does a nest of one loop, the vectorised one: its chunks
are whole blocks of :data:`BLOCK` elements, so that each element takes the same (vector or
scalar) path as on one thread.  A scatter whose outermost loop is not an output axis stays serial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import sympy as sp

from . import ir

#: Independent partial results in a vectorised reduction (one 512-bit vector of float).
LANES = 16
#: Elements per lane block; each block's float32 partial sum goes into a double.
BLOCK = 256
#: Register tile of a contraction: rows of the second-innermost output axis × columns of the
#: innermost.  8 × 32 floats is 16 512-bit accumulators, enough independent multiply-adds
#: to cover the FMA latency with one vector load of the packed panel and one broadcast per
#: 16 FMAs; 4 × 32 was load-bound (8 FMAs per 6 loads).  With 256-bit vectors (AVX2) the
#: tile spills a few registers and still beats 4 × 32, 6 × 32 and 6 × 16.
TILE_ROWS = 8
TILE_COLS = 32
TILE_DOTS = 4
#: An innermost output axis of fewer elements than this (a vector of floats) makes a poor
#: tile row: the tile is turned (see _turned_tile).
NARROW = 16
#: A row-tile panel (see _packed_tile) is filled only for an operand at least this large: a
#: smaller one stays in the L2 cache of one core between column tiles, and its copy would
#: cost more than the strided reads it saves (2 % of the MLP's value_and_grad).
ROW_PANEL_MIN_BYTES = 1 << 20
#: Extents assumed for named dimensions when comparing loop orders (only the ratios matter).
TYPICAL_EXTENT = 1000
#: Loop-box points below which a nest stays on one thread: waking a team of threads costs
#: microseconds, as much as tens of thousands of points of a simple loop.
PARALLEL_MIN_WORK = 1 << 15
#: Fixed chunks of a whole-box reduction's outermost loop, whatever the thread count (enough
#: to balance a few threads; each holds one partial result).
CHUNKS = 64


@dataclass(frozen=True)
class Schedule:
    kind: str  # "map" | "reduce" | "tile" | "dots" | "accumulate"
    order: tuple[int, ...]  # loop variables, outermost first; the last is innermost
    acc_depth: int  # "reduce": accumulators live inside this many (output) loops
    lanes: bool  # the innermost loop runs in lanes (it is a reduction loop)
    tile: tuple[int | None, int] | None = None  # "tile", "dots": (row variable or None, column variable)
    pack: tuple[int, ...] = ()  # "tile": operands (by position) copied into a panel per column tile
    pack_rows: tuple[int, ...] = ()  # "tile": operands (by position) copied once into panels of row tiles


def coefficient(shape: Sequence[ir.Extent], index: ir.IndexMap, var: int) -> sp.Expr:
    """How far the linear offset of ``index`` moves when loop variable ``var`` grows by one."""
    stride, total = sp.Integer(1), sp.Integer(0)
    for extent, a in reversed(list(zip(shape, index))):
        if a.var == var:
            total += a.stride * stride
        stride = stride * extent
    return sp.expand(total)


def _contiguous(node: ir.Map, var: int, with_output: bool) -> bool:
    """Every operand (and the output) is unit-stride or invariant along ``var``."""
    accesses = [(op.node.shape, op.index) for op in node.operands]
    if with_output:
        accesses.append((node.shape, node.out_index))
    return all(coefficient(shape, index, var) in (0, 1) for shape, index in accesses)


def _footprint(node: ir.Map, loops: Sequence[int]) -> sp.Expr:
    """Elements the loops ``loops`` touch: what must stay in cache while they run."""
    total = sp.Integer(0)
    for shape, index in [(op.node.shape, op.index) for op in node.operands] + [(node.shape, node.out_index)]:
        size = sp.Integer(1)
        for v in {a.var for a in index if a.var is not None} & set(loops):
            size *= node.loop[v]
        total += size
    return total


def _order_outer(node: ir.Map, outer: list[int], inner: Sequence[int]) -> list[int]:
    """Outer loops ordered so that what the inner loops touch stays smallest (then output order)."""
    dims = {s: TYPICAL_EXTENT for e in node.loop for s in sp.sympify(e).free_symbols}
    out_vars = node.out_vars()
    order: list[int] = []
    left = list(outer)
    while left:
        def cost(v):
            rest = [u for u in left if u != v] + list(inner)
            return (float(_footprint(node, rest).xreplace(dims)), v not in out_vars, left.index(v))

        best = min(left, key=cost)
        order.append(best)
        left.remove(best)
    return order


def _uses(index: ir.IndexMap, var: int) -> bool:
    return any(a.var == var for a in index)


def _packed_tile(node: ir.Map) -> Schedule | None:
    """Register tiles over two output axes and one reduction, with the column operands packed.

    The columns are the innermost output axis, which must be unit-stride in the output.  An
    operand that the columns and the reduction index but the rows do not is packed, whatever
    its strides; any other operand must be unit-stride or invariant along the columns, so
    that a tile row is one vector of it.  An operand of the rows and the reduction that is
    contiguous along the rows but strided along the reduction (X of Xᵀ·G) may be packed too,
    once for all column tiles, when there are several: each row tile then streams a
    contiguous panel, where it would read a cache line per reduction step and the whole
    operand again for every column tile.  Whether it is depends on its size at run time
    (``ROW_PANEL_MIN_BYTES``).
    """
    out_vars, red_vars = node.out_vars(), node.reduced_vars()
    if len(out_vars) < 2 or len(red_vars) != 1:
        return None
    *outer, row, col = out_vars
    red = red_vars[0]
    rows = sp.sympify(node.loop[row])
    # A panel pays for its copy only when several row tiles read it.
    if coefficient(node.shape, node.out_index, col) != 1 or (rows.is_Integer and rows <= TILE_ROWS):
        return None
    cols = sp.sympify(node.loop[col])
    pack, pack_rows = [], []
    for i, op in enumerate(node.operands):
        if _uses(op.index, col) and _uses(op.index, red) and not _uses(op.index, row) and op.node.dtype != "bool":
            pack.append(i)
        elif coefficient(op.node.shape, op.index, col) not in (0, 1):
            return None
        elif (
            coefficient(op.node.shape, op.index, row) == 1
            and not _uses(op.index, col)
            and coefficient(op.node.shape, op.index, red) not in (0, 1)
            and op.node.dtype != "bool"
            and not (cols.is_Integer and cols <= TILE_COLS)
        ):
            pack_rows.append(i)
    if not pack:
        return None
    return Schedule("tile", tuple(outer + [col, row, red]), len(outer), False, (row, col), tuple(pack), tuple(pack_rows))


def _turned_tile(node: ir.Map) -> Schedule | None:
    """Register tiles turned on their side: columns along the second-innermost output axis, when
    the innermost is a fixed extent narrower than a vector (``NARROW``) and every operand is
    unit-stride or invariant along the second.  The weight gradient Hᵀ·G of a layer with ten
    outputs then multiply-adds whole vectors of H's rows, not ten-wide rows of G; its output
    is stored with a stride, once per tile."""
    out_vars, red_vars = node.out_vars(), node.reduced_vars()
    if len(out_vars) < 2 or len(red_vars) != 1:
        return None
    *outer, col, row = out_vars
    narrow, wide = sp.sympify(node.loop[row]), sp.sympify(node.loop[col])
    if not (narrow.is_Integer and narrow < NARROW) or (wide.is_Integer and wide < TILE_COLS):
        return None
    if not _contiguous(node, col, with_output=False):
        return None
    return Schedule("tile", tuple(outer + [col, row] + red_vars), len(outer), False, (row, col))


def schedule(node: ir.Map) -> Schedule:
    n = len(node.loop)
    if n == 0:
        if node.reduce is None:
            return Schedule("map", (), 0, False)
        return Schedule("reduce" if node.is_gather_form() else "accumulate", (), 0, False)
    out_vars, red_vars = node.out_vars(), node.reduced_vars()
    if node.reduce is None:
        return Schedule("map", tuple(range(n)), 0, False)
    if node.is_gather_form():
        turned = _turned_tile(node)
        if turned is not None:
            return turned
        packed = _packed_tile(node)
        if packed is not None:
            return packed
        if red_vars and _contiguous(node, red_vars[-1], with_output=False):
            if node.reduce == "sum" and len(out_vars) >= 2 and len(red_vars) == 1:
                *outer, row, col = out_vars
                return Schedule("dots", tuple(outer + [row, col] + red_vars), len(outer), True, (row, col))
            return Schedule("reduce", tuple(out_vars + red_vars), len(out_vars), True)
        for o in reversed(out_vars):
            if _contiguous(node, o, with_output=True) and coefficient(node.shape, node.out_index, o) == 1:
                others = [v for v in out_vars if v != o]
                row = others[-1] if others else None
                outer = [v for v in others if v != row]
                order = outer + ([row] if row is not None else []) + [o] + red_vars
                return Schedule("tile", tuple(order), len(outer), False, (row, o))
        return Schedule("reduce", tuple(out_vars + red_vars), len(out_vars), False)
    for o in reversed(out_vars):
        if _contiguous(node, o, with_output=True):
            rest = [v for v in range(n) if v != o]
            return Schedule("accumulate", tuple(_order_outer(node, rest, [o]) + [o]), 0, False)
    return Schedule("accumulate", tuple(range(n)), 0, False)


def _whole_box_reduction(node: ir.Map, s: Schedule) -> bool:
    return s.kind == "reduce" and s.acc_depth == 0 and node.rank == 0


def _joinable(node: ir.Map, s: Schedule) -> bool:
    return s.kind == "map" or _whole_box_reduction(node, s)


def _root(node: ir.Node) -> ir.Node:
    while isinstance(node, ir.Reshape):
        node = node.arg
    return node


def groups(nodes: Sequence[ir.Node]) -> list[list[ir.Node]]:
    """Maps that run as one pass, in order, with each Reshape as an item of its own.

    A group's members share the loop box and read nothing another member writes (not
    even through a Reshape).  Inputs need no code and are left out; a Reshape of a value
    computed before the open group is placed before it, so it does not end the group.
    """
    out: list[list[ir.Node]] = []
    open_at = None  # index in ``out`` of the group new Maps may join
    for node in nodes:
        if isinstance(node, ir.Input):
            continue
        if isinstance(node, ir.Reshape):
            if open_at is not None and _root(node) not in out[open_at]:
                out.insert(open_at, [node])
                open_at += 1
            else:
                out.append([node])
                open_at = None
            continue
        if isinstance(node, ir.Map) and open_at is not None:
            group = out[open_at]
            head = group[0]
            if (
                _joinable(head, schedule(head))
                and _joinable(node, schedule(node))
                and len(head.loop) == len(node.loop) > 0
                and all(ir.same_extent(a, b) for a, b in zip(head.loop, node.loop))
                and not any(_root(op.node) in group for op in node.operands)
            ):
                group.append(node)
                continue
        out.append([node])
        open_at = len(out) - 1 if isinstance(node, ir.Map) else None
    return out


def group_lanes(group: Sequence[ir.Map]) -> bool:
    """The group's innermost loop can run in lanes: it reduces, and nothing strides along it."""
    inner = len(group[0].loop) - 1
    reduces = any(m.reduce is not None for m in group)
    return reduces and all(_contiguous(m, inner, with_output=m.reduce is None) for m in group)


def parallel_form(group: Sequence[ir.Map], plan: Schedule) -> str | None:
    """How a nest runs on several threads: ``"loop"`` (its outermost loop is split between
    them), ``"chunks"`` (in fixed chunks: a whole-box reduction, or a nest of one loop) or
    None (serially)."""
    if not plan.order:
        return None
    if plan.kind == "accumulate":
        # Iterations of the outer loop may share an output element unless it indexes an output axis.
        outer = plan.order[0]
        if not all(any(a.var == outer and a.stride != 0 for a in m.out_index) for m in group):
            return None
    whole_box = plan.kind in ("map", "reduce") and plan.acc_depth == 0 and any(m.reduce is not None for m in group)
    return "chunks" if whole_box or len(plan.order) == 1 else "loop"
