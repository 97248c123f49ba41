"""The gradc kernels of the benchmark's workloads.

They live apart from ``workloads.py`` so that ``gradc compile benchmarks/kernels.py`` can
export them as a package (the cache-load measurement imports that package).
"""

import gradc
from gradc import f32


@gradc.kernel
def custom_layer(X: f32["N", "K"], W: f32["K", "M"]):
    return gradc.sum(gradc.sin(X @ W) ** 2)


@gradc.kernel
def mlp(X: f32["B", 64], W1: f32[64, 128], b1: f32[128], W2: f32[128, 10], b2: f32[10], Y: f32["B", 10]):
    H = gradc.tanh(X @ W1 + b1)
    P = H @ W2 + b2
    return gradc.mean((P - Y) ** 2)


@gradc.kernel
def elementwise(x: f32["n"], y: f32["n"]):
    return gradc.sum(gradc.softplus(x) * gradc.sigmoid(y) + gradc.exp(-x * x))


# The same kernel as examples/gradient_penalty.py, kept here so that the benchmark does
# not depend on the examples' layout.
@gradc.kernel
def gradient_penalty(input: f32["B", 4], Wt: f32[3, 4], b: f32[3], target: f32["B", 3]):
    def linear(x):
        return x @ Wt.T + b

    output = linear(input)
    mse = gradc.mean((output - target) ** 2)
    g = gradc.grad(lambda x: gradc.sum(linear(x)))(input)
    norms = gradc.sqrt(gradc.sum(g * g, axis=1))
    penalty = gradc.mean((norms - 1) ** 2)
    return mse + penalty


@gradc.kernel
def total(x: f32["n"]):
    return gradc.sum(x)
