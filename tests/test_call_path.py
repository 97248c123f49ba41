"""The call path: direct calls from C for ready arguments, the Python path for the rest.

A positional call of ``k(...)`` or ``k.value_and_grad(...)`` whose arguments are C-contiguous,
aligned arrays of the kernel's dtype is checked and run by C functions in the extension
(templates/pycall.c.j2); anything else (keywords, conversions, bad shapes) takes the Python
path, which converts the arguments and words the errors.  These tests hold the two paths to
the same results, bit for bit, and to the same guarantees: every argument checked before the
kernel runs, the same error messages, fresh and independent outputs, a workspace per thread.
"""

import sys
import threading

import numpy as np
import pytest

import gradc
from gradc import f32, f64


@gradc.kernel
def layer(X: f32["N", "K"], W: f32["K", 2]):
    Y = gradc.sin(X @ W)
    return gradc.sum(Y * Y)


@gradc.kernel
def affine(X: f64["N", "K"], W: f64["K", "M"], b: f64["M"]):
    return X @ W + b, gradc.sum(X * X)


@gradc.kernel
def sliced(x: f64["N"]):
    return gradc.sum(x[2:] * x[:-2]) + x[-1]


@gradc.kernel
def scaled(x: f64["N"], a: f64[()]):
    return (gradc.sum(a * x * x),)


@pytest.fixture(scope="module")
def k_layer():
    return gradc.compile(layer)


@pytest.fixture(scope="module")
def k_affine():
    return gradc.compile(affine)


@pytest.fixture(scope="module")
def k_sliced():
    return gradc.compile(sliced)


@pytest.fixture(scope="module")
def k_scaled():
    return gradc.compile(scaled, wrt="x")


@pytest.fixture(scope="module")
def k_scaled_both():
    return gradc.compile(scaled, wrt=["x", "a"])


@pytest.fixture
def python_path(monkeypatch):
    """``python_path(k)``: a list that grows by one for each call that takes the Python path."""

    def count(k):
        calls = []
        original = k._arguments

        def counting(*args, **kwargs):
            calls.append(args)
            return original(*args, **kwargs)

        monkeypatch.setattr(k, "_arguments", counting)
        return calls

    return count


def layer_inputs(n=3, k=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal((k, 2)).astype(np.float32)


def layer_closed_form(X, W):
    Z = X.astype(np.float64) @ W.astype(np.float64)
    return np.sum(np.sin(Z) ** 2), np.sin(2 * Z) @ W.T, X.T @ np.sin(2 * Z)


def assert_same(a, b):
    """Bit-for-bit equal results, nested in tuples the same way, of the same types."""
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert type(a) is type(b)
        np.testing.assert_array_equal(a, b)
        assert np.shape(a) == np.shape(b) and np.asarray(a).dtype == np.asarray(b).dtype


def unaligned(a):
    """A copy of ``a`` whose elements start one byte past an aligned address."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    out = np.ndarray(a.shape, a.dtype, buffer=raw, offset=1)
    out[...] = a
    assert not out.flags.aligned and out.flags.c_contiguous
    return out


# ----------------------------------------------------------------------------- the two paths agree
def test_direct_and_python_paths_give_identical_results(k_layer, python_path):
    X, W = layer_inputs(n=5, k=3, seed=1)
    k_layer.value_and_grad(X, W)  # this thread's workspace now fits these shapes
    calls = python_path(k_layer)
    direct = k_layer.value_and_grad(X, W), k_layer(X, W), k_layer.grad(X, W)
    assert calls == [], "positional calls with ready arrays should not take the Python path"
    by_name = k_layer.value_and_grad(W=W, X=X), k_layer(X, W=W), k_layer.grad(X=X, W=W)
    assert len(calls) == 3, "keyword arguments take the Python path"
    for a, b in zip(direct, by_name):
        assert_same(a, b)
    loss, (dX, dW) = direct[0]
    assert isinstance(loss, np.float32) and loss.shape == ()
    ref_loss, ref_dX, ref_dW = layer_closed_form(X, W)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(dX, ref_dX, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dW, ref_dW, rtol=1e-4, atol=1e-5)


def test_tuple_outputs_on_both_paths(k_affine):
    rng = np.random.default_rng(2)
    X, W, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 5)), rng.standard_normal(5)
    python = k_affine(X, W, b=b)
    direct = k_affine(X, W, b)
    assert_same(python, direct)
    Y, total = direct
    np.testing.assert_allclose(Y, X @ W + b, rtol=1e-12)
    assert isinstance(total, np.float64) and total == pytest.approx(np.sum(X * X), rel=1e-12)


def test_zero_d_input_one_tuple_output_and_single_gradient(k_scaled):
    x, a = np.array([1.0, -2.0, 3.0]), np.array(0.5)
    k_scaled(x, a)
    direct_value, direct_grad = k_scaled(x, a), k_scaled.value_and_grad(x, a)
    assert_same(direct_value, k_scaled(x, a=a))
    assert_same(direct_grad, k_scaled.value_and_grad(x, a=a))
    assert_same(direct_grad, k_scaled.value_and_grad(x, 0.5))  # a Python number takes the Python path
    (loss,), dx = direct_grad
    assert isinstance(direct_value, tuple) and isinstance(loss, np.float64)
    assert loss == pytest.approx(0.5 * 14.0) and isinstance(dx, np.ndarray)
    np.testing.assert_allclose(dx, 2 * 0.5 * x, rtol=1e-15)


def test_the_gradient_of_a_0d_parameter_is_a_0d_array(k_scaled_both):
    x, a = np.array([1.0, -2.0, 3.0]), np.array(0.5)
    k_scaled_both.value_and_grad(x, a)
    direct = k_scaled_both.value_and_grad(x, a)
    assert_same(direct, k_scaled_both.value_and_grad(x=x, a=a))
    (loss,), (dx, da) = direct
    assert type(da) is np.ndarray and da.shape == () and da.dtype == np.float64
    assert da == pytest.approx(14.0, rel=1e-15)


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda a: np.asfortranarray(a), id="fortran-order"),
        pytest.param(lambda a: np.repeat(a, 2, axis=1)[:, ::2], id="strided"),
        pytest.param(lambda a: a.astype(np.float64), id="float64"),
        pytest.param(lambda a: a.astype(">f4"), id="big-endian"),
        pytest.param(lambda a: a.tolist(), id="list"),
        pytest.param(lambda a: a.view(type("Sub", (np.ndarray,), {})), id="ndarray-subclass"),
        pytest.param(unaligned, id="unaligned"),
    ],
)
def test_inputs_that_need_conversion_give_the_same_results(k_layer, convert):
    X, W = layer_inputs(n=4, k=3, seed=3)
    expected = k_layer.value_and_grad(X, W)
    Xc, Wc = convert(X), convert(W)
    assert_same(k_layer.value_and_grad(Xc, Wc), expected)
    assert_same(k_layer.value_and_grad(X, Wc), expected)
    assert_same(k_layer(Xc, W), expected[0])


def test_read_only_inputs(k_layer):
    X, W = layer_inputs(seed=4)
    expected = k_layer.value_and_grad(X, W)
    X.flags.writeable = False
    W.flags.writeable = False
    assert_same(k_layer.value_and_grad(X, W), expected)


def test_new_shapes_and_a_growing_workspace_in_one_thread(k_layer):
    for n, k in ((2, 3), (400, 50), (3, 2), (1000, 60), (2, 3)):
        X, W = layer_inputs(n=n, k=k, seed=n)
        loss, (dX, dW) = k_layer.value_and_grad(X, W)
        ref_loss, ref_dX, ref_dW = layer_closed_form(X, W)
        assert float(loss) == pytest.approx(ref_loss, rel=1e-4)
        np.testing.assert_allclose(dX, ref_dX, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(dW, ref_dW, rtol=1e-3, atol=1e-3)
        assert dX.shape == (n, k) and dW.shape == (k, 2)


def test_plans_are_bounded_and_stay_right(k_layer):
    for n in range(1, 150):
        X, W = layer_inputs(n=n, k=2, seed=n)
        assert float(k_layer(X, W=W)) == pytest.approx(layer_closed_form(X, W)[0], rel=1e-5)
    assert len(k_layer._plans) <= 64
    X, W = layer_inputs(n=1, k=2, seed=1)
    assert float(k_layer(X, W)) == pytest.approx(layer_closed_form(X, W)[0], rel=1e-5)


# ----------------------------------------------------------------------------- checks still happen
BAD_SHAPES = [
    pytest.param(lambda X, W: (X, W[:2]), "'W'", id="named-dimension-disagrees"),
    pytest.param(lambda X, W: (X, np.ones((4, 3), np.float32)), "(K, 2)", id="fixed-dimension"),
    pytest.param(lambda X, W: (X[0], W), "'X'", id="rank-too-low"),
    pytest.param(lambda X, W: (X[None], W), "'X'", id="rank-too-high"),
    pytest.param(lambda X, W: (X.T.copy(), W), "'W'", id="transposed"),
]


@pytest.mark.parametrize("bad, name", BAD_SHAPES)
@pytest.mark.parametrize("method", ["__call__", "value_and_grad", "grad"])
def test_wrong_shapes_after_a_right_call_are_rejected_with_the_same_message(k_layer, bad, name, method):
    X, W = layer_inputs(n=3, k=4, seed=5)
    call = getattr(k_layer, method)
    call(X, W)
    call(X, W)
    Xb, Wb = bad(X, W)
    with pytest.raises(gradc.ShapeError) as positional:
        call(Xb, Wb)
    with pytest.raises(gradc.ShapeError) as by_name:
        call(X=Xb, W=Wb)
    assert name in str(positional.value)
    assert str(positional.value) == str(by_name.value)


def test_wrong_shapes_after_a_right_call_fail_every_method(k_layer):
    X, W = layer_inputs(n=3, k=4, seed=6)
    k_layer.value_and_grad(X, W)
    W5 = np.ones((5, 2), np.float32)
    for call in (
        lambda: k_layer(X, W5),
        lambda: k_layer.value_and_grad(X, W5),
        lambda: k_layer.vjp(X, W5, np.float32(1)),
        lambda: k_layer.jvp(X, W5, (X, W5)),
        lambda: k_layer.hvp(X, W5, (X, W5)),
    ):
        with pytest.raises(gradc.ShapeError, match="'W'"):
            call()


@pytest.mark.parametrize("n", [0, 1])
def test_constraints_are_checked_after_a_right_call(k_sliced, n):
    x = np.linspace(-1.0, 2.0, 5)
    k_sliced.value_and_grad(x)
    k_sliced.value_and_grad(x)
    with pytest.raises(gradc.ShapeError, match="N"):
        k_sliced.value_and_grad(np.ones(n))
    with pytest.raises(gradc.ShapeError, match="N"):
        k_sliced(np.ones(n))
    value, grad = k_sliced.value_and_grad(x)
    assert value == pytest.approx(np.sum(x[2:] * x[:-2]) + x[-1], rel=1e-14)


def test_argument_count_and_keywords_are_checked_after_a_right_call(k_layer):
    X, W = layer_inputs(seed=7)
    k_layer(X, W)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        k_layer(X, W, W)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        k_layer.value_and_grad(X, W, W)
    with pytest.raises(TypeError, match="missing"):
        k_layer(X)
    with pytest.raises(TypeError, match="twice"):
        k_layer(X, W, X=X)
    with pytest.raises(TypeError, match="unexpected"):
        k_layer(X, Z=W)


def test_unconvertible_dtype_after_a_right_call(k_layer):
    X, W = layer_inputs(seed=8)
    k_layer(X, W)
    with pytest.raises(TypeError, match="'W'"):
        k_layer(X, W.astype(np.complex64))


def test_errors_come_in_argument_order(k_layer):
    X, W = layer_inputs(seed=8)
    k_layer(X, W)
    with pytest.raises(gradc.ShapeError, match="'X'"):
        k_layer(X[0], W.astype(np.complex64))
    with pytest.raises(TypeError, match="'X'"):
        k_layer(X.astype(np.complex64), W[0])


# ----------------------------------------------------------------------------- outputs
def test_outputs_are_fresh_and_independent(k_layer):
    X, W = layer_inputs(n=3, k=3, seed=10)
    k_layer.value_and_grad(X, W)
    loss, (dX, dW) = k_layer.value_and_grad(X, W)
    loss2, (dX2, dW2) = k_layer.value_and_grad(X, W)
    results = (dX, dW, dX2, dW2)
    for i, a in enumerate(results):
        assert type(a) is np.ndarray and a.dtype == np.float32
        assert a.flags.writeable and a.flags.c_contiguous and a.flags.owndata
        for b in results[i + 1 :]:
            assert not np.shares_memory(a, b)
        assert not np.shares_memory(a, X) and not np.shares_memory(a, W)
    keep_dW, keep_loss = dW.copy(), float(loss)
    dX[...] = 123.0
    np.testing.assert_array_equal(dW, keep_dW)
    again, (dX3, dW3) = k_layer.value_and_grad(X, W)
    assert float(again) == keep_loss == float(loss2)
    np.testing.assert_array_equal(dX3, dX2)
    np.testing.assert_array_equal(dW3, keep_dW)
    assert not np.shares_memory(dX3, dX)


def test_tuple_outputs_are_independent(k_affine):
    rng = np.random.default_rng(11)
    X, W, b = rng.standard_normal((2, 3)), rng.standard_normal((3, 2)), rng.standard_normal(2)
    Y1, _ = k_affine(X, W, b)
    Y2, _ = k_affine(X, W, b)
    assert not np.shares_memory(Y1, Y2)
    Y1[...] = 0
    np.testing.assert_allclose(Y2, X @ W + b, rtol=1e-12)


def test_calls_hold_no_references(k_layer, k_affine):
    """Many calls leave the arguments' reference counts as they were, and each result is
    referenced by its receiver only (a leak in the C code would show in either)."""
    X, W = layer_inputs(seed=12)
    rng = np.random.default_rng(12)
    A, B, b = rng.standard_normal((2, 3)), rng.standard_normal((3, 2)), rng.standard_normal(2)
    before = [sys.getrefcount(a) for a in (X, W, A, B, b)]
    for _ in range(1000):
        loss, grads = k_layer.value_and_grad(X, W)
        value = k_layer(X, W)
        Y, total = k_affine(A, B, b)
    assert [sys.getrefcount(a) for a in (X, W, A, B, b)] == before
    # Each result is held by its name here and by getrefcount's argument, nothing else.
    assert sys.getrefcount(loss) == sys.getrefcount(value) == sys.getrefcount(Y) == sys.getrefcount(total) == 2
    dX, dW = grads
    del grads
    assert sys.getrefcount(dX) == sys.getrefcount(dW) == 2


# ----------------------------------------------------------------------------- threads
def test_threads_calling_one_kernel_at_once_get_correct_results(k_layer):
    shapes = [(2000, 40), (1500, 40), (3, 40), (700, 40)]
    inputs = [layer_inputs(n=n, k=k, seed=i) for i, (n, k) in enumerate(shapes)]
    # Computed one thread at a time, to compare with the concurrent results bit for bit.
    expected = [k_layer.value_and_grad(X, W) for X, W in inputs]
    start = threading.Barrier(len(shapes))
    failures = []

    def work(i):
        X, W = inputs[i]
        start.wait()
        for _ in range(50):
            got = k_layer.value_and_grad(X, W)
            if got[0] != expected[i][0] or not all(np.array_equal(a, b) for a, b in zip(got[1], expected[i][1])):
                failures.append(i)
                break

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(shapes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_a_new_thread_gets_a_workspace_for_shapes_seen_before(k_layer):
    X, W = layer_inputs(n=200, k=30, seed=13)
    expected = k_layer.value_and_grad(X, W)
    got = []
    t = threading.Thread(target=lambda: got.extend([k_layer.value_and_grad(X, W), k_layer.value_and_grad(X, W)]))
    t.start()
    t.join()
    assert_same(got[0], expected)
    assert_same(got[1], expected)


# ----------------------------------------------------------------------------- the exported C
def test_the_exported_c_has_no_python_calls(k_layer):
    """The direct calls are built into the extension only: the C users get stays plain C99."""
    for text in (k_layer.c_source, k_layer.header):
        assert "Python" not in text and "numpy" not in text and "PyObject" not in text


# -- entry points built on first use --------------------------------------------------------------


@gradc.kernel
def quartic(x: f64["N"], A: f64["N", "N"]):
    y = A @ x
    return gradc.sum(y * y * y * y)


def test_entry_points_beyond_value_and_grad_are_built_on_first_use_with_their_workspace():
    """compile() builds forward and value_and_grad; vjp/jvp/hvp come in a second extension on
    first use.  A plan made before it was built must not lend its (smaller) workspace to them."""
    k = gradc.compile(quartic)
    assert set(k._entries) == {"forward", "value_and_grad"}
    rng = np.random.default_rng(5)
    n = 37
    x, A = rng.standard_normal(n), rng.standard_normal((n, n))
    value, (gx, gA) = k.value_and_grad(x, A)  # makes a plan for these shapes
    y = A @ x
    np.testing.assert_allclose(gx, A.T @ (4 * y**3), rtol=1e-12)
    vx, vA = rng.standard_normal(n), rng.standard_normal((n, n))
    hx, hA = k.hvp(x, A, (vx, vA))
    # directional derivative of the gradient: d/dt grad(x + t vx, A + t vA) at t = 0
    dy = vA @ x + A @ vx
    np.testing.assert_allclose(hx, vA.T @ (4 * y**3) + A.T @ (12 * y**2 * dy), rtol=1e-10)
    np.testing.assert_allclose(hA, np.outer(12 * y**2 * dy, x) + np.outer(4 * y**3, vx), rtol=1e-10)
    assert set(k._entries) == {"forward", "value_and_grad", "vjp", "jvp", "hvp"}
    assert k._local.nbytes >= k.workspace_size(N=n)
    _, (cx, _) = k.vjp(x, A, 2.0)
    np.testing.assert_allclose(cx, 2 * gx, rtol=1e-12)
