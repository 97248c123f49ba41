"""The ``gradc`` command line: compile a DSL file into an importable package, or show its C.

A mistake in the user's file ends in one line, ``file:line: what is wrong``, and exit
status 1, never a traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Sequence

import click

from . import __version__, codegen, compiler
from .dsl import Kernel
from .errors import GradcError

RUNTIME_FILES = ("runtime.py", "errors.py")


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


def _lower_all(path: Path, kernels: dict[str, Kernel], wrt, dtype) -> list[compiler.Lowered]:
    lowered = []
    for name, k in kernels.items():
        try:
            lowered.append(compiler.lower(k, wrt, dtype, name=name))
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


@main.command("compile")
@click.argument("file", type=click.Path(dir_okay=False))
@_kernel_opt
@_wrt_opt
@_dtype_opt
@click.option("-o", "--output", "out_dir", default="build", show_default=True, type=click.Path(file_okay=False), help="Folder to write the package into.")
@click.option("--cflags", help="C compiler flags replacing the defaults (e.g. \"-O2\").")
def compile_cmd(file, names, wrt, dtype, out_dir, cflags) -> None:
    """Compile FILE's kernels into the package OUT/<file stem>/ (C source, header, extension, glue)."""
    path, kernels = load_kernels(file)
    kernels = _select(path, kernels, names)
    module = codegen.Names().take(path.stem)
    lowered = _lower_all(path, kernels, _wrt_option(wrt), dtype)
    try:
        rendered, built = compiler.compile_many(lowered, module, cflags=cflags.split() if cflags else None)
    except GradcError as exc:
        raise UserError(str(exc)) from None
    target = Path(out_dir) / module
    write_package(target, module, path.name, lowered, rendered, built)
    for low in lowered:
        entries = ", ".join(low.meta["entries"])
        click.echo(f"compiled {low.meta['kernel']} ({low.meta['dtype']}; {entries})")
    click.echo(f"wrote {target}/ (import with: sys.path.insert(0, {str(Path(out_dir))!r}); import {module})")


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
@click.option("--header", is_flag=True, help="Show the .h instead of the .c.")
def show_cmd(file, names, wrt, dtype, header) -> None:
    """Print the C that FILE's kernels compile to."""
    path, kernels = load_kernels(file)
    kernels = _select(path, kernels, names)
    module = codegen.Names().take(path.stem)
    lowered = _lower_all(path, kernels, _wrt_option(wrt), dtype)
    rendered = codegen.render([l.spec for l in lowered], module)
    click.echo(rendered.header if header else rendered.c_source, nl=False)


if __name__ == "__main__":
    main()
