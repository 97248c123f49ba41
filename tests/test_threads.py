"""threads=N: OpenMP kernels whose results do not depend on the threads that ran them.

Every kind of loop nest (map, reduce, tile, dots, accumulate, a whole-box loss) is compared
between threads=1 and threads=2 at sizes below and above the work threshold, on awkward
extents.  Each output element is computed by the same code whichever thread runs it, so the
arrays agree bit for bit; a loss over a whole loop box is summed in chunks fixed by its size,
so it agrees bit for bit between any two thread counts above one, and with one thread to
rounding.  Everything is also checked against NumPy in float64.
"""

import re
import shutil
import subprocess
import threading

import numpy as np
import pytest

import gradc
from gradc import build, cli, codegen, compiler, f32
from gradc.errors import GradcError


@gradc.kernel
def layer(X: f32["N", "K"], W: f32["K", "M"]):
    return gradc.sum(gradc.sin(X @ W) ** 2)


@gradc.kernel
def pointwise(x: f32["n"], y: f32["n"]):
    return gradc.sum(gradc.softplus(x) * gradc.sigmoid(y) + gradc.exp(-x * x))


@gradc.kernel
def rows(X: f32["N", "M"], v: f32["M"], x: f32["n"]):
    return gradc.max(X, axis=1), gradc.sum(X * v, axis=1), gradc.tanh(X) * v, gradc.max(X), gradc.exp(x) * 2, X @ X.T


@gradc.kernel
def shifted(x: f32["n"], X: f32["N", "M"], Z: f32["N", 4], z: f32[5]):
    return gradc.sum((x[1:] - x[:-1]) ** 2) + gradc.sum(X[:, 1:] * X[:, :-1]) + gradc.sum(Z * z[1:])


@gradc.kernel
def narrow(X: f32["N", "K"], W: f32["K", 10]):
    # d_W = Xᵀ·G with ten columns: a turned tile, its column tiles shared between threads
    return gradc.sum(gradc.tanh(X @ W) ** 2)


KERNELS = {"layer": layer, "pointwise": pointwise, "rows": rows, "shifted": shifted, "narrow": narrow}

#: (below the work threshold, above it), with extents that fill no tile, lane block or chunk evenly.
SIZES = {
    "layer": [dict(N=3, K=5, M=7), dict(N=67, K=33, M=45)],
    "pointwise": [dict(n=1000), dict(n=100_003)],
    "rows": [dict(N=3, M=5, n=7), dict(N=37, M=1031, n=50_001)],
    "shifted": [dict(n=11, N=3, M=5), dict(n=100_003, N=129, M=517)],
    "narrow": [dict(N=5, K=7), dict(N=1003, K=259)],
}


def inputs(name: str, dims: dict, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)

    def a(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    if name == "layer":
        return [a(dims["N"], dims["K"], scale=0.3), a(dims["K"], dims["M"], scale=0.3)]
    if name == "narrow":
        return [a(dims["N"], dims["K"], scale=0.3), a(dims["K"], 10, scale=0.1)]
    if name == "pointwise":
        return [a(dims["n"]), a(dims["n"])]
    if name == "rows":
        return [a(dims["N"], dims["M"]), a(dims["M"]), a(dims["n"])]
    return [a(dims["n"]), a(dims["N"], dims["M"]), a(dims["N"], 4), a(5)]


def reference(name: str, args: list[np.ndarray]):
    """(outputs, gradients) in float64, from NumPy; the gradients of scalar kernels only."""
    a = [x.astype(np.float64) for x in args]
    if name == "layer":
        X, W = a
        Y = X @ W
        G = 2 * np.sin(Y) * np.cos(Y)
        return [np.sum(np.sin(Y) ** 2)], [G @ W.T, X.T @ G]
    if name == "narrow":
        X, W = a
        T = np.tanh(X @ W)
        G = 2 * T * (1 - T * T)
        return [np.sum(T * T)], [G @ W.T, X.T @ G]
    if name == "pointwise":
        x, y = a
        sig = lambda t: 1 / (1 + np.exp(-t))  # noqa: E731
        sp = np.logaddexp(0, x)
        value = np.sum(sp * sig(y) + np.exp(-x * x))
        return [value], [sig(x) * sig(y) - 2 * x * np.exp(-x * x), sp * sig(y) * (1 - sig(y))]
    if name == "rows":
        X, v, x = a
        return [X.max(axis=1), (X * v).sum(axis=1), np.tanh(X) * v, X.max(), 2 * np.exp(x), X @ X.T], None
    x, X, Z, z = a
    d = x[1:] - x[:-1]
    dx = np.zeros_like(x)
    dx[1:] += 2 * d
    dx[:-1] -= 2 * d
    dX = np.zeros_like(X)
    dX[:, 1:] += X[:, :-1]
    dX[:, :-1] += X[:, 1:]
    dz = np.zeros_like(z)
    dz[1:] = Z.sum(axis=0)
    value = np.sum(d * d) + np.sum(X[:, 1:] * X[:, :-1]) + np.sum(Z * z[1:])
    return [value], [dx, dX, np.broadcast_to(z[1:], Z.shape), dz]


@pytest.fixture(scope="module")
def compiled():
    """Each kernel for one thread, two and three (three only where the tests need it)."""
    out = {(name, t): gradc.compile(k, threads=t) for name, k in KERNELS.items() for t in (1, 2)}
    out[("layer", 3)] = gradc.compile(layer, threads=3)
    out[("pointwise", 3)] = gradc.compile(pointwise, threads=3)
    return out


def evaluate(k, name: str, args: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(outputs, gradients) as lists of arrays: value_and_grad for scalar kernels, else vjp."""
    if name == "rows":
        outs = [np.asarray(o) for o in k(*args)]
        cts = [np.ones_like(o) for o in outs]
        _, grads = k.vjp(*args, cts)
        return outs, [np.asarray(g) for g in grads]
    value, grads = k.value_and_grad(*args)
    return [np.asarray(value)], [np.asarray(g) for g in grads]


def is_whole_box_sum(name: str) -> bool:
    """The kernel's only output is a sum over a whole loop box (summed in chunks on threads)."""
    return name != "rows"


@pytest.mark.parametrize("big", [False, True], ids=["below-threshold", "above-threshold"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_two_threads_match_one_and_numpy(compiled, name, big):
    dims = SIZES[name][big]
    args = inputs(name, dims)
    outs1, grads1 = evaluate(compiled[(name, 1)], name, args)
    outs2, grads2 = evaluate(compiled[(name, 2)], name, args)
    for g1, g2 in zip(grads1, grads2):
        np.testing.assert_array_equal(g2, g1)
    for o1, o2 in zip(outs1, outs2):
        if is_whole_box_sum(name):
            np.testing.assert_allclose(o2, o1, rtol=1e-6)
        else:
            np.testing.assert_array_equal(o2, o1)
    want_outs, want_grads = reference(name, args)
    for got, want in zip(outs2, want_outs):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    for got, want in zip(grads2, want_grads or []):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_row_panels_filled_by_two_threads_give_the_same_bits(compiled):
    # K*N above ROW_PANEL_MIN_BYTES and two full column tiles: the weight gradient reads X from
    # row panels, filled by the team
    args = inputs("layer", dict(N=2051, K=131, M=69), seed=6)
    one, two = (evaluate(compiled[("layer", t)], "layer", args) for t in (1, 2))
    for a, b in zip(one[1], two[1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["layer", "pointwise"])
def test_results_do_not_depend_on_the_thread_count(compiled, name):
    args = inputs(name, SIZES[name][True], seed=1)
    outs2, grads2 = evaluate(compiled[(name, 2)], name, args)
    outs3, grads3 = evaluate(compiled[(name, 3)], name, args)
    for a, b in zip(outs2 + grads2, outs3 + grads3):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", list(KERNELS))
def test_repeated_calls_give_the_same_bits(compiled, name):
    args = inputs(name, SIZES[name][True], seed=2)
    first = evaluate(compiled[(name, 2)], name, args)
    for _ in range(5):
        again = evaluate(compiled[(name, 2)], name, args)
        for a, b in zip(first[0] + first[1], again[0] + again[1]):
            np.testing.assert_array_equal(a, b)


def test_two_python_threads_call_one_threaded_kernel_at_once(compiled):
    k = compiled[("layer", 2)]
    args = [inputs("layer", SIZES["layer"][True], seed=s) for s in (3, 4)]
    want = [k.value_and_grad(*a) for a in args]
    failures = []

    def work(i):
        for _ in range(10):
            value, grads = k.value_and_grad(*args[i])
            if value != want[i][0] or not all(np.array_equal(g, w) for g, w in zip(grads, want[i][1])):
                failures.append(i)

    workers = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert failures == []


def test_every_kind_of_nest_is_shared_or_deliberately_serial(compiled):
    """The pragma lands on each kind of nest, and a scatter into shared outputs stays serial."""
    forms = {}
    for name in KERNELS:
        for fn in compiled[(name, 2)].rendered.functions[name]:
            for nest in fn.nests:
                forms.update((comment, nest) for comment in nest.comment)
    parallel = {c for c, n in forms.items() if n.parallel}
    assert any(c.startswith("matmul[n, m] +=") for c in parallel)  # tile
    assert any(c.startswith("d_X[n, k] +=") for c in parallel)  # dots
    assert any(c.startswith("out0[i] max=") for c in parallel)  # reduce, one row per output
    assert any(c.startswith("out3 max=") and forms[c].starts for c in parallel)  # whole-box max, in chunks
    assert any("(x[i + 1] - x[i])**2" in c and forms[c].starts for c in parallel)  # whole-box sum, in chunks
    assert any(c.startswith("d_x_1[i + 1] +=") for c in parallel)  # accumulate into distinct outputs
    # a turned tile (ten rows): threads share its column tiles
    (turned,) = [n for c, n in forms.items() if c.startswith("d_W[k, i] +=") and n.tile is not None and n.tile.parallel_cols]
    assert turned.parallel
    c_source = compiled[("narrow", 2)].c_source
    d_w = c_source[c_source.index("/* d_W[k, i] +=", c_source.index("int narrow_value_and_grad(")) :]
    assert re.search(r"#pragma omp parallel for[^\n]*\n#endif\n\s*for \(ptrdiff_t col0", d_w[:800])
    # the weight gradient's row panels are filled by the team too, one row tile per iteration
    c_source = compiled[("layer", 2)].c_source
    assert re.search(r"/\* operands strided along the reduction[^\n]*\n.*\n.*if \(row_panels\) \{\n#ifdef _OPENMP\n\s*#pragma omp parallel for", c_source)
    # d_z[i + 1] += Z[j, i] over j, j outermost: rows j share every output, so the nest stays serial.
    shared = [c for c in forms if c.startswith("d_z[i + 1] +=")]
    assert shared and not any(forms[c].parallel for c in shared)


def test_one_thread_is_todays_serial_c(compiled):
    serial = gradc.compile(layer)
    assert serial.c_source == compiled[("layer", 1)].c_source
    assert "#pragma omp" not in serial.c_source and "OPENMP" not in serial.c_source and "-fopenmp" not in serial.c_source
    assert compiled[("layer", 1)].meta["threads"] == 1 and compiled[("layer", 2)].meta["threads"] == 2
    assert "num_threads(2)" in compiled[("layer", 2)].c_source


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_a_bad_thread_count_is_a_clear_error(bad):
    with pytest.raises(GradcError, match=r"threads must be a positive integer.*" + repr(bad).replace(".", r"\.")):
        gradc.compile(layer, threads=bad)


def test_exported_c_builds_with_and_without_openmp(tmp_path, compiled):
    cc = shutil.which("cc") or pytest.skip("no C compiler")
    lowered = [compiler.lower(k, threads=2, name=name) for name, k in KERNELS.items()]
    rendered = codegen.render([l.spec for l in lowered], "threaded")
    cli.write_c(tmp_path, rendered)
    assert "compile with -fopenmp" in rendered.c_source
    for extra in ([], ["-fopenmp"]):
        cmd = [cc, "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O2", *extra, "-c", "threaded.c", "-o", "threaded.o"]
        result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0 and result.stderr == "", result.stderr


def test_without_openmp_the_same_source_runs_serially_with_the_same_bits(compiled, monkeypatch):
    monkeypatch.setattr(build, "OPENMP_FLAGS", ())
    plain = gradc.compile(layer, threads=2, cflags=build.default_cflags())
    assert plain.c_source == compiled[("layer", 2)].c_source
    args = inputs("layer", SIZES["layer"][True], seed=5)
    want = evaluate(compiled[("layer", 2)], "layer", args)
    got = evaluate(plain, "layer", args)
    for a, b in zip(want[0] + want[1], got[0] + got[1]):
        np.testing.assert_array_equal(a, b)


def test_a_compiler_without_openmp_is_named_in_the_error(tmp_path, monkeypatch):
    real = shutil.which("cc") or pytest.skip("no C compiler")
    fake = tmp_path / "cc-without-openmp"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "unknown option -fopenmp" >&2; exit 1; }}; done\nexec {real} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("GRADC_CACHE_DIR", str(tmp_path / "cache"))

    @gradc.kernel
    def double(x: f32["n"]):
        return x * 2

    with pytest.raises(build.BuildError, match=r"does not support OpenMP \(-fopenmp\).*threads=1"):
        gradc.compile(double, threads=2)


def test_cli_compiles_a_threaded_package(tmp_path, examples_path):
    from click.testing import CliRunner

    result = CliRunner().invoke(cli.main, ["compile", str(examples_path / "custom_layer.py"), "--threads", "2", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "num_threads(2)" in (tmp_path / "custom_layer" / "custom_layer.c").read_text()
    bad = CliRunner().invoke(cli.main, ["compile", str(examples_path / "custom_layer.py"), "--threads", "0", "-o", str(tmp_path)])
    assert bad.exit_code != 0 and "--threads" in bad.output
