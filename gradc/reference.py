"""An independent NumPy evaluator of the tensor graph, for testing the generated C.

It shares nothing with code generation: index maps become NumPy fancy indexing over the
whole loop box, bodies are evaluated with :func:`sympy.lambdify`, and reductions use
``np.add.at`` / ``np.maximum.at``.  Slow and memory-hungry, and deliberately simple.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import sympy as sp

from . import ir
from .scalar import Relu, Sigmoid, Softplus, Step, StopGradient


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _heaviside(x, h0=0.5):
    return np.where(x > 0, 1.0, np.where(x < 0, 0.0, h0))


_FUNCTIONS = {
    "Sigmoid": _sigmoid,
    "Softplus": _softplus,
    "Relu": lambda x: np.where(x <= 0, 0.0, x),
    "Step": lambda x: np.where(x > 0, 1.0, 0.0),
    "StopGradient": lambda x: x,
    "FiniteOrZero": lambda x: np.where(np.isfinite(x), x, 0.0),
    "Heaviside": _heaviside,
    "log1p": np.log1p,
    "expm1": np.expm1,
    "Max": np.maximum,
    "Min": np.minimum,
}
assert {Relu.__name__, Sigmoid.__name__, Softplus.__name__, Step.__name__, StopGradient.__name__} <= set(_FUNCTIONS)


def evaluate(outputs: Sequence[ir.Node], inputs: Mapping[str, np.ndarray], dims: Mapping[str, int], dtype=np.float64) -> list[np.ndarray]:
    """Evaluate ``outputs`` given arrays for the graph's :class:`~gradc.ir.Input` nodes (by parameter name)."""
    dim_values = {ir.dim_symbol(d): v for d, v in dims.items()}
    values: dict[int, np.ndarray] = {}

    def extent(e) -> int:
        return int(sp.sympify(e).xreplace(dim_values))

    for node in ir.topo_order(outputs):
        shape = tuple(extent(d) for d in node.shape)
        if isinstance(node, ir.Input):
            values[node.id] = np.asarray(inputs[node.param], dtype=dtype).reshape(shape)
        elif isinstance(node, ir.Reshape):
            values[node.id] = values[node.arg.id].reshape(shape)
        elif isinstance(node, ir.CustomGradient):
            values[node.id] = values[node.value.id]
        else:
            values[node.id] = _map(node, values, shape, extent, dtype, dim_values)
    return [values[o.id] for o in outputs]


def _map(node: ir.Map, values, shape, extent, dtype, dim_values) -> np.ndarray:
    loop = tuple(extent(e) for e in node.loop)
    grid = np.indices(loop, dtype=np.int64) if loop else np.zeros((0,), dtype=np.int64)

    def gather(index: ir.IndexMap):
        idx = []
        for a in index:
            off = extent(a.offset)
            idx.append(np.full(loop, off, dtype=np.int64) if a.var is None else a.stride * grid[a.var] + off)
        return tuple(idx)

    args = []
    for op in node.operands:
        src = values[op.node.id]
        v = src[gather(op.index)] if op.node.rank else np.broadcast_to(src, loop)
        args.append(v != 0 if op.node.dtype == "bool" else v)
    expr = node.expr.xreplace(dim_values)
    fn = sp.lambdify([op.symbol for op in node.operands], expr, modules=[_FUNCTIONS, "numpy"])
    with np.errstate(all="ignore"):
        body = np.broadcast_to(np.asarray(fn(*args), dtype=dtype if node.dtype == "float" else bool), loop)
    if node.dtype == "bool":
        body = body.astype(dtype)
    out_idx = gather(node.out_index)
    if node.reduce is None:
        out = np.empty(shape, dtype=dtype)
        out[out_idx] = body
        return out
    init = {"sum": 0.0, "max": -np.inf, "min": np.inf}[node.reduce]
    ufunc = {"sum": np.add, "max": np.maximum, "min": np.minimum}[node.reduce]
    if not shape:
        return np.asarray(ufunc.reduce(body.reshape(-1), initial=init), dtype=dtype)
    out = np.full(shape, init, dtype=dtype)
    ufunc.at(out, out_idx, body)
    return out
