"""The workloads of the benchmark: inputs and hand-written NumPy gradients for each kernel.

Each workload is one loss at one size.  Its ``numpy_vg`` is the hand-written NumPy peer;
called on float64 copies of the inputs it is also the reference that every implementation,
gradc included, is checked against.  The other peers' losses live in ``peers.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from gradc.dsl import Kernel
from kernels import custom_layer, elementwise, gradient_penalty, mlp


# -- hand-written NumPy gradients (dtype follows the inputs) ---------------------------------


def np_custom_layer(X, W):
    Z = X @ W
    S = np.sin(Z)
    dZ = np.sin(2 * Z)  # d sin(z)^2 / dz = 2 sin z cos z
    return np.sum(S * S), [dZ @ W.T, X.T @ dZ]


def np_mlp(X, W1, b1, W2, b2, Y):
    H = np.tanh(X @ W1 + b1)
    R = H @ W2 + b2 - Y
    dP = R * (2 / R.size)
    dA = (dP @ W2.T) * (1 - H * H)
    return np.mean(R * R), [X.T @ dA, dA.sum(axis=0), H.T @ dP, dP.sum(axis=0)]


def np_elementwise(x, y):
    sx = 1 / (1 + np.exp(-x))
    sy = 1 / (1 + np.exp(-y))
    sp = np.logaddexp(0, x)
    g = np.exp(-x * x)
    return np.sum(sp * sy + g), [sx * sy - 2 * x * g, sp * sy * (1 - sy)]


def np_gradient_penalty(input, Wt, b, target):
    # The inner gradient d sum(linear(x)) / dx is the column sums of Wt for every row, so
    # the penalty is one number and its gradient is the same for every row of Wt.
    R = input @ Wt.T + b - target
    dO = R * (2 / R.size)
    c = Wt.sum(axis=0)
    norm = np.sqrt(c @ c)
    dWt = dO.T @ input + (2 * (norm - 1) / norm) * c
    return np.mean(R * R) + (norm - 1) ** 2, [dO @ Wt, dWt]


@dataclass
class Workload:
    """One loss at one size; ``inputs`` are float32 arrays, one per kernel parameter."""

    name: str
    size: str
    args: tuple  # the factory's size arguments: FACTORIES[name](*args) makes this workload again
    kernel: Kernel
    wrt: list[str]
    inputs: dict[str, np.ndarray]
    numpy_vg: Callable

    @property
    def label(self) -> str:
        return f"{self.name} {self.size}"

    @property
    def wrt_index(self) -> list[int]:
        return [list(self.inputs).index(w) for w in self.wrt]


def _normal(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def make_custom_layer(n: int, k: int, m: int, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    # W scaled by 1/sqrt(K) keeps X @ W of order one, where float32 sin is well conditioned.
    inputs = {"X": _normal(rng, n, k), "W": _normal(rng, k, m, scale=k**-0.5)}
    return Workload("custom_layer", f"{n}x{k}·{k}x{m}", (n, k, m), custom_layer, ["X", "W"], inputs, np_custom_layer)


def make_mlp(batch: int = 1024, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    inputs = {
        "X": _normal(rng, batch, 64),
        "W1": _normal(rng, 64, 128, scale=64**-0.5),
        "b1": _normal(rng, 128, scale=0.1),
        "W2": _normal(rng, 128, 10, scale=128**-0.5),
        "b2": _normal(rng, 10, scale=0.1),
        "Y": _normal(rng, batch, 10),
    }
    return Workload("mlp", f"batch {batch}", (batch,), mlp, ["W1", "b1", "W2", "b2"], inputs, np_mlp)


def make_elementwise(n: int = 10**6, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    inputs = {"x": _normal(rng, n), "y": _normal(rng, n)}
    return Workload("elementwise", f"n {n:.0e}".replace("e+0", "e"), (n,), elementwise, ["x", "y"], inputs, np_elementwise)


def make_gradient_penalty(batch: int = 4096, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    inputs = {
        "input": _normal(rng, batch, 4),
        "Wt": _normal(rng, 3, 4, scale=0.5),
        "b": _normal(rng, 3),
        "target": _normal(rng, batch, 3),
    }
    return Workload("gradient_penalty", f"batch {batch}", (batch,), gradient_penalty, ["input", "Wt"], inputs, np_gradient_penalty)


FACTORIES: dict[str, Callable[..., Workload]] = {
    "custom_layer": make_custom_layer,
    "mlp": make_mlp,
    "elementwise": make_elementwise,
    "gradient_penalty": make_gradient_penalty,
}


def all_workloads(tiny: bool = False) -> list[Workload]:
    """The workloads of issue 3 at their sizes, or every one at a tiny size (for tests)."""
    if tiny:
        return [make_custom_layer(3, 3, 2), make_custom_layer(5, 4, 3), make_mlp(7), make_elementwise(10), make_gradient_penalty(5)]
    return [
        make_custom_layer(3, 3, 2),
        make_custom_layer(256, 64, 64),
        make_custom_layer(2048, 512, 512),
        make_mlp(1024),
        make_elementwise(10**6),
        make_gradient_penalty(4096),
    ]


def reference(w: Workload):
    """The float64 hand-written loss and gradients at the (float32) inputs."""
    loss, grads = w.numpy_vg(*(a.astype(np.float64) for a in w.inputs.values()))
    return float(loss), grads


def rel_error(got, want) -> float:
    """The largest normwise relative difference over the loss and each gradient."""
    worst = 0.0
    for g, r in zip(got, want):
        g = np.asarray(g, dtype=np.float64)
        r = np.asarray(r, dtype=np.float64)
        if g.shape != r.shape:
            return float("inf")
        scale = max(float(np.linalg.norm(r)), np.finfo(np.float32).tiny)
        worst = max(worst, float(np.linalg.norm(g - r)) / scale)
    return worst
