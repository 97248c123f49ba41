"""The seed examples: exact numbers from the tutorials gradc was conceived from.

Each example's kernel is imported from ``examples/`` and checked against closed forms and
float64 finite differences; each script is also run as a user would run it.
"""

import subprocess
import sys

import numpy as np
import pytest

import gradc


def central_differences(f, args, which, h=1e-6):
    """d f / d args[which] by central differences, in float64."""
    args = [np.array(a, dtype=np.float64) for a in args]
    grad = np.zeros_like(args[which])
    for idx in np.ndindex(args[which].shape):
        plus = [a.copy() for a in args]
        minus = [a.copy() for a in args]
        plus[which][idx] += h
        minus[which][idx] -= h
        grad[idx] = (float(f(*plus)) - float(f(*minus))) / (2 * h)
    return grad


@pytest.fixture(scope="module")
def ex(examples_path):
    import computation_graph
    import custom_layer
    import gradient_penalty
    import numerical_instability
    import sigmoid

    class Examples:
        pass

    e = Examples()
    e.computation_graph, e.custom_layer, e.gradient_penalty = computation_graph, custom_layer, gradient_penalty
    e.numerical_instability, e.sigmoid = numerical_instability, sigmoid
    return e


def test_computation_graph(ex):
    k = gradc.compile(ex.computation_graph.computation_graph, wrt=["a", "b"])
    e, (de_da, de_db) = k.value_and_grad(2.0, 1.0)
    assert float(e) == 6.0
    assert float(de_da) == 2.0
    assert float(de_db) == 5.0


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_sigmoid(ex, dtype):
    k = gradc.compile(ex.sigmoid.sigmoid, wrt=["x"], dtype=dtype)
    y, (dy,) = k.value_and_grad(2.0)
    exact = 1 / (1 + np.exp(-2.0))
    tol = 1e-6 if dtype == "f32" else 1e-14
    assert y.dtype == np.dtype(np.float32 if dtype == "f32" else np.float64)
    assert abs(float(y) - exact) < tol
    assert abs(float(dy) - exact * (1 - exact)) < tol
    assert round(float(y), 4) == 0.8808
    assert round(float(dy), 5) == 0.10499


@pytest.fixture(scope="module")
def layer(ex):
    X = ex.custom_layer.X_EXAMPLE
    W = ex.custom_layer.example_weights()
    return X, W


def test_custom_layer_closed_form_float32(ex, layer):
    X, W = layer
    k = gradc.compile(ex.custom_layer.custom_layer, wrt=["X", "W"])
    loss, (dX, dW) = k.value_and_grad(X, W)
    assert dX.dtype == np.float32 and dW.dtype == np.float32
    Z = X.astype(np.float64) @ W.astype(np.float64)
    dZ = np.sin(2 * Z)
    np.testing.assert_allclose(loss, np.sum(np.sin(Z) ** 2), rtol=1e-6)
    np.testing.assert_allclose(dW, X.T.astype(np.float64) @ dZ, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dX, dZ @ W.T.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_custom_layer_finite_differences_float64(ex, layer):
    X, W = (a.astype(np.float64) for a in layer)
    k = gradc.compile(ex.custom_layer.custom_layer, wrt=["X", "W"], dtype="f64")
    loss, (dX, dW) = k.value_and_grad(X, W)
    assert dX.dtype == np.float64
    np.testing.assert_allclose(dX, central_differences(k, [X, W], 0), rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(dW, central_differences(k, [X, W], 1), rtol=1e-7, atol=1e-8)
    Z = X @ W
    np.testing.assert_allclose(dW, X.T @ np.sin(2 * Z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dX, np.sin(2 * Z) @ W.T, rtol=1e-12, atol=1e-12)


def test_inverse_exp_gradient_is_finite_at_100_in_float32(ex):
    k = gradc.compile(ex.numerical_instability.inverse_exp, wrt=["x"])
    y, (dy,) = k.value_and_grad(np.float32(100.0))
    assert y.dtype == np.float32
    assert np.isfinite(y) and np.isfinite(dy)
    # exp(-100) = 3.72e-44 is a float32 subnormal, spaced 1.4e-45 apart; the gradient is its negative.
    subnormal_step = float(np.finfo(np.float32).smallest_subnormal)
    np.testing.assert_allclose(float(y), np.exp(-100.0), rtol=0, atol=2 * subnormal_step)
    np.testing.assert_allclose(float(dy), -np.exp(-100.0), rtol=0, atol=2 * subnormal_step)
    assert float(dy) < 0
    for x in (0.0, 10.0):
        y, (dy,) = k.value_and_grad(np.float32(x))
        np.testing.assert_allclose([y, dy], [np.exp(-x), -np.exp(-x)], rtol=1e-6)


def gradient_penalty_closed_form(inp, Wt, b, target):
    """Loss and gradients of MSE + mean((||d sum(output)/d input||_2 - 1)^2), by hand.

    d sum(output)/d input has every row equal to s = the column sums of Wt, so the penalty
    is (||s|| - 1)^2 whatever the input: its gradient reaches Wt only.
    """
    out = inp @ Wt.T + b
    r = out - target
    s = Wt.sum(axis=0)
    norm = np.linalg.norm(s)
    loss = np.mean(r**2) + (norm - 1) ** 2
    d_out = 2 * r / r.size
    d_input = d_out @ Wt
    d_Wt = d_out.T @ inp + 2 * (norm - 1) * np.broadcast_to(s / norm, Wt.shape)
    return loss, d_input, d_Wt


@pytest.mark.parametrize("batch", [3, 5])
def test_gradient_penalty(ex, batch):
    gp = ex.gradient_penalty
    args = [a.astype(np.float64) for a in gp.example_inputs(batch)]
    k64 = gradc.compile(gp.gradient_penalty, wrt=["input", "Wt"], dtype="f64")
    loss, (d_input, d_Wt) = k64.value_and_grad(*args)
    want_loss, want_input, want_Wt = gradient_penalty_closed_form(*args)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(d_input, want_input, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d_Wt, want_Wt, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d_input, central_differences(k64, args, 0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(d_Wt, central_differences(k64, args, 1), rtol=1e-6, atol=1e-8)

    k32 = gradc.compile(gp.gradient_penalty, wrt=["input", "Wt"])
    loss32, (d_input32, d_Wt32) = k32.value_and_grad(*gp.example_inputs(batch))
    np.testing.assert_allclose(loss32, want_loss, rtol=1e-5)
    np.testing.assert_allclose(d_input32, want_input, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_Wt32, want_Wt, rtol=1e-4, atol=1e-5)


EXPECTED_OUTPUT = {
    "computation_graph.py": ["e     = 6", "de/da = 2", "de/db = 5"],
    "sigmoid.py": ["f32: sigmoid(2) = 0.880797   d sigmoid/dx (2) = 0.104994", "f64: sigmoid(2) = 0.880797   d sigmoid/dx (2) = 0.104994"],
    "numerical_instability.py": ["x = 100.0: 1/exp(x) = 3.78351e-44   d/dx = -3.78351e-44   finite: True", "= nan"],
    "custom_layer.py": ["max |dW - closed form| =", "max |dX - closed form| ="],
    "gradient_penalty.py": ["max |gradient - finite difference| (float64) ="],
}


@pytest.mark.parametrize("script", sorted(EXPECTED_OUTPUT))
def test_example_script_runs(examples_path, script):
    run = subprocess.run([sys.executable, str(examples_path / script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    for expected in EXPECTED_OUTPUT[script]:
        assert expected in run.stdout, run.stdout
    if script in ("custom_layer.py", "gradient_penalty.py"):
        errors = [float(line.rsplit("=", 1)[1]) for line in run.stdout.splitlines() if line.startswith("max |")]
        assert errors and max(errors) < 1e-5, run.stdout
