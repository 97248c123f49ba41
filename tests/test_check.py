"""``gradc.check_grad`` and ``gradc check``: compiled gradients against finite differences.

A checker is only worth something if it fails on a wrong gradient, so besides passing on
correct kernels (scalar and non-scalar outputs, several ``wrt``, float64 and float32,
Hessian-vector products) it is run on custom gradients that are deliberately wrong: off
by a factor of 2, wrong in the sign of one element, and right in value but with a wrong
derivative of their own (only ``second=True`` can see that one).

The CLI runs that compile are separate processes (about a second each), so they are
started together by one module fixture (``cli``) and the tests read their results; the
mistakes found before compiling (a bad ``--dims``) run in this process.
"""

import importlib.util
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import gradc
from gradc import check, f64
from gradc.cli import main as cli_main, random_inputs

ROOT = Path(__file__).resolve().parent.parent
LAYER = ROOT / "examples" / "custom_layer.py"
HEAD = ["parameter", "elements", "max abs error", "max rel error", "pass"]

# A custom gradient off by a factor of 2, as a file: checked from Python and by `gradc check`.
WRONG_SOURCE = textwrap.dedent(
    """
    import gradc
    from gradc import f64


    @gradc.custom_gradient
    def square(x):
        def grad_fn(upstream):
            return upstream * 4 * x  # off by a factor of 2: d(x*x)/dx = 2x

        return x * x, grad_fn


    @gradc.kernel
    def wrong(x: f64["N"], w: f64["N"]):
        return gradc.sum(square(x) * w)
    """
).lstrip()


@gradc.custom_gradient
def flipped_square(x):
    def grad_fn(upstream):
        g = upstream * 2 * x
        return gradc.concatenate([-g[:1], g[1:]])  # the first element has the wrong sign

    return x * x, grad_fn


@gradc.kernel
def one_wrong(x: f64[5]):
    return gradc.sum(flipped_square(x))


@gradc.custom_gradient
def frozen_square(x):
    def grad_fn(upstream):
        return upstream * gradc.stop_gradient(2 * x)  # right value, but its own derivative is 0, not 2

    return x * x, grad_fn


@gradc.kernel
def wrong_hessian(x: f64["N"]):
    return gradc.sum(frozen_square(x) * x)


@gradc.kernel
def layer(X: f64["N", "K"], W: f64["K", "M"]):
    return gradc.tanh(X @ W)


@gradc.kernel
def pair(x: f64["N"], w: f64["N"]):
    return gradc.sum(x * w), gradc.sin(x) * w


def rng_arrays(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


def rows(result) -> dict[str, check.Row]:
    return {r.what: r for r in result.rows}


@pytest.fixture(scope="module")
def wrong(work):
    """The kernel of ``wrong.py``, loaded from the very file that ``gradc check`` checks."""
    path = work / "wrong.py"
    path.write_text(WRONG_SOURCE)
    spec = importlib.util.spec_from_file_location("check_wrong_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.wrong


@pytest.fixture(scope="module")
def custom_layer(examples_path):
    import custom_layer

    return custom_layer.custom_layer


# ----------------------------------------------------------------------------- CLI runs
@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("check")


@pytest.fixture(scope="module")
def cli(work, wrong):
    """Every CLI run of this module, started together.

    Requested by the last tests only, so that the kernels they check are already in the
    cache (the same sources, compiled by the tests above) and no process builds them again.
    """

    def start(*args):
        return subprocess.Popen(
            [sys.executable, "-m", "gradc.cli", "check", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = {
        "ok": start(LAYER),
        "options": start(LAYER, "--dims", "N=7,M=5", "--seed", "3", "--second", "--dtype", "f32"),
        "wrong": start(work / "wrong.py"),
        "wrt": start(LAYER, "--wrt", "W"),
    }
    runs = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        runs[name] = Run(p.returncode, out, err)
    return runs


def table(stdout: str) -> dict[str, list[str]]:
    """The printed table by parameter: [elements, max abs, max rel, pass]."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split("  ")[0] == "parameter")
    assert [c.strip() for c in lines[head].split("  ") if c.strip()] == HEAD
    out = {}
    for line in lines[head + 1 :]:
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        out[cells[0]] = cells[1:]
    return out


# ----------------------------------------------------------------------------- correct kernels pass
@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_scalar_kernel_passes_with_its_hessian(custom_layer, dtype):
    X, W = rng_arrays((4, 3), (3, 2))
    result = gradc.check_grad(custom_layer, X, W, dtype=dtype, second=True)
    assert isinstance(result, gradc.CheckResult)
    assert result.passed and bool(result), str(result)
    assert [r.what for r in result.rows] == ["X", "W", "H·v (X)", "H·v (W)"]
    assert [r.checked for r in result.rows] == [12, 6, 12, 6]
    rtol, _ = check.TOLERANCES[dtype]
    assert all(r.max_rel < rtol for r in result.rows[:2]), str(result)
    assert str(result).startswith(f"custom_layer ({dtype}): passed")


def test_non_scalar_output_is_checked_through_a_vjp():
    X, W = rng_arrays((4, 3), (3, 2), seed=1)
    result = gradc.check_grad(layer, X, W)
    assert result.passed, str(result)
    assert list(rows(result)) == ["X", "W"]


def test_tuple_output_is_checked_through_a_vjp():
    x, w = rng_arrays(5, 5, seed=2)
    result = gradc.check_grad(pair, x, w)
    assert result.passed, str(result)
    assert list(rows(result)) == ["x", "w"]


def test_wrt_chooses_the_parameters(custom_layer):
    X, W = rng_arrays((4, 3), (3, 2))
    assert list(rows(gradc.check_grad(custom_layer, X, W, wrt="W"))) == ["W"]
    both = gradc.check_grad(custom_layer, X, W, wrt="X,W")
    assert list(rows(both)) == ["X", "W"] and both.passed


def test_large_parameters_are_sampled():
    X, W = rng_arrays((40, 3), (3, 2), seed=3)
    result = gradc.check_grad(layer, X, W, max_elements=10)
    assert result.passed, str(result)
    assert [r.checked for r in result.rows] == [10, 6]


def test_the_seed_draws_the_cotangent():
    X, W = rng_arrays((4, 3), (3, 2), seed=4)
    a, b, c = (gradc.check_grad(layer, X, W, seed=s) for s in (0, 0, 1))
    assert a.rows == b.rows
    assert a.rows != c.rows


# ----------------------------------------------------------------------------- wrong kernels fail
def test_a_gradient_off_by_a_factor_of_2_fails(wrong):
    x, w = rng_arrays(5, 5, seed=5)
    result = gradc.check_grad(wrong, x, w)
    assert not result.passed and not bool(result)
    by = rows(result)
    assert not by["x"].passed and by["w"].passed
    assert by["x"].max_rel == pytest.approx(1.0, rel=1e-6)  # got 2g where g was right
    text = str(result)
    assert text.startswith("wrong (f64): FAILED")
    assert [line.split()[-1] for line in text.splitlines()[2:]] == ["NO", "yes"]


def test_a_wrong_sign_on_one_element_fails():
    (x,) = rng_arrays(5, seed=6)
    result = gradc.check_grad(one_wrong, x)
    assert not result.passed
    assert rows(result)["x"].max_rel == pytest.approx(2.0, rel=1e-6)


def test_a_wrong_second_derivative_fails_only_with_second():
    (x,) = rng_arrays(5, seed=7)
    assert gradc.check_grad(wrong_hessian, x).passed
    result = gradc.check_grad(wrong_hessian, x, second=True)
    assert not result.passed
    by = rows(result)
    assert by["x"].passed and not by["H·v (x)"].passed


# ----------------------------------------------------------------------------- gradc check
def test_cli_prints_a_table_and_exits_0(cli):
    run = cli["ok"]
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert run.stdout.startswith("custom_layer (f64): passed")
    t = table(run.stdout)
    assert list(t) == ["X", "W"]
    assert all(row[-1] == "yes" for row in t.values())
    # Named dimensions default to 3, 4, 5 in order of appearance: X is N x K = 3 x 4, W is K x M = 4 x 5.
    assert [row[0] for row in t.values()] == ["12", "20"]


def test_cli_options_dims_seed_second_dtype(cli, custom_layer):
    run = cli["options"]
    assert run.returncode == 0, run.stderr
    t = table(run.stdout)
    assert list(t) == ["X", "W", "H·v (X)", "H·v (W)"]
    assert [row[0] for row in t.values()] == ["21", "15", "21", "15"]  # N=7, K=3, M=5
    assert run.stdout.startswith("custom_layer (f32): passed")
    # The same check from Python, with the same random inputs, prints the same table.
    args = random_inputs(custom_layer, {"N": 7, "M": 5}, np.random.default_rng(3), positive=False)
    assert run.stdout == str(gradc.check_grad(custom_layer, *args, dtype="f32", second=True, seed=3)) + "\n"


def test_cli_fails_on_a_wrong_gradient(cli):
    run = cli["wrong"]
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert run.stdout.startswith("wrong (f64): FAILED")
    t = table(run.stdout)
    assert t["x"][-1] == "NO" and t["w"][-1] == "yes"
    assert run.stderr.strip() == "gradc: gradient check failed for wrong"


def test_cli_wrt_chooses_the_parameters(cli):
    run = cli["wrt"]
    assert run.returncode == 0, run.stderr
    assert list(table(run.stdout)) == ["W"]


@pytest.mark.parametrize(
    "dims, message",
    [("N7", "expected NAME=SIZE items such as N=7,M=5, got 'N7'"), ("N=x", "got 'N=x'"), ("N=7,Q=3", "no dimension named Q"), ("N=3,N=4", "N is given twice")],
)
def test_cli_bad_dims_is_one_line(dims, message):
    # In this process: the mistake is found before anything is compiled.
    result = CliRunner().invoke(cli_main, ["check", str(LAYER), "--dims", dims])
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("gradc: --dims: ") and message in lines[0]
