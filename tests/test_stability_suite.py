"""The stability suite (``benchmarks/stability_cases.py``): gradc against exact references.

Every case is a classic function at an input where tape-based autodiff overflows, cancels
or returns NaN.  Its reference value and gradient come from an independent SymPy formula,
evaluated at 50 significant digits at the input as rounded to the precision under test.

Tolerances, element by element (``stability_cases.close``):

    |got - ref| <= rtol * |ref| + atol
    float32: rtol = 1e-5,  atol = 1.2e-38  (the smallest normal float32)
    float64: rtol = 1e-12, atol = 2.2e-308 (the smallest normal float64)

The absolute floor only admits results that underflow (a float32 gradient of 3.7e-44 is a
subnormal; e**-200 is 0 in float32).  A NaN reference — the gradient of the norm at the
zero vector, which is undefined — must come out NaN.  Each kernel is compiled once per
precision for the whole module.
"""

import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import gradc

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cases = _load("stability_cases")

DTYPES = ("f32", "f64")
BY_NAME = {c.name: c for c in cases.CASES}


@pytest.fixture(scope="module")
def kernel():
    """``kernel(case, dtype)``: the compiled kernel, built once for all cases sharing it."""
    built = {}

    def get(case, dtype):
        key = (cases.kernel_key(case), dtype)
        if key not in built:
            built[key] = gradc.compile(cases.make_kernel(case, dtype))
        return built[key]

    return get


def describe(case, dtype, got, want) -> str:
    return f"{case.name} ({case.text} at x = {case.x}, {dtype}): got {got}, reference {want}"


def test_the_suite_has_at_least_twenty_distinct_cases():
    assert len(cases.CASES) >= 20
    assert len(BY_NAME) == len(cases.CASES)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(BY_NAME))
def test_value_and_gradient_match_the_reference(kernel, name, dtype):
    case = BY_NAME[name]
    value, (grad,) = kernel(case, dtype).value_and_grad(cases.point(case, dtype))
    ref_value, ref_grad = cases.reference(case, dtype)
    want_value = cases.as_float(ref_value)
    want_grad = np.array([cases.as_float(g) for g in ref_grad]).reshape(case.shape)
    assert np.shape(grad) == case.shape
    assert cases.close(value, want_value, dtype).all(), describe(case, dtype, value, want_value)
    assert cases.close(grad, want_grad, dtype).all(), describe(case, dtype, grad, want_grad)


@pytest.mark.parametrize("name", ["norm_at_0", "safe_norm_at_0"])
def test_the_norm_at_zero_is_nan_without_and_zero_with_a_custom_gradient(kernel, name):
    """What gradc gives where the derivative is undefined: NaN (0/0), not a made-up number;
    the custom gradient of ``safe_norm`` chooses the subgradient 0."""
    case = BY_NAME[name]
    value, (grad,) = kernel(case, "f64").value_and_grad(cases.point(case, "f64"))
    assert value == 0
    if name == "norm_at_0":
        assert np.isnan(grad).all()
    else:
        np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("name", ["softplus_by_hand-", "log_cosh_small", "expm1_by_hand", "tanh+"])
def test_references_are_converged(name):
    """50 digits from evalf agree with 80: the reference's own error is far below any tolerance."""
    case = BY_NAME[name]
    value, grads = cases.reference(case, "f64")
    value80, grads80 = cases.reference(case, "f64", digits=80)
    for a, b in zip([value, *grads], [value80, *grads80]):
        assert abs(a - b) <= sp.Float(10) ** -45 * max(abs(b), sp.Float(10) ** -300)


def test_the_reference_is_taken_at_the_input_as_rounded_to_the_precision():
    """The reference is taken at the float32-rounded input for float32: 1e-10 is not a float32."""
    case = BY_NAME["log1p_by_hand"]
    v32, _ = cases.reference(case, "f32")
    v64, _ = cases.reference(case, "f64")
    assert v32 != v64
    assert math.isclose(cases.as_float(v32), float(np.float32(1e-10)), rel_tol=1e-9)


def test_the_table_script_runs_and_counts_the_passes(capsys, monkeypatch):
    # The script puts benchmarks/ on sys.path to import the case table: give it this one.
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "stability_cases", cases)
    script = _load("stability")
    assert script.main(["-k", "softplus_by_hand", "--gradc-only"]) == 0
    out = capsys.readouterr().out
    assert "stability suite: values" in out and "stability suite: gradients" in out
    assert "softplus_by_hand+" in out and "inf ✗" in out  # stable=False overflows in float32
    assert re.search(r"gradc f32\s+2 / 2", out) and re.search(r"gradc f64\s+2 / 2", out)
    assert re.search(r"stable=False f32\s+1 / 2", out)
