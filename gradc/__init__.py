"""gradc: a symbolic-to-code gradient compiler.

Write a loss or layer as a small Python function over ``gradc`` tensors, and gradc traces
it, differentiates it in reverse mode with SymPy, and emits readable, dependency-free C
that it builds into native kernels you can call on NumPy arrays.
"""

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DimensionError, DTypeError, GradcError, ShapeError, TraceError, UnknownOpError

__version__ = "0.1.0"

#: Where each public name lives, loaded on first use.  ``import gradc`` (and gradc's exception
#: classes, which a package that ``gradc compile`` wrote raises) then costs no SymPy, Jinja or
#: cffi import: the DSL and the compiler load with the first ``gradc.kernel`` or ``gradc.f32``
#: (code generation and Jinja only when a kernel is first lowered).
_LAZY = {
    "Dim": ("dsl", "Dim"),
    "Tensor": ("dsl", "Tensor"),
    "TensorType": ("dsl", "TensorType"),
    "abs": ("dsl", "abs_"),
    "arccos": ("dsl", "arccos"),
    "arcsin": ("dsl", "arcsin"),
    "arctan": ("dsl", "arctan"),
    "broadcast_to": ("dsl", "broadcast_to"),
    "concatenate": ("dsl", "concatenate"),
    "cos": ("dsl", "cos"),
    "cosh": ("dsl", "cosh"),
    "custom_gradient": ("dsl", "custom_gradient"),
    "einsum": ("dsl", "einsum"),
    "exp": ("dsl", "exp"),
    "expm1": ("dsl", "expm1"),
    "f32": ("dsl", "f32"),
    "f64": ("dsl", "f64"),
    "grad": ("dsl", "grad"),
    "kernel": ("dsl", "kernel"),
    "log": ("dsl", "log"),
    "log1p": ("dsl", "log1p"),
    "logsumexp": ("dsl", "logsumexp"),
    "matmul": ("dsl", "matmul"),
    "max": ("dsl", "max"),
    "maximum": ("dsl", "maximum"),
    "mean": ("dsl", "mean"),
    "min": ("dsl", "min"),
    "minimum": ("dsl", "minimum"),
    "negative": ("dsl", "negative"),
    "reciprocal": ("dsl", "reciprocal"),
    "relu": ("dsl", "relu"),
    "reshape": ("dsl", "reshape"),
    "sigmoid": ("dsl", "sigmoid"),
    "sign": ("dsl", "sign"),
    "sin": ("dsl", "sin"),
    "sinh": ("dsl", "sinh"),
    "softplus": ("dsl", "softplus"),
    "sqrt": ("dsl", "sqrt"),
    "square": ("dsl", "square"),
    "stack": ("dsl", "stack"),
    "stop_gradient": ("dsl", "stop_gradient"),
    "sum": ("dsl", "sum"),
    "tan": ("dsl", "tan"),
    "tanh": ("dsl", "tanh"),
    "transpose": ("dsl", "transpose"),
    "value_and_grad": ("dsl", "value_and_grad"),
    "where": ("dsl", "where"),
    "compile": ("compiler", "compile"),
    "hessian": ("compiler", "hessian"),
    "CheckResult": ("check", "CheckResult"),
    "check_grad": ("check", "check_grad"),
    "CompiledKernel": ("runtime", "CompiledKernel"),
    "optim": ("optim", None),
}

__all__ = ["DimensionError", "DTypeError", "GradcError", "ShapeError", "TraceError", "UnknownOpError", *_LAZY]

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from . import optim
    from .check import CheckResult, check_grad
    from .compiler import compile, hessian
    from .dsl import (
        Dim,
        Tensor,
        TensorType,
        abs_ as abs,
        arccos,
        arcsin,
        arctan,
        broadcast_to,
        concatenate,
        cos,
        cosh,
        custom_gradient,
        einsum,
        exp,
        expm1,
        f32,
        f64,
        grad,
        kernel,
        log,
        log1p,
        logsumexp,
        matmul,
        max,
        maximum,
        mean,
        min,
        minimum,
        negative,
        reciprocal,
        relu,
        reshape,
        sigmoid,
        sign,
        sin,
        sinh,
        softplus,
        sqrt,
        square,
        stack,
        stop_gradient,
        sum,
        tan,
        tanh,
        transpose,
        value_and_grad,
        where,
    )
    from .runtime import CompiledKernel


def __getattr__(name: str):
    where = _LAZY.get(name)
    if where is not None:
        module = importlib.import_module(f"{__name__}.{where[0]}")
        if where[0] == "dsl":
            # Who writes a kernel compiles it: the compiler loads with the DSL, so that a warm
            # gradc.compile (a few ms) does not pay for imports.
            importlib.import_module(f"{__name__}.compiler")
        value = module if where[1] is None else getattr(module, where[1])
        globals()[name] = value
        return value
    if name.startswith("__"):  # probes by tools
        raise AttributeError(f"module 'gradc' has no attribute {name!r}")
    if (Path(__file__).parent / f"{name}.py").is_file():  # gradc.ir and the like, as after `import gradc.ir`
        return importlib.import_module(f"{__name__}.{name}")
    import difflib

    close = difflib.get_close_matches(name, __all__, n=3, cutoff=0.7)
    message = f"gradc has no function or attribute {name!r}" + (f" (did you mean {', '.join('gradc.' + c for c in close)}?)" if close else "")
    if "gradc.dsl" not in sys.modules:
        # No kernel has been written, so this is no kernel's line: a tool probing attributes
        # (IPython does), which should not pay for importing SymPy.
        raise UnknownOpError(message)
    # A misspelt op inside a kernel names the user's line (the CLI prints one line, not a traceback).
    from .dsl import _error

    raise _error(UnknownOpError, message)


def __dir__() -> list[str]:
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})
