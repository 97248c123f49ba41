"""The generated C on its own, outside Python: strict C99, a C++-clean header, few includes.

The C for every example is rendered (as ``gradc compile`` writes it), saved to a temporary
folder and given to the system compilers directly; a small C driver then calls
``custom_layer_value_and_grad`` and must print the numbers the Python call gives.
"""

import importlib
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

import gradc
from gradc import codegen, compiler
from gradc.dsl import Kernel

EXAMPLES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "examples").glob("*.py"))

C99_STRICT = ["-std=c99", "-Wall", "-Werror"]
C99_PEDANTIC = ["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror"]


def cc(args, cwd: Path, compiler_name: str = "cc") -> None:
    result = subprocess.run([compiler_name, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{compiler_name} {' '.join(map(str, args))}:\n{result.stderr}"


@pytest.fixture(scope="module")
def generated(examples_path, tmp_path_factory) -> dict[str, Path]:
    """Each example's ``.c`` and ``.h``, written to a folder of their own: example -> folder."""
    folders = {}
    for stem in EXAMPLES:
        module = importlib.import_module(stem)
        kernels = {name: obj for name, obj in vars(module).items() if isinstance(obj, Kernel)}
        assert kernels, f"examples/{stem}.py defines no kernels"
        lowered = [compiler.lower(k, name=name) for name, k in kernels.items()]
        rendered = codegen.render([low.spec for low in lowered], stem)
        folder = tmp_path_factory.mktemp(stem)
        (folder / f"{stem}.c").write_text(rendered.c_source)
        (folder / f"{stem}.h").write_text(rendered.header)
        functions = []
        for low in lowered:
            functions += [f"{low.meta['name']}_workspace_size", *low.meta["entries"].values()]
        (folder / "functions.txt").write_text("\n".join(functions))
        folders[stem] = folder
    return folders


@pytest.mark.parametrize("flags", [C99_STRICT, C99_PEDANTIC], ids=["c99-Wall", "c99-Wextra-pedantic"])
@pytest.mark.parametrize("stem", EXAMPLES)
def test_source_compiles_as_strict_c99(generated, stem, flags):
    cc([*flags, "-c", f"{stem}.c", "-o", f"{stem}.o"], generated[stem])


@pytest.mark.parametrize("stem", EXAMPLES)
def test_header_compiles_and_links_as_cpp(generated, stem):
    folder = generated[stem]
    functions = (folder / "functions.txt").read_text().split()
    # Linking C++ that takes each function's address against the C object file fails
    # unless the header's extern "C" guard keeps the names unmangled.
    uses = "".join(f"    auto f{i} = &{name};\n    missing += f{i} == nullptr;\n" for i, name in enumerate(functions))
    (folder / "use_header.cpp").write_text(f'#include "{stem}.h"\n\nint main()\n{{\n    int missing = 0;\n{uses}    return missing;\n}}\n')
    cc([*C99_STRICT, "-c", f"{stem}.c", "-o", "for_cpp.o"], folder)
    cc(["-std=c++17", "-Wall", "-Wextra", "-pedantic", "-Werror", "use_header.cpp", "for_cpp.o", "-o", "use_header", "-lm"], folder, "g++")
    assert subprocess.run([str(folder / "use_header")], timeout=60).returncode == 0


@pytest.mark.parametrize("stem", EXAMPLES)
def test_only_math_h_and_stddef_h(generated, stem):
    folder = generated[stem]
    c_includes = re.findall(r"^\s*#\s*include\s*(\S+)", (folder / f"{stem}.c").read_text(), re.M)
    h_includes = re.findall(r"^\s*#\s*include\s*(\S+)", (folder / f"{stem}.h").read_text(), re.M)
    assert set(c_includes) <= {"<math.h>", "<stddef.h>", f'"{stem}.h"'}, c_includes
    assert set(h_includes) <= {"<math.h>", "<stddef.h>"}, h_includes


def c_array(name: str, values: np.ndarray) -> str:
    items = ", ".join(f"{v:.9e}f" for v in values.ravel())
    return f"static const float {name}[{values.size}] = {{{items}}};"


DRIVER = """\
#include <stdio.h>
#include <stdlib.h>
#include "custom_layer.h"

{X}
{W}

int main(void)
{{
    const ptrdiff_t N = {N}, K = {K}, M = {M};
    float loss, dX[{N} * {K}], dW[{K} * {M}];
    size_t bytes = custom_layer_workspace_size(N, K, M);
    void *workspace = malloc(bytes ? bytes : 1);
    int status, i;
    if (!workspace) return 2;
    status = custom_layer_value_and_grad(N, K, M, X, W, &loss, dX, dW, workspace);
    printf("status %d\\n", status);
    printf("loss %.9g\\n", loss);
    printf("dX");
    for (i = 0; i < N * K; ++i) printf(" %.9g", dX[i]);
    printf("\\ndW");
    for (i = 0; i < K * M; ++i) printf(" %.9g", dW[i]);
    /* A negative dimension is refused before any array is touched. */
    printf("\\nbad-dims %d\\n", custom_layer_value_and_grad(-1, K, M, X, W, &loss, dX, dW, workspace));
    free(workspace);
    return 0;
}}
"""


@pytest.mark.parametrize("shape", [(3, 3, 2), (7, 5, 4)])
def test_c_driver_matches_python(examples_path, generated, tmp_path, shape):
    import custom_layer as example

    N, K, M = shape
    rng = np.random.default_rng(N)
    X = example.X_EXAMPLE if shape == (3, 3, 2) else rng.standard_normal((N, K)).astype(np.float32)
    W = example.example_weights() if shape == (3, 3, 2) else rng.standard_normal((K, M)).astype(np.float32)

    for name in ("custom_layer.c", "custom_layer.h"):
        (tmp_path / name).write_bytes((generated["custom_layer"] / name).read_bytes())
    (tmp_path / "driver.c").write_text(DRIVER.format(X=c_array("X", X), W=c_array("W", W), N=N, K=K, M=M))
    cc(["-std=c99", "-Wall", "-Werror", "-O2", "driver.c", "custom_layer.c", "-o", "driver", "-lm"], tmp_path)
    run = subprocess.run([str(tmp_path / "driver")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    printed = {line.split()[0]: line.split()[1:] for line in run.stdout.splitlines()}

    assert printed["status"] == ["0"]
    assert printed["bad-dims"] == ["1"]  # GRADC_ERR_DIMS
    loss = float(printed["loss"][0])
    dX = np.array(printed["dX"], dtype=np.float64).reshape(N, K)
    dW = np.array(printed["dW"], dtype=np.float64).reshape(K, M)

    k = gradc.compile(example.custom_layer, wrt=["X", "W"])
    py_loss, (py_dX, py_dW) = k.value_and_grad(X, W)
    # The same C, built with other flags (-O3 -march=native may fuse multiply-adds).
    assert loss == pytest.approx(float(py_loss), rel=1e-5)
    np.testing.assert_allclose(dX, py_dX, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dW, py_dW, rtol=1e-4, atol=1e-5)

    Z = X.astype(np.float64) @ W.astype(np.float64)
    assert loss == pytest.approx(np.sum(np.sin(Z) ** 2), rel=1e-5)
    np.testing.assert_allclose(dX, np.sin(2 * Z) @ W.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dW, X.T @ np.sin(2 * Z), rtol=1e-4, atol=1e-4)
