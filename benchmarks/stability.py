"""Print the stability suite as a table: gradc against exact references, beside a tape.

    python benchmarks/stability.py              # every case
    python benchmarks/stability.py -k softmax   # only cases whose name contains "softmax"
    python benchmarks/stability.py --gradc-only # leave PyTorch and JAX out even if installed

The cases live in ``stability_cases.py``: classic functions at inputs where tape-based
autodiff overflows, cancels or returns NaN, each with a reference value and gradient from
an independent SymPy formula at 50 digits.  Two tables follow, one of values and one of
gradients, with a column per implementation:

- ``gradc f32`` / ``gradc f64``: gradc as compiled by default (stability rewrites on);
- ``stable=False f32`` / ``f64``: gradc with the rewrites off, which computes what the user
  wrote, as a tape would;
- ``torch f32`` / ``f64`` and ``jax f32`` / ``f64``: PyTorch's and JAX's autodiff on the
  same functions, when they are installed (the custom-gradient cases use
  ``torch.autograd.Function`` and ``jax.custom_vjp``).

A ``✗`` marks a result outside the suite's tolerance (relative 1e-5 in float32, 1e-12 in
float64, with the smallest normal number as an absolute floor; a NaN reference wants NaN).
The first run compiles about a hundred small kernels (a minute or so); later runs load them
from gradc's cache.
"""

import argparse
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradc  # noqa: E402
import stability_cases as cases  # noqa: E402

DTYPES = ("f32", "f64")


# ----------------------------------------------------------------------------- implementations
def gradc_runner(stable: bool):
    built = {}

    def run(case, dtype):
        key = (cases.kernel_key(case), dtype)
        if key not in built:
            built[key] = gradc.compile(cases.make_kernel(case, dtype), stable=stable)
        value, (grad,) = built[key].value_and_grad(cases.point(case, dtype))
        return float(value), np.asarray(grad, dtype=np.float64)

    return run


def torch_runner():
    import torch
    import torch.nn.functional as F

    class SafeNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            n = torch.sqrt(torch.sum(v * v))
            ctx.save_for_backward(v, n)
            return n

        @staticmethod
        def backward(ctx, upstream):
            v, n = ctx.saved_tensors
            return upstream * torch.where(n > 0, v / torch.where(n > 0, n, 1.0), 0.0)

    ops = SimpleNamespace(
        exp=torch.exp,
        log=torch.log,
        sqrt=torch.sqrt,
        sum=torch.sum,
        where=torch.where,
        sigmoid=torch.sigmoid,
        softplus=F.softplus,
        tanh=torch.tanh,
        cosh=torch.cosh,
        safe_norm=SafeNorm.apply,
    )
    types = {"f32": torch.float32, "f64": torch.float64}

    def run(case, dtype):
        x = torch.tensor(case.x, dtype=types[dtype], requires_grad=True)
        y = case.fn(ops, x)
        (grad,) = torch.autograd.grad(y, x)
        return float(y), grad.detach().numpy().astype(np.float64)

    return run


def jax_runner():
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    @jax.custom_vjp
    def safe_norm(v):
        return jnp.sqrt(jnp.sum(v * v))

    def forward(v):
        n = safe_norm(v)
        return n, (v, n)

    def backward(saved, upstream):
        v, n = saved
        return (upstream * jnp.where(n > 0, v / jnp.where(n > 0, n, 1.0), 0.0),)

    safe_norm.defvjp(forward, backward)
    ops = SimpleNamespace(
        exp=jnp.exp,
        log=jnp.log,
        sqrt=jnp.sqrt,
        sum=jnp.sum,
        where=jnp.where,
        sigmoid=jax.nn.sigmoid,
        softplus=jax.nn.softplus,
        tanh=jnp.tanh,
        cosh=jnp.cosh,
        safe_norm=safe_norm,
    )
    types = {"f32": jnp.float32, "f64": jnp.float64}

    def run(case, dtype):
        value, grad = jax.value_and_grad(lambda x: case.fn(ops, x))(jnp.asarray(case.x, dtype=types[dtype]))
        return float(value), np.asarray(grad, dtype=np.float64)

    return run


def implementations(peers: bool) -> tuple[list[tuple[str, str, object]], list[str]]:
    """``[(column, dtype, run)]`` for what is installed, and a note for each peer that is not."""
    columns, notes = [], []
    for label, runner in (("gradc", gradc_runner(True)), ("stable=False", gradc_runner(False))):
        columns += [(f"{label} {d}", d, runner) for d in DTYPES]
    for label, make in (("torch", torch_runner), ("jax", jax_runner)) if peers else ():
        try:
            runner = make()
        except ImportError:
            notes.append(f"{label}: not installed (pip install {label if label == 'jax' else 'torch'})")
            continue
        columns += [(f"{label} {d}", d, runner) for d in DTYPES]
    return columns, notes


# ----------------------------------------------------------------------------- formatting
def fmt(v, digits: int) -> str:
    v = np.asarray(v, dtype=np.float64)
    if v.ndim == 0:
        return f"{float(v):.{digits}g}"
    return "[" + ", ".join(f"{float(a):.{min(digits, 4)}g}" for a in v) + "]"


def fmt_input(x) -> str:
    return fmt(np.asarray(x), 6)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="pattern", default="", help="only the cases whose name contains this")
    parser.add_argument("--gradc-only", action="store_true", help="leave PyTorch and JAX out")
    args = parser.parse_args(argv)
    selected = [c for c in cases.CASES if args.pattern in c.name]
    if not selected:
        print(f"no case name contains {args.pattern!r}", file=sys.stderr)
        return 1
    columns, notes = implementations(peers=not args.gradc_only)
    print(f"running {len(selected)} cases on {len(columns)} implementations ...", file=sys.stderr)

    refs = {(c.name, d): cases.reference(c, d) for c in selected for d in DTYPES}
    results = {}
    for case in selected:
        for label, dtype, run in columns:
            try:
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    results[case.name, label] = run(case, dtype)
            except Exception as e:  # a peer that cannot run a case gets a cell saying so
                results[case.name, label] = f"error: {type(e).__name__}"

    console = Console(width=10_000, highlight=False, soft_wrap=True)
    passed = {label: 0 for label, _, _ in columns}
    tables = []
    for which, title in ((0, "values"), (1, "gradients")):
        table = Table(title=f"stability suite: {title}", box=box.SIMPLE, title_justify="left")
        for head in ["case", "input", "reference"] + [label for label, _, _ in columns]:
            table.add_column(head, no_wrap=True)
        for case in selected:
            ref = refs[case.name, "f64"]
            want = cases.as_float(ref[0]) if which == 0 else np.array([cases.as_float(g) for g in ref[1]]).reshape(case.shape)
            row = [case.name, fmt_input(case.x), fmt(want, 10)]
            for label, dtype, _ in columns:
                got = results[case.name, label]
                if isinstance(got, str):
                    row.append(got)
                    continue
                r = refs[case.name, dtype]
                expect = cases.as_float(r[0]) if which == 0 else [cases.as_float(g) for g in r[1]]
                ok = bool(cases.close(np.ravel(got[which]), np.ravel(expect), dtype).all())
                if which == 1:
                    passed[label] += ok and bool(cases.close(got[0], cases.as_float(r[0]), dtype))
                row.append(fmt(got[which], 7 if dtype == "f32" else 10) + ("" if ok else " ✗"))
            table.add_row(*(Text(cell) for cell in row))  # Text, as "[nan, nan]" would parse as markup
        tables.append(table)
    for table in tables:
        with console.capture() as captured:
            console.print(table)
        print("\n".join(line.rstrip() for line in captured.get().splitlines()))
    print("both value and gradient within tolerance:")
    for label, _, _ in columns:
        print(f"  {label:<18} {passed[label]:>3} / {len(selected)}")
    for note in notes:
        print(note)
    print("\nthe cases (reference: at the float64 input; f32 columns are checked against the float32 input's):")
    for case in selected:
        print(f"  {case.name:<24} {case.text:<32} {case.why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
