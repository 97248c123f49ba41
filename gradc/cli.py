"""The ``gradc`` command line: compile a DSL file into a package, look inside it, check its gradients.

A mistake in the user's file ends in one line, ``file:line: what is wrong``, and exit
status 1, never a traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

import click

import numpy as np

from . import __version__, codegen, compiler, views
from .dsl import Kernel
from .errors import GradcError

#: A compile that has run this long says which stage it is in.
PATIENCE_SECONDS = 1.0


class UserError(click.ClickException):
    """An error in the user's input, shown as a single line."""

    def show(self, file=None) -> None:
        click.echo(f"gradc: {self.format_message()}", err=True)


def _locate(exc: BaseException, path: Path) -> str:
    """``file:line: Kind: message`` for an exception raised while running the user's file."""
    if isinstance(exc, GradcError) and exc.filename:
        return str(exc)
    if isinstance(exc, SyntaxError):
        return f"{exc.filename or path}:{exc.lineno}: SyntaxError: {exc.msg}"
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(frame.filename) == str(path):
            line = frame.lineno
    msg = exc.message if isinstance(exc, GradcError) else str(exc)
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: {type(exc).__name__}: {msg}"


def load_kernels(file: str) -> tuple[Path, dict[str, Kernel]]:
    path = Path(file).resolve()
    if not path.is_file():
        raise UserError(f"{file}: no such file")
    if path.suffix != ".py":
        raise UserError(f"{file}: expected a Python file (.py) defining @gradc.kernel functions")
    spec = importlib.util.spec_from_file_location(f"_gradc_user_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure in user code becomes one clear line
        raise UserError(_locate(exc, path)) from None
    finally:
        sys.path.remove(str(path.parent))
    kernels = {name: obj for name, obj in vars(module).items() if isinstance(obj, Kernel)}
    if not kernels:
        raise UserError(f"{file}: defines no @gradc.kernel functions")
    return path, kernels


def _select(path: Path, kernels: dict[str, Kernel], names: Sequence[str]) -> dict[str, Kernel]:
    if not names:
        return kernels
    missing = [n for n in names if n not in kernels]
    if missing:
        raise UserError(f"{path.name}: no kernel named {', '.join(missing)} (kernels: {', '.join(kernels)})")
    return {n: kernels[n] for n in names}


class Progress:
    """Says which stage a long compile is in (on a terminal); with ``verbose``, every stage and its time."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.interactive = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.stages: list[tuple[str, float]] = []

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages.append((stage, now))
        if self.verbose or (self.interactive and now - self.start > PATIENCE_SECONDS):
            click.echo(f"gradc: {stage}...", err=True)

    def report(self) -> None:
        if not self.verbose:
            return
        end = time.perf_counter()
        click.echo("gradc: stage timings", err=True)
        for (stage, t0), (_, t1) in zip(self.stages, self.stages[1:] + [("", end)]):
            click.echo(f"  {t1 - t0:8.3f} s  {stage}", err=True)
        click.echo(f"  {end - self.start:8.3f} s  total", err=True)


def _lower_all(path: Path, kernels: dict[str, Kernel], wrt, dtype, stable=True, progress=compiler._quiet, prefix="", backend="c", threads=None) -> list[compiler.Lowered]:
    lowered = []
    for name, k in kernels.items():
        try:
            lowered.append(compiler.lower(k, wrt, dtype, name=name, prefix=prefix, stable=stable, backend=backend, threads=threads, progress=progress))
        except Exception as exc:  # noqa: BLE001 - tracing runs user code
            raise UserError(_locate(exc, path)) from None
    return lowered


def _wrt_option(wrt: str | None):
    return None if wrt is None else [w.strip() for w in wrt.split(",") if w.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradc")
def main() -> None:
    """gradc: compile Python loss functions into C gradient kernels."""


_kernel_opt = click.option("-k", "--kernel", "names", multiple=True, help="Kernel to compile (repeatable; default: every kernel in FILE).")
_wrt_opt = click.option("--wrt", help="Comma-separated parameters to differentiate with respect to (default: all).")
_dtype_opt = click.option("--dtype", type=click.Choice(["f32", "f64"]), help="Compute in this precision instead of the annotations'.")
_stable_opt = click.option("--no-stable", "unstable", is_flag=True, help="Turn the stability rewrites off (to compare).")
_verbose_opt = click.option("-v", "--verbose", is_flag=True, help="Print each compiler stage and its time.")


@main.command("compile")
@click.argument("file", type=click.Path(dir_okay=False))
@_kernel_opt
@_wrt_opt
@_dtype_opt
@click.option("-o", "--output", "out_dir", default="build", show_default=True, type=click.Path(file_okay=False), help="Folder to write into.")
@click.option(
    "--emit",
    type=click.Choice(["package", "c"]),
    default="package",
    show_default=True,
    help="package: OUT/<stem>/ importable from Python; c: only OUT/<stem>.c and OUT/<stem>.h (no C compiler needed).",
)
@click.option("--prefix", default="", help="Prefix for every exported C symbol, so that several compiled modules link together.")
@click.option("--cflags", help="C compiler flags replacing the defaults (e.g. \"-O2\").")
@click.option(
    "--backend",
    type=click.Choice(["c", "blas"]),
    default="c",
    show_default=True,
    help="blas: large matrix products call a BLAS (pip install 'gradc[blas]', or link your own -lopenblas with --emit c).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Share large loops between this many threads (OpenMP: builds with -fopenmp; --emit c needs it to run threaded).",
)
@_stable_opt
@_verbose_opt
def compile_cmd(file, names, wrt, dtype, out_dir, emit, prefix, cflags, backend, threads, unstable, verbose) -> None:
    """Compile FILE's kernels into the package OUT/<file stem>/ (C source, header, extension, glue),
    or with --emit c into OUT/<file stem>.c and .h alone."""
    if prefix and not re.fullmatch(r"[A-Za-z_]\w*", prefix, re.ASCII):
        raise UserError(f"--prefix {prefix!r}: a prefix must be a C identifier (letters, digits and _, not starting with a digit)")
    progress = Progress(verbose)
    path, kernels = load_kernels(file)
    kernels = _select(path, kernels, names)
    module = codegen.Names().take(path.stem)
    lowered = _lower_all(path, kernels, _wrt_option(wrt), dtype, not unstable, progress, prefix, backend, threads)
    if emit == "c":
        progress("generating C (common subexpressions)")
        rendered = codegen.render([l.spec for l in lowered], module, prefix=prefix)
        write_c(Path(out_dir), rendered)
        progress.report()
        for low in lowered:
            click.echo(f"compiled {low.meta['kernel']} ({low.meta['dtype']}; {', '.join(low.meta['entries'].values())})")
        click.echo(f"wrote {Path(out_dir) / (module + '.c')} and {Path(out_dir) / (module + '.h')}")
        if backend == "blas":
            click.echo("link it with a CBLAS (e.g. -lopenblas); for prefixed names define GRADC_CBLAS_SGEMM/GRADC_CBLAS_DGEMM")
        if threads > 1:
            click.echo(f"build it with -fopenmp to run on {threads} threads (without it, it runs on one, with the same results)")
        return
    try:
        rendered, built = compiler.compile_many(lowered, module, cflags=cflags.split() if cflags else None, progress=progress, prefix=prefix)
    except GradcError as exc:
        raise UserError(str(exc)) from None
    target = Path(out_dir) / module
    progress(f"writing {target}")
    write_package(target, module, path.name, lowered, rendered, built)
    progress.report()
    for low in lowered:
        entries = ", ".join(low.meta["entries"])
        click.echo(f"compiled {low.meta['kernel']} ({low.meta['dtype']}; {entries})")
    click.echo(f"wrote {target}/ (import with: sys.path.insert(0, {str(Path(out_dir))!r}); import {module})")


def write_c(out_dir: Path, rendered) -> None:
    """Write the ``.c`` and ``.h``, each by a rename, so that a build never sees half a file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in ((f"{rendered.module}.h", rendered.header), (f"{rendered.module}.c", rendered.c_source)):
        staging = out_dir / f".{name}.tmp-{os.getpid()}"
        staging.write_text(text)
        os.replace(staging, out_dir / name)


def write_package(target: Path, module: str, origin: str, lowered, rendered, built) -> None:
    """Write the package into a temporary folder next to ``target``, then swap it in."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{module}.tmp-{os.getpid()}"
    old = target.parent / f".{module}.old-{os.getpid()}"
    for leftover in (staging, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    staging.mkdir()
    try:
        (staging / f"{module}.c").write_text(rendered.c_source)
        (staging / f"{module}.h").write_text(rendered.header)
        so_name = built.path.name
        shutil.copy2(built.path, staging / so_name)
        here = Path(__file__).resolve().parent
        shutil.copy2(here / "runtime.py", staging / "_runtime.py")
        shutil.copy2(here / "errors.py", staging / "errors.py")
        (staging / "kernels.json").write_text(json.dumps({l.meta["kernel"]: l.meta for l in lowered}, indent=1))
        glue = codegen.template("package_init.py.j2").render(
            module=module,
            origin=origin,
            version=__version__,
            kernels=[l.meta["kernel"] for l in lowered],
            so_name=so_name,
            ext_module=built.module_name,
        )
        (staging / "__init__.py").write_text(glue)
        # Swap by renames, never deleting first: a failed swap puts the old package back.
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(staging, target)
        except OSError:
            if old.exists():
                os.replace(old, target)
            raise
    finally:
        for leftover in (staging, old):
            if leftover.exists():
                shutil.rmtree(leftover)


@main.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
@_kernel_opt
@_wrt_opt
@_dtype_opt
@click.option("--view", type=click.Choice(views.VIEWS), default="c", show_default=True, help="What to show.")
@click.option("--header", is_flag=True, help="Show the .h (same as --view header).")
@click.option("--latex", is_flag=True, help="With --view math: LaTeX instead of pretty-printed text.")
@click.option("--format", "fmt", type=click.Choice(["dot", "svg", "png"]), default="dot", show_default=True, help="With --view graph: DOT source, or rendered by Graphviz.")
@click.option("-o", "--output", "out_file", type=click.Path(dir_okay=False), help="Write to this file instead of the terminal.")
@click.option("--plain", is_flag=True, help="No syntax highlighting (the default when output is not a terminal).")
@_stable_opt
@_verbose_opt
def show_cmd(file, names, wrt, dtype, view, header, latex, fmt, out_file, plain, unstable, verbose) -> None:
    """Show what FILE's kernels compile to: the C, the header, the math, statistics or the graph."""
    view = "header" if header else view
    progress = Progress(verbose)
    path, kernels = load_kernels(file)
    kernels = _select(path, kernels, names)
    module = codegen.Names().take(path.stem)
    lowered = _lower_all(path, kernels, _wrt_option(wrt), dtype, not unstable, progress)
    progress("generating C (common subexpressions)")
    rendered = codegen.render([l.spec for l in lowered], module)
    try:
        if view in ("c", "header"):
            text = rendered.c_source if view == "c" else rendered.header
        else:
            parts = [
                views.render(view, views.Compiled(l, rendered.functions[l.spec.name], rendered.c_source, rendered.header), latex=latex)
                for l in lowered
            ]
            text = "\n".join(parts)
        if view == "graph" and fmt != "dot":
            if out_file is None:
                raise UserError(f"--format {fmt} writes an image: give the file with -o, e.g. -o {module}.{fmt}")
            if len(lowered) > 1:
                raise UserError(f"{path.name} has {len(lowered)} kernels: render one graph at a time with -k NAME")
            progress(f"rendering with Graphviz ({fmt})")
            Path(out_file).write_bytes(views.render_dot(text, fmt))
            click.echo(f"wrote {out_file}")
            progress.report()
            return
    except GradcError as exc:
        raise UserError(str(exc)) from None
    progress.report()
    if out_file:
        Path(out_file).write_text(text)
        click.echo(f"wrote {out_file}")
    elif view in ("c", "header") and not plain and sys.stdout.isatty():
        from rich.console import Console
        from rich.syntax import Syntax

        Console().print(Syntax(text, "c", theme="ansi_dark", line_numbers=False, word_wrap=False))
    else:
        click.echo(text, nl=False)


def _parse_dims(text: str | None) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, _, value = item.partition("=")
        if not name.strip().isidentifier() or not value.strip().isdigit():
            raise UserError(f"--dims: expected NAME=SIZE items such as N=7,M=5, got {item!r}")
        if name.strip() in dims:
            raise UserError(f"--dims: {name.strip()} is given twice")
        dims[name.strip()] = int(value)
    return dims


def _check_dim_names(dims: dict[str, int], kernels: dict[str, Kernel]) -> None:
    # A misspelt name would otherwise be ignored and the check run at the default sizes.
    known = list(dict.fromkeys(d for k in kernels.values() for p in k.params for d in p.type.dims if isinstance(d, str)))
    unknown = [n for n in dims if n not in known]
    if unknown:
        raise UserError(
            f"--dims: no dimension named {', '.join(unknown)} "
            f"(named dimensions: {', '.join(known) if known else 'none'})"
        )


def random_inputs(k: Kernel, dims: dict[str, int], rng: np.random.Generator, positive: bool) -> list[np.ndarray]:
    """Random arguments for ``k``; unnamed sizes of named dimensions default to 3, 4, 5, ..."""
    sizes = dict(dims)
    arrays = []
    for p in k.params:
        shape = []
        for d in p.type.dims:
            if isinstance(d, str):
                sizes.setdefault(d, 3 + len([n for n in sizes if n not in dims]))
                shape.append(sizes[d])
            else:
                shape.append(d)
        x = rng.standard_normal(shape)
        arrays.append(np.abs(x) + 0.1 if positive else x)
    return arrays


@main.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@_kernel_opt
@_wrt_opt
@click.option("--dtype", type=click.Choice(["f32", "f64"]), default="f64", show_default=True, help="Precision of the gradients under test.")
@click.option("--dims", help="Sizes of named dimensions, e.g. N=7,M=5 (default: 3, 4, 5, ...).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--second", is_flag=True, help="Also check a Hessian-vector product.")
@click.option("--positive", is_flag=True, help="Draw positive inputs (for log, sqrt, ...).")
def check_cmd(file, names, wrt, dtype, dims, seed, second, positive) -> None:
    """Check FILE's gradients against central finite differences in float64."""
    from .check import check_grad

    path, kernels = load_kernels(file)
    kernels = _select(path, kernels, names)
    sizes = _parse_dims(dims)
    _check_dim_names(sizes, kernels)
    failed = []
    for name, k in kernels.items():
        rng = np.random.default_rng(seed)
        args = random_inputs(k, sizes, rng, positive)
        try:
            result = check_grad(k, *args, wrt=_wrt_option(wrt), dtype=dtype, second=second, seed=seed)
        except GradcError as exc:
            raise UserError(_locate(exc, path)) from None
        _print_table(result)
        if not result.passed:
            failed.append(name)
    if failed:
        raise UserError(f"gradient check failed for {', '.join(failed)}")


def _print_table(result) -> None:
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        rows = result.table()
        table = Table(title=f"{result.kernel} ({result.dtype})")
        for head in rows[0]:
            table.add_column(head, justify="left" if head == "parameter" else "right")
        for row in rows[1:]:
            table.add_row(*row[:-1], f"[green]{row[-1]}[/]" if row[-1] == "yes" else f"[bold red]{row[-1]}[/]")
        Console().print(table)
    else:
        click.echo(str(result))


if __name__ == "__main__":
    main()
