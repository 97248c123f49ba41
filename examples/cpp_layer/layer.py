"""Custom layers for the C++ example (main.cpp), after PyTorch's C++ autograd tutorial.

CMake runs `gradc compile layer.py --emit c` to turn this file into layer.c and layer.h,
compiles layer.c as C and main.cpp as C++, and links them.
"""

import gradc
from gradc import f64


@gradc.kernel
def tutorial(x: f64["N", "M"]):
    """The tutorial's first graph: y = x + 2, z = 3 y^2, out = mean(z)."""
    y = x + 2
    z = y * y * 3
    return gradc.mean(z)


@gradc.kernel
def linear(X: f64["N", "K"], W: f64["M", "K"], b: f64["M"]):
    """The tutorial's LinearFunction: X W^T + b, an N x M output (backward through vjp)."""
    return X @ W.T + b


@gradc.kernel
def sin_layer(X: f64["N", "K"], W: f64["K", "M"], b: f64["M"]):
    """A dense layer with a sine activation and a bias, reduced to a scalar: sum(sin(X W + b)^2)."""
    Y = gradc.sin(X @ W + b)
    return gradc.sum(Y * Y)
