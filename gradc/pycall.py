"""C entry points that Python calls directly, for the extension module only.

On small arrays the work around a kernel's C call (binding, checking, converting, the cffi
call itself) costs more than the kernel.  ``templates/pycall.c.j2`` generates, for each
kernel's ``forward`` and ``value_and_grad``, a C function that takes the positional arguments
as Python objects, checks them against the kernel's signature, allocates the outputs and
calls the kernel.  It accepts only arguments that need no conversion and whose shapes it can
prove valid; for anything else it returns None and :mod:`gradc.runtime` takes its Python
path, which converts arguments and words the errors.

The exported C (``gradc compile --emit c``, the package's ``.c``) never contains this code:
it is appended to the translation unit that cffi builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import sympy as sp

from . import codegen, ir
from .printer import IndexPrinter
from .runtime import DIRECT_ENTRIES, python_calls_name

_DESCRS = {"f32": "gradc_float32", "f64": "gradc_float64"}  # the dtypes, as templates/pycall.c.j2 names them
_CTYPES = {"f32": "float", "f64": "double"}


@dataclass
class Output:
    scalar: bool  # a 0-d value (not a gradient): written to a C variable, returned as a NumPy scalar like o[()]
    shape: list[str]  # C expressions over the named dimensions


@dataclass
class DirectEntry:
    suffix: str
    function: str  # the kernel's C function
    outputs: list[Output]
    arguments: list[str]  # of the C call, in the function's order: dimensions, inputs, outputs, workspace


def _index(expr) -> str:
    return IndexPrinter().doprint(sp.expand(expr))


def _shape_checks(params: Sequence[ir.Input]) -> list[str]:
    """C statements that bind each named dimension from the first axis carrying it and
    decline the call when another axis disagrees or a fixed extent differs."""
    lines, bound = [], set()
    for i, p in enumerate(params):
        for axis, extent in enumerate(p.shape):
            actual = f"PyArray_DIM(gradc_in[{i}], {axis})"
            if extent.is_Integer:
                lines.append(f"if ({actual} != {int(extent)}) Py_RETURN_NONE;  /* {p.param} */")
            elif extent.name in bound:
                lines.append(f"if ({actual} != {extent.name}) Py_RETURN_NONE;  /* {p.param} */")
            else:
                bound.add(extent.name)
                lines.append(f"{extent.name} = {actual};  /* {p.param} */")
    return lines


def _direct_entry(kernel: str, entry: codegen.Entry, dims: list[str], n_params: int, ctype: str) -> DirectEntry:
    # value_and_grad writes the value, then the gradients, which keep their parameter's shape even when 0-d.
    values = 1 if entry.suffix == "value_and_grad" else len(entry.outputs)
    outputs = [Output(node.rank == 0 and i < values, [_index(d) for d in node.shape]) for i, (_, node) in enumerate(entry.outputs)]
    inputs = [f"({ctype} *)PyArray_DATA(gradc_in[{i}])" for i in range(n_params)]
    results = [
        f"&gradc_value_{i}" if o.scalar else f"({ctype} *)PyArray_DATA((PyArrayObject *)gradc_res[{i}])" for i, o in enumerate(outputs)
    ]
    return DirectEntry(entry.suffix, f"{kernel}_{entry.suffix}", outputs, dims + inputs + results + ["gradc_ws"])


def _kernel_context(spec: codegen.KernelSpec, meta: dict) -> dict:
    by_suffix = {e.suffix: e for e in spec.entries}
    params = by_suffix["forward"].inputs
    ctype = _CTYPES[spec.dtype]
    entries = [_direct_entry(spec.name, by_suffix[s], list(spec.dims), len(params), ctype) for s in DIRECT_ENTRIES if s in by_suffix]
    return {
        "name": spec.name,
        "kernel": meta["kernel"],
        "ctype": ctype,
        "descr": _DESCRS[spec.dtype],
        "dims": list(spec.dims),
        "params": [p.param for p in params],
        "ranks": [p.rank for p in params],
        "shape_checks": _shape_checks(params),
        "invalid": [f"!({IndexPrinter().doprint(c)})" for c, _msg in spec.constraints],
        "entries": entries,
        "tuple_output": bool(meta["tuple_output"]),
        "wrt_single": bool(meta["wrt_single"]),
        "getter": python_calls_name(spec.name),
    }


def render(kernels: Sequence[tuple[codegen.KernelSpec, dict]], module: str) -> str:
    """The direct entry points of ``kernels`` (each a spec and its runtime metadata) as C."""
    return codegen.template("pycall.c.j2").render(
        module=module,
        numpy_version=np.__version__,
        kernels=[_kernel_context(spec, meta) for spec, meta in kernels],
    )


def cdef(kernels: Sequence[tuple[codegen.KernelSpec, dict]]) -> str:
    """cffi's declarations of the getters (the entry points themselves are reached through them)."""
    return "\n".join(f"void *{python_calls_name(spec.name)}(void);" for spec, _meta in kernels)


def build_options() -> dict:
    """What the extension needs to compile the direct entry points.

    They use NumPy's C API (its headers) and CPython's full API, not the limited one that
    cffi chooses by default, so the extension is tied to this Python's ABI; the cache key
    already includes it.
    """
    return {
        "include_dirs": [np.get_include()],
        "define_macros": [("_CFFI_NO_LIMITED_API", None)],
        "py_limited_api": False,
    }
