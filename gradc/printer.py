"""SymPy → C99 expression printing: float32 or float64 math, stable forms of gradc's functions.

The printer knows expression syntax only; the shape of the emitted files lives in the
Jinja templates (see :mod:`gradc.codegen`).
"""

from __future__ import annotations

import sympy as sp
from sympy.codegen.ast import float32, float64, real
from sympy.printing.c import C99CodePrinter


#: float32 functions with a vectorisable implementation in templates/vecmath.c.j2
VECTOR_MATH = {
    "exp": "gradc_expf",
    "log": "gradc_logf",
    "log1p": "gradc_log1pf",
    "tanh": "gradc_tanhf",
    "sin": "gradc_sinf",
    "cos": "gradc_cosf",
}
_SHARED_BY_SIN_AND_COS = (
    "gradc_quarter_turns",
    "gradc_mod4",
    "gradc_two_sum",
    "gradc_two_over_pi_piece",
    "gradc_sin_quarter_turns",
)
#: what each helper calls in turn, all the way down
VECTOR_MATH_NEEDS = {
    "gradc_expf": ("gradc_float_of",),
    "gradc_logf": ("gradc_bits_of", "gradc_float_of"),
    "gradc_log1pf": ("gradc_logf", "gradc_bits_of", "gradc_float_of"),
    "gradc_tanhf": ("gradc_expf", "gradc_float_of"),
    "gradc_sinf": _SHARED_BY_SIN_AND_COS + ("gradc_bits_of",),
    "gradc_cosf": _SHARED_BY_SIN_AND_COS,
    "gradc_sinf_near": ("gradc_quarter_turns_near", "gradc_sin_quarter_turns", "gradc_bits_of"),
    "gradc_cosf_near": ("gradc_quarter_turns_near", "gradc_sin_quarter_turns"),
}
#: sin and cos in their forms for small arguments (see codegen's near_path)
NEAR_FORMS = {"gradc_sinf": "gradc_sinf_near", "gradc_cosf": "gradc_cosf_near"}
#: the bound on |x| of those forms
NEAR_BOUND = "0x1p19f"
#: every helper, each after the ones it calls
VECTOR_MATH_ORDER = (
    "gradc_bits_of",
    "gradc_float_of",
    "gradc_expf",
    "gradc_logf",
    "gradc_log1pf",
    "gradc_tanhf",
    "gradc_mod4",
    "gradc_two_sum",
    "gradc_two_over_pi_piece",
    "gradc_quarter_turns",
    "gradc_quarter_turns_near",
    "gradc_sin_quarter_turns",
    "gradc_sinf",
    "gradc_cosf",
    "gradc_sinf_near",
    "gradc_cosf_near",
)


class GradcCPrinter(C99CodePrinter):
    """C99 printer for one precision.

    Every function it calls is in ``<math.h>``, or, in float32 with ``vector_math``, one of
    the helpers of templates/vecmath.c.j2, which it records in ``helpers``.
    """

    def __init__(self, dtype: str, vector_math: bool = True):
        # No math_macros: M_LN2, M_SQRT2, ... are POSIX, not C99 (log(2) would print as M_LN2).
        super().__init__(settings={"type_aliases": {real: float32 if dtype == "f32" else float64}, "math_macros": {}})
        self.dtype = dtype
        self.ctype = "float" if dtype == "f32" else "double"
        self.suffix = "f" if dtype == "f32" else ""
        self.vector_math = vector_math and dtype == "f32"
        self.helpers: set[str] = set()
        #: print sin and cos in their forms for |x| <= 2^19 (NEAR_FORMS), for the second body
        #: of a loop nest that checks its arguments first (codegen's near_path)
        self.near = False

    def _helper(self, name: str, arg) -> str | None:
        return VECTOR_MATH.get(name) if self.vector_math and not arg.is_number else None

    def has_near_form(self, call: sp.Expr) -> bool:
        """``call`` is a sin or cos that prints as a helper with a form for small arguments."""
        return isinstance(call, (sp.sin, sp.cos)) and self._helper(type(call).__name__, call.args[0]) in NEAR_FORMS

    def near_arguments(self, expr: sp.Expr) -> list[sp.Expr]:
        """The arguments of those calls in ``expr``, in the order of its tree (not of a set:
        the C must not depend on Python's hash seed)."""
        return [f.args[0] for f in sp.preorder_traversal(expr) if self.has_near_form(f)]

    def _call(self, name: str, arg) -> str:
        """``name(arg)`` in this precision, through a vectorisable helper where there is one."""
        helper = self._helper(name, arg)
        if helper is None:
            return f"{self.fn(name)}({self._print(arg)})"
        if self.near:
            helper = NEAR_FORMS.get(helper, helper)
        self.helpers.add(helper)
        self.helpers.update(VECTOR_MATH_NEEDS.get(helper, ()))
        return f"{helper}({self._print(arg)})"

    def _print_exp(self, expr):
        return self._call("exp", expr.args[0])

    def _print_log(self, expr):
        if len(expr.args) > 1:
            return super()._print_log(expr)
        return self._call("log", expr.args[0])

    def _print_log1p(self, expr):
        return self._call("log1p", expr.args[0])

    def _print_tanh(self, expr):
        return self._call("tanh", expr.args[0])

    def _print_sin(self, expr):
        return self._call("sin", expr.args[0])

    def _print_cos(self, expr):
        return self._call("cos", expr.args[0])

    def fn(self, name: str) -> str:
        return name + self.suffix

    def lit(self, value) -> str:
        return self._print(sp.Float(value) if not isinstance(value, sp.Basic) else value)

    def _print_Symbol(self, expr):
        name = super()._print_Symbol(expr)
        # Integer symbols are named dimensions (ptrdiff_t): cast, or 1/N is C's integer division.
        return f"(({self.ctype}){name})" if expr.is_integer else name

    # -- constants ----------------------------------------------------------------
    def _print_Pi(self, expr):
        # M_PI is POSIX, not C99.
        return self._print(sp.Float(sp.pi.evalf(20), 20))

    def _print_Exp1(self, expr):
        return self._print(sp.Float(sp.E.evalf(20), 20))

    # -- powers: small integer powers as products, halves as square roots --------------
    def _print_Pow(self, expr):
        base, e = expr.base, expr.exp
        if e.is_Integer and 2 <= int(e) <= 4:
            b = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Mul"])
            # Parenthesised: the Mul printer treats a Pow as atomic (e.g. in a denominator).
            return "(" + "*".join([b] * int(e)) + ")"
        if e.is_Integer and -4 <= int(e) <= -1:
            return f"({self.lit(1)}/({self._print(base ** (-e))}))"
        if e == sp.Rational(1, 2):
            return f"{self.fn('sqrt')}({self._print(base)})"
        if e == -sp.Rational(1, 2):
            return f"({self.lit(1)}/{self.fn('sqrt')}({self._print(base)}))"
        if base == sp.E:
            return self._call("exp", e)
        return f"{self.fn('pow')}({self._print(base)}, {self._print(e)})"

    # -- gradc's scalar functions (Sigmoid and Softplus are lowered before CSE: scalar.lower_for_c)
    def _print_Sigmoid(self, expr):
        # Codegen lowers these before CSE (scalar.lower_for_c); this serves direct printing.
        return self._print(expr.c_form(expr.args[0]))

    _print_Softplus = _print_Sigmoid

    def _print_FiniteOrZero(self, expr):
        x = self._print(expr.args[0])
        return f"(isfinite({x}) ? {x} : {self.lit(0)})"

    def _print_Relu(self, expr):
        x = self._print(expr.args[0])
        # relu(NaN) = NaN, as in NumPy's maximum(x, 0): NaN <= 0 is false.
        return f"({x} <= 0 ? {self.lit(0)} : {x})"

    def _print_Step(self, expr):
        x = self._print(expr.args[0])
        return f"({x} > 0 ? {self.lit(1)} : {self.lit(0)})"

    def _print_Heaviside(self, expr):
        x = self._print(expr.args[0])
        h0 = expr.args[1] if len(expr.args) > 1 else sp.Rational(1, 2)
        return f"({x} > 0 ? {self.lit(1)} : ({x} < 0 ? {self.lit(0)} : {self.lit(h0)}))"

    def _print_sign(self, expr):
        x = self._print(expr.args[0])
        # sign(0) = 0 and sign(NaN) = NaN, as in NumPy.
        return f"({x} > 0 ? {self.lit(1)} : ({x} < 0 ? {self.lit(-1)} : {x}))"

    def _print_StopGradient(self, expr):
        return self._print(expr.args[0])

    def _nan_select(self, expr, cmp: str) -> str:
        # NumPy's maximum/minimum: a NaN in either operand is the result (fmax/fmin drop it).
        if len(expr.args) == 1:
            return self._print(expr.args[0])
        a = self._print(expr.args[0])
        b = self._print(expr.func(*expr.args[1:]) if len(expr.args) > 2 else expr.args[1])
        if expr.args[0].is_number and expr.args[0].is_finite:  # a cannot be NaN: b's NaN falls through
            return f"(({a} {cmp} {b}) ? {a} : {b})"
        return f"((({a} {cmp} {b}) | ({a} != {a})) ? {a} : {b})"

    def _print_Max(self, expr):
        return self._nan_select(expr, ">")

    def _print_Min(self, expr):
        return self._nan_select(expr, "<")

    def _print_Piecewise(self, expr):
        # A select, not a product with a mask: the branch not taken never leaks Inf/NaN.
        *pieces, (last, last_cond) = expr.args
        if last_cond is not sp.true:
            pieces.append((last, last_cond))
            last = sp.nan
        out = self._print(last)
        for value, cond in reversed(pieces):
            out = f"({self._print(cond)} ? {self._print(value)} : {out})"
        return out

    def _print_Relational(self, expr):
        return f"({self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)})"

    def _print_BooleanTrue(self, expr):
        return "1"

    def _print_BooleanFalse(self, expr):
        return "0"

    def _print_And(self, expr):
        # Bitwise on 0/1 values: no short circuit, so no branch to stop vectorisation.
        return "(" + " & ".join(f"({self._print(a)})" for a in expr.args) + ")"

    def _print_Or(self, expr):
        return "(" + " | ".join(f"({self._print(a)})" for a in expr.args) + ")"

    def _print_Not(self, expr):
        return f"(!{self._print(expr.args[0])})"


class IndexPrinter(C99CodePrinter):
    """Integer index and extent arithmetic (``ptrdiff_t``)."""

    def _print_Relational(self, expr):
        return f"{self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)}"

    def _print_And(self, expr):
        return " && ".join(f"({self._print(a)})" for a in expr.args)
