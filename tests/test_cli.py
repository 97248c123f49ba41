"""The ``gradc`` command line: packages that work in a fresh process, ``show``, and user mistakes.

CLI runs are separate processes (about a second each, mostly importing SymPy), so the
independent ones are started together by one module fixture and the tests read their
results.
"""

import importlib
import importlib.machinery
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ENTRY_POINT = Path(sys.executable).with_name("gradc")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def start(args, env=None, cli=(sys.executable, "-m", "gradc.cli")) -> subprocess.Popen:
    return subprocess.Popen([*map(str, cli), *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> Run:
    out, err = proc.communicate(timeout=300)
    return Run(proc.returncode, out, err)


def run(args, env=None) -> Run:
    return finish(start(args, env))


def source(text: str) -> str:
    return textwrap.dedent(text).lstrip()


def line_of(text: str, marker: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if marker in line)


def extensions(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if any(p.name.endswith(s) for s in importlib.machinery.EXTENSION_SUFFIXES)]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# Each bad file: its source and a marker on the line the error must name (None: no line).
BAD_FILES = {
    "syntax_error": (
        """
        import gradc
        from gradc import f64

        @gradc.kernel
        def bad(x: f64["N"]:
            return x
        """,
        'def bad(x: f64["N"]:',
    ),
    "unknown_op": (
        """
        import gradc
        from gradc import f64

        @gradc.kernel
        def bad(x: f64["N"]):
            y = x * 2
            return gradc.nosuch(y)
        """,
        "gradc.nosuch",
    ),
    "shape_mismatch": (
        """
        import gradc
        from gradc import f64

        @gradc.kernel
        def bad(X: f64[2, 3]):
            return gradc.sum(X @ X)
        """,
        "X @ X",
    ),
    "data_dependent_if": (
        """
        import gradc
        from gradc import f64

        @gradc.kernel
        def bad(x: f64["N"]):
            if gradc.sum(x) > 0:
                return gradc.sum(x)
            return gradc.sum(-x)
        """,
        "if gradc.sum(x) > 0:",
    ),
    "raises_at_import": (
        """
        import gradc

        SIZE = int("twelve")
        """,
        'int("twelve")',
    ),
    "no_kernels": (
        """
        import numpy as np

        def not_a_kernel(x):
            return np.sum(x)
        """,
        None,
    ),
}

TWO_KERNELS = source(
    """
    import gradc
    from gradc import f32


    @gradc.kernel
    def first(x: f32["N"]):
        return gradc.sum(x * x)


    @gradc.kernel
    def second(X: f32["N", 3], w: f32[3]):
        return gradc.sum(gradc.tanh(X @ w))
    """
)


def model_source(kernel: str, body: str) -> str:
    return f'import gradc\nfrom gradc import f64\n\n\n@gradc.kernel\ndef {kernel}(x: f64["N"]):\n    return {body}\n'


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def batch(work):
    """Every independent CLI run of this module, started together."""
    (work / "bad").mkdir()
    for name, (text, _) in BAD_FILES.items():
        (work / "bad" / f"{name}.py").write_text(source(text))
    (work / "two.py").write_text(TWO_KERNELS)
    (work / "model").mkdir()
    (work / "model" / "model.py").write_text(model_source("alpha", "gradc.sum(x * x)"))

    procs = {
        "layer": start(["compile", EXAMPLES / "custom_layer.py", "-o", work / "layer"]),
        "options": start(["compile", work / "two.py", "-k", "second", "--wrt", "w", "--dtype", "f64", "-o", work / "options"]),
        "model-v1": start(["compile", work / "model" / "model.py", "-o", work / "model-out"]),
        "show": start(["show", EXAMPLES / "sigmoid.py"], cli=[ENTRY_POINT]),
        "show-header": start(["show", EXAMPLES / "sigmoid.py", "--header"], cli=[ENTRY_POINT]),
        "missing": start(["compile", work / "bad" / "does_not_exist.py", "-o", work / "bad-out"]),
        "unknown-kernel": start(["compile", EXAMPLES / "custom_layer.py", "-k", "nope", "-o", work / "bad-out"]),
        "unknown-wrt": start(["compile", EXAMPLES / "custom_layer.py", "--wrt", "X,Q", "-o", work / "bad-out"]),
    }
    for name in BAD_FILES:
        procs[name] = start(["compile", work / "bad" / f"{name}.py", "-o", work / "bad-out"])
    return {name: finish(p) for name, p in procs.items()}


@pytest.fixture
def import_package(monkeypatch):
    """Import a written package in this process; forgotten again after the test."""
    imported = []

    def do(folder: Path, name: str):
        # Another test may have imported a module of the same name (examples use "model").
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, mod)
        monkeypatch.syspath_prepend(str(folder))
        importlib.invalidate_caches()
        imported.append(name)
        return importlib.import_module(name)

    yield do
    for name in imported:
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]


# ----------------------------------------------------------------------------- compile
def test_compile_writes_a_complete_package(batch, work):
    result = batch["layer"]
    assert result.returncode == 0, result.stderr
    assert "compiled custom_layer" in result.stdout
    package = work / "layer" / "custom_layer"
    names = {p.name for p in package.iterdir()}
    assert {"custom_layer.c", "custom_layer.h", "__init__.py"} <= names
    assert len(extensions(package)) == 1
    assert "custom_layer_value_and_grad(" in (package / "custom_layer.c").read_text()
    assert 'extern "C"' in (package / "custom_layer.h").read_text()
    # Nothing half-written is left next to the package.
    assert [p.name for p in (work / "layer").iterdir()] == ["custom_layer"]


FRESH_IMPORT = textwrap.dedent(
    """
    import json
    import sys


    class NoCompilerSide:
        # The package must work where neither gradc nor SymPy is installed.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("gradc", "sympy"):
                raise ImportError(f"{name} is not available here")


    sys.meta_path.insert(0, NoCompilerSide())
    sys.path.insert(0, sys.argv[1])

    import numpy as np

    import custom_layer

    X = np.array([[-1.0, 0.0, 1.0], [2.0, 3.0, 4.0], [-1.0, -5.0, 2.0]], dtype=np.float32)
    W = np.array([[0.5, -1.0], [0.25, 2.0], [-0.75, 1.5]], dtype=np.float32)
    loss, (dX, dW) = custom_layer.custom_layer.value_and_grad(X, W)
    print(json.dumps({
        "loss": float(loss),
        "dX": dX.tolist(),
        "dW": dW.tolist(),
        "forward": float(custom_layer.custom_layer(X, W)),
        "dtypes": [str(dX.dtype), str(dW.dtype)],
        "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("gradc", "sympy")),
    }))
    """
)


def test_package_works_in_a_fresh_process_without_gradc(batch, work):
    assert batch["layer"].returncode == 0, batch["layer"].stderr
    script = work / "fresh_import.py"
    script.write_text(FRESH_IMPORT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CC")}
    env["CC"] = "nosuchcc"  # and no C compiler is needed either
    result = subprocess.run([sys.executable, str(script), str(work / "layer")], env=env, capture_output=True, text=True, timeout=300, cwd=work)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)

    X = np.array([[-1.0, 0.0, 1.0], [2.0, 3.0, 4.0], [-1.0, -5.0, 2.0]])
    W = np.array([[0.5, -1.0], [0.25, 2.0], [-0.75, 1.5]])
    Z = X @ W
    assert out["loss"] == pytest.approx(np.sum(np.sin(Z) ** 2), rel=1e-5)
    assert out["forward"] == out["loss"]
    np.testing.assert_allclose(out["dW"], X.T @ np.sin(2 * Z), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["dX"], np.sin(2 * Z) @ W.T, rtol=1e-4, atol=1e-5)
    assert out["dtypes"] == ["float32", "float32"]
    assert out["modules"] == []


WITH_GRADC_INSTALLED = textwrap.dedent(
    """
    import json
    import sys

    sys.path.insert(0, sys.argv[1])

    import numpy as np

    import custom_layer

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("gradc", "sympy", "jinja2", "cffi"))
    import gradc

    try:
        custom_layer.custom_layer(np.zeros((2, 4), np.float32), np.zeros((3, 2), np.float32))
        caught = "nothing raised"
    except gradc.ShapeError as exc:
        caught = str(exc)
    print(json.dumps({"modules": loaded, "caught": caught}))
    """
)


def test_package_import_beside_gradc_loads_only_its_exceptions(batch, work):
    # gradc's exception classes, so that `except gradc.ShapeError` catches the package's
    # errors, but not the compiler: no SymPy, Jinja or cffi's compiler side.
    assert batch["layer"].returncode == 0, batch["layer"].stderr
    script = work / "with_gradc.py"
    script.write_text(WITH_GRADC_INSTALLED)
    result = subprocess.run([sys.executable, str(script), str(work / "layer")], capture_output=True, text=True, timeout=300, cwd=work)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["modules"] == ["gradc", "gradc.errors"]
    assert "parameter 'X' gives K = 4" in out["caught"]


def test_kernel_wrt_and_dtype_options(batch, work, import_package):
    result = batch["options"]
    assert result.returncode == 0, result.stderr
    package = work / "options" / "two"
    c_source = (package / "two.c").read_text()
    assert "second_value_and_grad(" in c_source and "first_" not in c_source
    assert "double" in c_source and "float *" not in c_source

    two = import_package(work / "options", "two")
    assert not hasattr(two, "first")
    rng = np.random.default_rng(0)
    X, w = rng.standard_normal((5, 3)), rng.standard_normal(3)
    value, grads = two.second.value_and_grad(X, w)
    assert len(grads) == 1  # only w
    (dw,) = grads
    assert dw.dtype == np.float64
    t = np.tanh(X @ w)
    assert value == pytest.approx(np.sum(t), rel=1e-12)
    np.testing.assert_allclose(dw, X.T @ (1 - t**2), rtol=1e-12)


# ----------------------------------------------------------------------------- show
def test_show_prints_the_c(batch):
    result = batch["show"]
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "#include <math.h>" in result.stdout
    assert "int sigmoid_value_and_grad(" in result.stdout
    assert "int sigmoid_forward(" in result.stdout


def test_show_header(batch):
    result = batch["show-header"]
    assert result.returncode == 0, result.stderr
    assert 'extern "C"' in result.stdout and "sigmoid_workspace_size(" in result.stdout


# ----------------------------------------------------------------------------- user mistakes
@pytest.mark.parametrize("name", list(BAD_FILES) + ["missing", "unknown-kernel", "unknown-wrt"])
def test_user_mistakes_give_one_line_and_no_traceback(batch, work, name):
    result = batch[name]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    if name in BAD_FILES:
        text, marker = BAD_FILES[name]
        assert f"{name}.py" in line
        if marker is not None:
            assert f"{name}.py:{line_of(source(text), marker)}:" in line
    elif name == "missing":
        assert "does_not_exist.py" in line
    elif name == "unknown-kernel":
        assert "nope" in line and "custom_layer" in line
    else:
        assert "'Q'" in line and "custom_layer.py:" in line
    assert not (work / "bad-out").exists() or not any((work / "bad-out").iterdir())


def test_kind_of_mistake_is_named(batch):
    assert "SyntaxError" in batch["syntax_error"].stderr
    assert "nosuch" in batch["unknown_op"].stderr
    assert "matmul" in batch["shape_mismatch"].stderr
    assert "gradc.where" in batch["data_dependent_if"].stderr
    assert "no @gradc.kernel" in batch["no_kernels"].stderr


# ----------------------------------------------------------------------------- the output folder
def test_recompiling_replaces_the_package_and_failures_keep_it(batch, work, import_package):
    assert batch["model-v1"].returncode == 0, batch["model-v1"].stderr
    src, out = work / "model" / "model.py", work / "model-out"
    package = out / "model"
    (package / "stale.txt").write_text("left from an earlier compile")

    src.write_text(model_source("beta", "gradc.sum(gradc.exp(x))"))
    result = run(["compile", src, "-o", out])
    assert result.returncode == 0, result.stderr
    assert "stale.txt" not in {p.name for p in package.iterdir()}
    assert len(extensions(package)) == 1
    assert [p.name for p in out.iterdir()] == ["model"]
    good = snapshot(package)

    # A failed trace and a failed C build both leave the package as it was.
    broken = work / "broken"
    broken.mkdir()
    (broken / "model.py").write_text(model_source("gamma", "x @ x @ x"))
    no_cc = dict(os.environ, CC="nosuchcc")
    src.write_text(model_source("delta", "gradc.sum(gradc.cos(x))"))
    failures = [start(["compile", broken / "model.py", "-o", out]), start(["compile", src, "-o", out], env=no_cc)]
    for result in map(finish, failures):
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
    assert snapshot(package) == good
    assert [p.name for p in out.iterdir()] == ["model"]

    model = import_package(out, "model")
    assert not hasattr(model, "alpha")
    x = np.array([0.0, 1.0, -1.0])
    value, (dx,) = model.beta.value_and_grad(x)
    assert value == pytest.approx(np.sum(np.exp(x)), rel=1e-12)
    np.testing.assert_allclose(dx, np.exp(x), rtol=1e-12)
