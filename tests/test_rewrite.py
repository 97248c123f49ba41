"""Graph rewrites on their own: ``fuse`` and ``prune`` keep values and simplify the graph.

Values are compared with the independent NumPy evaluator before and after each rewrite;
only the last tests (stability of ``1/exp(x)`` through the whole pipeline) compile C.
"""

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import gradc
from gradc import autodiff, compiler, f32, f64, ir, reference, rewrite
from gradc.scalar import StopGradient


def maps(outputs) -> list[ir.Map]:
    return [n for n in ir.topo_order(outputs) if isinstance(n, ir.Map)]


def graph_of(fn):
    return gradc.kernel(fn).trace().graph


def chain(x: f64[3, 4]):
    return gradc.tanh(gradc.exp(gradc.sin(x) * 2.0) + 1.0)


def shared(x: f64[3, 4], w: f64[4]):
    y = gradc.exp(gradc.sin(x))
    return gradc.sum(y * w), y * 3.0 - w, gradc.sum(gradc.cos(x) * x, axis=1)


def layered(X: f64["n", 3], W: f64[3, 2], b: f64[2]):
    H = gradc.tanh(X @ W + b)
    d = H[1:] - H[:-1]
    z = gradc.concatenate([H, d * d], axis=0)
    return gradc.logsumexp(z, axis=1).sum() + gradc.max(gradc.sigmoid(z)) / X.shape[0]


def guarded(x: f64[5], y: f64[5]):
    s = gradc.stop_gradient(gradc.max(x))
    safe = gradc.where(x > 0, gradc.log(gradc.abs(x) + 1e-3), gradc.maximum(x, y))
    return gradc.sum(safe * (x - s)) + gradc.sum(gradc.reshape(y * y, (5, 1)) * x[None])


KERNELS = {
    "chain": (chain, {"x": (3, 4)}, {}),
    "shared": (shared, {"x": (3, 4), "w": (4,)}, {}),
    "layered": (layered, {"X": ("n", 3), "W": (3, 2), "b": (2,)}, {"n": 4}),
    "guarded": (guarded, {"x": (5,), "y": (5,)}, {}),
}


def arrays_for(shapes, dims, seed):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(tuple(dims.get(d, d) for d in shape)) for name, shape in shapes.items()}


def with_gradients(graph):
    """The forward outputs followed by their VJPs with respect to every input."""
    cts = [ir.Input(f"ct{k}", o.shape) for k, o in enumerate(graph.outputs)]
    return graph.outputs + autodiff.vjp(graph.outputs, cts, graph.inputs), cts


def cotangents_for(graph, arrays, dims, seed):
    outs = reference.evaluate(graph.outputs, arrays, dims)
    rng = np.random.default_rng(seed + 1)
    return {f"ct{k}": rng.standard_normal(np.shape(o)) for k, o in enumerate(outs)}


def assert_same_values(before, after, feed, dims):
    for a, b in zip(reference.evaluate(before, feed, dims), reference.evaluate(after, feed, dims)):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- values are kept
@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(sorted(KERNELS)), seed=st.integers(0, 2**16))
def test_fuse_and_prune_preserve_forward_values(name, seed):
    fn, shapes, dims = KERNELS[name]
    graph = graph_of(fn)
    arrays = arrays_for(shapes, dims, seed)
    fused = rewrite.fuse(graph.outputs)
    assert_same_values(graph.outputs, fused, arrays, dims)
    assert_same_values(graph.outputs, rewrite.prune(fused), arrays, dims)
    assert_same_values(graph.outputs, rewrite.prune(graph.outputs), arrays, dims)


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(sorted(KERNELS)), seed=st.integers(0, 2**16))
def test_fuse_and_prune_preserve_gradient_values(name, seed):
    fn, shapes, dims = KERNELS[name]
    graph = graph_of(fn)
    arrays = arrays_for(shapes, dims, seed)
    feed = {**arrays, **cotangents_for(graph, arrays, dims, seed)}
    outs, _ = with_gradients(graph)
    final = rewrite.prune(rewrite.fuse(outs))
    assert len(final) == len(outs)
    assert_same_values(outs, final, feed, dims)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 6))
def test_pipeline_order_gives_the_same_gradient(seed, n):
    """Fusing before differentiating (as the compiler does) changes the graph, not the values."""
    graph = graph_of(layered)
    dims = {"n": n}
    arrays = arrays_for(KERNELS["layered"][1], dims, seed)
    feed = {**arrays, **cotangents_for(graph, arrays, dims, seed)}
    plain, cts = with_gradients(graph)
    fused_fwd = rewrite.fuse(graph.outputs)
    fused = rewrite.prune(rewrite.fuse(fused_fwd + autodiff.vjp(fused_fwd, cts, graph.inputs)))
    assert_same_values(plain, fused, feed, dims)


# ----------------------------------------------------------------------------- fuse simplifies
def test_elementwise_chain_becomes_one_node():
    def k(x: f64[3, 4]):
        return gradc.tanh(gradc.exp(gradc.sin(x) * 2.0) + 1.0) - x

    graph = graph_of(k)
    assert len(maps(graph.outputs)) == 6
    fused = rewrite.fuse(graph.outputs)
    (node,) = maps(fused)
    assert node.is_elementwise
    assert [op.node for op in node.operands] == graph.inputs


def test_elementwise_producers_fuse_into_reductions_and_contractions():
    def k(x: f64[3, 4], W: f64[4, 2]):
        return gradc.sum(gradc.exp(gradc.sin(x) * 2.0)), (x * 2.0) @ W

    fused = rewrite.fuse(graph_of(k).outputs)
    nodes = maps(fused)
    assert len(nodes) == 2
    assert {n.reduce for n in nodes} == {"sum"}


def test_expensive_producer_of_a_contraction_is_not_recomputed():
    def k(x: f64[3, 4], W: f64[4, 2]):
        return gradc.tanh(x) @ W

    fused = rewrite.fuse(graph_of(k).outputs)
    # A matmul reads each element of its left operand once per output column.
    assert sum(1 for n in maps(fused) if n.expr.has(sp.tanh)) == 1
    assert not any(n.expr.has(sp.tanh) and n.reduce for n in maps(fused))


def test_expensive_shared_value_is_computed_once():
    fused = rewrite.fuse(graph_of(shared).outputs)
    assert sum(1 for n in maps(fused) if n.expr.has(sp.sin)) == 1


def test_fused_nodes_remember_source_lines():
    fused = rewrite.fuse(graph_of(chain).outputs)
    (node,) = maps(fused)
    lines = {loc[1] for loc in node.sources if loc}
    assert len(lines) >= 1 and all(isinstance(line, int) for line in lines)


def test_fuse_keeps_requested_outputs_as_nodes():
    def k(x: f64[3]):
        y = gradc.sin(x)
        return y, gradc.exp(y)

    graph = graph_of(k)
    fused = rewrite.fuse(graph.outputs)
    # The first output is written for the caller anyway, so the second reads it back.
    assert isinstance(fused[0], ir.Map) and fused[0].expr.has(sp.sin)
    assert [op.node for op in fused[1].operands] == [fused[0]]
    assert not fused[1].expr.has(sp.sin)


# ----------------------------------------------------------------------------- prune
def test_prune_removes_stop_gradient_markers():
    graph = graph_of(guarded)
    assert any(n.expr.has(StopGradient) for n in maps(graph.outputs))
    pruned = rewrite.prune(graph.outputs)
    assert not any(n.expr.has(StopGradient) for n in maps(pruned))


def test_prune_keeps_only_what_the_outputs_need():
    graph = graph_of(shared)
    everything = ir.topo_order(graph.outputs)
    (only_last,) = rewrite.prune(graph.outputs[2:])
    kept = ir.topo_order([only_last])
    assert len(kept) < len(everything)
    assert not any(n.expr.has(sp.exp) for n in maps([only_last]))
    assert {i.param for i in kept if isinstance(i, ir.Input)} == {"x"}


def test_fused_graph_drops_inlined_producers():
    def k(x: f64[3, 4]):
        a = gradc.sin(x)
        b = gradc.exp(a)
        return gradc.sum(b * 2.0)

    graph = graph_of(k)
    final = rewrite.prune(rewrite.fuse(graph.outputs))
    assert len(ir.topo_order(final)) == 2  # the input and one reduction


def test_prune_of_gradient_graph_drops_unused_forward_values():
    def k(x: f64[4]):
        return gradc.sum(x * 3.0) + gradc.max(gradc.stop_gradient(gradc.exp(x)))

    graph = graph_of(k)
    (grad,) = autodiff.vjp(graph.outputs, [ir.constant(1)], graph.inputs)
    (pruned,) = rewrite.prune(rewrite.fuse([grad]))
    # d/dx is the constant 3: nothing of the forward pass (exp, max) is left to compute.
    assert not any(n.expr.has(sp.exp) or n.reduce == "max" for n in maps([pruned]))
    np.testing.assert_allclose(reference.evaluate([pruned], {"x": np.arange(4.0)}, {})[0], 3.0)


# ----------------------------------------------------------------------------- stability
def test_fusing_before_differentiating_keeps_where_from_leaking_nan():
    def k(x: f64[3]):
        return gradc.sum(gradc.where(x > 0, gradc.log(x), 0.0))

    graph = graph_of(k)
    fused = rewrite.fuse(graph.outputs)
    (g,) = autodiff.vjp(fused, [ir.constant(1)], graph.inputs)
    got = reference.evaluate([g], {"x": np.array([0.0, 2.0, -1.0])}, {})[0]
    np.testing.assert_array_equal(got, [0.0, 0.5, 0.0])


@gradc.kernel
def inverse_exp(x: f32[()]):
    return 1 / gradc.exp(x)


def gradient_node(k, wrt):
    lowered = compiler.lower(k, wrt=[wrt])
    (entry,) = [e for e in lowered.spec.entries if e.suffix == "value_and_grad"]
    return dict(entry.outputs)[f"d_{wrt}"]


def test_fused_gradient_of_inverse_exp_has_no_overflowing_form():
    node = gradient_node(inverse_exp, "x")
    assert isinstance(node, ir.Map)
    # Reads x itself, not a stored exp(x) that is inf at x = 100 in float32.
    assert [op.node.param for op in node.operands if isinstance(op.node, ir.Input)] == ["x"]
    assert all(not isinstance(op.node, ir.Map) for op in node.operands)
    (x,) = [op.symbol for op in node.operands]
    exps = node.expr.atoms(sp.exp)
    assert exps and all(e.args[0] == -x for e in exps)
    assert sp.simplify(node.expr + sp.exp(-x)) == 0


def test_compiled_gradient_of_inverse_exp_is_finite_at_100():
    k = gradc.compile(inverse_exp, wrt=["x"])
    value, (dx,) = k.value_and_grad(np.float32(100.0))
    assert np.isfinite(value) and np.isfinite(dx)
    expected = np.float32(-np.exp(-100.0))  # a float32 subnormal, about -3.7e-44
    assert dx <= 0 and abs(float(dx) - float(expected)) <= 2 * float(np.finfo(np.float32).smallest_subnormal)
    value, (dx,) = k.value_and_grad(np.float32(1.0))
    assert dx == pytest.approx(-np.exp(-1.0), rel=1e-6)
