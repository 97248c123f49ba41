"""1 / exp(x) at x = 100 in float32: tape-based autodiff returns NaN for the gradient.

A tape computes d/dx (1/u) * du/dx = (-1/u**2) * exp(x) with u = exp(100) = inf in float32,
which is -0 * inf = NaN. gradc differentiates symbolically: SymPy rewrites 1/exp(x) to
exp(-x), whose derivative -exp(-x) is a finite (tiny) number.
"""

import numpy as np

import gradc
from gradc import f32


@gradc.kernel
def inverse_exp(x: f32[()]):
    return 1 / gradc.exp(x)


if __name__ == "__main__":
    k = gradc.compile(inverse_exp, wrt=["x"])
    for x in (0.0, 10.0, 100.0):
        y, (dy,) = k.value_and_grad(np.float32(x))
        print(f"x = {x:5}: 1/exp(x) = {float(y):.6g}   d/dx = {float(dy):.6g}   finite: {bool(np.isfinite(dy))}")
    with np.errstate(all="ignore"):
        u = np.exp(np.float32(100))
        tape = (-np.float32(1) / (u * u)) * u
    print(f"a tape's chain rule at x = 100 in float32: (-1/u**2) * exp(x) = {tape}")
