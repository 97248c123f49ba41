"""Building an extension by running the C compiler directly (no setuptools)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gradc
from gradc import build, f64


@gradc.kernel
def squares(x: f64["N"]):
    return gradc.sum(x * x)


@pytest.fixture
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_build_prints_nothing_and_gives_the_right_numbers(private_cache, capfd):
    k = gradc.compile(gradc.kernel(squares.fn))
    x = np.array([1.0, -2.0, 0.5])
    value, (dx,) = k.value_and_grad(x)
    assert value == pytest.approx(5.25, rel=1e-15)
    np.testing.assert_array_equal(dx, 2 * x)
    assert capfd.readouterr() == ("", "")
    (entry,) = [p for p in private_cache.iterdir() if p.name.startswith("_gradc_")]
    assert build._valid_entry(entry, None) is not None
    assert not [p for p in private_cache.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_compiler_error_names_the_flag_and_quotes_the_compiler(private_cache):
    with pytest.raises(build.BuildError) as err:
        gradc.compile(gradc.kernel(squares.fn), cflags=["-O2", "-fno-such-option-anywhere"])
    message = str(err.value)
    assert "failed to build" in message and "-fno-such-option-anywhere" in message
    assert "unrecognized" in message or "unknown" in message  # the compiler's own words
    assert not private_cache.exists() or not [p for p in private_cache.iterdir() if p.name.startswith("_gradc_")]


def test_the_commands_pass_every_extension_option(tmp_path):
    options = {
        "extra_compile_args": ["-O1"],
        "extra_link_args": ["-Wl,--as-needed"],
        "include_dirs": ["/opt/include"],
        "define_macros": [("A", None), ("B", "2")],
        "library_dirs": ["/opt/lib"],
        "libraries": ["m"],
        "py_limited_api": False,
    }
    compile_cmd = build._compile_command(tmp_path / "m.c", tmp_path / "m.o", options)
    link = build._link_command([tmp_path / "m.o", tmp_path / "m_0.o"], tmp_path / "m.so", options)
    assert {"-O1", "-I/opt/include", "-DA", "-DB=2", "-c", str(tmp_path / "m.c"), str(tmp_path / "m.o")} <= set(compile_cmd)
    assert {"-Wl,--as-needed", "-L/opt/lib", "-lm", str(tmp_path / "m.o"), str(tmp_path / "m_0.o"), str(tmp_path / "m.so")} <= set(link)
    with pytest.raises(build.BuildError, match="sources"):
        build._compile_command(tmp_path / "m.c", tmp_path / "m.o", {"sources": ["other.c"]})


# ----------------------------------------------------------------------------- units side by side
def test_each_entry_point_is_a_unit_of_its_own_and_the_cache_keeps_them(private_cache):
    k = gradc.compile(gradc.kernel(squares.fn))
    value, (dx,) = k.value_and_grad(np.array([3.0, 4.0]))
    assert value == 25.0 and list(dx) == [6.0, 8.0]
    (entry,) = [p for p in private_cache.iterdir() if p.name.startswith("_gradc_")]
    units = sorted(p.name for p in entry.glob("squares_*.c"))
    assert units == ["squares_0.c", "squares_1.c"]  # forward (with the workspace sizes), value_and_grad

    def defined(unit):
        return set(re.findall(r"^(?:int|size_t) (\w+)\([^;{]*\)\s*\{", (entry / unit).read_text(), re.M))

    assert defined("squares_0.c") == {"squares_workspace_size", "squares_forward"}
    assert defined("squares_1.c") == {"squares_value_and_grad"}


def test_the_glue_is_optimised_less_than_the_kernels(private_cache, monkeypatch):
    # cffi's unit holds only the Python glue: GLUE_CFLAGS come after the kernel's flags there
    commands = []
    real = build._run_all

    def spy(cmds, order, workdir, jobs):
        commands.extend(cmds)
        return real(cmds, order, workdir, jobs)

    monkeypatch.setattr(build, "_run_all", spy)
    k = gradc.compile(gradc.kernel(squares.fn))
    assert k.value_and_grad(np.array([1.0, 2.0]))[0] == 5.0
    compiled = {Path(c[c.index("-c") + 1]).name: c for c in commands if "-c" in c}
    (glue,) = [c for name, c in compiled.items() if not re.search(r"_\d+\.c$", name)]
    units = [c for name, c in compiled.items() if re.search(r"_\d+\.c$", name)]
    assert len(units) == 2
    assert glue[-len(build.GLUE_CFLAGS) :] == list(build.GLUE_CFLAGS)
    for unit in units:
        assert "-O3" in unit and not set(build.GLUE_CFLAGS) & set(unit)


def test_one_compiler_at_a_time_builds_the_same_kernel(private_cache, monkeypatch):
    monkeypatch.setenv("GRADC_JOBS", "1")
    assert build.compile_jobs() == 1
    k = gradc.compile(gradc.kernel(squares.fn))
    assert k.value_and_grad(np.array([1.0, 2.0]))[0] == 5.0


@pytest.mark.parametrize("jobs", ["0", "two", "-3"])
def test_a_bad_job_count_says_what_it_must_be(monkeypatch, jobs):
    monkeypatch.setenv("GRADC_JOBS", jobs)
    with pytest.raises(build.BuildError, match=f"GRADC_JOBS must be a whole number.*{jobs!r}"):
        build.compile_jobs()


@pytest.mark.parametrize(
    "v2, v1, quota",
    [
        ("150000 100000\n", None, 2),  # 1.5 CPUs: two compilers
        ("max 100000\n", None, None),
        (None, ("50000", "100000"), 1),
        (None, ("-1", "100000"), None),
        (None, None, None),
        ("garbage", None, None),
    ],
)
def test_a_containers_cpu_quota_caps_the_compilers(monkeypatch, tmp_path, v2, v1, quota):
    cpu_max, cfs = tmp_path / "cpu.max", (tmp_path / "quota", tmp_path / "period")
    if v2 is not None:
        cpu_max.write_text(v2)
    if v1 is not None:
        for path, text in zip(cfs, v1):
            path.write_text(text + "\n")
    monkeypatch.setattr(build, "CPU_MAX", cpu_max)
    monkeypatch.setattr(build, "CFS_QUOTA", cfs)
    monkeypatch.delenv("GRADC_JOBS", raising=False)
    assert build.cpu_quota() == quota
    cpus = len(os.sched_getaffinity(0))
    assert build.compile_jobs() == min(cpus, quota or cpus)


def test_a_failing_unit_is_named_and_nothing_is_cached(private_cache):
    with pytest.raises(build.BuildError) as err:
        build.build_module("int ok(void) { return 1; }", "int ok(void);", name="broken", units=["int ok2(void) { return }"])
    message = str(err.value)
    assert "broken" in message and "compiling" in message and "_0.c" in message
    assert "expected" in message  # the compiler's own words
    assert not [p for p in private_cache.iterdir() if p.name.startswith(("_gradc_", "."))]


INTERRUPTED_BUILD = """
import sys
from gradc import build
try:
    build.build_module("int ok(void) { return 1; }", "int ok(void);", name="slow", units=["int a(void) { return 2; }", "int b(void) { return 3; }"])
except KeyboardInterrupt:
    print("interrupted")
"""


def test_ctrl_c_stops_the_compilers_and_leaves_no_entry(tmp_path):
    # A compiler that announces itself, then takes a minute on every file.
    started = tmp_path / "started"
    cc = tmp_path / "slow-cc"
    cc.write_text(f'#!/bin/sh\ncase "$1" in --version) echo slow-cc 1.0; exit 0;; esac\necho $$ >> {started}\nexec sleep 60\n')
    cc.chmod(0o755)
    env = dict(os.environ, CC=str(cc), GRADC_CACHE_DIR=str(tmp_path / "cache"), GRADC_JOBS="2")
    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED_BUILD], env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while (not started.exists() or len(started.read_text().split()) < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [int(p) for p in started.read_text().split()]
        assert len(pids) == 2  # two at a time; the third waits
        t0 = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=30)
        assert time.monotonic() - t0 < 5  # not the compilers' minute
    finally:
        child.kill()
    assert out.strip() == "interrupted"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed, not left running
    assert len(started.read_text().split()) == 2  # the third never started
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(("_gradc_slow", ".", "_gradc_"))]
