"""The benchmark suite's own correctness: its reference gradients and its plumbing.

No timing is asserted anywhere: the numbers depend on the machine and its load.  The quick
tests check the hand-written NumPy gradients (the reference every implementation is held
to) against finite differences; the slow ones compile the gradc kernels and run the
benchmark end to end on a tiny selection.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def wl():
    sys.path.insert(0, str(BENCH))
    import workloads

    yield workloads
    sys.path.remove(str(BENCH))


def central_differences(f, args, which, h=1e-6):
    grad = np.zeros_like(args[which])
    for idx in np.ndindex(args[which].shape):
        plus = [a.copy() for a in args]
        minus = [a.copy() for a in args]
        plus[which][idx] += h
        minus[which][idx] -= h
        grad[idx] = (f(*plus) - f(*minus)) / (2 * h)
    return grad


def test_numpy_reference_gradients_match_finite_differences(wl):
    for w in wl.all_workloads(tiny=True):
        args = [a.astype(np.float64) for a in w.inputs.values()]
        _, grads = w.numpy_vg(*args)
        assert len(grads) == len(w.wrt), w.label
        for i, g in zip(w.wrt_index, grads):
            fd = central_differences(lambda *a: float(w.numpy_vg(*a)[0]), args, i)
            np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-7, err_msg=f"{w.label}: d/d{w.wrt[w.wrt_index.index(i)]}")


def test_full_sizes_are_the_ones_of_issue_3(wl):
    labels = [w.label for w in wl.all_workloads()]
    assert labels == [
        "custom_layer 3x3·3x2",
        "custom_layer 256x64·64x64",
        "custom_layer 2048x512·512x512",
        "mlp batch 1024",
        "elementwise n 1e6",
        "gradient_penalty batch 4096",
    ]
    assert all(a.dtype == np.float32 for w in wl.all_workloads(tiny=True) for a in w.inputs.values())


def test_rel_error_is_normwise_and_catches_shape_mismatches(wl):
    assert wl.rel_error([1.0, np.ones(3)], [1.0, np.ones(3)]) == 0.0
    assert wl.rel_error([2.0], [1.0]) == pytest.approx(1.0)
    assert wl.rel_error([np.ones(3)], [np.ones(4)]) == float("inf")


def test_timing_plan_fills_the_budget_with_batches(wl):
    import timing

    # A no-op takes well under the budget, so calls are batched (how many depends on the
    # machine's load, which a test must not assume).
    plan = timing.calibrate(lambda: None, budget_s=0.01, min_samples=3)
    assert plan.inner >= 1 and plan.samples >= 3
    result = timing.measure({"noop": plan})["noop"]
    assert result.samples == plan.samples and result.calls_per_sample == plan.inner
    assert result.min_s <= result.median_s <= result.max_s


@pytest.mark.slow
def test_gradc_agrees_with_numpy_reference_on_tiny_sizes(wl):
    import gradc

    for w in wl.all_workloads(tiny=True):
        k = gradc.compile(w.kernel, wrt=w.wrt)
        loss, grads = k.value_and_grad(*w.inputs.values())
        ref_loss, ref_grads = wl.reference(w)
        assert wl.rel_error([loss, *grads], [ref_loss, *ref_grads]) < 1e-5, w.label


@pytest.mark.slow
def test_run_end_to_end_writes_json(tmp_path):
    cmd = [sys.executable, str(BENCH / "run.py"), "--quick", "--only", "3x3", "--peers", "numpy", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Median time per call" in out.stdout
    res = json.loads((tmp_path / "latest.json").read_text())
    (w,) = res["workloads"]
    assert w["label"] == "custom_layer 3x3·3x2"
    assert w["impls"]["gradc"]["status"] == "ok" and w["impls"]["numpy"]["status"] == "ok"
    assert w["speedup"]["numpy"] > 0 and w["vg_over_forward"] > 0
    cold = res["compile"]["kernels"][0]["cold"]
    assert cold["compile_s"] > 0 and res["sum_accuracy"]["rel_error"]["gradc"] < 1e-6
