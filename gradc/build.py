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
import time
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

#: Added after the kernel's flags for cffi's unit, which holds only the Python glue (the
#: kernels are in units of their own): it compiles in 0.17 s instead of 0.23 s, and its
#: argument checks are as fast.
GLUE_CFLAGS = ("-O1",)

#: Compile and link flags of kernels built for several threads (``threads=N``, N > 1).
OPENMP_FLAGS = ("-fopenmp",)

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


@functools.lru_cache(maxsize=None)
def cpu_identity() -> str:
    """The processor's model and instruction-set flags: ``-march=native`` builds for them, so a
    cache folder shared between machines must not hand one machine's binary to another."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = {}
            for line in f:
                key, _, value = line.partition(":")
                lines.setdefault(key.strip(), value.strip())
                if "flags" in lines and "model name" in lines:
                    break
        # x86 says "flags", Arm "Features"
        return f"{lines.get('model name', '')} | {lines.get('flags') or lines.get('Features', '')}"
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cache_key(source: str, cdef: str, cflags: Sequence[str], link_args: Sequence[str] = (), units: Sequence[str] = ()) -> str:
    """A hash of what selects the binary.  The compiler's version is checked against the
    entry's manifest instead, so that a cached kernel loads on a machine without a compiler."""
    import cffi

    h = hashlib.sha256()
    for part in (
        source,
        cdef,
        str(len(units)),
        *units,
        " ".join(cflags),
        " ".join(GLUE_CFLAGS) if units else "",
        " ".join(link_args),
        sys.implementation.cache_tag or "",
        sysconfig.get_config_var("EXT_SUFFIX") or "",
        platform.machine(),
        cpu_identity(),
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


@functools.lru_cache(maxsize=None)
def openmp_supported(cc: str) -> bool:
    """The compiler builds and links a small OpenMP program into a shared library."""
    program = "#include <omp.h>\nint gradc_probe(void) { return omp_get_max_threads(); }\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text(program)
        cmd = cc.split() + [*OPENMP_FLAGS, "-shared", "-fPIC", str(src), "-o", str(Path(tmp) / "probe.so")]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


#: Where Linux states a container's CPU quota: cgroup v2's "quota period", v1's two files.
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CFS_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cpu_quota() -> int | None:
    """The CPUs a container's quota allows (rounded up), or None without a quota.  A container
    limited to one CPU still sees all of the host's in its affinity."""
    try:
        quota, period = CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = (path.read_text().strip() for path in CFS_QUOTA)
        except (OSError, ValueError):
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    if quota_us <= 0 or period_us <= 0:  # v1's -1: no quota
        return None
    return -(-quota_us // period_us)


def compile_jobs() -> int:
    """How many C compilers a build runs at once: ``$GRADC_JOBS``, else the CPUs this process may
    use (its affinity, and the container's CPU quota if there is one)."""
    env = os.environ.get("GRADC_JOBS")
    if env is not None:
        try:
            jobs = int(env)
        except ValueError:
            jobs = 0
        if jobs < 1:
            raise BuildError(f"GRADC_JOBS must be a whole number of C compilers to run at once, 1 or more; it is {env!r}")
        return jobs
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return min(cpus, cpu_quota() or cpus)


def _run_all(commands: Sequence[list[str]], order: Sequence[int], workdir: Path, jobs: int) -> dict[int, tuple[bool, str]]:
    """Run the compiler commands ``jobs`` at a time, in ``order``: whether each failed, and what
    it printed.  An exception here (Ctrl-C) kills the compilers still running, as
    ``subprocess.run`` does for one, and no other starts."""
    outcomes: dict[int, tuple[bool, str]] = {}
    waiting = list(order)
    running: dict[int, tuple[subprocess.Popen, object]] = {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                i = waiting.pop(0)
                # A file, not a pipe: a compiler with much to say never blocks on a full pipe.
                log = open(workdir / f"compiler-{i}.log", "w+")
                try:
                    running[i] = (subprocess.Popen(commands[i], cwd=workdir, stdout=log, stderr=subprocess.STDOUT), log)
                except OSError as exc:  # the compiler vanished, or cannot be run
                    log.close()
                    outcomes[i] = (True, str(exc))
            done = [i for i, (process, _) in running.items() if process.poll() is not None]
            if not done:
                time.sleep(0.002)
            for i in done:
                process, log = running.pop(i)
                log.seek(0)
                outcomes[i] = (process.returncode != 0, log.read().strip())
                log.close()
    finally:
        for process, log in running.values():
            process.kill()
            process.wait()
            log.close()
    return outcomes


def _compile(source: str, cdef: str, module_name: str, cflags: Sequence[str], link_args: Sequence[str], workdir: Path, units: Sequence[str] = ()) -> Path:
    """Build the extension: cffi's unit (``source`` and the Python glue) and each of ``units``
    compiled side by side, one compiler per CPU, then linked into one shared object."""
    import cffi
    from cffi.recompiler import make_c_source

    from . import pycall

    # The options cffi's set_source would pass to setuptools; _compile_command passes them to the compiler.
    options = {"extra_compile_args": list(cflags), "extra_link_args": list(link_args), **pycall.build_options()}
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    c_files = [workdir / f"{module_name}.c"]
    make_c_source(ffi, module_name, source, str(c_files[0]), verbose=False)
    for i, unit in enumerate(units):
        c_files.append(workdir / f"{module_name}_{i}.c")
        c_files[-1].write_text(unit)
    so = workdir / f"{module_name}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    objects = [c.with_suffix(".o") for c in c_files]
    glue = {**options, "extra_compile_args": [*options["extra_compile_args"], *GLUE_CFLAGS]} if units else options
    commands = [_compile_command(c, o, glue if i == 0 else options) for i, (c, o) in enumerate(zip(c_files, objects))]
    # The longest files first, so that no long compile starts last.
    order = sorted(range(len(commands)), key=lambda i: -c_files[i].stat().st_size)
    outcomes = _run_all(commands, order, workdir, compile_jobs())
    for i, c_file in enumerate(c_files):
        _check(outcomes[i], f"{module_name} (compiling {c_file.name})", cflags)
    (linked,) = _run_all([_link_command(objects, so, options)], [0], workdir, 1).values()
    _check(linked, f"{module_name} (linking)", cflags)
    return so


def _check(outcome: tuple[bool, str], what: str, cflags: Sequence[str]) -> None:
    """Raise a BuildError for a failed compiler command (an outcome of :func:`_run_all`)."""
    failed, detail = outcome
    if not failed:
        return
    if OPENMP_FLAGS[0] in cflags and not openmp_supported(_compiler()):
        raise BuildError(
            f"the C compiler {_compiler()!r} does not support OpenMP ({' '.join(OPENMP_FLAGS)}), which a kernel "
            f"compiled with threads > 1 needs: install its OpenMP runtime (libgomp for gcc, libomp for clang), "
            f"set CC to a compiler with OpenMP, or compile with threads=1"
        )
    detail = detail or f"{_compiler().split()[0]} failed without a message"
    raise BuildError(f"the C compiler failed to build {what} with flags {' '.join(cflags)!r}:\n{detail}")


#: What :func:`_compile_command` understands of cffi's ``set_source`` options (setuptools' Extension's).
_OPTIONS = {"extra_compile_args", "extra_link_args", "include_dirs", "define_macros", "library_dirs", "libraries", "py_limited_api"}


def _compile_command(c_file: Path, obj: Path, options: dict) -> list[str]:
    """The command that compiles one C file of a CPython extension, as setuptools would run it
    but without it: importing setuptools and going through distutils costs a few tenths of a
    second per build.  Python's own debugging and warning flags (``-g``, ``-Wall``) are left
    out; they make the compiler slower and the kernels no faster."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise BuildError(f"gradc cannot pass the extension option(s) {', '.join(sorted(unknown))} to the C compiler")
    includes = dict.fromkeys([sysconfig.get_paths()["include"], sysconfig.get_paths()["platinclude"], *options.get("include_dirs", ())])
    macros = [f"-D{name}" if value is None else f"-D{name}={value}" for name, value in options.get("define_macros", ())]
    pic = (sysconfig.get_config_var("CCSHARED") or "-fPIC").split()
    return [
        *_compiler().split(), *pic, "-DNDEBUG", "-fwrapv", *macros, *(f"-I{d}" for d in includes), "-c", str(c_file),
        "-o", str(obj), *options.get("extra_compile_args", ()),
    ]  # fmt: skip


def _link_command(objects: Sequence[Path], so: Path, options: dict) -> list[str]:
    """The command that links compiled objects into a loadable extension."""
    # LDSHARED is Python's own compiler and the flags that make a loadable extension on this platform.
    shared = (sysconfig.get_config_var("LDSHARED") or "cc -shared").split()[1:]
    return [
        *_compiler().split(), *shared, *map(str, objects), "-o", str(so), *(f"-L{d}" for d in options.get("library_dirs", ())),
        *(f"-l{lib}" for lib in options.get("libraries", ())), *options.get("extra_link_args", ()),
    ]  # fmt: skip


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


def build_module(
    source: str, cdef: str, *, name: str, cflags: Sequence[str] | None = None, link_args: Sequence[str] = (), units: Sequence[str] = ()
) -> Built:
    """Compile ``source`` (declaring ``cdef`` to cffi) with the C files ``units`` beside it and
    link them with ``link_args``, or load the extension from the cache."""
    flags = list(cflags) if cflags is not None else default_cflags()
    key = cache_key(source, cdef, flags, link_args, units)
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
            built = _compile(source, cdef, module_name, flags, link_args, work, units)
            final = staging / built.name
            shutil.move(str(built), final)
            shutil.rmtree(work)
            # What was compiled, for whoever looks inside the cache.
            (staging / f"{name}.c").write_text(source)
            for i, unit in enumerate(units):
                (staging / f"{name}_{i}.c").write_text(unit)
            manifest = {"extension": final.name, "sha256": _sha256(final), "compiler": compiler, "cflags": flags, "link_args": list(link_args), "gradc": __version__}
            (staging / MANIFEST).write_text(json.dumps(manifest))
            _publish(staging, entry, compiler)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        so = _valid_entry(entry, compiler)
        if so is None:
            raise BuildError(f"the cache entry {entry} could not be written")
    module = _load(so, module_name)
    return Built(module.ffi, module.lib, so, module_name)


# -- compiled templates ------------------------------------------------------------------------
#: The folder, inside the cache folder, of Jinja's compiled templates.
TEMPLATES = "templates"


def templates_dir() -> Path:
    """Installed, the templates are the package ``gradc.templates``; in a checkout, ``templates/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "kernel.c.j2").is_file():
            return candidate
    raise FileNotFoundError(f"gradc's C templates are missing (looked in {here / 'templates'} and {here.parent / 'templates'})")


@functools.lru_cache(maxsize=None)
def template_cache():
    """A Jinja bytecode cache in the cache folder (compiling gradc's templates takes a tenth of a
    second or more in every process that renders C), or None where the folder cannot be made.

    Jinja checks each stored template against its source's checksum; a file it cannot read
    counts as missing and one it cannot write is skipped, so the cache never fails a build."""
    import jinja2

    class TemplateCache(jinja2.FileSystemBytecodeCache):
        def load_bytecode(self, bucket) -> None:
            try:
                super().load_bytecode(bucket)
            except Exception:  # noqa: BLE001 - a damaged file raises whatever unpickling raises
                bucket.reset()

        def dump_bytecode(self, bucket) -> None:
            try:
                super().dump_bytecode(bucket)
            except OSError:
                pass

    folder = cache_dir() / TEMPLATES
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return TemplateCache(str(folder))


# -- the index: gradc.compile's key, computed without tracing, to the entry it built -----------
#: The index folder inside the cache folder: one JSON record per key.
INDEX = "index"

#: Bumped when the record's layout changes; a record of another format is ignored.
INDEX_FORMAT = 1


def compiler_stamp() -> str | None:
    """``$CC`` and the C compiler's resolved path, size and modification time, or None if it is missing.

    A cheap stand-in for :func:`compiler_identity` (which starts a process): a record made
    with another compiler is not trusted, and the full path checks the version line."""
    cc = _compiler()
    exe = shutil.which(cc.split()[0])
    if exe is None:
        return None
    real = os.path.realpath(exe)
    try:
        st = os.stat(real)
    except OSError:
        return None
    return f"{cc}:{real}:{st.st_size}:{st.st_mtime_ns}"  # CC as given too: "gcc -m32" is another compiler


def _index_path(key: str) -> Path:
    return cache_dir() / INDEX / f"{key}.json"


def read_index(key: str) -> dict | None:
    """The record stored under ``key``, or None if it is missing, damaged or of another format."""
    try:
        record = json.loads(_index_path(key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != INDEX_FORMAT:
        return None
    return record


def write_index(key: str, module_name: str, **fields) -> None:
    """Record that ``key`` compiles to the entry ``module_name``, with ``fields`` (JSON values).

    Written to a private file and renamed into place, so that a reader never sees half a record.
    The index only saves time: a cache folder that refuses the write costs the next process a
    trace, never a failure."""
    path = _index_path(key)
    record = {"format": INDEX_FORMAT, "module": module_name, "compiler": compiler_stamp(), **fields}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError:
        return


def load_indexed(record: dict) -> Built | None:
    """The extension an index record points to, if the entry is whole and was built by the
    compiler installed now (any entry, where no compiler is installed, as :func:`build_module`
    does); else None, and the caller compiles as if there were no record."""
    module_name = record.get("module")
    if not isinstance(module_name, str) or not module_name.startswith("_gradc_") or not module_name.isidentifier():
        return None
    stamp = compiler_stamp()
    if stamp is not None and record.get("compiler") != stamp:
        return None
    so = _valid_entry(cache_dir() / module_name, None)
    if so is None:
        return None
    try:
        module = _load(so, module_name)
    except ImportError:
        return None
    return Built(module.ffi, module.lib, so, module_name)
