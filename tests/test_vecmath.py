"""The branch-free float32 exp, log, log1p, tanh, sin and cos of templates/vecmath.c.j2.

Float32 kernels call them instead of libm (gradc/printer.py), so every float32 loop that
uses these functions goes through them.  Each is compared, on dense ranges and on the
special values, with NumPy's float64 result; the error is measured in float32 ulps of
that (nearly exact) result, and the documented bound is 2.5 ulp.  sin and cos reduce
every float exactly and evaluate in double: over all 2^31 positive floats (the ``slow``
test) their largest error is 0.5015 ulp, so they are held to 0.51 ulp.
"""

import re

import mpmath
import numpy as np
import pytest
import sympy as sp

import gradc
from gradc import f32, f64
from gradc.printer import VECTOR_MATH, VECTOR_MATH_NEEDS, VECTOR_MATH_ORDER, GradcCPrinter

MAX_ULP = 2.5
BOUND = {"sin": 0.51, "cos": 0.51}  # the others: MAX_ULP
FLT_MAX = np.finfo(np.float32).max
TINIEST = np.float32(2.0**-149)  # the smallest subnormal


@gradc.kernel
def exp_(x: f32["N"]):
    return gradc.exp(x)


@gradc.kernel
def log_(x: f32["N"]):
    return gradc.log(x)


@gradc.kernel
def log1p_(x: f32["N"]):
    return gradc.log1p(x)


@gradc.kernel
def tanh_(x: f32["N"]):
    return gradc.tanh(x)


@gradc.kernel
def sin_(x: f32["N"]):
    return gradc.sin(x)


@gradc.kernel
def cos_(x: f32["N"]):
    return gradc.cos(x)


@gradc.kernel
def no_special_functions(x: f32["N"]):
    return gradc.sqrt(gradc.abs(x)) * x


@gradc.kernel
def exp_log_sin_cos_f64(x: f64["N"]):
    return gradc.exp(x) + gradc.log(x) + gradc.sin(x) * gradc.cos(x)


KERNELS = {"exp": exp_, "log": log_, "log1p": log1p_, "tanh": tanh_, "sin": sin_, "cos": cos_}
NUMPY = {"exp": np.exp, "log": np.log, "log1p": np.log1p, "tanh": np.tanh, "sin": np.sin, "cos": np.cos}


@pytest.fixture(scope="module")
def compiled():
    return {name: gradc.compile(k) for name, k in KERNELS.items()}


# ----------------------------------------------------------------------------- helpers
def ulp_error(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in units of the float32 ulp at ``exact`` (0 where both are the same Inf or NaN)."""
    with np.errstate(all="ignore"):
        rounded = exact.astype(np.float32)
        _, e = np.frexp(exact)
        ulp = np.ldexp(1.0, np.maximum(e - 1, -126) - 23)
        err = np.abs(got.astype(np.float64) - exact) / ulp
    # an exact result past FLT_MAX that rounds to Inf is matched by Inf
    err = np.where(np.isinf(got) & (got == rounded), 0.0, err)
    nan_got, nan_exact = np.isnan(got), np.isnan(exact)
    return np.where(nan_got | nan_exact, np.where(nan_got == nan_exact, 0.0, np.inf), err)


def assert_within_ulps(name: str, x: np.ndarray, got: np.ndarray, exact: np.ndarray, bound: float | None = None):
    bound = BOUND.get(name, MAX_ULP) if bound is None else bound
    err = ulp_error(got, exact)
    worst = int(np.argmax(err))
    assert err[worst] <= bound, f"{name}({x[worst]!r}) = {got[worst]!r}, exact {exact[worst]!r}: {err[worst]:.3f} ulp"


def exact(name: str, x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return NUMPY[name](x.astype(np.float64))


def every_float(lo: float, hi: float) -> np.ndarray:
    """Every float32 from lo to hi (both of one sign), in order."""
    if hi <= 0:
        return -every_float(-hi, -lo)[::-1]
    a, b = np.array([lo, hi], np.float32).view(np.int32).astype(np.int64)
    return np.arange(a, b + 1).astype(np.uint32).view(np.float32)


def random_bits(rng, lo_bits: int, hi_bits: int, n: int) -> np.ndarray:
    """Floats with uniformly random bit patterns: every binade of [lo, hi) equally often."""
    return rng.integers(lo_bits, hi_bits, n, dtype=np.int64).astype(np.uint32).view(np.float32)


def tiny(n: int) -> np.ndarray:
    t = np.logspace(-45, -3, n).astype(np.float32)
    return np.concatenate([t, -t])


def near_multiples_of_half_pi(multiples: np.ndarray, ulps: int) -> np.ndarray:
    """The floats within ``ulps`` of k pi/2 for each k: where the argument reduction cancels most."""
    centre = (multiples * (np.pi / 2)).astype(np.float32).view(np.int32).astype(np.int64)
    bits = (centre[:, None] + np.arange(-ulps, ulps + 1)).ravel()
    return bits.astype(np.uint32).view(np.float32)


rng = np.random.default_rng(0)
POSITIVE = random_bits(rng, 1, 0x7F800000, 10**6)  # subnormals to FLT_MAX
BELOW_ONE = random_bits(rng, 1, 0x3F800000, 3 * 10**5)  # (0, 1)
# The floats above 1 nearest a multiple of pi/2 (|x 2/pi - n| from 2^-29.9), found by a sweep of all floats.
HARDEST_REDUCTIONS = np.array(
    [float.fromhex(h) for h in ("0x1.f37c8ap+95", "0x1.47d0fep+34", "0x1.f37c8ap+96", "0x1.47d0fep+35", "0x1.f9cbe2p+7")],
    np.float32,
)

DENSE = {
    "exp": {
        "whole range": np.linspace(-104, 89, 10**6, dtype=np.float32),
        "overflow threshold 88.72": every_float(88.70, 88.74),
        "underflow threshold -103.97": every_float(-104.0, -103.9),
        "subnormal results": np.linspace(-103.97, -87.3, 2 * 10**5, dtype=np.float32),
        "near 0": tiny(10**5),
        "[-1, 1]": np.linspace(-1, 1, 2 * 10**5, dtype=np.float32),
    },
    "log": {
        "all positive floats": POSITIVE,
        "subnormal arguments": random_bits(rng, 1, 0x00800000, 10**5),
        "near 1": every_float(0.99, 1.01),
        "huge": every_float(3.0e38, 3.4028235e38)[::20],
        "[0.001, 100]": np.linspace(1e-3, 100, 10**6, dtype=np.float32),
    },
    "log1p": {
        "all positive floats": POSITIVE,
        "(-1, 0)": -BELOW_ONE,
        "near -1": every_float(-1.0, -0.99)[1:],
        "tiny": tiny(10**5),
        "[-0.3, 0.5]": np.linspace(-0.3, 0.5, 10**6, dtype=np.float32),
        "huge": every_float(3.0e38, 3.4028235e38)[::20],
    },
    "tanh": {
        "[-10, 10]": np.linspace(-10, 10, 10**6, dtype=np.float32),
        "|x| around 0.625 (the switch)": np.concatenate([every_float(0.6, 0.65), every_float(-0.65, -0.6)]),
        "tiny": tiny(10**5),
        "all floats": np.concatenate([POSITIVE, -POSITIVE]),
    },
}
SIN_COS_REGIONS = {
    # 8 10^6 floats with every exponent equally often; over 10^7 with the regions below
    "all positive floats": random_bits(rng, 0, 0x7F800000, 4 * 10**6),
    "all negative floats": -random_bits(rng, 0, 0x7F800000, 4 * 10**6),
    "[-10, 10]": np.linspace(-10, 10, 10**6, dtype=np.float32),
    "near k pi/2, k < 2^16": near_multiples_of_half_pi(np.arange(1, 2**16), 4),
    "near k pi/2, k to 2^40": near_multiples_of_half_pi(np.unique(np.geomspace(2**16, 2**40, 3000).round()), 64),
    "hardest reductions": np.concatenate([HARDEST_REDUCTIONS, -HARDEST_REDUCTIONS]),
    "tiny": tiny(10**5),
    "huge": np.concatenate([every_float(3.0e38, FLT_MAX)[::20], random_bits(rng, 0x7E000000, 0x7F800000, 10**5)]),
}
DENSE["sin"] = DENSE["cos"] = SIN_COS_REGIONS


# ----------------------------------------------------------------------------- the C
@pytest.mark.parametrize("name", list(KERNELS))
def test_float32_kernels_call_the_helpers_and_define_only_what_they_call(compiled, name):
    src = compiled[name].c_source
    helper = VECTOR_MATH[name]
    body = src[src.index("_forward(") :]
    assert f"{helper}(" in body, f"{name} kernel does not call {helper}"
    assert not re.search(rf"\b{name}f\(", body), f"{name} kernel calls libm's {name}f"
    for h in VECTOR_MATH_ORDER:
        definitions = len(re.findall(rf"static inline \w+ {h}\(", src))
        calls = len(re.findall(rf"\b{h}\(", src)) - definitions
        assert definitions <= 1, h
        assert (definitions == 1) == (calls > 0), f"{h}: defined {definitions}, called {calls} times"


def test_expected_helper_sets(compiled):
    defined = {
        name: set(re.findall(r"static inline \w+ (gradc_\w+)\(", c.c_source)) for name, c in compiled.items()
    }
    assert defined["exp"] == {"gradc_float_of", "gradc_expf"}
    assert defined["log"] == {"gradc_bits_of", "gradc_float_of", "gradc_logf"}
    assert defined["log1p"] == {"gradc_bits_of", "gradc_float_of", "gradc_logf", "gradc_log1pf"}
    assert defined["tanh"] == {"gradc_float_of", "gradc_expf", "gradc_tanhf"}
    # each gradient calls the other function: cos for sin, -sin for cos
    sin_cos = {"gradc_bits_of", "gradc_mod4", "gradc_two_sum", "gradc_two_over_pi_piece", "gradc_quarter_turns"}
    # and both in the forms with the short reduction, for the blocks that allow it
    near = {"gradc_quarter_turns_near", "gradc_sinf_near", "gradc_cosf_near"}
    assert defined["sin"] == defined["cos"] == sin_cos | near | {"gradc_sin_quarter_turns", "gradc_sinf", "gradc_cosf"}


def test_printer_records_what_sin_and_cos_need():
    x = sp.Symbol("x", real=True)
    for fn, helper in ((sp.sin, "gradc_sinf"), (sp.cos, "gradc_cosf")):
        printer = GradcCPrinter("f32")
        assert printer.doprint(fn(x)) == f"{helper}(x)"
        assert printer.helpers == {helper, *VECTOR_MATH_NEEDS[helper]}
        assert GradcCPrinter("f32").doprint(fn(sp.Rational(1, 3))).startswith(f"{fn.__name__}f(")
        p64 = GradcCPrinter("f64")
        assert p64.doprint(fn(x)) == f"{fn.__name__}(x)" and not p64.helpers


def test_no_helpers_without_the_functions_or_in_float64():
    for kernel in (no_special_functions, exp_log_sin_cos_f64):
        src = gradc.compile(kernel, wrt=[]).c_source
        assert "gradc_bits" not in src and not any(re.search(rf"\b{h}\(", src) for h in VECTOR_MATH_ORDER), kernel.name
    src = gradc.compile(exp_log_sin_cos_f64, wrt=[]).c_source
    for libm in ("exp", "log", "sin", "cos"):
        assert re.search(rf"\b{libm}\(", src), libm


# ----------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize(
    "name, region", [(name, region) for name, regions in DENSE.items() for region in regions]
)
def test_dense_ranges_within_2_5_ulp(compiled, name, region):
    x = np.ascontiguousarray(DENSE[name][region])
    got = compiled[name](x)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert_within_ulps(name, x, got, exact(name, x))


@gradc.kernel
def sin_cos_in_lanes(x: f32["N"]):
    # one pass with a sum: a laned nest, whose blocks take the short reduction when they can
    s, c = gradc.sin(x), gradc.cos(x)
    return s, c, gradc.sum(s * c)


@pytest.fixture(scope="module")
def laned():
    k = gradc.compile(sin_cos_in_lanes)
    assert "gradc_sinf_near(" in k.c_source and "gradc_cosf_near(" in k.c_source
    return k


SHORT = {
    "[-10, 10]": SIN_COS_REGIONS["[-10, 10]"],
    "near k pi/2, k < 2^16": SIN_COS_REGIONS["near k pi/2, k < 2^16"],
    "up to the bound 2^19": np.concatenate([every_float(2.0**19 - 0.5, 2.0**19), -every_float(2.0**19 - 0.5, 2.0**19)]),
    "tiny": SIN_COS_REGIONS["tiny"],
}


@pytest.mark.parametrize("region", [*SHORT, *SIN_COS_REGIONS])
def test_sin_and_cos_in_laned_blocks_within_0_51_ulp(laned, region):
    # SHORT runs the short reduction in whole blocks; the regions of every exponent mix large
    # arguments into nearly every block, which then takes the exact one.
    x = np.ascontiguousarray(SHORT.get(region, SIN_COS_REGIONS.get(region)))
    s, c, _ = laned(x)
    assert_within_ulps("sin", x, s, exact("sin", x))
    assert_within_ulps("cos", x, c, exact("cos", x))


def test_one_large_special_or_nan_argument_sends_its_block_to_the_exact_reduction(laned, compiled):
    x = np.linspace(-3, 3, 1000, dtype=np.float32)
    block = slice(256, 512)  # the block of x[300]
    for odd in (np.float32(2.0**19 + 64), np.float32(1e30), np.inf, np.nan):
        y = x.copy()
        y[300] = odd
        s, c, total = laned(y)
        # The same odd value at offset 44 of every block sends every block of the map
        # kernels to the exact reduction: their bits are the exact body's.
        every = x.copy()
        every[44::256] = odd
        np.testing.assert_array_equal(s[block], compiled["sin"](every)[block])
        np.testing.assert_array_equal(c[block], compiled["cos"](every)[block])
        assert_within_ulps("sin", y, s, exact("sin", y))
        assert np.isnan(total) == (not np.isfinite(odd))


@gradc.kernel
def sin_of_expressions(x: f32["N"], v: f32["N"]):
    # arguments that are expressions, not plain locals: each block checks them as computed
    return gradc.sin(x * v), gradc.cos(3 * x), gradc.sin(x[1:] - x[:-1])


def test_arguments_that_are_expressions_take_the_short_reduction_too():
    k = gradc.compile(sin_of_expressions, wrt=[])
    forward = k.c_source[k.c_source.index("int sin_of_expressions_forward(") :]
    forward = forward[: forward.index("return GRADC_OK;")]
    # each argument a local of its own, computed by the same line in the scan and the body
    scans = re.findall(r"int near = 1;\n(.*?)\n\s*if \(near\)", forward, re.S)
    assert [re.findall(r"near &= \(fabsf\((\w+)\) <= 0x1p19f\);", scan) for scan in scans] == [["t0", "t1"], ["t0"]]
    assert "const float t0 = v_n*x_n;" in scans[0] and "const float t1 = 3*x_n;" in scans[0]
    assert "const float t0 = x_i - x_v;" in scans[1]
    assert forward.count("const float t0 = v_n*x_n;") == 3  # the scan and both bodies
    rng = np.random.default_rng(7)
    x = rng.uniform(-100, 100, 1000).astype(np.float32)
    v = rng.uniform(-100, 100, 1000).astype(np.float32)
    v[300] = 1e30  # one product far beyond 2^19: its block takes the exact reduction
    s, c, d = k(x, v)
    assert_within_ulps("sin", x * v, s, exact("sin", x * v))
    assert_within_ulps("cos", 3 * x, c, exact("cos", 3 * x))
    assert_within_ulps("sin", x[1:] - x[:-1], d, exact("sin", x[1:] - x[:-1]))


@gradc.kernel
def sin_in_dot_products(X: f32[4, "K"], W: f32["M", "K"]):
    t = X[:, None, :] * W[None, :, :]
    return gradc.sum(gradc.sin(t) * t, axis=2)


def test_dot_products_keep_the_exact_reduction_and_define_no_unused_helper():
    # Their template has a body of its own: a second body would never be emitted, and clang's
    # -Wunused-function would reject the helpers it needs.
    c_source = gradc.compile(sin_in_dot_products, wrt=[]).c_source
    assert "gradc_sinf(" in c_source and "gradc_sinf_near" not in c_source


def test_sin_is_odd_and_cos_even_bit_for_bit(compiled):
    x = SIN_COS_REGIONS["all positive floats"][: 10**6]
    np.testing.assert_array_equal(compiled["sin"](-x), -compiled["sin"](x))
    np.testing.assert_array_equal(compiled["cos"](-x), compiled["cos"](x))


@pytest.mark.parametrize("name", ["sin", "cos"])
def test_float64_reference_agrees_with_mpmath(name):
    """NumPy's float64 sin and cos, the reference above, are right for huge arguments too."""
    x = np.concatenate([random_bits(np.random.default_rng(1), 0, 0x7F800000, 300), HARDEST_REDUCTIONS, [FLT_MAX]])
    fn = getattr(mpmath, name)
    with mpmath.workprec(300):
        want = np.array([float(fn(mpmath.mpf(float(v)))) for v in x])
    np.testing.assert_allclose(NUMPY[name](x.astype(np.float64)), want, rtol=1e-14, atol=0)


SIN_COS_SPECIAL = [0.0, -0.0, np.inf, -np.inf, np.nan, TINIEST, -TINIEST, 1e-30, -1e-30, np.pi, np.pi / 2, -np.pi]
SIN_COS_SPECIAL += [2.0**24, 2.0**100, FLT_MAX, -FLT_MAX]
SPECIAL = {
    "exp": [0.0, -0.0, np.inf, -np.inf, np.nan, TINIEST, -TINIEST, 88.72283, 88.72284, -103.97207, -103.97209, -1e30, 3.4e38],
    "log": [0.0, -0.0, np.inf, -np.inf, np.nan, TINIEST, -TINIEST, 1.0, -1.0, -2.0, -1e30, 1.1754942e-38, 3.4028235e38],
    "log1p": [0.0, -0.0, np.inf, -np.inf, np.nan, TINIEST, -TINIEST, -1.0, -1.0000001, -2.0, -1e30, 1.0, -0.5, 3.4028235e38],
    "tanh": [0.0, -0.0, np.inf, -np.inf, np.nan, TINIEST, -TINIEST, 0.625, -0.625, 9.0, -9.0, 1e30, -1e30],
    "sin": SIN_COS_SPECIAL,
    "cos": SIN_COS_SPECIAL,
}


@pytest.mark.parametrize("name", list(SPECIAL))
def test_special_values_as_ieee_and_numpy(compiled, name):
    x = np.array(SPECIAL[name], dtype=np.float32)
    got = compiled[name](x)
    with np.errstate(all="ignore"):
        want = NUMPY[name](x)  # NumPy's own float32 result
    for xi, g, w in zip(x, got, want):
        what = f"{name}({xi!r}) = {g!r}, NumPy gives {w!r}"
        assert np.isnan(g) == np.isnan(w), what
        if np.isinf(w):
            assert g == w, what
        if w == 0:
            assert g == 0 and np.signbit(g) == np.signbit(w), what
    assert_within_ulps(name, x, got, exact(name, x))


# ----------------------------------------------------------------------------- gradients
GRADIENT_POINTS = {
    "exp": np.linspace(-103, 88, 10**5, dtype=np.float32),
    "log": POSITIVE[: 10**5],
    "log1p": np.concatenate([-BELOW_ONE[: 5 * 10**4], POSITIVE[: 5 * 10**4]]),
    "tanh": np.linspace(-12, 12, 10**5, dtype=np.float32),
    "sin": np.concatenate([np.linspace(-100, 100, 10**5, dtype=np.float32), POSITIVE[: 10**5]]),
    "cos": np.concatenate([np.linspace(-100, 100, 10**5, dtype=np.float32), -POSITIVE[: 10**5]]),
}


def closed_form(name: str, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    with np.errstate(all="ignore"):
        return {
            "exp": np.exp,
            "log": lambda v: 1 / v,
            "log1p": lambda v: 1 / (1 + v),
            "tanh": lambda v: 1 - np.tanh(v) ** 2,
            "sin": np.cos,
            "cos": lambda v: -np.sin(v),
        }[name](x)


@pytest.mark.parametrize("name", list(GRADIENT_POINTS))
def test_gradients_match_closed_forms(compiled, name):
    x = GRADIENT_POINTS[name]
    ct = np.ones_like(x)
    value, (grad,) = compiled[name].vjp(x, ct)
    assert_within_ulps(name, x, value, exact(name, x))
    want = closed_form(name, x)
    if name == "tanh":
        # 1 - tanh(x)^2 from a float32 tanh: absolute error ~ FLT_EPSILON where tanh(x) ~ ±1
        np.testing.assert_allclose(grad, want, rtol=2e-6, atol=3e-7)
    else:
        assert_within_ulps(f"d{name}", x, grad, want, bound=3.0)


def test_gradient_at_special_points(compiled):
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan], np.float32)
    ones = np.ones_like(x)
    with np.errstate(all="ignore"):
        _, (d_exp,) = compiled["exp"].vjp(x, ones)
        np.testing.assert_array_equal(d_exp, np.exp(x))
        _, (d_tanh,) = compiled["tanh"].vjp(x, ones)
        np.testing.assert_array_equal(d_tanh, [1, 1, 0, 0, np.nan])
        _, (d_log1p,) = compiled["log1p"].vjp(np.array([0, -0.5, 1], np.float32), np.ones(3, np.float32))
        np.testing.assert_array_equal(d_log1p, [1, 2, 0.5])
        _, (d_sin,) = compiled["sin"].vjp(x, ones)
        np.testing.assert_array_equal(d_sin, [1, 1, np.nan, np.nan, np.nan])
        _, (d_cos,) = compiled["cos"].vjp(x, ones)
        np.testing.assert_array_equal(d_cos, [-0.0, 0.0, np.nan, np.nan, np.nan])
        assert np.signbit(d_cos[0]) and not np.signbit(d_cos[1])


# ----------------------------------------------------------------------------- every float
@pytest.mark.slow
@pytest.mark.parametrize("name", ["sin", "cos"])
def test_every_float(compiled, name):
    """All 2^31 - 2^23 positive finite floats, and their negatives by symmetry, bit for bit."""
    step = 2**24
    for start in range(0, 0x7F800000, step):
        x = np.arange(start, min(start + step, 0x7F800000), dtype=np.uint32).view(np.float32)
        got = compiled[name](x)
        assert_within_ulps(name, x, got, exact(name, x))
        np.testing.assert_array_equal(compiled[name](-x), -got if name == "sin" else got)
