"""Scalar functions SymPy lacks, each with its derivative rule beside its definition.

SymPy differentiates everything else.  These functions stay opaque to SymPy's own
rewriting so that their stable C forms (see :mod:`gradc.codegen`) survive to the output.
"""

from __future__ import annotations

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

__all__ = ["Sigmoid", "Softplus", "Relu", "StopGradient", "Step", "log1p", "expm1", "strip_stop_gradient", "clean_derivative"]


class Sigmoid(sp.Function):
    """1 / (1 + exp(-x)); emitted in a form that never overflows for either sign."""

    is_real = True

    def fdiff(self, argindex=1):
        s = Sigmoid(self.args[0])
        return s * (1 - s)


class Softplus(sp.Function):
    """log(1 + exp(x)); emitted as max(x, 0) + log1p(exp(-|x|))."""

    is_real = True

    def fdiff(self, argindex=1):
        return Sigmoid(self.args[0])


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
