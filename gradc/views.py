"""Views into a compiled kernel for people: its math, its statistics and its graph.

Every view is a string made from what the compiler already produced (the lowered
graphs and the loop nests of :mod:`gradc.codegen`); nothing here changes a kernel.
``gradc show --view ...`` prints them, and ``CompiledKernel.show(view)`` returns them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Sequence

import sympy as sp

from . import autodiff, codegen, ir, rewrite
from .errors import GradcError

VIEWS = ("c", "header", "math", "stats", "graph")


@dataclass
class Compiled:
    """What a view needs: the lowered kernel and its rendered C (from ``gradc.compile`` or the CLI)."""

    lowered: object  # compiler.Lowered
    functions: list[codegen.Function]
    c_source: str
    header: str


def _entry_for_people(functions: Sequence[codegen.Function]) -> codegen.Function:
    """The entry that holds the forward value and every gradient: value_and_grad, else vjp."""
    by_suffix = {f.suffix: f for f in functions}
    for suffix in ("value_and_grad", "vjp", "forward"):
        if suffix in by_suffix:
            return by_suffix[suffix]
    return functions[0]


def _where(sources) -> str:
    if not sources:
        return ""
    files = sorted({os.path.basename(f) for f, _ in sources})
    lines = ", ".join(str(n) for n in sorted({n for _, n in sources}))
    return f"{'/'.join(files)}: line{'s' if ',' in lines else ''} {lines}"


# ----------------------------------------------------------------------------- math
def _equation(m: codegen.NestMath, rhs: sp.Expr) -> sp.Expr:
    if m.reduce == "sum":
        for var, extent in reversed(m.reduced):
            rhs = sp.Sum(rhs, (var, 0, extent - 1))
    elif m.reduce in ("max", "min"):
        over = ",".join(str(v) for v, _ in m.reduced)
        rhs = sp.Function(f"{m.reduce}_{over}" if over else m.reduce)(rhs)
    return sp.Eq(m.target, rhs, evaluate=False)


def ops_before_cse(nest: codegen.Nest) -> int:
    return int(sum(sp.count_ops(m.expr) for m in nest.math))


def ops_after_cse(nest: codegen.Nest) -> int:
    temps = nest.math[0].temps if nest.math else []
    return int(sum(sp.count_ops(e) for _, e in temps) + sum(sp.count_ops(m.value) for m in nest.math))


def math(c: Compiled, *, latex: bool = False) -> str:
    """The forward expression and every gradient, one fused loop nest at a time, before and after CSE."""
    fn = _entry_for_people(c.functions)
    show = sp.latex if latex else lambda e: sp.pretty(e, use_unicode=True)
    parts = [f"{fn.name}: {len(fn.nests)} loop nest(s)"]
    for i, nest in enumerate(fn.nests, 1):
        targets = ", ".join(str(m.target) for m in nest.math)
        where = _where(sorted({s for m in nest.math for s in m.sources}))
        parts.append(f"\n── nest {i}: {targets}{'   [' + where + ']' if where else ''}")
        parts.extend(show(_equation(m, m.expr)) for m in nest.math)
        temps = nest.math[0].temps
        if temps:
            parts.append(f"after common-subexpression elimination ({ops_before_cse(nest)} -> {ops_after_cse(nest)} operations):")
            parts.extend(show(sp.Eq(sym, e, evaluate=False)) for sym, e in temps)
            parts.extend(show(_equation(m, m.value)) for m in nest.math)
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- stats
def naive_ops(lowered) -> int:
    """Operations in the derivative as a tape would record it: per op, unfused, unsimplified."""
    graph = lowered.traced.graph
    wrt = [i for i in graph.inputs if i.param in lowered.meta["wrt"]]
    seeds = [ir.constant(1, o.shape) for o in graph.outputs]
    nodes = list(graph.outputs) + (autodiff.vjp(graph.outputs, seeds, wrt) if wrt else [])
    return _ops(rewrite.prune(nodes))


def _ops(nodes: Sequence[ir.Node]) -> int:
    return int(sum(sp.count_ops(n.expr) for n in ir.topo_order(nodes) if isinstance(n, ir.Map)))


def workspace_formula(fn: codegen.Function, ctype_bytes: int) -> str:
    elements = sp.factor(fn.workspace_elements)
    if elements == 0:
        return "none"
    n = len(fn.workspace_terms)
    return f"{sp.factor(elements * ctype_bytes)} bytes (+ padding, {n} buffer{'' if n == 1 else 's'})"


def stats(c: Compiled) -> str:
    meta = c.lowered.meta
    size = 4 if meta["dtype"] == "f32" else 8
    lines = [f"kernel {meta['kernel']} ({meta['dtype']}), gradients with respect to {', '.join(meta['wrt']) or 'nothing'}"]
    fired = meta.get("rewrites") or {}
    lines.append(
        "stability rewrites fired: " + (", ".join(f"{name} ×{n}" for name, n in sorted(fired.items())) or "none")
        + ("" if meta.get("stable", True) else " (turned off: stable=False)")
    )
    if meta["wrt"]:
        lines.append(f"operations in the naive derivative (per op, unfused, as a tape records it): {naive_ops(c.lowered)}")
    rows = [("function", "loop nests", "ops before CSE", "ops emitted", "workspace")]
    for fn in c.functions:
        before = sum(ops_before_cse(n) for n in fn.nests)
        after = sum(ops_after_cse(n) for n in fn.nests)
        rows.append((fn.name, str(len(fn.nests)), str(before), str(after), workspace_formula(fn, size)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1])
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- graph
def _label(node: ir.Node) -> str:
    if isinstance(node, ir.Input):
        op = "input"
    elif isinstance(node, ir.Reshape):
        op = "reshape"
    elif isinstance(node, ir.CustomGradient):
        op = f"custom_gradient {node.hint or ''}".strip()
    else:
        op = node.hint or node.reduce or "elementwise"
    name = node.name or ""
    shape = "(" + ", ".join(str(d) for d in node.shape) + ("," if node.rank == 1 else "") + ")"
    line = f"line {node.loc[1]}" if node.loc else ""
    return "\\n".join(part for part in (name if name != op else "", op, shape, line) if part)


def _quote(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'


def graph(c: Compiled) -> str:
    """The traced graph and its gradient graph as Graphviz DOT.

    Forward nodes are boxes, backward (gradient) nodes are filled ellipses, and the nodes
    that fusion merges into one loop nest are drawn inside one cluster.  The forward graph
    is fused on its own, before differentiation, as the compiler fuses it.  Nodes are
    numbered by their place in the drawing, not by their ids, so that the DOT of a kernel
    does not depend on what was traced before it.
    """
    lowered = c.lowered
    g = lowered.traced.graph
    wrt = [i for i in g.inputs if i.param in lowered.meta["wrt"]]
    seeds = [ir.constant(1, o.shape) for o in g.outputs]
    grads = autodiff.vjp(g.outputs, seeds, wrt) if wrt else []
    forward_nodes = ir.topo_order(g.outputs)
    forward = {n.id for n in forward_nodes}
    nodes = ir.topo_order(list(g.outputs) + grads)
    number = {n.id: i for i, n in enumerate(nodes)}
    fused = ir.topo_order(rewrite.fuse(g.outputs)) + ir.topo_order(rewrite.fuse(grads, fixed=forward_nodes) if grads else [])
    clusters: list[list[int]] = []
    placed: set[int] = set()
    for f in fused:
        members = sorted((m for m in f.members if m in number and m not in placed), key=number.get)
        if len(members) >= 2 and isinstance(f, ir.Map):
            clusters.append(members)
            placed.update(members)
    out = [f"digraph {_quote(lowered.meta['kernel'])} {{", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];']
    by_id = {n.id: n for n in nodes}

    def node_line(n: ir.Node) -> str:
        if isinstance(n, ir.Input):
            style = 'shape=box, style="rounded,filled", fillcolor="#e8f0fe"'
        elif n.id in forward:
            style = "shape=box"
        else:
            style = 'shape=ellipse, style=filled, fillcolor="#fde8e8"'
        return f"n{number[n.id]} [label={_quote(_label(n))}, {style}];"

    for i, members in enumerate(clusters):
        out.append(f"  subgraph cluster_{i} {{")
        out.append('    label="one loop nest"; style=dashed; color="#888888"; fontsize=9;')
        out.extend(f"    {node_line(by_id[m])}" for m in members)
        out.append("  }")
    out.extend(f"  {node_line(n)}" for n in nodes if n.id not in placed)
    for n in nodes:
        for a in dict.fromkeys(n.args):
            out.append(f"  n{number[a.id]} -> n{number[n.id]};")
    for name, o in zip(g.output_names, g.outputs):
        out.append(f"  out_{name} [label={_quote(name)}, shape=plaintext];")
        out.append(f"  n{number[o.id]} -> out_{name};")
    for w, d in zip(wrt, grads):
        out.append(f"  grad_{w.param} [label={_quote('d_' + w.param)}, shape=plaintext];")
        out.append(f"  n{number[d.id]} -> grad_{w.param};")
    out.append("}")
    return "\n".join(out) + "\n"


def render_dot(dot: str, fmt: str) -> bytes:
    """Graphviz's rendering of ``dot`` as ``svg`` or ``png``."""
    exe = shutil.which("dot")
    if exe is None:
        raise GradcError(
            "rendering a graph needs Graphviz's `dot` program, which is not installed "
            "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz; conda: conda install graphviz); "
            "without it, --format dot prints the graph's source"
        )
    run = subprocess.run([exe, f"-T{fmt}"], input=dot.encode(), capture_output=True, timeout=120)
    if run.returncode != 0:
        raise GradcError(f"Graphviz failed to render the graph: {run.stderr.decode(errors='replace').strip()}")
    return run.stdout


def render(view: str, c: Compiled, **options) -> str:
    """One view of ``c`` by name (see :data:`VIEWS`)."""
    if view == "c":
        return c.c_source
    if view == "header":
        return c.header
    if view == "math":
        return math(c, latex=options.get("latex", False))
    if view == "stats":
        return stats(c)
    if view == "graph":
        return graph(c)
    raise GradcError(f"no view named {view!r}; the views are {', '.join(VIEWS)}")
