"""gradc.compile's key computed without tracing, and the cache index it selects.

A stale kernel is the worst possible bug, so every test changes one thing the compiled
result depends on (a global constant, a closure value, a called helper's body, an
annotation, wrt, dtype, stable) and checks the numbers the new kernel gives against NumPy.
Kernels are tiny vector sums, so that each compile is cheap.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gradc
from gradc import build, compiler, f32, f64, fingerprint

X = np.array([-1.5, 0.25, 2.0])

SCALE = 2.0
OFFSETS = np.array([1.0, -2.0, 0.5])
PARAMS = (2.0, "cube")


def helper(x):
    return x * x


@gradc.kernel
def scaled(x: f64["N"]):
    return gradc.sum(gradc.sin(x) * SCALE)


@gradc.kernel
def shifted(x: f64[3]):
    # Arrays cannot be captured whole; values read from them at trace time are constants.
    return gradc.sum((x - float(OFFSETS[2])) ** 2)


@gradc.kernel
def calls_helper(x: f64["N"]):
    return gradc.sum(helper(x))


@gradc.kernel
def reads_tuple(x: f64["N"]):
    power = 3 if PARAMS[1] == "cube" else 2
    return gradc.sum(x**power) * PARAMS[0]


def make_power(p):
    @gradc.kernel
    def power(x: f64["N"]):
        return gradc.sum(x**p)

    return power


class Config:
    def __init__(self, scale):
        self.scale = scale


CONFIG = Config(2.0)


@gradc.kernel
def reads_object(x: f64["N"]):
    return gradc.sum(x * CONFIG.scale)


def digest(k):
    return fingerprint.kernel_digest(k)


# -- the key alone (no C compiled) ---------------------------------------------------------------
def test_digest_is_stable_for_an_unchanged_kernel():
    assert digest(scaled) is not None
    assert digest(scaled) == digest(scaled)
    assert digest(make_power(3)) == digest(make_power(3))


def test_digest_changes_with_a_global_constant(monkeypatch):
    before = digest(scaled)
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3.0)
    assert digest(scaled) != before


def test_digest_changes_with_one_element_of_a_global_array(monkeypatch):
    before = digest(shifted)
    changed = OFFSETS.copy()
    changed[2] = 0.75
    monkeypatch.setattr(sys.modules[__name__], "OFFSETS", changed)
    assert digest(shifted) != before
    monkeypatch.setattr(sys.modules[__name__], "OFFSETS", OFFSETS.astype(np.float32))
    assert digest(shifted) != before  # same values, another dtype


def test_digest_changes_with_a_value_inside_a_global_tuple(monkeypatch):
    before = digest(reads_tuple)
    monkeypatch.setattr(sys.modules[__name__], "PARAMS", (2.0, "square"))
    assert digest(reads_tuple) != before


def test_digest_changes_with_a_closure_value():
    assert digest(make_power(2)) != digest(make_power(3))
    assert digest(make_power(2)) != digest(make_power(2.0))


def test_digest_changes_with_a_called_helpers_body(monkeypatch):
    before = digest(calls_helper)
    monkeypatch.setattr(sys.modules[__name__], "helper", lambda x: x * x * x)
    assert digest(calls_helper) != before


def test_digest_changes_with_an_annotation():
    digests = set()
    for annotation in (f64["N"], f32["N"], f64[3], f64["M"]):
        fn = lambda x: gradc.sum(x * x)  # noqa: E731 - the same code each time
        fn.__annotations__ = {"x": annotation}
        digests.add(digest(gradc.kernel(fn)))
    assert len(digests) == 4


def test_digest_changes_with_the_kernels_default_wrt():
    def two(x: f64["N"], y: f64["N"]):
        return gradc.sum(x * y)

    assert digest(gradc.kernel(two, wrt=["x"])) != digest(gradc.kernel(two, wrt=["y"]))


def test_digest_changes_with_a_comment_in_the_kernels_file(tmp_path):
    """The C quotes the kernel's source, comments included."""
    import importlib.util

    def load(text: str):
        path = tmp_path / "commented.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location("commented", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.k

    body = 'import gradc\n\n@gradc.kernel\ndef k(x: gradc.f64["N"]):\n    {}\n    return gradc.sum(x)\n'
    assert digest(load(body.format("# one"))) != digest(load(body.format("# two")))
    assert digest(load(body.format("# one"))) == digest(load(body.format("# one")))


def test_compile_key_changes_with_every_option():
    d = digest(scaled)
    base = {"wrt": None, "dtype": None, "stable": True, "backend": "c", "threads": 1}
    flags = build.default_cflags()
    keys = {fingerprint.compile_key(d, base, flags)}
    for change in ({"wrt": ["x"]}, {"wrt": "x"}, {"dtype": "f32"}, {"stable": False}, {"threads": 2}):
        keys.add(fingerprint.compile_key(d, {**base, **change}, flags))
    keys.add(fingerprint.compile_key(d, base, flags + ["-O2"]))
    assert len(keys) == 7


@pytest.mark.parametrize(
    "value",
    [Config(1.0), object(), os, np.array([object()]), {1, 2}, [Config(1.0)]],
    ids=["instance", "object", "user-module", "object-array", "set", "list-of-instance"],
)
def test_values_the_key_cannot_describe_give_no_digest(monkeypatch, value):
    monkeypatch.setattr(sys.modules[__name__], "SCALE", value)
    assert digest(scaled) is None


def test_gradc_numpy_and_math_are_described_by_name():
    import math

    @gradc.kernel
    def uses_modules(x: f64["N"]):
        return gradc.sum(x * np.float64(math.pi)) + gradc.sum(gradc.sigmoid(x))

    assert digest(uses_modules) is not None


def test_a_recursive_helper_is_described_once():
    def depth(n):
        return 0 if n == 0 else 1 + depth(n - 1)

    @gradc.kernel
    def recursive(x: f64["N"]):
        return gradc.sum(x) * depth(3)

    assert digest(recursive) is not None


# -- compiled results follow every change ----------------------------------------------------------
def test_compile_follows_a_global_constant(monkeypatch):
    np.testing.assert_allclose(gradc.compile(scaled)(X), np.sum(np.sin(X) * 2.0), rtol=1e-14)
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3.0)
    k = gradc.compile(scaled)
    np.testing.assert_allclose(k(X), np.sum(np.sin(X) * 3.0), rtol=1e-14)
    np.testing.assert_allclose(k.grad(X)[0], 3.0 * np.cos(X), rtol=1e-14)


def test_compile_follows_a_global_array(monkeypatch):
    np.testing.assert_allclose(gradc.compile(shifted)(X), np.sum((X - 0.5) ** 2), rtol=1e-14)
    monkeypatch.setattr(sys.modules[__name__], "OFFSETS", np.array([1.0, -2.0, -1.0]))
    np.testing.assert_allclose(gradc.compile(shifted)(X), np.sum((X + 1.0) ** 2), rtol=1e-14)


def test_compile_follows_a_closure_value():
    for p in (2, 3, 2):
        k = gradc.compile(make_power(p))
        np.testing.assert_allclose(k(X), np.sum(X**p), rtol=1e-14)
        np.testing.assert_allclose(k.grad(X)[0], p * X ** (p - 1), rtol=1e-14)


def test_compile_follows_a_called_helpers_body(monkeypatch):
    np.testing.assert_allclose(gradc.compile(calls_helper)(X), np.sum(X * X), rtol=1e-14)
    monkeypatch.setattr(sys.modules[__name__], "helper", lambda x: gradc.exp(x))
    np.testing.assert_allclose(gradc.compile(calls_helper)(X), np.sum(np.exp(X)), rtol=1e-14)


def test_compile_follows_an_annotation():
    for annotation, dtype in ((f64["N"], np.float64), (f32["N"], np.float32)):
        fn = lambda x: gradc.sum(gradc.exp(x))  # noqa: E731 - the same code each time
        fn.__annotations__ = {"x": annotation}
        value, (grad,) = gradc.compile(gradc.kernel(fn)).value_and_grad(X.astype(dtype))
        assert np.asarray(value).dtype == dtype and grad.dtype == dtype
        np.testing.assert_allclose(grad, np.exp(X), rtol=1e-6 if dtype == np.float32 else 1e-14)


def test_compile_follows_wrt_dtype_and_stable():
    @gradc.kernel
    def softplus_sum(x: f64["N"], y: f64["N"]):
        return gradc.sum(gradc.log(1 + gradc.exp(x)) * y)

    x, y = np.array([1000.0, 0.5, -2.0]), np.array([1.0, 2.0, 3.0])
    sig = 1 / (1 + np.exp(-np.clip(x, -500, 500)))
    np.testing.assert_allclose(gradc.compile(softplus_sum, wrt=["x"]).grad(x, y)[0], y * sig, rtol=1e-14)
    np.testing.assert_allclose(gradc.compile(softplus_sum, wrt=["y"]).grad(x, y)[0], np.logaddexp(0, x), rtol=1e-14)
    assert gradc.compile(softplus_sum, dtype="f32")(x, y).dtype == np.float32
    assert gradc.compile(softplus_sum, dtype="f64")(x, y).dtype == np.float64
    # log(1 + exp(1000)) is 1000 only with the stability rewrites.
    np.testing.assert_allclose(gradc.compile(softplus_sum)(x, y), np.sum(np.logaddexp(0, x) * y), rtol=1e-14)
    assert np.isinf(gradc.compile(softplus_sum, stable=False)(x, y))


def test_an_earlier_compiled_kernel_keeps_its_own_values_for_every_entry_point(monkeypatch):
    # vjp, jvp and hvp are built on first use: from the trace the first two entry points
    # were built from, not from the kernel as it is now.
    before = gradc.compile(scaled)
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3.0)
    after = gradc.compile(scaled)
    np.testing.assert_allclose(before.vjp(X, 1.0)[1][0], 2.0 * np.cos(X), rtol=1e-14)
    np.testing.assert_allclose(before.hvp(X, (np.ones(3),))[0], -2.0 * np.sin(X), rtol=1e-14)
    np.testing.assert_allclose(after.vjp(X, 1.0)[1][0], 3.0 * np.cos(X), rtol=1e-14)
    assert "2⋅cos" in before.show("math") and "3⋅cos" in after.show("math")


def test_compile_follows_an_object_the_key_cannot_describe(monkeypatch):
    np.testing.assert_allclose(gradc.compile(reads_object)(X), np.sum(X * 2.0), rtol=1e-14)
    monkeypatch.setattr(CONFIG, "scale", 5.0)
    np.testing.assert_allclose(gradc.compile(reads_object)(X), np.sum(X * 5.0), rtol=1e-14)


# -- the index on disk -------------------------------------------------------------------------------
@gradc.kernel
def cubes(x: f64["N"]):
    return gradc.sum(x * x * x)


def _fresh(k):
    """The same function as a new Kernel object, so that the in-process memo does not answer."""
    return gradc.kernel(k.fn)


@pytest.fixture(scope="module")
def cubes_cache(tmp_path_factory):
    """A cache holding ``cubes``, built once, and the kernel as it was built."""
    cache = tmp_path_factory.mktemp("cubes") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADC_CACHE_DIR", str(cache))
        return cache, gradc.compile(_fresh(cubes))


@pytest.fixture
def private_cache(monkeypatch, tmp_path, cubes_cache):
    """A copy of ``cubes_cache`` as this test's cache."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(cubes_cache[0], cache)
    monkeypatch.setenv("GRADC_CACHE_DIR", str(cache))
    return cache


def _record(cache: Path) -> Path:
    (path,) = (cache / build.INDEX).glob("*.json")
    return path


def test_a_loaded_kernel_has_its_source_views_and_errors(private_cache, cubes_cache):
    built = cubes_cache[1]
    loaded = gradc.compile(_fresh(cubes))
    assert loaded._lowered is None  # loaded through the index, not traced
    assert loaded.c_source == built.c_source and loaded.header == built.header
    assert loaded.meta == built.meta
    assert loaded.show("math") == built.show("math")  # computed on demand
    np.testing.assert_allclose(loaded.hvp(X, (np.ones(3),))[0], 6 * X, rtol=1e-14)
    np.testing.assert_allclose(loaded.jvp(X, (np.ones(3),))[1], np.sum(3 * X**2), rtol=1e-14)
    np.testing.assert_allclose(loaded.vjp(X, 2.0)[1][0], 6 * X**2, rtol=1e-14)
    with pytest.raises(gradc.ShapeError, match="cubes: parameter 'x'"):
        loaded(np.ones((2, 2)))


@pytest.mark.parametrize("damage", ["garbage", "half", "wrong-meta", "other-module", "missing-entry", "truncated-extension"])
def test_a_damaged_index_record_or_entry_rebuilds(private_cache, damage):
    record = _record(private_cache)
    text = record.read_text()
    entry = private_cache / json.loads(text)["module"]
    if damage == "garbage":
        record.write_bytes(b"\x00\xff not json")
    elif damage == "half":
        record.write_text(text[: len(text) // 2])
    elif damage == "wrong-meta":
        record.write_text(json.dumps({**json.loads(text), "meta": {"kernel": "cubes"}}))
    elif damage == "other-module":
        record.write_text(json.dumps({**json.loads(text), "module": "../../elsewhere"}))
    elif damage == "missing-entry":
        import shutil

        shutil.rmtree(entry)
    else:
        (so,) = entry.glob("*.so")
        so.write_bytes(so.read_bytes()[:100])
    k = gradc.compile(_fresh(cubes))
    np.testing.assert_allclose(k(X), np.sum(X**3), rtol=1e-14)
    np.testing.assert_allclose(k.grad(X)[0], 3 * X**2, rtol=1e-14)
    assert json.loads(_record(private_cache).read_text()) == json.loads(text)  # rewritten whole
    assert build._valid_entry(entry, None) is not None


def test_a_loaded_kernel_refuses_to_lower_a_changed_kernel(private_cache, monkeypatch):
    @gradc.kernel
    def scaled_again(x: f64["N"]):
        return gradc.sum(gradc.sin(x) * SCALE)

    gradc.compile(_fresh(scaled_again))  # built, and recorded in the index
    kernel = _fresh(scaled_again)
    loaded = gradc.compile(kernel)  # through the index: not traced
    assert loaded._lowered is None
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3.0)
    np.testing.assert_allclose(loaded.grad(X)[0], 2.0 * np.cos(X), rtol=1e-14)  # built already
    with pytest.raises(gradc.GradcError, match="'scaled_again' has changed .* call gradc.compile on it again"):
        loaded.vjp(X, 1.0)
    with pytest.raises(gradc.GradcError, match="has changed"):
        loaded.c_source


def test_a_kernel_compiled_under_cprofile_is_not_recorded_in_the_index(private_cache):
    import cProfile

    @gradc.kernel
    def profiled(x: f64["N"]):
        squares = x * x
        return gradc.sum(squares)

    before = set((private_cache / build.INDEX).glob("*.json"))
    with cProfile.Profile():
        k = gradc.compile(profiled)
    np.testing.assert_allclose(k.grad(X)[0], 2 * X, rtol=1e-14)
    assert set((private_cache / build.INDEX).glob("*.json")) == before
    gradc.compile(_fresh(profiled))  # not profiled: recorded
    assert len(set((private_cache / build.INDEX).glob("*.json")) - before) == 1


def test_a_record_from_another_compiler_is_not_trusted(private_cache):
    record = _record(private_cache)
    assert compiler._load_indexed(cubes, "unused digest", record.stem, {}) is not None
    record.write_text(json.dumps({**json.loads(record.read_text()), "compiler": "/usr/bin/some-other-cc:1:1"}))
    assert compiler._load_indexed(cubes, "unused digest", record.stem, {}) is None


# -- across processes ---------------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import gradc
    from gradc import f64

    SCALE = float(os.environ["SCALE"])

    @gradc.kernel
    def scaled(x: f64["N"]):
        return gradc.sum(gradc.exp(x) * SCALE)

    value, grad = gradc.compile(scaled, wrt="x").value_and_grad(np.array([0.0, 1.0]))
    print(json.dumps([float(value), grad.tolist()]))
    """
)


def test_a_changed_global_is_seen_by_the_next_process(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    def run(scale: str, cc: str | None = None):
        env = dict(os.environ, GRADC_CACHE_DIR=str(tmp_path / "cache"), SCALE=scale)
        if cc is not None:
            env["CC"] = cc
        return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)

    def check(result, scale: float):
        assert result.returncode == 0, result.stderr
        value, grad = json.loads(result.stdout)
        np.testing.assert_allclose(value, scale * (1 + np.e), rtol=1e-14)
        np.testing.assert_allclose(grad, scale * np.exp([0.0, 1.0]), rtol=1e-14)

    check(run("2.0"), 2.0)
    # Loads through the index: no C compiler is needed.
    check(run("2.0", cc="nosuchcc"), 2.0)
    # A new value is a new kernel: without a compiler it cannot be built, and must not be loaded.
    stale = run("3.0", cc="nosuchcc")
    assert stale.returncode != 0 and "C compiler" in stale.stderr
    check(run("3.0"), 3.0)
    check(run("2.0", cc="nosuchcc"), 2.0)


def test_calling_a_kernel_directly_sees_a_changed_global(private_cache, monkeypatch):
    """``scaled(x)`` (no gradc.compile in sight) compiles its forward pass; a later call after
    SCALE changed must compute with the new value, not reuse the first build."""
    np.testing.assert_allclose(scaled(X), np.sum(np.sin(X)) * 2.0, rtol=1e-14)
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 7.0)
    np.testing.assert_allclose(scaled(X), np.sum(np.sin(X)) * 7.0, rtol=1e-14)
