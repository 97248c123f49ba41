"""The stability rewrites of ``gradc.stability``: each rule alone, the fixpoint, the graph rule,
and what they do to compiled kernels.

At the SymPy level every rule in ``RULES`` must fire on its pattern, give an expression equal
to the original (and with an equal derivative, since autodiff differentiates the rewritten
form) at several points to 40 digits, and leave near-misses alone.  Through the compiler: the
derivatives come out in stable form, ``stable=True`` and ``stable=False`` agree wherever the
unstable kernel is finite and accurate (hypothesis, float64), and ``stable=False`` really
turns every rewrite off.  Compiled kernels are built once for the module.
"""

from collections import Counter

import mpmath
import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from sympy.codegen import cfunctions

import gradc
from gradc import autodiff, compiler, f32, f64, ir, reference, rewrite, stability
from gradc.scalar import Sigmoid, Softplus, Tanh, expm1, log1p
from gradc.stability import RULES, rewrite_expr

x, y = sp.symbols("x y", real=True)
z = sp.Symbol("z")  # not known to be real: SymPy leaves sqrt(z**2) alone
POINTS = [sp.Rational(-29, 4), sp.Rational(-1, 2), sp.Rational(3, 8), sp.Integer(3)]
Y_POINTS = [sp.Rational(1, 4), sp.Rational(3, 2)]


def elementary(e: sp.Expr) -> sp.Expr:
    """``e`` with gradc's functions spelt in SymPy's, so that evalf can evaluate it."""
    return e.replace(Sigmoid, lambda a: 1 / (1 + sp.exp(-a))).replace(Softplus, lambda a: sp.log(1 + sp.exp(a))).replace(
        Tanh, sp.tanh
    ).replace(log1p, lambda a: sp.log(1 + a)).replace(expm1, lambda a: sp.exp(a) - 1)


def assert_equal_at_points(a: sp.Expr, b: sp.Expr):
    for px in POINTS:
        for py in Y_POINTS:
            at = {x: px, y: py, z: px}
            va, vb = sp.N(elementary(a).xreplace(at), 45), sp.N(elementary(b).xreplace(at), 45)
            assert abs(va - vb) <= sp.Float(10) ** -40 * max(1, abs(vb)), f"{a} = {va} but {b} = {vb} at {at}"


# rule name -> (expressions it must rewrite, near-misses it must leave alone)
RULE_CASES = {
    "softplus": (
        [sp.log(1 + sp.exp(x)), sp.log(1 + sp.exp(x * y - 2)), log1p(sp.exp(x)), sp.log(1 + 2 * sp.exp(x))],
        [sp.log(2 + sp.exp(x)), sp.log(1 + y * sp.exp(x)), sp.log(1 + sp.exp(x) + y), sp.log(1 - sp.exp(x)), log1p(x)],
    ),
    "sigmoid": (
        [1 / (1 + sp.exp(-x)), 1 / (1 + sp.exp(x * y)), 1 / (1 + sp.Rational(3, 2) * sp.exp(-x))],
        [1 / (2 + sp.exp(x)), 1 / (1 - sp.exp(x)), (1 + sp.exp(x)) ** -2, 1 / (1 + sp.exp(x) + y), sp.sqrt(1 + sp.exp(x)), 1 + sp.exp(x)],
    ),
    "exp-times-sigmoid": (
        [sp.exp(x) * Sigmoid(-x), 3 * y * sp.exp(x) * Sigmoid(-x), 3 * sp.exp(x) * Sigmoid(-x - sp.log(3))],
        [sp.exp(x) * Sigmoid(x), sp.exp(2 * x) * Sigmoid(-x), sp.exp(x) + Sigmoid(-x), y * Sigmoid(-x)],
    ),
    "one-minus-sigmoid": (
        [1 - Sigmoid(x), 1 - Sigmoid(x * y) + y],
        [2 - Sigmoid(x), 1 - 2 * Sigmoid(x), 1 + Sigmoid(x), Sigmoid(-x)],
    ),
    "log-sigmoid": (
        [sp.log(Sigmoid(x)), sp.log(Sigmoid(x * y - 1))],
        [sp.log(2 * Sigmoid(x)), sp.log(Sigmoid(x) + y), sp.log(1 + Sigmoid(x)), Sigmoid(sp.log(x))],
    ),
    "log-of-exp-product": (
        [sp.log(y * sp.exp(x)), sp.log(sp.exp(x) / (1 + y)), sp.log(3 * sp.exp(x * x))],
        [sp.log(x * y), sp.log(sp.exp(x) + y), sp.log(y) * sp.exp(x)],
    ),
    "combine-exps": (
        [sp.exp(x) * sp.exp(y), 2 * sp.exp(x) * sp.exp(x * y) * y],
        [sp.exp(x) * y, sp.exp(x) + sp.exp(y), sp.exp(x) * sp.log(y)],
    ),
    "log-cosh": (
        [sp.log(sp.cosh(x)), sp.log(sp.cosh(x * y - 1))],
        [sp.log(sp.sinh(x)), sp.log(sp.cosh(x) + 1), sp.log(2 * sp.cosh(x)), sp.cosh(sp.log(y))],
    ),
    "tanh": (
        [sp.tanh(x), sp.tanh(x * y)],
        [Tanh(x), sp.atanh(x / 4), sp.sinh(x) / sp.cosh(x)],
    ),
    "log1mexp": (
        [sp.log(1 - sp.exp(x)), sp.log(1 - sp.exp(-x * y)), sp.log(1 - 2 * sp.exp(x))],
        [sp.log(2 - sp.exp(x)), sp.log(1 + 2 * sp.exp(x)), sp.log(1 - y * sp.exp(x)), sp.log(1 - sp.exp(x) + y)],
    ),
    "log1p": (
        [sp.log(1 + x), sp.log(1 + x * y), sp.log(y - sp.exp(x) + 1)],
        [sp.log(2 + x), sp.log(x), sp.log(x * (1 + y)), log1p(x)],
    ),
    "expm1": (
        [sp.exp(x) - 1, 1 - sp.exp(x * y), sp.exp(-x) - 1 + y, 1 - 2 * sp.exp(x)],
        [sp.exp(x) - 2, sp.exp(x) + 1, 1 + 2 * sp.exp(x), 1 - y * sp.exp(x), sp.exp(x) * y - 1],
    ),
    "sqrt-of-square": (
        [sp.sqrt(z**2), sp.sqrt((z * y - 1) ** 2)],
        [sp.sqrt(z**3), sp.sqrt(z**2 + 1), sp.cbrt(z**2)],
    ),
}
BY_NAME = {r.name: r for r in RULES}


def test_every_rule_is_tested_here_and_documented():
    assert set(RULE_CASES) == set(BY_NAME)
    assert all(r.doc and "->" in r.doc for r in RULES)


@pytest.mark.parametrize("name", list(RULE_CASES))
def test_rule_fires_and_keeps_value_and_derivative(name):
    rule = BY_NAME[name]
    for expr in RULE_CASES[name][0]:
        out = rule.match(expr)
        assert out is not None and out != expr, f"{name} did not fire on {expr}"
        assert_equal_at_points(out, expr)
        # Autodiff differentiates the rewritten form with gradc's own derivative rules
        # (Sigmoid, Softplus, Tanh, Piecewise): they must agree with SymPy's on the original.
        assert_equal_at_points(sp.diff(out, x), sp.diff(expr, x))


@pytest.mark.parametrize("name", list(RULE_CASES))
def test_rule_leaves_near_misses_alone(name):
    rule = BY_NAME[name]
    for expr in RULE_CASES[name][1]:
        assert rule.match(expr) is None, f"{name} fired on {expr}"


# ----------------------------------------------------------------------------- rewrite_expr
COMPOSITES = [
    # expression, what it becomes, the rules that fire
    (sp.exp(x) / (1 + sp.exp(x)), Sigmoid(x), {"sigmoid": 1, "exp-times-sigmoid": 1}),
    (sp.log(1 / (1 + sp.exp(-x))), -Softplus(-x), {"sigmoid": 1, "log-sigmoid": 1}),
    (sp.log(1 - Sigmoid(x)), -Softplus(x), {"one-minus-sigmoid": 1, "log-sigmoid": 1}),
    (sp.log(1 + sp.exp(x)) + sp.log(1 + sp.exp(y)), Softplus(x) + Softplus(y), {"softplus": 2}),
    (sp.log(1 + y) * (sp.exp(x) - 1), log1p(y) * expm1(x), {"log1p": 1, "expm1": 1}),
    (3 * sp.exp(x) / (1 + 3 * sp.exp(x)), Sigmoid(x + sp.log(3)), {"sigmoid": 1, "exp-times-sigmoid": 1}),
    (sp.log(1 - sp.exp(-x)), sp.Piecewise((sp.log(-expm1(-x)), x < sp.log(2)), (log1p(-sp.exp(-x)), True)), {"log1mexp": 1}),
]


@pytest.mark.parametrize(
    "expr, rule",
    [
        (sp.log(1 + sp.exp(x + 0.5)), "softplus"),
        (1 / (1 + sp.exp(-x - 0.5)), "sigmoid"),
        (sp.exp(x - 0.25) - 1, "expm1"),
        (sp.log(1 - sp.exp(-x - 0.125)), "log1mexp"),
    ],
)
def test_rules_see_through_a_float_offset_in_the_exponent(expr, rule):
    """SymPy holds exp(x + 0.5) as 1.6487*exp(x); a bias constant must not hide the pattern."""
    counts = Counter()
    out = rewrite_expr(expr, counts)
    assert counts[rule] == 1 and not out.has(sp.exp(x))
    for px in POINTS:
        a, b = sp.N(elementary(out).xreplace({x: px}), 30), sp.N(elementary(expr).xreplace({x: px}), 30)
        assert abs(a - b) <= 1e-14 * max(1, abs(b))


def test_expm1_stays_whole_when_exp_could_simplify_its_argument():
    assert isinstance(expm1(x - 0.25), expm1)
    assert expm1(0) == 0


@pytest.mark.parametrize("expr, want, fired", COMPOSITES, ids=[str(c[0]) for c in COMPOSITES])
def test_rewrite_expr_chains_rules_and_counts_them(expr, want, fired):
    counts = Counter()
    out = rewrite_expr(expr, counts)
    assert out == want
    assert dict(counts) == fired
    assert_equal_at_points(out, expr)


@pytest.mark.parametrize("expr", [c[0] for c in COMPOSITES] + [hits[0] for hits, _ in RULE_CASES.values()])
def test_rewrite_expr_reaches_a_fixpoint(expr):
    once = rewrite_expr(expr)
    counts = Counter()
    assert rewrite_expr(once, counts) == once
    assert not counts


def test_rewrite_expr_with_no_rules_changes_nothing():
    expr = sp.log(1 + sp.exp(x))
    assert rewrite_expr(expr, rules=()) == expr


# ----------------------------------------------------------------------------- the graph rule
def stabilized(fn):
    graph = gradc.kernel(fn).trace().graph
    fired = Counter()
    outs = stability.stabilize(rewrite.fuse(graph.outputs), fired)
    return graph, outs, fired


def evaluate(outs, v):
    return reference.evaluate(outs, {"v": np.asarray(v, dtype=np.float64)}, {})[0]


def lse_by_hand(v: f64[2]):
    return gradc.log(gradc.sum(gradc.exp(v)))


@pytest.mark.parametrize(
    "v, want",
    [([1000.0, 1000.0], 1000 + np.log(2)), ([-1000.0, -1000.0], -1000 + np.log(2)), ([1.0, 2.0], np.log(np.e + np.e**2))],
)
def test_sum_of_exp_is_shifted_by_its_max(v, want):
    graph, outs, fired = stabilized(lse_by_hand)
    assert fired[stability.SHIFT_SUM_OF_EXP] == 1
    np.testing.assert_allclose(evaluate(outs, v), want, rtol=1e-15)
    (grad,) = autodiff.vjp(outs, [ir.constant(1)], graph.inputs)
    softmax = np.exp(np.array(v) - np.max(v)) / np.sum(np.exp(np.array(v) - np.max(v)))
    np.testing.assert_allclose(evaluate([grad], v), softmax, rtol=1e-15)


def test_shift_keeps_an_all_minus_inf_row_at_minus_inf():
    """A fully masked row (every logit -inf) has log-sum-exp -inf, not (-inf) - (-inf) = NaN."""
    _, outs, _ = stabilized(lse_by_hand)
    assert evaluate(outs, [-np.inf, -np.inf]) == -np.inf


def test_log_softmax_becomes_v_minus_logsumexp():
    def log_softmax(v: f64[3]):
        return gradc.log(gradc.exp(v) / gradc.sum(gradc.exp(v)))

    _, outs, fired = stabilized(log_softmax)
    assert fired[stability.SHIFT_SUM_OF_EXP] == 1 and fired["log-of-exp-product"] >= 1
    np.testing.assert_allclose(evaluate(outs, [1000.0, 0.0, -1000.0]), [0.0, -1000.0, -2000.0], rtol=1e-15)


def test_softmax_after_the_shift_has_one_combined_exp():
    def softmax(v: f64[3]):
        return gradc.exp(v) / gradc.sum(gradc.exp(v))

    _, outs, fired = stabilized(softmax)
    assert fired[stability.SHIFT_SUM_OF_EXP] == 1
    p = np.exp([1.0, 0.0, -999.0])
    np.testing.assert_allclose(evaluate(outs, [1000.0, 999.0, 0.0]), p / p.sum(), rtol=1e-15)


def test_a_sum_of_exp_that_nothing_reads_is_not_shifted():
    def total(v: f64[3]):
        return gradc.sum(gradc.exp(v))

    _, _, fired = stabilized(total)
    assert not fired


def test_gradc_logsumexp_is_not_shifted_twice():
    """gradc.logsumexp shifts by its own stop_gradient(max); a second max pass would be waste."""

    def lse(v: f64[3]):
        return gradc.logsumexp(v)

    _, outs, fired = stabilized(lse)
    assert stability.SHIFT_SUM_OF_EXP not in fired
    assert sum(1 for n in ir.topo_order(outs) if isinstance(n, ir.Map) and n.reduce == "max") == 1
    np.testing.assert_allclose(evaluate(outs, [1000.0, 1000.0, 1000.0]), 1000 + np.log(3), rtol=1e-15)


def test_tanh_gradient_through_the_reference_evaluator():
    """The rewritten tanh is evaluable by gradc.reference, and its derivative does not cancel."""

    def th(v: f64[2]):
        return gradc.sum(gradc.tanh(v))

    graph, outs, fired = stabilized(th)
    assert fired["tanh"] == 1
    (grad,) = autodiff.vjp(outs, [ir.constant(1)], graph.inputs)
    np.testing.assert_allclose(evaluate(outs, [100.0, 0.5]), 1 + np.tanh(0.5), rtol=1e-15)
    np.testing.assert_allclose(evaluate([grad], [100.0, 0.5]), [4 * np.exp(-200.0), 1 / np.cosh(0.5) ** 2], rtol=1e-13)


# ----------------------------------------------------------------------------- derivatives
def gradient_body(fn) -> tuple[sp.Expr, sp.Symbol]:
    """The fused body computing d/dx of a one-parameter kernel, and the symbol reading x."""
    lowered = compiler.lower(gradc.kernel(fn))
    (entry,) = [e for e in lowered.spec.entries if e.suffix == "value_and_grad"]
    node = dict(entry.outputs)["d_x"]
    assert isinstance(node, ir.Map) and all(isinstance(op.node, ir.Input) for op in node.operands), "not one fused body"
    (sym,) = [op.symbol for op in node.operands if op.node.param == "x"]
    return node.expr, sym


def softplus_by_hand(x: f32[()]):
    return gradc.log(1 + gradc.exp(x))


def test_derivative_of_softplus_is_a_sigmoid():
    body, s = gradient_body(softplus_by_hand)
    assert body == Sigmoid(s)


def test_derivative_of_the_logistic_ratio_is_sigmoid_times_sigmoid():
    def ratio(x: f64[()]):
        return gradc.exp(x) / (1 + gradc.exp(x))

    body, s = gradient_body(ratio)
    assert body == Sigmoid(s) * Sigmoid(-s)


def test_derivative_of_tanh_is_not_one_minus_tanh_squared():
    def th(x: f64[()]):
        return gradc.tanh(x)

    body, s = gradient_body(th)
    assert not body.has(sp.tanh, Tanh)
    assert body == 4 * Sigmoid(2 * s) * Sigmoid(-2 * s)


def test_derivative_of_log_sum_exp_reads_only_shifted_exponentials():
    def lse(x: f64[3]):
        return gradc.log(gradc.sum(gradc.exp(x)))

    lowered = compiler.lower(gradc.kernel(lse))
    (entry,) = [e for e in lowered.spec.entries if e.suffix == "value_and_grad"]
    nodes = [n for n in ir.topo_order([dict(entry.outputs)["d_x"]]) if isinstance(n, ir.Map)]
    # every exp(u) in the gradient has u = x - max(x) <= 0
    for n in nodes:
        for e in n.expr.atoms(sp.exp):
            assert e.args[0].is_Add and any(t.could_extract_minus_sign() for t in e.args[0].args), e


# ----------------------------------------------------------------------------- compiled kernels
X, V = sp.Symbol("x", real=True), sp.symbols("v0:3", real=True)
_lse = sp.log(sum(sp.exp(a) for a in V))
exp = gradc.exp
# One output per rewrite, each with its SymPy formula; none has an interior zero on the
# drawn inputs, so relative errors mean something.
BATTERY = [
    ("softplus", lambda x, v: gradc.log(1 + exp(x)), sp.log(1 + sp.exp(X))),
    ("sigmoid", lambda x, v: 1 / (1 + exp(-x)), 1 / (1 + sp.exp(-X))),
    ("logistic_ratio", lambda x, v: exp(x) / (1 + exp(x)), 1 / (1 + sp.exp(-X))),
    ("one_minus_sigmoid", lambda x, v: 1 - gradc.sigmoid(x), 1 / (1 + sp.exp(X))),
    ("log_sigmoid", lambda x, v: gradc.log(gradc.sigmoid(x)), -sp.log(1 + sp.exp(-X))),
    ("log_of_exp_product", lambda x, v: gradc.log(3.0 * exp(x * x)), sp.log(3) + X * X),
    ("log_cosh", lambda x, v: gradc.log(gradc.cosh(x)), sp.log(sp.cosh(X))),
    ("tanh", lambda x, v: gradc.tanh(x), sp.tanh(X)),
    ("log1p", lambda x, v: gradc.log(1 + x * x), sp.log(1 + X * X)),
    ("expm1", lambda x, v: exp(x) - 1, sp.exp(X) - 1),
    # 60 digits of log(1 - 1e-390) would keep none: mpmath's log1p is exact there
    ("log1mexp", lambda x, v: gradc.log(1 - exp(-x * x - 0.125)), cfunctions.log1p(-sp.exp(-X * X - sp.Rational(1, 8)))),
    ("logsumexp", lambda x, v: gradc.log(gradc.sum(exp(v))), _lse),
    ("log_softmax", lambda x, v: gradc.log(exp(v[0]) / gradc.sum(exp(v))), V[0] - _lse),
    ("softmax", lambda x, v: exp(v[1]) / gradc.sum(exp(v)), sp.exp(V[1] - _lse)),
]
NAMES = [name for name, _, _ in BATTERY]
_ARGS = [X, *V]
_REFERENCE = [
    (sp.lambdify(_ARGS, f, "mpmath"), [sp.lambdify(_ARGS, sp.diff(f, a), "mpmath") for a in _ARGS]) for _, _, f in BATTERY
]
TINY = np.finfo(np.float64).tiny


def floors(names) -> np.ndarray:
    """Per output, the magnitude below which errors count as absolute rather than relative."""
    return np.array([1.0 if n in names else TINY for n in NAMES])


# log(1 + 1e-20) is 0: log-sum-exp and log-softmax, exactly ~1e-20 when one logit dominates,
# are computed to an absolute (not relative) 1e-16 by any shifted form.
VALUE_FLOOR = floors({"logsumexp", "log_softmax"})
# Their gradients are differences of probabilities (delta - p): 1 - p cancels where p ~ 1, in
# every formulation that computes p, so these too are only accurate to an absolute 1e-16.
GRAD_FLOOR = floors({"log_softmax", "softmax"})[:, None]


def battery(x: f64[()], v: f64[3]):
    return tuple(f(x, v) for _, f, _ in BATTERY)


@pytest.fixture(scope="module")
def batteries():
    return gradc.compile(battery), gradc.compile(battery, stable=False)


def run(k, x, v):
    """Each output's value and its gradient [d/dx, d/dv0, d/dv1, d/dv2], one VJP per output."""
    x, v = np.float64(x), np.asarray(v, dtype=np.float64)
    with np.errstate(all="ignore"):
        values = k(x, v)
        rows = []
        for i in range(len(values)):
            cts = tuple(np.float64(i == j) for j in range(len(values)))
            _, (dx, dv) = k.vjp(x, v, cts)
            rows.append(np.concatenate([[dx], dv]))
    return np.array([float(a) for a in values]), np.array(rows)


def exact(x, v):
    with mpmath.workdps(60):
        args = [mpmath.mpf(float(a)) for a in (x, *v)]
        values = np.array([float(f(*args)) for f, _ in _REFERENCE])
        grads = np.array([[float(g(*args)) for g in gs] for _, gs in _REFERENCE])
    return values, grads


def error(got, want, floor):
    with np.errstate(all="ignore"):
        return np.where(got == want, 0.0, np.abs(got - want) / np.maximum(np.abs(want), floor))


def test_battery_exercises_every_rule_but_sqrt_of_square(batteries):
    """Each rule is reachable from the DSL.  sqrt(x*x) is |x| already: SymPy simplifies it
    for real x, so the rule only matters for bodies SymPy cannot prove real."""
    stable, unstable = batteries
    assert set(stable.meta["rewrites"]) == {r.name for r in RULES} - {"sqrt-of-square"} | {stability.SHIFT_SUM_OF_EXP}
    assert stable.meta["stable"] and not unstable.meta["stable"]


def test_stable_false_turns_every_rewrite_off(batteries):
    _, unstable = batteries
    assert unstable.meta["rewrites"] == {}


moderate = st.floats(min_value=-30, max_value=30).filter(lambda a: a == 0 or abs(a) >= 1e-20)


@settings(max_examples=150, deadline=None)
@given(x=moderate, v=st.lists(st.floats(min_value=-50, max_value=50), min_size=3, max_size=3))
def test_rewrites_agree_with_the_original_wherever_it_is_accurate(batteries, x, v):
    """Where the unstable kernel is finite and accurate (1e-13 of the 60-digit reference), the
    stable one agrees with it to 1e-12, values and gradients alike; and the stable values
    are accurate (1e-13) everywhere on this range.  Errors are relative, except below the
    floors above."""
    stable, unstable = batteries
    sv, sg = run(stable, x, v)
    uv, ug = run(unstable, x, v)
    rv, rg = exact(x, v)
    for what, s, u, r, floor in (("values", sv, uv, rv, VALUE_FLOOR), ("gradients", sg, ug, rg, GRAD_FLOOR)):
        accurate = np.isfinite(u) & (error(u, r, floor) <= 1e-13)
        disagree = accurate & (error(s, u, floor) > 1e-12)
        assert not disagree.any(), f"{what} of {[NAMES[i] for i in np.argwhere(disagree)[:, 0]]}: {s[disagree]} vs {u[disagree]}"
    wrong = error(sv, rv, VALUE_FLOOR) > 1e-13
    assert not wrong.any(), f"values of {[n for n, w in zip(NAMES, wrong) if w]}: {sv[wrong]}, exact {rv[wrong]}"


def log_one_plus_exp(x: f32[()]):
    return gradc.log(1 + gradc.exp(x))


def test_stable_false_overflows_where_stable_does_not():
    stable, unstable = gradc.compile(log_one_plus_exp), gradc.compile(log_one_plus_exp, stable=False)
    assert stable.meta["rewrites"] == {"softplus": 1} and unstable.meta["rewrites"] == {}
    with np.errstate(all="ignore"):
        value, (grad,) = unstable.value_and_grad(np.float32(100))
    assert value == np.inf and np.isnan(grad)
    value, (grad,) = stable.value_and_grad(np.float32(100))
    assert value == np.float32(100) and grad == np.float32(1)
