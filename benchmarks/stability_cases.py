"""The stability suite: classic functions on which tape-based autodiff overflows, cancels or
returns NaN, each with an exact reference.

A :class:`Case` is a small function written once against an op namespace (``G.exp``,
``G.log``, ... — gradc's own functions here, PyTorch's or JAX's in ``stability.py``), the
input where a tape fails, and an independent SymPy formula of the same function.
:func:`reference` evaluates that formula and its SymPy derivative at 50 significant digits
(mpmath underneath) at the input as rounded to the precision under test, so nothing of
gradc's graph, rewrites or C takes part in the reference.

Tolerances (:func:`close`): ``|got - ref| <= RTOL[dtype] * |ref| + ATOL[dtype]`` element by
element, with ``RTOL = 1e-5`` (float32) and ``1e-12`` (float64) and ``ATOL`` the smallest
normal number of the precision (1.2e-38, 2.2e-308), so that a result which underflows to a
subnormal or to 0 matches a tiny reference.  A NaN reference (a gradient that is undefined)
must be NaN.

Used by ``benchmarks/stability.py`` (the table) and ``tests/test_stability_suite.py``.
"""

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import sympy as sp

import gradc

DIGITS = 50
RTOL = {"f32": 1e-5, "f64": 1e-12}
ATOL = {"f32": float(np.finfo(np.float32).tiny), "f64": float(np.finfo(np.float64).tiny)}
NP_DTYPES = {"f32": np.float32, "f64": np.float64}

EPS = 1e-12  # the smoothing constant of x / sqrt(x*x + eps)


@gradc.custom_gradient
def safe_norm(v):
    """The Euclidean norm, with gradient v/|v| away from 0 and 0 (the minimum-norm
    subgradient) at the zero vector, where the derivative of sqrt is infinite."""
    n = gradc.sqrt(gradc.sum(v * v))

    def grad(upstream):
        # The inner where keeps 0/0 out of the branch that the outer one discards.
        return upstream * gradc.where(n > 0, v / gradc.where(n > 0, n, 1.0), 0.0)

    return n, grad


#: The ops the cases use, as gradc spells them.  ``stability.py`` builds the same namespace
#: over PyTorch and JAX.
GRADC_OPS = SimpleNamespace(
    exp=gradc.exp,
    log=gradc.log,
    sqrt=gradc.sqrt,
    sum=gradc.sum,
    where=gradc.where,
    sigmoid=gradc.sigmoid,
    softplus=gradc.softplus,
    tanh=gradc.tanh,
    cosh=gradc.cosh,
    safe_norm=safe_norm,
)


@dataclass(frozen=True)
class Case:
    name: str
    #: ``fn(G, x)``: the function over an op namespace ``G``; ``x`` is a 0-d or 1-D tensor.
    fn: Callable
    #: ``formula(x)``: the same function in SymPy, of a real Symbol or a list of them.
    formula: Callable[..., sp.Expr]
    #: the input: a float (0-d) or a tuple of floats (1-D)
    x: float | tuple[float, ...]
    #: what the function is, for the table
    text: str
    #: what a tape computes here, and why
    why: str

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.x),) if isinstance(self.x, tuple) else ()


# Cases that share a function share its compiled kernel (see kernel_key).
def softplus_by_hand(G, x):
    return G.log(1 + G.exp(x))


def logistic_ratio(G, x):
    return G.exp(x) / (1 + G.exp(x))


def logistic(G, x):
    return 1 / (1 + G.exp(-x))


def logsumexp_by_hand(G, v):
    return G.log(G.sum(G.exp(v)))


def log1mexp(G, x):
    return G.log(1 - G.exp(-x))


def sqrt_of_square(G, x):
    return G.sqrt(x * x)


def tanh(G, x):
    return G.tanh(x)


def sigmoid(G, x):
    return G.sigmoid(x)


def log_cosh(G, x):
    return G.log(G.cosh(x))


def safe_norm_case(G, v):
    return G.safe_norm(v)


def _sym_softplus(x):
    return sp.log(1 + sp.exp(x))


def _sym_logistic(x):
    return 1 / (1 + sp.exp(-x))


def _sym_lse(v):
    return sp.log(sp.Add(*(sp.exp(a) for a in v)))


def _sym_norm(v):
    return sp.sqrt(sp.Add(*(a * a for a in v)))


def _sym_log1mexp(x):
    return sp.log(1 - sp.exp(-x))


def _sym_log_cosh(x):
    return sp.log(sp.cosh(x))


CASES: tuple[Case, ...] = (
    Case("softplus_by_hand+", softplus_by_hand, _sym_softplus, 100.0, "log(1 + exp(x))",
         "exp(100) overflows float32: value inf, gradient inf/inf = NaN"),
    Case("softplus_by_hand-", softplus_by_hand, _sym_softplus, -100.0, "log(1 + exp(x))",
         "1 + exp(-100) rounds to 1: value 0 instead of 3.7e-44"),
    Case("logistic_ratio+", logistic_ratio, _sym_logistic, 100.0, "exp(x) / (1 + exp(x))",
         "inf/inf = NaN in float32; the float64 gradient is 1e-16 or 0 instead of 3.7e-44"),
    Case("logistic_ratio-", logistic_ratio, _sym_logistic, -100.0, "exp(x) / (1 + exp(x))",
         "fine: the control for the sign above"),
    Case("logistic+", logistic, _sym_logistic, 100.0, "1 / (1 + exp(-x))",
         "fine: the control for the sign below"),
    Case("logistic-", logistic, _sym_logistic, -100.0, "1 / (1 + exp(-x))",
         "exp(100) overflows float32: gradient exp(100) / (1 + exp(100))**2 = inf/inf = NaN"),
    Case("log_sigmoid", lambda G, x: G.log(G.sigmoid(x)), lambda x: -_sym_softplus(-x), -100.0, "log(sigmoid(x))",
         "sigmoid(-100) is a float32 subnormal (log gives -99.98) or flushed to 0 (-inf, NaN gradient)"),
    Case("log_logistic", lambda G, x: G.log(1 / (1 + G.exp(-x))), lambda x: sp.log(_sym_logistic(x)), -100.0,
         "log(1 / (1 + exp(-x)))", "1/(1 + inf) = 0 in float32: value -inf, gradient NaN"),
    Case("one_minus_sigmoid", lambda G, x: 1 - G.sigmoid(x), lambda x: 1 - _sym_logistic(x), 100.0, "1 - sigmoid(x)",
         "sigmoid(100) rounds to 1: value 0 instead of 3.7e-44"),
    Case("log_one_minus_sigmoid", lambda G, x: G.log(1 - G.sigmoid(x)), lambda x: sp.log(1 - _sym_logistic(x)), 100.0,
         "log(1 - sigmoid(x))", "binary cross-entropy's log(1 - p) at a confident logit: log(0) = -inf"),
    Case("logsumexp_by_hand+", logsumexp_by_hand, _sym_lse, (1000.0, 1000.0), "log(sum(exp(v)))",
         "exp(1000) overflows: value inf, gradient NaN"),
    Case("logsumexp_by_hand-", logsumexp_by_hand, _sym_lse, (-1000.0, -1000.0), "log(sum(exp(v)))",
         "exp(-1000) underflows: value -inf, gradient 0/0 = NaN"),
    Case("log_softmax", lambda G, v: G.sum(G.log(G.exp(v) / G.sum(G.exp(v)))),
         lambda v: sp.Add(*(a - _sym_lse(v) for a in v)), (1000.0, 0.0, -1000.0), "sum(log(exp(v) / sum(exp(v))))",
         "inf/inf = NaN"),
    Case("softmax", lambda G, v: G.exp(v)[0] / G.sum(G.exp(v)), lambda v: sp.exp(v[0] - _sym_lse(v)),
         (1000.0, 999.0, 0.0), "softmax(v)[0]", "inf/inf = NaN"),
    Case("softmax_cross_entropy", lambda G, v: -G.log(G.exp(v)[2] / G.sum(G.exp(v))),
         lambda v: _sym_lse(v) - v[2], (100.0, 0.0, -100.0), "-log(softmax(v)[2])",
         "float32: exp(100) overflows; log(exp(-100)/inf) = -inf"),
    Case("inverse_exp", lambda G, x: 1 / G.exp(x), lambda x: 1 / sp.exp(x), 100.0, "1 / exp(x)",
         "float32: (-1/u**2) * u with u = exp(100) = inf is 0 * inf = NaN (TensorFlow's NaN)"),
    Case("log_exp", lambda G, x: G.log(G.exp(x)), lambda x: x, 1000.0, "log(exp(x))",
         "exp(1000) overflows: value inf, gradient inf/inf = NaN"),
    Case("gaussian_log_density", lambda G, x: G.log(G.exp(-x * x / 2) / math.sqrt(2 * math.pi)),
         lambda x: -x * x / 2 - sp.log(sp.sqrt(2 * sp.pi)), 100.0, "log(exp(-x*x/2) / sqrt(2 pi))",
         "exp(-5000) underflows to 0: value -inf"),
    Case("log1p_by_hand", lambda G, x: G.log(1 + x), lambda x: sp.log(1 + x), 1e-10, "log(1 + x)",
         "1 + 1e-10 rounds to 1 in float32 (value 0) and loses 8 digits in float64"),
    Case("expm1_by_hand", lambda G, x: G.exp(x) - 1, lambda x: sp.exp(x) - 1, 1e-10, "exp(x) - 1",
         "exp(1e-10) rounds to 1 in float32 (value 0) and loses 8 digits in float64"),
    Case("log1mexp_small", log1mexp, _sym_log1mexp, 1e-10, "log(1 - exp(-x))",
         "1 - exp(-1e-10) is 0 in float32 (value -inf) and keeps 8 digits in float64"),
    Case("log1mexp_large", log1mexp, _sym_log1mexp, 100.0, "log(1 - exp(-x))",
         "1 - exp(-100) rounds to 1: value 0 instead of -3.7e-44"),
    Case("sqrt_of_square", sqrt_of_square, lambda x: sp.sqrt(x * x), -3.0, "sqrt(x*x)",
         "fine: the control for the case below"),
    Case("sqrt_of_square_at_0", sqrt_of_square, lambda x: sp.sqrt(x * x), 0.0, "sqrt(x*x)",
         "gradient 2x / (2 sqrt(x*x)) = 0/0 = NaN; |x| has the subgradient 0 there"),
    Case("smooth_sign", lambda G, x: x / G.sqrt(x * x + EPS), lambda x: x / sp.sqrt(x * x + sp.Rational(EPS)), 1e-7,
         "x / sqrt(x*x + 1e-12)", "fine: a steep but smooth function near 0 (gradient ~1e6)"),
    Case("norm_at_0", lambda G, v: G.sqrt(G.sum(v * v)), _sym_norm, (0.0, 0.0, 0.0), "sqrt(sum(v*v))",
         "the gradient v/|v| is undefined at 0: NaN, in gradc as in a tape (use a custom gradient)"),
    Case("safe_norm_at_0", safe_norm_case, lambda v: sp.Piecewise((_sym_norm(v), _sym_norm(v) > 0), (0, True)),
         (0.0, 0.0, 0.0), "safe_norm(v) (custom gradient)", "a custom gradient gives the subgradient 0"),
    Case("safe_norm", safe_norm_case, _sym_norm, (3.0, 4.0, 0.0), "safe_norm(v) (custom gradient)",
         "fine: the custom gradient is v/|v| away from 0"),
    Case("tanh+", tanh, sp.tanh, 100.0, "tanh(x)",
         "1 - tanh(x)**2 = 0 in float64, instead of 5.5e-87"),
    Case("tanh-", tanh, sp.tanh, -100.0, "tanh(x)",
         "1 - tanh(x)**2 = 0 in float64, instead of 5.5e-87"),
    Case("sigmoid+", sigmoid, _sym_logistic, 100.0, "sigmoid(x)",
         "a tape's s * (1 - s) is 0 in float64, instead of 3.7e-44"),
    Case("sigmoid-", sigmoid, _sym_logistic, -100.0, "sigmoid(x)",
         "fine with a library sigmoid: the control for the sign above"),
    Case("softplus-", lambda G, x: G.softplus(x), lambda x: _sym_softplus(x), -100.0, "softplus(x)",
         "fine with a library softplus: the control for softplus_by_hand-"),
    Case("log_cosh+", log_cosh, _sym_log_cosh, 100.0, "log(cosh(x))",
         "cosh(100) overflows float32: value inf, gradient NaN"),
    Case("log_cosh-", log_cosh, _sym_log_cosh, -100.0, "log(cosh(x))",
         "cosh(-100) overflows float32: value inf, gradient NaN"),
    Case("log_cosh_small", log_cosh, _sym_log_cosh, 1e-3, "log(cosh(x))",
         "cosh(1e-3) = 1 + 5e-7 keeps 2 digits of x*x/2 in float32"),
    Case("where_log_at_0", lambda G, x: G.where(x > 0, G.log(x), 0.0),
         lambda x: sp.Piecewise((sp.log(x), x > 0), (0, True)), 0.0, "where(x > 0, log(x), 0)",
         "a mask multiplies the untaken branch's gradient 1/0 = inf by 0: NaN (JAX's pitfall)"),
    Case("where_sqrt_at_0", lambda G, x: G.where(x > 0, G.sqrt(x), 0.0),
         lambda x: sp.Piecewise((sp.sqrt(x), x > 0), (0, True)), 0.0, "where(x > 0, sqrt(x), 0)",
         "0 * (1/(2 sqrt(0))) = 0 * inf = NaN"),
)


def kernel_key(case: Case) -> tuple:
    """Cases with one function and one input shape share a kernel."""
    return case.fn, case.shape


def make_kernel(case: Case, dtype: str, ops=GRADC_OPS):
    """The case's function as a ``@gradc.kernel`` of one annotated parameter ``x``.

    (This module has no ``from __future__ import annotations``: gradc evaluates the
    annotation, and ``t`` is a local.)
    """
    t = gradc.f32 if dtype == "f32" else gradc.f64
    fn = case.fn

    def kernel(x: t[case.shape]):
        return fn(ops, x)

    name = case.name if fn.__name__ == "<lambda>" else fn.__name__
    kernel.__name__ = kernel.__qualname__ = f"{name}_{dtype}".replace("+", "_pos").replace("-", "_neg")
    return gradc.kernel(kernel)


def point(case: Case, dtype: str) -> np.ndarray:
    """The input as an array of the precision under test."""
    return np.asarray(case.x, dtype=NP_DTYPES[dtype])


def reference(case: Case, dtype: str, digits: int = DIGITS) -> tuple[sp.Float, list[sp.Float]]:
    """The exact value and gradient at the input rounded to ``dtype``, to ``digits`` digits.

    The rounded input is substituted as an exact rational (every float is one), so the only
    error is evalf's, which raises its working precision until ``digits`` are right.
    """
    x = point(case, dtype)
    syms = [sp.Symbol(f"x{i}", real=True) for i in range(max(x.size, 1))]
    expr = case.formula(syms if case.shape else syms[0])
    at = {s: sp.Rational(float(v)) for s, v in zip(syms, x.reshape(-1))}
    # xreplace, not subs: substituting one variable at a time turns x0/sqrt(x0**2 + x1**2)
    # into 0 before x1 = 0 makes it 0/0.
    value = sp.N(expr.xreplace(at), digits)
    grads = [sp.N(sp.diff(expr, s).xreplace(at), digits) for s in syms]
    return value, grads


def as_float(v: sp.Expr) -> float:
    """A reference number as a float64 (NaN for SymPy's nan and for an undefined result)."""
    try:
        return float(v)
    except TypeError:
        return math.nan


def close(got, want, dtype: str) -> np.ndarray:
    """Elementwise: within the suite's tolerance of ``want`` (NaN matches NaN only)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.abs(got - want) <= RTOL[dtype] * np.abs(want) + ATOL[dtype]
    return ok | (np.isnan(got) & np.isnan(want))
