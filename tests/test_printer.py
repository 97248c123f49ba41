"""The SymPy → C expression printer on its own, without compiling C.

Code generation hands the printer a body after two small SymPy passes (functions with a
stable C form are expanded by ``scalar.lower_for_c``, small powers become products so
that CSE shares their bases); ``emitted`` below applies them as codegen does, and the
power tests check the printer both with and without them.  Besides string checks, printed expressions are evaluated by a small interpreter of the C
expression subset the printer emits (literals, `+ - * /`, comparisons, `&& || ! & |`, `?:`,
calls into <math.h>), with C's int/float rules.  That checks what a printed expression
*means*, so a precedence slip such as ``t/(a+1)*(a+1)`` for ``t/(a+1)**2`` is caught
whatever the exact spelling.
"""

import math
import re

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from gradc.printer import GradcCPrinter
from gradc.scalar import Relu, Sigmoid, Softplus, Step, StopGradient, expm1, log1p, lower_for_c

x, y, t0 = sp.symbols("x y t0", real=True)
N = sp.Symbol("N", integer=True, nonnegative=True)  # a named dimension: ptrdiff_t in C
# The libm-calling printer: this module's C evaluator knows libm, not the vectorisable
# helpers of templates/vecmath.c.j2 (tested in test_vecmath.py and below).
P32, P64 = GradcCPrinter("f32", vector_math=False), GradcCPrinter("f64")


# ----------------------------------------------------------------------------- a tiny C evaluator
TOKEN = re.compile(
    r"\s*(?:(?P<float>(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?[fF]?|\d+[eE][+-]?\d+[fF]?)"
    r"|(?P<int>\d+)|(?P<name>[A-Za-z_]\w*)|(?P<op>&&|\|\||[<>=!]=|[-+*/()?:,<>!|&]))"
)
BINARY = {
    "||": 1, "&&": 2, "|": 3, "&": 4, "==": 5, "!=": 5, "<": 6, "<=": 6, ">": 6, ">=": 6, "+": 7, "-": 7, "*": 8, "/": 8,
}  # fmt: skip


def _math(ftype):
    def wrap(f):
        return lambda *a: ftype(f(*(ftype(v) for v in a)))

    names = {
        "sin": np.sin, "cos": np.cos, "tan": np.tan, "exp": np.exp, "log": np.log, "sqrt": np.sqrt,
        "tanh": np.tanh, "sinh": np.sinh, "cosh": np.cosh, "asin": np.arcsin, "acos": np.arccos,
        "atan": np.arctan, "fabs": np.abs, "log1p": np.log1p, "expm1": np.expm1, "pow": np.power,
        "fmax": np.fmax, "fmin": np.fmin,
    }  # fmt: skip
    suffix = "f" if ftype is np.float32 else ""
    return {name + suffix: wrap(f) for name, f in names.items()}


class CExpr:
    """Parse once, evaluate with C semantics: ints stay ints (division truncates), else ``ftype``."""

    def __init__(self, code: str, dtype: str):
        self.ftype = np.float32 if dtype == "f32" else np.float64
        self.funcs = _math(self.ftype)
        self.tokens = []
        pos = 0
        code = code.strip()
        while pos < len(code):
            m = TOKEN.match(code, pos)
            assert m and m.end() > pos, f"cannot tokenize {code[pos:]!r}"
            kind = m.lastgroup
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
        self.pos = 0
        self.tree = self.ternary()
        assert self.pos == len(self.tokens), f"trailing tokens in {code!r}"

    # -- parsing (precedence climbing) -----------------------------------------------
    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else (None, None)

    def take(self, value=None):
        tok = self.peek()
        assert value is None or tok[1] == value, f"expected {value!r}, got {tok}"
        self.pos += 1
        return tok

    def ternary(self):
        cond = self.binary(1)
        if self.peek()[1] == "?":
            self.take("?")
            a = self.ternary()
            self.take(":")
            b = self.ternary()
            return ("?", cond, a, b)
        return cond

    def binary(self, level):
        left = self.unary()
        while True:
            op = self.peek()[1]
            if op not in BINARY or BINARY[op] < level:
                return left
            self.take()
            left = (op, left, self.binary(BINARY[op] + 1))

    def unary(self):
        kind, value = self.peek()
        if value in ("-", "+", "!"):
            self.take()
            return ("u" + value, self.unary())
        if value == "(" and self.tokens[self.pos + 1][1] in ("float", "double"):
            self.take("(")
            ctype = self.take()[1]
            self.take(")")
            return ("cast", np.float32 if ctype == "float" else np.float64, self.unary())
        if value == "(":
            self.take("(")
            inner = self.ternary()
            self.take(")")
            return inner
        self.take()
        if kind == "float":
            return ("lit", self.ftype(float(value.rstrip("fF"))))
        if kind == "int":
            return ("lit", int(value))
        if self.peek()[1] == "(":
            self.take("(")
            args = [self.ternary()]
            while self.peek()[1] == ",":
                self.take(",")
                args.append(self.ternary())
            self.take(")")
            return ("call", value, args)
        return ("var", value)

    # -- evaluation ----------------------------------------------------------------------
    def __call__(self, **env):
        with np.errstate(all="ignore"):
            return self.eval(self.tree, {k: v if isinstance(v, int) else self.ftype(v) for k, v in env.items()})

    def num(self, a, b):
        if isinstance(a, int) and isinstance(b, int):
            return a, b
        return self.ftype(a), self.ftype(b)

    def eval(self, node, env):
        kind = node[0]
        if kind == "lit":
            return node[1]
        if kind == "var":
            name = node[1]
            if name == "NAN":
                return self.ftype(np.nan)
            if name == "INFINITY":
                return self.ftype(np.inf)
            return env[name]
        if kind == "call":
            assert node[1] in self.funcs, f"{node[1]} is not a <math.h> function of this precision"
            return self.funcs[node[1]](*(self.eval(a, env) for a in node[2]))
        if kind == "?":
            return self.eval(node[2], env) if self.eval(node[1], env) else self.eval(node[3], env)
        if kind == "cast":
            return node[1](self.eval(node[2], env))
        if kind == "u-":
            return -self.eval(node[1], env)
        if kind == "u+":
            return self.eval(node[1], env)
        if kind == "u!":
            return int(not self.eval(node[1], env))
        op = kind
        if op == "&&":
            return int(bool(self.eval(node[1], env)) and bool(self.eval(node[2], env)))
        if op == "||":
            return int(bool(self.eval(node[1], env)) or bool(self.eval(node[2], env)))
        if op in ("|", "&"):  # on the 0/1 results of comparisons
            a, b = int(self.eval(node[1], env)), int(self.eval(node[2], env))
            return a | b if op == "|" else a & b
        a, b = self.num(self.eval(node[1], env), self.eval(node[2], env))
        if op == "/" and isinstance(a, int):
            return int(a / b)  # C truncates toward zero
        return {
            "+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b,
            "<": lambda: int(a < b), "<=": lambda: int(a <= b), ">": lambda: int(a > b),
            ">=": lambda: int(a >= b), "==": lambda: int(a == b), "!=": lambda: int(a != b),
        }[op]()  # fmt: skip


def printed(expr, dtype: str) -> str:
    return (P32 if dtype == "f32" else P64).doprint(expr)


def emitted(expr, dtype: str) -> str:
    """The C for ``expr`` as code generation prints a loop body."""
    return printed(lower_for_c(expr), dtype)


def c_value(expr, dtype="f64", via=emitted, **env):
    return CExpr(via(expr, dtype), dtype)(**env)


def test_the_evaluator_follows_c_rules():
    assert CExpr("1/2", "f64")() == 0
    assert CExpr("1.0/2", "f64")() == 0.5
    assert CExpr("2 + 3*4 - 6/2", "f64")() == 11
    assert CExpr("x > 0 ? 1 : 2", "f64")(x=-1) == 2
    assert CExpr("a/b*c", "f64")(a=8, b=2, c=2) == 8
    assert isinstance(CExpr("1.5F*x", "f32")(x=2), np.float32)
    assert CExpr("-1/N", "f64")(N=4) == 0
    assert CExpr("-1/((double)N)", "f64")(N=4) == -0.25


# ----------------------------------------------------------------------------- precision
FUNCS = [sp.sin, sp.cos, sp.tan, sp.exp, sp.log, sp.sqrt, sp.tanh, sp.sinh, sp.cosh, sp.asin, sp.acos, sp.atan, log1p, expm1]


@pytest.mark.parametrize("fn", FUNCS, ids=lambda f: getattr(f, "__name__", str(f)))
def test_float32_calls_the_f_suffixed_functions(fn):
    c32, c64 = P32.doprint(fn(x)), P64.doprint(fn(x))
    name = re.match(r"\w+", c64).group(0)
    assert c32 == c64.replace(name + "(", name + "f(", 1)
    assert c32.startswith(name + "f(")
    assert not re.search(r"\b\w+f\(", c64), c64


def test_float32_literals_and_helpers_are_single_precision():
    for expr in [x / 3, sp.Float(0.1) * x, x**2.5, sp.Abs(x) + sp.pi, Sigmoid(x), Softplus(x), (x + 1) ** -3]:
        c32, c64 = emitted(expr, "f32"), emitted(expr, "f64")
        assert not re.search(r"\b(pow|fabs|exp|log1p|fmax|fmin)\(", c32), c32
        floats32 = re.findall(r"\d+\.\d*(?:[eE][+-]?\d+)?[fF]?", c32)
        assert all(f.endswith(("f", "F")) for f in floats32), c32
        assert not re.search(r"\d[fF]\b", c64), c64
    assert P32.doprint(x**2.5).startswith("powf(")
    assert P64.doprint(sp.Abs(x)) == "fabs(x)"


def test_precision_of_printed_literals():
    third = sp.Rational(1, 3) * x
    assert c_value(third, "f64", x=1.0) == pytest.approx(1 / 3, rel=1e-16)
    assert c_value(sp.pi * x, "f64", x=1.0) == pytest.approx(math.pi, rel=1e-16)
    assert c_value(sp.E * x, "f32", x=1.0) == np.float32(math.e)


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("expr, want", [(-1 / N, -0.25), (x / N, 0.5), (N * x / 3, 8 / 3), ((N - 1) / (N + 1), 0.6), (1 / (N * x), 0.125)], ids=str)
def test_named_dimensions_divide_as_floats(expr, want, dtype):
    """Regression: mean over a named axis differentiated to ``-1/N``, C's integer division (0)."""
    assert c_value(expr, dtype, N=4, x=2.0) == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- powers
@pytest.mark.parametrize("via", [printed, emitted])
def test_power_in_a_denominator_regression(via):
    expr = t0 / (t0 + 1) ** 2
    code = via(expr, "f32")
    assert not code.startswith("t0/(t0 + 1)*"), code
    for v in (0.5, 2.0, -3.0):
        assert CExpr(code, "f32")(t0=v) == pytest.approx(v / (v + 1) ** 2, rel=1e-6)
        assert c_value(expr, "f64", via, t0=v) == pytest.approx(v / (v + 1) ** 2, rel=1e-15)


@pytest.mark.parametrize(
    "expr",
    [
        x**2 * y,
        y / x**2,
        y / x**3,
        y / (x * x**4),
        (x + y) ** -2,
        1 / (x + 1) ** 3,
        y * (x + 1) ** -4,
        x ** sp.Rational(1, 2) / y,
        y / sp.sqrt(x),
        x ** sp.Rational(-1, 2) * y**2,
        x**7 / y**5,
        x ** sp.Rational(3, 2),
        x**2.5,
        2**x / x**2,
        (-x) ** 2 / (y - x) ** 2,
        -(x**2),
        (x**2) ** 3,
        sp.exp(x) ** 2 / sp.sin(y) ** 2,
    ],
    ids=str,
)
@pytest.mark.parametrize("via", [printed, emitted])
def test_powers_print_with_the_right_precedence(expr, via):
    env = {"x": 1.7, "y": -0.6}
    want = float(expr.subs({x: env["x"], y: env["y"]}).evalf(30))
    assert c_value(expr, "f64", via, **env) == pytest.approx(want, rel=1e-12)
    assert c_value(expr, "f32", via, **env) == pytest.approx(want, rel=1e-5)


ATOMS = st.sampled_from([x, y, x + 1, 2 * y - 1, sp.Rational(3, 2), sp.Integer(2), sp.Float(0.25)])


def _combine(children):
    pair = st.tuples(children, children)
    return st.one_of(
        pair.map(lambda p: p[0] + p[1]),
        pair.map(lambda p: p[0] - p[1]),
        pair.map(lambda p: p[0] * p[1]),
        pair.map(lambda p: p[0] / (p[1] ** 2 + 1)),
        st.tuples(children, st.sampled_from([2, 3, 4, -1, -2, -3, sp.Rational(1, 2), sp.Rational(-1, 2), 5, sp.Rational(1, 3)])).map(
            lambda p: (p[0] ** 2 + 1) ** p[1]
        ),
        children.map(sp.sin),
        children.map(sp.tanh),
        children.map(lambda c: sp.exp(-(c**2))),
        children.map(Sigmoid),
        children.map(Softplus),
    )


expressions = st.recursive(ATOMS, _combine, max_leaves=8)
NUMPY_FUNCTIONS = {"Sigmoid": lambda v: 1 / (1 + np.exp(-v)), "Softplus": lambda v: np.logaddexp(0, v)}


@settings(max_examples=100, deadline=None)
@given(expr=expressions, xv=st.floats(-2, 2), yv=st.floats(-2, 2), via=st.sampled_from([printed, emitted]))
def test_random_expressions_print_to_equivalent_c(expr, xv, yv, via):
    if via is printed and expr.has(Sigmoid, Softplus):
        via = emitted
    fn = sp.lambdify([x, y], expr, modules=[NUMPY_FUNCTIONS, "numpy"])
    want = float(fn(np.float64(xv), np.float64(yv)))
    got = float(c_value(expr, "f64", via, x=xv, y=yv))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- selects
def test_piecewise_prints_as_a_select():
    expr = sp.Piecewise((sp.log(x), x > 0), (0, True))
    for printer, dtype in ((P32, "f32"), (P64, "f64")):
        code = printer.doprint(expr)
        assert "?" in code and ":" in code
        assert "*" not in code  # a select, not a product with a 0/1 mask
        ev = CExpr(code, dtype)
        assert ev(x=0.0) == 0 and ev(x=-1.0) == 0  # log(0) = -inf, log(-1) = NaN never leak
        assert ev(x=math.e) == pytest.approx(1.0, rel=1e-6)


def test_piecewise_with_several_conditions():
    expr = sp.Piecewise((1, x > 1), (sp.exp(x), x > 0), (-(x**2), True))
    ev = CExpr(P64.doprint(expr), "f64")
    assert ev(x=2.0) == 1
    assert ev(x=0.5) == pytest.approx(math.exp(0.5))
    assert ev(x=-3.0) == -9


def test_piecewise_without_otherwise_is_nan_outside():
    expr = sp.Piecewise((x, x > 0))
    ev = CExpr(P64.doprint(expr), "f64")
    assert ev(x=2.0) == 2 and math.isnan(ev(x=-1.0))


def test_boolean_conditions():
    expr = sp.Piecewise((1, sp.And(x > 0, sp.Or(y < 0, sp.Not(sp.Eq(x, y))))), (0, True))
    ev = CExpr(P64.doprint(expr), "f64")
    for xv, yv in [(1, -1), (1, 1), (1, 2), (-1, -1), (0, 0)]:
        assert ev(x=xv, y=yv) == int(xv > 0 and (yv < 0 or xv != yv))


@pytest.mark.parametrize(
    "expr, points",
    [
        (Relu(x), {-2.0: 0.0, 0.0: 0.0, 3.0: 3.0}),
        (Step(x), {-2.0: 0.0, 0.0: 0.0, 3.0: 1.0}),
        (sp.Heaviside(x), {-2.0: 0.0, 0.0: 0.5, 3.0: 1.0}),
        (sp.sign(x), {-2.0: -1.0, 0.0: 0.0, 3.0: 1.0}),
        (sp.Abs(x), {-2.0: 2.0, 0.0: 0.0, 3.0: 3.0}),
        (sp.Max(x, 0), {-2.0: 0.0, 0.0: 0.0, 3.0: 3.0}),
        (sp.Min(x, 1, 2 * x), {-2.0: -4.0, 0.75: 0.75, 3.0: 1.0}),
        (sp.Max(x, -x, 1), {-2.0: 2.0, 0.5: 1.0, 3.0: 3.0}),
        (StopGradient(x) * 2, {-2.0: -4.0, 3.0: 6.0}),
    ],
    ids=str,
)
def test_kinked_functions(expr, points):
    for dtype in ("f32", "f64"):
        ev = CExpr((P32 if dtype == "f32" else P64).doprint(expr), dtype)
        for v, want in points.items():
            assert ev(x=v) == want, (expr, dtype, v)


@pytest.mark.parametrize("expr", [sp.Max(x, 0), sp.Min(x, 1), sp.Max(x, -x, 1)], ids=str)
def test_max_and_min_propagate_nan_as_numpy_and_test_constants_for_none(expr):
    # NumPy's maximum/minimum: NaN in, NaN out.  A constant cannot be NaN, so its select
    # tests only the comparison (no "0 != 0" in the C).
    code = P32.doprint(expr)
    assert not re.search(r"\b(\d+(\.\d*)?F?) != \1\b", code), code
    for dtype in ("f32", "f64"):
        assert math.isnan(CExpr((P32 if dtype == "f32" else P64).doprint(expr), dtype)(x=math.nan))


def test_kinked_functions_print_no_calls_to_missing_helpers():
    for expr in (Relu(x), Step(x), sp.Heaviside(x), sp.sign(x), StopGradient(x)):
        code = P64.doprint(expr)
        assert not re.search(r"\b(Relu|Step|Heaviside|sign|StopGradient)\b", code), code


# ----------------------------------------------------------------------------- stable forms
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_sigmoid_is_stable_for_large_arguments(dtype):
    code = emitted(Sigmoid(x), dtype)
    ev = CExpr(code, dtype)
    tiny = float(np.finfo(np.float32 if dtype == "f32" else np.float64).tiny)
    for v in (-1000.0, -100.0, -20.0, 0.0, 20.0, 100.0, 1000.0):
        got = ev(x=v)
        assert np.isfinite(got), (v, code)
        want = 1 / (1 + math.exp(-v)) if v > -700 else 0.0
        assert float(got) == pytest.approx(want, rel=1e-6, abs=tiny)


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_softplus_is_stable_for_large_arguments(dtype):
    code = emitted(Softplus(x), dtype)
    assert "log1p" in code
    ev = CExpr(code, dtype)
    tiny = float(np.finfo(np.float32 if dtype == "f32" else np.float64).tiny)
    for v in (-1000.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0, 1000.0):
        got = ev(x=v)
        assert np.isfinite(got), (v, code)
        assert float(got) == pytest.approx(float(np.logaddexp(0.0, v)), rel=1e-6, abs=tiny)


def test_sigmoid_derivative_prints_finite_at_extremes():
    deriv = sp.diff(Sigmoid(x), x)
    for dtype in ("f32", "f64"):
        ev = CExpr(emitted(deriv, dtype), dtype)
        for v in (-200.0, 200.0):
            assert np.isfinite(ev(x=v)) and abs(ev(x=v)) < 1e-30
        assert ev(x=0.0) == pytest.approx(0.25)


POSIX_CONSTANTS = [sp.E, 1 / sp.log(2), sp.log(2), sp.log(10), sp.pi, sp.pi / 2, sp.pi / 4, 1 / sp.pi, 2 / sp.pi]
POSIX_CONSTANTS += [2 / sp.sqrt(sp.pi), sp.sqrt(2), sp.sqrt(2) / 2]


@pytest.mark.parametrize("constant", POSIX_CONSTANTS, ids=str)
def test_constants_print_without_posix_macros(constant):
    """M_LN2 and friends are POSIX, not C99: ``cc -std=c99`` rejects them (e.g. d/dx 2**x)."""
    for dtype in ("f32", "f64"):
        code = emitted(constant * x, dtype)
        assert not re.search(r"\bM_\w+", code), code
        assert CExpr(code, dtype)(x=1.0) == pytest.approx(float(constant), rel=1e-6)


def test_printed_code_needs_only_c99_math():
    exprs = [sp.pi * x, sp.E**x, sp.exp(1) * x, sp.Piecewise((x, x > 0), (y, True)), sp.Max(x, y), Softplus(x) + Sigmoid(y)]
    for expr in exprs:
        for dtype in ("f32", "f64"):
            code = emitted(expr, dtype)
            assert "M_PI" not in code and "M_E" not in code, code
            # the evaluator knows only <math.h> functions of the printer's precision
            assert np.isfinite(CExpr(code, dtype)(x=0.5, y=-0.5)), code


@pytest.mark.parametrize(
    "fn, helper, needs",
    [
        (sp.exp, "gradc_expf", {"gradc_expf", "gradc_float_of"}),
        (sp.log, "gradc_logf", {"gradc_logf", "gradc_bits_of", "gradc_float_of"}),
        (log1p, "gradc_log1pf", {"gradc_log1pf", "gradc_logf", "gradc_bits_of", "gradc_float_of"}),
        (sp.tanh, "gradc_tanhf", {"gradc_tanhf", "gradc_expf", "gradc_float_of"}),
    ],
)
def test_float32_uses_vectorisable_helpers_and_records_them(fn, helper, needs):
    printer = GradcCPrinter("f32")
    assert printer.doprint(fn(x)) == f"{helper}(x)"
    assert printer.helpers == needs
    # Constants stay libm calls (the C compiler folds them), and float64 never uses helpers.
    assert not GradcCPrinter("f32").doprint(fn(sp.Rational(1, 2))).startswith("gradc_")
    p64 = GradcCPrinter("f64")
    assert not p64.doprint(fn(x)).startswith("gradc_") and not p64.helpers
