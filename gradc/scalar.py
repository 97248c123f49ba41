"""Scalar functions SymPy lacks, each with its derivative rule beside its definition.

SymPy differentiates everything else.  These functions stay opaque to SymPy's own
rewriting so that their stable C forms (see :mod:`gradc.codegen`) survive to the output.
"""

from __future__ import annotations

import sympy as sp
from mpmath.libmp import prec_to_dps
from sympy.codegen import cfunctions
from sympy.codegen.cfunctions import log1p

__all__ = [
    "Sigmoid",
    "Softplus",
    "Tanh",
    "Relu",
    "StopGradient",
    "Step",
    "FiniteOrZero",
    "log1p",
    "expm1",
    "lower_for_c",
    "strip_stop_gradient",
    "clean_derivative",
]


class expm1(cfunctions.expm1):
    """exp(x) - 1 that stays whole.  SymPy's expm1 turns into exp(x) - 1 wherever exp can
    simplify its argument (expm1(x - 0.25) became 0.7788*exp(x) - 1), which cancels for
    x near 0.25: the very error expm1 is there to avoid.  The name stays ``expm1`` for the printers."""

    @classmethod
    def eval(cls, arg):
        if arg.is_Number:
            return super().eval(arg)
        return None


class Sigmoid(sp.Function):
    """1 / (1 + exp(-x)); emitted with e = exp(-|x|) as 1/(1 + e) or e/(1 + e), accurate for both signs."""

    is_real = True

    def _eval_evalf(self, prec):
        # Lets SymPy decide relations such as sigmoid(3/2) >= 0 (a constant argument).
        return self.c_form(self.args[0]).evalf(prec_to_dps(prec))

    def fdiff(self, argindex=1):
        # sigmoid(x) * sigmoid(-x), not s * (1 - s): no cancellation to 0 where s rounds to 1.
        return Sigmoid(self.args[0]) * Sigmoid(-self.args[0])

    @staticmethod
    def c_form(x):
        e = sp.exp(-sp.Abs(x))
        return sp.Piecewise((1 / (1 + e), x >= 0), (e / (1 + e), True))


class Softplus(sp.Function):
    """log(1 + exp(x)); emitted as max(x, 0) + log1p(exp(-|x|)), which never overflows."""

    is_real = True

    def _eval_evalf(self, prec):
        # Lets SymPy decide relations such as sigmoid(3/2) >= 0 (a constant argument).
        return self.c_form(self.args[0]).evalf(prec_to_dps(prec))

    def fdiff(self, argindex=1):
        return Sigmoid(self.args[0])

    @staticmethod
    def c_form(x):
        return sp.Max(x, 0) + log1p(sp.exp(-sp.Abs(x)))


class Tanh(sp.Function):
    """tanh(x) whose derivative is 4 sigmoid(2x) sigmoid(-2x), emitted as C's tanh.

    SymPy's derivative of tanh, 1 - tanh(x)**2, cancels to 0 wherever tanh(x) rounds to ±1
    (|x| > 19 in float64), although sech(x)**2 is representable down to |x| ~ 354.
    """

    is_real = True

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return sp.tanh(x)
        return None

    def fdiff(self, argindex=1):
        x = self.args[0]
        return 4 * Sigmoid(2 * x) * Sigmoid(-2 * x)

    @staticmethod
    def c_form(x):
        return sp.tanh(x)

    def _numpycode(self, printer):
        # For sympy.lambdify (gradc.reference evaluates stabilized graphs with it).
        return printer._print(sp.tanh(*self.args))


class Step(sp.Function):
    """1 where x > 0, else 0: the derivative of relu, choosing 0 at the kink (as PyTorch and JAX do)."""

    is_real = True

    def fdiff(self, argindex=1):
        return sp.Integer(0)


class Relu(sp.Function):
    """max(x, 0), with derivative Step(x) (0 at x = 0)."""

    is_real = True

    def fdiff(self, argindex=1):
        return Step(self.args[0])


class StopGradient(sp.Function):
    """The identity whose derivative is zero; removed before C is emitted."""

    is_real = True

    def fdiff(self, argindex=1):
        return sp.Integer(0)


class FiniteOrZero(sp.Function):
    """x where x is finite, else 0: the shift out of a sum of exponentials, which must not
    turn a row of -inf (an empty softmax) into NaN."""

    is_real = True

    def fdiff(self, argindex=1):
        return sp.Integer(1)


def lower_for_c(expr: sp.Expr) -> sp.Expr:
    """Replace the functions that have a ``c_form`` by it, so CSE shares their pieces."""
    for fn in (Sigmoid, Softplus, Tanh):
        if expr.has(fn):
            expr = expr.replace(fn, fn.c_form)
    return expr


def strip_stop_gradient(expr: sp.Expr) -> sp.Expr:
    return expr.replace(StopGradient, lambda a: a) if expr.has(StopGradient) else expr


def clean_derivative(expr: sp.Expr) -> sp.Expr:
    """Drop the distributional terms SymPy produces at kinks (DiracDelta of sign, Heaviside, ...).

    gradc's subgradient choices are made by the first-derivative rules (Step, sign,
    Heaviside(0) = 1/2 for max/min ties); their own derivatives are zero almost everywhere.
    """
    if expr.has(sp.DiracDelta):
        expr = expr.replace(sp.DiracDelta, lambda *a: sp.Integer(0))
    return expr
