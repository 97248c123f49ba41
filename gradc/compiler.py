"""The compiler driver: trace → fuse → differentiate → fuse/prune → C → native module.

Each stage is a function of the previous stage's value; this module only sequences them
and records, for the runtime, what each generated function takes and returns.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import textwrap
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import sympy as sp

from . import autodiff, blas, build, fingerprint, ir, rewrite
from .dsl import Kernel, Traced, kernel as as_kernel
from .errors import GradcError
from .runtime import CompiledKernel

# codegen (with Jinja), stability and pycall are imported where a kernel is lowered or built:
# a warm compile, which loads the kernel through the cache's index, needs none of them, and
# importing them takes several times as long as the load itself.
if TYPE_CHECKING:
    from . import codegen

DTYPES = ("f32", "f64")


@dataclass
class Lowered:
    """A kernel ready for code generation, plus what the runtime needs to call it."""

    spec: codegen.KernelSpec  # with the entry points that were asked for
    meta: dict  # with every entry point the kernel has
    traced: Traced


def _shape_strings(shape) -> list[str]:
    return [str(d) for d in shape]


def _compute_dtype(traced: Traced, dtype: str | None) -> str:
    if dtype is not None:
        if dtype not in DTYPES:
            raise GradcError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return dtype
    return "f64" if any(p.type.dtype == "f64" for p in traced.params) else "f32"


def _wrt_list(traced: Traced, wrt) -> tuple[list[str], bool]:
    names = [p.name for p in traced.params]
    if wrt is None:
        return names, False
    single = isinstance(wrt, str)
    wanted = [w.strip() for w in wrt.split(",")] if single else list(wrt)
    single = single and len(wanted) == 1
    for w in wanted:
        if w not in names:
            raise GradcError(
                f"kernel '{traced.kernel_name}' has no parameter {w!r} to differentiate with respect to "
                f"(parameters: {', '.join(names)})",
                filename=traced.source_file,
                lineno=traced.source_line,
            )
    if len(set(wanted)) != len(wanted):
        raise GradcError(f"wrt lists a parameter twice: {wanted}")
    return wanted, single


def _thread_count(threads) -> int:
    if threads is None:
        return 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise GradcError(f"threads must be a positive integer (or None for one thread), got {threads!r}")
    return threads


def _source_of(fn: Callable) -> str:
    try:
        return textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return ""


Progress = Callable[[str], None]


def _quiet(stage: str) -> None:
    pass


def lower(
    k: Kernel,
    wrt=None,
    dtype: str | None = None,
    *,
    name: str | None = None,
    prefix: str = "",
    stable: bool = True,
    backend: str = "c",
    threads: int | None = None,
    progress: Progress = _quiet,
    first_only: bool = False,
    traced: Traced | None = None,
) -> Lowered:
    """Trace ``k`` and build its entry points (forward, value_and_grad, vjp, jvp, hvp) as fused graphs.

    ``wrt=None`` takes the kernel's own default (``@gradc.kernel(wrt=...)``, else every
    parameter).  The C functions are called ``<prefix><name>_<entry>``.  With ``stable``
    (the default) the stability rewrites of :mod:`gradc.stability` run on the fused forward
    graph before it is differentiated.  ``backend="blas"`` lets large matrix products call the
    BLAS (:mod:`gradc.blas`).  ``threads=N`` (N > 1) shares large loops between N OpenMP
    threads.  ``progress(stage)`` is called as each stage starts.  With ``first_only``, only the
    entry points :func:`compile` builds at once are differentiated (see :func:`_first_entries`);
    ``meta["entries"]`` still names them all.  ``traced`` is a trace of ``k`` to lower instead of
    ``k.trace()`` (the one a compiled kernel was built from).
    """
    from . import codegen, stability

    threads = _thread_count(threads)
    if backend not in blas.BACKENDS:
        raise GradcError(f"backend must be one of {', '.join(map(repr, blas.BACKENDS))}, got {backend!r}")
    progress(f"tracing {name or k.name}")
    traced = traced if traced is not None else k.trace()
    graph = traced.graph
    dtype = _compute_dtype(traced, dtype)
    wrt_names, single = _wrt_list(traced, k.wrt if wrt is None else wrt)
    cname = codegen.Names().take(prefix + (name or k.name))
    params = graph.inputs
    by_name = {i.param: i for i in params}
    n_out = len(graph.outputs)
    fired: Counter = Counter()
    progress("fusing and applying stability rewrites")
    outs = rewrite.fuse(graph.outputs)
    if stable:
        outs = stability.stabilize(outs, fired)
    out_names = graph.output_names
    sig = ", ".join(p.name for p in traced.params)

    def shape_doc(nodes: Sequence[tuple[str, ir.Node]]) -> str:
        return ", ".join(f"{n}[{']['.join(map(str, node.shape))}]" if node.rank else f"{n} (scalar)" for n, node in nodes)

    def entry(suffix: str, inputs: list[ir.Input], names: list[str], nodes: list[ir.Node], what: str) -> codegen.Entry:
        progress(f"fusing {cname}_{suffix}")
        final = rewrite.fuse(rewrite.hoist(rewrite.prune(rewrite.fuse(nodes))))
        extra = [i for i in inputs if i not in params]
        doc = (
            f"{cname}_{suffix}: {what}.\n"
            f"Inputs:  {shape_doc([(i.param, i) for i in params + extra])}.\n"
            f"Outputs: {shape_doc(list(zip(names, final)))}."
        )
        return codegen.Entry(suffix, inputs, list(zip(names, final)), doc)

    call = f"{k.name}({sig})"
    scalar = n_out == 1 and graph.outputs[0].rank == 0
    suffixes = ["forward"]
    if wrt_names:
        suffixes += ["value_and_grad", "vjp", "jvp", "hvp"] if scalar else ["vjp", "jvp"]
    wanted = _first_entries(suffixes) if first_only else suffixes
    entries = [entry("forward", params, out_names, outs, f"{', '.join(out_names)} = {call}")]
    if wrt_names:
        progress("differentiating")
        wrt_nodes = [by_name[w] for w in wrt_names]
        grad_names = [f"d_{w}" for w in wrt_names]
        if "value_and_grad" in wanted:
            grads = autodiff.vjp(outs, [ir.constant(1)], wrt_nodes)
            what = f"{out_names[0]} = {call} and its gradients " + ", ".join(f"d_{w} = d{out_names[0]}/d{w}" for w in wrt_names)
            entries.append(entry("value_and_grad", params, out_names + grad_names, outs + grads, what))
        if "vjp" in wanted:
            cotangents = [ir.Input(f"ct_{n}", o.shape) for n, o in zip(out_names, graph.outputs)]
            grads = autodiff.vjp(outs, cotangents, wrt_nodes)
            what = (
                f"{', '.join(out_names)} = {call} and the vector-Jacobian products {', '.join(grad_names)}:\n"
                f"d_w = sum over every element e of every output o of ct_o[e] * do[e]/dw, for w in {', '.join(wrt_names)}"
            )
            entries.append(entry("vjp", params + cotangents, out_names + grad_names, outs + grads, what))
        if "jvp" in wanted:
            progress("differentiating in forward mode")
            tangents = [ir.Input(f"t_{w.param}", w.shape) for w in wrt_nodes]
            out_tangents = autodiff.jvp(outs, wrt_nodes, tangents)
            what = (
                f"{', '.join(out_names)} = {call} and the Jacobian-vector products (forward mode)\n"
                f"t_out = sum over w in {', '.join(wrt_names)} of dout/dw * t_w"
            )
            entries.append(entry("jvp", params + tangents, out_names + [f"t_{n}" for n in out_names], outs + out_tangents, what))
        if "hvp" in wanted:
            vs = [ir.Input(f"v_{w.param}", w.shape) for w in wrt_nodes]
            what = (
                f"the Hessian-vector products hv_w = sum over u in {', '.join(wrt_names)} of "
                f"d2{out_names[0]}/dw du * v_u of {call}"
            )
            entries.append(entry("hvp", params + vs, [f"hv_{w}" for w in wrt_names], _hvp(outs, wrt_nodes, vs), what))
    origin = f"{os.path.basename(traced.source_file)}:{traced.source_line}" if traced.source_file else ""
    spec = codegen.KernelSpec(
        name=cname,
        dtype=dtype,
        dims=traced.dims,
        constraints=traced.constraints,
        entries=entries,
        source=_source_of(k.fn),
        origin=origin,
        backend=backend,
        threads=threads,
    )
    meta = {
        "name": spec.name,
        "kernel": name or k.name,
        "dtype": dtype,
        "dims": traced.dims,
        "params": [{"name": p.name, "dtype": p.type.dtype, "dims": list(p.type.dims)} for p in traced.params],
        "constraints": [[str(c), msg] for c, msg in traced.constraints],
        "outputs": [{"name": n, "shape": _shape_strings(o.shape)} for n, o in zip(out_names, graph.outputs)],
        "tuple_output": traced.returns_tuple,
        "wrt": wrt_names,
        "stable": stable,
        "backend": backend,
        "threads": threads,
        "rewrites": dict(fired),
        "wrt_single": single,
        "entries": {suffix: f"{spec.name}_{suffix}" for suffix in suffixes},
    }
    return Lowered(spec, meta, traced)


def _hvp(outs: list[ir.Node], wrt: list[ir.Input], vs: list[ir.Input]) -> list[ir.Node]:
    """H·v by forward-over-reverse or reverse-over-reverse, whichever emits less work.

    Forward-over-reverse (a tangent pushed through the gradient graph) usually wins: it
    adds one fused tangent per gradient node and keeps no second backward sweep.
    Reverse-over-reverse can win when the gradient graph is much larger than the forward.
    """
    # Fused first, so that a select in the gradient (a custom gradient's where(x > 0, 0.5/sqrt(x), 0))
    # differentiates to a choice between derivatives, not to a mask times the Inf of the branch not taken.
    grads = rewrite.fuse(autodiff.vjp(outs, [ir.constant(1)], wrt))
    forward_over_reverse = autodiff.jvp(grads, wrt, vs)
    dots = [
        ir.Map((), g.shape, (), [(g, ir.identity_map(g.rank)), (v, ir.identity_map(v.rank))], lambda a, b: a * b, reduce="sum")
        for g, v in zip(grads, vs)
    ]
    g_dot_v = ir.elementwise((), [(d, ()) for d in dots], lambda *s: sp.Add(*s))
    reverse_over_reverse = autodiff.vjp([g_dot_v], [ir.constant(1)], wrt)
    return min(forward_over_reverse, reverse_over_reverse, key=lambda nodes: _work(rewrite.prune(rewrite.fuse(nodes))))


def _work(nodes: Sequence[ir.Node]) -> tuple[int, int]:
    """(loop nests, operations in their bodies): a size-independent measure of emitted work."""
    maps = [n for n in ir.topo_order(nodes) if isinstance(n, ir.Map)]
    return len(maps), sum(sp.count_ops(m.expr) for m in maps)


#: What :func:`compile` builds at once; the other entry points are built on first use, so a
#: first compile runs the C compiler over a third to a half of the code.
FIRST_ENTRIES = ("forward", "value_and_grad")


def _first_entries(entries: Sequence[str]) -> list[str]:
    """Which of a kernel's ``entries`` :func:`compile` builds at once."""
    # A kernel without value_and_grad (outputs that are not one scalar) is differentiated by vjp.
    wanted = FIRST_ENTRIES if "value_and_grad" in entries else ("forward", "vjp")
    return [e for e in entries if e in wanted]


def compile_many(
    lowered: Sequence[Lowered],
    module: str,
    *,
    cflags: Sequence[str] | None = None,
    progress: Progress = _quiet,
    prefix: str = "",
    entries: Sequence[str] | None = None,
):
    """Render and build the kernels ``lowered`` as one extension; with ``entries``, only those
    entry points (the Python calls of :mod:`gradc.pycall` come with ``forward``)."""
    from . import codegen, pycall

    specs = [l.spec for l in lowered]
    if entries is not None:
        specs = [dataclasses.replace(spec, entries=[e for e in spec.entries if e.suffix in entries]) for spec in specs]
    progress("generating C (common subexpressions)")
    rendered = codegen.render(specs, module, prefix=prefix, units=True)
    flags = list(cflags) if cflags else build.default_cflags()
    link_args: list[str] = []
    if any(l.spec.backend == "blas" for l in lowered):
        library = blas.find_library()
        flags += library.defines()
        link_args += library.link_args()
    if any(l.spec.threads > 1 for l in lowered):
        flags += build.OPENMP_FLAGS
        link_args += build.OPENMP_FLAGS
    progress("building with the C compiler (or loading from the cache)")
    # cffi's unit declares the kernels (they are compiled in units of their own), and gets
    # the direct calls from Python; the exported C never does.
    source, cdef = rendered.header, rendered.cdef
    if entries is None or "forward" in entries:
        kernels = [(spec, l.meta) for spec, l in zip(specs, lowered)]
        source += pycall.render(kernels, module)
        cdef += "\n" + pycall.cdef(kernels)
    built = build.build_module(source, cdef, name=module, cflags=flags, link_args=link_args, units=rendered.units)
    return rendered, built


_memo: dict[tuple, CompiledKernel] = {}

#: The digest (:func:`fingerprint.kernel_digest`) each kernel was last traced under in this
#: process: a trace made under another digest read other values of its globals or closure.
_traced_under: "weakref.WeakKeyDictionary[Kernel, str]" = weakref.WeakKeyDictionary()


def _trace_under(k: Kernel, digest: str) -> Traced:
    """``k``'s trace made while its fingerprint is ``digest``: traced again unless it already was."""
    if _traced_under.get(k) != digest:
        k.retrace()
        _traced_under[k] = digest
    return k.trace()


class _Compiled(CompiledKernel):
    """A kernel from :func:`compile`.  Its extension holds :data:`FIRST_ENTRIES`; the other
    entry points are built on first use.  The compiler's intermediate results with every entry
    point (for them, and for the views of :meth:`show`) are computed again on first use: the
    build differentiated only the first entry points, and a kernel loaded through the cache's
    index was not even traced.  They come from the trace the extension was built from
    (``traced``), or for a kernel loaded by its fingerprint ``digest``, from a trace made while
    the kernel still has that fingerprint: never from a later trace of a changed kernel."""

    def __init__(self, meta: dict, built, *, kernel: Kernel, options: dict, cflags, traced: Traced | None = None, digest: str | None = None):
        super().__init__(meta, built.ffi, built.lib, rest=self._build_rest)
        self.kernel = kernel
        self.module_name = built.module_name
        self._options = options
        self._cflags = cflags
        self._traced = traced
        self._digest = digest
        self._lowered: Lowered | None = None
        self._rendered: codegen.Rendered | None = None

    def _trace(self) -> Traced:
        if self._traced is None:
            if fingerprint.kernel_digest(self.kernel) != self._digest:
                raise GradcError(
                    f"kernel {self.name!r} has changed (a global or closure value it reads) since this compiled kernel "
                    f"was loaded, so its other entry points and its C cannot be made to match it: call "
                    f"gradc.compile on it again"
                )
            self._traced = _trace_under(self.kernel, self._digest)
        return self._traced

    @property
    def lowered(self) -> Lowered:
        if self._lowered is None:
            self._lowered = lower(self.kernel, **self._options, traced=self._trace())
        return self._lowered

    @property
    def rendered(self) -> codegen.Rendered:
        """Every entry point's C, as ``gradc compile --emit c`` writes it."""
        if self._rendered is None:
            from . import codegen

            self._rendered = codegen.render([self.lowered.spec], self.lowered.spec.name)
        return self._rendered

    @property
    def c_source(self) -> str:
        return self.rendered.c_source

    @property
    def header(self) -> str:
        return self.rendered.header

    def _build_rest(self):
        first = _first_entries(self.meta["entries"])
        rest = [e for e in self.meta["entries"] if e not in first]
        _, built = compile_many([self.lowered], self.lowered.spec.name, cflags=self._cflags, entries=rest)
        return built.ffi, built.lib


def _indexed(options: dict) -> bool:
    """Whether the cache's index may hold the kernel: a BLAS kernel's binary depends on the
    library found at build time, which the key does not describe (finding it is slow)."""
    return options["backend"] == "c"


def _load_indexed(k: Kernel, digest: str, key: str, options: dict, cflags: Sequence[str] | None = None) -> _Compiled | None:
    """The kernel the index records under ``key`` (of ``k`` with fingerprint ``digest``), or None
    (no record, or one that does not load)."""
    record = build.read_index(key)
    if record is None:
        return None
    built = build.load_indexed(record)
    if built is None:
        return None
    try:
        return _Compiled(record["meta"], built, kernel=k, options=options, cflags=cflags, digest=digest)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None  # a record that does not fit its extension: compile as if it were not there


def _compile_traced(k: Kernel, options: dict, cflags: Sequence[str] | None) -> _Compiled:
    """The full path: trace (or reuse ``k``'s trace), differentiate, render, build or load by C source."""
    lowered = lower(k, **options, first_only=True)
    _, built = compile_many([lowered], lowered.spec.name, cflags=cflags)
    return _Compiled(lowered.meta, built, kernel=k, options=options, cflags=cflags, traced=lowered.traced)


def compile(
    fn, wrt=None, dtype: str | None = None, *, cflags: Sequence[str] | None = None, stable: bool = True, backend: str = "c",
    threads: int | None = None,
) -> CompiledKernel:
    """Compile a ``@gradc.kernel`` (or an annotated function) into native kernels.

    ``wrt`` names the parameters to differentiate with respect to (default: all; a list
    gives gradients as a tuple, a single name gives one array).  ``dtype`` ("f32"/"f64")
    overrides the precision the annotations imply.  ``stable=False`` turns the stability
    rewrites off (to compare with what a tape would compute).  ``backend="blas"`` lets large
    matrix products call a BLAS (``pip install 'gradc[blas]'``; see :mod:`gradc.blas`); the
    default ``"c"`` needs nothing but the C library.  ``threads=N`` (N > 1) builds with OpenMP
    and shares each large loop nest between N threads; every call gives the same bits, for
    any N > 1 (a sum over a whole loop box, summed in fixed chunks, may differ from threads=1
    in its rounding).  None or 1: serial C without OpenMP.  Built once; later calls, in this
    process or another, load the module from the cache.
    """
    k = fn if isinstance(fn, Kernel) else as_kernel(fn)
    threads = _thread_count(threads)
    wrt = list(wrt) if isinstance(wrt, (list, tuple)) else wrt
    options = {"wrt": wrt, "dtype": dtype, "stable": stable, "backend": backend, "threads": threads}
    digest = fingerprint.kernel_digest(k)
    if digest is None:
        # The kernel reads something the key cannot describe, which may have changed since
        # an earlier compile in this process: trace again rather than risk a stale kernel.
        k.retrace()
        return _compile_traced(k, options, cflags)
    key = fingerprint.compile_key(digest, options, list(cflags) if cflags else build.default_cflags())
    cached = _memo.get((id(k), key))
    if cached is not None and cached.kernel is k:
        return cached
    compiled = _load_indexed(k, digest, key, options, cflags) if _indexed(options) else None
    if compiled is None:
        _trace_under(k, digest)
        compiled = _compile_traced(k, options, cflags)
        # A trace under a C profiler has generic names in its C: good for this process, but
        # not to be handed out as the kernel's build by its fingerprint.
        if _indexed(options) and compiled._traced.named:
            build.write_index(key, compiled.module_name, meta=compiled.meta)
    _memo[(id(k), key)] = compiled
    return compiled


def hessian(fn, *args, wrt=None, dtype: str | None = None, **kwargs):
    """The dense Hessian of a scalar kernel at ``args`` (see :meth:`CompiledKernel.hessian`)."""
    return compile(fn, wrt=wrt, dtype=dtype).hessian(*args, **kwargs)
