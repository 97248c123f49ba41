"""gradc.optim: SGD with momentum and Adam as generated kernels, against NumPy updates.

The references are written the way torch.optim documents the two algorithms, and several
steps are chained, so that the state (velocity, moments) is checked as well as the update.
"""

import numpy as np
import pytest

import gradc
from gradc import optim


def sgd_reference(param, grad, velocity, lr, momentum):
    velocity = momentum * velocity + grad
    return param - lr * velocity, velocity


def adam_reference(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad**2
    m_hat = m / (1 - beta1**step)
    v_hat = v / (1 - beta2**step)
    return param - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def gradients(rng, shape, steps):
    return [rng.standard_normal(shape) for _ in range(steps)]


@pytest.mark.parametrize("dtype, rtol", [("f32", 2e-5), ("f64", 1e-12)])
def test_sgd_momentum_matches_numpy(dtype, rtol):
    k = gradc.compile(optim.sgd_momentum("N", "M", dtype=dtype))
    assert list(k.meta["entries"]) == ["forward"]  # forward only: an update is not differentiated
    assert [p["name"] for p in k.params] == ["param", "grad", "velocity", "lr"]
    npdt = np.float32 if dtype == "f32" else np.float64
    rng = np.random.default_rng(0)
    param = rng.standard_normal((4, 3)).astype(npdt)
    velocity = np.zeros_like(param)
    ref_param, ref_velocity = param.astype(np.float64), velocity.astype(np.float64)
    for t, g in enumerate(gradients(rng, (4, 3), 5)):
        lr = 0.1 / (1 + t)  # a schedule: the learning rate is an input
        param, velocity = k(param, g.astype(npdt), velocity, np.array(lr, npdt))
        ref_param, ref_velocity = sgd_reference(ref_param, g, ref_velocity, lr, 0.9)
        assert param.dtype == npdt and param.shape == (4, 3)
        np.testing.assert_allclose(param, ref_param, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(velocity, ref_velocity, rtol=rtol, atol=rtol)


def test_sgd_with_every_hyper_parameter_an_input():
    k = gradc.compile(optim.sgd_momentum("P", momentum=None, dtype="f64"))
    assert [p["name"] for p in k.params] == ["param", "grad", "velocity", "lr", "momentum"]
    param, grad, velocity = np.array([1.0, -2.0]), np.array([0.5, 0.25]), np.array([0.1, 0.2])
    new_param, new_velocity = k(param, grad, velocity, 0.5, 0.3)
    np.testing.assert_allclose(new_velocity, 0.3 * velocity + grad, rtol=1e-15)
    np.testing.assert_allclose(new_param, param - 0.5 * (0.3 * velocity + grad), rtol=1e-15)


@pytest.mark.parametrize("dtype, rtol", [("f32", 5e-5), ("f64", 1e-11)])
def test_adam_matches_numpy(dtype, rtol):
    k = gradc.compile(optim.adam("P", dtype=dtype))
    assert list(k.meta["entries"]) == ["forward"]
    assert [p["name"] for p in k.params] == ["param", "grad", "m", "v", "step", "lr"]
    npdt = np.float32 if dtype == "f32" else np.float64
    rng = np.random.default_rng(1)
    param = rng.standard_normal(7).astype(npdt)
    m = np.zeros_like(param)
    v = np.zeros_like(param)
    ref = (param.astype(np.float64), m.astype(np.float64), v.astype(np.float64))
    for step, g in enumerate(gradients(rng, 7, 6), start=1):
        param, m, v = k(param, g.astype(npdt), m, v, np.array(step, npdt), np.array(1e-2, npdt))
        ref = adam_reference(ref[0], g, ref[1], ref[2], step, 1e-2)
        for got, want in zip((param, m, v), ref):
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * 1e-2)


def test_adam_with_constants_and_with_inputs_agree():
    """Hyper-parameters compiled in and the same values passed at run time give the same step."""
    baked = gradc.compile(optim.adam(2, "M", lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6, dtype="f64"))
    passed = gradc.compile(optim.adam(2, "M", lr=None, beta1=None, beta2=None, eps=None, dtype="f64"))
    assert [p["name"] for p in baked.params] == ["param", "grad", "m", "v", "step"]
    assert [p["name"] for p in passed.params] == ["param", "grad", "m", "v", "step", "lr", "beta1", "beta2", "eps"]
    rng = np.random.default_rng(2)
    param, grad, m, v = rng.standard_normal((2, 5)), rng.standard_normal((2, 5)), rng.standard_normal((2, 5)), rng.random((2, 5))
    one = baked(param, grad, m, v, 3.0)
    two = passed(param, grad, m, v, 3.0, 0.05, 0.8, 0.99, 1e-6)
    want = adam_reference(param, grad, m, v, 3, 0.05, 0.8, 0.99, 1e-6)
    for a, b, c in zip(one, two, want):
        np.testing.assert_allclose(a, c, rtol=1e-12)
        np.testing.assert_allclose(b, c, rtol=1e-12)


def test_constants_are_in_the_c_and_outputs_are_named():
    k = gradc.compile(optim.adam("P", lr=0.125))
    source = k.c_source
    assert "0.125" in source and "0.999" in source
    assert "float *restrict param_new" in source and "float *restrict m_new" in source and "float *restrict v_new" in source
    # The comments point at the update's lines in gradc/optim.py, as they would at a user's file.
    assert "[optim.py: line" in source


def test_a_training_step_is_generated_code():
    """Loss gradient, then the optimiser kernel: the loss falls on a least-squares problem."""

    @gradc.kernel(wrt=["w"])
    def squared_error(A: gradc.f64["N", "P"], y: gradc.f64["N"], w: gradc.f64["P"]):
        r = A @ w - y
        return gradc.sum(r * r) / A.shape[0]

    loss = gradc.compile(squared_error)
    step = gradc.compile(optim.sgd_momentum("P", lr=0.05, dtype="f64"))
    rng = np.random.default_rng(3)
    A, w_true = rng.standard_normal((20, 3)), np.array([1.0, -2.0, 0.5])
    y = A @ w_true
    w, velocity = np.zeros(3), np.zeros(3)
    first = float(loss(A, y, w))
    for _ in range(300):
        _, (g,) = loss.value_and_grad(A, y, w)
        w, velocity = step(w, g, velocity)
    assert float(loss(A, y, w)) < 1e-6 * first
    np.testing.assert_allclose(w, w_true, atol=1e-3)


def test_bad_arguments():
    with pytest.raises(TypeError, match="lr must be a finite number"):
        optim.adam("P", lr="fast")
    with pytest.raises(TypeError, match="momentum must be a finite number"):
        optim.sgd_momentum("P", momentum=float("nan"))
    with pytest.raises(ValueError, match="dtype"):
        optim.adam("P", dtype="f16")
    with pytest.raises(TypeError, match="dimension"):
        optim.sgd_momentum("P", -1)
