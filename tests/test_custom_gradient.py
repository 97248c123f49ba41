"""``gradc.custom_gradient``: a DSL function that supplies its own gradient (TensorFlow's semantics).

The decorated function returns ``(value, grad_fn)``; ``grad_fn(upstream)`` returns the
gradient for each argument.  These tests check that the user's rule — not the derivative of
the value — is what reverse mode uses, that it composes with broadcasting, matmul and a
second differentiation, that forward mode differentiates the value, and that a malformed
rule is reported by name.  Every kernel is compiled once per module (``compiled``).
"""

import numpy as np
import pytest

import gradc

NP = {"f32": np.float32, "f64": np.float64}
TOL = {"f64": 1e-10, "f32": 1e-5}
FD_TOL = {"f64": 1e-7, "f32": 2e-3}
FD_STEP = 1e-6


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0, x)


# ----------------------------------------------------------------------------- custom gradients
@gradc.custom_gradient
def inv_exp(x):
    """The tutorial's example: 1/exp(x), whose tape derivative -exp(x)/exp(x)**2 is NaN at x = 100."""

    def grad_fn(upstream):
        return upstream * -gradc.exp(-x)

    return 1 / gradc.exp(x), grad_fn


@gradc.custom_gradient
def norm(x):
    """The Euclidean norm, with gradient 0 at the zero vector (where x / |x| is 0/0)."""
    n = gradc.sqrt(gradc.sum(x * x))

    def grad_fn(upstream):
        return upstream * gradc.where(n > 0, x / n, 0)

    return n, grad_fn


@gradc.custom_gradient
def row_norms(x):
    """The norm of every row of a [N, D] matrix, 0-gradient for zero rows."""
    n = gradc.sqrt(gradc.sum(x * x, axis=1))

    def grad_fn(upstream):
        return upstream[:, None] * gradc.where(n[:, None] > 0, x / n[:, None], 0)

    return n, grad_fn


@gradc.custom_gradient
def safe_sqrt(x):
    """sqrt, with gradient 0 at 0 instead of Inf."""
    s = gradc.sqrt(x)

    def grad_fn(upstream):
        return upstream * gradc.where(x > 0, 0.5 / s, 0)

    return s, grad_fn


@gradc.custom_gradient
def scale(x, s):
    """s * x with its true gradients: one per argument, the scalar's summed over x."""

    def grad_fn(upstream):
        return upstream * s, gradc.sum(upstream * x)

    return s * x, grad_fn


@gradc.custom_gradient
def gate(a, b):
    """a * b, but no gradient reaches b through it (None)."""

    def grad_fn(upstream):
        return [upstream * b, None]

    return a * b, grad_fn


@gradc.custom_gradient
def smooth_relu(x):
    """softplus with its true derivative, sigmoid, written by hand."""

    def grad_fn(upstream):
        return upstream * gradc.sigmoid(x)

    return gradc.softplus(x), grad_fn


@gradc.custom_gradient
def sign_ste(x):
    """Quantize to ±1; the straight-through estimator passes the gradient where |x| <= 1."""

    def grad_fn(upstream):
        return gradc.where(gradc.abs(x) <= 1, upstream, 0)

    return gradc.where(x >= 0, 1.0, -1.0), grad_fn


@gradc.custom_gradient
def cube_gradient(x):
    """sin(x) whose declared gradient is that of x**3: a second derivative must follow 3x**2."""

    def grad_fn(upstream):
        return upstream * 3 * x**2

    return gradc.sin(x), grad_fn


# ----------------------------------------------------------------------------- kernels (factories)
def tutorial(t):
    def tutorial(x: t[3]):
        return gradc.sum(inv_exp(x))

    return tutorial


def norm_loss(t):
    def norm_loss(x: t[3]):
        return norm(x)

    return norm_loss


def row_norm_loss(t):
    def row_norm_loss(X: t["N", 3], w: t["N"]):
        return gradc.sum(row_norms(X) * w)

    return row_norm_loss


def sqrt_loss(t):
    def sqrt_loss(x: t[4]):
        return gradc.sum(safe_sqrt(x))

    return sqrt_loss


def two_args(t):
    def two_args(x: t["N", 3], s: t[()], a: t[3], b: t[3]):
        return gradc.sum(scale(x, s) * a) + gradc.sum(gate(a, b)) + gradc.sum(b * b) + gradc.sum(scale(a, 2.0))

    return two_args


def mlp(t):
    def mlp(X: t["N", 3], W1: t[3, 4], b1: t[4], w2: t[4]):
        h = smooth_relu(X @ W1 + b1)
        return gradc.mean(smooth_relu(h @ w2))

    return mlp


def np_mlp(X, W1, b1, w2):
    h = softplus(X @ W1 + b1)
    return np.mean(softplus(h @ w2))


def ste_loss(t):
    def ste_loss(X: t[4, 3], W: t[3, 2], w: t[2]):
        return gradc.sum(sign_ste(X @ W) * w)

    return ste_loss


def cube_loss(t):
    def cube_loss(x: t[4]):
        return gradc.sum(cube_gradient(x))

    return cube_loss


def softplus_loss(t):
    def softplus_loss(x: t[3], A: t[5, 3]):
        return gradc.sum(smooth_relu(A @ x))

    return softplus_loss


def softplus_hvp(t):
    def softplus_hvp(x: t[3], A: t[5, 3], v: t[3]):
        g = gradc.grad(lambda z: gradc.sum(smooth_relu(A @ z)))(x)
        return gradc.sum(g * v)

    return softplus_hvp


def cube_second(t):
    def cube_second(x: t[4]):
        return gradc.sum(gradc.grad(lambda z: gradc.sum(cube_gradient(z)))(x))

    return cube_second


def sqrt_hvp(t):
    def sqrt_hvp(x: t[4], v: t[4]):
        return gradc.sum(gradc.grad(lambda z: gradc.sum(safe_sqrt(z)))(x) * v)

    return sqrt_hvp


def norm_grad(t):
    def norm_grad(x: t[3]):
        return gradc.grad(norm)(x)

    return norm_grad


_COMPILED = {}


def compiled(factory, dtype, wrt=None, stable=True):
    key = (factory.__name__, dtype, tuple(wrt) if isinstance(wrt, list) else wrt, stable)
    if key not in _COMPILED:
        fn = factory(getattr(gradc, dtype))
        fn.__name__ = fn.__qualname__ = f"{factory.__name__}_{dtype}{'' if stable else '_unstable'}"
        _COMPILED[key] = gradc.compile(gradc.kernel(fn), wrt=wrt, stable=stable)
    return _COMPILED[key]


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
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: {actual}"
    scale_ = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale_, err_msg=what)


# ----------------------------------------------------------------------------- the tutorial
@pytest.mark.parametrize("stable", [True, False], ids=["stable", "unstable"])
@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_tutorial_one_over_exp(dtype, stable):
    """Value exp(-x) and gradient -exp(-x) at 0, 10 and 100, finite in float32 too, with or
    without the stability rewrites (the rule does not depend on them)."""
    k = compiled(tutorial, dtype, stable=stable)
    x = np.array([0.0, 10.0, 100.0], dtype=NP[dtype])
    value, (dx,) = k.value_and_grad(x)
    want = np.exp(-x.astype(np.float64))
    assert np.asarray(value).dtype == dx.dtype == NP[dtype]
    assert np.all(np.isfinite(dx))
    # exp(-100) is subnormal in float32 (3.78e-44): allow a few subnormal steps there
    atol = 1e-44 if dtype == "f32" else 0
    np.testing.assert_allclose(value, want.sum(), rtol=TOL[dtype])
    np.testing.assert_allclose(dx, -want, rtol=TOL[dtype], atol=atol)
    assert dx[0] == -1 and dx[2] < 0


# ----------------------------------------------------------------------------- undefined derivatives made finite
@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_norm_has_a_zero_gradient_at_the_zero_vector(dtype):
    k = compiled(norm_loss, dtype)
    value, (dx,) = k.value_and_grad(np.zeros(3, dtype=NP[dtype]))
    assert value == 0
    np.testing.assert_array_equal(dx, np.zeros(3))
    value, (dx,) = k.value_and_grad(np.array([3.0, 4.0, 0.0], dtype=NP[dtype]))
    assert_close(value, 5.0, TOL[dtype], "norm")
    assert_close(dx, [0.6, 0.8, 0.0], TOL[dtype], "x / |x|")


@pytest.mark.parametrize("n", [1, 4])
def test_row_norms_with_zero_rows(n):
    """Named rows, some of them zero: their gradient is 0, the others' w_i x_i / |x_i|."""
    k = compiled(row_norm_loss, "f64")
    rng = np.random.default_rng(n)
    X = rng.standard_normal((n, 3))
    X[::2] = 0
    w = rng.standard_normal(n)
    value, (dX, dw) = k.value_and_grad(X, w)
    norms = np.linalg.norm(X, axis=1)
    safe = np.where(norms > 0, norms, 1)
    assert_close(value, norms @ w, TOL["f64"], "value")
    assert_close(dw, norms, TOL["f64"], "d/dw")
    assert_close(dX, np.where(norms[:, None] > 0, w[:, None] * X / safe[:, None], 0), TOL["f64"], "d/dX")


@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_sqrt_has_a_zero_gradient_at_zero(dtype):
    k = compiled(sqrt_loss, dtype)
    x = np.array([0.0, 0.25, 4.0, 0.0], dtype=NP[dtype])
    value, (dx,) = k.value_and_grad(x)
    assert_close(value, 2.5, TOL[dtype], "value")
    np.testing.assert_array_equal(dx, np.array([0.0, 1.0, 0.25, 0.0], dtype=NP[dtype]))


def test_custom_gradient_inside_an_inner_gradient():
    """gradc.grad(norm) inside a kernel runs the rule while tracing: finite at 0."""
    k = compiled(norm_grad, "f64", wrt=[])
    np.testing.assert_array_equal(k(np.zeros(3)), np.zeros(3))
    assert_close(k(np.array([0.0, -3.0, 4.0])), [0.0, -0.6, 0.8], TOL["f64"], "x / |x|")


# ----------------------------------------------------------------------------- several arguments
def test_several_arguments_a_tuple_a_list_none_and_constants():
    """scale returns one gradient per argument (a scalar for s); gate's None stops b's
    gradient through it, so b only gets 2b from sum(b*b); scale(a, 2.0) takes a constant."""
    k = compiled(two_args, "f64")
    rng = np.random.default_rng(0)
    x, a, b = rng.standard_normal((5, 3)), rng.standard_normal(3), rng.standard_normal(3)
    s = np.float64(-0.7)
    value, (dx, ds, da, db) = k.value_and_grad(x, s, a, b)
    assert_close(value, np.sum(s * x * a) + np.sum(a * b) + np.sum(b * b) + np.sum(2 * a), TOL["f64"], "value")
    assert_close(dx, np.broadcast_to(s * a, (5, 3)), TOL["f64"], "d/dx")
    assert np.shape(ds) == ()
    assert_close(ds, np.sum(x * a), TOL["f64"], "d/ds")
    # from scale(x, s) * a (its value, s x, is an ordinary factor), gate's rule, and scale(a, 2.0)
    assert_close(da, np.sum(s * x, axis=0) + b + 2.0, TOL["f64"], "d/da")
    assert_close(db, 2 * b, TOL["f64"], "d/db: no gradient through gate")


# ----------------------------------------------------------------------------- composition
@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("n", [1, 6])
def test_composed_with_broadcasting_and_matmul_and_used_several_times(n, dtype):
    k = compiled(mlp, dtype)
    rng = np.random.default_rng(10 + n)
    xs = [rng.uniform(-1, 1, s) for s in [(n, 3), (3, 4), (4,), (4,)]]
    value, grads = k.value_and_grad(*(x.astype(NP[dtype]) for x in xs))
    assert_close(value, np_mlp(*xs), TOL[dtype], "value")
    for i, g in enumerate(grads):
        assert g.dtype == NP[dtype]
        assert_close(g, numeric_grad(np_mlp, xs, i), FD_TOL[dtype], f"d/d parameter {i}")


# ----------------------------------------------------------------------------- the rule, not the value's derivative
def test_straight_through_estimator_uses_the_rule():
    """The value is piecewise constant (true derivative 0); the rule passes the upstream
    gradient where |XW| <= 1, so dW = X^T (w * [|XW| <= 1]) and dX = (w * [|XW| <= 1]) W^T."""
    k = compiled(ste_loss, "f64")
    rng = np.random.default_rng(4)
    X, W, w = rng.uniform(-1, 1, (4, 3)), rng.uniform(-1, 1, (3, 2)), rng.standard_normal(2)
    Z = X @ W
    Z[0, 0] = 2.5  # outside the estimator's window
    X[0] = np.linalg.lstsq(W.T, Z[0], rcond=None)[0]
    Z = X @ W
    value, (dX, dW, dw) = k.value_and_grad(X, W, w)
    q = np.where(Z >= 0, 1.0, -1.0)
    passed = w * (np.abs(Z) <= 1)
    assert not passed[0, 0] and passed.any()
    assert_close(value, np.sum(q * w), TOL["f64"], "value")
    assert_close(dw, q.sum(axis=0), TOL["f64"], "d/dw")
    assert_close(dW, X.T @ passed, TOL["f64"], "d/dW")
    assert_close(dX, passed @ W.T, TOL["f64"], "d/dX")
    assert np.any(dW != 0)


def test_forward_mode_differentiates_the_value():
    """jvp sees the value: 0 for the piecewise-constant quantizer (where vjp uses the
    rule), -exp(-x) for the tutorial, cos(x) for sin with a declared cube gradient."""
    k = compiled(ste_loss, "f64")
    rng = np.random.default_rng(4)
    X, W, w = rng.uniform(-1, 1, (4, 3)), rng.uniform(-1, 1, (3, 2)), rng.standard_normal(2)
    tX, tW, tw = rng.standard_normal((4, 3)), rng.standard_normal((3, 2)), rng.standard_normal(2)
    value, tangent = k.jvp(X, W, w, (tX, tW, tw))
    q = np.where(X @ W >= 0, 1.0, -1.0)
    assert_close(value, np.sum(q * w), TOL["f64"], "value")
    assert_close(tangent, np.sum(q * tw), TOL["f64"], "tangent: only through w")

    k = compiled(tutorial, "f64")
    x, t = np.array([0.0, 10.0, 100.0]), np.array([1.0, -2.0, 0.5])
    _, tangent = k.jvp(x, (t,))
    assert_close(tangent, np.sum(-np.exp(-x) * t), TOL["f64"], "tutorial tangent")

    k = compiled(cube_loss, "f64")
    x, t = np.array([-1.0, 0.0, 0.5, 2.0]), np.array([1.0, 2.0, -1.0, 0.5])
    _, tangent = k.jvp(x, (t,))
    assert_close(tangent, np.sum(np.cos(x) * t), TOL["f64"], "jvp of the value sin")
    _, (dx,) = k.value_and_grad(x)
    assert_close(dx, 3 * x**2, TOL["f64"], "vjp of the rule 3x^2")


# ----------------------------------------------------------------------------- second differentiation
@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_second_derivative_through_a_custom_gradient_matches_differences_of_the_first(dtype):
    """d/dx sum(grad(f)(x) * v) against (grad f(x + h v) - grad f(x - h v)) / 2h, where grad f
    is the compiled first gradient (which uses the rule); and k.hvp gives the same H v."""
    k2 = compiled(softplus_hvp, dtype)
    k1 = compiled(softplus_loss, "f64")
    kh = compiled(softplus_loss, dtype)
    rng = np.random.default_rng(8)
    x, A, v = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, (5, 3)), rng.standard_normal(3)

    def first(x_):
        return k1.grad(x_, A)[0]

    hv_fd = (first(x + FD_STEP * v) - first(x - FD_STEP * v)) / (2 * FD_STEP)
    value, (dx, dA, dv) = k2.value_and_grad(*(a.astype(NP[dtype]) for a in (x, A, v)))
    assert_close(value, first(x) @ v, TOL[dtype], "grad f . v")
    assert_close(dv, first(x), TOL[dtype], "grad f")
    assert_close(dx, hv_fd, FD_TOL[dtype], "H v")
    s = sigmoid(A @ x)
    assert_close(dx, A.T @ (s * (1 - s) * (A @ v)), TOL[dtype] * 10, "H v, closed form")
    hx, _ = kh.hvp(x.astype(NP[dtype]), A.astype(NP[dtype]), (v.astype(NP[dtype]), np.zeros((5, 3), NP[dtype])))
    assert_close(hx, hv_fd, FD_TOL[dtype], "k.hvp")


def test_second_derivative_differentiates_the_rule_not_the_value():
    """sin(x) declared to have gradient 3x^2: its second derivative is 6x (not -sin x),
    whether by gradc.grad inside a kernel, k.hvp or k.hessian."""
    x = np.array([-1.0, 0.0, 0.5, 2.0])
    k = compiled(cube_second, "f64")
    value, (dx,) = k.value_and_grad(x)
    assert_close(value, np.sum(3 * x**2), TOL["f64"], "sum of the rule")
    assert_close(dx, 6 * x, TOL["f64"], "derivative of the rule")
    k = compiled(cube_loss, "f64")
    v = np.array([1.0, -1.0, 2.0, 0.5])
    (hv,) = k.hvp(x, (v,))
    assert_close(hv, 6 * x * v, TOL["f64"], "H v")
    ((H,),) = k.hessian(x)
    assert_close(H, np.diag(6 * x), TOL["f64"], "Hessian")


def test_second_derivative_of_safe_sqrt_at_zero_is_finite():
    """The rule's where(x > 0, 0.5/sqrt(x), 0) differentiates to a choice, 0 at x = 0, both by
    gradc.grad inside a kernel and by k.hvp (which fuses the gradient before its own pass)."""
    x = np.array([0.0, 0.25, 4.0, 0.0])
    v = np.array([1.0, 1.0, 1.0, -2.0])
    want = np.where(x > 0, -0.25 * np.where(x > 0, x, 1) ** -1.5, 0) * v
    _, (dx, dv) = compiled(sqrt_hvp, "f64").value_and_grad(x, v)
    assert_close(dx, want, TOL["f64"], "gradc.grad inside")
    assert_close(dv, [0.0, 1.0, 0.25, 0.0], TOL["f64"], "first gradient")
    (hv,) = compiled(sqrt_loss, "f64").hvp(x, (v,))
    assert_close(hv, want, TOL["f64"], "k.hvp")


# ----------------------------------------------------------------------------- errors
@gradc.custom_gradient
def too_few(a, b):
    def grad_fn(upstream):
        return upstream * b

    return a * b, grad_fn


@gradc.custom_gradient
def too_many(a):
    def grad_fn(upstream):
        return upstream, upstream

    return a * 2, grad_fn


@gradc.custom_gradient
def wrong_shape(x):
    def grad_fn(upstream):
        return gradc.sum(upstream)

    return gradc.sin(x), grad_fn


@gradc.custom_gradient
def wrong_scalar_shape(x, s):
    def grad_fn(upstream):
        return upstream * s, upstream * x  # s is 0-d: its gradient must be summed

    return s * x, grad_fn


@gradc.custom_gradient
def no_grad_fn(x):
    return gradc.sin(x)


def _bad_kernel(custom, nargs):
    if nargs == 2:

        def bad(x: gradc.f64[3], y: gradc.f64[3]):
            return gradc.sum(custom(x, y))

    elif nargs == "scalar":

        def bad(x: gradc.f64[3], y: gradc.f64[()]):
            return gradc.sum(custom(x, y))

    else:

        def bad(x: gradc.f64[3]):
            return gradc.sum(custom(x))

    bad.__name__ = bad.__qualname__ = f"bad_{custom.__name__}"
    return gradc.kernel(bad)


@pytest.mark.parametrize(
    "custom,nargs,message",
    [
        (too_few, 2, r"custom gradient too_few: grad_fn returned 1 gradient\(s\) for 2 argument\(s\)"),
        (too_many, 1, r"custom gradient too_many: grad_fn returned 2 gradient\(s\) for 1 argument\(s\)"),
        (wrong_shape, 1, r"custom gradient wrong_shape: grad_fn's gradient 0 has shape \(\), but argument 0 has shape \(3,\)"),
        (
            wrong_scalar_shape,
            "scalar",
            r"custom gradient wrong_scalar_shape: grad_fn's gradient 1 has shape \(3,\), but argument 1 has shape \(\)",
        ),
        (no_grad_fn, 1, r"custom gradient no_grad_fn: the function must return \(value, grad_fn\)"),
    ],
    ids=lambda p: p.__name__ if callable(p) else None,
)
def test_malformed_rules_are_shape_errors_naming_the_function(custom, nargs, message):
    with pytest.raises(gradc.ShapeError, match=message) as info:
        gradc.compile(_bad_kernel(custom, nargs))
    assert "test_custom_gradient.py" in str(info.value)


def inner_where(t):
    def inner_where(x: t[4], v: t[4]):
        return gradc.sum(gradc.grad(lambda z: gradc.sum(gradc.where(z > 0, gradc.log(z), 0)))(x) * v)

    return inner_where


def test_inner_gradient_of_a_where_selects_without_a_custom_gradient():
    """What the custom sqrt above does by hand, gradc.grad does for where itself: the inner
    gradient is where(x > 0, 1/x, 0), 0 at x = 0, and so is its own derivative."""
    k = compiled(inner_where, "f64")
    x = np.array([0.0, 0.5, -1.0, 2.0])
    v = np.array([1.0, 2.0, 3.0, -1.0])
    value, (dx, dv) = k.value_and_grad(x, v)
    safe = np.where(x > 0, x, 1)
    assert_close(dv, np.where(x > 0, 1 / safe, 0), TOL["f64"], "inner gradient")
    assert_close(value, np.where(x > 0, 1 / safe, 0) @ v, TOL["f64"], "value")
    assert_close(dx, np.where(x > 0, -v / safe**2, 0), TOL["f64"], "its derivative")
