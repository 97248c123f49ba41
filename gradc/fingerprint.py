"""A key for ``gradc.compile`` that is computed without tracing the kernel.

Tracing, differentiating and rendering C take a few hundred milliseconds even when the
binary is already in the cache, because the build cache is keyed by the C source.  This
module hashes what the C source is a function of instead: the kernel function's code, its
defaults and closure values, every global it (and every function it calls) reads, its
annotations, the compile options, gradc's own source and the versions of what it runs on.

A stale kernel is the worst possible result, so the key only describes values whose meaning
it can pin down: Python constants, NumPy arrays, plain functions (recursively), gradc's own
functions and the modules gradc, numpy and math.  Anything else (a class, an instance, a
user module) makes :func:`kernel_digest` return None, and the compiler trace the kernel on
every ``gradc.compile``.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import importlib.util
import inspect
import os
import platform
import sys
import sysconfig
import types
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__, build
from .dsl import Kernel, TensorType

#: Bumped whenever what the key covers changes, so old index records are never trusted.
FORMAT = "gradc-fingerprint-1"

_PACKAGE = Path(__file__).resolve().parent

#: Modules whose attributes a kernel may read: their behaviour is fixed by gradc's source and
#: the versions in :func:`_environment`, not by state the user can change.
_PURE_MODULES = ("gradc", "numpy", "math")

#: Past this depth a container is treated as something the key cannot describe.
_MAX_DEPTH = 32


class Unsupported(Exception):
    """A value the key cannot describe; the compiler falls back to tracing."""


def _is_pure_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in _PURE_MODULES)


@functools.lru_cache(maxsize=None)
def _is_gradc_file(filename: str) -> bool:
    return filename.endswith(".py") and Path(filename).resolve().parent == _PACKAGE


class _Hasher:
    """Feeds a description of Python values into one SHA-256, failing on what it cannot describe."""

    def __init__(self):
        self.h = hashlib.sha256()
        self.seen: dict[int, int] = {}  # id of a function already described -> its number

    def tag(self, *parts) -> None:
        for p in parts:
            data = p if isinstance(p, bytes) else str(p).encode()
            # Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
            self.h.update(len(data).to_bytes(8, "little"))
            self.h.update(data)

    def digest(self) -> str:
        return self.h.hexdigest()

    # -- values ------------------------------------------------------------------------
    def value(self, v, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            raise Unsupported("a container nested too deeply")
        t = type(v)
        if v is None or t in (bool, int, float, complex, str, bytes):
            self.tag(t.__name__, repr(v))
        elif t in (tuple, list):
            self.tag(t.__name__, len(v))
            for item in v:
                self.value(item, depth + 1)
        elif t is dict:
            self.tag("dict", len(v))
            for key, item in v.items():
                self.value(key, depth + 1)
                self.value(item, depth + 1)
        elif t is np.ndarray:
            if v.dtype.hasobject:
                raise Unsupported("a NumPy array of Python objects")
            self.tag("ndarray", v.dtype.str, v.shape, np.ascontiguousarray(v).tobytes())
        elif isinstance(v, np.generic) and not v.dtype.hasobject:
            self.tag("npscalar", v.dtype.str, v.tobytes())
        elif t is types.FunctionType:
            self.function(v)
        elif t is Kernel:
            self.kernel(v)
        elif t is types.ModuleType:
            if not _is_pure_module(v.__name__):
                raise Unsupported(f"module {v.__name__}")
            self.tag("module", v.__name__)
        else:
            self.named(v)

    def named(self, v) -> None:
        """A function, type or object that a pure module (or builtins) exports under its name."""
        module = getattr(v, "__module__", None)
        name = getattr(v, "__qualname__", None) or getattr(v, "__name__", None)
        if isinstance(module, str) and isinstance(name, str) and (module == "builtins" or _is_pure_module(module)):
            owner = sys.modules.get(module)
            if owner is not None and getattr(owner, name, None) is v:
                self.tag("named", module, name)
                return
        found = _gradc_exports().get(id(v))
        if found is not None and found[1] is v:
            self.tag("gradc", found[0])
            return
        raise Unsupported(f"a value of type {type(v).__name__}")

    # -- code ------------------------------------------------------------------------------
    def code(self, co: types.CodeType) -> None:
        # co_qualname and co_exceptiontable (where try blocks jump) are new in Python 3.11.
        self.tag(
            "code", co.co_name, getattr(co, "co_qualname", ""), co.co_filename, co.co_firstlineno, co.co_linetable,
            co.co_argcount, co.co_posonlyargcount, co.co_kwonlyargcount, co.co_flags, co.co_code,
            getattr(co, "co_exceptiontable", b""), co.co_names, co.co_varnames, co.co_freevars, co.co_cellvars,
            len(co.co_consts),
        )  # fmt: skip
        for c in co.co_consts:
            if isinstance(c, types.CodeType):
                self.code(c)
            else:
                self.constant(c)

    def constant(self, c) -> None:
        # Code constants are immutable: numbers, strings, bytes, None, Ellipsis, tuples and
        # frozensets of those.  A frozenset's order is its iteration order, as the code sees it.
        if isinstance(c, (tuple, frozenset)):
            self.tag(type(c).__name__, len(c))
            for item in c:
                self.constant(item)
        else:
            self.tag(type(c).__name__, repr(c))

    def function(self, f: types.FunctionType) -> None:
        number = self.seen.get(id(f))
        if number is not None:
            self.tag("ref", number)  # recursion, or a helper called twice
            return
        self.seen[id(f)] = len(self.seen)
        if _is_gradc_file(f.__code__.co_filename):
            # gradc's own code is covered by the source digest; what a gradc closure holds
            # (the user's function behind custom_gradient, grad's argnums) is not.
            self.tag("gradc-function", os.path.basename(f.__code__.co_filename), f.__code__.co_firstlineno, f.__code__.co_name)
            self.value(f.__defaults__)
            self.value(f.__kwdefaults__)
            self.closure(f)
            return
        self.tag("function")
        self.code(f.__code__)
        self.value(f.__defaults__)
        self.value(f.__kwdefaults__)
        self.closure(f)
        self.globals_read(f)

    def closure(self, f: types.FunctionType) -> None:
        for cell in f.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # a cell not yet assigned
                self.tag("empty-cell")
                continue
            self.value(contents)

    def globals_read(self, f: types.FunctionType) -> None:
        """Every name in ``co_names`` (of the function and the code nested in it) that is a global
        or a builtin.  ``co_names`` also holds attribute names; one that happens to name a global
        is described too, which can only make the key stricter."""
        names = sorted(_names(f.__code__))
        scope = f.__globals__
        for name in names:
            if name in scope:
                self.tag("global", name)
                self.value(scope[name])
            elif hasattr(builtins, name):
                self.tag("builtin", name)
                self.value(getattr(builtins, name))

    def kernel(self, k: Kernel) -> None:
        self.tag("kernel", k.name, repr(k.wrt))
        for p in k.params:
            self.annotation(p.name, p.type)
        self.function(k.fn)

    def annotation(self, name: str, t: TensorType) -> None:
        self.tag("param", name, t.dtype, len(t.dims))
        for d in t.dims:
            self.tag(type(d).__name__, d)


def _names(co: types.CodeType) -> set[str]:
    found = set(co.co_names)
    for c in co.co_consts:
        if isinstance(c, types.CodeType):
            found |= _names(c)
    return found


def _gradc_exports() -> dict[int, tuple[str, object]]:
    """gradc's public objects that are not functions or types (``gradc.f32``), by identity."""
    import gradc

    return {id(v): (f"gradc.{n}", v) for n, v in ((n, getattr(gradc, n)) for n in gradc.__all__)}


@functools.lru_cache(maxsize=None)
def _gradc_source_digest() -> str:
    """A hash of gradc's own code and C templates: a change to either can change the C.

    The version number alone would not do: it stays the same between releases."""
    h = hashlib.sha256()
    files = sorted(_PACKAGE.glob("*.py")) + sorted(build.templates_dir().glob("*.j2"))
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _package_identity(name: str) -> str:
    """Where an installed package lives and when it was written (a reinstall changes it),
    without importing it (importing a package just for its version costs milliseconds)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        return f"{name}:missing"
    st = os.stat(spec.origin)
    return f"{name}:{spec.origin}:{st.st_size}:{st.st_mtime_ns}"


@functools.lru_cache(maxsize=None)
def _environment() -> tuple:
    """What the key needs to know about this process's gradc, Python and libraries."""
    return (
        FORMAT,
        __version__,
        _gradc_source_digest(),
        sys.version,
        sys.implementation.cache_tag or "",
        sysconfig.get_config_var("EXT_SUFFIX") or "",
        platform.machine(),
        build.cpu_identity(),
        np.__version__,
        *(_package_identity(p) for p in ("sympy", "jinja2", "cffi")),
    )


def kernel_digest(k: Kernel) -> str | None:
    """A hash of everything tracing ``k`` depends on, or None when ``k`` reads something the
    key cannot describe (then it must be traced every time it is compiled)."""
    h = _Hasher()
    try:
        h.tag("source file", _source_text(k))
        h.kernel(k)
    except Unsupported:
        return None
    return h.digest()


def compile_key(digest: str, options: dict, cflags: Sequence[str]) -> str:
    """The index key of compiling the kernel of ``digest`` with ``options`` (the keyword
    arguments of :func:`gradc.compiler.lower`) and C flags ``cflags`` (defaults resolved).
    The C compiler is not in it: the index record names the one it was built with."""
    h = _Hasher()
    h.tag(*_environment())
    h.tag(digest, repr(sorted(options.items())), repr(list(cflags)))
    return h.digest()[:32]


def _source_text(k: Kernel) -> bytes:
    """The files that define the kernel: its source is printed in the C, comments and all (found
    through ``__wrapped__``, as :func:`inspect.getsource` does).  Whole files are cheaper to read
    than a function is to find in one."""
    functions = [k.fn, inspect.unwrap(k.fn)]
    files = dict.fromkeys(f.__code__.co_filename for f in functions if isinstance(getattr(f, "__code__", None), types.CodeType))
    text = b""
    for name in files:
        try:
            with open(name, "rb") as f:
                text += name.encode() + b"\0" + f.read() + b"\0"
        except OSError:
            pass  # defined in an interactive session: the code alone describes it
    return text
