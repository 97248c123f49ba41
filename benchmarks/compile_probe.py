"""Compile or load one kernel in a fresh process and print what it took, as JSON.

``run.py`` starts this script once per measurement, so that nothing (SymPy's caches,
loaded extensions, gradc's in-process memo) carries over from an earlier compile:

    python compile_probe.py compile NAME ARGS...    # gradc.compile with $GRADC_CACHE_DIR as it is
    python compile_probe.py package DIR NAME NPZ    # import the package `gradc compile` wrote in DIR
    python compile_probe.py stages NAME ARGS...     # a cold compile, stage by stage (needs an empty cache)
    python compile_probe.py templates               # compile gradc's templates into $GRADC_CACHE_DIR

The process inherits the parent's CPU pinning and thread settings.  Besides wall-clock
seconds, ``cpu_s`` counts the CPU time of this process and of the C compiler it ran, which
other load on the machine disturbs much less.
"""

import hashlib
import json
import resource
import sys
import time


def _seconds(t0: float) -> float:
    return time.perf_counter() - t0


def _cpu() -> float:
    """CPU seconds used so far by this process and by the children it waited for (the compiler)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _children_cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime


def probe_compile(name: str, args: list[str]) -> dict:
    t0 = time.perf_counter()
    import gradc
    import workloads

    imported = _seconds(t0)
    w = workloads.FACTORIES[name](*map(int, args))
    t0, cpu0 = time.perf_counter(), _cpu()
    k = gradc.compile(w.kernel, wrt=w.wrt)
    compiled, cpu = _seconds(t0), _cpu() - cpu0
    t0 = time.perf_counter()
    k.value_and_grad(*w.inputs.values())
    return {
        "import_s": imported,
        "compile_s": compiled,
        "compile_cpu_s": cpu,
        "first_call_s": _seconds(t0),
        "c_source_sha256": hashlib.sha256(k.c_source.encode()).hexdigest(),
        "c_source_bytes": len(k.c_source),
    }


def probe_package(folder: str, name: str, npz: str) -> dict:
    import numpy as np

    inputs = np.load(npz)
    arrays = [inputs[key] for key in inputs.files]
    # The package is named after the kernels' file, which is also on sys.path beside this
    # script; the package folder goes first so that it is the one imported.
    sys.path.insert(0, folder)
    t0 = time.perf_counter()
    import kernels

    kernel = getattr(kernels, name)
    imported = _seconds(t0)
    t0 = time.perf_counter()
    kernel.value_and_grad(*arrays)
    return {"import_s": imported, "first_call_s": _seconds(t0), "imports_sympy": "sympy" in sys.modules}


def probe_templates() -> dict:
    """Compile every template of gradc into the cache, as any compile does on first use."""
    t0 = time.perf_counter()
    from gradc import build, codegen

    names = sorted(p.name for p in build.templates_dir().glob("*.j2"))
    for name in names:
        codegen.template(name)
    return {"templates": names, "seconds": _seconds(t0)}


def probe_stages(name: str, args: list[str]) -> dict:
    """Wall and CPU seconds of each stage of a cold ``gradc.compile``, run one stage at a time."""
    t0, cpu0 = time.perf_counter(), _cpu()
    import gradc
    import workloads
    from gradc import compiler

    stages = {"import": (_seconds(t0), _cpu() - cpu0)}
    w = workloads.FACTORIES[name](*map(int, args))

    def stage(label, fn):
        t0, cpu0, cc0 = time.perf_counter(), _cpu(), _children_cpu()
        value = fn()
        stages[label] = (_seconds(t0), _cpu() - cpu0)
        if _children_cpu() > cc0:
            stages[label + " (C compiler CPU)"] = (None, _children_cpu() - cc0)
        return value

    stage("trace", w.kernel.retrace)
    lowered = stage("fuse, stabilize, differentiate", lambda: compiler.lower(w.kernel, w.wrt, first_only=True))
    stage("schedule, CSE, render C, build", lambda: compiler.compile_many([lowered], lowered.spec.name))
    return {label: {"wall_s": wall, "cpu_s": cpu} for label, (wall, cpu) in stages.items()}


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    probes = {
        "compile": lambda: probe_compile(rest[0], rest[1:]),
        "stages": lambda: probe_stages(rest[0], rest[1:]),
        "templates": probe_templates,
    }
    result = probes[mode]() if mode in probes else probe_package(*rest)
    print(json.dumps(result))
