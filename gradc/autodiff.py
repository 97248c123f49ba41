"""Reverse-mode differentiation of the tensor graph, producing a graph of the same kind.

There is one rule, for :class:`~gradc.ir.Map` ``out[π_out(L)] ⊕= f(x_j[π_j(L)])``::

    x̄_j[π_j(L)] += ōut[π_out(L)] · ∂f/∂x_j           (summed over the same loop box L)

with ``∂f/∂x_j`` from :func:`sympy.diff`.  For ``max``/``min`` reductions the factor
``[f == out] / count`` sends the gradient to the extremal elements, split evenly at ties.
A :class:`~gradc.ir.Reshape`'s adjoint is the reshaped cotangent.  Because every adjoint
is again a Map, the result can be differentiated again.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import sympy as sp

from . import ir
from .scalar import clean_derivative


def vjp(outputs: Sequence[ir.Node], cotangents: Sequence[ir.Node], wrt: Sequence[ir.Node]) -> list[ir.Node]:
    """Nodes holding ``Σ_k cotangent_k · ∂output_k/∂w`` for each ``w`` in ``wrt``."""
    order = ir.topo_order(outputs)
    wrt_ids = {w.id for w in wrt}
    depends: set[int] = set()
    for node in order:
        if node.id in wrt_ids or any(a.id in depends for a in node.args):
            depends.add(node.id)
    pending: dict[int, list[ir.Node]] = defaultdict(list)
    for out, cot in zip(outputs, cotangents):
        if out.id in depends:
            pending[out.id].append(cot)
    adjoints: dict[int, ir.Node] = {}
    for node in reversed(order):
        parts = pending.pop(node.id, None)
        if not parts:
            continue
        adj = _accumulate(parts, node)
        adjoints[node.id] = adj
        for arg, contribution in _rules(node, adj):
            if arg.id in depends:
                pending[arg.id].append(contribution)
    return [adjoints.get(w.id) or _zeros(w) for w in wrt]


def _adjoint_name(node: ir.Node) -> str:
    return f"d_{node.label()}"


def _accumulate(parts: list[ir.Node], node: ir.Node) -> ir.Node:
    if len(parts) == 1:
        adj = parts[0]
        if adj.name is None and isinstance(adj, ir.Map):
            adj.name = _adjoint_name(node)
        return adj
    index = ir.identity_map(node.rank)
    return ir.elementwise(node.shape, [(p, index) for p in parts], lambda *s: sp.Add(*s), name=_adjoint_name(node), loc=node.loc)


def _zeros(node: ir.Node) -> ir.Node:
    return ir.constant(0, node.shape, loc=node.loc)


def _rules(node: ir.Node, adj: ir.Node) -> Iterator[tuple[ir.Node, ir.Node]]:
    if isinstance(node, ir.Reshape):
        yield node.arg, ir.Reshape(adj, node.arg.shape, name=_adjoint_name(node.arg), loc=node.loc)
    elif isinstance(node, ir.Map):
        yield from map_adjoints(node, adj)
    elif isinstance(node, ir.CustomGradient):
        for arg, g in zip(node.inputs, node.rule(adj)):
            if g is not None:
                yield arg, g


def _covers_box(op: ir.Operand, node: ir.Map) -> bool:
    """``op`` is read at every point of ``node``'s loop box exactly once, in loop order."""
    return op.index == ir.identity_map(len(node.loop)) and all(ir.same_extent(a, b) for a, b in zip(op.node.shape, node.loop))


def map_adjoints(node: ir.Map, adj: ir.Node) -> Iterator[tuple[ir.Node, ir.Node]]:
    """The contribution of ``node`` to the adjoint of each of its operands.

    Operands with the same partial derivative share it: when one of them is read once at
    every point of the loop box (``Z`` in ``tanh(Z + b)``), its contribution holds
    ``adj · ∂f/∂x`` at every point, and the others (the broadcast ``b``) sum that array
    instead of evaluating the derivative again.
    """
    extremum = node.reduce in ("max", "min")
    count = tie_count(node) if extremum else None
    shared: dict[sp.Expr, ir.Map] = {}  # derivative -> the contribution of an operand covering the box
    partials = [(op, clean_derivative(sp.diff(node.expr, op.symbol))) for op in node.operands if op.node.dtype != "bool"]
    # Box-covering operands first, so the others can read their contributions.
    partials.sort(key=lambda item: not _covers_box(item[0], node))
    for op, d in partials:
        if d == 0:
            continue
        if not extremum and d in shared:
            full = shared[d]
            summed = ir.Map(op.node.shape, node.loop, op.index, [(full, ir.identity_map(len(node.loop)))], lambda g: g,
                            reduce="sum", name=_adjoint_name(op.node), loc=node.loc)
            yield op.node, ir.canonical(summed)
            continue
        operands = [(adj, node.out_index)] + [(o.node, o.index) for o in node.operands]
        olds = [o.symbol for o in node.operands]
        if extremum:
            operands += [(node, node.out_index), (count, node.out_index)]

        def body(g, *syms, d=d, olds=olds):
            local = d.xreplace(dict(zip(olds, syms)))
            if extremum:
                value, n = syms[len(olds)], syms[len(olds) + 1]
                hit = sp.Piecewise((1, sp.Eq(node.expr.xreplace(dict(zip(olds, syms))), value)), (0, True))
                local = local * hit / n
            return g * local

        contribution = ir.canonical(ir.Map(
            op.node.shape, node.loop, op.index, operands, body, reduce="sum", name=_adjoint_name(op.node), loc=node.loc
        ))
        if _covers_box(op, node):
            shared.setdefault(d, contribution)
        yield op.node, contribution


def tie_count(node: ir.Map) -> ir.Map:
    """How many elements of a max/min reduction attain the extremum (for splitting ties)."""
    olds = [o.symbol for o in node.operands]
    operands = [(o.node, o.index) for o in node.operands] + [(node, node.out_index)]

    def body(*syms):
        f = node.expr.xreplace(dict(zip(olds, syms[:-1])))
        return sp.Piecewise((1, sp.Eq(f, syms[-1])), (0, True))

    return ir.Map(node.shape, node.loop, node.out_index, operands, body, reduce="sum", loc=node.loc)


def jvp(outputs: Sequence[ir.Node], wrt: Sequence[ir.Node], tangents: Sequence[ir.Node]) -> list[ir.Node]:
    """Nodes holding ``Σ_w ∂output/∂w · tangent_w`` for each output (forward mode).

    The same one rule as reverse mode, read forwards: a Map's tangent is a Map over the
    same loop box whose body is ``Σ_j ∂f/∂x_j · ẋ_j`` — one fused loop per node, not dual
    numbers.  A custom gradient's value is differentiated directly.
    """
    tangent: dict[int, ir.Node] = {w.id: t for w, t in zip(wrt, tangents)}
    for node in ir.topo_order(outputs):
        if node.id in tangent or node.dtype == "bool":
            continue
        if isinstance(node, ir.Reshape):
            if node.arg.id in tangent:
                tangent[node.id] = ir.Reshape(tangent[node.arg.id], node.shape, name=f"t_{node.label()}", loc=node.loc)
        elif isinstance(node, ir.CustomGradient):
            if node.value.id in tangent:
                tangent[node.id] = tangent[node.value.id]
        elif isinstance(node, ir.Map):
            t = map_tangent(node, tangent)
            if t is not None:
                tangent[node.id] = t
    return [tangent.get(o.id) or _zeros(o) for o in outputs]


def map_tangent(node: ir.Map, tangent: dict[int, ir.Node]) -> ir.Map | None:
    """The tangent of ``node`` given the tangents of (some of) its operands, or None if none has one."""
    dual = [op for op in node.operands if op.node.id in tangent and op.node.dtype != "bool"]
    partials = [clean_derivative(sp.diff(node.expr, op.symbol)) for op in dual]
    if not any(d != 0 for d in partials):
        return None
    extremum = node.reduce in ("max", "min")
    olds = [o.symbol for o in node.operands]
    operands = [(o.node, o.index) for o in node.operands] + [(tangent[op.node.id], op.index) for op in dual]
    if extremum:
        operands += [(node, node.out_index), (tie_count(node), node.out_index)]

    def body(*syms):
        values, tans = syms[: len(olds)], syms[len(olds) : len(olds) + len(dual)]
        sub = dict(zip(olds, values))
        total = sp.Add(*(d.xreplace(sub) * t for d, t in zip(partials, tans)))
        if extremum:
            value, count = syms[len(olds) + len(dual) :]
            hit = sp.Piecewise((1, sp.Eq(node.expr.xreplace(sub), value)), (0, True))
            total = total * hit / count
        return total

    return ir.Map(
        node.shape,
        node.loop,
        node.out_index,
        operands,
        body,
        reduce="sum" if extremum else node.reduce,
        name=f"t_{node.label()}",
        loc=node.loc,
    )
