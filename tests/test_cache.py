"""The on-disk kernel cache across processes: races, damaged entries, loading without building.

Every process here runs with ``CC`` pointing at a small wrapper around the real compiler
that logs its command lines, so a test can tell a build from a load.  The wrapper passes
``--version`` through, so every process reports the same compiler and accepts the others'
entries.
"""

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import gradc

CHILD = textwrap.dedent(
    '''
    import json
    import os
    import sys
    import time

    import gradc
    from gradc import f32, f64


    @gradc.kernel
    def layer(X: f32["N", "K"], W: f32["K", "M"]):
        Y = gradc.sin(X @ W)
        return gradc.sum(Y * Y)


    @gradc.kernel
    def layer64(X: f64["N", "K"], W: f64["K", "M"]):
        Y = gradc.sin(X @ W)
        return gradc.sum(Y * Y)


    @gradc.kernel
    def tanh_sum(x: f64["N"]):
        return gradc.sum(gradc.tanh(x))


    X = [[-1.0, 0.0, 1.0], [2.0, 3.0, 4.0], [-1.0, -5.0, 2.0]]
    W = [[0.5, -1.0], [0.25, 2.0], [-0.75, 1.5]]
    x = [-2.0, 0.5, 3.0]

    ready, go = os.environ.get("READY_FILE"), os.environ.get("GO_FILE")
    if ready:
        # Both racers have paid for their imports; now compile at the same moment.
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.002)

    out = {}
    for k in (layer, layer64):
        loss, (dX, dW) = gradc.compile(k).value_and_grad(X, W)
        out[k.name] = [float(loss), dX.tolist(), dW.tolist()]
    value, (dx,) = gradc.compile(tanh_sum).value_and_grad(x)
    out["tanh_sum"] = [float(value), dx.tolist()]
    print(json.dumps(out))
    '''
)

KERNELS = ("layer", "layer64", "tanh_sum")


def check_numbers(out: dict) -> None:
    X = np.array([[-1.0, 0.0, 1.0], [2.0, 3.0, 4.0], [-1.0, -5.0, 2.0]])
    W = np.array([[0.5, -1.0], [0.25, 2.0], [-0.75, 1.5]])
    x = np.array([-2.0, 0.5, 3.0])
    Z = X @ W
    loss, dX, dW = np.sum(np.sin(Z) ** 2), np.sin(2 * Z) @ W.T, X.T @ np.sin(2 * Z)
    for name, rtol in (("layer", 1e-5), ("layer64", 1e-12)):
        got_loss, got_dX, got_dW = out[name]
        assert got_loss == pytest.approx(loss, rel=rtol)
        np.testing.assert_allclose(got_dX, dX, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(got_dW, dW, rtol=rtol, atol=rtol)
    value, dx = out["tanh_sum"]
    assert value == pytest.approx(np.sum(np.tanh(x)), rel=1e-12)
    np.testing.assert_allclose(dx, 1 - np.tanh(x) ** 2, rtol=1e-12)


def entries(cache: Path) -> dict[str, Path]:
    """The cache's entry folders by kernel name; fails on leftovers or duplicates."""
    found = sorted(p for p in cache.iterdir() if p.name not in ("index", "templates"))  # not entries
    assert all(not p.name.startswith(".") for p in found), f"staging or broken folders left behind: {found}"
    by_kernel = {}
    for name in KERNELS:
        matches = [p for p in found if p.name.startswith(f"_gradc_{name}_")]
        assert len(matches) == 1, f"expected exactly one entry for {name}, found {matches}"
        by_kernel[name] = matches[0]
    assert len(found) == len(KERNELS), found
    return by_kernel


def assert_valid(entry: Path) -> None:
    """The manifest names an extension whose SHA-256 it records (checked independently of gradc)."""
    manifest = json.loads((entry / "manifest.json").read_text())
    so = entry / manifest["extension"]
    assert so.stat().st_size > 0
    assert hashlib.sha256(so.read_bytes()).hexdigest() == manifest["sha256"]


@pytest.fixture(scope="module")
def child_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("child") / "kernels.py"
    path.write_text(CHILD)
    return path


@pytest.fixture(scope="module")
def logging_cc(tmp_path_factory) -> Path:
    """A compiler wrapper that appends its command line to $CC_LOG, then runs the real compiler."""
    real = shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) or shutil.which("cc")
    path = tmp_path_factory.mktemp("cc") / "logging-cc"
    path.write_text(
        "#!/bin/sh\n"
        'if [ -n "$CC_LOG" ]; then printf "%s\\n" "$*" >> "$CC_LOG"; fi\n'
        f"exec {shlex.quote(real)} \"$@\"\n"
    )
    path.chmod(0o755)
    return path


def child_env(cache: Path, cc, log: Path | None = None, **extra) -> dict:
    env = dict(os.environ, GRADC_CACHE_DIR=str(cache), CC=str(cc), **extra)
    env.pop("CC_LOG", None)
    if log is not None:
        env["CC_LOG"] = str(log)
    return env


def run_child(script: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)


def compiler_runs(log: Path) -> list[str]:
    """Logged compiler command lines other than the identity check (``--version``)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [line for line in lines if line.strip() != "--version"]


@pytest.fixture(scope="module")
def raced_cache(tmp_path_factory, child_script, logging_cc):
    """Two processes compile the same new kernels into one empty cache at the same moment."""
    base = tmp_path_factory.mktemp("race")
    cache, go = base / "cache", base / "go"
    procs, readies = [], []
    for i in range(2):
        ready = base / f"ready{i}"
        readies.append(ready)
        env = child_env(cache, logging_cc, base / "cc.log", READY_FILE=str(ready), GO_FILE=str(go))
        procs.append(subprocess.Popen([sys.executable, str(child_script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 120
        while not all(r.exists() for r in readies) and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.005)
        go.touch()
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return cache, [(p.returncode, out, err) for p, (out, err) in zip(procs, results)]


def test_concurrent_compiles_both_succeed_and_leave_one_entry(raced_cache):
    cache, results = raced_cache
    for returncode, out, err in results:
        assert returncode == 0, err
        check_numbers(json.loads(out))
    for entry in entries(cache).values():
        assert_valid(entry)


@pytest.mark.parametrize("damage", ["truncate-extension", "delete-manifest", "corrupt-manifest"])
def test_damaged_entry_is_rebuilt_not_loaded(raced_cache, child_script, logging_cc, tmp_path, damage):
    cache = tmp_path / "cache"
    shutil.copytree(raced_cache[0], cache)
    entry = entries(cache)["layer"]
    manifest = entry / "manifest.json"
    so = entry / json.loads(manifest.read_text())["extension"]
    if damage == "truncate-extension":
        with open(so, "r+b") as f:
            f.truncate(so.stat().st_size // 2)
    elif damage == "delete-manifest":
        manifest.unlink()
    else:
        manifest.write_text('{"extension": ')

    log = tmp_path / "cc.log"
    result = run_child(child_script, child_env(cache, logging_cc, log))
    assert result.returncode == 0, result.stderr
    check_numbers(json.loads(result.stdout))
    # Only the damaged kernel was compiled again (cffi's unit and one per entry point), and
    # its entry is whole again.
    built = [line for line in compiler_runs(log) if " -c " in line]
    assert len(built) == 1 + len(list(entry.glob("layer_*.c")))
    assert all(entry.name in line for line in built)
    fresh = entries(cache)
    assert fresh["layer"] == entry
    for e in fresh.values():
        assert_valid(e)


def test_cached_kernels_load_without_running_the_compiler(raced_cache, child_script, logging_cc, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(raced_cache[0], cache)
    log = tmp_path / "cc.log"
    result = run_child(child_script, child_env(cache, logging_cc, log))
    assert result.returncode == 0, result.stderr
    check_numbers(json.loads(result.stdout))
    assert compiler_runs(log) == []
    entries(cache)


def test_cached_kernels_load_when_no_compiler_is_installed(raced_cache, child_script, tmp_path):
    """A warm cache should not need a compiler (e.g. a deployment image without gcc)."""
    cache = tmp_path / "cache"
    shutil.copytree(raced_cache[0], cache)
    result = run_child(child_script, child_env(cache, "nosuchcc"))
    assert result.returncode == 0, result.stderr
    check_numbers(json.loads(result.stdout))


def test_no_compiler_gives_a_clear_error(monkeypatch, tmp_path):
    @gradc.kernel
    def cube(x: gradc.f64["N"]):
        return gradc.sum(x * x * x)

    cache = tmp_path / "cache"
    monkeypatch.setenv("GRADC_CACHE_DIR", str(cache))
    monkeypatch.setenv("CC", "nosuchcc")
    with pytest.raises(gradc.GradcError, match="C compiler") as err:
        gradc.compile(cube)
    assert "nosuchcc" in str(err.value)
    assert not cache.exists() or not any(cache.iterdir())


def test_no_compiler_from_the_cli_is_one_line(tmp_path):
    source = tmp_path / "cube.py"
    source.write_text('import gradc\n\n\n@gradc.kernel\ndef cube(x: gradc.f64["N"]):\n    return gradc.sum(x * x * x)\n')
    env = dict(os.environ, GRADC_CACHE_DIR=str(tmp_path / "cache"), CC="nosuchcc")
    result = subprocess.run(
        [sys.executable, "-m", "gradc.cli", "compile", str(source), "-o", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "C compiler" in lines[0], result.stderr
    assert not (tmp_path / "out" / "cube").exists()
