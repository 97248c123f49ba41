"""Optimiser steps as gradc kernels, so that a whole training step is generated code.

Each factory returns a forward-only ``@gradc.kernel`` (``wrt=[]``) over tensors of the
shape given by its dimensions: it reads a parameter, its gradient and the optimiser's
state, and returns the updated parameter and state.  Compile it like any kernel, from
Python (``gradc.compile(gradc.optim.adam("P"))``) or from a DSL file with ``gradc compile``
(``step = gradc.optim.adam("P")`` at module level compiles to ``step_forward``).

The updates go into new arrays, never in place: in C the outputs may not alias the
inputs, so a training loop keeps two buffers for the parameter and each state and swaps
them after every step.  To update several tensors with one call, keep them in one flat
array (dimension ``"P"``) and point each layer's arguments into it.

A hyper-parameter given as a number is a constant compiled into the C; one given as
``None`` is a 0-d input of the kernel (after the tensors, in the order of the factory's
keywords), so that a schedule can change it at every step without recompiling.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

from . import dsl
from .dsl import Kernel

_DTYPES = {"f32": dsl.f32, "f64": dsl.f64}


def sgd_momentum(*dims, lr: float | None = None, momentum: float | None = 0.9, dtype: str = "f32") -> Kernel:
    """SGD with momentum, as ``torch.optim.SGD`` (dampening 0, no Nesterov)::

        velocity_new = momentum * velocity + grad
        param_new    = param - lr * velocity_new

    Kernel parameters: ``param, grad, velocity`` (shape ``dims``), then ``lr`` and
    ``momentum`` when they are inputs.  Returns ``(param_new, velocity_new)``; start
    with ``velocity = 0``.
    """

    def update(param, grad, velocity, lr, momentum):
        velocity_new = momentum * velocity + grad
        param_new = param - lr * velocity_new
        return param_new, velocity_new

    return _kernel("sgd_momentum", update, dims, ["param", "grad", "velocity"], [], {"lr": lr, "momentum": momentum}, dtype)


def adam(
    *dims,
    lr: float | None = None,
    beta1: float | None = 0.9,
    beta2: float | None = 0.999,
    eps: float | None = 1e-8,
    dtype: str = "f32",
) -> Kernel:
    """Adam, as ``torch.optim.Adam`` (no weight decay, no AMSGrad)::

        m_new     = beta1 * m + (1 - beta1) * grad
        v_new     = beta2 * v + (1 - beta2) * grad**2
        param_new = param - lr * (m_new / (1 - beta1**step)) / (sqrt(v_new / (1 - beta2**step)) + eps)

    Kernel parameters: ``param, grad, m, v`` (shape ``dims``), ``step`` (0-d: the number
    of this step, 1 for the first), then whichever of ``lr, beta1, beta2, eps`` are
    inputs.  Returns ``(param_new, m_new, v_new)``; start with ``m = v = 0``.
    """

    def update(param, grad, m, v, step, lr, beta1, beta2, eps):
        m_new = beta1 * m + (1 - beta1) * grad
        v_new = beta2 * v + (1 - beta2) * (grad * grad)
        m_hat = m_new / (1 - beta1**step)
        v_hat = v_new / (1 - beta2**step)
        param_new = param - lr * m_hat / (dsl.sqrt(v_hat) + eps)
        return param_new, m_new, v_new

    hypers = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps}
    return _kernel("adam", update, dims, ["param", "grad", "m", "v"], ["step"], hypers, dtype)


def _kernel(name: str, update: Callable, dims: tuple, tensors: list[str], scalars: list[str], hypers: dict, dtype: str) -> Kernel:
    """A kernel ``name(*tensors, *scalars, *input hypers)`` that calls ``update`` with the constants filled in."""
    if dtype not in _DTYPES:
        raise ValueError(f"gradc.optim.{name}: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    T = _DTYPES[dtype]
    shape = T[tuple(dims)]  # checks the dimensions, with gradc's own message
    constants = {}
    for key, value in hypers.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"gradc.optim.{name}: {key} must be a finite number, or None to make it an input; got {value!r}")
        constants[key] = float(value)
    annotations = {n: shape for n in tensors} | {n: T[()] for n in scalars}
    annotations |= {n: T[()] for n, v in hypers.items() if v is None}
    names = list(annotations)

    def step(*args):
        return update(**dict(zip(names, args)), **constants)

    step.__name__ = step.__qualname__ = name
    baked = ", ".join(f"{k}={v!r}" for k, v in constants.items())
    step.__doc__ = f"One gradc.optim.{name} step over {shape!r} tensors{'; constants ' + baked if baked else ''}."
    step.__annotations__ = annotations
    step.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    # The generated C quotes the kernel's source: show the update, not this adapter.
    step.__wrapped__ = update
    return dsl.kernel(step, wrt=[])
