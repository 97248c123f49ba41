"""Compile or load one kernel in a fresh process and print what it took, as JSON.

``run.py`` starts this script once per measurement, so that nothing (SymPy's caches,
loaded extensions, gradc's in-process memo) carries over from an earlier compile:

    python compile_probe.py compile NAME ARGS...    # gradc.compile with $GRADC_CACHE_DIR as it is
    python compile_probe.py package DIR NAME NPZ    # import the package `gradc compile` wrote in DIR

The process inherits the parent's CPU pinning and thread settings.
"""

import hashlib
import json
import sys
import time


def _seconds(t0: float) -> float:
    return time.perf_counter() - t0


def probe_compile(name: str, args: list[str]) -> dict:
    t0 = time.perf_counter()
    import gradc
    import workloads

    imported = _seconds(t0)
    w = workloads.FACTORIES[name](*map(int, args))
    t0 = time.perf_counter()
    k = gradc.compile(w.kernel, wrt=w.wrt)
    compiled = _seconds(t0)
    t0 = time.perf_counter()
    k.value_and_grad(*w.inputs.values())
    return {
        "import_s": imported,
        "compile_s": compiled,
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


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    result = probe_compile(rest[0], rest[1:]) if mode == "compile" else probe_package(*rest)
    print(json.dumps(result))
