"""``rewrite.hoist``: what does not vary along an axis is computed once, not once per index.

Values are compared with the independent NumPy evaluator (``gradc.reference``) before and
after hoisting, on graphs built as ``compiler.lower`` builds an entry point; a few compiled
kernels then check that outputs keep their full shape and that the workspace shrinks.
"""

import importlib

import numpy as np
import pytest
import sympy as sp

import gradc
from gradc import autodiff, f32, f64, ir, reference, rewrite

B, N, M = (ir.dim_symbol(d) for d in "BNM")


def entry_graph(kernel, wrt=None):
    """(graph before hoisting, graph after, the cotangent inputs): the outputs and their vjp."""
    graph = kernel.trace().graph
    outs = rewrite.fuse(graph.outputs)
    wrt_nodes = [i for i in graph.inputs if wrt is None or i.param in wrt]
    cotangents = [ir.Input(f"ct{j}", o.shape) for j, o in enumerate(graph.outputs)]
    before = rewrite.prune(rewrite.fuse(outs + autodiff.vjp(outs, cotangents, wrt_nodes)))
    return before, rewrite.hoist(before), cotangents


def arrays(nodes, dims: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    values = {ir.dim_symbol(d): v for d, v in dims.items()}
    return {n.param: rng.standard_normal(tuple(int(sp.sympify(s).xreplace(values)) for s in n.shape)) for n in nodes}


def maps(nodes) -> list[ir.Map]:
    return [n for n in ir.topo_order(nodes) if isinstance(n, ir.Map)]


@gradc.kernel
def row_broadcast(x: f64["N", 3], b: f64[3]):
    # the same row sin(b) for every n: a row vector broadcast along a named batch dimension
    z = gradc.broadcast_to(gradc.sin(b), (x.shape[0], 3))
    return gradc.sum(gradc.exp(z) * x) + gradc.sum(z * z) + gradc.max(z) + gradc.min(gradc.sum(z, axis=0))


@gradc.kernel
def reshaped(x: f64["N", 3], b: f64[3]):
    # a Reshape reads a collapsed node: it must see the full shape again
    z = gradc.broadcast_to(gradc.sin(b), (x.shape[0], 3))
    flat = gradc.reshape(z, (x.shape[0] * 3,))
    return flat * gradc.reshape(x, (x.shape[0] * 3,)), gradc.reshape(z * 2, (3, x.shape[0]))


@gradc.kernel
def linear(x: f64["N", 4], W: f64[4, 3], b: f64[3]):
    return gradc.sum(gradc.tanh(x @ W + b), axis=1)


@gradc.kernel
def broadcast_sums(x: f32["N", 3], y: f32["M"], b: f32[3]):
    z = gradc.broadcast_to(gradc.sin(b), (x.shape[0], 3))
    zz = gradc.broadcast_to(gradc.cos(b), (x.shape[0], y.shape[0], 3))
    return z, gradc.sum(z, axis=0), gradc.sum(z * z), gradc.sum(zz, axis=(0, 1))


@gradc.kernel
def broadcast_extremes(x: f32["N", 3], b: f32[3]):
    z = gradc.broadcast_to(gradc.sin(b), (x.shape[0], 3))
    return gradc.max(z, axis=0), gradc.min(z, axis=0), gradc.max(z)


@pytest.fixture(scope="module")
def penalty(examples_path):
    return importlib.import_module("gradient_penalty").gradient_penalty


# ----------------------------------------------------------------------------- values
CASES = [
    ("row_broadcast", {"N": 1}),
    ("row_broadcast", {"N": 5}),
    ("reshaped", {"N": 0}),
    ("reshaped", {"N": 4}),
    ("linear", {"N": 0}),
    ("linear", {"N": 6}),
    ("broadcast_sums", {"N": 0, "M": 3}),
    ("broadcast_sums", {"N": 4, "M": 0}),
    ("broadcast_sums", {"N": 7, "M": 2}),
    ("broadcast_extremes", {"N": 1}),
    ("broadcast_extremes", {"N": 6}),
    ("gradient_penalty", {"B": 1}),
    ("gradient_penalty", {"B": 8}),
]


@pytest.mark.parametrize("name, dims", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_hoisting_preserves_values(penalty, name, dims):
    kernel = penalty if name == "gradient_penalty" else globals()[name]
    before, after, cotangents = entry_graph(kernel)
    inputs = arrays(kernel.trace().graph.inputs + cotangents, dims, seed=len(name) + sum(dims.values()))
    want = reference.evaluate(before, inputs, dims)
    for graph in (after, rewrite.fuse(after)):
        got = reference.evaluate(graph, inputs, dims)
        assert len(got) == len(want)
        for g, w, node in zip(got, want, before):
            assert g.shape == w.shape, node
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12, err_msg=str(node))


def test_nothing_to_hoist_leaves_the_graph_alone():
    before, after, _ = entry_graph(linear)
    assert [n.id for n in ir.topo_order(after)] == [n.id for n in ir.topo_order(before)]


# ----------------------------------------------------------------------------- what shrinks
def test_gradient_penalty_inner_gradient_is_one_row(penalty):
    before, after, _ = entry_graph(penalty, wrt=["input", "Wt"])
    Wt = next(i for i in penalty.trace().graph.inputs if i.param == "Wt")

    def inner_gradient(nodes):
        # d sum(x @ Wt.T + b) / dx: a sum over Wt's rows, the same for every row of x
        (node,) = [m for m in maps(nodes) if m.rank == 2 and [a.id for a in m.args] == [Wt.id]]
        return node

    assert inner_gradient(before).shape == (B, 4)
    assert inner_gradient(after).shape == (1, 4)
    assert inner_gradient(rewrite.fuse(after)).shape == (1, 4)
    # what hoisting collapsed: per batch row, the inner gradient, its squared norm, the
    # norm's adjoint and the inner gradient's adjoint (4 + 1 + 1 + 4 elements)
    elements = lambda nodes: sp.expand(sum(ir.num_elements(m.shape) for m in maps(nodes)))
    assert sp.expand(elements(before) - elements(after)).coeff(B) == 10


def test_gradient_penalty_workspace_has_no_inner_gradient_rows(penalty):
    k = gradc.compile(penalty, wrt=["input", "Wt"])
    (row,) = [line for line in k.show("stats").splitlines() if line.startswith("gradient_penalty_value_and_grad ")]
    # 6*B: the linear layer's output and its adjoint (B x 3 each); the inner gradient and
    # everything computed from it are B-independent (no 4*B term); 12 of the constant
    # elements are a packed panel of Wt (see ``tile`` in gradc/schedule.py)
    assert row.endswith("4*(6*B + 37) bytes (+ padding, 11 buffers)"), row
    # and the compiled kernel still computes the unhoisted graph's numbers
    graph = penalty.trace().graph
    outs = rewrite.fuse(graph.outputs)
    wrt = [i for i in graph.inputs if i.param in ("input", "Wt")]
    before = rewrite.prune(rewrite.fuse(outs + autodiff.vjp(outs, [ir.constant(1)], wrt)))
    example = importlib.import_module("gradient_penalty")
    for batch in (1, 5, 40):
        args = example.example_inputs(batch=batch, seed=batch)
        value, (d_input, d_Wt) = k.value_and_grad(*args)
        inputs = {i.param: a for i, a in zip(graph.inputs, args)}
        want_value, want_d_input, want_d_Wt = reference.evaluate(before, inputs, {"B": batch})
        np.testing.assert_allclose(value, want_value, rtol=1e-5)
        np.testing.assert_allclose(d_input, want_d_input, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d_Wt, want_d_Wt, rtol=1e-5, atol=1e-6)


def forward_hoisted(kernel) -> list[ir.Node]:
    return rewrite.hoist(rewrite.prune(rewrite.fuse(kernel.trace().graph.outputs)))


def test_unread_axes_collapse_to_one():
    sums = [m for m in maps(forward_hoisted(broadcast_sums)) if m.reduce == "sum"]
    assert sums
    for m in sums:
        # every sum here runs over the broadcast axes only: none of them is looped over any more
        assert not any(ir.same_extent(e, N) or ir.same_extent(e, M) for e in m.loop), m
    # Piecewise((0, Eq(extent, 0)), (extent * term, True)): the empty sum stays 0 even of Inf
    scales = {m.expr.args[0].cond.lhs for m in sums}
    assert {N, N * M} <= scales, scales

    extremes = [m for m in maps(forward_hoisted(broadcast_extremes)) if m.reduce in ("max", "min")]
    assert len(extremes) == 3
    for m in extremes:
        assert not m.expr.has(N), m  # no extent factor: the extremum of copies is the value
        assert not any(ir.same_extent(e, N) for e in m.loop), m


# ----------------------------------------------------------------------------- compiled
@pytest.fixture(scope="module")
def sums_kernel():
    return gradc.compile(broadcast_sums, wrt=["b"])


@pytest.mark.parametrize("n, m", [(0, 0), (0, 3), (1, 1), (5, 0), (6, 2)])
def test_outputs_keep_their_full_shape_and_sums_scale_by_extent(sums_kernel, n, m):
    rng = np.random.default_rng(n * 10 + m)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = rng.standard_normal(m).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    sin_b, cos_b = np.sin(b.astype(np.float64)), np.cos(b.astype(np.float64))
    z, column_sums, square_sum, block_sums = sums_kernel(x, y, b)
    assert z.shape == (n, 3) and column_sums.shape == (3,) and block_sums.shape == (3,)
    np.testing.assert_allclose(z, np.broadcast_to(sin_b, (n, 3)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(column_sums, n * sin_b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(square_sum, n * np.sum(sin_b**2), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(block_sums, n * m * cos_b, rtol=1e-6, atol=1e-7)
    if n * m == 0:
        # an empty sum is exactly zero (not -0, not NaN)
        assert np.all(block_sums == 0) and not np.signbit(block_sums).any()
    if n == 0:
        assert np.all(column_sums == 0) and float(square_sum) == 0

    ct = [rng.standard_normal(s).astype(np.float32) for s in ((n, 3), (3,), (), (3,))]
    _, (d_b,) = sums_kernel.vjp(x, y, b, tuple(ct))
    ct_z, ct_cols, ct_square, ct_blocks = (c.astype(np.float64) for c in ct)
    want = cos_b * (ct_z.sum(axis=0) + n * ct_cols + 2 * n * ct_square * sin_b) - n * m * sin_b * ct_blocks
    np.testing.assert_allclose(d_b, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_extremes_over_an_unread_axis_are_the_value(n):
    k = gradc.compile(broadcast_extremes, wrt=["b"])
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    b = np.array([0.3, -1.2, 0.3], np.float32)  # a tie in the overall max
    biggest, smallest, top = k(x, b)
    sin_b = np.sin(b.astype(np.float64))
    np.testing.assert_allclose(biggest, sin_b, rtol=1e-6)
    np.testing.assert_array_equal(biggest, smallest)
    assert float(top) == biggest.max()
    # n tied copies share each cotangent: together they pass it on whole
    ct_max, ct_min, ct_top = np.float32([1, 2, 3]), np.float32([0.5, -1, 4]), np.float32(2.0)
    _, (d_b,) = k.vjp(x, b, (ct_max, ct_min, ct_top))
    top_share = ct_top * np.array([0.5, 0, 0.5])
    np.testing.assert_allclose(d_b, np.cos(b.astype(np.float64)) * (ct_max + ct_min + top_share), rtol=1e-6)


@gradc.kernel
def broadcast_column_sums(x: f32["N", 3], b: f32[3]):
    return gradc.sum(gradc.broadcast_to(b, (x.shape[0], 3)), axis=0)


def test_empty_sum_of_infinite_terms_is_zero():
    k = gradc.compile(broadcast_column_sums, wrt=[])
    b = np.array([np.inf, 1, np.nan], np.float32)
    np.testing.assert_array_equal(k(np.zeros((0, 3), np.float32), b), [0, 0, 0])
