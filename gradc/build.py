"""Build generated C into a Python extension with cffi, through an on-disk cache.

A cache entry is a folder named after a hash of everything that affects the binary (the
C source, cffi's declarations, the compiler and its flags, the Python ABI, the versions
of gradc and cffi).  It holds the extension and a manifest with the extension's SHA-256.

Entries are built in a private temporary folder and renamed into place, so two processes
compiling the same kernel at once both succeed and leave one complete entry.  An entry
whose manifest is missing or whose extension does not match its hash (a crash halfway
through a copy, a truncated file) is rebuilt, never loaded.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import GradcError

#: Optimise hard and use the host's vector instructions; reproducible IEEE semantics are
#: kept (no -ffast-math), because the stability rewrites rely on Inf and NaN behaving.
#: -fno-trapping-math only says no code waits for a floating-point trap, which lets the
#: compiler evaluate both sides of a select and so vectorise templates/vecmath.c.j2.
#: -ffp-contract=fast lets a*b + c become one fused multiply-add (one rounding instead of
#: two): the same binary always gives the same result, and a matrix product runs twice as fast.
DEFAULT_CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-std=c99")

MANIFEST = "manifest.json"


class BuildError(GradcError):
    """The C compiler is missing or rejected the generated code."""


@dataclass
class Built:
    """A loaded extension: cffi's ``ffi`` and ``lib``, and where the binary lives."""

    ffi: object
    lib: object
    path: Path
    module_name: str


def cache_dir() -> Path:
    """``$GRADC_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradc``, else ``~/.cache/gradc``."""
    env = os.environ.get("GRADC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradc"


def default_cflags() -> list[str]:
    """``$GRADC_CFLAGS`` (split on spaces) when set, else :data:`DEFAULT_CFLAGS`."""
    env = os.environ.get("GRADC_CFLAGS")
    return env.split() if env is not None else list(DEFAULT_CFLAGS)


def _compiler() -> str:
    return os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"


@functools.lru_cache(maxsize=None)
def compiler_identity(cc: str) -> str | None:
    """The compiler's version line (a new compiler gives new binaries), or None if it is missing."""
    exe = cc.split()[0]
    if shutil.which(exe) is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0] if out.stdout else exe


def cache_key(source: str, cdef: str, cflags: Sequence[str]) -> str:
    """A hash of what selects the binary.  The compiler's version is checked against the
    entry's manifest instead, so that a cached kernel loads on a machine without a compiler."""
    import cffi

    h = hashlib.sha256()
    for part in (
        source,
        cdef,
        " ".join(cflags),
        sys.implementation.cache_tag or "",
        sysconfig.get_config_var("EXT_SUFFIX") or "",
        platform.machine(),
        __version__,
        cffi.__version__,
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _valid_entry(entry: Path, compiler: str | None) -> Path | None:
    """The extension in ``entry`` when the manifest vouches for it, else None.

    With ``compiler`` given, an entry built by another compiler version is stale too.
    """
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        so = entry / manifest["extension"]
        if compiler is not None and manifest["compiler"] != compiler:
            return None
        if so.is_file() and _sha256(so) == manifest["sha256"]:
            return so
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _compile(source: str, cdef: str, module_name: str, cflags: Sequence[str], workdir: Path) -> Path:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.set_source(module_name, source, extra_compile_args=list(cflags))
    log = workdir / "compiler.log"
    try:
        # setuptools and the compiler write progress and warnings on the process's own file
        # descriptors; keep them out of the user's output and show them only on failure.
        with open(log, "w") as sink, _redirect_fds((1, 2), sink):
            built = ffi.compile(tmpdir=str(workdir), target=f"{module_name}.*", verbose=False)
    except Exception as exc:  # noqa: BLE001 - setuptools raises several unrelated types
        output = log.read_text(errors="replace").strip() if log.exists() else ""
        detail = output or str(exc).strip() or type(exc).__name__
        raise BuildError(f"the C compiler failed to build {module_name} with flags {' '.join(cflags)!r}:\n{detail}") from None
    return Path(built)


class _redirect_fds:
    """Point file descriptors at a file for a while (the compiler is a child process)."""

    def __init__(self, fds: Sequence[int], target):
        self.fds, self.target = fds, target

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = [os.dup(fd) for fd in self.fds]
        for fd in self.fds:
            os.dup2(self.target.fileno(), fd)

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip(self.fds, self.saved):
            os.dup2(saved, fd)
            os.close(saved)


def _publish(staging: Path, entry: Path, compiler: str) -> None:
    """Move a finished ``staging`` folder to ``entry``; whoever renames first wins."""
    try:
        os.rename(staging, entry)
        return
    except OSError:
        pass
    if _valid_entry(entry, compiler) is not None:
        return  # another process finished the same build first
    # A broken entry is in the way: move it aside (atomically), then try once more.
    graveyard = entry.with_name(f".{entry.name}.broken-{uuid.uuid4().hex}")
    try:
        os.rename(entry, graveyard)
    except OSError:
        pass
    try:
        os.rename(staging, entry)
    except OSError:
        if _valid_entry(entry, compiler) is None:
            raise
    shutil.rmtree(graveyard, ignore_errors=True)


def _load(so: Path, module_name: str):
    module = sys.modules.get(module_name)
    if module is None:
        loader = importlib.machinery.ExtensionFileLoader(module_name, str(so))
        spec = importlib.util.spec_from_file_location(module_name, str(so), loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        sys.modules[module_name] = module
    return module


def build_module(source: str, cdef: str, *, name: str, cflags: Sequence[str] | None = None) -> Built:
    """Compile ``source`` (declaring ``cdef`` to cffi), or load it from the cache."""
    flags = list(cflags) if cflags is not None else default_cflags()
    key = cache_key(source, cdef, flags)
    module_name = f"_gradc_{name}_{key}"
    root = cache_dir()
    entry = root / module_name
    cc = _compiler()
    compiler = compiler_identity(cc)
    so = _valid_entry(entry, compiler)
    if so is None:
        if compiler is None:
            raise BuildError(
                f"no C compiler found: gradc needs one to build kernels (looked for {cc.split()[0]!r}; "
                f"install gcc or clang, or set CC to your compiler)"
            )
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{module_name}.", dir=root))
        try:
            work = staging / "work"
            work.mkdir()
            built = _compile(source, cdef, module_name, flags, work)
            final = staging / built.name
            shutil.move(str(built), final)
            shutil.rmtree(work)
            (staging / f"{name}.c").write_text(source)
            manifest = {"extension": final.name, "sha256": _sha256(final), "compiler": compiler, "cflags": flags, "gradc": __version__}
            (staging / MANIFEST).write_text(json.dumps(manifest))
            _publish(staging, entry, compiler)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        so = _valid_entry(entry, compiler)
        if so is None:
            raise BuildError(f"the cache entry {entry} could not be written")
    module = _load(so, module_name)
    return Built(module.ffi, module.lib, so, module_name)
