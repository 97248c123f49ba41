"""The implementations measured side by side: gradc and its peers.

A peer's ``prepare(workload, threads, workdir)`` returns a ``Prepared``: ``call()`` does
one "loss and all gradients" evaluation as a user of that library would write it, from
inputs already in the library's own array type (converted once, outside the timing), and
returns the library's own result, which ``numpy()`` converts for the correctness check.
Peers other than gradc and NumPy are imported lazily and reported as unavailable when not
installed; ``workdir`` is where a peer may write files (CasADi's generated C).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import gradc
from gradc.blas import BlasError
from kernels import total
from workloads import Workload


class Unavailable(Exception):
    """The peer's library is not installed (or cannot run this workload)."""


@dataclass
class Prepared:
    call: Callable[[], object]
    numpy: Callable[[object], tuple]  # result -> (loss, [grads in wrt order])


# -- gradc -------------------------------------------------------------------------------


def compile_gradc(w: Workload, threads: int, backend: str = "c"):
    # Threads are opt-in at compile time: gradc gets as many as its peers (threads=1 is serial C).
    return gradc.compile(w.kernel, wrt=w.wrt, backend=backend, threads=threads)


def prepare_gradc(w: Workload, threads: int, workdir: Path) -> Prepared:
    k = compile_gradc(w, threads)
    args = list(w.inputs.values())
    return Prepared(lambda: k.value_and_grad(*args), lambda r: (r[0], list(r[1])))


def prepare_gradc_blas(w: Workload, threads: int, workdir: Path) -> Prepared:
    """gradc with ``backend="blas"``: large matrix products call OpenBLAS (the ``blas`` extra)."""
    try:
        k = compile_gradc(w, threads, backend="blas")
    except BlasError as exc:
        raise Unavailable(str(exc)) from exc
    args = list(w.inputs.values())
    return Prepared(lambda: k.value_and_grad(*args), lambda r: (r[0], list(r[1])))


def prepare_gradc_forward(w: Workload, threads: int, workdir: Path) -> Prepared:
    k = compile_gradc(w, threads)
    args = list(w.inputs.values())
    return Prepared(lambda: k(*args), lambda r: (r, []))


# -- hand-written NumPy -----------------------------------------------------------------


def prepare_numpy(w: Workload, threads: int, workdir: Path) -> Prepared:
    args = list(w.inputs.values())
    return Prepared(lambda: w.numpy_vg(*args), lambda r: r)


# -- PyTorch -----------------------------------------------------------------------------


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise Unavailable("torch is not installed") from exc
    return torch


def torch_loss(name: str, torch, inner_grad: str):
    """The loss of workload ``name`` on torch tensors.

    ``inner_grad`` says how the gradient penalty takes its inner gradient: "autograd"
    (``torch.autograd.grad(create_graph=True)``, as in PyTorch's tutorial) or "func"
    (``torch.func.grad``, which torch.compile can trace).
    """
    F = torch.nn.functional
    if name == "custom_layer":
        return lambda X, W: torch.sum(torch.sin(X @ W) ** 2)
    if name == "mlp":

        def mlp(X, W1, b1, W2, b2, Y):
            return torch.mean((torch.tanh(X @ W1 + b1) @ W2 + b2 - Y) ** 2)

        return mlp
    if name == "elementwise":
        return lambda x, y: torch.sum(F.softplus(x) * torch.sigmoid(y) + torch.exp(-x * x))
    if name == "gradient_penalty":

        def penalty(input, Wt, b, target):
            def linear(x):
                return x @ Wt.T + b

            mse = torch.mean((linear(input) - target) ** 2)
            if inner_grad == "func":
                g = torch.func.grad(lambda x: torch.sum(linear(x)))(input)
            else:
                g = torch.autograd.grad(torch.sum(linear(input)), input, create_graph=True)[0]
            return mse + torch.mean((torch.sqrt(torch.sum(g * g, dim=1)) - 1) ** 2)

        return penalty
    raise KeyError(name)


def _torch_prepare(w: Workload, threads: int, compiled: bool) -> Prepared:
    torch = _torch()
    torch.set_num_threads(threads)
    tensors = [torch.from_numpy(a.copy()) for a in w.inputs.values()]
    wrt = [tensors[i].requires_grad_() for i in w.wrt_index]
    if compiled:
        # torch.compile cannot run a double backward through a compiled graph, so the
        # gradient penalty compiles loss and gradients together with torch.func instead.
        if w.name == "gradient_penalty":
            vg = torch.compile(torch.func.grad_and_value(torch_loss(w.name, torch, "func"), argnums=tuple(w.wrt_index)), dynamic=False)
            detached = [t.detach() for t in tensors]

            def call():
                grads, loss = vg(*detached)
                return loss, grads

            return Prepared(call, lambda r: (r[0].item(), [g.numpy() for g in r[1]]))
        loss_fn = torch.compile(torch_loss(w.name, torch, "autograd"), dynamic=False)
    else:
        loss_fn = torch_loss(w.name, torch, "autograd")

    def call():
        loss = loss_fn(*tensors)
        return loss, torch.autograd.grad(loss, wrt)

    return Prepared(call, lambda r: (r[0].item(), [g.numpy() for g in r[1]]))


def prepare_torch(w: Workload, threads: int, workdir: Path) -> Prepared:
    return _torch_prepare(w, threads, compiled=False)


def prepare_torch_compile(w: Workload, threads: int, workdir: Path) -> Prepared:
    return _torch_prepare(w, threads, compiled=True)


# -- JAX ---------------------------------------------------------------------------------


def jax_loss(name: str, jax):
    jnp = jax.numpy
    if name == "custom_layer":
        return lambda X, W: jnp.sum(jnp.sin(X @ W) ** 2)
    if name == "mlp":
        return lambda X, W1, b1, W2, b2, Y: jnp.mean((jnp.tanh(X @ W1 + b1) @ W2 + b2 - Y) ** 2)
    if name == "elementwise":
        return lambda x, y: jnp.sum(jax.nn.softplus(x) * jax.nn.sigmoid(y) + jnp.exp(-x * x))
    if name == "gradient_penalty":

        def penalty(input, Wt, b, target):
            def linear(x):
                return x @ Wt.T + b

            mse = jnp.mean((linear(input) - target) ** 2)
            g = jax.grad(lambda x: jnp.sum(linear(x)))(input)
            return mse + jnp.mean((jnp.sqrt(jnp.sum(g * g, axis=1)) - 1) ** 2)

        return penalty
    raise KeyError(name)


def _jax():
    try:
        import jax
    except ImportError as exc:
        raise Unavailable("jax is not installed") from exc
    return jax


def prepare_jax(w: Workload, threads: int, workdir: Path) -> Prepared:
    jax = _jax()
    vg = jax.jit(jax.value_and_grad(jax_loss(w.name, jax), argnums=tuple(w.wrt_index)))
    args = [jax.device_put(a) for a in w.inputs.values()]

    def call():
        return jax.block_until_ready(vg(*args))

    return Prepared(call, lambda r: (float(r[0]), [np.asarray(g) for g in r[1]]))


# -- CasADi-generated C through ctypes ---------------------------------------------------
#
# CasADi matrices are column-major, so a row-major (r, c) NumPy array is, byte for byte, the
# CasADi matrix of its transpose (c, r).  Each loss below is written on those transposes;
# its gradients come out transposed too, which is again the NumPy layout.


def casadi_loss(name: str, cs, syms: list):
    if name == "custom_layer":
        Xt, Wt = syms
        return cs.sum1(cs.sum2(cs.sin(cs.mtimes(Wt, Xt)) ** 2))
    if name == "mlp":
        Xt, W1t, b1, W2t, b2, Yt = syms
        batch = Xt.shape[1]
        Ht = cs.tanh(cs.mtimes(W1t, Xt) + cs.repmat(b1, 1, batch))
        Rt = cs.mtimes(W2t, Ht) + cs.repmat(b2, 1, batch) - Yt
        return cs.sum1(cs.sum2(Rt**2)) / Rt.numel()
    if name == "elementwise":
        x, y = syms
        softplus = cs.fmax(x, 0) + cs.log1p(cs.exp(-cs.fabs(x)))
        return cs.sum1(softplus / (1 + cs.exp(-y)) + cs.exp(-x * x))
    if name == "gradient_penalty":
        inputt, WtT, b, targett = syms
        batch = inputt.shape[1]

        def linear(xt):
            return cs.mtimes(WtT.T, xt) + cs.repmat(b, 1, batch)

        Rt = linear(inputt) - targett
        mse = cs.sum1(cs.sum2(Rt**2)) / Rt.numel()
        g = cs.gradient(cs.sum1(cs.sum2(linear(inputt))), inputt)
        norms = cs.sqrt(cs.sum1(g * g))
        return mse + cs.sum2((norms - 1) ** 2) / batch
    if name == "total":
        return cs.sum1(syms[0])
    raise KeyError(name)


def _casadi():
    try:
        import casadi
    except ImportError as exc:
        raise Unavailable("casadi is not installed") from exc
    return casadi


def _casadi_symbols(cs, inputs: dict):
    return [cs.MX.sym(name, *(reversed(a.shape) if a.ndim == 2 else (a.size, 1))) for name, a in inputs.items()]


def build_casadi(cs, inputs: dict, outputs: Callable, workdir: Path):
    """Generate C for ``outputs(syms) -> [MX]``, build it with gradc's C flags, load it.

    Each build gets its own folder under ``workdir``: a loaded library cannot be replaced.
    """
    from gradc import build

    workdir = Path(tempfile.mkdtemp(dir=workdir))
    syms = _casadi_symbols(cs, inputs)
    f = cs.Function("bench", syms, outputs(syms))
    cg = cs.CodeGenerator("bench.c", {"casadi_real": "float", "casadi_int": "int"})
    cg.add(f)
    cg.generate(str(workdir) + os.sep)
    so = workdir / "bench.so"
    cc = os.environ.get("CC", "cc")
    cmd = [cc, *build.default_cflags(), "-shared", "-fPIC", "-o", str(so), str(workdir / "bench.c"), "-lm"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(so))
    fn = lib.bench
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int]
    return f, fn


class CasadiCall:
    """One call of the generated function: fresh outputs, a workspace kept between calls.

    The outputs are views into one new buffer per call, so the Python side costs one
    allocation and one pointer look-up, about as little as a ctypes call can.
    """

    def __init__(self, f, fn, inputs: list[np.ndarray], out_shapes: list[tuple]):
        self.fn = fn
        self.inputs = inputs  # kept alive: the argument table points into them
        sizes = [int(np.prod(s)) for s in out_shapes]
        self.offsets = np.cumsum([0, *sizes]).tolist()
        self.views = [(self.offsets[i], self.offsets[i + 1], s) for i, s in enumerate(out_shapes)]
        self.arg = (ctypes.c_void_p * f.sz_arg())(*(a.ctypes.data for a in inputs))
        self.res = (ctypes.c_void_p * f.sz_res())()
        self.iw = np.zeros(max(f.sz_iw(), 1), dtype=np.intc)
        self.w = np.zeros(max(f.sz_w(), 1), dtype=np.float32)
        self.iw_ptr, self.w_ptr = self.iw.ctypes.data, self.w.ctypes.data

    def __call__(self):
        buf = np.empty(self.offsets[-1], dtype=np.float32)
        base = buf.ctypes.data
        res = self.res
        for i, (start, _, _) in enumerate(self.views):
            res[i] = base + 4 * start
        if self.fn(self.arg, res, self.iw_ptr, self.w_ptr, 0) != 0:
            raise RuntimeError("the CasADi function returned an error")
        return [buf[start:stop].reshape(shape) for start, stop, shape in self.views]


def prepare_casadi(w: Workload, threads: int, workdir: Path) -> Prepared:
    cs = _casadi()

    def outputs(syms):
        loss = casadi_loss(w.name, cs, syms)
        return [loss, *(cs.gradient(loss, syms[i]) for i in w.wrt_index)]

    f, fn = build_casadi(cs, w.inputs, outputs, workdir)
    arrays = list(w.inputs.values())
    shapes = [(1,)] + [arrays[i].shape for i in w.wrt_index]
    call = CasadiCall(f, fn, arrays, shapes)
    return Prepared(call, lambda r: (float(r[0][0]), r[1:]))


PEERS: dict[str, Callable[[Workload, int, Path], Prepared]] = {
    "numpy": prepare_numpy,
    "torch": prepare_torch,
    "torch.compile": prepare_torch_compile,
    "jax": prepare_jax,
    "casadi": prepare_casadi,
}


# -- float32 sum of many terms, for the accuracy table ------------------------------------


def sums(x: np.ndarray, peers: list[str], workdir: Path) -> dict[str, Callable[[], float]]:
    """For gradc and each of ``peers`` that is installed, a function giving its float32 sum of ``x``."""
    out: dict[str, Callable[[], float]] = {"gradc": lambda: float(gradc.compile(total)(x))}
    if "numpy" in peers:
        out["numpy"] = lambda: float(np.sum(x))
    if "torch" in peers or "torch.compile" in peers:
        try:
            torch = _torch()
            out["torch"] = lambda: float(torch.sum(torch.from_numpy(x)))
        except Unavailable:
            pass
    if "jax" in peers:
        try:
            jax = _jax()
            out["jax"] = lambda: float(jax.jit(jax.numpy.sum)(x))
        except Unavailable:
            pass
    if "casadi" in peers:
        try:
            cs = _casadi()

            def casadi_sum():
                f, fn = build_casadi(cs, {"x": x}, lambda s: [casadi_loss("total", cs, s)], workdir)
                return float(CasadiCall(f, fn, [x], [(1,)])()[0][0])

            out["casadi"] = casadi_sum
        except Unavailable:
            pass
    return out
