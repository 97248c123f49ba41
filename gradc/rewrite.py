"""Graph rewrites between differentiation and code generation.

* :func:`fuse` inlines elementwise producers into their consumers, so that a chain of
  elementwise ops becomes one loop body (one pass over memory) and the derivative of the
  whole body is taken symbolically at once.  Running it *before* differentiation matters
  for stability too: ``where(x > 0, log(x), 0)`` differentiates to a selection of
  ``1/x`` and ``0`` rather than to ``0 · (1/x)``, which is NaN at 0.
* :func:`prune` keeps only what the outputs need (dead code elimination) and removes the
  stop-gradient markers that differentiation no longer needs.
"""

from __future__ import annotations

from typing import Sequence

import sympy as sp

from . import ir
from .scalar import strip_stop_gradient

#: An elementwise body at most this costly is recomputed by every consumer instead of stored.
CHEAP_OPS = 1
#: An elementwise body at most this costly is recomputed inside a select (``where``), so that
#: the select's derivative sees it and chooses between derivatives instead of multiplying
#: a NaN from the branch not taken by zero.
SELECT_INLINE_OPS = 64


def _cheap(node: ir.Map) -> bool:
    return sp.count_ops(node.expr) <= CHEAP_OPS and not node.expr.has(sp.Function)


def _reads_each_once(index: ir.IndexMap, consumer: ir.Map) -> bool:
    used = {a.var for a in index if a.var is not None}
    return all(v in used or consumer.loop[v] == 1 for v in range(len(consumer.loop)))


def _through(inner: ir.IndexMap, outer: ir.IndexMap) -> ir.IndexMap:
    """An operand index of an inlined elementwise producer, seen from its consumer's loop."""
    return tuple(a.compose(outer[a.var]) if a.var is not None else a for a in inner)


def fuse(outputs: Sequence[ir.Node], fixed: Sequence[ir.Node] = ()) -> list[ir.Node]:
    """Return new output nodes with elementwise producers inlined into their consumers.

    Nodes in ``fixed`` stay as they are, neither rebuilt nor inlined: the boundary of a
    region fused on its own (the function inside ``gradc.grad`` and its arguments).
    """
    order = ir.topo_order(outputs)
    users = ir.consumers(order)
    fixed_ids = {f.id for f in fixed}
    keep = {o.id for o in outputs} | fixed_ids
    new: dict[int, ir.Node] = {}
    origin: dict[int, ir.Node] = {}  # a rebuilt node's id -> the node of ``outputs``' graph it stands for

    def inlinable(producer: ir.Node, index: ir.IndexMap, consumer: ir.Map) -> bool:
        original = origin[producer.id]
        if not isinstance(producer, ir.Map) or not producer.is_elementwise or original.id in keep:
            return False
        if _cheap(producer):
            return True
        once = _reads_each_once(index, consumer)
        if once and consumer.expr.has(sp.Piecewise) and sp.count_ops(producer.expr) <= SELECT_INLINE_OPS:
            return True
        return once and len(users[original.id]) == 1

    for node in order:
        if node.id in fixed_ids:
            new[node.id] = node
        elif isinstance(node, ir.Map):
            new[node.id] = _fuse_node(node, new, inlinable)
        else:
            new[node.id] = node.with_args([new[a.id] for a in node.args])
        origin[new[node.id].id] = node
    return [new[o.id] for o in outputs]


def _fuse_node(node: ir.Map, new: dict[int, ir.Node], inlinable) -> ir.Map:
    operands: list[tuple[ir.Node, ir.IndexMap]] = []
    dummies: list[sp.Symbol] = []
    inlined: list[ir.Node] = []

    def add(n: ir.Node, index: ir.IndexMap) -> sp.Symbol:
        d = sp.Symbol(f"_f{len(dummies)}") if n.dtype == "bool" else sp.Symbol(f"_f{len(dummies)}", real=True)
        operands.append((n, index))
        dummies.append(d)
        return d

    def bind(producer: ir.Node, index: ir.IndexMap) -> sp.Expr:
        # Recursive: a producer inlined into a select may itself read one that should be.
        if inlinable(producer, index, node):
            inlined.append(producer)
            inner = {p.symbol: bind(p.node, _through(p.index, index)) for p in producer.operands}
            return producer.expr.xreplace(inner)
        return add(producer, index)

    subs = {op.symbol: bind(new[op.node.id], op.index) for op in node.operands}
    if not inlined and all(new[op.node.id] is op.node for op in node.operands):
        return node
    return node.rebuilt(operands, dummies, node.expr.xreplace(subs)).inherit(*inlined)


def prune(outputs: Sequence[ir.Node]) -> list[ir.Node]:
    """Rebuild the graph the outputs need, without the markers only differentiation needed.

    Run after differentiation: stop-gradient markers are dropped from bodies and each
    :class:`~gradc.ir.CustomGradient` becomes the value it stands for.
    """
    order = ir.topo_order(outputs)
    new: dict[int, ir.Node] = {}
    for node in order:
        if isinstance(node, ir.CustomGradient):
            new[node.id] = new[node.value.id]
        elif not isinstance(node, ir.Map):
            new[node.id] = node.with_args([new[a.id] for a in node.args])
        else:
            operands = [(new[o.node.id], o.index) for o in node.operands]
            new[node.id] = node.rebuilt(operands, [o.symbol for o in node.operands], strip_stop_gradient(node.expr))
    return [new[o.id] for o in outputs]


def hoist(outputs: Sequence[ir.Node]) -> list[ir.Node]:
    """Compute once what does not vary along an axis, instead of once per index of that axis.

    A Map none of whose operands reads output loop variable ``v`` has the same value at
    every index of ``v``: it is rebuilt with that axis of extent 1, and its readers read
    index 0 of it.  This cascades: the gradient penalty's inner gradient (the same row for
    every input row) and the norms computed from it shrink from B rows to one.  Outputs
    and reshapes see the full shape again through a broadcast.
    """
    new: dict[int, ir.Node] = {}
    for node in ir.topo_order(outputs):
        if isinstance(node, ir.Map):
            new[node.id] = _hoist_node(node, new)
        else:
            new[node.id] = node.with_args([_expanded(new[a.id], a) for a in node.args])
    return [_expanded(new[o.id], o) for o in outputs]


def _collapsed(rebuilt: ir.Node, original: ir.Node) -> list[int]:
    return [a for a, (r, o) in enumerate(zip(rebuilt.shape, original.shape)) if r == 1 and o != 1]


def _expanded(rebuilt: ir.Node, original: ir.Node) -> ir.Node:
    """``rebuilt`` broadcast back to ``original``'s shape where hoisting collapsed an axis."""
    axes = _collapsed(rebuilt, original)
    if not axes:
        return rebuilt
    index = tuple(ir.Affine(None) if a in axes else ir.Affine(a) for a in range(original.rank))
    return ir.elementwise(original.shape, [(rebuilt, index)], lambda v: v, dtype=original.dtype, loc=original.loc).inherit(original)


def _hoist_node(node: ir.Map, new: dict[int, ir.Node]) -> ir.Map:
    operands = []
    for op in node.operands:
        producer = new[op.node.id]
        axes = _collapsed(producer, op.node)
        operands.append((producer, tuple(ir.Affine(None) if a in axes else i for a, i in enumerate(op.index))))
    used = {i.var for _, index in operands for i in index if i.var is not None}
    hoistable = node.reduce is None and node.is_elementwise or node.reduce is not None and node.is_gather_form()
    free = [v for v in node.out_vars() if v not in used and not node.loop[v] == 1] if hoistable else []
    # A reduction over an axis nothing reads is its identity for max/min, and extent × term for sum.
    idle = [v for v in node.reduced_vars() if v not in used and not node.loop[v] == 1] if hoistable else []
    if not free and not idle and all(p is o.node and idx == o.index for (p, idx), o in zip(operands, node.operands)):
        return node
    loop = [sp.Integer(1) if v in free or v in idle else e for v, e in enumerate(node.loop)]
    shape = [sp.Integer(1) if a.var in free else e for a, e in zip(node.out_index, node.shape)]
    scale = sp.Mul(*(node.loop[v] for v in idle)) if node.reduce == "sum" else sp.Integer(1)
    # extent 0 must give the empty sum 0, even of an Inf or NaN term (0 * inf is NaN)
    expr = node.expr if scale == 1 else sp.Piecewise((0, sp.Eq(scale, 0)), (scale * node.expr, True))
    return node.rebuilt(operands, [o.symbol for o in node.operands], expr, shape=shape, loop=loop)
