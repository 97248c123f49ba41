"""Building an extension by running the C compiler directly (no setuptools)."""

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
    compile_cmd, link = build._commands(tmp_path / "m.c", tmp_path / "m.so", options)
    assert {"-O1", "-I/opt/include", "-DA", "-DB=2", "-c", str(tmp_path / "m.c")} <= set(compile_cmd)
    assert {"-Wl,--as-needed", "-L/opt/lib", "-lm", str(tmp_path / "m.o"), str(tmp_path / "m.so")} <= set(link)
    with pytest.raises(build.BuildError, match="sources"):
        build._commands(tmp_path / "m.c", tmp_path / "m.so", {"sources": ["other.c"]})
