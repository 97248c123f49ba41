"""Stability rewrites: known-unstable patterns replaced by stable forms before differentiation.

Tape-based autodiff differentiates what the user wrote, so ``log(1 + exp(x))`` overflows
at x = 100 and its gradient is NaN.  gradc sees the whole fused expression and rewrites it
first, so that both the value and the derivative SymPy takes of it are stable (the
derivative of :class:`~gradc.scalar.Softplus` is a :class:`~gradc.scalar.Sigmoid`, not
``exp(x)/(1 + exp(x))``).

Each rule is a named, separately tested :class:`Rule` on one SymPy expression.  Rules
only fire where the rewritten form is mathematically equal to the original, so they never
change a value that was finite and accurate.  One rule works on the graph rather than on
one body: a sum of exponentials is computed with its maximum shifted out
(:func:`shift_sums_of_exp`), which turns ``log(sum(exp(v)))`` into a log-sum-exp and
``log(softmax(v))`` into ``v - logsumexp(v)`` once the expression rules have run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import sympy as sp

from . import ir
from .scalar import FiniteOrZero, Sigmoid, Softplus, StopGradient, Tanh, expm1, log1p


@dataclass(frozen=True)
class Rule:
    """``match(e)`` returns the replacement of ``e``, or None where the rule does not apply."""

    name: str
    doc: str
    match: Callable[[sp.Expr], sp.Expr | None]


def _is_exp(e) -> bool:
    return isinstance(e, sp.exp)


def _exponent(t) -> sp.Expr | None:
    """``a`` where ``t = exp(a)``, else None.

    ``t = c * exp(b)`` with a number ``c > 0`` counts as ``exp(b + log(c))``: that is how
    SymPy holds ``exp(x + 0.5)`` (as ``1.6487*exp(x)``), which must not escape the rules.
    """
    if _is_exp(t):
        return t.args[0]
    if t.is_Mul and len(t.args) == 2 and t.args[0].is_Number and t.args[0].is_positive and _is_exp(t.args[1]):
        return t.args[1].args[0] + sp.log(t.args[0])
    return None


def _softplus(e):
    # log(1 + exp(a)) and log1p(exp(a))
    if isinstance(e, sp.log) and isinstance(e.args[0], sp.Add):
        arg = e.args[0]
        if len(arg.args) == 2 and sp.S.One in arg.args:
            a = _exponent(arg.args[0] if arg.args[1] == 1 else arg.args[1])
            if a is not None:
                return Softplus(a)
    if isinstance(e, log1p) and _exponent(e.args[0]) is not None:
        return Softplus(_exponent(e.args[0]))
    return None


def _sigmoid(e):
    # 1/(1 + exp(a)) = sigmoid(-a); exp(x)/(1 + exp(x)) then meets _exp_times_sigmoid.
    if e.is_Pow and e.exp == -1 and isinstance(e.base, sp.Add) and len(e.base.args) == 2 and sp.S.One in e.base.args:
        a = _exponent(e.base.args[0] if e.base.args[1] == 1 else e.base.args[1])
        if a is not None:
            return Sigmoid(-a)
    return None


def _exp_times_sigmoid(e):
    # exp(a) * sigmoid(-a) = sigmoid(a), also with exp(a) as c * exp(b) (see _exponent).
    if not e.is_Mul:
        return None
    c, _ = e.as_coeff_Mul()
    for f in e.args:
        if not _is_exp(f):
            continue
        options = [(f.args[0], [f])]
        if c != 1 and c.is_positive:
            options.append((_exponent(c * f), [c, f]))
        for a, used in options:
            partner = Sigmoid(-a)
            if partner in e.args:
                rest = list(e.args)
                for u in used + [partner]:
                    rest.remove(u)
                return sp.Mul(Sigmoid(a), *rest)
    return None


def _one_minus_sigmoid(e):
    # 1 - sigmoid(a) = sigmoid(-a): no cancellation when sigmoid(a) is close to 1.
    if not e.is_Add or sp.S.One not in e.args:
        return None
    for t in e.args:
        if t.is_Mul and len(t.args) == 2 and t.args[0] == -1 and isinstance(t.args[1], Sigmoid):
            rest = list(e.args)
            rest.remove(sp.S.One)
            rest.remove(t)
            return sp.Add(Sigmoid(-t.args[1].args[0]), *rest)
    return None


def _log_sigmoid(e):
    # log(sigmoid(a)) = -softplus(-a)
    if isinstance(e, sp.log) and isinstance(e.args[0], Sigmoid):
        return -Softplus(-e.args[0].args[0])
    return None


def _log_of_exp_product(e):
    # log(exp(a) * r) = a + log(r): log(softmax(v)) = v - log(sum(exp(v))), and
    # log(s * exp(m)) = m + log(s) after a sum of exponentials has had its maximum shifted out.
    if isinstance(e, sp.log) and e.args[0].is_Mul:
        exps = [f for f in e.args[0].args if _is_exp(f)]
        if exps:
            rest = [f for f in e.args[0].args if not _is_exp(f)]
            return sp.Add(*(f.args[0] for f in exps)) + sp.log(sp.Mul(*rest))
    return None


def _combine_exps(e):
    # exp(a) * exp(b) = exp(a + b): exp(v) / (s * exp(m)) becomes exp(v - m) / s, which does not overflow.
    if e.is_Mul:
        factors = [f for f in e.args if _is_exp(f) or (f.is_Pow and _is_exp(f.base) and f.exp.is_Integer)]
        if len(factors) >= 2:
            total = sp.Add(*(f.args[0] if _is_exp(f) else f.exp * f.base.args[0] for f in factors))
            rest = [f for f in e.args if f not in factors]
            return sp.Mul(sp.exp(total), *rest)
    return None


def _log1mexp(e):
    # log(1 - exp(a)), a < 0: 1 - exp(a) cancels near a = 0, where -expm1(a) is exact, and
    # -expm1(a) rounds to 1 far from 0, where log1p(-exp(a)) is exact (Maechler 2012).
    if isinstance(e, sp.log) and e.args[0].is_Add and len(e.args[0].args) == 2 and sp.S.One in e.args[0].args:
        other = e.args[0].args[0] if e.args[0].args[1] == 1 else e.args[0].args[1]
        a = _exponent(-other)
        if a is not None:
            return sp.Piecewise((sp.log(-expm1(a)), a > -sp.log(2)), (log1p(-sp.exp(a)), True))
    return None


def _log1p(e):
    # log(1 + a) = log1p(a): exact for small a, where 1 + a rounds a away.
    if isinstance(e, sp.log) and e.args[0].is_Add and sp.S.One in e.args[0].args:
        rest = list(e.args[0].args)
        rest.remove(sp.S.One)
        return log1p(sp.Add(*rest))
    return None


def _expm1(e):
    # exp(a) - 1 = expm1(a) and 1 - exp(a) = -expm1(a): exact for small a, where exp(a) rounds to 1.
    if not e.is_Add:
        return None
    for one in (sp.S.NegativeOne, sp.S.One):
        if one in e.args:
            for t in e.args:
                a = _exponent(-one * t)
                if a is not None:  # one + t = one - one * exp(a) = -one * expm1(a)
                    rest = list(e.args)
                    rest.remove(one)
                    rest.remove(t)
                    return sp.Add(-one * expm1(a), *rest)
    return None


def _sqrt_of_square(e):
    # sqrt(a*a) = |a| (SymPy already does this for real a; kept for bodies it cannot prove real).
    if e.is_Pow and e.exp == sp.Rational(1, 2) and e.base.is_Pow and e.base.exp == 2:
        return sp.Abs(e.base.base)
    return None


def _log_cosh(e):
    # log(cosh(a)) = |a| + log1p(exp(-2|a|)) - log(2): cosh overflows for |a| > 89 in float32.
    # Below |a| = 1 that form cancels (|a| - log(2) + log(2) - |a| + a**2/2), and so does
    # log(cosh(a)) itself; log1p(2 sinh(a/2)**2) (cosh(a) = 1 + 2 sinh(a/2)**2) does not.
    if isinstance(e, sp.log) and isinstance(e.args[0], sp.cosh):
        x = e.args[0].args[0]
        a = sp.Abs(x)
        return sp.Piecewise((log1p(2 * sp.sinh(x / 2) ** 2), a < 1), (a + log1p(sp.exp(-2 * a)) - sp.log(2), True))
    return None


def _tanh(e):
    # Same value; only the derivative changes (see gradc.scalar.Tanh).
    if isinstance(e, sp.tanh):
        return Tanh(e.args[0])
    return None


RULES: tuple[Rule, ...] = (
    Rule("softplus", "log(1 + exp(x)) -> softplus(x) = max(x, 0) + log1p(exp(-|x|))", _softplus),
    Rule("sigmoid", "1/(1 + exp(-x)) -> sigmoid(x), stable for both signs", _sigmoid),
    Rule("exp-times-sigmoid", "exp(x) * sigmoid(-x) -> sigmoid(x) (so exp(x)/(1 + exp(x)) -> sigmoid(x))", _exp_times_sigmoid),
    Rule("one-minus-sigmoid", "1 - sigmoid(x) -> sigmoid(-x)", _one_minus_sigmoid),
    Rule("log-sigmoid", "log(sigmoid(x)) -> -softplus(-x)", _log_sigmoid),
    Rule("log-of-exp-product", "log(exp(a) * r) -> a + log(r) (log-softmax)", _log_of_exp_product),
    Rule("combine-exps", "exp(a) * exp(b) -> exp(a + b)", _combine_exps),
    Rule("log-cosh", "log(cosh(x)) -> log1p(2 sinh(x/2)**2) for |x| < 1, else |x| + log1p(exp(-2|x|)) - log(2)", _log_cosh),
    Rule("tanh", "tanh(x) -> tanh(x) differentiated as 4 sigmoid(2x) sigmoid(-2x), not 1 - tanh(x)**2", _tanh),
    Rule("log1mexp", "log(1 - exp(x)) -> log(-expm1(x)) for x > -log(2), else log1p(-exp(x))", _log1mexp),
    Rule("log1p", "log(1 + x) -> log1p(x)", _log1p),
    Rule("expm1", "exp(x) - 1 -> expm1(x), 1 - exp(x) -> -expm1(x)", _expm1),
    Rule("sqrt-of-square", "sqrt(x*x) -> |x|", _sqrt_of_square),
)

#: The graph-level rule's name, as reported among the rules that fired.
SHIFT_SUM_OF_EXP = "logsumexp"


def rewrite_expr(expr: sp.Expr, fired: Counter | None = None, rules: Sequence[Rule] = RULES) -> sp.Expr:
    """Apply ``rules`` bottom-up until none fires; count the firings in ``fired``."""
    fired = Counter() if fired is None else fired
    for _ in range(32):  # each firing removes a pattern; the bound only guards against a cycle
        changed = False
        for rule in rules:
            hits = []

            def query(e, rule=rule):
                out = rule.match(e)
                if out is not None:
                    hits.append(out)
                    return True
                return False

            def value(e, rule=rule):
                return rule.match(e)

            new = expr.replace(query, value)
            if new != expr:
                fired[rule.name] += len(hits)
                expr, changed = new, True
        if not changed:
            return expr
    return expr


def _sum_of_exp(node: ir.Node) -> sp.Expr | None:
    """The exponent ``u`` when ``node`` is ``sum(exp(u))`` not already shifted, else None."""
    u = _exponent(node.expr) if isinstance(node, ir.Map) and node.reduce == "sum" else None
    if u is not None:
        # gradc.logsumexp and earlier rewrites shift already: by a stop_gradient inlined into
        # the body, or read from a node of its own (gradc.logsumexp's max has two readers).
        stopped = [o for o in node.operands if isinstance(o.node, ir.Map) and o.node.expr.has(StopGradient)]
        if not u.has(StopGradient) and not any(o.symbol in u.free_symbols for o in stopped):
            return u
    return None


def _shifted(node: ir.Map, u: sp.Expr) -> tuple[ir.Map, ir.Map]:
    """``(S, M)`` with ``node = S * exp(M)``: ``M = max(u)`` (constant for autodiff), ``S = sum(exp(u - M))``."""
    olds = [o.symbol for o in node.operands]
    operands = [(o.node, o.index) for o in node.operands]
    peak = ir.Map(
        node.shape, node.loop, node.out_index, operands, lambda *s: u.xreplace(dict(zip(olds, s))), reduce="max", loc=node.loc
    ).inherit(node)
    peak.name = None
    peak.hint = "peak"

    def body(*syms):
        m = syms[-1]
        return sp.exp(u.xreplace(dict(zip(olds, syms[:-1]))) - StopGradient(FiniteOrZero(m)))

    scaled = ir.Map(
        node.shape, node.loop, node.out_index, operands + [(peak, node.out_index)], body, reduce="sum", loc=node.loc
    ).inherit(node)
    return scaled, peak


def stabilize(outputs: Sequence[ir.Node], fired: Counter | None = None) -> list[ir.Node]:
    """New outputs with every Map body rewritten by :data:`RULES` and sums of exp shifted.

    Sums of exponentials are shifted only where another node reads them (a kernel that
    returns ``sum(exp(x))`` itself gains nothing from the extra pass).
    """
    fired = Counter() if fired is None else fired
    order = ir.topo_order(outputs)
    new: dict[int, ir.Node] = {}
    shifted: dict[int, tuple[ir.Map, ir.Map]] = {}
    for node in order:
        if not isinstance(node, ir.Map):
            new[node.id] = node.with_args([new[a.id] for a in node.args])
            continue
        operands, subs = [], {}
        for op in node.operands:
            producer = new[op.node.id]
            u = _sum_of_exp(producer)
            if u is None:
                subs[op.symbol] = _operand(operands, producer, op.index)
                continue
            if producer.id not in shifted:
                shifted[producer.id] = _shifted(producer, u)
                fired[SHIFT_SUM_OF_EXP] += 1
            scaled, peak = shifted[producer.id]
            s = _operand(operands, scaled, op.index)
            m = _operand(operands, peak, op.index)
            subs[op.symbol] = s * sp.exp(StopGradient(FiniteOrZero(m)))
        expr = rewrite_expr(node.expr.xreplace(subs), fired)
        new[node.id] = node.rebuilt([(n, idx) for n, idx, _ in operands], [sym for _, _, sym in operands], expr)
    return [new[o.id] for o in outputs]


def _operand(operands: list, node: ir.Node, index: ir.IndexMap) -> sp.Symbol:
    sym = sp.Symbol(f"_s{len(operands)}") if node.dtype == "bool" else sp.Symbol(f"_s{len(operands)}", real=True)
    operands.append((node, index, sym))
    return sym
