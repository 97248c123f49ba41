"""Forward mode and second order: ``k.jvp``, ``k.hvp``, ``k.hessian`` and ``gradc.hessian``.

Jacobian-vector products are checked against central differences of an independent NumPy
reference along a random tangent, in float64 (and in float32 with looser tolerances);
Hessian-vector products against differences of the compiled gradient and against closed
forms.  Every kernel is compiled once per module (``compiled``).
"""

import re
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import gradc

NP = {"f32": np.float32, "f64": np.float64}
FD_STEP = 1e-6
# Central differences in float64 are good to ~1e-9 here; float32 kernels to a few ulps
# of the values involved, amplified a little by the derivative.
JVP_TOL = {"f64": 1e-7, "f32": 2e-4}
HVP_TOL = {"f64": 1e-6, "f32": 2e-3}


def softplus(x):
    return np.logaddexp(0, x)


def logsumexp(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    """A kernel factory (annotation dtype -> DSL function), its NumPy twin, and its inputs."""

    name: str
    factory: Callable
    reference: Callable
    shapes: list
    sizes: tuple = ({},)
    sample: Callable | None = None  # (rng, concrete shapes) -> inputs, when uniform(-1, 1) will not do

    def concrete(self, dims):
        return [tuple(dims[d] if isinstance(d, str) else d for d in s) for s in self.shapes]


def broadcasting(t):
    def broadcasting(x: t["N", 3], b: t[3], s: t[()]):
        return gradc.sin(x * b + s) * gradc.exp(b) - s * x

    return broadcasting


def np_broadcasting(x, b, s):
    return np.sin(x * b + s) * np.exp(b) - s * x


def reductions(t):
    def reductions(x: t["N", 4]):
        return (
            gradc.sum(x, axis=0)
            + gradc.mean(x * x, axis=0) * gradc.max(x, axis=0)
            - gradc.min(gradc.sin(x), axis=0)
            + gradc.sum(gradc.exp(x))
        )

    return reductions


def np_reductions(x):
    return np.sum(x, 0) + np.mean(x * x, 0) * np.max(x, 0) - np.min(np.sin(x), 0) + np.sum(np.exp(x))


def keepdims(t):
    def keepdims(x: t[3, "M"]):
        shifted = x - gradc.max(x, axis=1, keepdims=True)
        return shifted * gradc.mean(x, axis=1, keepdims=True) + gradc.logsumexp(x, axis=1, keepdims=True)

    return keepdims


def np_keepdims(x):
    return (x - np.max(x, 1, keepdims=True)) * np.mean(x, 1, keepdims=True) + logsumexp(x, 1)[:, None]


def matmul(t):
    def matmul(X: t["N", "K"], W: t["K", 2], A: t[2, 3, 4], B: t[2, 4, "K"]):
        return gradc.tanh(X @ W) + gradc.sum(A @ B, axis=(0, 1)) @ W

    return matmul


def np_matmul(X, W, A, B):
    return np.tanh(X @ W) + np.sum(A @ B, axis=(0, 1)) @ W


def slices(t):
    def slices(x: t["N"], Y: t[4, 5]):
        chain = x[1:] * x[:-1] + x[-1] * x[0]
        return chain, Y[:, 1:3] * Y[0:4, 3:5] + Y[1:3].T[1:5] - Y[-1, 0]

    return slices


def np_slices(x, Y):
    return x[1:] * x[:-1] + x[-1] * x[0], Y[:, 1:3] * Y[0:4, 3:5] + Y[1:3].T[1:5] - Y[-1, 0]


def concatenate(t):
    def concatenate(x: t["N", 2], y: t[3]):
        a = gradc.reshape(x * x, (x.shape[0] * 2,))
        return gradc.concatenate([gradc.sin(a), y * y, a[:1]]), gradc.stack([y, gradc.exp(y)], axis=1)

    return concatenate


def np_concatenate(x, y):
    a = (x * x).reshape(-1)
    return np.concatenate([np.sin(a), y * y, a[:1]]), np.stack([y, np.exp(y)], axis=1)


def where(t):
    def where(x: t[6], y: t[6]):
        return gradc.where(x > 0, x * y**2, gradc.sin(y) - x) + gradc.where(x > y, gradc.log(x * x), y)

    return where


def np_where(x, y):
    return np.where(x > 0, x * y**2, np.sin(y) - x) + np.where(x > y, np.log(x * x), y)


def _away_from_ties(rng, shapes):
    """x and y at least 0.1 from 0 and from each other, so no difference step crosses a branch."""
    x = rng.uniform(0.2, 1.5, shapes[0]) * rng.choice([-1.0, 1.0], shapes[0])
    y = x + rng.uniform(0.2, 1.0, shapes[1]) * rng.choice([-1.0, 1.0], shapes[1])
    return [x, y]


def reshape(t):
    def reshape(x: t[2, 6], z: t["N", 2]):
        mixed = gradc.reshape(x * x, (3, 4)).T * gradc.reshape(gradc.sin(x), (4, 3))
        return mixed, gradc.transpose(gradc.reshape(gradc.exp(z), (2, z.shape[0])))

    return reshape


def np_reshape(x, z):
    return (x * x).reshape(3, 4).T * np.sin(x).reshape(4, 3), np.exp(z).reshape(2, -1).T


def tuple_output(t):
    def tuple_output(x: t[3], W: t[2, 3]):
        return gradc.sum(W @ x), W * x, gradc.exp(x)

    return tuple_output


def np_tuple_output(x, W):
    return np.sum(W @ x), W * x, np.exp(x)


def named(t):
    def named(X: t["B", "D"], w: t["D"]):
        return gradc.softplus(X @ w) / gradc.sqrt(gradc.sum(w * w))

    return named


def np_named(X, w):
    return softplus(X @ w) / np.linalg.norm(w)


CASES = [
    Case("broadcasting", broadcasting, np_broadcasting, [("N", 3), (3,), ()], ({"N": 1}, {"N": 4})),
    Case("reductions", reductions, np_reductions, [("N", 4)], ({"N": 1}, {"N": 3}, {"N": 7})),
    Case("keepdims", keepdims, np_keepdims, [(3, "M")], ({"M": 1}, {"M": 5})),
    Case("matmul", matmul, np_matmul, [("N", "K"), ("K", 2), (2, 3, 4), (2, 4, "K")], ({"N": 2, "K": 3}, {"N": 5, "K": 3})),
    Case("slices", slices, np_slices, [("N",), (4, 5)], ({"N": 2}, {"N": 6})),
    Case("concatenate", concatenate, np_concatenate, [("N", 2), (3,)], ({"N": 1}, {"N": 3})),
    Case("where", where, np_where, [(6,), (6,)], sample=_away_from_ties),
    Case("reshape", reshape, np_reshape, [(2, 6), ("N", 2)], ({"N": 1}, {"N": 4})),
    Case("tuple_output", tuple_output, np_tuple_output, [(3,), (2, 3)]),
    Case("named", named, np_named, [("B", "D"), ("D",)], ({"B": 1, "D": 1}, {"B": 3, "D": 5}, {"B": 8, "D": 2})),
]
BY_NAME = {c.name: c for c in CASES}

_COMPILED = {}


def compiled(factory: Callable, dtype: str, wrt=None, name: str | None = None):
    """Compile ``factory``'s kernel once per (name, dtype, wrt) in this module."""
    base = name or factory.__name__
    key = (base, dtype, wrt if not isinstance(wrt, list) else tuple(wrt))
    if key not in _COMPILED:
        fn = factory(getattr(gradc, dtype))
        suffix = "" if wrt is None else "_wrt_" + "_".join([wrt] if isinstance(wrt, str) else wrt)
        fn.__name__ = fn.__qualname__ = f"{base}_{dtype}{suffix}"
        _COMPILED[key] = gradc.compile(gradc.kernel(fn), wrt=wrt)
    return _COMPILED[key]


def inputs_for(case: Case, dims: dict) -> list[np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(f"{case.name}/{sorted(dims.items())}".encode()))
    shapes = case.concrete(dims)
    if case.sample is not None:
        return case.sample(rng, shapes)
    return [rng.uniform(-1, 1, s) for s in shapes]


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def assert_close(actual, expected, tol, what):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: {actual}"
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def directional_difference(f, xs, ts, h=FD_STEP):
    """(f(x + h t) - f(x - h t)) / 2h for every output of f."""
    plus = as_tuple(f(*(x + h * t for x, t in zip(xs, ts))))
    minus = as_tuple(f(*(x - h * t for x, t in zip(xs, ts))))
    return tuple((np.asarray(p) - np.asarray(m)) / (2 * h) for p, m in zip(plus, minus))


def _dims_id(dims):
    return "".join(f"-{k}{v}" for k, v in dims.items())


# float32 on a few cases only: the arithmetic is the same code, and each kernel costs a C build.
F32_CASES = {"broadcasting", "reductions", "where", "tuple_output", "named"}
JVP_PARAMS = [
    pytest.param(c, dims, dtype, id=f"{c.name}{_dims_id(dims)}-{dtype}")
    for c in CASES
    for dims in c.sizes
    for dtype in (["f64", "f32"] if c.name in F32_CASES else ["f64"])
]


# ----------------------------------------------------------------------------- jvp
@pytest.mark.parametrize("case,dims,dtype", JVP_PARAMS)
def test_jvp_matches_directional_differences(case, dims, dtype):
    k = compiled(case.factory, dtype)
    xs = inputs_for(case, dims)
    rng = np.random.default_rng(zlib.crc32(f"tangent/{case.name}/{sorted(dims.items())}".encode()))
    ts = [rng.standard_normal(x.shape) for x in xs]
    outs, tangents = k.jvp(*(x.astype(NP[dtype]) for x in xs), tuple(t.astype(NP[dtype]) for t in ts))
    want_outs = as_tuple(case.reference(*xs))
    want_tangents = directional_difference(case.reference, xs, ts)
    outs, tangents = as_tuple(outs), as_tuple(tangents)
    assert len(outs) == len(tangents) == len(want_outs)
    for i, (o, t, wo, wt) in enumerate(zip(outs, tangents, want_outs, want_tangents)):
        assert np.asarray(o).dtype == NP[dtype] and np.asarray(t).dtype == NP[dtype]
        assert_close(o, wo, JVP_TOL[dtype], f"output {i}")
        assert_close(t, wt, JVP_TOL[dtype], f"tangent of output {i}")


def test_jvp_outputs_equal_the_forward_pass():
    case = BY_NAME["tuple_output"]
    k = compiled(case.factory, "f64")
    xs = inputs_for(case, {})
    outs, _ = k.jvp(*xs, tuple(np.ones_like(x) for x in xs))
    for o, f in zip(outs, k(*xs)):
        np.testing.assert_array_equal(o, f)


def test_jvp_is_linear_in_the_tangent():
    case = BY_NAME["named"]
    k = compiled(case.factory, "f64")
    X, w = inputs_for(case, {"B": 3, "D": 5})
    rng = np.random.default_rng(3)
    t1 = (rng.standard_normal(X.shape), rng.standard_normal(w.shape))
    t2 = (rng.standard_normal(X.shape), rng.standard_normal(w.shape))
    _, j1 = k.jvp(X, w, t1)
    _, j2 = k.jvp(X, w, t2)
    _, j12 = k.jvp(X, w, tuple(2 * a - 3 * b for a, b in zip(t1, t2)))
    np.testing.assert_allclose(j12, 2 * j1 - 3 * j2, rtol=1e-12, atol=1e-12)
    _, zero = k.jvp(X, w, (np.zeros_like(X), np.zeros_like(w)))
    np.testing.assert_array_equal(zero, np.zeros(3))


def test_jvp_with_respect_to_a_subset_takes_one_tangent():
    """wrt="w" (a single name): the tangent is one array, and X is held constant."""
    case = BY_NAME["named"]
    k = compiled(case.factory, "f64", wrt="w")
    X, w = inputs_for(case, {"B": 8, "D": 2})
    t = np.array([0.3, -1.1])
    out, tangent = k.jvp(X, w, t)
    assert_close(out, np_named(X, w), 1e-12, "output")
    (want,) = directional_difference(lambda w_: np_named(X, w_), [w], [t])
    assert_close(tangent, want, JVP_TOL["f64"], "tangent")
    # by name, and with the tangent as a keyword
    out2, tangent2 = k.jvp(w=w, X=X, tangents=t)
    np.testing.assert_array_equal(tangent2, tangent)


def max_min_ties(t):
    def max_min_ties(x: t[4]):
        return gradc.max(x), gradc.min(x), gradc.max(gradc.reshape(x, (2, 2)), axis=0)

    return max_min_ties


@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_jvp_splits_ties_of_max_and_min_like_the_gradient(dtype):
    """At a tie the extremum's tangent is the mean of the tied elements' tangents: the
    transpose of the gradient's choice (the cotangent split evenly among the ties)."""
    k = compiled(max_min_ties, dtype)
    x = np.array([1.0, 3.0, 3.0, 1.0], dtype=NP[dtype])
    t = np.array([1.0, 2.0, 4.0, 8.0], dtype=NP[dtype])
    (mx, mn, cols), (t_mx, t_mn, t_cols) = k.jvp(x, (t,))
    assert (mx, mn) == (3.0, 1.0)
    np.testing.assert_array_equal(cols, [3.0, 3.0])
    assert t_mx == (2.0 + 4.0) / 2
    assert t_mn == (1.0 + 8.0) / 2
    np.testing.assert_array_equal(t_cols, [4.0, 2.0])  # columns [1, 3] and [3, 1]: no ties
    _, (g_max,) = k.vjp(x, (1.0, 0.0, np.zeros(2)))
    _, (g_min,) = k.vjp(x, (0.0, 1.0, np.zeros(2)))
    assert g_max @ t == t_mx and g_min @ t == t_mn


def jacobian_kernel(t):
    def jacobian_kernel(x: t[3], A: t[2, 3]):
        return gradc.tanh(A @ x) * x[:2] + gradc.max(A, axis=1)

    return jacobian_kernel


@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_jacobian_by_columns_of_jvp_equals_rows_of_vjp(dtype):
    k = compiled(jacobian_kernel, dtype)
    rng = np.random.default_rng(11)
    x, A = rng.uniform(-1, 1, 3).astype(NP[dtype]), rng.uniform(-1, 1, (2, 3)).astype(NP[dtype])
    sizes = [3, 6]
    shapes = [(3,), (2, 3)]
    columns = []
    for j, size in enumerate(sizes):
        for e in range(size):
            ts = [np.zeros(s, dtype=NP[dtype]) for s in shapes]
            ts[j].reshape(-1)[e] = 1
            columns.append(k.jvp(x, A, tuple(ts))[1])
    by_jvp = np.stack(columns, axis=1)
    rows = []
    for i in range(2):
        ct = np.zeros(2, dtype=NP[dtype])
        ct[i] = 1
        dx, dA = k.vjp(x, A, ct)[1]
        rows.append(np.concatenate([dx.reshape(-1), dA.reshape(-1)]))
    by_vjp = np.stack(rows)
    assert by_jvp.shape == by_vjp.shape == (2, 9)
    tol = 1e-14 if dtype == "f64" else 1e-6
    np.testing.assert_allclose(by_jvp, by_vjp, rtol=tol, atol=tol)
    # and both are the derivative: against differences of the float64 NumPy twin
    x64, A64 = x.astype(np.float64), A.astype(np.float64)

    def f(x_, A_):
        return np.tanh(A_ @ x_) * x_[:2] + np.max(A_, axis=1)

    fd = np.stack(
        [directional_difference(f, [x64, A64], [np.eye(9)[c][:3], np.eye(9)[c][3:].reshape(2, 3)])[0] for c in range(9)], axis=1
    )
    assert_close(by_jvp, fd, JVP_TOL[dtype], "Jacobian")


# ----------------------------------------------------------------------------- the generated C
def elementwise(t):
    def elementwise(x: t["N"], y: t["N"]):
        return gradc.exp(-x) * gradc.sin(y) + x * y

    return elementwise


def _function_body(c_source: str, name: str) -> str:
    start = c_source.index(f"int {name}(")
    end = c_source.index("\n}\n", start)
    return c_source[start:end]


def test_jvp_of_an_elementwise_kernel_is_one_fused_loop():
    """Value and tangent come out of one pass over memory, as Eigen's AutoDiffScalar would
    compute them, but with the tangent's expression shared with the value's by CSE."""
    k = compiled(elementwise, "f64")
    body = _function_body(k.c_source, "elementwise_f64_jvp")
    loops = re.findall(r"\bfor \(", body)
    assert len(loops) == 1, f"expected one loop nest computing out and t_out together, got {len(loops)}:\n{body}"
    x, y = np.array([0.5, -1.0, 2.0]), np.array([1.5, 0.25, -0.75])
    out, t_out = k.jvp(x, y, (np.ones(3), np.zeros(3)))
    np.testing.assert_allclose(out, np.exp(-x) * np.sin(y) + x * y, rtol=1e-14)
    np.testing.assert_allclose(t_out, -np.exp(-x) * np.sin(y) + y, rtol=1e-14)


# ----------------------------------------------------------------------------- hvp and Hessians
def quadratic(t):
    def quadratic(x: t["N"], A: t["N", "N"]):
        return x @ (A @ x)

    return quadratic


def quartic(t):
    def quartic(x: t[5]):
        return gradc.sum(x**4)

    return quartic


def mixed(t):
    def mixed(x: t[3], W: t[2, 3]):
        return gradc.sum(gradc.tanh(W @ x)) + gradc.sum(x**3) / 3 + gradc.logsumexp(W * x)

    return mixed


def chain(t):
    def chain(x: t["N"]):
        return gradc.sum(gradc.tanh(x[1:] * x[:-1])) + gradc.max(x * x)

    return chain


@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("n", [1, 4])
def test_hvp_of_a_quadratic_form_is_exact(n, dtype):
    """x^T A x has Hessian A + A^T, whatever x."""
    k = compiled(quadratic, dtype, wrt="x")
    rng = np.random.default_rng(n)
    x, v, A = rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal((n, n))
    tol = 1e-13 if dtype == "f64" else 1e-5
    hv = k.hvp(*(a.astype(NP[dtype]) for a in (x, A, v)))
    assert hv.dtype == NP[dtype]
    assert_close(hv, (A + A.T) @ v, tol, "H v")
    H = k.hessian(x.astype(NP[dtype]), A.astype(NP[dtype]))
    assert_close(H, A + A.T, tol, "Hessian")


def test_hessian_of_a_sum_of_fourth_powers_is_diagonal():
    k = compiled(quartic, "f64")
    x = np.array([-2.0, -0.5, 0.0, 0.75, 3.0])
    # wrt defaults to every parameter, given as a list: one row of one block
    ((H,),) = k.hessian(x)
    np.testing.assert_allclose(H, np.diag(12 * x**2), rtol=1e-14, atol=0)


def test_gradc_hessian_with_one_wrt_has_shape_s_plus_s():
    kern = gradc.kernel(quartic(gradc.f64))
    x = np.array([-2.0, -0.5, 0.0, 0.75, 3.0])
    H = gradc.hessian(kern, x, wrt="x")
    assert H.shape == (5, 5)
    np.testing.assert_allclose(H, np.diag(12 * x**2), rtol=1e-14, atol=0)
    v = np.array([1.0, -1.0, 2.0, 0.5, -3.0])
    np.testing.assert_allclose(gradc.compile(kern, wrt="x").hvp(x, v), 12 * x**2 * v, rtol=1e-14)


def test_hessian_of_a_matrix_input_has_shape_s_plus_s():
    k = compiled(mixed, "f64", wrt="W")
    rng = np.random.default_rng(5)
    x, W = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, (2, 3))
    H = k.hessian(x, W)
    assert H.shape == (2, 3, 2, 3)
    flat = H.reshape(6, 6)
    np.testing.assert_allclose(flat, flat.T, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gradc.hessian(k.kernel, x, W, wrt="W"), H, rtol=1e-14, atol=0)


def _grad_differences(k, args, wrt_index, v, h=FD_STEP):
    """(grad(x + h v) - grad(x - h v)) / 2h, moving every wrt argument along its part of v."""
    plus, minus = list(args), list(args)
    for i, vi in zip(wrt_index, v):
        plus[i] = args[i] + h * vi
        minus[i] = args[i] - h * vi
    gp, gm = as_tuple(k.grad(*plus)), as_tuple(k.grad(*minus))
    return tuple((a - b) / (2 * h) for a, b in zip(gp, gm))


@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_hessian_with_several_wrt_is_nested_symmetric_blocks(dtype):
    k = compiled(mixed, dtype)
    k64 = compiled(mixed, "f64")
    rng = np.random.default_rng(9)
    x, W = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, (2, 3))
    H = k.hessian(x.astype(NP[dtype]), W.astype(NP[dtype]))
    shapes = [(3,), (2, 3)]
    assert isinstance(H, tuple) and len(H) == 2 and all(isinstance(row, tuple) and len(row) == 2 for row in H)
    for i, si in enumerate(shapes):
        for j, sj in enumerate(shapes):
            assert H[i][j].shape == si + sj, f"H[{i}][{j}]"
            assert H[i][j].dtype == NP[dtype]
    full = np.block([[H[i][j].reshape(int(np.prod(shapes[i])), -1) for j in range(2)] for i in range(2)]).astype(np.float64)
    tol = HVP_TOL[dtype]
    np.testing.assert_allclose(full, full.T, rtol=tol, atol=tol)
    # every column against differences of the float64 gradient
    for c in range(9):
        e = np.eye(9)[c]
        v = (e[:3], e[3:].reshape(2, 3))
        col = np.concatenate([d.reshape(-1) for d in _grad_differences(k64, [x, W], [0, 1], v)])
        assert_close(full[:, c], col, tol, f"Hessian column {c}")

def test_gradc_hessian_with_several_wrt_gives_the_same_blocks():
    k = compiled(mixed, "f64")
    x, W = np.array([0.3, -0.2, 0.9]), np.array([[0.5, -1.0, 0.25], [0.1, 0.7, -0.6]])
    blocks = gradc.hessian(k.kernel, x, W, wrt=["x", "W"])
    H = k.hessian(x, W)
    for i in range(2):
        for j in range(2):
            np.testing.assert_array_equal(blocks[i][j], H[i][j])


HVP_CASES = [
    pytest.param(mixed, {}, [(3,), (2, 3)], id="mixed"),
    pytest.param(chain, {"N": 2}, [(2,)], id="chain-N2"),
    pytest.param(chain, {"N": 9}, [(9,)], id="chain-N9"),
]


@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("factory,dims,shapes", HVP_CASES)
def test_hvp_matches_differences_of_the_gradient(factory, dims, shapes, dtype):
    k = compiled(factory, dtype)
    k64 = compiled(factory, "f64")
    rng = np.random.default_rng(zlib.crc32(f"{factory.__name__}/{dims}".encode()))
    args = [rng.uniform(-1, 1, s) for s in shapes]
    v = tuple(rng.standard_normal(s) for s in shapes)
    hv = k.hvp(*(a.astype(NP[dtype]) for a in args), tuple(vi.astype(NP[dtype]) for vi in v))
    assert isinstance(hv, tuple) and len(hv) == len(shapes)
    want = _grad_differences(k64, args, range(len(shapes)), v)
    for i, (got, w) in enumerate(zip(hv, want)):
        assert got.dtype == NP[dtype]
        assert_close(got, w, HVP_TOL[dtype], f"(H v)[{i}]")


def test_hvp_is_the_hessian_times_v():
    k = compiled(mixed, "f64")
    rng = np.random.default_rng(21)
    x, W = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, (2, 3))
    vx, vW = rng.standard_normal(3), rng.standard_normal((2, 3))
    H = k.hessian(x, W)
    hx, hW = k.hvp(x, W, v=(vx, vW))
    np.testing.assert_allclose(hx, H[0][0] @ vx + np.tensordot(H[0][1], vW, 2), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(hW, H[1][0] @ vx + np.tensordot(H[1][1], vW, 2), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- errors
def test_jvp_rejects_a_tangent_of_the_wrong_shape():
    k = compiled(broadcasting, "f64")
    x, b, s = np.ones((4, 3)), np.ones(3), np.float64(0.5)
    with pytest.raises(gradc.ShapeError, match=r"tangent\[b\] must have shape \(3,\), got \(4,\)"):
        k.jvp(x, b, s, (np.ones((4, 3)), np.ones(4), np.float64(1)))
    with pytest.raises(gradc.ShapeError, match=r"tangent\[x\] must have shape \(4, 3\), got \(3, 3\)"):
        k.jvp(x, b, s, (np.ones((3, 3)), np.ones(3), np.float64(1)))


def test_jvp_rejects_the_wrong_number_of_tangents():
    k = compiled(broadcasting, "f64")
    x, b, s = np.ones((4, 3)), np.ones(3), np.float64(0.5)
    with pytest.raises(gradc.ShapeError, match=r"expected 3 tangent\(s\).*got 2"):
        k.jvp(x, b, s, (np.ones((4, 3)), np.ones(3)))
    with pytest.raises(TypeError, match="tangents"):
        k.jvp(x, b, s)


def test_hvp_rejects_v_of_the_wrong_shape_or_count():
    k = compiled(mixed, "f64")
    x, W = np.ones(3), np.ones((2, 3))
    with pytest.raises(gradc.ShapeError, match=r"v\[W\] must have shape \(2, 3\), got \(3, 2\)"):
        k.hvp(x, W, (np.ones(3), np.ones((3, 2))))
    with pytest.raises(gradc.ShapeError, match=r"expected 2 v\(s\).*got 1"):
        k.hvp(x, W, (np.ones(3),))
    with pytest.raises(TypeError, match="v"):
        k.hvp(x, W)


def test_hvp_and_hessian_need_a_scalar_output():
    k = compiled(named, "f64")
    X, w = np.ones((2, 3)), np.ones(3)
    with pytest.raises(gradc.ShapeError, match=r"hvp\(\) needs a single scalar output.*\(B,\)"):
        k.hvp(X, w, (np.ones((2, 3)), np.ones(3)))
    with pytest.raises(gradc.ShapeError, match=r"hessian\(\) needs a single scalar output"):
        k.hessian(X, w)


def test_forward_mode_needs_gradients_compiled():
    k = compiled(named, "f64", wrt=[])
    with pytest.raises(gradc.GradcError, match=r"wrt=\[\].*jvp\(\)"):
        k.jvp(np.ones((2, 3)), np.ones(3), ())
