"""gradc: a symbolic-to-code gradient compiler.

Write a loss or layer as a small Python function over ``gradc`` tensors, and gradc traces
it, differentiates it in reverse mode with SymPy, and emits readable, dependency-free C
that it builds into native kernels you can call on NumPy arrays.
"""

__version__ = "0.1.0"

from .dsl import (  # noqa: E402
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
from .errors import DimensionError, DTypeError, GradcError, ShapeError, TraceError, UnknownOpError  # noqa: E402
from .compiler import compile, hessian  # noqa: E402
from .check import CheckResult, check_grad  # noqa: E402
from .runtime import CompiledKernel  # noqa: E402
from . import optim  # noqa: E402


def __getattr__(name: str):
    # A misspelt op inside a kernel must name the user's line (the CLI prints one line,
    # not a traceback); dunder probes by tools stay plain AttributeErrors.
    if name.startswith("__"):
        raise AttributeError(f"module 'gradc' has no attribute {name!r}")
    import difflib

    from .dsl import _error

    public = [n for n in globals() if not n.startswith("_")]
    close = difflib.get_close_matches(name, public, n=3, cutoff=0.7)
    hint = f" (did you mean {', '.join('gradc.' + c for c in close)}?)" if close else ""
    raise _error(UnknownOpError, f"gradc has no function or attribute {name!r}{hint}")
