"""Second-order differentiation: ``gradc.grad`` inside a kernel, differentiated again by compile.

Each kernel's loss contains an inner gradient (a gradient penalty, a Hessian-vector product,
a derivative of a derivative).  Its references are NumPy functions that compute the inner
gradient analytically; the outer gradient is checked against their central finite
differences in float64, and Hessian-vector products also against finite differences of the
first gradient along ``v``.  Kernels are compiled once per module (``_COMPILED``).
"""

import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradc

DTYPES = ["f32", "f64"]
NP = {"f32": np.float32, "f64": np.float64}
VALUE_TOL = {"f64": 1e-9, "f32": 1e-4}
# float32 second derivatives lose a little more to rounding than first ones.
GRAD_TOL = {"f64": 1e-6, "f32": 3e-3}
FD_STEP = 1e-5


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def softplus(x):
    return np.log1p(np.exp(x))


def softmax(x):
    e = np.exp(x - np.max(x))
    return e / np.sum(e)


def logsumexp(x):
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m)))


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    """A kernel factory (annotation dtype -> function), its NumPy loss, and how to call it."""

    name: str
    factory: Callable
    loss: Callable
    shapes: list
    sizes: tuple = ({},)
    low: float = -1.0
    high: float = 1.0

    def concrete(self, dims):
        return [tuple(dims[d] if isinstance(d, str) else d for d in s) for s in self.shapes]


def tanh_penalty(t):
    def tanh_penalty(X: t["N", 3], w: t[3]):
        g = gradc.grad(lambda x: gradc.sum(gradc.tanh(x @ w)))(X)
        return gradc.sum(g * g)

    return tanh_penalty


def np_tanh_penalty(X, w):
    g = (1 - np.tanh(X @ w) ** 2)[:, None] * w[None, :]
    return np.sum(g * g)


def logistic_penalty(t):
    def logistic_penalty(X: t[5, 3], w: t[3], y: t[5]):
        def nll(x, v):
            z = x @ v
            return gradc.mean(gradc.softplus(z) - y * z)

        g = gradc.grad(nll, argnums=1)(X, w)
        return gradc.sum(g * g) + 0.1 * gradc.sum(w * w)

    return logistic_penalty


def np_logistic_penalty(X, w, y):
    g = X.T @ (sigmoid(X @ w) - y) / X.shape[0]
    return np.sum(g * g) + 0.1 * np.sum(w * w)


def critic_penalty(t):
    """A WGAN-GP style loss: the critic's mean plus a penalty on its per-sample gradient norm."""

    def critic_penalty(x: t["N", 3], W1: t[3, 4], w2: t[4]):
        def critic(z):
            return gradc.tanh(z @ W1) @ w2

        g = gradc.grad(lambda z: gradc.sum(critic(z)))(x)
        norms = gradc.sqrt(gradc.sum(g * g, axis=1))
        return gradc.mean((norms - 1) ** 2) + gradc.mean(critic(x))

    return critic_penalty


def np_critic_penalty(x, W1, w2):
    h = np.tanh(x @ W1)
    g = ((1 - h * h) * w2) @ W1.T
    norms = np.sqrt(np.sum(g * g, axis=1))
    return np.mean((norms - 1) ** 2) + np.mean(h @ w2)


def value_and_grad_inside(t):
    def value_and_grad_inside(x: t[4], A: t[3, 4]):
        value, g = gradc.value_and_grad(lambda z: gradc.logsumexp(A @ z))(x)
        return value * gradc.sum(g * g)

    return value_and_grad_inside


def np_value_and_grad_inside(x, A):
    g = A.T @ softmax(A @ x)
    return logsumexp(A @ x) * np.sum(g * g)


def argnums_tuple(t):
    def argnums_tuple(x: t[3, 2], w: t[2]):
        def f(a, b):
            return gradc.sum(gradc.sin(a @ b) * a[:, 0])

        gx, gw = gradc.grad(f, argnums=(0, 1))(x, w)
        return gradc.sum(gx * gx) + gradc.sum(gw * w)

    return argnums_tuple


def np_argnums_tuple(x, w):
    s = x @ w
    gx = np.cos(s)[:, None] * w[None, :] * x[:, :1]
    gx[:, 0] += np.sin(s)
    gw = x.T @ (np.cos(s) * x[:, 0])
    return np.sum(gx * gx) + np.sum(gw * w)


def third_order_scalar(t):
    """The compiled gradient of f'' is f''': three levels of differentiation."""

    def third_order_scalar(s: t[()]):
        return gradc.grad(gradc.grad(lambda u: gradc.exp(u) * gradc.sin(u)))(s)

    return third_order_scalar


def np_third_order_scalar(s):
    return 2 * np.exp(s) * np.cos(s)


def third_order_vector(t):
    def third_order_vector(x: t[5], w: t[5]):
        first = gradc.grad(lambda y: gradc.sum(gradc.sin(y) * y))
        second = gradc.grad(lambda y: gradc.sum(first(y)))(x)
        return gradc.sum(second * w)

    return third_order_vector


def np_third_order_vector(x, w):
    return np.sum((2 * np.cos(x) - x * np.sin(x)) * w)


def stop_gradient_inside(t):
    """The inner gradient sees the stopped factor as a constant, and so does the outer one."""

    def stop_gradient_inside(x: t[4]):
        g = gradc.grad(lambda z: gradc.sum(gradc.stop_gradient(z * z) * z))(x)
        return gradc.sum(g * x)

    return stop_gradient_inside


def np_stop_gradient_inside(x):
    # g = z*z (the stopped factor, as a value); the outer loss sum(x**3) is then
    # differentiated with that factor constant too: d/dx sum(stop(x*x) * x) = x*x.
    return np.sum(x * x * x)


# ----------------------------------------------------------------------------- Hessian-vector products
@dataclass
class Hvp:
    """``f`` (DSL, of x and optionally a matrix A) with its analytic NumPy gradient ``grad``."""

    name: str
    f: Callable
    grad: Callable
    x_shape: tuple
    a_shape: tuple | None = None
    sizes: tuple = ({},)
    sample_x: Callable | None = None


def _hvp_factory(h: Hvp):
    def factory(t):
        if h.a_shape is None:

            def hvp(x: t[h.x_shape], v: t[h.x_shape]):
                return gradc.sum(gradc.grad(h.f)(x) * v)

        else:

            def hvp(x: t[h.x_shape], v: t[h.x_shape], A: t[h.a_shape]):
                return gradc.sum(gradc.grad(lambda z: h.f(z, A))(x) * v)

        hvp.__name__ = f"hvp_{h.name}"
        return hvp

    return factory


def _np_chain_grad(x):
    d = 1 - np.tanh(x[1:] * x[:-1]) ** 2
    g = np.zeros_like(x)
    g[1:] += d * x[:-1]
    g[:-1] += d * x[1:]
    return g


def _away_from_zero(rng, shape):
    return rng.uniform(0.2, 1.5, shape) * rng.choice([-1.0, 1.0], shape)


def _distinct_squares(rng, shape):
    n = int(np.prod(shape))
    return ((rng.permutation(n) + 1) * 0.3 * rng.choice([-1.0, 1.0], n)).reshape(shape)


HVPS = [
    Hvp("elementwise", lambda x: gradc.sum(gradc.sin(x) * x * x), lambda x: np.cos(x) * x * x + 2 * x * np.sin(x), (5,)),
    Hvp("quadratic", lambda x, B: x @ (B @ x), lambda x, B: (B + B.T) @ x, (5,), (5, 5)),
    Hvp("logsumexp", lambda x, A: gradc.logsumexp(A @ x), lambda x, A: A.T @ softmax(A @ x), (5,), (3, 5)),
    Hvp(
        "softplus_cubic",
        lambda x, A: gradc.sum(gradc.softplus(A @ x)) + gradc.sum(x**3) / 3,
        lambda x, A: A.T @ sigmoid(A @ x) + x * x,
        (5,),
        (3, 5),
    ),
    Hvp(
        "chain_slices",
        lambda x: gradc.sum(gradc.tanh(x[1:] * x[:-1])),
        _np_chain_grad,
        ("N",),
        sizes=({"N": 1}, {"N": 4}, {"N": 17}),
    ),
    Hvp(
        "where_piecewise",
        lambda x: gradc.sum(gradc.where(x > 0, x**3, -x * x)),
        lambda x: np.where(x > 0, 3 * x * x, -2 * x),
        (6,),
        sample_x=_away_from_zero,
    ),
    Hvp(
        "max_reduction",
        lambda x: gradc.max(x * x) + gradc.mean(x) ** 2,
        lambda x: 2 * x * (x * x == np.max(x * x)) + 2 * np.mean(x) / x.size,
        (6,),
        sample_x=_distinct_squares,
    ),
    Hvp(
        "normalized_sum",
        lambda x: gradc.sum(x) / gradc.sqrt(gradc.sum(x * x)),
        lambda x: 1 / np.linalg.norm(x) - np.sum(x) * x / np.linalg.norm(x) ** 3,
        (5,),
    ),
    Hvp(
        "matrix_input",
        lambda x, A: gradc.sum(gradc.sigmoid(x @ A) * x.T[0][:, None]),
        lambda x, A: _np_matrix_input_grad(x, A),
        (3, 4),
        (4, 2),
    ),
]


def _np_matrix_input_grad(x, A):
    # f = sum_{i,j} sigmoid((xA)_ij) * x_i0
    s = sigmoid(x @ A)
    g = (s * (1 - s) * x[:, :1]) @ A.T
    g[:, 0] += np.sum(s, axis=1)
    return g


def _hvp_loss(h: Hvp):
    if h.a_shape is None:
        return lambda x, v: np.sum(h.grad(x) * v)
    return lambda x, v, A: np.sum(h.grad(x, A) * v)


def _hvp_case(h: Hvp) -> Case:
    shapes = [h.x_shape, h.x_shape] + ([h.a_shape] if h.a_shape else [])
    return Case(f"hvp_{h.name}", _hvp_factory(h), _hvp_loss(h), shapes, h.sizes)


CASES = [
    Case("tanh_penalty", tanh_penalty, np_tanh_penalty, [("N", 3), (3,)], ({"N": 1}, {"N": 3}, {"N": 17})),
    Case("logistic_penalty", logistic_penalty, np_logistic_penalty, [(5, 3), (3,), (5,)]),
    Case("critic_penalty", critic_penalty, np_critic_penalty, [("N", 3), (3, 4), (4,)], ({"N": 1}, {"N": 3}, {"N": 17})),
    Case("value_and_grad_inside", value_and_grad_inside, np_value_and_grad_inside, [(4,), (3, 4)]),
    Case("argnums_tuple", argnums_tuple, np_argnums_tuple, [(3, 2), (2,)]),
    Case("third_order_scalar", third_order_scalar, np_third_order_scalar, [()]),
    Case("third_order_vector", third_order_vector, np_third_order_vector, [(5,), (5,)], low=-2, high=2),
    *(_hvp_case(h) for h in HVPS),
]
HVP_BY_NAME = {f"hvp_{h.name}": h for h in HVPS}

# float64 kernels get gradc's default (-O3) flags; float32 ones -O1, which compiles in about
# half the time.  The two differ only in C types and math-function suffixes.
CFLAGS = {"f64": None, "f32": ("-O1", "-std=c99")}

_COMPILED = {}


def compiled(case: Case, dtype: str):
    key = (case.name, dtype)
    if key not in _COMPILED:
        fn = case.factory(getattr(gradc, dtype))
        fn.__name__ = fn.__qualname__ = f"{case.name}_{dtype}"
        _COMPILED[key] = gradc.compile(gradc.kernel(fn), cflags=CFLAGS[dtype])
    return _COMPILED[key]


# ----------------------------------------------------------------------------- checking
def numeric_grad(f, xs, i, h=FD_STEP):
    g = np.zeros_like(xs[i])
    for idx in np.ndindex(xs[i].shape):
        plus, minus = list(xs), list(xs)
        plus[i], minus[i] = xs[i].copy(), xs[i].copy()
        plus[i][idx] += h
        minus[i][idx] -= h
        g[idx] = (f(*plus) - f(*minus)) / (2 * h)
    return g


def assert_close(actual, expected, tol, what):
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: {actual}"
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=tol, atol=tol * scale, err_msg=what)


def inputs_for(case: Case, dims: dict, dtype: str):
    rng = np.random.default_rng(zlib.crc32(f"{case.name}/{sorted(dims.items())}".encode()))
    shapes = case.concrete(dims)
    xs = [rng.uniform(case.low, case.high, s) for s in shapes]
    h = HVP_BY_NAME.get(case.name)
    if h is not None and h.sample_x is not None:
        xs[0] = h.sample_x(rng, shapes[0])
    xs = [np.asarray(x, dtype=NP[dtype]) for x in xs]
    return xs, [x.astype(np.float64) for x in xs]


def _dims_id(dims):
    return "".join(f"-{k}{v}" for k, v in dims.items())


PARAMS = [pytest.param(c, dims, id=f"{c.name}{_dims_id(dims)}") for c in CASES for dims in c.sizes]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,dims", PARAMS)
def test_outer_gradient_matches_finite_differences(case, dims, dtype):
    k = compiled(case, dtype)
    xs, xs64 = inputs_for(case, dims, dtype)
    want = case.loss(*xs64)
    value, grads = k.value_and_grad(*xs)
    assert np.asarray(value).dtype == NP[dtype]
    assert_close(value, want, VALUE_TOL[dtype], "value")
    assert_close(k(*xs), want, VALUE_TOL[dtype], "forward")
    assert len(grads) == len(xs)
    for i, g in enumerate(grads):
        assert np.asarray(g).dtype == NP[dtype]
        assert_close(g, numeric_grad(case.loss, xs64, i), GRAD_TOL[dtype], f"d loss / d parameter {i}")


HVP_PARAMS = [pytest.param(_hvp_case(h), dims, id=f"{h.name}{_dims_id(dims)}") for h in HVPS for dims in h.sizes]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,dims", HVP_PARAMS)
def test_hvp_matches_differences_of_the_gradient(case, dims, dtype):
    """d/dx sum(grad(f)(x) * v) is H v = (grad f(x + h v) - grad f(x - h v)) / 2h; d/dv is grad f(x)."""
    h = HVP_BY_NAME[case.name]
    k = compiled(case, dtype)
    xs, xs64 = inputs_for(case, dims, dtype)
    x, v, *rest = xs64
    value, (dx, dv, *_) = k.value_and_grad(*xs)
    grad_f = h.grad(x, *rest)
    step = FD_STEP
    hv = (h.grad(x + step * v, *rest) - h.grad(x - step * v, *rest)) / (2 * step)
    assert_close(value, np.sum(grad_f * v), VALUE_TOL[dtype], "grad f . v")
    assert_close(dv, grad_f, VALUE_TOL[dtype], "grad f")
    assert_close(dx, hv, GRAD_TOL[dtype], "H v")


def test_quadratic_hvp_is_exact():
    """For f = x.B.x the Hessian is B + B^T exactly, so H v needs no finite differences."""
    case = _hvp_case(HVP_BY_NAME["hvp_quadratic"])
    k = compiled(case, "f64")
    rng = np.random.default_rng(7)
    x, v, B = rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal((5, 5))
    _, (dx, dv, dB) = k.value_and_grad(x, v, B)
    assert_close(dx, (B + B.T) @ v, 1e-12, "H v")
    assert_close(dv, (B + B.T) @ x, 1e-12, "grad f")
    # d/dB of x.(B + B^T).v is the sum of the outer products x v^T and v x^T.
    assert_close(dB, np.outer(x, v) + np.outer(v, x), 1e-12, "d/dB")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), which=st.sampled_from(["hvp_logsumexp", "hvp_softplus_cubic", "hvp_normalized_sum"]))
def test_hessian_is_symmetric(seed, which):
    """u . (H v) = v . (H u): the compiled second derivative is a symmetric bilinear form."""
    h = HVP_BY_NAME[which]
    k = compiled(_hvp_case(h), "f64")
    rng = np.random.default_rng(seed)
    x, u, v = (rng.uniform(-1, 1, h.x_shape) for _ in range(3))
    rest = [rng.uniform(-1, 1, h.a_shape)] if h.a_shape else []
    hv = k.value_and_grad(x, v, *rest)[1][0]
    hu = k.value_and_grad(x, u, *rest)[1][0]
    assert np.isclose(u @ hv, v @ hu, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stop_gradient_inside_inner_gradient(dtype):
    case = Case("stop_gradient_inside", stop_gradient_inside, np_stop_gradient_inside, [(4,)])
    k = compiled(case, dtype)
    x = np.array([-1.5, -0.5, 0.25, 2.0])
    value, (dx,) = k.value_and_grad(x.astype(NP[dtype]))
    assert_close(value, np.sum(x**3), VALUE_TOL[dtype], "value")
    assert_close(dx, x * x, VALUE_TOL[dtype], "gradient")
