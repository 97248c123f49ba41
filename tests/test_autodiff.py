"""The reverse-mode rule on its own, checked against finite differences.

Each test traces a small kernel, calls :func:`gradc.autodiff.vjp` on the raw traced graph
(no fusion, no pruning, no C), evaluates the adjoint graph with the independent NumPy
evaluator in float64, and compares it with central differences of the evaluated forward.
"""

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import gradc
from gradc import autodiff, f64, ir, reference

RTOL, ATOL = 1e-5, 1e-7


def traced_graph(fn):
    return gradc.kernel(fn).trace().graph


def forward(outputs, arrays, dims):
    return reference.evaluate(outputs, arrays, dims)


def objective(outputs, arrays, dims, cts):
    """``Σ_k <ct_k, out_k>``: its gradient is the VJP with cotangents ``ct_k``."""
    return sum(float(np.sum(c * o)) for c, o in zip(cts, forward(outputs, arrays, dims)))


def numeric_vjp(outputs, arrays, dims, cts, wrt):
    grads = []
    for name in wrt:
        base = np.asarray(arrays[name], dtype=np.float64)
        g = np.zeros_like(base)
        for i in np.ndindex(base.shape):
            h = 1e-6 * max(1.0, abs(base[i]))
            vals = []
            for sign in (1, -1):
                moved = base.copy()
                moved[i] += sign * h
                vals.append(objective(outputs, {**arrays, name: moved}, dims, cts))
            g[i] = (vals[0] - vals[1]) / (2 * h)
        grads.append(g)
    return grads


def symbolic_vjp(fn, arrays, dims=None, wrt=None, seed=0):
    """(analytic, numeric) VJPs of ``fn`` at ``arrays`` for a random cotangent per output."""
    dims = dims or {}
    graph = traced_graph(fn)
    wrt = wrt or [i.param for i in graph.inputs]
    rng = np.random.default_rng(seed)
    out_values = forward(graph.outputs, arrays, dims)
    cts = [rng.standard_normal(np.shape(o)) for o in out_values]
    ct_nodes = [ir.Input(f"ct{k}", o.shape) for k, o in enumerate(graph.outputs)]
    by_name = {i.param: i for i in graph.inputs}
    grads = autodiff.vjp(graph.outputs, ct_nodes, [by_name[w] for w in wrt])
    for g, w in zip(grads, wrt):
        assert tuple(g.shape) == tuple(by_name[w].shape)
    feed = {**arrays, **{f"ct{k}": c for k, c in enumerate(cts)}}
    analytic = reference.evaluate(grads, feed, dims)
    return analytic, numeric_vjp(graph.outputs, arrays, dims, cts, wrt)


def check(fn, arrays, dims=None, wrt=None, seed=0, rtol=RTOL, atol=ATOL):
    analytic, numeric = symbolic_vjp(fn, arrays, dims, wrt, seed)
    for a, n in zip(analytic, numeric):
        np.testing.assert_allclose(a, n, rtol=rtol, atol=atol)


def gradient(fn, arrays, dims=None, wrt=None):
    """The exact gradient graph of a scalar kernel, evaluated (for kinks, where FD is undefined)."""
    graph = traced_graph(fn)
    by_name = {i.param: i for i in graph.inputs}
    wrt = wrt or [i.param for i in graph.inputs]
    grads = autodiff.vjp(graph.outputs, [ir.constant(1)], [by_name[w] for w in wrt])
    return reference.evaluate(grads, arrays, dims or {})


def rng_array(shape, seed=0, low=-2.0, high=2.0):
    return np.random.default_rng(seed).uniform(low, high, shape)


# ----------------------------------------------------------------------------- elementwise bodies
UNARY = {
    "exp": (gradc.exp, (-2, 2)),
    "log": (gradc.log, (0.2, 3)),
    "log1p": (gradc.log1p, (-0.8, 3)),
    "expm1": (gradc.expm1, (-2, 2)),
    "sqrt": (gradc.sqrt, (0.2, 3)),
    "sin": (gradc.sin, (-3, 3)),
    "cos": (gradc.cos, (-3, 3)),
    "tan": (gradc.tan, (-1.2, 1.2)),
    "tanh": (gradc.tanh, (-3, 3)),
    "sinh": (gradc.sinh, (-2, 2)),
    "cosh": (gradc.cosh, (-2, 2)),
    "arcsin": (gradc.arcsin, (-0.9, 0.9)),
    "arccos": (gradc.arccos, (-0.9, 0.9)),
    "arctan": (gradc.arctan, (-3, 3)),
    "abs": (gradc.abs, (0.1, 2)),
    "abs_neg": (gradc.abs, (-2, -0.1)),
    "square": (gradc.square, (-2, 2)),
    "reciprocal": (gradc.reciprocal, (0.3, 2)),
    "sigmoid": (gradc.sigmoid, (-6, 6)),
    "softplus": (gradc.softplus, (-6, 6)),
    "relu": (gradc.relu, (-2, 2)),
    "negative": (gradc.negative, (-2, 2)),
    "neg_op": (lambda x: -x, (-2, 2)),
    "pow_half": (lambda x: x**0.5, (0.2, 3)),
    "pow_3": (lambda x: x**3, (-2, 2)),
    "pow_frac": (lambda x: x**1.7, (0.2, 3)),
    "rpow": (lambda x: 2.0**x, (-2, 2)),
    "rdiv": (lambda x: 3.0 / x, (0.3, 2)),
}


def unary_kernel(op):
    def k(x: f64[2, 3]):
        return op(x)

    return k


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_elementwise(name):
    op, (low, high) = UNARY[name]
    x = rng_array((2, 3), seed=1, low=low, high=high)
    if name == "relu":
        x[np.abs(x) < 0.1] = 0.5  # stay off the kink, where FD is undefined
    check(unary_kernel(op), {"x": x})


def test_sign_has_zero_gradient():
    def k(x: f64[4]):
        return gradc.sum(gradc.sign(x) * 3.0)

    (g,) = gradient(k, {"x": np.array([-1.0, 0.5, 2.0, -3.0])})
    np.testing.assert_array_equal(g, 0.0)


BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (b + 3.0),
    "pow": lambda a, b: (a * a + 1.0) ** b,
    "maximum": gradc.maximum,
    "minimum": gradc.minimum,
    "where": lambda a, b: gradc.where(a > b, a * b, a - b),
    "where_scalar": lambda a, b: gradc.where(a > 0, gradc.sin(b), 2.0),
    "compare_mask_as_number": lambda a, b: (a > b) * b,
}


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_elementwise_with_broadcasting(name):
    op = BINARY[name]

    def k(a: f64[3, 1], b: f64[4]):
        return op(a, b)

    check(k, {"a": rng_array((3, 1), seed=2), "b": rng_array(4, seed=3)})


def test_multiple_uses_accumulate():
    def k(x: f64[3]):
        y = gradc.sin(x)
        return y * y + y * x + gradc.exp(y)

    check(k, {"x": rng_array(3, seed=4)})


def test_tuple_outputs_each_get_a_cotangent():
    def k(x: f64[3], w: f64[3]):
        return gradc.sum(x * w), gradc.tanh(x) * w, x + 1.0

    check(k, {"x": rng_array(3, seed=5), "w": rng_array(3, seed=6)})


def test_gradient_wrt_an_unused_parameter_is_zero():
    def k(x: f64[3], unused: f64[2, 2]):
        return gradc.sum(x * x)

    g_x, g_u = gradient(k, {"x": np.array([1.0, 2.0, 3.0]), "unused": np.ones((2, 2))})
    np.testing.assert_allclose(g_x, [2.0, 4.0, 6.0])
    np.testing.assert_array_equal(g_u, np.zeros((2, 2)))


# ----------------------------------------------------------------------------- reductions
@pytest.mark.parametrize("axis", [None, 0, 1, (0, 1), -1])
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("kind", ["sum", "mean", "max", "min", "logsumexp"])
def test_reductions(kind, axis, keepdims):
    op = getattr(gradc, kind)

    def k(x: f64[3, 4]):
        return op(gradc.sin(x) * 2.0, axis=axis, keepdims=keepdims)

    # distinct values, so max/min have a unique extremum and FD is well defined
    x = np.random.default_rng(7).permutation(np.linspace(-1.3, 1.3, 12)).reshape(3, 4)
    check(k, {"x": x})


def test_max_ties_split_the_gradient_evenly():
    def k(x: f64[5]):
        return gradc.max(x)

    (g,) = gradient(k, {"x": np.array([1.0, 3.0, -2.0, 3.0, 3.0])})
    np.testing.assert_allclose(g, [0, 1 / 3, 0, 1 / 3, 1 / 3])


def test_min_ties_split_the_gradient_evenly_per_row():
    def k(x: f64[2, 3]):
        return gradc.sum(gradc.min(x, axis=1) * np.float64(2.0))

    (g,) = gradient(k, {"x": np.array([[0.0, 0.0, 1.0], [5.0, -1.0, 4.0]])})
    np.testing.assert_allclose(g, [[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])


def test_max_over_named_axis_with_ties():
    def k(x: f64["n", 2]):
        return gradc.sum(gradc.max(x, axis=0))

    x = np.array([[1.0, 2.0], [1.0, 0.0], [0.5, 2.0], [1.0, 2.0]])
    (g,) = gradient(k, {"x": x}, {"n": 4})
    np.testing.assert_allclose(g, [[1 / 3, 1 / 3], [1 / 3, 0.0], [0.0, 1 / 3], [1 / 3, 1 / 3]])


@pytest.mark.parametrize(
    "op, x, y, want_x, want_y",
    [
        (gradc.maximum, 2.0, 2.0, 0.5, 0.5),
        (gradc.minimum, -1.0, -1.0, 0.5, 0.5),
        (gradc.maximum, 3.0, 2.0, 1.0, 0.0),
        (gradc.minimum, 3.0, 2.0, 0.0, 1.0),
    ],
)
def test_elementwise_extremum_ties(op, x, y, want_x, want_y):
    def k(a: f64[()], b: f64[()]):
        return op(a, b)

    gx, gy = gradient(k, {"a": np.array(x), "b": np.array(y)})
    assert float(gx) == want_x and float(gy) == want_y


@pytest.mark.parametrize("op, want", [(gradc.relu, 0.0), (gradc.abs, 0.0)])
def test_subgradient_at_zero(op, want):
    def k(x: f64[3]):
        return gradc.sum(op(x))

    (g,) = gradient(k, {"x": np.array([-1.0, 0.0, 2.0])})
    np.testing.assert_array_equal(g, [-1.0 if op is gradc.abs else 0.0, want, 1.0])


# ----------------------------------------------------------------------------- contractions
def test_matmul_2d():
    def k(A: f64[3, 4], B: f64[4, 2]):
        return A @ B

    check(k, {"A": rng_array((3, 4), 8), "B": rng_array((4, 2), 9)})


def test_matmul_vector_mixes_and_batches():
    def k(A: f64[2, 3, 4], B: f64[4, 2], v: f64[4], u: f64[3]):
        return A @ B, A @ v, v @ B, v @ v, u @ A

    arrays = {"A": rng_array((2, 3, 4), 10), "B": rng_array((4, 2), 11), "v": rng_array(4, 12), "u": rng_array(3, 13)}
    check(k, arrays)


def test_einsum_three_operands_and_repeated_use():
    def k(A: f64[2, 3], B: f64[3, 4], c: f64[4]):
        return gradc.einsum("ij,jk,k->i", A, B, c) + gradc.einsum("ij,ij->i", A, A)

    check(k, {"A": rng_array((2, 3), 14), "B": rng_array((3, 4), 15), "c": rng_array(4, 16)})


def test_contraction_over_named_dimension():
    def k(X: f64["n", 3], W: f64[3, 2]):
        return gradc.sum(gradc.sin(X @ W) ** 2)

    check(k, {"X": rng_array((4, 3), 17), "W": rng_array((3, 2), 18)}, {"n": 4})


# ----------------------------------------------------------------------------- index maps
def test_broadcast_to_and_named_broadcast():
    def k(a: f64["n", 1], b: f64[3], c: f64[()]):
        return gradc.broadcast_to(b, (2, 3)) * c, a * b + c

    check(k, {"a": rng_array((4, 1), 19), "b": rng_array(3, 20), "c": np.array(0.7)}, {"n": 4})


def test_slices_with_offsets_on_a_named_dimension():
    def k(x: f64["n"]):
        d = x[1:] - x[:-1]
        return gradc.sum(d * d) + x[-1] * x[0] + gradc.sum(x[1:-1] ** 3)

    check(k, {"x": rng_array(6, 21)}, {"n": 6})


def test_strided_and_reversed_slices():
    def k(y: f64[5, 4]):
        return y[::2, ::-1] * 2.0, y[None, -1], y[1:4, 2] * y[0, 1:], y.T

    check(k, {"y": rng_array((5, 4), 22)})


def test_concatenate_and_stack():
    def k(x: f64["n", 2], b: f64[3]):
        return gradc.concatenate([x, gradc.exp(x[1:]), x], axis=0), gradc.stack([b, b * b], axis=1)

    check(k, {"x": rng_array((3, 2), 23), "b": rng_array(3, 24)}, {"n": 3})


def test_transpose():
    def k(x: f64[2, 3, 4]):
        return gradc.transpose(x, (1, 2, 0)) * gradc.transpose(x, (1, 2, 0))

    check(k, {"x": rng_array((2, 3, 4), 25)})


def test_reshape():
    def k(x: f64[2, 6], w: f64[3]):
        r = gradc.reshape(gradc.sin(x), (4, 3))
        return gradc.reshape(r * w, (-1,)), r.reshape(2, 2, 3)

    check(k, {"x": rng_array((2, 6), 26), "w": rng_array(3, 27)})


def test_reshape_over_named_dimension():
    def k(x: f64["n", 3]):
        return gradc.reshape(x * x, (x.shape[0] * 3,)) * 2.0

    check(k, {"x": rng_array((2, 3), 28)}, {"n": 2})


# ----------------------------------------------------------------------------- stop_gradient
def test_stop_gradient_gives_zero_gradient():
    def k(x: f64[3]):
        return gradc.sum(gradc.stop_gradient(x) ** 2)

    (g,) = gradient(k, {"x": np.array([1.0, -2.0, 3.0])})
    np.testing.assert_array_equal(g, 0.0)


def test_stop_gradient_blocks_only_its_branch():
    def k(x: f64[3]):
        return gradc.sum(x * gradc.stop_gradient(x))

    x = np.array([1.0, -2.0, 3.0])
    (g,) = gradient(k, {"x": x})
    np.testing.assert_allclose(g, x)  # not 2x


def test_stop_gradient_on_a_reduction():
    def k(x: f64[4]):
        return gradc.sum(x - gradc.stop_gradient(gradc.max(x)))

    (g,) = gradient(k, {"x": np.array([1.0, 4.0, 2.0, 3.0])})
    np.testing.assert_allclose(g, np.ones(4))


# ----------------------------------------------------------------------------- differentiating twice
def hvp_check(fn, arrays, dims=None, wrt=None, seed=0):
    """vjp(vjp(f)) against central differences of the (exact) first gradient."""
    dims = dims or {}
    graph = traced_graph(fn)
    by_name = {i.param: i for i in graph.inputs}
    wrt = wrt or [i.param for i in graph.inputs]
    grads = autodiff.vjp(graph.outputs, [ir.constant(1)], [by_name[w] for w in wrt])
    rng = np.random.default_rng(seed)
    vs = [rng.standard_normal(np.shape(arrays[w])) for w in wrt]
    v_nodes = [ir.Input(f"v{k}", by_name[w].shape) for k, w in enumerate(wrt)]
    second = autodiff.vjp(grads, v_nodes, [by_name[w] for w in wrt])
    analytic = reference.evaluate(second, {**arrays, **{f"v{k}": v for k, v in enumerate(vs)}}, dims)
    numeric = numeric_vjp(grads, arrays, dims, vs, wrt)
    for a, n in zip(analytic, numeric):
        np.testing.assert_allclose(a, n, rtol=1e-5, atol=1e-6)


def test_vjp_of_vjp_elementwise_and_reduction():
    def k(x: f64[4]):
        return gradc.sum(gradc.sin(x) * gradc.exp(x)) + gradc.logsumexp(x * x)

    hvp_check(k, {"x": rng_array(4, 29)})


def test_vjp_of_vjp_with_contraction_and_mixed_partials():
    def k(X: f64[3, 2], W: f64[2, 2]):
        return gradc.sum(gradc.tanh(X @ W) ** 2) + gradc.sum(W * W * X[0])

    hvp_check(k, {"X": rng_array((3, 2), 30), "W": rng_array((2, 2), 31)})


def test_vjp_of_vjp_through_slices_and_max():
    def k(x: f64["n"]):
        return gradc.max(x[1:] * x[:-1]) + gradc.sum(gradc.sigmoid(x) * gradc.softplus(x))

    hvp_check(k, {"x": np.array([0.3, -1.2, 0.8, 1.9, -0.4])}, {"n": 5})


def test_gradient_inside_a_kernel_is_differentiable():
    def penalty(x: f64[3], w: f64[3]):
        g = gradc.grad(lambda v: gradc.sum(gradc.sin(v * w)))(x)
        return gradc.sum(g * g)

    check(penalty, {"x": rng_array(3, 32), "w": rng_array(3, 33)})


# ----------------------------------------------------------------------------- properties
SMOOTH = {
    "sin": gradc.sin,
    "cos": gradc.cos,
    "tanh": gradc.tanh,
    "sigmoid": gradc.sigmoid,
    "softplus": gradc.softplus,
    "arctan": gradc.arctan,
    "gauss": lambda x: gradc.exp(-x * x),
    "hypot1": lambda x: gradc.sqrt(1.0 + x * x),
    "log1p_sq": lambda x: gradc.log1p(gradc.square(x)),
    "cubic": lambda x: 0.3 * x**3 - x,
    "affine": lambda x: 2.0 * x + 0.5,
}

shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


def composed(names, shape):
    ops = [SMOOTH[n] for n in names]

    def k(x: f64[shape]):
        y = x
        for op in ops:
            y = op(y)
        return y

    return k


@settings(max_examples=30, deadline=None)
@given(names=st.lists(st.sampled_from(sorted(SMOOTH)), min_size=1, max_size=4), shape=shapes, seed=st.integers(0, 2**16))
def test_random_unary_compositions(names, shape, seed):
    check(composed(names, shape), {"x": rng_array(shape, seed)}, seed=seed)


@st.composite
def broadcastable_shapes(draw):
    """Two shapes that broadcast together (some axes set to 1, leading axes dropped)."""
    full = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    out = []
    for _ in range(2):
        s = [1 if draw(st.booleans()) else d for d in full]
        out.append(tuple(s[draw(st.integers(0, len(s))) :]))
    return out


PAIRWISE = {
    "mul": lambda a, b: a * b,
    "add": lambda a, b: a + b,
    "div": lambda a, b: a / (2.5 + gradc.sin(b)),
    "hypot": lambda a, b: gradc.sqrt(a * a + b * b + 0.1),
    "atan2ish": lambda a, b: gradc.arctan(a / (b * b + 1.0)),
}


@settings(max_examples=25, deadline=None)
@given(
    shapes=broadcastable_shapes(),
    op=st.sampled_from(sorted(PAIRWISE)),
    axis=st.one_of(st.none(), st.just(-1)),
    seed=st.integers(0, 2**16),
)
def test_random_broadcast_and_reduce(shapes, op, axis, seed):
    sa, sb = shapes
    fn = PAIRWISE[op]

    def k(a: f64[sa], b: f64[sb]):
        y = fn(a, b)
        return gradc.sum(gradc.tanh(y), axis=axis if y.ndim else None)

    check(k, {"a": rng_array(sa, seed), "b": rng_array(sb, seed + 1)}, seed=seed)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 5), k_=st.integers(1, 3), m=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_random_sizes_of_named_dimensions(n, k_, m, seed):
    def k(X: f64["n", "k"], W: f64["k", "m"]):
        Z = X @ W
        return gradc.logsumexp(Z, axis=1).sum() + gradc.max(X[1:] - X[:-1]) / X.shape[0]

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, k_))
    W = rng.standard_normal((k_, m))
    check(k, {"X": X, "W": W}, {"n": n, "k": k_, "m": m}, seed=seed)


def test_adjoint_nodes_are_the_same_node_kind():
    def k(X: f64[3, 2], W: f64[2, 2]):
        return gradc.sum(gradc.reshape(gradc.sin(X @ W), (6,)))

    graph = traced_graph(k)
    grads = autodiff.vjp(graph.outputs, [ir.constant(1)], graph.inputs)
    kinds = {type(n) for n in ir.topo_order(grads)}
    assert kinds <= {ir.Map, ir.Input, ir.Reshape}
    for n in ir.topo_order(grads):
        if isinstance(n, ir.Map):
            assert not n.expr.has(sp.Derivative, sp.DiracDelta)


# ----------------------------------------------------------------------------- shared partial derivatives
def dense_tanh(X: f64["N", "K"], W: f64["K", "M"], b: f64["M"]):
    return gradc.sum(gradc.tanh(X @ W + b) ** 2)


def test_a_broadcast_operand_sums_the_adjoint_it_shares():
    """In tanh(Z + b), ∂/∂Z and ∂/∂b are the same: b's adjoint sums Z's instead of evaluating
    tanh's derivative a second time (two exponentials per element, in an MLP's bias gradient)."""
    (loss,) = fused = gradc.compiler.rewrite.fuse(traced_graph(dense_tanh).outputs)
    b = next(n for n in ir.topo_order(fused) if isinstance(n, ir.Input) and n.param == "b")
    (d_b,) = autodiff.vjp([loss], [ir.constant(1)], [b])
    (read,) = d_b.operands
    # a plain sum over the rows of the (N, M) adjoint of Z = X @ W
    assert d_b.reduce == "sum" and d_b.expr == read.symbol
    N, M = ir.dim_symbol("N"), ir.dim_symbol("M")
    assert isinstance(read.node, ir.Map) and tuple(read.node.shape) == (N, M)

    rng = np.random.default_rng(3)
    X, W, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    got = reference.evaluate([d_b], {"X": X, "W": W, "b": b}, {"N": 5, "K": 4, "M": 3})[0]
    Z = np.tanh(X @ W + b)
    np.testing.assert_allclose(got, np.sum(2 * Z * (1 - Z**2), axis=0), rtol=1e-12)
