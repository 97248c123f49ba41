"""The C and C++ examples, built the way their users build them, and their printed results.

- examples/c_training: `make` (gradc compile --emit c, then cc -std=c99 -Wall -Wextra -Werror)
  and the training run: the loss falls and the training accuracy on Iris reaches 95 %;
- the same run driven from Python (train.py, through gradc.compile) prints the same losses;
- examples/cpp_layer: CMake (gradc in add_custom_command, the .c compiled as C and main.cpp
  as C++17), and the values and gradients it prints.

Each example is copied to a temporary folder first, so that no build output lands in the
source tree, and gradc runs as `python -m gradc` of the interpreter running the tests.
"""

import csv
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ROOT / "examples" / "c_training"
CPP_LAYER = ROOT / "examples" / "cpp_layer"
GRADC = [sys.executable, "-m", "gradc"]
# The Makefile's flags, for the Python replay: the same C built the same way.
MAKE_CFLAGS = ["-std=c99", "-O2"]


def run(args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result


def copy_example(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("build", "__pycache__"))
    return dst


def parse_training(text: str) -> tuple[list[tuple[int, float]], float]:
    losses = [(int(e), float(v)) for e, v in re.findall(r"^epoch +(\d+) +loss +([0-9.]+)$", text, re.M)]
    accuracy = re.search(r"^training accuracy ([0-9.]+) \((\d+)/(\d+)\)$", text, re.M)
    assert losses and accuracy, text
    return losses, float(accuracy.group(1))


@pytest.fixture(scope="module")
def c_training_run(tmp_path_factory) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed (.ci/run installs it)")
    folder = copy_example(TRAINING, tmp_path_factory.mktemp("c_training") / "c_training")
    built = run(["make", f"GRADC={' '.join(GRADC)}"], folder)
    assert "--emit c" in built.stdout and "-Werror" in built.stdout
    assert sorted(p.name for p in (folder / "build").iterdir()) == ["model.c", "model.h", "train"]
    return run([folder / "build" / "train", "iris.csv"], folder).stdout


def test_iris_data_is_fishers():
    with open(TRAINING / "iris.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert Counter(r["species"] for r in rows) == {"setosa": 50, "versicolor": 50, "virginica": 50}
    X = np.array([[float(r[k]) for k in ("sepal_length", "sepal_width", "petal_length", "petal_width")] for r in rows])
    np.testing.assert_allclose(X.mean(axis=0), [5.843333, 3.057333, 3.758, 1.199333], atol=5e-7)
    np.testing.assert_allclose(X.std(axis=0, ddof=1), [0.828066, 0.435866, 1.765298, 0.762238], atol=5e-7)
    setosa = X[[r["species"] == "setosa" for r in rows]]
    np.testing.assert_allclose(setosa.mean(axis=0), [5.006, 3.428, 1.462, 0.246], atol=5e-7)


def test_c_training_loss_falls_and_accuracy_reaches_95_percent(c_training_run):
    losses, accuracy = parse_training(c_training_run)
    values = [v for _, v in losses]
    assert [e for e, _ in losses] == list(range(0, 101, 10))
    assert all(b < a for a, b in zip(values, values[1:])), values
    assert values[0] > 1.0 and values[-1] < 0.1
    assert accuracy >= 0.95


def test_python_replay_gives_the_same_losses(c_training_run):
    sys.path.insert(0, str(TRAINING))
    try:
        import train

        printed = []
        history, accuracy = train.train(cflags=MAKE_CFLAGS, out=printed.append)
    finally:
        sys.path.remove(str(TRAINING))
        # train.py imports model.py as `model`; other tests import a `model` of their own.
        for name in ("train", "model"):
            sys.modules.pop(name, None)
    c_losses, c_accuracy = parse_training(c_training_run)
    assert [e for e, _ in history] == [e for e, _ in c_losses]
    np.testing.assert_allclose([v for _, v in history], [v for _, v in c_losses], rtol=1e-4, atol=2e-6)
    assert accuracy == pytest.approx(c_accuracy, abs=1e-4)  # printed with 4 decimals
    assert printed[0] == c_training_run.splitlines()[0]
    assert printed[-1] == c_training_run.splitlines()[-1]


def test_cpp_layer_builds_with_cmake_and_prints_gradients(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed (.ci/run installs it)")
    folder = copy_example(CPP_LAYER, tmp_path / "cpp_layer")
    run(["cmake", "-S", folder, "-B", folder / "build", f"-DGRADC={';'.join(GRADC)}"])
    build = run(["cmake", "--build", folder / "build", "--verbose"])
    # The generated C is compiled as C, the program as C++17.
    assert re.search(r"-std=c99\S* .*layer\.c", build.stdout) and re.search(r"-std=c\+\+17\S* .*main\.cpp", build.stdout), build.stdout
    out = run([folder / "build" / "cpp_layer"]).stdout

    assert re.search(r"^out = 27$", out, re.M)
    x_grad = re.search(r"^x.grad =\n((?: +.*\n){2})", out, re.M).group(1).split()
    assert x_grad == ["4.50000"] * 4  # the tutorial's d out/dx = 3 (x + 2) / 2 at x = 1
    assert re.search(r"^bias.grad =\n +2\.00000 +2\.00000 +2\.00000 +2\.00000$", out, re.M)
    assert float(re.search(r"linear: max \|gradient - by hand\| = (\S+)", out).group(1)) < 1e-12
    sin = re.search(r"sin layer: \|loss - closed form\| = (\S+), max \|gradient - closed form\| = (\S+)", out)
    assert float(sin.group(1)) < 1e-12 and float(sin.group(2)) < 1e-12
    assert float(re.search(r"sin layer: loss = (\S+)", out).group(1)) > 0
