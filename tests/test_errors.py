"""Bad inputs give clear errors before any C runs; odd-but-valid inputs give right numbers.

Each kernel is compiled once for the module.  The ``no_c`` fixture replaces the native
entry points with a stub that fails the test, so an error that is raised only after the
C call (or not at all) cannot pass unnoticed.
"""

import inspect
import warnings

import numpy as np
import pytest

import gradc
from gradc import f32, f64


@gradc.kernel
def layer(X: f32["N", "K"], W: f32["K", 2]):
    Y = gradc.sin(X @ W)
    return gradc.sum(Y * Y)


@gradc.kernel
def elementwise(x: f64["N"], y: f64["N"]):
    return x * y


@gradc.kernel
def pair(x: f64["N"]):
    return x * 2, gradc.sum(x)


@gradc.kernel
def sliced(x: f64["N"]):
    # x[2:] needs N >= 2 and x[-1] needs N >= 1: only the call can tell.
    return gradc.sum(x[2:] * x[:-2]) + x[-1]


@gradc.kernel
def nan_ops(x: f64["N"]):
    return (
        gradc.sum(gradc.sin(x)),
        gradc.max(x),
        gradc.min(x),
        gradc.relu(x),
        gradc.maximum(x, 0.5),
        gradc.minimum(x, 0.5),
        gradc.abs(x),
        gradc.sigmoid(x),
        gradc.softplus(x),
    )


@pytest.fixture(scope="module")
def k_layer():
    return gradc.compile(layer)


@pytest.fixture(scope="module")
def k_elementwise():
    return gradc.compile(elementwise)


@pytest.fixture(scope="module")
def k_pair():
    return gradc.compile(pair)


@pytest.fixture(scope="module")
def k_sliced():
    return gradc.compile(sliced)


@pytest.fixture
def no_c(monkeypatch, k_layer, k_elementwise, k_pair, k_sliced):
    """Make any call into native code fail the test."""

    def reached_c(*args):
        raise AssertionError("a bad argument reached the C kernel")

    for k in (k_layer, k_elementwise, k_pair, k_sliced):
        for entry in list(k._entries):
            monkeypatch.setitem(k._entries, entry, reached_c)


def layer_inputs(n=3, k=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal((k, 2)).astype(np.float32)


def layer_closed_form(X, W):
    Z = X.astype(np.float64) @ W.astype(np.float64)
    return np.sum(np.sin(Z) ** 2), np.sin(2 * Z) @ W.T, X.T @ np.sin(2 * Z)


# ----------------------------------------------------------------------------- shapes
def test_wrong_rank(k_layer, no_c):
    X, W = layer_inputs()
    with pytest.raises(gradc.ShapeError) as err:
        k_layer(X[0], W)
    msg = str(err.value)
    assert "'X'" in msg and "(N, K)" in msg and "(4,)" in msg


def test_wrong_fixed_dimension(k_layer, no_c):
    X, _ = layer_inputs()
    with pytest.raises(gradc.ShapeError) as err:
        k_layer.value_and_grad(X, np.ones((4, 3), np.float32))
    msg = str(err.value)
    assert "'W'" in msg and "(K, 2)" in msg and "(4, 3)" in msg


def test_named_dimension_disagrees_across_parameters(k_layer, no_c):
    X, _ = layer_inputs(k=4)
    with pytest.raises(gradc.ShapeError) as err:
        k_layer.grad(X, np.ones((5, 2), np.float32))
    msg = str(err.value)
    # The parameter, its expected shape, its actual shape, and where K was bound first.
    assert "'W'" in msg and "(K, 2)" in msg and "(5, 2)" in msg and "'X'" in msg
    assert "K = 5" in msg and "K = 4" in msg


def test_named_dimension_disagrees_between_vector_arguments(k_elementwise, no_c):
    with pytest.raises(gradc.ShapeError, match="'y'"):
        k_elementwise(np.ones(3), np.ones(4))


def test_shape_error_is_a_value_error():
    assert issubclass(gradc.ShapeError, ValueError) and issubclass(gradc.ShapeError, gradc.GradcError)


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize(
    "bad",
    [
        np.full((3, 4), "a"),
        np.full((3, 4), None, dtype=object),
        np.ones((3, 4), dtype=np.complex64),
        "not an array",
        [[1.0, 2.0], [3.0]],  # ragged
    ],
    ids=["strings", "objects", "complex", "str", "ragged"],
)
def test_unconvertible_dtype_is_a_type_error(k_layer, no_c, bad):
    _, W = layer_inputs()
    with pytest.raises(TypeError) as err:
        k_layer(bad, W)
    assert isinstance(err.value, gradc.DTypeError)
    assert "'X'" in str(err.value)


def test_float64_into_f32_converts(k_layer):
    X, W = layer_inputs()
    loss64, (dX64, dW64) = k_layer.value_and_grad(X.astype(np.float64), W.astype(np.float64))
    loss32, (dX32, dW32) = k_layer.value_and_grad(X, W)
    assert loss64 == loss32
    assert dX64.dtype == np.float32 and dW64.dtype == np.float32
    np.testing.assert_array_equal(dX64, dX32)
    np.testing.assert_array_equal(dW64, dW32)


def test_lists_and_integers_are_accepted(k_layer):
    X, W = layer_inputs()
    Xi = np.round(X * 3).astype(np.int64)
    assert k_layer(Xi.tolist(), W.tolist()) == k_layer(Xi.astype(np.float32), W)


# ----------------------------------------------------------------------------- arguments
def test_too_many_arguments(k_layer, no_c):
    X, W = layer_inputs()
    with pytest.raises(TypeError, match="takes 2 arguments"):
        k_layer(X, W, W)


def test_missing_argument(k_layer, no_c):
    X, _ = layer_inputs()
    with pytest.raises(TypeError, match="missing.*W"):
        k_layer.value_and_grad(X)


def test_unknown_keyword_argument(k_layer, no_c):
    X, W = layer_inputs()
    with pytest.raises(TypeError, match="unexpected argument 'V'"):
        k_layer(X, V=W)


def test_argument_given_twice(k_layer, no_c):
    X, W = layer_inputs()
    with pytest.raises(TypeError, match="'X' twice"):
        k_layer(X, W, X=X)


def test_keyword_arguments_in_any_order(k_layer):
    X, W = layer_inputs()
    assert k_layer(W=W, X=X) == k_layer(X, W) == k_layer(X, W=W)


# ----------------------------------------------------------------------------- vjp and value_and_grad
def test_vjp_wrong_cotangent_shape(k_elementwise, no_c):
    with pytest.raises(gradc.ShapeError) as err:
        k_elementwise.vjp(np.ones(3), np.ones(3), np.ones(2))
    assert "cotangent" in str(err.value) and "(3,)" in str(err.value) and "(2,)" in str(err.value)


def test_vjp_scalar_output_rejects_vector_cotangent(k_layer, no_c):
    X, W = layer_inputs()
    with pytest.raises(gradc.ShapeError, match="cotangent"):
        k_layer.vjp(X, W, np.ones(3, np.float32))


def test_vjp_without_cotangent(k_elementwise, no_c):
    with pytest.raises(TypeError, match="cotangent"):
        k_elementwise.vjp(np.ones(3), np.ones(3))


def test_vjp_tuple_output_needs_one_cotangent_per_output(k_pair, no_c):
    with pytest.raises(gradc.ShapeError, match="2 cotangent"):
        k_pair.vjp(np.ones(3), (np.ones(3),))
    with pytest.raises(gradc.ShapeError, match=r"cotangent\[1\]"):
        k_pair.vjp(np.ones(3), (np.ones(3), np.ones(3)))


def test_vjp_tuple_output_numbers(k_pair):
    x = np.array([1.0, -2.0, 3.0])
    (twice, total), (dx,) = k_pair.vjp(x, (np.array([1.0, 10.0, 100.0]), 0.5))
    np.testing.assert_array_equal(twice, 2 * x)
    assert total == 2.0
    np.testing.assert_array_equal(dx, [2.5, 20.5, 200.5])


@pytest.mark.parametrize("method", ["value_and_grad", "grad"])
def test_value_and_grad_needs_a_scalar_output(k_elementwise, no_c, method):
    with pytest.raises(gradc.ShapeError, match="vjp"):
        getattr(k_elementwise, method)(np.ones(3), np.ones(3))


def test_value_and_grad_needs_a_single_output(k_pair, no_c):
    with pytest.raises(gradc.ShapeError, match="vjp"):
        k_pair.value_and_grad(np.ones(3))


# ----------------------------------------------------------------------------- slices on named dims
@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("method", ["__call__", "grad", "vjp"])
def test_named_dimension_too_small_for_a_slice(k_sliced, no_c, n, method):
    args = (np.ones(n), 1.0) if method == "vjp" else (np.ones(n),)
    with pytest.raises(gradc.ShapeError) as err:
        getattr(k_sliced, method)(*args)
    assert "N" in str(err.value) and "test_errors.py" in str(err.value)


@pytest.mark.parametrize("n", [2, 3, 6])
def test_named_dimension_large_enough_for_a_slice(k_sliced, n):
    x = np.linspace(-1.0, 2.0, n)
    value, (dx,) = k_sliced.value_and_grad(x)
    assert value == pytest.approx(np.sum(x[2:] * x[:-2]) + x[-1], rel=1e-12)
    expected = np.zeros(n)
    expected[:-2] += x[2:]
    expected[2:] += x[:-2]
    expected[-1] += 1
    np.testing.assert_allclose(dx, expected, rtol=1e-12)


# ----------------------------------------------------------------------------- memory layout
def test_non_contiguous_inputs_match_contiguous_copies(k_layer):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((4, 3)).astype(np.float32).T  # a transposed view, (3, 4)
    W = rng.standard_normal((8, 6)).astype(np.float32)[::2, ::3]  # a strided slice, (4, 2)
    assert not X.flags.c_contiguous and not W.flags.c_contiguous
    Xc, Wc = np.ascontiguousarray(X), np.ascontiguousarray(W)

    loss, (dX, dW) = k_layer.value_and_grad(X, W)
    loss_c, (dX_c, dW_c) = k_layer.value_and_grad(Xc, Wc)
    assert loss == loss_c
    np.testing.assert_array_equal(dX, dX_c)
    np.testing.assert_array_equal(dW, dW_c)
    assert dX.shape == X.shape and dW.shape == W.shape

    ref_loss, ref_dX, ref_dW = layer_closed_form(Xc, Wc)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(dX, ref_dX, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dW, ref_dW, rtol=1e-4, atol=1e-5)


def test_inputs_are_never_modified(k_layer, k_elementwise):
    X, W = layer_inputs()
    X64 = X.astype(np.float64)
    x, y, ct = np.arange(3.0), np.arange(3.0, 6.0), np.ones(3)
    before = [a.copy() for a in (X, W, X64, x, y, ct)]
    k_layer(X, W)
    k_layer.value_and_grad(X64, W)
    _, (dX, dW) = k_layer.vjp(X, W, np.float32(2.0))
    out, (dx, dy) = k_elementwise.vjp(x, y, ct)
    for b, a in zip(before, (X, W, X64, x, y, ct)):
        np.testing.assert_array_equal(a, b)
    # Results are fresh arrays, never views of the arguments.
    for result in (dX, dW, out, dx, dy):
        assert not any(np.shares_memory(result, a) for a in (X, W, X64, x, y, ct))


# ----------------------------------------------------------------------------- NaN
def test_nan_passes_through_as_a_value():
    k = gradc.compile(nan_ops, wrt=[])
    for x in (np.array([np.nan, 1.0, -2.0]), np.array([1.0, np.nan, -2.0]), np.array([1.0, -2.0, np.nan])):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            outs = k(x)
        with np.errstate(all="ignore"):
            expected = (
                np.sum(np.sin(x)),
                np.max(x),
                np.min(x),
                np.maximum(x, 0),
                np.maximum(x, 0.5),
                np.minimum(x, 0.5),
                np.abs(x),
                1 / (1 + np.exp(-x)),
                np.logaddexp(x, 0),
            )
        for got, want in zip(outs, expected):
            np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)


def test_nan_in_gives_nan_loss_and_gradients(k_layer):
    X, W = layer_inputs()
    X[1, 2] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, (dX, dW) = k_layer.value_and_grad(X, W)
    assert np.isnan(loss)
    # Row 1 of Z = X @ W is NaN, so row 1 of dX and every entry of dW are NaN.
    assert np.isnan(dX[1]).all() and np.isfinite(np.delete(dX, 1, axis=0)).all()
    assert np.isnan(dW).all()


# ----------------------------------------------------------------------------- calling a kernel directly
def test_direct_call_runs_forward_and_checks_arguments():
    X, W = layer_inputs()
    ref_loss, _, _ = layer_closed_form(X, W)
    assert float(layer(X, W)) == pytest.approx(ref_loss, rel=1e-5)
    with pytest.raises(gradc.ShapeError, match="'W'"):
        layer(X, np.ones((4, 3), np.float32))


# ----------------------------------------------------------------------------- trace-time errors
def line_of(fn, text: str) -> int:
    """The line number of the first line of ``fn`` that contains ``text``."""
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def branch_on_tensor(x: f64["N"]):
    if gradc.sum(x) > 0:
        return x
    return -x


def loop_on_tensor(x: f64[()]):
    while x < 3:
        x = x + 1
    return x


def unknown_op(x: f64["N"]):
    return gradc.nosuch(x)


def matmul_mismatch(X: f64[2, 3]):
    return gradc.sum(X @ X)


def broadcast_mismatch(x: f64[3], y: f64[4]):
    return gradc.sum(x + y)


@pytest.mark.parametrize(
    "fn, marker, error",
    [
        (branch_on_tensor, "if ", gradc.TraceError),
        (loop_on_tensor, "while ", gradc.TraceError),
        (unknown_op, "gradc.nosuch", AttributeError),
        (matmul_mismatch, "X @ X", gradc.ShapeError),
        (broadcast_mismatch, "x + y", gradc.ShapeError),
    ],
    ids=["if", "while", "unknown-op", "matmul", "broadcast"],
)
def test_trace_errors_name_the_users_file_and_line(fn, marker, error):
    line = line_of(fn, marker)
    with pytest.raises(error) as err:
        gradc.compile(gradc.kernel(fn))
    exc = err.value
    assert isinstance(exc, gradc.GradcError)
    assert (exc.filename, exc.lineno) == (__file__, line)
    assert str(exc).startswith(f"{__file__}:{line}: ")


def test_branching_error_suggests_where():
    with pytest.raises(gradc.TraceError, match="gradc.where"):
        gradc.compile(gradc.kernel(branch_on_tensor))


def test_unknown_op_suggests_close_names():
    def misspelt(x: f64["N"]):
        return gradc.sigmod(x)

    with pytest.raises(AttributeError, match="gradc.sigmoid"):
        gradc.compile(gradc.kernel(misspelt))


def test_unknown_op_names_the_kernels_line():
    def misspelt(x: f64["N"]):
        return gradc.tanhh(x)

    line = inspect.getsourcelines(misspelt)[1] + 1
    with pytest.raises(gradc.UnknownOpError) as err:
        gradc.compile(gradc.kernel(misspelt))
    assert str(err.value) == f"{__file__}:{line}: gradc has no function or attribute 'tanhh' (did you mean gradc.tanh, gradc.tan?)"


IMPORT_ONLY = """
import json, sys
import gradc
probe = hasattr(gradc, "_ipython_canary_method_should_not_exist_")
errors = (gradc.ShapeError.__module__, issubclass(gradc.UnknownOpError, AttributeError))
after_probe = sorted(m for m in sys.modules if m.split(".")[0] in ("sympy", "jinja2"))
ir = gradc.ir.__name__
public = [n for n in dir(gradc) if not n.startswith("_")]
print(json.dumps({"probe": probe, "errors": errors, "after_probe": after_probe, "ir": ir, "public": public}))
"""


def test_import_gradc_loads_no_sympy_until_a_kernel_needs_it():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", IMPORT_ONLY], capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert result["probe"] is False and result["after_probe"] == []
    assert result["errors"] == ["gradc.errors", True]
    assert result["ir"] == "gradc.ir"  # submodules still load as attributes
    assert set(result["public"]) == set(gradc.__all__) and {"kernel", "compile", "f32", "sum"} <= set(result["public"])
