"""The generated C against the independent NumPy evaluator, on the very graphs it was made from.

A few nontrivial kernels are lowered once (``compiler.lower``) and built together into one
native module.  For random sizes of the named dimensions and random data, every generated
function (forward, value_and_grad, vjp) must agree with :func:`gradc.reference.evaluate`
applied to the graph that :class:`gradc.codegen.Entry` holds for it.  The forward values
are also checked against plain NumPy, so that a graph both sides share cannot be wrong
unnoticed.
"""

from dataclasses import dataclass

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import gradc
from gradc import compiler, f64, ir, reference
from gradc.runtime import CompiledKernel

EXAMPLES = settings(max_examples=25, deadline=None)


@gradc.kernel
def mlp(X: f64["N", 4], W1: f64[4, 6], b1: f64[6], W2: f64[6, 3], Y: f64["N", 3]):
    H = gradc.tanh(X @ W1 + b1)
    logits = H @ W2
    nll = gradc.logsumexp(logits, axis=1) - gradc.sum(Y * logits, axis=1)
    return gradc.mean(nll)


def mlp_numpy(X, W1, b1, W2, Y):
    logits = np.tanh(X @ W1 + b1) @ W2
    m = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=1)) + m[:, 0]
    return np.mean(lse - np.sum(Y * logits, axis=1))


@gradc.kernel
def sine_layer(X: f64["N", "K"], W: f64["K", "M"]):
    Y = gradc.sin(X @ W)
    return gradc.sum(Y * Y)


def sine_layer_numpy(X, W):
    return np.sum(np.sin(X @ W) ** 2)


@gradc.kernel
def patchwork(x: f64["T", 3], w: f64[3]):
    d = x[1:] - x[:-1]
    z = gradc.concatenate([d * w, gradc.exp(x[:2]) - w[None, :]], axis=0)
    peak = gradc.max(z, axis=1)
    low = gradc.min(z * z, axis=0)
    return peak + gradc.sum(low), gradc.maximum(d, 0.5 * x[-1]) * w


def patchwork_numpy(x, w):
    d = x[1:] - x[:-1]
    z = np.concatenate([d * w, np.exp(x[:2]) - w[None, :]], axis=0)
    return z.max(axis=1) + np.sum((z * z).min(axis=0)), np.maximum(d, 0.5 * x[-1]) * w


# The dimension is called n on purpose: it once clashed with a local of *_workspace_size.
@gradc.kernel
def robust(r: f64["n"], s: f64["n", 2]):
    a = gradc.abs(r)
    huber = gradc.where(a < 1.0, 0.5 * r * r, a - 0.5)
    spread = gradc.sum(gradc.relu(s[:, 0] - s[:, 1])) / r.shape[0]
    return gradc.sum(huber) / r.shape[0] + spread + gradc.softplus(gradc.max(s)) - gradc.sigmoid(gradc.min(r))


def robust_numpy(r, s):
    a = np.abs(r)
    huber = np.where(a < 1.0, 0.5 * r * r, a - 0.5)
    spread = np.sum(np.maximum(s[:, 0] - s[:, 1], 0)) / len(r)
    return np.mean(huber) + spread + np.logaddexp(0, s.max()) - 1 / (1 + np.exp(-r.min()))


@dataclass
class Case:
    lowered: compiler.Lowered
    compiled: CompiledKernel

    def entry(self, suffix: str):
        (e,) = [e for e in self.lowered.spec.entries if e.suffix == suffix]
        return e

    def reference(self, suffix: str, inputs: dict, dims: dict) -> list[np.ndarray]:
        """Evaluate the graph of one generated function; results in the function's output order."""
        e = self.entry(suffix)
        assert {i.param for i in e.inputs} <= set(inputs)
        return reference.evaluate([node for _, node in e.outputs], inputs, dims)


KERNELS = {"mlp": mlp, "sine_layer": sine_layer, "patchwork": patchwork, "robust": robust}


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    """Every kernel in float64, and the MLP also in float32, built as one native module."""
    lowered = {name: compiler.lower(k) for name, k in KERNELS.items()}
    lowered["mlp_f32"] = compiler.lower(mlp, dtype="f32", name="mlp_f32")
    rendered, built = compiler.compile_many(list(lowered.values()), "test_reference_kernels")
    assert "mlp_f32_value_and_grad" in rendered.c_source
    return {name: Case(low, CompiledKernel(low.meta, built.ffi, built.lib)) for name, low in lowered.items()}


def assert_close(got, want, rtol=1e-9, atol=1e-11):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def check_all_entries(case: Case, args: dict, dims: dict, seed: int, rtol=1e-9, atol=1e-11):
    """forward, value_and_grad (for scalar kernels) and vjp, compiled vs reference."""
    k = case.compiled
    fwd_ref = case.reference("forward", args, dims)
    fwd = k(**args)
    fwd_c = list(fwd) if isinstance(fwd, tuple) else [fwd]
    for got, want in zip(fwd_c, fwd_ref, strict=True):
        assert_close(got, want, rtol, atol)

    names = [e.suffix for e in case.lowered.spec.entries]
    if "value_and_grad" in names:
        value, grads = k.value_and_grad(**args)
        ref = case.reference("value_and_grad", args, dims)
        assert_close(value, ref[0], rtol, atol)
        for got, want in zip(grads, ref[1:], strict=True):
            assert_close(got, want, rtol, atol)

    rng = np.random.default_rng(seed)
    cts = [rng.standard_normal(np.shape(v)) for v in fwd_ref]
    cot = tuple(cts) if k.meta["tuple_output"] else cts[0]
    value, grads = k.vjp(**args, cotangent=cot)
    vjp_inputs = case.entry("vjp").inputs[len(case.entry("forward").inputs) :]
    feed = {**args, **{i.param: c for i, c in zip(vjp_inputs, cts, strict=True)}}
    ref = case.reference("vjp", feed, dims)
    values = list(value) if isinstance(value, tuple) else [value]
    for got, want in zip(values + list(grads), ref, strict=True):
        assert_close(got, want, rtol, atol)
    return fwd_ref


def run_entry(case: Case, suffix: str, feed: dict, dims: dict) -> list[np.ndarray]:
    """Call one generated C function directly, by the ABI codegen gives it.

    Arguments: the named dimensions, one pointer per ``entry.inputs``, one per
    ``entry.outputs``, then the workspace.  This reaches every entry point, including
    those the runtime wraps in other ways (jvp, hvp).
    """
    k, entry = case.compiled, case.entry(suffix)
    ffi, lib, spec = k.ffi, k.lib, case.lowered.spec
    ptr = "float *" if spec.dtype == "f32" else "double *"
    dtype = np.float32 if spec.dtype == "f32" else np.float64
    subs = {ir.dim_symbol(d): v for d, v in dims.items()}

    def shape(node):
        return tuple(int(sp.sympify(e).xreplace(subs)) for e in node.shape)

    args = [np.ascontiguousarray(feed[i.param], dtype=dtype).reshape(shape(i)) for i in entry.inputs]
    outs = [np.full(shape(node), np.nan, dtype=dtype) for _, node in entry.outputs]
    dim_values = [dims[d] for d in spec.dims]
    workspace = np.zeros(getattr(lib, f"{spec.name}_workspace_size")(*dim_values) + 64, dtype=np.uint8)
    address = workspace.ctypes.data
    status = getattr(lib, f"{spec.name}_{suffix}")(
        *dim_values,
        *(ffi.from_buffer(ptr, a) for a in args),
        *(ffi.from_buffer(ptr, o, require_writable=True) for o in outs),
        ffi.cast("void *", address + (-address % 64)),
    )
    assert status == 0
    return outs


def data(shapes: dict, seed: int, ties: bool) -> dict:
    """Normal data, or small integers so that max/min, relu, abs and where meet their ties and kinks."""
    rng = np.random.default_rng(seed)
    if ties:
        return {n: rng.integers(-2, 3, s).astype(np.float64) for n, s in shapes.items()}
    return {n: rng.standard_normal(s) for n, s in shapes.items()}


seeds = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------------------- the kernels
@EXAMPLES
@given(n=st.integers(1, 6), seed=seeds)
def test_mlp(cases, n, seed):
    args = data({"X": (n, 4), "W1": (4, 6), "b1": (6,), "W2": (6, 3)}, seed, ties=False)
    args["Y"] = np.eye(3)[np.random.default_rng(seed).integers(0, 3, n)]
    (loss,) = check_all_entries(cases["mlp"], args, {"N": n}, seed)
    assert_close(loss, mlp_numpy(**args))


@EXAMPLES
@given(n=st.integers(1, 5), k=st.integers(1, 5), m=st.integers(1, 5), seed=seeds)
def test_sine_layer(cases, n, k, m, seed):
    args = data({"X": (n, k), "W": (k, m)}, seed, ties=False)
    (loss,) = check_all_entries(cases["sine_layer"], args, {"N": n, "K": k, "M": m}, seed)
    assert_close(loss, sine_layer_numpy(**args))
    # the closed form of the tutorial: dZ = sin(2Z), dW = X^T dZ, dX = dZ W^T
    _, (dX, dW) = cases["sine_layer"].compiled.value_and_grad(**args)
    dZ = np.sin(2 * args["X"] @ args["W"])
    assert_close(dW, args["X"].T @ dZ)
    assert_close(dX, dZ @ args["W"].T)


@EXAMPLES
@given(t=st.integers(2, 7), seed=seeds, ties=st.booleans())
def test_slices_concatenate_broadcast_and_extrema(cases, t, seed, ties):
    args = data({"x": (t, 3), "w": (3,)}, seed, ties)
    fwd = check_all_entries(cases["patchwork"], args, {"T": t}, seed)
    for got, want in zip(fwd, patchwork_numpy(**args), strict=True):
        assert_close(got, want)


@EXAMPLES
@given(n=st.integers(1, 8), seed=seeds, ties=st.booleans())
def test_named_dimension_with_kinks(cases, n, seed, ties):
    args = data({"r": (n,), "s": (n, 2)}, seed, ties)
    (loss,) = check_all_entries(cases["robust"], args, {"n": n}, seed)
    assert_close(loss, robust_numpy(**args))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 6), seed=seeds)
def test_float32_build_tracks_the_float64_reference(cases, n, seed):
    case = cases["mlp_f32"]
    args = data({"X": (n, 4), "W1": (4, 6), "b1": (6,), "W2": (6, 3)}, seed, ties=False)
    args["Y"] = np.eye(3)[np.random.default_rng(seed).integers(0, 3, n)]
    args32 = {k: v.astype(np.float32) for k, v in args.items()}
    value, grads = case.compiled.value_and_grad(**args32)
    assert np.asarray(value).dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    ref = case.reference("value_and_grad", {k: v.astype(np.float64) for k, v in args32.items()}, {"N": n})
    for got, want in zip([value, *grads], ref, strict=True):
        assert_close(got, want, rtol=2e-4, atol=2e-5)


SIZES = {"mlp": {"N": (1, 5)}, "sine_layer": {"N": (1, 4), "K": (1, 4), "M": (1, 4)}, "patchwork": {"T": (2, 6)}, "robust": {"n": (1, 6)}}


@pytest.mark.parametrize("name", sorted(KERNELS))
@settings(max_examples=10, deadline=None)
@given(draw=st.data(), seed=seeds)
def test_every_generated_function_matches_its_graph(cases, name, draw, seed):
    """All entry points (forward, value_and_grad, vjp and any others codegen emits)."""
    case = cases[name]
    dims = {d: draw.draw(st.integers(*SIZES[name][d]), label=d) for d in case.lowered.spec.dims}
    subs = {ir.dim_symbol(d): v for d, v in dims.items()}
    rng = np.random.default_rng(seed)
    for entry in case.lowered.spec.entries:
        feed = {i.param: rng.standard_normal(tuple(int(e.xreplace(subs)) for e in i.shape)) for i in entry.inputs}
        want = case.reference(entry.suffix, feed, dims)
        got = run_entry(case, entry.suffix, feed, dims)
        for (out_name, _), g, w in zip(entry.outputs, got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11, err_msg=f"{name}_{entry.suffix}: {out_name}")


def test_larger_sizes_take_the_same_code(cases):
    """Sizes far from the ones hypothesis draws: the loops are over runtime extents."""
    case = cases["sine_layer"]
    args = data({"X": (37, 19), "W": (19, 23)}, 1, ties=False)
    check_all_entries(case, args, {"N": 37, "K": 19, "M": 23}, 1, rtol=1e-8, atol=1e-9)


def test_every_entry_has_a_graph_for_each_output(cases):
    for name, case in cases.items():
        entries = {e.suffix: e for e in case.lowered.spec.entries}
        assert set(entries) >= {"forward", "vjp"}
        n_out = len(case.lowered.meta["outputs"])
        n_wrt = len(case.lowered.meta["wrt"])
        assert len(entries["forward"].outputs) == n_out
        assert len(entries["vjp"].outputs) == n_out + n_wrt
        assert len(entries["vjp"].inputs) == len(entries["forward"].inputs) + n_out
        if "value_and_grad" in entries:
            assert n_out == 1 and len(entries["value_and_grad"].outputs) == 1 + n_wrt
