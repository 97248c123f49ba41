"""Gradient checking, like ``torch.autograd.gradcheck``: compiled gradients against finite differences.

The reference is always central differences of the kernel's forward pass compiled in
float64, whatever precision the checked gradients were computed in, so a check measures
the gradient code, not float32 rounding in the differences.  A kernel with a non-scalar
output is checked through a random cotangent (``vjp``), which checks every output at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .compiler import compile as compile_kernel
from .dsl import Kernel, kernel as as_kernel

#: (rtol, atol) by the precision of the gradients under test
TOLERANCES = {"f64": (1e-5, 1e-7), "f32": (2e-3, 2e-4)}


@dataclass
class Row:
    what: str
    checked: int  # elements compared
    max_abs: float
    max_rel: float
    passed: bool


@dataclass
class CheckResult:
    kernel: str
    dtype: str
    rows: list[Row] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def __bool__(self) -> bool:
        return self.passed

    def table(self) -> list[tuple[str, ...]]:
        head = ("parameter", "elements", "max abs error", "max rel error", "pass")
        return [head] + [(r.what, str(r.checked), f"{r.max_abs:.3g}", f"{r.max_rel:.3g}", "yes" if r.passed else "NO") for r in self.rows]

    def __str__(self) -> str:
        rows = self.table()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"{self.kernel} ({self.dtype}): {'passed' if self.passed else 'FAILED'}"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)


def _compare(what: str, got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> Row:
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    want = np.asarray(want, dtype=np.float64).reshape(-1)
    err = np.abs(got - want)
    rel = err / np.maximum(np.abs(want), atol)
    ok = bool(np.all(err <= atol + rtol * np.abs(want))) and bool(np.all(np.isfinite(got) == np.isfinite(want)))
    return Row(what, int(got.size), float(np.max(err, initial=0.0)), float(np.max(rel, initial=0.0)), ok)


def check_grad(
    fn,
    *arrays,
    wrt: str | Sequence[str] | None = None,
    dtype: str = "f64",
    second: bool = False,
    eps: float = 1e-6,
    rtol: float | None = None,
    atol: float | None = None,
    max_elements: int = 256,
    seed: int = 0,
) -> CheckResult:
    """Compare ``fn``'s compiled gradients at ``arrays`` with central finite differences.

    ``dtype`` is the precision of the gradients under test; ``second`` also checks a
    Hessian-vector product (scalar kernels) against differences of the gradient.  At most
    ``max_elements`` randomly chosen elements of each parameter are differenced.
    Returns a :class:`CheckResult`; ``result.passed`` says whether every check passed.
    """
    k: Kernel = fn if isinstance(fn, Kernel) else as_kernel(fn)
    default_rtol, default_atol = TOLERANCES[dtype]
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    # A string ("x" or "x,w") goes through as it is: compile splits it, where list() would split letters.
    under_test = compile_kernel(k, wrt=wrt if wrt is None or isinstance(wrt, str) else list(wrt), dtype=dtype)
    reference = compile_kernel(k, wrt=list(under_test.wrt), dtype="f64")
    rng = np.random.default_rng(seed)
    args = [np.array(a, dtype=np.float64) for a in arrays]
    scalar = "value_and_grad" in under_test.meta["entries"]
    outputs = reference(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    cotangents = [np.ones(()) if scalar else rng.standard_normal(np.shape(o)) for o in outputs]

    def objective(*xs) -> float:
        # <cotangent, f(x)>: its gradient is the vjp, so one scalar checks every output.
        outs = reference(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return float(sum(np.sum(c * np.asarray(o, dtype=np.float64)) for c, o in zip(cotangents, outs)))

    def gradients(kernel, xs) -> list[np.ndarray]:
        if scalar:
            g = kernel.grad(*xs)
        else:
            ct = tuple(cotangents) if kernel.meta["tuple_output"] else cotangents[0]
            g = kernel.vjp(*xs, ct)[1]
        return list(g) if isinstance(g, tuple) else [g]

    grads = gradients(under_test, args)
    index = [under_test.param_names.index(w) for w in under_test.wrt]
    result = CheckResult(k.name, dtype)
    for w, i, g in zip(under_test.wrt, index, grads):
        x = args[i]
        flat = np.arange(x.size)
        picked = flat if x.size <= max_elements else rng.choice(flat, max_elements, replace=False)
        fd = np.empty(len(picked))
        for n, e in enumerate(picked):
            at = np.unravel_index(e, x.shape)
            h = eps * max(1.0, abs(x[at]))
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[i][at] += h
            minus[i][at] -= h
            fd[n] = (objective(*plus) - objective(*minus)) / (2 * h)
        result.rows.append(_compare(w, np.asarray(g).reshape(-1)[picked], fd, rtol, atol))
    if second and scalar:
        vs = [rng.standard_normal(args[i].shape) for i in index]
        v_arg = tuple(vs) if not under_test.meta["wrt_single"] else vs[0]
        hv = under_test.hvp(*args, v_arg)
        hv = list(hv) if isinstance(hv, tuple) else [hv]
        h = eps * max(1.0, max(float(np.max(np.abs(args[i]), initial=0.0)) for i in index))

        def shifted(sign: float) -> list[np.ndarray]:
            xs = [a.copy() for a in args]
            for i, v in zip(index, vs):
                xs[i] = xs[i] + sign * h * v
            return gradients(reference, xs)

        plus, minus = shifted(1.0), shifted(-1.0)
        for w, got, p, m in zip(under_test.wrt, hv, plus, minus):
            result.rows.append(_compare(f"H·v ({w})", got, (p - m) / (2 * h), rtol, atol))
    return result
