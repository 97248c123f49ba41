"""Tracing on its own: shapes, unrolling, factories, graph size, and trace-time errors.

Nothing here compiles C.  Where a shape alone would not show that tracing recorded the
right index maps, the traced graph is evaluated with the independent NumPy evaluator
(:mod:`gradc.reference`) and compared with NumPy.
"""

import cProfile
import inspect
import pstats
import sys

import numpy as np
import pytest
import sympy as sp

import gradc
from gradc import f32, f64, ir, reference
from gradc.dsl import Dim

N = ir.dim_symbol("n")
M = ir.dim_symbol("m")


def trace(fn):
    return gradc.kernel(fn).trace()


def out_shapes(fn):
    return [tuple(o.shape) for o in trace(fn).graph.outputs]


def run(fn, dims=None, **arrays):
    """Evaluate a traced kernel's outputs with the reference evaluator (float64)."""
    traced = trace(fn)
    values = reference.evaluate(traced.graph.outputs, arrays, dims or {})
    return values if traced.returns_tuple else values[0]


def line_after(frame) -> int:
    """The line number of the statement following the caller's current line."""
    return frame.f_lineno + 1


# ----------------------------------------------------------------------------- shapes
def test_named_dimensions_stay_symbolic():
    def k(x: f32["n", 3], y: f32["m"]):
        return x * 2, y + 1, gradc.sum(x, axis=1)

    assert out_shapes(k) == [(N, 3), (M,), (N,)]
    assert trace(k).dims == ["n", "m"]


def test_broadcasting_follows_numpy():
    def k(a: f32["n", 1], b: f32[3], c: f32[()], d: f32[2, 1, 1]):
        return a + b, a * c, c - b, a + d, d * b, gradc.broadcast_to(b, (2, 3))

    assert out_shapes(k) == [(N, 3), (N, 1), (3,), (2, N, 1), (2, 1, 3), (2, 3)]


def test_broadcast_values_match_numpy():
    def k(a: f64["n", 1], b: f64[3], d: f64[2, 1, 1]):
        return a + b, a * d - b

    rng = np.random.default_rng(0)
    a, b, d = rng.standard_normal((4, 1)), rng.standard_normal(3), rng.standard_normal((2, 1, 1))
    s, t = run(k, {"n": 4}, a=a, b=b, d=d)
    np.testing.assert_allclose(s, a + b)
    np.testing.assert_allclose(t, a * d - b)


def test_matmul_shapes():
    def k(A: f32["b", 3, 4], B: f32[4, 5], v: f32[4], C: f32[2, 1, 4, 5], u: f32[3]):
        return A @ B, A @ v, v @ B, v @ v, A @ C, u @ A, gradc.matmul(A, B)

    b = ir.dim_symbol("b")
    assert out_shapes(k) == [(b, 3, 5), (b, 3), (5,), (), (2, b, 3, 5), (b, 4), (b, 3, 5)]


def test_matmul_values_match_numpy():
    def k(A: f64[2, 3, 4], B: f64[4, 5], v: f64[4], u: f64[3]):
        return A @ B, A @ v, v @ B, v @ v, u @ A

    rng = np.random.default_rng(1)
    A, B, v, u = (rng.standard_normal(s) for s in [(2, 3, 4), (4, 5), (4,), (3,)])
    got = run(k, A=A, B=B, v=v, u=u)
    for g, want in zip(got, [A @ B, A @ v, v @ B, v @ v, u @ A]):
        np.testing.assert_allclose(g, want, rtol=1e-12)


def test_einsum_shapes_and_values():
    def k(A: f64["n", 3, 4], B: f64[4, 5], c: f64[5]):
        return (
            gradc.einsum("bij,jk->bik", A, B),
            gradc.einsum("bij->", A),
            gradc.einsum("...ij,jk", A, B),
            gradc.einsum("bij,jk,k->ib", A, B, c),
            gradc.einsum("bij->jib", A),
        )

    assert out_shapes(k) == [(N, 3, 5), (), (N, 3, 5), (3, N), (4, 3, N)]
    rng = np.random.default_rng(2)
    A, B, c = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    got = run(k, {"n": 2}, A=A, B=B, c=c)
    specs = ["bij,jk->bik", "bij->", "...ij,jk", "bij,jk,k->ib", "bij->jib"]
    args = [(A, B), (A,), (A, B), (A, B, c), (A,)]
    for g, spec, a in zip(got, specs, args):
        np.testing.assert_allclose(g, np.einsum(spec, *a), rtol=1e-12)


def test_reduction_and_shape_op_shapes():
    def k(x: f32["n", 4], b: f32[3]):
        return (
            gradc.sum(x, axis=0, keepdims=True),
            gradc.mean(x, axis=1),
            gradc.max(x, axis=(0, 1)),
            gradc.logsumexp(x, axis=-1),
            gradc.min(x, axis=0, keepdims=True),
            x.T,
            gradc.transpose(x[None], (2, 0, 1)),
            gradc.reshape(x, (-1,)),
            gradc.reshape(x, (2, -1)),
            gradc.concatenate([x, x, x[1:]], axis=0),
            gradc.concatenate([x, x[:, :2]], axis=1),
            gradc.stack([b, b], axis=1),
            gradc.stack([x, x]),
        )

    assert out_shapes(k) == [
        (1, 4),
        (N,),
        (),
        (N,),
        (1, 4),
        (4, N),
        (4, 1, N),
        (4 * N,),
        (2, 2 * N),
        (3 * N - 1, 4),
        (N, 6),
        (3, 2),
        (2, N, 4),
    ]


def test_slices_on_named_dimensions():
    seen = {}

    def k(x: f32["n"], y: f32["n", 3]):
        seen["tail"] = x[1:].shape
        seen["head"] = x[:-1].shape
        seen["inner"] = x[1:-1].shape
        seen["last"] = x[-1].shape
        seen["last_rows"] = y[-2:].shape
        seen["col"] = y[:, 1:3].shape
        seen["none"] = y[None, ..., 0].shape
        return x[1:] - x[:-1]

    (shape,) = out_shapes(k)
    assert shape == (N - 1,)
    assert seen["tail"] == (Dim(N - 1),)
    assert seen["head"] == (Dim(N - 1),)
    assert seen["inner"] == (Dim(N - 2),)
    assert seen["last"] == ()
    assert seen["last_rows"] == (2, 3)
    assert seen["col"] == (Dim(N), 2)
    assert seen["none"] == (1, Dim(N))


def test_named_slices_record_runtime_checks():
    def k(x: f32["n"]):
        return x[2:] * x[-3]

    constraints = trace(k).constraints
    # The checks are conditions on n, so they are checked at call time, not assumed.
    assert constraints
    for cond, message in constraints:
        assert cond.xreplace({N: 1}) == sp.false
        assert cond.xreplace({N: 5}) == sp.true
        assert "test_dsl.py" in message


def test_slice_values_match_numpy():
    def k(x: f64["n"], y: f64[5, 3]):
        return x[1:] - x[:-1], x[-1] * x[0], y[::2, ::-1], y[1:4, 2], y[None, -1]

    rng = np.random.default_rng(3)
    x, y = rng.standard_normal(6), rng.standard_normal((5, 3))
    got = run(k, {"n": 6}, x=x, y=y)
    for g, want in zip(got, [x[1:] - x[:-1], x[-1] * x[0], y[::2, ::-1], y[1:4, 2], y[None, -1]]):
        np.testing.assert_allclose(g, want)


def test_shape_of_named_dimension_is_usable_as_a_number():
    seen = {}

    def k(x: f64["n", 3]):
        seen["n"], seen["three"] = x.shape
        return gradc.sum(x) / x.shape[0], x * (x.shape[0] - 1), gradc.reshape(x, (x.shape[0] * 3,))

    traced = trace(k)
    assert isinstance(seen["n"], Dim) and seen["n"] == Dim(N)
    assert seen["three"] == 3 and isinstance(seen["three"], int)
    x = np.arange(12.0).reshape(4, 3)
    mean, scaled, flat = reference.evaluate(traced.graph.outputs, {"x": x}, {"n": 4})
    np.testing.assert_allclose(mean, x.sum() / 4)
    np.testing.assert_allclose(scaled, x * 3)
    np.testing.assert_allclose(flat, x.reshape(-1))


def test_mean_divides_by_the_named_dimension():
    def k(x: f64["n", 2]):
        return gradc.mean(x, axis=0)

    x = np.random.default_rng(4).standard_normal((7, 2))
    np.testing.assert_allclose(run(k, {"n": 7}, x=x), x.mean(axis=0))


def test_concatenate_and_stack_values_match_numpy():
    def k(x: f64["n", 2], b: f64[3]):
        return gradc.concatenate([x, 2 * x[1:]], axis=0), gradc.stack([b, -b], axis=1)

    rng = np.random.default_rng(5)
    x, b = rng.standard_normal((4, 2)), rng.standard_normal(3)
    cat, st = run(k, {"n": 4}, x=x, b=b)
    np.testing.assert_allclose(cat, np.concatenate([x, 2 * x[1:]], axis=0))
    np.testing.assert_allclose(st, np.stack([b, -b], axis=1))


# Each entry: the same expression in the DSL and in NumPy, on y: [5, 4], x: [n] (n = 6), s: [3, 3].
SEMANTICS = {
    "negative_step": (lambda g, y, x, s: y[3:0:-1], None),
    "negative_bounds_and_steps": (lambda g, y, x, s: y[-1:-4:-2, ::-2], None),
    "none_last": (lambda g, y, x, s: y[..., None], None),
    "none_between": (lambda g, y, x, s: y[:, None, 1], None),
    "named_negative_index": (lambda g, y, x, s: x[-2] * x[1:-2], None),
    "named_head": (lambda g, y, x, s: x[:3], None),
    "transpose_negative_axes": (lambda g, y, x, s: g.transpose(y[None], (-1, 0, 1)), None),
    "sum_negative_axes": (lambda g, y, x, s: g.sum(y[None], axis=(-1, 0)), None),
    "concatenate_last_axis": (lambda g, y, x, s: g.concatenate([y, y[:, :1]], axis=-1), None),
    "stack_last_axis": (lambda g, y, x, s: g.stack([y, 2 * y], axis=-1), None),
    "einsum_diagonal": (lambda g, y, x, s: g.einsum("ii->i", s), None),
    "einsum_trace": (lambda g, y, x, s: g.einsum("ii", s), None),
    "einsum_outer": (lambda g, y, x, s: g.einsum("i,j->ij", x, x), None),
    "mean_keepdims": (lambda g, y, x, s: g.mean(y, axis=0, keepdims=True), None),
    "logsumexp_all": (lambda g, y, x, s: g.logsumexp(y), lambda y, x, s: np.log(np.exp(y).sum())),
    "broadcast_to_named": (lambda g, y, x, s: g.broadcast_to(x, (2, x.shape[0])), None),
    "powers": (lambda g, y, x, s: y**2 + (-1.5) ** 2 + y**-1 + 2.0**y, None),
    "masks_as_numbers": (lambda g, y, x, s: (y > 0) * 1.0 + (y <= 0.1), None),
    "mask_logic": (lambda g, y, x, s: g.where((y > 0) & ~(y > 1) | (y < -1), y, -y), None),
    "minimum_maximum": (lambda g, y, x, s: g.maximum(y, 0.2) - g.minimum(y[0], y[1]), None),
    "relu_abs_sign": (lambda g, y, x, s: g.relu(y) + g.abs(y) * g.sign(y), lambda y, x, s: np.maximum(y, 0) + np.abs(y) * np.sign(y)),
}


@pytest.mark.parametrize("name", sorted(SEMANTICS))
def test_traced_semantics_match_numpy(name):
    dsl, numpy_form = SEMANTICS[name]

    def k(y: f64[5, 4], x: f64["n"], s: f64[3, 3]):
        return dsl(gradc, y, x, s)

    rng = np.random.default_rng(6)
    y, x, s = rng.standard_normal((5, 4)), rng.standard_normal(6), rng.standard_normal((3, 3))
    want = numpy_form(y, x, s) if numpy_form else dsl(np, y, x, s)
    got = run(k, {"n": 6}, y=y, x=x, s=s)
    assert got.shape == np.shape(want)
    np.testing.assert_allclose(got, want, rtol=1e-12)


# ----------------------------------------------------------------------------- control flow
def maps(traced) -> list:
    return [n for n in ir.topo_order(traced.graph.outputs) if isinstance(n, ir.Map)]


def test_for_loop_over_a_python_range_unrolls():
    def k(x: f64[3]):
        y = x
        for _ in range(4):
            y = y * x
        return y

    traced = trace(k)
    assert sum(1 for n in maps(traced) if n.hint == "mul") == 4
    x = np.array([0.5, -1.5, 2.0])
    np.testing.assert_allclose(reference.evaluate(traced.graph.outputs, {"x": x}, {})[0], x**5)


def test_if_on_a_python_value_is_fine():
    def make(flag: bool):
        @gradc.kernel
        def k(x: f64[2]):
            if flag:
                return gradc.sin(x)
            return gradc.cos(x)

        return k

    x = np.array([0.3, 1.1])
    np.testing.assert_allclose(reference.evaluate(make(True).trace().graph.outputs, {"x": x}, {})[0], np.sin(x))
    np.testing.assert_allclose(reference.evaluate(make(False).trace().graph.outputs, {"x": x}, {})[0], np.cos(x))


def test_iterating_over_a_fixed_axis_unrolls():
    def k(x: f64[3, 2]):
        total = 0
        for row in x:
            total = total + gradc.sum(row * row)
        return total

    x = np.arange(6.0).reshape(3, 2)
    np.testing.assert_allclose(run(k, x=x), np.sum(x * x))


def test_factories_give_distinct_kernels():
    def make(op, scale):
        @gradc.kernel
        def k(x: f64[4]):
            return op(x) * scale

        return k

    kernels = [make(gradc.sin, 2.0), make(gradc.sin, 3.0), make(gradc.tanh, 2.0)]
    assert len({id(k) for k in kernels}) == 3
    x = np.linspace(-1, 1, 4)
    got = [reference.evaluate(k.trace().graph.outputs, {"x": x}, {})[0] for k in kernels]
    np.testing.assert_allclose(got[0], 2 * np.sin(x))
    np.testing.assert_allclose(got[1], 3 * np.sin(x))
    np.testing.assert_allclose(got[2], 2 * np.tanh(x))
    # Closure variables are not parameters.
    assert [p.name for p in kernels[0].params] == ["x"]


def test_kernel_calls_another_kernel_inline():
    @gradc.kernel
    def inner(x: f64[3]):
        return x * x

    def outer(x: f64[3]):
        return gradc.sum(inner(x))

    x = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(run(outer, x=x), 14.0)


def test_graph_size_does_not_depend_on_dimension_sizes():
    def make(rows, cols):
        @gradc.kernel
        def k(X: f32[rows, cols], W: f32[cols, 7]):
            Y = gradc.tanh(X @ W)
            return gradc.logsumexp(Y, axis=1).sum() + gradc.max(X[1:] - X[:-1])

        return k

    small = ir.topo_order(make(3, 3).trace().graph.outputs)
    large = ir.topo_order(make(4096, 512).trace().graph.outputs)
    assert len(small) == len(large)
    assert [type(n) for n in small] == [type(n) for n in large]


def test_traced_tensors_are_named_after_user_variables():
    def k(x: f64[3]):
        hidden = gradc.tanh(x)
        return gradc.sum(hidden)

    names = {n.name for n in ir.topo_order(trace(k).graph.outputs)}
    assert "hidden" in names


def test_tracing_passes_events_on_to_the_users_profile_function():
    def k(x: f64[3]):
        hidden = gradc.tanh(x)
        return gradc.sum(hidden)

    events = []

    def profiler(frame, event, arg):
        events.append((frame.f_code.co_name, event))

    sys.setprofile(profiler)
    try:
        names = {n.name for n in ir.topo_order(trace(k).graph.outputs)}
        assert sys.getprofile() is profiler
    finally:
        sys.setprofile(None)
    assert "hidden" in names
    assert ("k", "call") in events and ("k", "return") in events


def test_tracing_under_cprofile_keeps_the_profiler_running():
    def k(x: f64[3]):
        return gradc.sum(gradc.tanh(x))

    profile = cProfile.Profile()
    with profile:
        traced = trace(k)
        still_profiling = sys.getprofile() is profile
    assert still_profiling and not traced.named  # generic names: gradc.compile keeps it out of the index
    assert [tuple(o.shape) for o in traced.graph.outputs] == [()]
    assert any(func[2] == "k" for func in pstats.Stats(profile).stats)


# ----------------------------------------------------------------------------- trace-time errors
@pytest.mark.parametrize("form", ["if", "while", "and", "not", "bool"])
def test_control_flow_on_a_traced_tensor_names_file_and_line(form):
    lines = []

    def k(x: f32["n"]):
        if form == "if":
            lines.append(line_after(inspect.currentframe()))
            if gradc.sum(x) > 0:
                return x
        elif form == "while":
            lines.append(line_after(inspect.currentframe()))
            while gradc.sum(x) > 0:
                x = x - 1
        elif form == "and":
            lines.append(line_after(inspect.currentframe()))
            return (x > 0) and (x < 1)
        elif form == "not":
            lines.append(line_after(inspect.currentframe()))
            return not (x > 0)
        else:
            lines.append(line_after(inspect.currentframe()))
            return bool(x[0])
        return x

    with pytest.raises(gradc.TraceError) as info:
        trace(k)
    err = info.value
    assert err.filename == __file__
    assert err.lineno == lines[0]
    text = str(err)
    assert f"test_dsl.py:{lines[0]}" in text
    assert "gradc.where" in text


def test_float_of_a_traced_tensor_is_an_error():
    def k(x: f32[3]):
        return x * float(x[0])

    with pytest.raises(gradc.TraceError, match="gradc.where"):
        trace(k)


def test_broadcast_mismatch_names_both_shapes():
    lines = []

    def k(x: f32[3, 4], y: f32[5]):
        lines.append(line_after(inspect.currentframe()))
        return x + y

    with pytest.raises(gradc.ShapeError) as info:
        trace(k)
    text = str(info.value)
    assert "(3, 4)" in text and "(5,)" in text
    assert info.value.filename == __file__ and info.value.lineno == lines[0]


def test_broadcast_mismatch_between_named_dimensions():
    def k(x: f32["n"], y: f32["m"]):
        return x * y

    with pytest.raises(gradc.ShapeError) as info:
        trace(k)
    assert "(n,)" in str(info.value) and "(m,)" in str(info.value)


def test_matmul_mismatch_is_a_shape_error():
    def k(a: f32[3, 4], b: f32[5, 2]):
        return a @ b

    with pytest.raises(gradc.ShapeError) as info:
        trace(k)
    assert "(3, 4)" in str(info.value) and "(5, 2)" in str(info.value)


@pytest.mark.parametrize(
    "body, error",
    [
        (lambda x: gradc.reshape(x, (5, 2)), gradc.ShapeError),
        (lambda x: x[7], gradc.ShapeError),
        (lambda x: x[0, 0, 0], gradc.ShapeError),
        (lambda x: gradc.sum(x, axis=2), gradc.ShapeError),
        (lambda x: gradc.einsum("ij,jk->ik", x, x), gradc.ShapeError),
        (lambda x: gradc.concatenate([x, x[0]]), gradc.ShapeError),
        (lambda x: x * np.ones((3, 4)), gradc.TraceError),
        (lambda x: x[x], gradc.TraceError),
        (lambda x: x["a"], gradc.TraceError),
        (lambda x: x * "a", gradc.TraceError),
    ],
)
def test_trace_errors(body, error):
    def k(x: f32[3, 4]):
        return body(x)

    with pytest.raises(error):
        trace(k)


def test_named_dimension_cannot_drive_python_control_flow():
    lines = []

    def k(x: f32["n"]):
        total = 0
        lines.append(line_after(inspect.currentframe()))
        for i in range(x.shape[0]):
            total = total + x[i]
        return total

    with pytest.raises(gradc.DimensionError) as info:
        trace(k)
    assert info.value.lineno == lines[0]
    assert isinstance(info.value, gradc.ShapeError)


def test_returning_a_non_tensor_is_an_error():
    def k(x: f32[3]):
        return "loss"

    with pytest.raises(gradc.TraceError, match="must return tensors"):
        trace(k)


# ----------------------------------------------------------------------------- annotations
@pytest.mark.parametrize("dim", [1.5, -1, True, "two words", "", None])
def test_bad_dimension_in_annotation(dim):
    with pytest.raises(TypeError, match="dimension"):
        f32[3, dim]


def test_annotations_give_dtype_and_dims():
    assert f32["N", 3].dims == ("N", 3)
    assert f64[()].dims == ()
    assert f32[5].dims == (5,)
    assert f32["N"].dtype == "f32" and f64["N"].dtype == "f64"


def test_missing_annotation_is_reported_at_the_def():
    def k(x: f32[3], y):
        return x

    with pytest.raises(gradc.TraceError) as info:
        gradc.kernel(k)
    assert "'y'" in str(info.value)
    assert info.value.filename == __file__ and info.value.lineno == k.__code__.co_firstlineno


@pytest.mark.parametrize("annotation", [int, float, np.ndarray, "np.float32"])
def test_wrong_annotation_type(annotation):
    def k(x):
        return x

    k.__annotations__ = {"x": annotation}
    with pytest.raises(gradc.TraceError, match="needs an annotation"):
        gradc.kernel(k)


def test_annotation_that_cannot_be_evaluated():
    def k(x):
        return x

    k.__annotations__ = {"x": "f32[undefined_name]"}
    with pytest.raises(gradc.TraceError, match="cannot evaluate"):
        gradc.kernel(k)


def test_star_args_are_rejected():
    def k(*xs: f32[3]):
        return xs[0]

    with pytest.raises(gradc.TraceError, match=r"\*args"):
        gradc.kernel(k)


def test_dimension_named_like_a_parameter_is_rejected():
    def k(n: f32["n"]):
        return n

    with pytest.raises(gradc.TraceError, match="both as a parameter and as a dimension"):
        trace(k)
