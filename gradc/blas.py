"""The optional BLAS backend: which loop nests are matrix products, and which BLAS to link.

With ``backend="blas"`` a :class:`~gradc.ir.Map` that is a plain matrix product — ``out[i, j]
= c · Σ_k A[i, k] B[k, j]`` with either operand possibly transposed and read from a larger
row-major array — is computed by the BLAS ``gemm`` of the kernel's precision instead of a
generated loop nest.  Everything else (epilogues such as ``sin`` of the product, reductions of
other shapes, batched products) stays generated C, so a kernel is never wrong for want of a
BLAS routine, only slower.

The generated C declares the two CBLAS functions itself (no ``cblas.h`` needed) under the
names ``GRADC_CBLAS_SGEMM`` and ``GRADC_CBLAS_DGEMM``, which default to the standard
``cblas_sgemm``/``cblas_dgemm``; the build defines them to the prefixed names of the library
it links (``scipy_cblas_sgemm`` for the ``scipy-openblas32`` wheel).
"""

from __future__ import annotations

import ctypes.util
import importlib
from dataclasses import dataclass

import sympy as sp

from . import ir
from .errors import GradcError

BACKENDS = ("c", "blas")
#: Multiply-adds below which a product runs in the generated loops even with the BLAS: a
#: library call costs about a microsecond, which these loops spend on ~32^3 multiply-adds.
MIN_WORK = 32**3


class BlasError(GradcError):
    """``backend="blas"`` was asked for, but no usable BLAS library was found."""


@dataclass(frozen=True)
class Gemm:
    """``out = alpha · op(a) · op(b)``, row-major, as CBLAS takes it."""

    a: ir.Operand
    b: ir.Operand
    trans_a: bool
    trans_b: bool
    m: sp.Expr  # rows of out
    n: sp.Expr  # columns of out
    k: sp.Expr  # the reduction
    alpha: sp.Expr


def _axes(op: ir.Operand) -> tuple[int, int] | None:
    """The loop variables of a 2-d operand read plainly along both axes, else None."""
    if op.node.rank != 2 or not all(a.is_plain for a in op.index):
        return None
    return op.index[0].var, op.index[1].var


def as_gemm(node: ir.Map) -> Gemm | None:
    """The matrix product ``node`` computes, or None if it is anything else."""
    if node.reduce != "sum" or node.rank != 2 or len(node.loop) != 3 or not node.is_gather_form():
        return None
    if not all(a.is_plain for a in node.out_index) or len(node.operands) != 2:
        return None
    i, j = node.out_index[0].var, node.out_index[1].var
    (k,) = node.reduced_vars()
    first, second = node.operands
    alpha = sp.simplify(node.expr / (first.symbol * second.symbol))
    if alpha.free_symbols or not alpha.is_number or alpha == 0:
        return None
    axes = {id(op): _axes(op) for op in (first, second)}
    for a, b in ((first, second), (second, first)):
        ax_a, ax_b = axes[id(a)], axes[id(b)]
        if ax_a is None or ax_b is None:
            continue
        if set(ax_a) == {i, k} and set(ax_b) == {k, j}:
            return Gemm(a, b, ax_a == (k, i), ax_b == (j, k), node.loop[i], node.loop[j], node.loop[k], alpha)
    return None


@dataclass(frozen=True)
class Library:
    """A BLAS to link: where it is and what its CBLAS functions are called."""

    name: str  # for messages and the cache key
    library_dirs: tuple[str, ...]
    libraries: tuple[str, ...]
    prefix: str  # "scipy_" for scipy-openblas32's scipy_cblas_sgemm; "" for cblas_sgemm

    def defines(self) -> list[str]:
        return [f"-DGRADC_CBLAS_SGEMM={self.prefix}cblas_sgemm", f"-DGRADC_CBLAS_DGEMM={self.prefix}cblas_dgemm"]

    def link_args(self) -> list[str]:
        args = [f"-L{d}" for d in self.library_dirs] + [f"-l{lib}" for lib in self.libraries]
        # The extension must find the library when it is loaded, wherever it was installed.
        return args + [f"-Wl,-rpath,{d}" for d in self.library_dirs]


def find_library() -> Library:
    """The ``scipy-openblas32`` wheel (``pip install 'gradc[blas]'``) if installed, else a system
    OpenBLAS or CBLAS the C compiler can link."""
    try:
        wheel = importlib.import_module("scipy_openblas32")
    except ImportError:
        wheel = None
    if wheel is not None:
        return Library(f"scipy-openblas32 {getattr(wheel, '__version__', '')}".strip(), (wheel.get_lib_dir(),), (wheel.get_library(),), "scipy_")
    for lib in ("openblas", "cblas", "blis"):
        if ctypes.util.find_library(lib):
            return Library(lib, (), (lib,), "")
    raise BlasError(
        "backend='blas' needs a BLAS library: install the optional one with "
        "pip install 'gradc[blas]' (the scipy-openblas32 wheel), or install a system OpenBLAS "
        "(e.g. libopenblas-dev); backend='c' needs none"
    )
