"""The BLAS backend (gradc/blas.py): which loop nests are matrix products, as CBLAS sees them,
and kernels built with ``backend="blas"`` against NumPy in float64.
"""

import ctypes.util
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gradc
from gradc import blas, compiler, f32, f64, ir

N, K, M = (ir.dim_symbol(d) for d in "NKM")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def products(kernel, suffix: str = "value_and_grad") -> dict[str, blas.Gemm | None]:
    """Every summing Map of one entry point, by the name of what it computes."""
    (entry,) = [e for e in compiler.lower(kernel).spec.entries if e.suffix == suffix]
    nodes = ir.topo_order([n for _, n in entry.outputs])
    return {n.label(): blas.as_gemm(n) for n in nodes if isinstance(n, ir.Map) and n.reduce == "sum"}


@gradc.kernel
def layer(X: f32["N", "K"], W: f32["K", "M"]):
    return gradc.sum(gradc.sin(X @ W) ** 2)


def test_a_dense_layer_and_both_of_its_gradients_are_products():
    found = products(layer)
    forward, d_x, d_w = found["matmul"], found["d_X"], found["d_W"]
    # matmul = X · W
    assert forward.a.node.param == "X" and forward.b.node.param == "W"
    assert (forward.trans_a, forward.trans_b, forward.m, forward.n, forward.k) == (False, False, N, M, K)
    # d_X = G · Wᵀ: the weight is read transposed
    assert d_x.b.node.param == "W"
    assert (d_x.trans_a, d_x.trans_b, d_x.m, d_x.n, d_x.k) == (False, True, N, K, M)
    # d_W = Xᵀ · G: the reduction runs over the outer axis of both
    assert d_w.a.node.param == "X"
    assert (d_w.trans_a, d_w.trans_b, d_w.m, d_w.n, d_w.k) == (True, False, K, M, N)
    assert all(g.alpha == 1 for g in (forward, d_x, d_w))
    # sum(sin(.)**2) is a reduction, not a product
    assert found["out"] is None


@gradc.kernel
def gram(X: f32["N", "K"]):
    return X.T @ X


def test_one_array_on_both_sides():
    (g,) = products(gram, "forward").values()
    assert g.a.node is g.b.node
    assert (g.trans_a, g.trans_b, g.m, g.n, g.k) == (True, False, K, K, N)


def test_a_constant_factor_becomes_alpha():
    X, W = ir.Input("X", (N, K)), ir.Input("W", (K, M))
    node = ir.Map((N, M), (N, M, K), ir.identity_map(2), [(X, (ir.Affine(0), ir.Affine(2))), (W, (ir.Affine(2), ir.Affine(1)))],
                  lambda x, w: 3 * x * w, reduce="sum")
    g = blas.as_gemm(node)
    assert g.alpha == 3 and (g.m, g.n, g.k) == (N, M, K)
    # a term that is not a constant multiple of the product is not a product
    other = node.rebuilt([(X, node.operands[0].index), (W, node.operands[1].index)], [node.operands[0].symbol, node.operands[1].symbol],
                         node.operands[0].symbol * node.operands[1].symbol ** 2)
    assert blas.as_gemm(other) is None


@gradc.kernel
def not_products(X: f32["N", "K"], W: f32["K", "M"], b: f32["N", "M", "K"]):
    return (
        gradc.sum(X, axis=1),  # one operand
        X[:, 1:] @ W[1:, :],  # offset reads
        gradc.einsum("nmk,km->nm", b, W),  # a 3-d operand
        (gradc.exp(X) @ W),  # the product of an expression: only after it is materialised
    )


def test_what_is_not_a_plain_product_stays_generated_c():
    found = products(not_products, "forward")
    assert found, "the kernel has summing nodes"
    recognised = {name: g for name, g in found.items() if g is not None}
    # exp(X) is materialised as its own node first, so only that product may be recognised
    for g in recognised.values():
        assert {g.a.node.label(), g.b.node.label()} & {"exp", "W"}
        assert g.k == K and g.m == N and g.n == M
    assert len(recognised) <= 1


def test_no_library_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(blas.importlib, "import_module", lambda name: (_ for _ in ()).throw(ImportError(name)))
    monkeypatch.setattr(blas.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(blas.BlasError, match=r"pip install 'gradc\[blas\]'"):
        blas.find_library()


def test_the_wheel_is_linked_by_its_prefixed_names():
    pytest.importorskip("scipy_openblas32")
    lib = blas.find_library()
    assert lib.prefix == "scipy_"
    assert "-DGRADC_CBLAS_SGEMM=scipy_cblas_sgemm" in lib.defines()
    assert any(a.startswith("-Wl,-rpath,") for a in lib.link_args())


# -- the backend, compiled: products by the BLAS agree with NumPy in float64 --------------------

needs_blas = pytest.mark.skipif(
    not (importlib.util.find_spec("scipy_openblas32") or ctypes.util.find_library("openblas")),
    reason="no BLAS to link (pip install 'gradc[blas]')",
)


@gradc.kernel
def dense(X: f64["N", "K"], W: f64["K", "M"], b: f64["M"]):
    return gradc.sum(gradc.tanh(X @ W + b) ** 2)


@gradc.kernel
def products32(X: f32["N", "K"], W: f32["K", "M"], V: f32["M", "K"]):
    # X·W plain, X·Vᵀ transposed, Xᵀ·X on one array, and a block of X read with X's row length
    return X @ W, X @ V.T, X.T @ X, X[:, :3] @ W[:3, :]


@pytest.fixture(scope="module")
def k_dense():
    return gradc.compile(dense, backend="blas")


@pytest.fixture(scope="module")
def k_products():
    return gradc.compile(products32, backend="blas")


def _dense_reference(X, W, b):
    Z = np.tanh(X @ W + b)
    G = 2 * Z * (1 - Z**2)
    return np.sum(Z**2), (G @ W.T, X.T @ G, G.sum(axis=0))


@needs_blas
@pytest.mark.parametrize("shape", [(64, 48, 40), (7, 5, 3), (1, 1, 1), (33, 129, 65), (0, 40, 40)])
def test_value_and_gradients_match_numpy_above_and_below_the_threshold(k_dense, shape):
    n, k, m = shape
    rng = np.random.default_rng(n + k + m)
    X, W, b = rng.standard_normal((n, k)) * 0.3, rng.standard_normal((k, m)) * 0.3, rng.standard_normal(m)
    value, grads = k_dense.value_and_grad(X, W, b)
    want_value, want_grads = _dense_reference(X, W, b)
    assert value == pytest.approx(want_value, rel=1e-12, abs=1e-12)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


@needs_blas
def test_a_large_product_really_goes_to_the_blas(k_dense):
    assert "GRADC_CBLAS_DGEMM(GRADC_ROW_MAJOR" in k_dense.c_source
    # the loops stay, for small products and dimensions beyond int
    assert "gradc_blas_pays(" in k_dense.c_source and "} else {" in k_dense.c_source


@needs_blas
@pytest.mark.parametrize("shape", [(40, 36, 50), (5, 4, 6)])
def test_float32_transposes_self_products_and_blocks(k_products, shape):
    n, k, m = shape
    rng = np.random.default_rng(k)
    X, W, V = (rng.standard_normal(s).astype(np.float32) for s in ((n, k), (k, m), (m, k)))
    got = k_products(X, W, V)
    X64, W64, V64 = (a.astype(np.float64) for a in (X, W, V))
    want = (X64 @ W64, X64 @ V64.T, X64.T @ X64, X64[:, :3] @ W64[:3, :])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * np.abs(w).max())


def test_an_unknown_backend_is_rejected():
    with pytest.raises(gradc.GradcError, match=r"backend must be one of 'c', 'blas', got 'cuda'"):
        gradc.compile(dense, backend="cuda")


# -- the exported C: a plain C99 program links it with the BLAS it names --------------------------

DRIVER = """\
#include <stdio.h>
#include <stdlib.h>
#include "custom_layer.h"

/* X (N x K) and W (K x M) filled by a formula, so Python can rebuild them. */
int main(void)
{
    enum { N = 48, K = 40, M = 36 };
    static float X[N * K], W[K * M], dX[N * K], dW[K * M];
    float loss;
    int i;
    void *ws = malloc(custom_layer_workspace_size(N, K, M) + 1);
    for (i = 0; i < N * K; ++i) X[i] = (float)((i % 13) - 6) / 16.0f;
    for (i = 0; i < K * M; ++i) W[i] = (float)((i % 7) - 3) / 8.0f;
    if (!ws || custom_layer_value_and_grad(N, K, M, X, W, &loss, dX, dW, ws) != GRADC_OK) return 1;
    printf("%.9g %.9g %.9g\\n", loss, dX[N * K - 1], dW[5]);
    free(ws);
    return 0;
}
"""


@needs_blas
def test_exported_c_builds_with_a_prefixed_blas(tmp_path):
    wheel = pytest.importorskip("scipy_openblas32")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "gradc", "compile", str(EXAMPLES / "custom_layer.py"), "--emit", "c", "--backend", "blas", "-o", str(out)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "link it with a CBLAS" in result.stdout
    (tmp_path / "main.c").write_text(DRIVER)
    lib_dir = wheel.get_lib_dir()
    build = subprocess.run(
        ["cc", "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O2", "-DGRADC_CBLAS_SGEMM=scipy_cblas_sgemm", f"-I{out}",
         "main.c", str(out / "custom_layer.c"), f"-L{lib_dir}", f"-l{wheel.get_library()}", f"-Wl,-rpath,{lib_dir}", "-lm", "-o", "main"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert build.returncode == 0 and build.stderr == "", build.stderr
    ran = subprocess.run([str(tmp_path / "main")], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    loss, dx_last, dw_5 = map(float, ran.stdout.split())
    n, k, m = 48, 40, 36
    X = ((np.arange(n * k) % 13 - 6) / 16.0).reshape(n, k)
    W = ((np.arange(k * m) % 7 - 3) / 8.0).reshape(k, m)
    Z = X @ W
    G = 2 * np.sin(Z) * np.cos(Z)
    assert loss == pytest.approx(np.sum(np.sin(Z) ** 2), rel=1e-5)
    assert dx_last == pytest.approx((G @ W.T)[-1, -1], rel=1e-4, abs=1e-5)
    assert dw_5 == pytest.approx((X.T @ G)[0, 5], rel=1e-4, abs=1e-5)
