"""The views into a compiled kernel: C, header, math, statistics, graph, and the CLI that prints them.

The generated C and the math view of the seed examples are compared exactly with golden
files in ``tests/golden/`` (``<example>.c``, ``<example>.math.txt``), so that a change to
the code generator shows up as a reviewable diff.  When a change is intended, regenerate
them and review the diff before committing:

    GRADC_UPDATE_GOLDEN=1 python -m pytest tests/test_views.py

Every example is compiled once per module (``compiled``); the CLI runs are separate
processes (about a second each, mostly importing SymPy), so they are started together by
one module fixture (``cli``) and the tests read their results.
"""

import difflib
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import sympy as sp
from click.testing import CliRunner

import gradc
from gradc import codegen, compiler, f64, views
from gradc.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("GRADC_UPDATE_GOLDEN") == "1"

#: example script -> the kernel it defines
SEEDS = {
    "custom_layer": "custom_layer",
    "sigmoid": "sigmoid",
    "computation_graph": "computation_graph",
    "gradient_penalty": "gradient_penalty",
    "numerical_instability": "inverse_exp",
}
ENTRIES = ("forward", "value_and_grad", "vjp", "jvp", "hvp")

SOFTPLUS_SOURCE = textwrap.dedent(
    """
    import gradc
    from gradc import f64


    @gradc.kernel
    def soft(x: f64["N"]):
        return gradc.sum(gradc.log(1 + gradc.exp(x)))
    """
).lstrip()


@gradc.kernel
def soft(x: f64["N"]):
    return gradc.sum(gradc.log(1 + gradc.exp(x)))


# ----------------------------------------------------------------------------- CLI runs
@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def _without_dot_path() -> str:
    """$PATH without the folders that hold Graphviz's ``dot`` (``/bin`` may be ``/usr/bin``)."""
    return os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if not (Path(d) / "dot").exists())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("views")


@pytest.fixture(scope="module")
def cli(work, compiled):
    """Every CLI run of this module, started together once this process has compiled (and cached) its kernels."""
    (work / "soft.py").write_text(SOFTPLUS_SOURCE)
    layer = EXAMPLES / "custom_layer.py"

    def start(args, seed, **env):
        # Each run's hash seed differs from this process's: views must not depend on it.
        environment = {**os.environ, "PYTHONHASHSEED": str(seed), **env}
        return subprocess.Popen(
            [sys.executable, "-m", "gradc.cli", *map(str, args)],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = {
        "c": start(["show", layer], 1),
        "math": start(["show", layer, "--view", "math"], 2),
        "latex": start(["show", layer, "--view", "math", "--latex", "-o", work / "layer.tex"], 3),
        "graph": start(["show", layer, "--view", "graph"], 4),
        "png": start(["show", layer, "--view", "graph", "--format", "png", "-o", work / "layer.png"], 5),
        "no-dot": start(["show", layer, "--view", "graph", "--format", "png", "-o", work / "no.png"], 6, PATH=_without_dot_path()),
        "no-stable": start(["show", work / "soft.py", "--view", "stats", "--no-stable"], 7),
        "compile-v": start(["compile", layer, "-o", work / "build", "-v"], 8),
    }
    runs = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        runs[name] = Run(p.returncode, out, err)
    return runs


def view_without_building(fn, view: str, **lower_options) -> str:
    """A view as ``gradc show`` makes it: lowered and rendered to C, but not built."""
    low = compiler.lower(fn, **lower_options)
    rendered = codegen.render([low.spec], low.spec.name)
    return views.render(view, views.Compiled(low, rendered.functions[low.spec.name], rendered.c_source, rendered.header))


# ----------------------------------------------------------------------------- compiled kernels
@pytest.fixture(scope="module")
def compiled(examples_path):
    """Each seed example's kernel compiled as ``gradc show`` compiles it: every parameter, its own dtype."""
    return {ex: gradc.compile(getattr(importlib.import_module(ex), name)) for ex, name in SEEDS.items()}


@pytest.fixture(scope="module")
def layer(compiled):
    return compiled["custom_layer"]


def source_line(example: str, marker: str) -> int:
    text = (EXAMPLES / f"{example}.py").read_text()
    return next(i for i, line in enumerate(text.splitlines(), 1) if marker in line)


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_bytes(text.encode())
        return
    assert path.exists(), f"no golden file tests/golden/{name}; create it with GRADC_UPDATE_GOLDEN=1 python -m pytest tests/test_views.py"
    expected = path.read_bytes().decode()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), f"golden/{name}", "now", n=2))
        pytest.fail(
            f"{name} differs from its golden file (if intended: GRADC_UPDATE_GOLDEN=1 python -m pytest tests/test_views.py)\n"
            + diff[:6000]
        )


# ----------------------------------------------------------------------------- C and header
@pytest.mark.parametrize("example", SEEDS)
def test_c_matches_its_golden_file(compiled, example):
    k = compiled[example]
    assert k.show() == k.show("c") == k.c_source
    assert_golden(f"{example}.c", k.show("c"))


def test_header_view(layer):
    header = layer.show("header")
    assert header == layer.header
    assert 'extern "C"' in header
    assert "size_t custom_layer_workspace_size(ptrdiff_t N, ptrdiff_t K, ptrdiff_t M);" in header
    for entry in ENTRIES:
        assert f"int custom_layer_{entry}(" in header


def test_cli_prints_the_same_c_in_another_process(cli, layer):
    # The CLI names the module after the file, which for custom_layer.py is also the kernel's name.
    run = cli["c"]
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert "\x1b[" not in run.stdout, "piped output must not be highlighted"
    assert run.stdout == layer.c_source


def test_c_names_the_gradc_version_and_the_kernel_source(layer):
    assert f"generated by gradc {gradc.__version__}" in layer.c_source
    assert f"custom_layer.py:{source_line('custom_layer', '@gradc.kernel')}" in layer.c_source
    assert " *         Y = gradc.sin(X @ W)" in layer.c_source


def test_views_are_deterministic_within_a_process(compiled):
    """A view must not carry node ids, addresses or set order: asking again gives the same text."""
    for k in compiled.values():
        for view in views.VIEWS:
            assert k.show(view) == k.show(view), f"{k.name}: the {view} view changed between two calls"


# ----------------------------------------------------------------------------- source map
NEST_COMMENT = re.compile(r"^    /\* (?P<what>.*)   \[(?P<file>[\w.]+\.py): lines? (?P<lines>\d+(?:, \d+)*)\] \*/$")
NEST_CODE = re.compile(r"^\s+(for \(|\{$)|\w\[[^\]]*\] \+?= ")


def loop_nests(c_source: str, function: str) -> list[list[str]]:
    """The loop nests of ``function``'s body: the blank-line separated paragraphs that compute something."""
    lines = c_source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"int {function}("))
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    body = lines[lines.index("{", start) + 1 : end]
    paragraphs, current = [], []
    for line in body + [""]:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    return [p for p in paragraphs if any(NEST_CODE.search(line) for line in p)]


@pytest.mark.parametrize("example", SEEDS)
def test_every_loop_nest_names_its_source_lines(compiled, example, examples_path):
    k = compiled[example]
    lines, first = inspect.getsourcelines(getattr(importlib.import_module(example), SEEDS[example]).fn)
    kernel_lines = range(first, first + len(lines))
    for entry, function in k.meta["entries"].items():
        nests = loop_nests(k.c_source, function)
        assert nests, function
        for nest in nests:
            m = NEST_COMMENT.match(nest[0])
            assert m, f"{function}: a loop nest that does not start with its source lines:\n" + "\n".join(nest)
            assert m["file"] == f"{example}.py"
            assert all(int(n) in kernel_lines for n in m["lines"].split(", ")), nest[0]


def test_source_map_points_at_the_right_lines(layer):
    nests = [NEST_COMMENT.match(nest[0]) for nest in loop_nests(layer.c_source, "custom_layer_forward")]
    matmul, loss = source_line("custom_layer", "Y = gradc.sin"), source_line("custom_layer", "return gradc.sum")
    assert [m["lines"] for m in nests] == [f"{matmul}", f"{matmul}, {loss}"]
    assert nests[0]["what"].startswith("matmul[n, m] +=")


# ----------------------------------------------------------------------------- math
@pytest.mark.parametrize("example", SEEDS)
def test_math_matches_its_golden_file(compiled, example):
    assert_golden(f"{example}.math.txt", compiled[example].show("math"))


def test_math_shows_every_gradient_before_and_after_cse(compiled):
    text = compiled["sigmoid"].show("math")
    assert text.startswith("sigmoid_value_and_grad: 2 ")
    assert "── nest 1: out" in text and "── nest 2: d_x" in text
    assert f"[sigmoid.py: line {source_line('sigmoid', 'return 1 /')}]" in text
    assert "dₓ = Sigmoid(-x)⋅Sigmoid(x)" in text
    assert "after common-subexpression elimination" in text
    assert "t₀ = " in text and "t₁ = " in text


def test_math_in_latex(cli, work, layer):
    text = layer.show("math", latex=True)
    assert r"matmul[n, m] =" not in text  # LaTeX, not the pretty form
    assert r"\sum_{k=0}^{K - 1}" in text
    assert r"\sin{\left(" in text and r"\cos{\left(" in text
    run = cli["latex"]
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"wrote {work / 'layer.tex'}"
    assert (work / "layer.tex").read_text() == text


def test_cli_math_is_the_golden_math(cli, layer):
    run = cli["math"]
    assert run.returncode == 0, run.stderr
    assert run.stdout == layer.show("math")


# ----------------------------------------------------------------------------- stats
def stats_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip(), maxsplit=4)
        if cells[0].endswith(ENTRIES) and len(cells) == 5:
            rows[cells[0]] = cells[1:]
    return rows


def test_stats_of_the_custom_layer(layer):
    text = layer.show("stats")
    assert text.startswith("kernel custom_layer (f32), gradients with respect to X, W")
    assert "stability rewrites fired: none" in text
    assert re.search(r"operations in the naive derivative .*: \d+$", text, re.M)
    rows = stats_rows(text)
    assert list(rows) == [f"custom_layer_{e}" for e in ENTRIES]
    for function, (nests, before, after, workspace) in rows.items():
        assert int(nests) == len(loop_nests(layer.c_source, function)), function
        assert int(before) > 0 and int(after) > 0
    assert rows["custom_layer_forward"][3] == "4*(32*K + M*N) bytes (+ padding, 2 buffers)"
    assert rows["custom_layer_value_and_grad"][3] == "4*(K*N + 32*K + 2*M*N + 32*M + 32*N) bytes (+ padding, 6 buffers)"


def test_stats_workspace_formula_is_the_workspace_size(layer):
    # N*M and N*K multiples of 16 elements: no padding, so the largest formula is what the C reports.
    dims = {"N": 4, "K": 4, "M": 8}
    rows = stats_rows(layer.show("stats"))
    symbols = {d: sp.Symbol(d) for d in dims}  # "N" alone would parse as SymPy's N()
    values = {symbols[d]: v for d, v in dims.items()}
    largest = max(int(sp.sympify(w[3].split(" bytes")[0], locals=symbols).subs(values)) for w in rows.values())
    assert largest == layer.workspace_size(**dims)


def test_stats_in_f64_and_without_workspace(compiled):
    stats64 = view_without_building(compiled["custom_layer"].kernel, "stats", dtype="f64")
    assert "16*(K*N + 16*K + 2*M*N + 16*M + 16*N) bytes (+ padding, 12 buffers)" in stats64
    rows = stats_rows(compiled["computation_graph"].show("stats"))
    assert all(row[3] == "none" for row in rows.values())


def test_stats_list_the_stability_rewrites_that_fired(cli):
    assert "stability rewrites fired: softplus ×1" in view_without_building(soft, "stats")
    assert "stability rewrites fired: none (turned off" in view_without_building(soft, "stats", stable=False)
    run = cli["no-stable"]
    assert run.returncode == 0, run.stderr
    assert "stability rewrites fired: none (turned off" in run.stdout
    assert "softplus" not in run.stdout


# ----------------------------------------------------------------------------- graph
NODE = re.compile(r'^\s*(n\d+) \[label="(?P<label>(?:[^"\\]|\\.)*)", (?P<style>.*)\];$')


@dataclass
class Dot:
    nodes: dict[str, tuple[str, str]]  # DOT id -> (label, style)
    clusters: list[list[str]]  # labels of the nodes in each cluster


def parse_dot(dot: str) -> Dot:
    nodes, clusters, current = {}, [], None
    for line in dot.splitlines():
        if line.strip().startswith("subgraph cluster_"):
            current = []
            clusters.append(current)
        elif line.strip() == "}":
            current = None
        elif m := NODE.match(line):
            nodes[m[1]] = (m["label"], m["style"])
            if current is not None:
                current.append(m["label"])
    return Dot(nodes, clusters)


def by_name(dot: Dot) -> dict[str, str]:
    """The style of each node, by its first label line (its variable name or op)."""
    return {label.split("\\n")[0]: style for label, style in dot.nodes.values()}


@pytest.mark.parametrize("example", SEEDS)
def test_graph_is_valid_dot(compiled, example):
    dot = compiled[example].show("graph")
    run = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert "<svg" in run.stdout


def test_graph_tells_forward_from_backward(layer):
    styles = by_name(parse_dot(layer.show("graph")))
    assert "rounded,filled" in styles["X"] and "rounded,filled" in styles["W"]
    for forward in ("matmul", "Y", "mul", "out"):
        assert styles[forward] == "shape=box", forward
    backward = [name for name in styles if name.startswith("d_")]
    assert {"d_matmul", "d_X", "d_W"} <= set(backward)
    for name in backward:
        assert "shape=ellipse" in styles[name] and "filled" in styles[name], name


def test_graph_clusters_are_the_fused_loop_nests(layer):
    dot = parse_dot(layer.show("graph"))
    names = sorted(sorted(label.split("\\n")[0] for label in cluster) for cluster in dot.clusters)
    # As in the C: sum(sin(matmul)**2) is computed by one loop body, d_matmul = 2 sin cos by another.
    assert names == [["Y", "mul", "out"], ["d_Y", "d_matmul", "d_mul", "d_out"]]


def test_graph_labels_carry_op_shape_and_line(layer):
    labels = {label.split("\\n")[0]: label.split("\\n") for label, _ in parse_dot(layer.show("graph")).nodes.values()}
    sin_line = source_line("custom_layer", "Y = gradc.sin")
    assert labels["Y"] == ["Y", "sin", "(N, M)", f"line {sin_line}"]
    assert labels["X"] == ["X", "input", "(N, K)", f"line {source_line('custom_layer', '@gradc.kernel')}"]
    assert labels["d_W"][1:3] == ["sum", "(K, M)"]
    assert labels["out"][1:3] == ["sum", "()"]


def test_graph_does_not_depend_on_the_process(cli, layer):
    run = cli["graph"]
    assert run.returncode == 0, run.stderr
    assert run.stdout == layer.show("graph")


def test_render_dot_as_svg(layer):
    svg = views.render_dot(layer.show("graph"), "svg").decode()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg


def test_cli_renders_a_png(cli, work):
    run = cli["png"]
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"wrote {work / 'layer.png'}"
    assert (work / "layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_graphviz_one_line_says_how_to_install_it(cli, work):
    run = cli["no-dot"]
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("gradc: ") and "Graphviz" in lines[0] and "apt-get install graphviz" in lines[0]
    assert not (work / "no.png").exists()


def test_package_written_by_compile_shows_its_c_but_not_the_math(cli, work, layer):
    """An exported package has no compiler inside: C and header, yes; math, stats and graph, a clear error."""
    run = cli["compile-v"]
    assert run.returncode == 0, run.stderr
    init = work / "build" / "custom_layer" / "__init__.py"
    # A name of its own: examples/custom_layer.py is already imported as custom_layer.
    spec = importlib.util.spec_from_file_location("views_exported_layer", init, submodule_search_locations=[str(init.parent)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    try:
        spec.loader.exec_module(package)
        loaded = package.custom_layer
        assert loaded.show("c") == layer.c_source
        assert loaded.show("header") == layer.header
        with pytest.raises(Exception, match="needs gradc's compiler"):
            loaded.show("math")
    finally:
        for name in [m for m in sys.modules if m == spec.name or m.startswith(spec.name + ".")]:
            del sys.modules[name]


def test_unknown_view_is_an_error(layer):
    with pytest.raises(gradc.GradcError, match="no view named 'nope'"):
        layer.show("nope")


def test_an_image_format_needs_an_output_file():
    # In this process: the mistake is found before Graphviz runs.
    result = CliRunner().invoke(cli_main, ["show", str(EXAMPLES / "custom_layer.py"), "--view", "graph", "--format", "svg"])
    assert result.exit_code != 0
    assert result.output.strip() == "gradc: --format svg writes an image: give the file with -o, e.g. -o custom_layer.svg"


# ----------------------------------------------------------------------------- progress
def test_compile_verbose_prints_stage_timings(cli, work):
    run = cli["compile-v"]
    assert run.returncode == 0, run.stderr
    assert "stage timings" not in run.stdout
    timings = run.stderr.split("gradc: stage timings\n", 1)[1].splitlines()
    stages = [re.fullmatch(r"\s*\d+\.\d{3} s  (.+)", line)[1] for line in timings]
    for stage in ("tracing", "differentiating", "generating C", "C compiler"):
        assert any(stage in s for s in stages), (stage, stages)
    assert stages[-1] == "total"

