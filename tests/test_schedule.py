"""Loop schedules (gradc/schedule.py) and the C shapes they emit (templates/nest.c.j2).

The first half checks, on graphs as ``compiler.lower`` builds them, which kind of loop
nest each representative node gets and which nodes share a pass; no C is compiled.  The
second half runs the emitted shapes at sizes that hit their edges (partial tiles, partial
lane blocks, several double-precision flushes, empty dimensions) and compares them with
NumPy in float64.
"""

import numpy as np
import pytest
import sympy as sp

import gradc
from gradc import compiler, f32, ir, schedule

N, K, M = (ir.dim_symbol(d) for d in "NKM")


def entry_outputs(kernel, suffix: str, **options) -> dict[str, ir.Node]:
    """The output nodes of one entry point, by name, as code generation receives them."""
    lowered = compiler.lower(kernel, **options)
    (entry,) = [e for e in lowered.spec.entries if e.suffix == suffix]
    return dict(entry.outputs)


def entry_order(kernel, suffix: str, **options) -> list[ir.Node]:
    return ir.topo_order(list(entry_outputs(kernel, suffix, **options).values()))


@gradc.kernel
def elementwise(x: f32["N", "M"], y: f32["N", "M"]):
    return gradc.sin(x) * y


@gradc.kernel
def row_sum(x: f32["N", "M"]):
    return gradc.sum(x, axis=1)


@gradc.kernel
def matmul(X: f32["N", "K"], W: f32["K", "M"]):
    return X @ W


@gradc.kernel
def contract(X: f32["N", "K"], W: f32["K", "M"], v: f32["K"]):
    return X @ W, v @ W


@gradc.kernel
def slices(x: f32["N"], y: f32[8]):
    return x[1:] * x[:-1], y[::2]


@gradc.kernel
def bias(x: f32["N", "M"], b: f32["M"]):
    return x + b


@gradc.kernel
def loss(x: f32["N", "M"], y: f32["N", "M"]):
    return gradc.sum(gradc.sin(x) * y)


@gradc.kernel
def extremes(x: f32["R", "N"]):
    return gradc.max(x), gradc.min(x, axis=1)


@gradc.kernel
def total(x: f32["N"]):
    return gradc.sum(x)


@gradc.kernel
def dot(x: f32["K"], y: f32["K"]):
    return x @ y


@gradc.kernel
def strided_dots(A: f32["N", "K", "M"], B: f32["N", "M"]):
    return gradc.einsum("nkm,nm->nk", A, B)


@gradc.kernel
def batched_weight_gradient(X: f32["B", "N", "K"], Y: f32["B", "N", "M"]):
    return gradc.einsum("bnk,bnm->km", X, Y)


# ----------------------------------------------------------------------------- which kind
def test_elementwise_is_a_map_in_output_order():
    out = entry_outputs(elementwise, "forward")["out"]
    plan = schedule.schedule(out)
    assert plan.kind == "map"
    assert plan.order == (0, 1) and not plan.lanes and plan.tile is None


def test_sum_over_the_contiguous_last_axis_reduces_in_lanes():
    out = entry_outputs(row_sum, "forward")["out"]
    plan = schedule.schedule(out)
    assert plan.kind == "reduce" and plan.lanes
    # one accumulator per row, the reduced (unit-stride) axis innermost
    assert plan.acc_depth == 1
    assert out.loop[plan.order[0]] == N and out.loop[plan.order[-1]] == M
    assert plan.order[-1] in out.reduced_vars()


def test_matmul_is_tiled_over_rows_and_columns():
    out = entry_outputs(matmul, "forward")["out"]
    plan = schedule.schedule(out)
    assert plan.kind == "tile"
    row, col = plan.tile
    assert (out.loop[row], out.loop[col]) == (N, M)
    assert out.loop[plan.order[-1]] == K and plan.order[-1] in out.reduced_vars()
    assert plan.acc_depth == 0
    (packed,) = plan.pack
    assert out.operands[packed].node.param == "W"


def test_vector_matrix_product_is_tiled_over_columns_only():
    vw = entry_outputs(contract, "forward")["out1"]
    plan = schedule.schedule(vw)
    assert plan.kind == "tile"
    row, col = plan.tile
    assert row is None and vw.loop[col] == M


def test_weight_gradient_is_tiled():
    d_W = entry_outputs(matmul, "vjp")["d_W"]
    # Σ_n X[n, k] ct[n, m]: the reduction over n is strided, the output's m is not
    plan = schedule.schedule(d_W)
    assert plan.kind == "tile"
    row, col = plan.tile
    assert (d_W.loop[row], d_W.loop[col]) == (K, M)
    assert [d_W.loop[v] for v in d_W.reduced_vars()] == [N]
    # the cotangent's column tile (n, m) is packed; X, strided along n, once into row panels
    (packed,) = plan.pack
    assert [a.var for a in d_W.operands[packed].index] == [d_W.reduced_vars()[0], col]
    (packed_rows,) = plan.pack_rows
    assert d_W.operands[packed_rows].node.param == "X"
    # X·W reads X contiguously along its reduction (k): no row panel
    assert not schedule.schedule(entry_outputs(matmul, "forward")["out"]).pack_rows


@gradc.kernel
def few_columns(X: f32["N", "K"], W: f32["K", 32]):
    return X @ W


def test_row_panels_only_for_several_column_tiles():
    # one column tile reads X once anyway: a row panel would only add a copy
    d_W = entry_outputs(few_columns, "vjp")["d_W"]
    plan = schedule.schedule(d_W)
    assert plan.kind == "tile" and plan.pack and not plan.pack_rows


@gradc.kernel
def ten_outputs(X: f32["N", "K"], W: f32["K", 10]):
    return X @ W


def test_weight_gradient_of_a_narrow_layer_is_tiled_on_its_side():
    d_W = entry_outputs(ten_outputs, "vjp")["d_W"]
    # d_W[k, m] = Σ_n X[n, k] ct[n, m] with m only 10 wide: the columns of the tile run along
    # k, where X is contiguous, and the ten m are its rows; nothing needs packing
    plan = schedule.schedule(d_W)
    assert plan.kind == "tile" and not plan.pack and not plan.lanes
    row, col = plan.tile
    assert (d_W.loop[row], d_W.loop[col]) == (10, K)
    # the forward product has 10 columns too, but X is strided along its rows: not turned
    out = entry_outputs(ten_outputs, "forward")["out"]
    assert schedule.schedule(out).tile[1] == out.out_vars()[-1]


def test_transposed_operand_is_packed_into_a_tile():
    d_X = entry_outputs(matmul, "vjp")["d_X"]
    # d_X[n, k] = Σ_m ct[n, m] W[k, m]: W is read along the columns (k) with stride M, so each
    # column tile of it is packed (transposed) into a panel that the row tiles stream through
    plan = schedule.schedule(d_X)
    assert plan.kind == "tile" and not plan.lanes
    row, col = plan.tile
    assert (d_X.loop[row], d_X.loop[col]) == (N, K)
    (packed,) = plan.pack
    assert d_X.operands[packed].node.param == "W"
    assert plan.order[-1] in d_X.reduced_vars() and d_X.loop[plan.order[-1]] == M


def test_operand_strided_along_rows_and_columns_takes_dot_products():
    # A[n, k, m] varies along the rows (n) and, with stride M, the columns (k): no panel of one
    # column tile serves every row, but every operand is contiguous along the reduction (m)
    out = entry_outputs(strided_dots, "forward", wrt=[])["out"]
    plan = schedule.schedule(out)
    assert plan.kind == "dots" and plan.lanes and not plan.pack
    assert plan.acc_depth == 0 and plan.tile == tuple(plan.order[:2])
    assert out.loop[plan.order[-1]] == M


def test_slice_adjoints_are_scatters():
    order = entry_order(slices, "vjp")
    scatters = [n for n in order if isinstance(n, ir.Map) and schedule.schedule(n).kind == "accumulate"]
    # x[1:], x[:-1] and y[::2] each write their adjoint into part of d_x or d_y
    assert len(scatters) >= 3
    for node in scatters:
        assert node.reduce == "sum" and not node.is_gather_form()
        plan = schedule.schedule(node)
        assert sorted(plan.order) == list(range(len(node.loop)))
        assert plan.acc_depth == 0 and not plan.lanes


def test_broadcast_adjoint_sums_the_broadcast_axis_in_a_column_tile():
    # d_b[m] = Σ_n ct[n, m] is gather-form: one accumulator per m, the m loop unit-stride
    d_b = entry_outputs(bias, "vjp")["d_b"]
    plan = schedule.schedule(d_b)
    assert plan.kind == "tile"
    row, col = plan.tile
    assert row is None and d_b.loop[col] == M
    assert [d_b.loop[v] for v in d_b.reduced_vars()] == [N]


def test_all_tiled_and_laned_shapes_are_in_the_numerical_kernel():
    kinds = set()
    for node in entry_order(contract, "vjp"):
        if isinstance(node, ir.Map):
            plan = schedule.schedule(node)
            kinds.add((plan.kind, plan.lanes, plan.tile is not None and plan.tile[0] is not None))
    assert {("tile", False, True), ("tile", False, False), ("reduce", True, False)} <= kinds


# ----------------------------------------------------------------------------- groups
def test_loss_and_its_elementwise_gradient_share_a_pass():
    outputs = entry_outputs(loss, "value_and_grad")
    order = ir.topo_order(list(outputs.values()))
    (group,) = [g for g in schedule.groups(order) if outputs["out"] in g]
    assert outputs["d_x"] in group and outputs["d_y"] in group


def box(*extents):
    return [sp.sympify(e) for e in extents]


def test_groups_merge_only_independent_nodes_of_one_box():
    x = ir.Input("x", (N, M))
    ident = ir.identity_map(2)
    total_ = ir.Map((), box(N, M), (), [(x, ident)], lambda a: a, reduce="sum")
    square = ir.elementwise((N, M), [(x, ident)], lambda a: a * a)
    centred = ir.elementwise((N, M), [(x, ident), (total_, ())], lambda a, s: a - s)

    # no member reads another: one pass
    assert schedule.groups([x, total_, square]) == [[total_, square]]
    # a member reads another's output: two passes, in order
    assert schedule.groups([x, total_, centred]) == [[total_], [centred]]

    # ... also when it reads it through a Reshape
    viewed = ir.Reshape(total_, (1, 1))
    centred_view = ir.elementwise((N, M), [(x, ident), (viewed, (ir.Affine(None), ir.Affine(None)))], lambda a, s: a - s)
    groups = schedule.groups([x, total_, viewed, centred_view])
    assert groups == [[total_], [viewed], [centred_view]]

    # a Reshape of something computed before the open group goes before it and keeps it open
    flat = ir.Reshape(x, (N * M,))
    assert schedule.groups([x, total_, flat, square]) == [[flat], [total_, square]]

    # a reduction with one accumulator per row is not a whole-box pass
    rows = ir.Map((N,), box(N, M), (ir.Affine(0),), [(x, ident)], lambda a: a, reduce="sum")
    assert schedule.groups([x, rows, square]) == [[rows], [square]]
    # neither is a node over another loop box
    transposed = ir.elementwise((M, N), [(x, (ir.Affine(1), ir.Affine(0)))], lambda a: a + 1)
    assert schedule.groups([x, total_, transposed]) == [[total_], [transposed]]


# ----------------------------------------------------------------------------- numbers
def scaled_error(got, want, scale) -> float:
    """Largest error relative to the sum of the magnitudes of the terms (0 for empty arrays)."""
    assert got.shape == want.shape
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.abs(got.astype(np.float64) - want) / np.where(scale > 0, scale, 1.0)
    return float(np.max(err, initial=0.0))


@pytest.fixture(scope="module")
def contract_kernels():
    return {np.float32: gradc.compile(contract), np.float64: gradc.compile(contract, dtype="f64")}


# (N, K, M): partial row and column tiles, M < TILE_COLS, K and N > BLOCK (several flushes
# of the double tile and of the lanes), exact multiples, and each dimension empty.
CONTRACT_SIZES = [
    (1, 1, 1),
    (3, 5, 7),
    (5, 7, schedule.TILE_COLS + 1),
    (schedule.TILE_ROWS, 2 * schedule.BLOCK + 1, 2 * schedule.TILE_COLS),
    (9, schedule.BLOCK + 44, schedule.TILE_COLS - 1),
    (schedule.BLOCK + 4, 3, 40),
    (37, 600, 70),
    (17, schedule.BLOCK + 1, schedule.BLOCK + 44),
    (6, 2, schedule.TILE_COLS // 2 + 1),
    (0, 5, 7),
    (5, 0, 7),
    (5, 7, 0),
]


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-12)], ids=["f32", "f64"])
@pytest.mark.parametrize("n, k, m", CONTRACT_SIZES)
def test_contractions_and_their_gradients(contract_kernels, dtype, rtol, n, k, m):
    rng = np.random.default_rng(n * 10007 + k * 101 + m)
    X, W, v, C, c = (
        rng.standard_normal(shape).astype(dtype) for shape in [(n, k), (k, m), (k,), (n, m), (m,)]
    )
    (XW, vW), (d_X, d_W, d_v) = contract_kernels[dtype].vjp(X, W, v, (C, c))
    X, W, v, C, c = (a.astype(np.float64) for a in (X, W, v, C, c))
    aX, aW, av, aC, ac = (np.abs(a) for a in (X, W, v, C, c))
    checks = {
        "X @ W": (XW, X @ W, aX @ aW),
        "v @ W": (vW, v @ W, av @ aW),
        "d_X": (d_X, C @ W.T, aC @ aW.T),
        "d_W": (d_W, X.T @ C + np.outer(v, c), aX.T @ aC + np.outer(av, ac)),
        "d_v": (d_v, W @ c, aW @ ac),
    }
    for name, (got, want, scale) in checks.items():
        assert got.dtype == dtype, name
        assert scaled_error(got, want, scale) <= rtol, name
        if not np.any(scale):
            # empty outputs, and sums over an empty axis (exactly 0)
            np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.fixture(scope="module")
def extremes_kernels():
    return {np.float32: gradc.compile(extremes), np.float64: gradc.compile(extremes, dtype="f64")}


EXTREME_SIZES = [1, 15, 16, 17, 255, 256, 257, 1000]


def tie_split(x, best, axis=None):
    """NumPy's version of the documented subgradient: ties share the gradient equally."""
    hit = x == (best if axis is None else np.expand_dims(best, axis))
    return hit / hit.sum(axis=axis, keepdims=axis is not None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", EXTREME_SIZES)
def test_max_and_min_in_lanes_with_ties(extremes_kernels, dtype, n):
    rng = np.random.default_rng(n)
    # few distinct values: every extremum is tied, in several lanes and blocks
    x = rng.integers(-4, 5, size=(3, n)).astype(dtype)
    ct_max, ct_min = dtype(1.5), rng.standard_normal(3).astype(dtype)
    (big, small), (d_x,) = extremes_kernels[dtype].vjp(x, (ct_max, ct_min))
    assert big == x.max()
    np.testing.assert_array_equal(small, x.min(axis=1))
    want = ct_max * tie_split(x, x.max()) + ct_min[:, None] * tie_split(x, x.min(axis=1), axis=1)
    np.testing.assert_allclose(d_x, want, rtol=1e-6 if dtype == np.float32 else 1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", EXTREME_SIZES)
def test_max_and_min_propagate_nan_like_numpy(extremes_kernels, dtype, n):
    k = extremes_kernels[dtype]
    rng = np.random.default_rng(n + 1)
    base = rng.standard_normal((3, n)).astype(dtype)
    # first element, a full lane, the lane tail of a block, the last element
    for at in sorted({0, n // 2, n // schedule.LANES * schedule.LANES, n - 1} - {n}):
        x = base.copy()
        x[1, at] = np.nan
        big, small = k(x)
        assert np.isnan(big), at
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(small, np.min(x, axis=1), err_msg=str(at))
        assert np.isnan(small[1]) and not np.isnan(small[[0, 2]]).any()
    # infinities are ordinary values
    x = base.copy()
    x[0, -1], x[2, 0] = np.inf, -np.inf
    big, small = k(x)
    assert big == np.inf
    np.testing.assert_array_equal(small, x.min(axis=1))


@pytest.fixture(scope="module")
def loss_kernel():
    return gradc.compile(loss)


@pytest.mark.parametrize("n, m", [(0, 0), (0, 5), (1, 1), (3, 17), (5, 257), (2, 1000)])
def test_loss_and_gradient_in_one_pass(loss_kernel, n, m):
    rng = np.random.default_rng(n * 1000 + m)
    x, y = (rng.standard_normal((n, m)).astype(np.float32) for _ in range(2))
    value, (d_x, d_y) = loss_kernel.value_and_grad(x, y)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    terms = np.sin(x64) * y64
    assert abs(float(value) - terms.sum()) <= 1e-6 * max(np.abs(terms).sum(), 1e-30)
    np.testing.assert_allclose(d_x, np.cos(x64) * y64, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(d_y, np.sin(x64), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- accuracy
def test_float32_sum_of_a_million_terms():
    x = np.random.default_rng(0).uniform(0, 1, 10**6).astype(np.float32)
    got = gradc.compile(total, wrt=[])(x)
    want = x.astype(np.float64).sum()
    assert abs(float(got) - want) <= 1e-6 * want


def test_float32_dot_product_of_length_1e5():
    rng = np.random.default_rng(1)
    x, y = (rng.uniform(0, 1, 10**5).astype(np.float32) for _ in range(2))
    got = gradc.compile(dot, wrt=[])(x, y)
    want = x.astype(np.float64) @ y.astype(np.float64)
    assert abs(float(got) - want) <= 1e-6 * want


@pytest.mark.parametrize("rows", [2, schedule.TILE_ROWS])
def test_float32_contraction_over_1e5(contract_kernels, rows):
    # 2 rows run in the per-element edge, TILE_ROWS rows in full register tiles
    rng = np.random.default_rng(rows)
    k = 10**5
    X = rng.uniform(0, 1, (rows, k)).astype(np.float32)
    W = rng.uniform(0, 1, (k, 32)).astype(np.float32)
    v = rng.uniform(0, 1, k).astype(np.float32)
    XW, vW = contract_kernels[np.float32](X, W, v)
    W64 = W.astype(np.float64)
    np.testing.assert_allclose(XW, X.astype(np.float64) @ W64, rtol=1e-6)
    np.testing.assert_allclose(vW, v.astype(np.float64) @ W64, rtol=1e-6)


def test_float32_contraction_over_two_reduction_axes():
    # Σ over b and n (a batched weight gradient) is one tile with two reduction loops:
    # its sums must go to double precision as often as a single reduction loop's do.
    B, n, k, m = 10, 10**4, schedule.TILE_ROWS, schedule.TILE_COLS
    out = entry_outputs(batched_weight_gradient, "forward", wrt=[])["out"]
    assert schedule.schedule(out).kind == "tile" and len(out.reduced_vars()) == 2
    rng = np.random.default_rng(2)
    X = rng.uniform(0, 1, (B, n, k)).astype(np.float32)
    Y = rng.uniform(0, 1, (B, n, m)).astype(np.float32)
    got = gradc.compile(batched_weight_gradient, wrt=[])(X, Y)
    want = np.einsum("bnk,bnm->km", X.astype(np.float64), Y.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-6)
