"""Every DSL op, forward and gradient, in float32 and float64.

Forward values are compared with NumPy; gradients with central finite differences of an
independent NumPy implementation of the same function, in float64.

A C compile costs a few tenths of a second, so ops that share inputs are compiled into one
kernel returning a tuple.  Each op is still tested on its own: its forward value is its
element of the tuple, and its gradient is a vector-Jacobian product whose cotangent is zero
on every other output.  Kernels are compiled once per module (``_COMPILED``).
"""

import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradc

DTYPES = ["f32", "f64"]
NP = {"f32": np.float32, "f64": np.float64}

# The finite differences are exact to ~1e-9 in float64, so the float64 tolerance checks the
# compiler to nearly its own rounding; float32 results carry ~1e-7 relative rounding per op.
VALUE_TOL = {"f64": 1e-9, "f32": 1e-4}
GRAD_TOL = {"f64": 1e-6, "f32": 2e-3}
FD_STEP = 1e-5


# ----------------------------------------------------------------------------- samplers
def uniform(lo, hi):
    return lambda rng, shapes: [rng.uniform(lo, hi, s) for s in shapes]


def nonzero(lo, hi):
    """Magnitudes in [lo, hi] with random signs: away from the kinks and poles at 0."""
    return lambda rng, shapes: [rng.uniform(lo, hi, s) * rng.choice([-1.0, 1.0], s) for s in shapes]


def distinct(rng, shapes):
    """Values at least 0.09 apart, so no max/min tie is within a finite-difference step."""
    out = []
    for s in shapes:
        n = int(np.prod(s))
        out.append((rng.permutation(n) * 0.1 - 0.05 * n + rng.uniform(0, 0.01, n)).reshape(s))
    return out


def separated(rng, shapes):
    """``a`` (first) differs from ``b`` (second, broadcast against it) by 0.1 to 1 everywhere."""
    a_shape, b_shape, *rest = shapes
    b = rng.uniform(-2, 2, b_shape)
    gap = rng.uniform(0.1, 1, np.broadcast_shapes(a_shape, b_shape)) * rng.choice([-1.0, 1.0], a_shape)
    a = np.broadcast_to(b, gap.shape) + gap
    assert a.shape == tuple(a_shape), "separated() needs a's shape to be the broadcast shape"
    return [a, b, *(rng.integers(0, 2, s).astype(float) for s in rest)]


# ----------------------------------------------------------------------------- NumPy references
def np_logsumexp(x, axis=None, keepdims=False):
    m = np.max(x, axis=axis, keepdims=True)
    s = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return s if keepdims else np.squeeze(s, axis=axis)


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_softplus(x):
    return np.log1p(np.exp(x))


# ----------------------------------------------------------------------------- kernel groups
@dataclass
class Group:
    """One compiled kernel: the ops in ``ops`` (label -> (DSL fn, NumPy fn)) over shared parameters.

    ``params`` holds each parameter's annotated dimensions; ``sizes`` the named-dimension
    bindings to test with; ``wrt`` the differentiated parameters (default: all).
    """

    name: str
    params: list
    ops: dict
    sample: Callable
    wrt: tuple | None = None
    sizes: tuple = ({},)

    def shapes(self, dims):
        return [tuple(dims[d] if isinstance(d, str) else d for d in p) for p in self.params]

    def wrt_indices(self):
        return tuple(range(len(self.params))) if self.wrt is None else self.wrt


def ops(**table):
    return table


G = gradc
UNARY_REAL = ops(
    exp=(G.exp, np.exp),
    expm1=(G.expm1, np.expm1),
    sin=(G.sin, np.sin),
    cos=(G.cos, np.cos),
    tanh=(G.tanh, np.tanh),
    sinh=(G.sinh, np.sinh),
    cosh=(G.cosh, np.cosh),
    arctan=(G.arctan, np.arctan),
    square=(G.square, np.square),
    sigmoid=(G.sigmoid, np_sigmoid),
    softplus=(G.softplus, np_softplus),
    neg=(lambda x: -x, np.negative),
    pos=(lambda x: +x, np.positive),
    cube=(lambda x: x**3, lambda x: x**3),
    pow2=(lambda x: x**2, lambda x: x**2),
    rpow=(lambda x: 2.0**x, lambda x: 2.0**x),
)
UNARY_POSITIVE = ops(
    log=(G.log, np.log),
    sqrt=(G.sqrt, np.sqrt),
    log1p=(G.log1p, np.log1p),
    reciprocal=(G.reciprocal, np.reciprocal),
    pow_half=(lambda x: x**0.5, np.sqrt),
    pow_neg_frac=(lambda x: x**-1.5, lambda x: x**-1.5),
    pow_frac=(lambda x: x**2.5, lambda x: x**2.5),
)
UNARY_UNIT = ops(
    arcsin=(G.arcsin, np.arcsin),
    arccos=(G.arccos, np.arccos),
    tan=(G.tan, np.tan),
    log1p=(G.log1p, np.log1p),
    arctan=(G.arctan, np.arctan),
)
UNARY_NONZERO = ops(
    abs=(G.abs, np.abs),
    abs_builtin=(lambda x: abs(x), np.abs),
    sign=(G.sign, np.sign),
    relu=(G.relu, lambda x: np.maximum(x, 0)),
    reciprocal=(G.reciprocal, np.reciprocal),
    div_scalar=(lambda x: 1 / x, lambda x: 1 / x),
    pow_neg=(lambda x: x**-2, lambda x: x**-2.0),
)

BINARY = ops(
    add=(lambda a, b: a + b, np.add),
    sub=(lambda a, b: a - b, np.subtract),
    rsub=(lambda a, b: b - a, lambda a, b: b - a),
    mul=(lambda a, b: a * b, np.multiply),
    div=(lambda a, b: a / b, np.divide),
    rdiv=(lambda a, b: b / a, lambda a, b: b / a),
    maximum=(G.maximum, np.maximum),
    minimum=(G.minimum, np.minimum),
    maximum_swapped=(lambda a, b: G.maximum(b, a), lambda a, b: np.maximum(b, a)),
    mixed=(lambda a, b: a * a * b - b / (a * a + 1), lambda a, b: a * a * b - b / (a * a + 1)),
)
POWER = ops(
    pow_tensor=(lambda p, q: p**q, lambda p, q: p**q),
    pow_tensor_swapped=(lambda p, q: q**p, lambda p, q: q**p),
    pow_scalar_base=(lambda p, q: 3.0**q, lambda p, q: 3.0**q),
)
SCALARS = ops(
    radd=(lambda a: 2.5 + a, lambda a: 2.5 + a),
    add_int=(lambda a: a + 2, lambda a: a + 2),
    sub=(lambda a: a - 1.5, lambda a: a - 1.5),
    rsub=(lambda a: 1.5 - a, lambda a: 1.5 - a),
    rmul=(lambda a: 3 * a, lambda a: 3 * a),
    mul_np_scalar=(lambda a: a * np.float64(0.25), lambda a: a * 0.25),
    div=(lambda a: a / 4, lambda a: a / 4),
    rdiv=(lambda a: 4 / a, lambda a: 4 / a),
    chain=(lambda a: (3.0 - 2 * a) / (a + 5) ** 2, lambda a: (3.0 - 2 * a) / (a + 5) ** 2),
    fixed_shape_number=(lambda a: a * a.shape[1] - a.shape[0], lambda a: a * a.shape[1] - a.shape[0]),
)
# a: (3, 4), b: (4,) separated from a; m: a 0/1 mask, not differentiated.
WHERE = ops(
    gt=(lambda a, b, m: G.where(a > b, a * b, G.sin(a)), lambda a, b, m: np.where(a > b, a * b, np.sin(a))),
    ge=(lambda a, b, m: G.where(a >= b, G.exp(a), b * b), lambda a, b, m: np.where(a >= b, np.exp(a), b * b)),
    lt=(lambda a, b, m: G.where(a < b, a, b), lambda a, b, m: np.where(a < b, a, b)),
    le=(lambda a, b, m: G.where(a <= b, 2.0 * a, -b), lambda a, b, m: np.where(a <= b, 2.0 * a, -b)),
    eq=(lambda a, b, m: G.where(m == 1, a, b), lambda a, b, m: np.where(m == 1, a, b)),
    ne=(lambda a, b, m: G.where(m != 0, G.cos(a), b), lambda a, b, m: np.where(m != 0, np.cos(a), b)),
    scalar_compare=(lambda a, b, m: G.where(0.5 < a, a * a, 0.0), lambda a, b, m: np.where(0.5 < a, a * a, 0.0)),
    scalar_branches=(lambda a, b, m: G.where(a > b, 1.0, -1.0) * a, lambda a, b, m: np.where(a > b, 1.0, -1.0) * a),
    and_=(lambda a, b, m: G.where((a > b) & (m == 1), a, 0.0), lambda a, b, m: np.where((a > b) & (m == 1), a, 0.0)),
    or_=(lambda a, b, m: G.where((a < b) | (m == 0), a, -b), lambda a, b, m: np.where((a < b) | (m == 0), a, -b)),
    not_=(lambda a, b, m: G.where(~(a > b), a, b * a), lambda a, b, m: np.where(~(a > b), a, b * a)),
    mask_as_number=(lambda a, b, m: (a > b) * b + m * a, lambda a, b, m: (a > b) * b + m * a),
)

AXES = [
    ("all", dict()),
    ("all_keep", dict(axis=None, keepdims=True)),
    ("ax0", dict(axis=0)),
    ("ax1_keep", dict(axis=1, keepdims=True)),
    ("ax2", dict(axis=2)),
    ("ax_neg1", dict(axis=-1)),
    ("ax02", dict(axis=(0, 2))),
    ("ax12_keep", dict(axis=(1, 2), keepdims=True)),
    ("ax_neg", dict(axis=(-3, -2))),
]


def reductions(dsl, ref):
    table = {label: (lambda x, kw=kw: dsl(x, **kw), lambda x, kw=kw: ref(x, **kw)) for label, kw in AXES}
    name = dsl.__name__
    # The method form exists for the reductions NumPy also offers as methods.
    if hasattr(gradc.Tensor, name):
        table["method"] = (lambda x: getattr(x, name)(axis=1), lambda x: ref(x, axis=1))
    table["of_expression"] = (lambda x: dsl(G.sin(x) * x, axis=0), lambda x: ref(np.sin(x) * x, axis=0))
    return table


SHAPES = ops(
    transpose=(lambda x, w, y: G.transpose(x), lambda x, w, y: np.transpose(x)),
    transpose_axes=(lambda x, w, y: G.transpose(x, (1, 0, 2)), lambda x, w, y: np.transpose(x, (1, 0, 2))),
    transpose_negative=(lambda x, w, y: G.transpose(x, (-1, 0, 1)), lambda x, w, y: np.transpose(x, (2, 0, 1))),
    transpose_method=(lambda x, w, y: x.transpose(2, 0, 1) * 2, lambda x, w, y: x.transpose(2, 0, 1) * 2),
    T_2d=(lambda x, w, y: w.T, lambda x, w, y: w.T),
    T_3d=(lambda x, w, y: x.T, lambda x, w, y: x.T),
    T_times=(lambda x, w, y: w.T * y.T, lambda x, w, y: w.T * y.T),
    reshape=(lambda x, w, y: G.reshape(x, (4, 6)), lambda x, w, y: np.reshape(x, (4, 6))),
    reshape_infer=(lambda x, w, y: G.reshape(x, (-1, 2)), lambda x, w, y: np.reshape(x, (-1, 2))),
    reshape_flat=(lambda x, w, y: G.reshape(G.sin(x), 24), lambda x, w, y: np.reshape(np.sin(x), 24)),
    reshape_method=(lambda x, w, y: x.reshape(6, 4) * w.reshape(-1)[:4], lambda x, w, y: x.reshape(6, 4) * w.reshape(-1)[:4]),
    reshape_then_ops=(
        lambda x, w, y: G.exp(G.reshape(x * 0.5, (2, 12)).T) @ G.reshape(w, (2, 6)),
        lambda x, w, y: np.exp(np.reshape(x * 0.5, (2, 12)).T) @ np.reshape(w, (2, 6)),
    ),
    broadcast_to=(lambda x, w, y: G.broadcast_to(y, (2, 3, 4)), lambda x, w, y: np.broadcast_to(y, (2, 3, 4))),
    broadcast_to_times=(lambda x, w, y: G.broadcast_to(w, (2, 3, 4)) * x, lambda x, w, y: np.broadcast_to(w, (2, 3, 4)) * x),
    broadcast_ops=(lambda x, w, y: x * y + w, lambda x, w, y: x * y + w),
    shape_numbers=(lambda x, w, y: G.sum(x, axis=0) / x.shape[0] + w * (x.shape[2] - 1), lambda x, w, y: x.sum(0) / 2 + w * 3),
)
CONCAT = ops(
    concat_ax0=(lambda a, b, c: G.concatenate([a, c], axis=0), lambda a, b, c: np.concatenate([a, c], axis=0)),
    concat_ax1=(lambda a, b, c: G.concatenate([a, b], axis=1), lambda a, b, c: np.concatenate([a, b], axis=1)),
    concat_repeat=(lambda a, b, c: G.concatenate((a, b * a, a), axis=-1), lambda a, b, c: np.concatenate((a, b * a, a), axis=-1)),
    concat_exprs=(
        lambda a, b, c: G.sin(G.concatenate([a * b, G.exp(c)], 0)),
        lambda a, b, c: np.sin(np.concatenate([a * b, np.exp(c)], 0)),
    ),
    stack_ax0=(lambda a, b, c: G.stack([a, b]), lambda a, b, c: np.stack([a, b])),
    stack_ax1=(lambda a, b, c: G.stack([a, b, a], axis=1), lambda a, b, c: np.stack([a, b, a], axis=1)),
    stack_neg=(lambda a, b, c: G.stack([a, G.tanh(b)], axis=-1), lambda a, b, c: np.stack([a, np.tanh(b)], axis=-1)),
)
# p: (3, 4), q: (4, 5), r: (2, 3, 4), s: (4, 4)
EINSUM = ops(
    matmul=(lambda p, q, r, s: G.einsum("ij,jk->ik", p, q), lambda p, q, r, s: np.einsum("ij,jk->ik", p, q)),
    implicit=(lambda p, q, r, s: G.einsum("ij,jk", p, q), lambda p, q, r, s: np.einsum("ij,jk", p, q)),
    implicit_sorted=(lambda p, q, r, s: G.einsum("kj,ij", q.T, p), lambda p, q, r, s: np.einsum("kj,ij", q.T, p)),
    batched=(lambda p, q, r, s: G.einsum("bij,jk->bik", r, q), lambda p, q, r, s: np.einsum("bij,jk->bik", r, q)),
    ellipsis=(lambda p, q, r, s: G.einsum("...ij,jk->...ik", r, q), lambda p, q, r, s: np.einsum("...ij,jk->...ik", r, q)),
    transpose=(lambda p, q, r, s: G.einsum("ij->ji", p), lambda p, q, r, s: np.einsum("ij->ji", p)),
    total=(lambda p, q, r, s: G.einsum("bij->", r), lambda p, q, r, s: np.einsum("bij->", r)),
    diagonal=(lambda p, q, r, s: G.einsum("ii->i", s), lambda p, q, r, s: np.einsum("ii->i", s)),
    trace=(lambda p, q, r, s: G.einsum("ii", s), lambda p, q, r, s: np.einsum("ii", s)),
    same_operand=(lambda p, q, r, s: G.einsum("ij,ij->i", p, p), lambda p, q, r, s: np.einsum("ij,ij->i", p, p)),
    three_operands=(lambda p, q, r, s: G.einsum("ij,jk,kl->il", p, s, q), lambda p, q, r, s: np.einsum("ij,jk,kl->il", p, s, q)),
    outer=(lambda p, q, r, s: G.einsum("i,j->ij", p[0], q[:, 1]), lambda p, q, r, s: np.einsum("i,j->ij", p[0], q[:, 1])),
    batch_dot=(lambda p, q, r, s: G.einsum("bij,bij->b", r, r * r), lambda p, q, r, s: np.einsum("bij,bij->b", r, r * r)),
)
# v, u: (4,), A: (3, 4), B: (4, 5)
MATMUL_2D = ops(
    vec_vec=(lambda v, u, A, B: v @ u, lambda v, u, A, B: v @ u),
    mat_mat=(lambda v, u, A, B: A @ B, lambda v, u, A, B: A @ B),
    vec_mat=(lambda v, u, A, B: v @ B, lambda v, u, A, B: v @ B),
    mat_vec=(lambda v, u, A, B: A @ v, lambda v, u, A, B: A @ v),
    function=(lambda v, u, A, B: G.matmul(A, B), lambda v, u, A, B: np.matmul(A, B)),
    gram=(lambda v, u, A, B: A.T @ A, lambda v, u, A, B: A.T @ A),
    chain=(lambda v, u, A, B: G.tanh(A @ B).T @ (A @ u), lambda v, u, A, B: np.tanh(A @ B).T @ (A @ u)),
    same_vector=(lambda v, u, A, B: v @ v, lambda v, u, A, B: v @ v),
)
# C: (2, 3, 4), D: (2, 4, 5), B: (4, 5), E: (3, 1, 3, 4), v: (4,)
MATMUL_BATCHED = ops(
    batch_batch=(lambda C, D, B, E, v: C @ D, lambda C, D, B, E, v: C @ D),
    batch_mat=(lambda C, D, B, E, v: C @ B, lambda C, D, B, E, v: C @ B),
    mat_batch=(lambda C, D, B, E, v: B.T @ D, lambda C, D, B, E, v: B.T @ D),
    broadcast_batch=(lambda C, D, B, E, v: E @ D, lambda C, D, B, E, v: E @ D),
    broadcast_mat=(lambda C, D, B, E, v: G.matmul(E, B), lambda C, D, B, E, v: np.matmul(E, B)),
    vec_batch=(lambda C, D, B, E, v: v @ D, lambda C, D, B, E, v: v @ D),
    batch_vec=(lambda C, D, B, E, v: C @ v, lambda C, D, B, E, v: C @ v),
    four_d_vec=(lambda C, D, B, E, v: E @ v, lambda C, D, B, E, v: E @ v),
)
# x: (4, 5, 3)
INDEXING = ops(
    int0=(lambda x: x[0], lambda x: x[0]),
    int_neg=(lambda x: x[-1], lambda x: x[-1]),
    int_multi=(lambda x: x[1, -2], lambda x: x[1, -2]),
    scalar_element=(lambda x: x[2, 3, 1] * x[0, 0, 0], lambda x: x[2, 3, 1] * x[0, 0, 0]),
    slice_inner=(lambda x: x[:, 1:3], lambda x: x[:, 1:3]),
    slice_step=(lambda x: x[1:, ::2], lambda x: x[1:, ::2]),
    slice_reverse=(lambda x: x[::-1], lambda x: x[::-1]),
    slice_negative_bounds=(lambda x: x[-3:-1, :, 1:], lambda x: x[-3:-1, :, 1:]),
    slice_reverse_bounded=(lambda x: x[2:0:-1, -2], lambda x: x[2:0:-1, -2]),
    new_axis=(lambda x: x[None], lambda x: x[None]),
    new_axis_mixed=(lambda x: x[None, :, 0], lambda x: x[None, :, 0]),
    new_axis_middle=(lambda x: x[:, None, 1:3, None], lambda x: x[:, None, 1:3, None]),
    ellipsis=(lambda x: x[..., 1], lambda x: x[..., 1]),
    overlapping=(lambda x: x[1:] * x[:-1] + x[0], lambda x: x[1:] * x[:-1] + x[0]),
)
# x: (N, 3), W: (3, 2); the dimension N is bound at call time.
NAMED = ops(
    drop_first=(lambda x, W: x[1:], lambda x, W: x[1:]),
    last=(lambda x, W: x[-1], lambda x, W: x[-1]),
    first=(lambda x, W: x[0] * 2, lambda x, W: x[0] * 2),
    diff=(lambda x, W: x[1:] - x[:-1], lambda x, W: x[1:] - x[:-1]),
    shape_as_number=(lambda x, W: G.sum(x) / x.shape[0], lambda x, W: np.sum(x) / x.shape[0]),
    shape_arithmetic=(lambda x, W: x * (x.shape[0] + 1) - x.shape[0] * 2, lambda x, W: x * (x.shape[0] + 1) - x.shape[0] * 2),
    mean=(lambda x, W: G.mean(x, axis=0), lambda x, W: np.mean(x, axis=0)),
    matmul=(lambda x, W: G.tanh(x @ W), lambda x, W: np.tanh(x @ W)),
    gram=(lambda x, W: x.T @ x, lambda x, W: x.T @ x),
    reduce_named=(lambda x, W: G.logsumexp(x, axis=0) + G.max(x, axis=0), lambda x, W: np_logsumexp(x, axis=0) + np.max(x, axis=0)),
    reduce_fixed=(lambda x, W: G.min(x, axis=1) * G.sum(x, axis=-1), lambda x, W: np.min(x, axis=1) * np.sum(x, axis=-1)),
    concat_named=(lambda x, W: G.concatenate([x, x[:1] * 3], 0), lambda x, W: np.concatenate([x, x[:1] * 3], 0)),
    reshape_named=(lambda x, W: G.reshape(x, (-1,)), lambda x, W: np.reshape(x, (-1,))),
    transpose_named=(lambda x, W: x.T * 2, lambda x, W: x.T * 2),
)
N_SIZES = ({"N": 1}, {"N": 3}, {"N": 17})

# Scalar losses exercise the value_and_grad entry point (only single scalar outputs have it).
LOSSES = [
    Group(
        "loss_layer",
        [(4, 3), (3, 2)],
        ops(layer=(lambda X, W: G.sum(G.sin(X @ W) * G.sin(X @ W)), lambda X, W: np.sum(np.sin(X @ W) ** 2))),
        uniform(-1, 1),
    ),
    Group(
        "loss_logistic",
        [(5, 3), (3,), (5,)],
        ops(
            logistic=(
                lambda X, w, y: G.mean(G.softplus(X @ w) - y * (X @ w)),
                lambda X, w, y: np.mean(np_softplus(X @ w) - y * (X @ w)),
            )
        ),
        uniform(-1, 1),
    ),
    Group(
        "loss_softmax",
        [(4, 5)],
        ops(xent=(lambda Z: G.sum(G.logsumexp(Z, axis=1)) - G.sum(Z[:, 0]), lambda Z: np.sum(np_logsumexp(Z, axis=1)) - np.sum(Z[:, 0]))),
        uniform(-2, 2),
    ),
    Group(
        "loss_scalar_param",
        [(), (3,)],
        ops(scalar=(lambda s, x: G.sum(x * s) + s**2 + G.sin(s), lambda s, x: np.sum(x * s) + s**2 + np.sin(s))),
        uniform(-1, 1),
    ),
    Group(
        "loss_max",
        [(3, 4)],
        ops(max_abs=(lambda x: G.max(G.abs(x)) + G.min(x * x, axis=0)[1], lambda x: np.max(np.abs(x)) + np.min(x * x, axis=0)[1])),
        distinct,
    ),
    Group(
        "loss_named",
        [("N", "K"), ("K",)],
        ops(named=(lambda X, w: G.sum(G.tanh(X @ w) ** 2) / X.shape[0], lambda X, w: np.sum(np.tanh(X @ w) ** 2) / X.shape[0])),
        uniform(-1, 1),
        sizes=({"N": 1, "K": 2}, {"N": 3, "K": 1}, {"N": 17, "K": 5}),
    ),
]

GROUPS = [
    Group("unary_real", [(3, 4)], UNARY_REAL, uniform(-2, 2)),
    Group("unary_positive", [(3, 4)], UNARY_POSITIVE, uniform(0.3, 3)),
    Group("unary_unit", [(3, 4)], UNARY_UNIT, uniform(-0.9, 0.9)),
    Group("unary_nonzero", [(3, 4)], UNARY_NONZERO, nonzero(0.2, 2)),
    # Shifting away from 0 keeps divisions tame and widens, never narrows, the gaps between a and b.
    Group("binary", [(2, 3, 4), (3, 4)], BINARY, lambda rng, shapes: [x + 3 * np.sign(x) for x in separated(rng, shapes)]),
    Group("power", [(3, 4), (4,)], POWER, lambda rng, shapes: [rng.uniform(0.5, 2, shapes[0]), rng.uniform(0.5, 2, shapes[1])]),
    Group("scalars", [(3, 4)], SCALARS, uniform(0.5, 2)),
    Group("where", [(3, 4), (4,), (3, 4)], WHERE, separated, wrt=(0, 1)),
    Group("sum", [(3, 4, 5)], reductions(G.sum, np.sum), uniform(-1, 1)),
    Group("mean", [(3, 4, 5)], reductions(G.mean, np.mean), uniform(-1, 1)),
    Group("max", [(3, 4, 5)], reductions(G.max, np.max), distinct),
    Group("min", [(3, 4, 5)], reductions(G.min, np.min), distinct),
    Group("logsumexp", [(3, 4, 5)], reductions(G.logsumexp, np_logsumexp), uniform(-2, 2)),
    Group("shapes", [(2, 3, 4), (3, 4), (3, 1)], SHAPES, uniform(-1, 1)),
    Group("concat", [(2, 3), (2, 3), (4, 3)], CONCAT, uniform(-1, 1)),
    Group("einsum", [(3, 4), (4, 5), (2, 3, 4), (4, 4)], EINSUM, uniform(-1, 1)),
    Group("matmul_2d", [(4,), (4,), (3, 4), (4, 5)], MATMUL_2D, uniform(-1, 1)),
    Group("matmul_batched", [(2, 3, 4), (2, 4, 5), (4, 5), (3, 1, 3, 4), (4,)], MATMUL_BATCHED, uniform(-1, 1)),
    Group("indexing", [(4, 5, 3)], INDEXING, uniform(-1, 1)),
    Group("named", [("N", 3), (3, 2)], NAMED, distinct, sizes=N_SIZES),
    *LOSSES,
]


# ----------------------------------------------------------------------------- compiling
PARAM_NAMES = "abcde"


def make_kernel(name, body, types):
    """A ``@gradc.kernel`` with one annotated parameter per entry of ``types``, calling ``body``."""
    if len(types) == 1:
        (t0,) = types

        def k(a: t0):
            return body(a)

    elif len(types) == 2:
        t0, t1 = types

        def k(a: t0, b: t1):
            return body(a, b)

    elif len(types) == 3:
        t0, t1, t2 = types

        def k(a: t0, b: t1, c: t2):
            return body(a, b, c)

    elif len(types) == 4:
        t0, t1, t2, t3 = types

        def k(a: t0, b: t1, c: t2, d: t3):
            return body(a, b, c, d)

    else:
        t0, t1, t2, t3, t4 = types

        def k(a: t0, b: t1, c: t2, d: t3, e: t4):
            return body(a, b, c, d, e)

    k.__name__ = k.__qualname__ = name
    return gradc.kernel(k)


# The grouped kernels are large and -O3 spends seconds on each; these tests check what gradc
# computes, which does not depend on how hard the C compiler optimises it.  The kink, where
# and stability kernels below keep gradc's default flags (None), so those are covered too.
FAST_CFLAGS = ("-O1", "-std=c99")

_COMPILED = {}


def compiled(group, dtype, cflags=FAST_CFLAGS):
    key = (group.name, dtype)
    if key not in _COMPILED:
        types = [getattr(gradc, dtype)[dims] for dims in group.params]
        fns = [fn for fn, _ in group.ops.values()]
        if len(fns) == 1:
            body = fns[0]
        else:

            def body(*args):
                return tuple(fn(*args) for fn in fns)

        k = make_kernel(f"{group.name}_{dtype}", body, types)
        wrt = [PARAM_NAMES[i] for i in group.wrt_indices()]
        _COMPILED[key] = gradc.compile(k, wrt=wrt, cflags=cflags)
    return _COMPILED[key]


# ----------------------------------------------------------------------------- checking
def numeric_vjp(f, xs, ct, wrt, h=FD_STEP):
    """Central differences of ``sum(ct * f(*xs))`` with respect to each ``xs[i]``, i in ``wrt``."""
    grads = []
    for i in wrt:
        g = np.zeros_like(xs[i])
        for idx in np.ndindex(xs[i].shape):
            args = list(xs)
            plus, minus = xs[i].copy(), xs[i].copy()
            plus[idx] += h
            minus[idx] -= h
            args[i] = plus
            up = np.sum(ct * f(*args))
            args[i] = minus
            down = np.sum(ct * f(*args))
            g[idx] = (up - down) / (2 * h)
        grads.append(g)
    return grads


def assert_close(actual, expected, tol, what):
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=tol, atol=tol * scale, err_msg=what)


def sample_inputs(group, label, dims, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{group.name}/{label}/{sorted(dims.items())}".encode()))
    xs = [np.asarray(x, dtype=NP[dtype]) for x in group.sample(rng, group.shapes(dims))]
    return rng, xs


def check_op(group, label, dims, dtype):
    k = compiled(group, dtype)
    labels = list(group.ops)
    multi = len(labels) > 1
    j = labels.index(label)
    ref = group.ops[label][1]
    rng, xs = sample_inputs(group, label, dims, dtype)
    # The reference sees exactly the (possibly float32-rounded) values the kernel sees.
    xs64 = [x.astype(np.float64) for x in xs]
    with np.errstate(all="ignore"):
        expected = np.asarray(ref(*xs64), dtype=np.float64)

    forward = k(*xs)
    outs = list(forward) if multi else [forward]
    assert len(outs) == len(labels)
    out = np.asarray(outs[j])
    assert out.dtype == NP[dtype], f"{label}: output dtype {out.dtype}"
    assert_close(out, expected, VALUE_TOL[dtype], f"{label}: forward")

    ct = rng.standard_normal(expected.shape).astype(NP[dtype])
    cts = [np.zeros(np.shape(o), dtype=NP[dtype]) for o in outs]
    cts[j] = ct
    value, grads = k.vjp(*xs, tuple(cts) if multi else ct)
    assert_close((value[j] if multi else value), expected, VALUE_TOL[dtype], f"{label}: vjp value")

    wrt = group.wrt_indices()
    with np.errstate(all="ignore"):
        fd = numeric_vjp(ref, xs64, ct.astype(np.float64), wrt)
    assert len(grads) == len(wrt)
    for i, g, want in zip(wrt, grads, fd):
        assert np.asarray(g).dtype == NP[dtype]
        assert_close(g, want, GRAD_TOL[dtype], f"{label}: gradient wrt parameter {i}")

    if not multi and expected.ndim == 0:
        value, grads = k.value_and_grad(*xs)
        assert_close(value, expected, VALUE_TOL[dtype], f"{label}: value_and_grad value")
        unit = numeric_vjp(ref, xs64, 1.0, wrt)
        for i, g, want in zip(wrt, grads, unit):
            assert np.shape(g) == xs[i].shape
            assert_close(g, want, GRAD_TOL[dtype], f"{label}: value_and_grad gradient wrt parameter {i}")
        for g, want in zip(k.grad(*xs), unit):
            assert_close(g, want, GRAD_TOL[dtype], f"{label}: grad")


def _dims_id(dims):
    return "".join(f"-{k}{v}" for k, v in dims.items())


CASES = [
    pytest.param(g, label, dims, id=f"{g.name}-{label}{_dims_id(dims)}") for g in GROUPS for label in g.ops for dims in g.sizes
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,label,dims", CASES)
def test_op(group, label, dims, dtype):
    check_op(group, label, dims, dtype)


# ----------------------------------------------------------------------------- named dimensions
NAMED_GROUP = next(g for g in GROUPS if g.name == "named")


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_kernel_serves_every_size(dtype):
    """The same compiled kernel, called with N = 1, 3, 17 in turn (and again), stays correct."""
    k = compiled(NAMED_GROUP, dtype)
    for n in (17, 1, 3, 17, 1):
        for label in NAMED_GROUP.ops:
            check_op(NAMED_GROUP, label, {"N": n}, dtype)
    assert compiled(NAMED_GROUP, dtype) is k


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_named_loss_any_size(n, seed):
    loss = next(g for g in GROUPS if g.name == "loss_named")
    k = compiled(loss, "f64")
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, 6))
    X, w = rng.uniform(-1, 1, (n, K)), rng.uniform(-1, 1, K)
    ref = loss.ops["named"][1]
    value, (dX, dw) = k.value_and_grad(X, w)
    assert_close(value, ref(X, w), VALUE_TOL["f64"], "value")
    fX, fw = numeric_vjp(ref, [X, w], 1.0, (0, 1))
    assert_close(dX, fX, GRAD_TOL["f64"], "dX")
    assert_close(dw, fw, GRAD_TOL["f64"], "dw")


# ----------------------------------------------------------------------------- kinks
# The documented subgradient choices (gradc/scalar.py, gradc/autodiff.py, gradc.dsl docstrings):
# relu'(0) = 0 (Step), abs'(0) = sign(0) = 0, maximum/minimum ties give each side 1/2
# (Heaviside(0) = 1/2), and max/min reductions split the gradient evenly among tied elements.
KX = np.array([-1.5, 0.0, 0.5, 2.0, 2.0, -1.5, 0.0])
KY = np.array([0.0, 0.0, 1.0, 2.0, -3.0, -1.5, 1.0])
KZ = np.array([[1.0, 4.0, 3.0], [1.0, 3.0, 3.0]])
KINKS = ops(
    relu=(lambda x, y, z: G.sum(G.relu(x)), [(KX > 0) * 1.0, 0 * KY, 0 * KZ]),
    abs=(lambda x, y, z: G.sum(G.abs(x)), [np.sign(KX), 0 * KY, 0 * KZ]),
    sign=(lambda x, y, z: G.sum(G.sign(x) * 3.0), [0 * KX, 0 * KY, 0 * KZ]),
    maximum=(lambda x, y, z: G.sum(G.maximum(x, y)), [(KX > KY) + 0.5 * (KX == KY), (KY > KX) + 0.5 * (KX == KY), 0 * KZ]),
    minimum=(lambda x, y, z: G.sum(G.minimum(x, y)), [(KX < KY) + 0.5 * (KX == KY), (KY < KX) + 0.5 * (KX == KY), 0 * KZ]),
    maximum_constant=(lambda x, y, z: G.sum(G.maximum(x, 0.0)), [(KX > 0) + 0.5 * (KX == 0), 0 * KY, 0 * KZ]),
    max_all=(lambda x, y, z: G.max(x), [np.array([0, 0, 0, 0.5, 0.5, 0, 0]), 0 * KY, 0 * KZ]),
    min_all=(lambda x, y, z: G.min(x), [np.array([0.5, 0, 0, 0, 0, 0.5, 0]), 0 * KY, 0 * KZ]),
    max_three_way=(
        lambda x, y, z: G.max(G.concatenate([x[3:5], y[3:4]])),
        [np.array([0, 0, 0, 1, 1, 0, 0]) / 3, np.array([0, 0, 0, 1, 0, 0, 0]) / 3, 0 * KZ],
    ),
    max_axis=(lambda x, y, z: G.sum(G.max(z, axis=1)), [0 * KX, 0 * KY, np.array([[0, 1.0, 0], [0, 0.5, 0.5]])]),
    min_axis_keep=(
        lambda x, y, z: G.sum(G.min(z, axis=0, keepdims=True)),
        [0 * KX, 0 * KY, np.array([[0.5, 0, 0.5], [0.5, 1.0, 0.5]])],
    ),
    # Finite differences cannot see a stopped gradient, so it is checked here, by hand.
    stop_gradient=(lambda x, y, z: G.sum(G.stop_gradient(x) * x + G.stop_gradient(y * y)), [KX, 0 * KY, 0 * KZ]),
    logsumexp_tie=(lambda x, y, z: G.logsumexp(z[1]), [0 * KX, 0 * KY, np.vstack([0 * KZ[0], np.exp(KZ[1]) / np.exp(KZ[1]).sum()])]),
)
KINK_VALUES = dict(
    relu=np.sum(np.maximum(KX, 0)),
    abs=np.sum(np.abs(KX)),
    sign=3 * np.sum(np.sign(KX)),
    maximum=np.sum(np.maximum(KX, KY)),
    minimum=np.sum(np.minimum(KX, KY)),
    maximum_constant=np.sum(np.maximum(KX, 0)),
    max_all=2.0,
    min_all=-1.5,
    max_three_way=2.0,
    max_axis=7.0,
    min_axis_keep=1 + 3 + 3,
    stop_gradient=np.sum(KX * KX) + np.sum(KY * KY),
    logsumexp_tie=np_logsumexp(KZ[1]),
)
KINK_GROUP = Group("kinks", [(7,), (7,), (2, 3)], KINKS, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label", list(KINKS))
def test_kink_choice(label, dtype):
    k = compiled(KINK_GROUP, dtype, cflags=None)
    xs = [KX.astype(NP[dtype]), KY.astype(NP[dtype]), KZ.astype(NP[dtype])]
    labels = list(KINKS)
    cts = [np.zeros((), NP[dtype]) for _ in labels]
    cts[labels.index(label)] = np.ones((), NP[dtype])
    values, grads = k.vjp(*xs, tuple(cts))
    assert_close(values[labels.index(label)], KINK_VALUES[label], VALUE_TOL[dtype], f"{label}: value")
    for i, (g, want) in enumerate(zip(grads, KINKS[label][1])):
        assert_close(g, want, 1e-6, f"{label}: gradient wrt parameter {i}")


# Each its own kernel: a NaN here must not spill into other ops' gradients through 0 * NaN.
EDGE_GROUPS = [
    Group(
        "where_log",
        [(5,)],
        ops(where_log=(lambda x: G.sum(G.where(x > 0, G.log(x), 0.0)), None)),
        None,
    ),
    Group(
        "where_sqrt",
        [(5,)],
        ops(where_sqrt=(lambda x: G.sum(G.where(x > 0, G.sqrt(x) * 2.0, x)), None)),
        None,
    ),
    Group(
        "sqrt_of_square",
        [(5,)],
        ops(sqrt_square=(lambda x: G.sum(G.where(x != 0, G.sqrt(x * x), 0.0)), None)),
        None,
    ),
]
EDGE_X = np.array([-2.0, -0.0, 0.0, 0.25, 4.0])
EDGE_EXPECTED = {
    "where_log": (np.log(0.25) + np.log(4.0), np.array([0, 0, 0, 4.0, 0.25])),
    "where_sqrt": (-2.0 + 2 * 0.5 + 2 * 2.0, np.array([1, 1, 1, 2.0, 0.5])),
    "sqrt_of_square": (2.0 + 0.25 + 4.0, np.array([-1.0, 0, 0, 1, 1])),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", EDGE_GROUPS, ids=lambda g: g.name)
def test_where_keeps_untaken_branch_out_of_gradient(group, dtype):
    """``where`` selects the gradient too: the NaN/Inf of the branch not taken never appears."""
    k = compiled(group, dtype, cflags=None)
    value, (grad,) = k.value_and_grad(EDGE_X.astype(NP[dtype]))
    want_value, want_grad = EDGE_EXPECTED[group.name]
    assert_close(value, want_value, VALUE_TOL[dtype], "value")
    assert np.all(np.isfinite(grad)), grad
    assert_close(grad, want_grad, 1e-6, "gradient")


STABLE = Group(
    "stable",
    [(4,)],
    ops(
        sigmoid=(lambda x: G.sigmoid(x), np_sigmoid),
        softplus=(lambda x: G.softplus(x), lambda x: np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))),
        logsumexp=(lambda x: G.logsumexp(x), np_logsumexp),
        logsumexp_low=(lambda x: G.logsumexp(-x), lambda x: np_logsumexp(-x)),
    ),
    None,
)
STABLE_X = np.array([-1000.0, -80.0, 80.0, 1000.0])
with np.errstate(over="ignore"):
    STABLE_GRADS = {
        "sigmoid": np_sigmoid(STABLE_X) * np_sigmoid(-STABLE_X),
        "softplus": np_sigmoid(STABLE_X),
        "logsumexp": np.array([0, 0, 0, 1.0]),
        "logsumexp_low": np.array([-1.0, 0, 0, 0]),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label", list(STABLE.ops))
def test_stable_at_extreme_inputs(label, dtype):
    """Huge |x| gives finite values and gradients where the naive formulas overflow."""
    k = compiled(STABLE, dtype, cflags=None)
    x = STABLE_X.astype(NP[dtype])
    labels = list(STABLE.ops)
    j = labels.index(label)
    with np.errstate(all="ignore"):
        want = STABLE.ops[label][1](STABLE_X)
    outs = k(x)
    assert np.all(np.isfinite(outs[j]))
    assert_close(outs[j], want, VALUE_TOL[dtype], "value")
    cts = [np.zeros(np.shape(o), NP[dtype]) for o in outs]
    cts[j] = np.ones(np.shape(outs[j]), NP[dtype])
    _, grads = k.vjp(x, tuple(cts))
    assert np.all(np.isfinite(grads[0]))
    assert_close(grads[0], STABLE_GRADS[label], 1e-6, "gradient")
