"""Contractions in packed register tiles (``tile`` in gradc/schedule.py) at awkward sizes.

Every product of a dense layer — the forward X·W, the input gradient G·Wᵀ (a transposed
panel) and the weight gradient Xᵀ·G (a reduction over the outer axis of both operands) —
is compared with NumPy in float64 at sizes that are not multiples of the tile or of the
sum blocks (1, primes, one more and one less than a tile), through ``vjp`` and through
``value_and_grad`` of a loss.  Dimensions are runtime values: each kernel compiles once.
"""

import re

import numpy as np
import pytest

import gradc
from gradc import f32, schedule

R, C, B = schedule.TILE_ROWS, schedule.TILE_COLS, schedule.BLOCK


@gradc.kernel
def matmul(X: f32["N", "K"], W: f32["K", "M"]):
    return X @ W


@gradc.kernel
def layer_loss(X: f32["N", "K"], W: f32["K", "M"]):
    return gradc.sum(gradc.sin(X @ W) ** 2)


@gradc.kernel
def narrow(X: f32["N", "K"], W: f32["K", 10]):
    # a fixed extent below the tile width: tiles of 10 columns, no column edge
    return X @ W


@gradc.kernel
def short_sum(X: f32["N", 200], W: f32[200, "M"]):
    # a fixed reduction of one sum block: one float tile, no double tile
    return X @ W


@gradc.kernel
def batched(X: f32["S", "N", "K"], W: f32["S", "K", "M"]):
    # the batch is an outer loop: the panels are refilled for each of its items
    return X @ W


@gradc.kernel
def sliced(X: f32["N", "K"], W: f32["K", "M"]):
    # every extent of the product of X[1:] is N - 1: the tiles' full-row count is (N - 1) / 8 * 8
    return X[1:] @ W


@gradc.kernel
def fixed_dots(X: f32[8, 32], W: f32["M", 32]):
    # dot products over a fixed 32: two whole lane widths, no scalar tail loop
    return gradc.sum(X[:, None, :] * W[None, :, :], axis=2)


# (N, K, M): 1; primes; one more / one less than a tile; several sum blocks; empty axes
SIZES = [
    (1, 1, 1),
    (2, 3, 5),
    (R - 1, 7, C - 1),
    (R, B, C),
    (R + 1, B + 1, C + 1),
    (13, 17, 37),
    (2 * R + 3, 2 * B + 5, 3 * C + 7),
    (61, 3, 97),
    (3, 509, 2),
    (0, 4, 5),
    (4, 0, 5),
    (4, 5, 0),
]


def scaled_error(got, want, scale) -> float:
    """Largest error relative to the sum of the magnitudes of the terms (0 for empty arrays)."""
    assert got.shape == want.shape
    err = np.abs(got.astype(np.float64) - want) / np.where(scale > 0, scale, 1.0)
    return float(np.max(err, initial=0.0))


def check(name, got, want, scale, rtol):
    assert scaled_error(got, want, scale) <= rtol, name
    if not np.any(scale):
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.fixture(scope="module")
def kernels():
    return {
        np.float32: gradc.compile(matmul),
        np.float64: gradc.compile(matmul, dtype="f64"),
        "loss": gradc.compile(layer_loss),
        "narrow": gradc.compile(narrow),
        "short": gradc.compile(short_sum),
        "batched": gradc.compile(batched),
        "sliced": gradc.compile(sliced),
        "fixed_dots": gradc.compile(fixed_dots),
    }


def inputs(rng, dtype, *shapes):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-6), (np.float64, 1e-14)], ids=["f32", "f64"])
@pytest.mark.parametrize("n, k, m", SIZES)
def test_product_and_both_gradients(kernels, dtype, rtol, n, k, m):
    rng = np.random.default_rng(n * 7919 + k * 31 + m)
    X, W, G = inputs(rng, dtype, (n, k), (k, m), (n, m))
    out, (d_X, d_W) = kernels[dtype].vjp(X, W, G)
    X, W, G = (a.astype(np.float64) for a in (X, W, G))
    aX, aW, aG = np.abs(X), np.abs(W), np.abs(G)
    for got in (out, d_X, d_W):
        assert got.dtype == dtype
    check("X @ W", out, X @ W, aX @ aW, rtol)
    check("G @ W.T", d_X, G @ W.T, aG @ aW.T, rtol)
    check("X.T @ G", d_W, X.T @ G, aX.T @ aG, rtol)


@pytest.mark.parametrize("n, k, m", [s for s in SIZES if 0 not in s])
def test_value_and_grad_of_a_layer(kernels, n, k, m):
    rng = np.random.default_rng(n + 1000 * k + 10**6 * m)
    X, W = inputs(rng, np.float32, (n, k), (k, m))
    value, (d_X, d_W) = kernels["loss"].value_and_grad(X, W)
    X, W = X.astype(np.float64), W.astype(np.float64)
    Z = X @ W
    G = 2 * np.sin(Z) * np.cos(Z)
    # The float32 rounding of X @ W (up to |Z| * 1e-7) moves sin and cos of it, so the
    # tolerances here are looser than the products' own (checked above through vjp).
    assert abs(float(value) - np.sum(np.sin(Z) ** 2)) <= 1e-5 * max(n * m, 1)
    check("d_X", d_X, G @ W.T, np.abs(G) @ np.abs(W).T, 1e-4)
    check("d_W", d_W, X.T @ G, np.abs(X).T @ np.abs(G), 1e-4)


@pytest.mark.parametrize("n, k", [(1, 1), (R + 1, 3), (50, B + 3)])
def test_fixed_extent_narrower_than_a_tile(kernels, n, k):
    rng = np.random.default_rng(n * k)
    X, W, G = inputs(rng, np.float32, (n, k), (k, 10), (n, 10))
    out, (d_X, d_W) = kernels["narrow"].vjp(X, W, G)
    X, W, G = (a.astype(np.float64) for a in (X, W, G))
    check("X @ W", out, X @ W, np.abs(X) @ np.abs(W), 2e-6)
    check("G @ W.T", d_X, G @ W.T, np.abs(G) @ np.abs(W).T, 2e-6)
    check("X.T @ G", d_W, X.T @ G, np.abs(X).T @ np.abs(G), 2e-6)


@pytest.mark.parametrize("s, n, k, m", [(1, 1, 1, 1), (3, R + 1, 5, C + 3), (2, 2 * R, B + 1, 2 * C)])
def test_batched_products_refill_their_panels(kernels, s, n, k, m):
    rng = np.random.default_rng(s * n * k * m)
    X, W, G = inputs(rng, np.float32, (s, n, k), (s, k, m), (s, n, m))
    out, (d_X, d_W) = kernels["batched"].vjp(X, W, G)
    X, W, G = (a.astype(np.float64) for a in (X, W, G))
    aX, aW, aG = np.abs(X), np.abs(W), np.abs(G)
    T = lambda a: np.swapaxes(a, 1, 2)
    check("X @ W", out, X @ W, aX @ aW, 2e-6)
    check("G @ W.T", d_X, G @ T(W), aG @ T(aW), 2e-6)
    check("X.T @ G", d_W, T(X) @ G, T(aX) @ aG, 2e-6)


@pytest.mark.parametrize("n, m", [(1, 1), (R + 3, C + 5), (3 * R, 2 * C)])
def test_a_fixed_sum_of_one_block_gives_the_bits_of_the_blocked_sum(kernels, n, m):
    # The blocked code adds the block's float tile into a double and rounds it back: the same
    # number. So the kernel with a named K (blocked) and with K = 200 (not) agree bit for bit.
    rng = np.random.default_rng(n * m)
    X, W, G = inputs(rng, np.float32, (n, 200), (200, m), (n, m))
    short, named = kernels["short"].vjp(X, W, G), kernels[np.float32].vjp(X, W, G)
    np.testing.assert_array_equal(short[0], named[0])
    np.testing.assert_array_equal(short[1][0], named[1][0])  # G·Wᵀ, a sum over M: blocked in both
    np.testing.assert_array_equal(short[1][1], named[1][1])
    assert "double wide" not in kernels["short"].c_source.split("_vjp(")[0]  # the forward


def test_a_large_operand_through_row_panels_gives_the_bits_of_strided_reads(kernels):
    # X.T @ G reads X, strided along the sum over n, from one panel per row tile once X has
    # at least ROW_PANEL_MIN_BYTES and two full column tiles read it; the sums are the same, so the first rows of d_W are the
    # bits of X[:, :24] (too small for panels: read in place) through the same full tiles.
    n, k, m = 2051, 136, 2 * C + 5
    assert n * k * 4 >= schedule.ROW_PANEL_MIN_BYTES > n * 24 * 4
    rng = np.random.default_rng(11)
    X, W, G = inputs(rng, np.float32, (n, k), (k, m), (n, m))
    _, (_, d_W) = kernels[np.float32].vjp(X, W, G)
    _, (_, d_W_few) = kernels[np.float32].vjp(np.ascontiguousarray(X[:, :24]), W[:24], G)
    np.testing.assert_array_equal(d_W[:24], d_W_few)
    X, G = X.astype(np.float64), G.astype(np.float64)
    check("X.T @ G", d_W, X.T @ G, np.abs(X).T @ np.abs(G), 2e-6)


@pytest.mark.parametrize("n, k, m", [(2, 1, 1), (R + 1, 3, C + 1), (200, 40, 45), (2052, 133, 45)])
def test_products_of_a_slice_stay_in_bounds(kernels, n, k, m):
    # Extents like N - 1 once printed as N - 1 / 8 * 8 (= N): full tiles ran a row past the
    # end, and the last size's row panel past the workspace.
    rng = np.random.default_rng(n + k + m)
    X, W, G = inputs(rng, np.float32, (n, k), (k, m), (n - 1, m))
    out, (d_X, d_W) = kernels["sliced"].vjp(X, W, G)
    X, W, G = (a.astype(np.float64) for a in (X, W, G))
    check("X[1:] @ W", out, X[1:] @ W, np.abs(X[1:]) @ np.abs(W), 2e-6)
    assert not d_X[0].any()
    check("G @ W.T", d_X[1:], G @ W.T, np.abs(G) @ np.abs(W).T, 2e-6)
    check("X[1:].T @ G", d_W, X[1:].T @ G, np.abs(X[1:]).T @ np.abs(G), 2e-6)


@pytest.mark.parametrize("m", [1, 5, 9])
def test_dot_products_over_a_fixed_multiple_of_the_lanes(kernels, m):
    rng = np.random.default_rng(m)
    X, W, G = inputs(rng, np.float32, (8, 32), (m, 32), (8, m))
    out, (d_X, d_W) = kernels["fixed_dots"].vjp(X, W, G)
    assert not re.search(r"for \(ptrdiff_t (\w+) = \1_lane;", kernels["fixed_dots"].c_source)  # no tail loop
    X, W, G = (a.astype(np.float64) for a in (X, W, G))
    check("X @ W.T", out, X @ W.T, np.abs(X) @ np.abs(W).T, 2e-6)
    check("G @ W", d_X, G @ W, np.abs(G) @ np.abs(W), 2e-6)
    check("G.T @ X", d_W, G.T @ X, np.abs(G).T @ np.abs(X), 2e-6)


def test_same_inputs_same_bits(kernels):
    rng = np.random.default_rng(5)
    n, k, m = 2 * R + 5, 2 * B + 9, 2 * C + 3
    X, W, G = inputs(rng, np.float32, (n, k), (k, m), (n, m))
    first = kernels[np.float32].vjp(X, W, G)
    again = kernels[np.float32].vjp(X, W, G)
    np.testing.assert_array_equal(first[0], again[0])
    for a, b in zip(first[1], again[1]):
        np.testing.assert_array_equal(a, b)


def test_workspace_holds_the_panels(kernels):
    # the forward product packs one panel of W (K x TILE_COLS) beside no other temporary
    k = kernels[np.float32]
    assert k.workspace_size(N=3, K=100, M=70) >= 100 * C * 4
