"""The C API of generated kernels (docs/c-api.md), from the side of a C or C++ user.

Every kernel gradc ships or shows — the examples, the models of the C and C++ examples and
the optimisers — is written with ``--emit c`` semantics (the ``.c`` and ``.h`` alone) and
then:

- compiled warning-free by gcc and clang as strict C99, and by g++ and clang++ as C++17;
- driven under AddressSanitizer and UndefinedBehaviorSanitizer by a C program generated
  from nothing but the header's comments: every entry point is called at the smallest valid
  dimensions and at typical ones, with arrays and a workspace of exactly the documented
  sizes, and must fill every output element; invalid dimensions must be refused before any
  pointer is touched (the driver passes NULL).

Besides: ``--emit c`` writes two files without a C compiler, ``--prefix`` lets two compiled
modules link into one program (and keeps the Python package working), and the status codes.
"""

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from gradc import cli, codegen, compiler

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
C99 = ["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O2"]
CXX17 = ["-x", "c++", "-std=c++17", "-Wall", "-Wextra", "-Werror"]
# gcc's flow-dependent warnings (maybe-uninitialized, ...) need the optimiser, and gcc -O2 runs
# on every file; clang's warnings and the C++ front ends' come from parsing alone, which is faster.
SYNTAX_ONLY = ["-fsyntax-only"]
SANITIZE = ["-std=c99", "-g", "-O0", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]

OPTIM_FILE = '''\
import gradc

sgd = gradc.optim.sgd_momentum("P")
sgd_const = gradc.optim.sgd_momentum("N", "M", lr=0.1, momentum=0.5, dtype="f64")
adam = gradc.optim.adam("P")
adam_inputs = gradc.optim.adam(3, "M", lr=None, beta1=None, beta2=None, eps=None)
'''

SLICES_FILE = '''\
import gradc
from gradc import f32

@gradc.kernel
def diffs(x: f32["n"], w: f32["m", 3]):
    d = x[2:] - x[:-2]
    return gradc.sum(d * d) + gradc.max(w[-1])

@gradc.kernel
def sliced_product(X: f32["n", "k"], W: f32["k", 32]):
    # extent n - 1: the register tiles' full-row count must not round up to n (32 columns:
    # one full column tile at any size)
    return gradc.sum(gradc.tanh(X[1:] @ W))
'''

# fixed extents that are multiples of the lanes: blocks without a scalar tail loop
FIXED_FILE = '''\
import gradc
from gradc import f32

@gradc.kernel
def row_sums(X: f32["n", 32]):
    return gradc.sum(X * X, axis=1)

@gradc.kernel
def pair_dots(X: f32[8, 32], W: f32["m", 32]):
    return gradc.sum(X[:, None, :] * W[None, :, :], axis=2)
'''

# sin and cos of expressions, nested, under a select: each nest scans its arguments first
SIN_COS_FILE = '''\
import gradc
from gradc import f32

@gradc.kernel
def waves(x: f32["n"], v: f32["n"]):
    a = gradc.sin(gradc.exp(x)) + gradc.sin(gradc.log(v * v + 1)) + gradc.cos(gradc.tanh(x))
    b = gradc.sin(2 * gradc.sin(3 * x)) * gradc.where(x > 0, gradc.cos(x * v), 0)
    return gradc.sum(a * b)
'''


def modules(tmp: Path) -> dict[str, Path]:
    """The DSL files whose C is checked: stem -> file."""
    (tmp / "optimisers.py").write_text(OPTIM_FILE)
    (tmp / "slices.py").write_text(SLICES_FILE)
    (tmp / "sin_cos.py").write_text(SIN_COS_FILE)
    (tmp / "fixed.py").write_text(FIXED_FILE)
    files = sorted(EXAMPLES.glob("*.py")) + [EXAMPLES / "c_training" / "model.py", EXAMPLES / "cpp_layer" / "layer.py"]
    files += [tmp / "optimisers.py", tmp / "slices.py", tmp / "sin_cos.py", tmp / "fixed.py"]
    return {f.stem: f for f in files}


def emit_c(path: Path, out_dir: Path, prefix: str = "") -> Path:
    """What ``gradc compile PATH --emit c -o OUT_DIR`` writes, without a process per file."""
    file, kernels = cli.load_kernels(str(path))
    lowered = cli._lower_all(file, kernels, None, None, prefix=prefix)
    rendered = codegen.render([low.spec for low in lowered], path.stem, prefix=prefix)
    cli.write_c(out_dir, rendered)
    return out_dir


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    """stem -> a folder holding only ``<stem>.c`` and ``<stem>.h``."""
    tmp = tmp_path_factory.mktemp("sources")
    return {stem: emit_c(path, tmp_path_factory.mktemp(stem)) for stem, path in modules(tmp).items()}


def run(args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def compile_ok(args, cwd=None) -> None:
    result = run(args, cwd)
    assert result.returncode == 0, f"{' '.join(map(str, args))}:\n{result.stderr}"
    assert result.stderr == "", result.stderr


# ----------------------------------------------------------------------------- the header, read as a user would
@dataclass
class Param:
    ctype: str  # float, double or ptrdiff_t
    name: str
    const: bool = False
    shape: list[str] | None = None  # dimension expressions; [] for a scalar


@dataclass
class Function:
    name: str
    params: list[Param]
    doc: str = ""


@dataclass
class Kernel:
    name: str
    dims: list[str]
    needs: list[str] = field(default_factory=list)  # conditions on the dims, as C expressions
    entries: list[Function] = field(default_factory=list)


PROTOTYPE = re.compile(r"^(int|size_t) (\w+)\(([^)]*)\);", re.M)
SHAPED = re.compile(r"(\w+)(?: \(scalar\)|((?:\[[^\]]+\])+))")


def parse_header(text: str) -> list[Kernel]:
    """Every kernel, entry point, argument and shape that the header documents."""
    kernels: dict[str, Kernel] = {}
    for match in PROTOTYPE.finditer(text):
        ret, name, raw = match.groups()
        params = []
        for item in (p.strip() for p in raw.split(",") if p.strip() != "void"):
            m = re.fullmatch(r"(const )?(\w+) (\*)?(\w+)", item)
            assert m, f"{name}: unexpected parameter {item!r}"
            params.append(Param(m.group(2), m.group(4), bool(m.group(1))))
        if ret == "size_t":
            kernel = name.removesuffix("_workspace_size")
            block = text[text.index(f"/* ==== {kernel}:") : match.start()]
            needs = re.search(r"The kernel also needs (.*)\.", block)
            kernels[kernel] = Kernel(kernel, [p.name for p in params], needs.group(1).split(" and ") if needs else [])
            continue
        # A kernel's entry points follow its workspace function.
        kernel = list(kernels.values())[-1]
        assert name.startswith(kernel.name + "_"), name
        doc = text[text.rindex("/*", 0, match.start()) : match.start()]
        assert doc.startswith(f"/*\n * {name}: "), f"no comment above {name}"
        shapes = {}
        for label in ("Inputs", "Outputs"):
            line = re.search(rf"\* {label}: +(.*)\.\n", doc)
            assert line, f"{name}: the comment lists no {label.lower()}"
            for arg, dims in SHAPED.findall(line.group(1)):
                shapes[arg] = re.findall(r"\[([^\]]+)\]", dims) if dims else []
        arrays = params[len(kernel.dims) : -1]
        assert [p.name for p in params[: len(kernel.dims)]] == kernel.dims, name
        assert params[-1].name == "workspace" and params[-1].ctype == "void", name
        assert [p.name for p in arrays] == list(shapes), f"{name}: the comment's arrays are not the arguments"
        for p in arrays:
            p.shape = shapes[p.name]
        kernel.entries.append(Function(name, params, doc))
    return list(kernels.values())


def valid(kernel: Kernel, dims: dict[str, int]) -> bool:
    return all(eval(cond, {}, dict(dims)) for cond in kernel.needs)  # noqa: S307 - gradc's own output


def smallest_dims(kernel: Kernel) -> dict[str, int]:
    dims = {d: 0 for d in kernel.dims}
    for _ in range(100):
        failing = [c for c in kernel.needs if not eval(c, {}, dict(dims))]  # noqa: S307
        if not failing:
            return dims
        for cond in failing:
            for d in kernel.dims:
                if re.search(rf"\b{d}\b", cond):
                    dims[d] += 1
    raise AssertionError(f"{kernel.name}: no valid dimensions found for {kernel.needs}")


def typical_dims(kernel: Kernel) -> dict[str, int]:
    dims = {d: 2 + i for i, d in enumerate(kernel.dims)}  # distinct, so that a transposition shows
    while not valid(kernel, dims):
        dims = {d: n + 1 for d, n in dims.items()}
    return dims


# ----------------------------------------------------------------------------- a C driver from the header alone
DRIVER_HEAD = """\
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "{stem}.h"

/* Outputs start as this value; every element must be overwritten. */
#define SENTINEL (-12345.0)

static int failures = 0;

static void *alloc(ptrdiff_t n, size_t size)
{{
    /* Exactly n elements, so that the sanitizer sees any access beyond them; a 1-byte block for
     * n = 0, so that even reading one element is caught. */
    void *p = malloc(n > 0 ? (size_t)n * size : 1);
    if (!p) abort();
    return p;
}}

#define FILLERS(T) \\
    static T *in_##T(ptrdiff_t n) {{ T *p = (T *)alloc(n, sizeof(T)); ptrdiff_t i; for (i = 0; i < n; ++i) p[i] = (T)(0.5 + (double)((i * 7919) % 1000) / 1000.0); return p; }} \\
    static T *out_##T(ptrdiff_t n) {{ T *p = (T *)alloc(n, sizeof(T)); ptrdiff_t i; for (i = 0; i < n; ++i) p[i] = (T)SENTINEL; return p; }} \\
    static void written_##T(const T *p, ptrdiff_t n, const char *what) {{ ptrdiff_t i; for (i = 0; i < n; ++i) if (p[i] == (T)SENTINEL) {{ printf("FAIL %s[%ld] was not written\\n", what, (long)i); ++failures; return; }} }}
FILLERS(float)
FILLERS(double)

static void expect(int status, int wanted, const char *what)
{{
    if (status != wanted) {{
        printf("FAIL %s returned %d, expected %d\\n", what, status, wanted);
        ++failures;
    }}
}}

int main(void)
{{
"""


def c_size(shape: list[str]) -> str:
    return " * ".join(f"(ptrdiff_t)({d})" for d in shape) or "1"


def driver(stem: str, kernels: list[Kernel]) -> str:
    body = []
    for k in kernels:
        for label, dims in (("smallest", smallest_dims(k)), ("typical", typical_dims(k))):
            body.append(f"    {{ /* {k.name} at its {label} valid dimensions */")
            for d in k.dims:
                body.append(f"        const ptrdiff_t {d} = {dims[d]};")
            ws_args = ", ".join(k.dims)
            body.append(f"        size_t bytes = {k.name}_workspace_size({ws_args});")
            for f in k.entries:
                arrays = f.params[len(k.dims) : -1]
                body.append("        {")
                for p in arrays:
                    maker = "in" if p.const else "out"
                    body.append(f"            {p.ctype} *{p.name} = {maker}_{p.ctype}({c_size(p.shape)});")
                # The documented promise: NULL is a valid workspace when the size is 0.
                body.append("            void *ws = bytes ? alloc((ptrdiff_t)bytes, 1) : NULL;")
                call = ", ".join([*k.dims, *(p.name for p in arrays), "ws"])
                body.append(f'            expect({f.name}({call}), GRADC_OK, "{f.name} ({label})");')
                for p in arrays:
                    if not p.const:
                        body.append(f'            written_{p.ctype}({p.name}, {c_size(p.shape)}, "{f.name}: {p.name}");')
                for p in arrays:
                    body.append(f"            free({p.name});")
                body.append("            free(ws);")
                body.append("        }")
            body.append("    }")
        # Invalid dimensions: refused before any pointer is used, so NULL everywhere is safe.
        bad = [["-1" if j == i else "3" for j in range(len(k.dims))] for i in range(len(k.dims))]
        for args in bad:
            ws_call = f"{k.name}_workspace_size({', '.join(args)})"
            body.append(f'    if ({ws_call} != 0) {{ printf("FAIL {ws_call} is not 0\\n"); ++failures; }}')
            for f in k.entries:
                nulls = ["NULL"] * (len(f.params) - len(k.dims))
                body.append(f'    expect({f.name}({", ".join(args + nulls)}), GRADC_ERR_DIMS, "{f.name} with a negative dimension");')
        if k.needs:
            small = smallest_dims(k)
            for d in k.dims:
                if small[d] > 0:
                    args = [str(small[e] - (e == d)) for e in k.dims]
                    if valid(k, dict(zip(k.dims, map(int, args)))):
                        continue
                    for f in k.entries:
                        nulls = ["NULL"] * (len(f.params) - len(k.dims))
                        body.append(f'    expect({f.name}({", ".join(args + nulls)}), GRADC_ERR_DIMS, "{f.name} with {d} too small");')
    body.append('    printf("%s: %d failures\\n", failures ? "FAILED" : "ok", failures);')
    body.append("    return failures != 0;")
    body.append("}")
    return DRIVER_HEAD.format(stem=stem) + "\n".join(body) + "\n"


def compiler_or_skip(name: str) -> str:
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return name


# ----------------------------------------------------------------------------- --emit c and --prefix
def test_emit_c_writes_only_the_c_and_h_without_a_compiler(tmp_path):
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), PATH=str(Path(sys.executable).parent))
    result = run([sys.executable, "-m", "gradc", "compile", EXAMPLES / "custom_layer.py", "--emit", "c", "-o", tmp_path / "out"], env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["custom_layer.c", "custom_layer.h"]
    assert "custom_layer_value_and_grad" in result.stdout
    header = (tmp_path / "out" / "custom_layer.h").read_text()
    assert "#ifndef CUSTOM_LAYER_H" in header and "int custom_layer_value_and_grad(" in header


def exported_symbols(obj: Path) -> set[str]:
    result = run(["nm", "-g", "--defined-only", obj])
    assert result.returncode == 0, result.stderr
    return {line.split()[-1] for line in result.stdout.splitlines() if line.strip()}


TWO_MODULES = """\
#include <math.h>
#include <stdio.h>
#include "f32/custom_layer.h"
#include "f64/custom_layer.h"

int main(void)
{
    const float X[6] = {-1, 0, 1, 2, 3, 4};
    const float W[6] = {0.1f, -0.2f, 0.3f, 0.4f, -0.5f, 0.6f};
    const double Xd[6] = {-1, 0, 1, 2, 3, 4};
    const double Wd[6] = {0.1, -0.2, 0.3, 0.4, -0.5, 0.6};
    float loss, dX[6], dW[6];
    double lossd, dXd[6], dWd[6];
    /* No temporaries would fit in less; both modules' sizes come from their own function. */
    static double ws32[512], ws64[512];
    int i, ok = sizeof ws32 >= f32_custom_layer_workspace_size(2, 3, 2) && sizeof ws64 >= f64_custom_layer_workspace_size(2, 3, 2);
    ok = ok && f32_custom_layer_value_and_grad(2, 3, 2, X, W, &loss, dX, dW, ws32) == GRADC_OK;
    ok = ok && f64_custom_layer_value_and_grad(2, 3, 2, Xd, Wd, &lossd, dXd, dWd, ws64) == GRADC_OK;
    for (i = 0; i < 6; ++i) ok = ok && fabs(dX[i] - dXd[i]) < 1e-5 && fabs(dW[i] - dWd[i]) < 1e-5;
    printf("%s %.9g %.17g\\n", ok ? "ok" : "FAILED", loss, lossd);
    return !ok;
}
"""


def test_prefixed_modules_link_together(tmp_path):
    """One DSL file compiled twice (float and double) under two prefixes: one program uses both."""
    for prefix, dtype in (("f32_", "f32"), ("f64_", "f64")):
        result = run(
            [sys.executable, "-m", "gradc", "compile", EXAMPLES / "custom_layer.py", "--emit", "c", "--dtype", dtype, "--prefix", prefix, "-o", tmp_path / dtype]
        )
        assert result.returncode == 0, result.stderr
        header = (tmp_path / dtype / "custom_layer.h").read_text()
        assert f"#ifndef {prefix.upper()}CUSTOM_LAYER_H" in header
        compile_ok(["cc", *C99, "-c", f"{dtype}/custom_layer.c", "-o", f"{dtype}.o"], tmp_path)
        symbols = exported_symbols(tmp_path / f"{dtype}.o")
        assert symbols and all(s.startswith(prefix) for s in symbols), symbols
        assert f"{prefix}custom_layer_workspace_size" in symbols and f"{prefix}custom_layer_hvp" in symbols
    (tmp_path / "main.c").write_text(TWO_MODULES)
    compile_ok(["cc", *C99, "main.c", "f32.o", "f64.o", "-o", "main", "-lm"], tmp_path)
    result = run([tmp_path / "main"])
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout


def test_prefix_keeps_the_python_package_working(tmp_path):
    result = run([sys.executable, "-m", "gradc", "compile", EXAMPLES / "custom_layer.py", "--prefix", "pfx_", "-o", tmp_path])
    assert result.returncode == 0, result.stderr
    package = tmp_path / "custom_layer"
    assert "int pfx_custom_layer_value_and_grad(" in (package / "custom_layer.h").read_text()
    meta = json.loads((package / "kernels.json").read_text())["custom_layer"]
    assert meta["entries"]["value_and_grad"] == "pfx_custom_layer_value_and_grad"
    script = textwrap.dedent(
        f"""
        import sys, json
        import numpy as np
        sys.path.insert(0, {str(tmp_path)!r})
        import custom_layer
        X = np.arange(6, dtype=np.float32).reshape(3, 2) / 5
        W = np.ones((2, 4), np.float32) / 3
        loss, (dX, dW) = custom_layer.custom_layer.value_and_grad(X, W)
        print(json.dumps([float(loss), dX.tolist(), dW.tolist(), custom_layer.custom_layer.workspace_size(N=3, K=2, M=4)]))
        """
    )
    result = run([sys.executable, "-c", script])
    assert result.returncode == 0, result.stderr
    loss, dX, dW, ws = json.loads(result.stdout)
    X = np.arange(6, dtype=np.float64).reshape(3, 2) / 5
    W = np.ones((2, 4)) / 3
    Z = X @ W
    assert loss == pytest.approx(np.sum(np.sin(Z) ** 2), rel=1e-5)
    np.testing.assert_allclose(dX, np.sin(2 * Z) @ W.T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dW, X.T @ np.sin(2 * Z), rtol=1e-4, atol=1e-6)
    assert ws > 0


@pytest.mark.parametrize("prefix", ["9lives", "has-dash", "two words"])
def test_a_prefix_must_be_a_c_identifier(tmp_path, prefix):
    result = run([sys.executable, "-m", "gradc", "compile", EXAMPLES / "sigmoid.py", "--emit", "c", "--prefix", prefix, "-o", tmp_path])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "--prefix" in result.stderr and "C identifier" in result.stderr
    assert not any(tmp_path.iterdir())


def test_kernels_are_named_after_their_variables(tmp_path):
    """Two optimiser kernels made by one factory in one file stay two kernels (C names and package)."""
    (tmp_path / "two_steps.py").write_text('import gradc\nstep_a = gradc.optim.adam("P")\nstep_b = gradc.optim.adam("Q", lr=0.01)\n')
    result = run([sys.executable, "-m", "gradc", "compile", tmp_path / "two_steps.py", "-o", tmp_path / "out"])
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "out" / "two_steps" / "kernels.json").read_text())
    assert sorted(meta) == ["step_a", "step_b"]
    assert meta["step_b"]["entries"] == {"forward": "step_b_forward"}
    script = f"import sys; sys.path.insert(0, {str(tmp_path / 'out')!r}); import two_steps; print(two_steps.step_a.name, two_steps.step_b.name)"
    result = run([sys.executable, "-c", script])
    assert result.stdout.split() == ["step_a", "step_b"], result.stderr


# ----------------------------------------------------------------------------- the header describes every function
def test_header_describes_every_function(generated):
    for stem, folder in generated.items():
        header = (folder / f"{stem}.h").read_text()
        kernels = parse_header(header)
        prototypes = PROTOTYPE.findall(header)
        assert len(prototypes) == len(kernels) + sum(len(k.entries) for k in kernels), stem
        for k in kernels:
            assert f"Named dimensions (the leading ptrdiff_t arguments, each >= 0): {', '.join(k.dims)}." in header or not k.dims
            for f in k.entries:
                for p in f.params[len(k.dims) : -1]:
                    # Every size is written in the kernel's own dimensions (or numbers).
                    names = set(re.findall(r"[A-Za-z_]\w*", " ".join(p.shape)))
                    assert names <= set(k.dims), (f.name, p.name, p.shape)
                if f.name.endswith("_value_and_grad"):
                    grads = [p.name for p in f.params if p.name.startswith("d_")]
                    assert grads and all(f"{g} = dout/d{g[2:]}" in f.doc for g in grads), f.doc


def test_header_states_the_conditions_on_dimensions(generated):
    k, _ = parse_header((generated["slices"] / "slices.h").read_text())
    assert k.dims == ["n", "m"]
    assert valid(k, {"n": 2, "m": 1}) and not valid(k, {"n": 1, "m": 1}) and not valid(k, {"n": 2, "m": 0})


def test_optimiser_header_names_its_outputs(generated):
    header = (generated["optimisers"] / "optimisers.h").read_text()
    assert "adam_forward: param_new, m_new, v_new = adam(param, grad, m, v, step, lr)." in header
    assert "Outputs: param_new[P], m_new[P], v_new[P]." in header
    assert "sgd_const_forward: param_new, velocity_new = sgd_momentum(param, grad, velocity)." in header
    assert "Inputs:  param[3][M], grad[3][M], m[3][M], v[3][M], step (scalar), lr (scalar), beta1 (scalar), beta2 (scalar), eps (scalar)." in header
    # Forward-only: an optimiser step is not differentiated.
    assert "_value_and_grad" not in header and "_vjp" not in header


# ----------------------------------------------------------------------------- strict compilers and sanitizers
def _compile_all(generated, compiler_name: str, flags: list[str]) -> None:
    def one(stem):
        folder = generated[stem]
        output = [] if "-fsyntax-only" in flags else ["-c", "-o", f"{stem}.{compiler_name}.o"]
        return stem, run([compiler_name, *flags, f"{stem}.c", *output], folder)

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(one, sorted(generated)))
    problems = [f"{stem}:\n{r.stderr}" for stem, r in results if r.returncode != 0 or r.stderr]
    assert not problems, f"{compiler_name} {' '.join(flags)}:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "compiler_name, flags",
    [("gcc", C99), ("clang", C99 + SYNTAX_ONLY), ("g++", CXX17 + SYNTAX_ONLY), ("clang++", CXX17 + SYNTAX_ONLY)],
    ids=["gcc-c99", "clang-c99", "g++-c++17", "clang++-c++17"],
)
def test_generated_c_compiles_without_warnings(generated, compiler_name, flags):
    _compile_all(generated, compiler_or_skip(compiler_name), flags)


def test_every_entry_point_runs_clean_under_sanitizers(generated):
    compiler_or_skip("gcc")

    def one(stem):
        folder = generated[stem]
        kernels = parse_header((folder / f"{stem}.h").read_text())
        (folder / "driver.c").write_text(driver(stem, kernels))
        built = run(["gcc", *SANITIZE, "driver.c", f"{stem}.c", "-o", "driver", "-lm"], folder)
        if built.returncode != 0:
            return stem, f"build failed:\n{built.stderr}"
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
        ran = run([folder / "driver"], folder, env=env)
        ok = ran.returncode == 0 and ran.stdout.strip().endswith("ok: 0 failures") and "runtime error" not in ran.stderr
        return stem, None if ok else f"{ran.stdout}\n{ran.stderr}"

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(one, sorted(generated)))
    problems = [f"{stem}: {msg}" for stem, msg in results if msg]
    assert not problems, "\n\n".join(problems)


def test_driver_reaches_every_entry_point(generated):
    """The sanitizer run is only as good as its coverage: every documented function is called."""
    folder = generated["custom_layer"]
    (k,) = parse_header((folder / "custom_layer.h").read_text())
    assert [f.name.removeprefix("custom_layer_") for f in k.entries] == ["forward", "value_and_grad", "vjp", "jvp", "hvp"]
    text = driver("custom_layer", [k])
    for f in k.entries:
        assert f"expect({f.name}(N, K, M," in text


# ----------------------------------------------------------------------------- status codes
STATUS_DRIVER = """\
#include <stdio.h>
#include "slices.h"

int main(void)
{
    float x[5] = {1, 2, 4, 7, 11}, w[6] = {1, 5, 2, 3, 9, 4}, out = 0;
    static double ws[64];
    int n;
    for (n = -1; n <= 5; ++n) printf("n=%d status=%d workspace=%lu\\n", n, diffs_forward(n, 2, x, w, &out, ws), (unsigned long)diffs_workspace_size(n, 2));
    printf("m=0 status=%d\\n", diffs_forward(5, 0, x, w, &out, ws));
    printf("out=%g\\n", (double)out);
    return 0;
}
"""


def test_status_codes_for_negative_and_too_small_dimensions(generated, tmp_path):
    for name in ("slices.c", "slices.h"):
        shutil.copy(generated["slices"] / name, tmp_path / name)
    (tmp_path / "status.c").write_text(STATUS_DRIVER)
    compile_ok(["cc", *C99, "status.c", "slices.c", "-o", "status", "-lm"], tmp_path)
    lines = run([tmp_path / "status"]).stdout.splitlines()
    status = {line.split()[0]: line.split()[1] for line in lines[:-2]}
    # x[2:] - x[:-2] needs n >= 2; w[-1] needs m >= 1.
    assert status == {f"n={n}": f"status={0 if n >= 2 else 1}" for n in range(-1, 6)}
    assert lines[-2] == "m=0 status=1"
    assert all(line.endswith("workspace=0") for line in lines[:3])
    # n = 5 (the last valid call): sum((x[2:] - x[:-2])**2) + max(w[1]) = 9 + 25 + 49 + 9.
    assert lines[-1] == "out=92"


# ----------------------------------------------------------------------------- one file, several kernels, one command
def test_a_kernel_chooses_its_default_gradients(generated):
    """@gradc.kernel(wrt=[...]) lets `gradc compile model.py` make a loss and forward-only helpers."""
    header = (generated["model"] / "model.h").read_text()
    assert "d_W1 = dout/dW1, d_b1 = dout/db1, d_W2 = dout/dW2, d_b2 = dout/db2." in header
    assert "d_X" not in header and "d_Y" not in header  # no gradients for the data
    assert "int predict_forward(" in header and "predict_vjp" not in header
    assert "int step_forward(" in header and "step_vjp" not in header


def test_default_gradients_are_checked_and_can_be_overridden():
    import gradc
    from gradc import f32

    @gradc.kernel(wrt="W")
    def f(X: f32["N"], W: f32["N"]):
        return gradc.sum(X * W)

    assert compiler.lower(f).meta["wrt"] == ["W"]
    assert compiler.lower(f, wrt=["X", "W"]).meta["wrt"] == ["X", "W"]
    with pytest.raises(gradc.TraceError, match=r"wrt names 'V', which is not"):

        @gradc.kernel(wrt=["V"])
        def g(X: f32["N"]):
            return gradc.sum(X)
