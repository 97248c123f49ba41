"""Benchmark gradc against its peers on the workloads of issue 3, side by side.

    python benchmarks/run.py [--quick] [--threads 1] [--only NAME] [--peers numpy,jax,...]

Prints tables of median times and ratios, and writes ``results/latest.json`` and (with
matplotlib) ``results/latest.png`` beside this script.  ``benchmarks/README.md`` says what
each column means.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALL_PEERS = ["numpy", "torch", "torch.compile", "jax", "casadi"]
#: A peer whose loss or gradients differ from gradc's by more than this (normwise, relative)
#: is reported and not timed.  float32 sums of 10^6 terms in another order differ by ~1e-5,
#: a sequential float32 sum by up to ~4e-4; a wrong gradient differs by order one.
TOLERANCE = 1e-3


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: a short time budget per measurement")
    p.add_argument("--threads", type=int, default=1, help="threads (and CPUs) for every implementation (default 1)")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run only workloads whose name or label contains NAME (repeatable)")
    p.add_argument("--peers", default=",".join(ALL_PEERS), help=f"comma-separated peers to run (default: {','.join(ALL_PEERS)})")
    p.add_argument("--stat", choices=["median", "min"], default="median", help="statistic of the samples that the tables, ratios and plot use (both are in the JSON)")
    p.add_argument("--budget", type=float, help="seconds of sampling per measurement (default 0.5, --quick 0.05)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for latest.json and latest.png")
    args = p.parse_args(argv)
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    unknown = set(args.peers) - set(ALL_PEERS)
    if unknown:
        p.error(f"unknown peer(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_PEERS)}")
    if not 1 <= args.threads <= len(os.sched_getaffinity(0)):
        p.error(f"--threads must be between 1 and the {len(os.sched_getaffinity(0))} CPUs this process may use")
    if args.budget is None:
        args.budget = 0.05 if args.quick else 0.5
    return args


def pin(threads: int) -> list[int]:
    """Limit this process, every thread it starts and every process it runs to ``threads`` CPUs.

    Runs before NumPy, PyTorch or JAX is imported, because their thread pools size
    themselves when they start.  The thread-count variables cover OpenBLAS, OpenMP (torch,
    torch.compile's C++ kernels) and MKL; XLA ignores its thread flags in places, so the
    CPU affinity (the system call ``taskset`` makes) is what holds JAX to the same CPUs.
    Affinity is inherited by threads and child processes, so setting it here, before any
    of them exist, is the same as starting the benchmark under ``taskset -c``.
    """
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    return cpus


def thread_affinities() -> dict[str, int]:
    """How many of this process's threads may run on each CPU set (all should be pinned)."""
    counts: dict[str, int] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                cpus = line.split(":", 1)[1].strip()
                counts[cpus] = counts.get(cpus, 0) + 1
    return counts


# -- formatting -----------------------------------------------------------------------------


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if s >= scale or unit == "ns":
            return f"{s / scale:.3g} {unit}"
    raise AssertionError


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}×" if r < 10 else f"{r:.3g}×"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def cell(entry: dict, stat: str) -> str:
    status = entry["status"]
    if status == "ok" or status == "wrong":
        return fmt_time(entry["timing"][f"{stat}_s"]) + (" WRONG" if status == "wrong" else "")
    return {"unavailable": "not installed", "disagrees": "DISAGREES", "failed": "FAILED"}[status]


# -- the measurements -----------------------------------------------------------------------


def run_workload(w, peer_names: list[str], args, workdir: Path) -> dict:
    import numpy as np

    import peers
    import timing
    from workloads import reference, rel_error

    ref_loss, ref_grads = reference(w)
    makers = {"gradc": peers.prepare_gradc, "gradc forward": peers.prepare_gradc_forward, "gradc blas": peers.prepare_gradc_blas}
    makers.update({name: peers.PEERS[name] for name in peer_names})
    entries: dict[str, dict] = {}
    results: dict[str, tuple] = {}
    prepared = {}
    for name, make in makers.items():
        entry: dict = {"status": "ok"}
        entries[name] = entry
        t0 = time.perf_counter()
        try:
            p = make(w, args.threads, workdir)
            loss, grads = p.numpy(p.call())
        except peers.Unavailable as exc:
            entry.update(status="unavailable", detail=str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run this workload is reported, not fatal
            entry.update(status="failed", detail=f"{type(exc).__name__}: {exc}".strip()[:2000], traceback=traceback.format_exc()[-4000:])
            continue
        entry["prepare_s"] = time.perf_counter() - t0
        prepared[name] = p
        results[name] = (float(np.asarray(loss)), [np.asarray(g) for g in grads])

    # The float64 hand-written gradients decide whether gradc is right; if it is, every
    # peer is compared with gradc, otherwise with the float64 reference.
    want = [ref_loss, *ref_grads]
    baseline = want
    if "gradc" in results:
        got = results["gradc"]
        entries["gradc"]["err_vs_f64"] = rel_error([got[0], *got[1]], want)
        if entries["gradc"]["err_vs_f64"] > TOLERANCE:
            entries["gradc"]["status"] = "wrong"
            entries["gradc"]["detail"] = f"loss/gradients differ from the float64 reference by {entries['gradc']['err_vs_f64']:.2e} (normwise, relative)"
        else:
            baseline = [got[0], *got[1]]
    if "gradc forward" in results:
        err = rel_error([results["gradc forward"][0]], [baseline[0]])
        entries["gradc forward"]["err_vs_gradc"] = err
        if err > TOLERANCE:
            entries["gradc forward"]["status"] = "disagrees"
    for name in ["gradc blas", *peer_names]:
        if name in results:
            loss, grads = results[name]
            entries[name]["err_vs_f64"] = rel_error([loss, *grads], want)
            entries[name]["err_vs_gradc"] = err = rel_error([loss, *grads], baseline)
            if err > TOLERANCE:
                entries[name]["status"] = "disagrees"
                entries[name]["detail"] = f"loss/gradients differ from {'gradc' if baseline is not want else 'the float64 reference'} by {err:.2e} (normwise, relative)"

    timed = {name: p for name, p in prepared.items() if entries[name]["status"] in ("ok", "wrong")}
    plans = {name: timing.calibrate(p.call, args.budget, 1 if args.quick else 3) for name, p in timed.items()}
    for name, t in timing.measure(plans).items():
        entries[name]["timing"] = vars(t)

    def stat_of(name):
        return entries.get(name, {}).get("timing", {}).get(f"{args.stat}_s")

    g = stat_of("gradc")
    ratios = {name: (stat_of(name) / g if g and stat_of(name) else None) for name in peer_names}
    timed_peers = [n for n in peer_names if stat_of(n)]
    fastest = min(timed_peers, key=stat_of) if timed_peers else None
    return {
        "label": w.label,
        "name": w.name,
        "size": w.size,
        "args": list(w.args),
        "impls": entries,
        "speedup": ratios,  # peer time / gradc time: > 1 means gradc is faster
        "fastest_peer": fastest,
        "speedup_vs_fastest": ratios.get(fastest) if fastest else None,
        # The optional BLAS backend against the same fastest peer.
        "blas_speedup_vs_fastest": stat_of(fastest) / stat_of("gradc blas") if fastest and stat_of("gradc blas") else None,
        "vg_over_forward": g / stat_of("gradc forward") if g and stat_of("gradc forward") else None,
        "noise": max((e["timing"]["median_s"] / e["timing"]["min_s"] for e in entries.values() if "timing" in e), default=None),
    }


def probe(*argv: str, cache: Path, cpus: list[int] | None = None) -> dict:
    """Run ``compile_probe.py argv`` in a fresh process with ``cache`` as gradc's cache, on
    ``cpus`` (default: the CPUs this benchmark is pinned to)."""
    env = dict(os.environ, GRADC_CACHE_DIR=str(cache))
    # Python's bytecode cache on, as after pip install (compile_times compiles gradc's modules).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("GRADC_JOBS", None)  # one C compiler per CPU the probe runs on
    on_cpus = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    out = subprocess.run([sys.executable, str(HERE / "compile_probe.py"), *argv], env=env, capture_output=True, text=True, check=True, preexec_fn=on_cpus)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compile_times(workloads, workdir: Path, all_cpus: list[int]) -> dict:
    """Compile times, each in a fresh process with a cache folder of its own.

    ``cold`` compiles a kernel the cache does not hold, with gradc's templates already compiled
    into that cache (as after any earlier compile); ``cold_1cpu`` does the same on one CPU (the
    build runs one C compiler per CPU); ``empty_cache`` starts from an empty folder, so gradc's
    templates are compiled too, as on the first compile after installing.  The rest are loads:
    ``gradc.compile`` again with the kernel cached, and the package ``gradc compile`` writes.
    """
    import compileall

    import numpy as np

    import gradc

    compileall.compile_dir(str(Path(gradc.__file__).parent), quiet=1)

    def primed_cache() -> Path:
        cache = Path(tempfile.mkdtemp(dir=workdir))
        probe("templates", cache=cache)
        return cache

    rows = []
    first_of_each: dict = {}
    for w in workloads:
        first_of_each.setdefault(w.name, w)
    for w in first_of_each.values():
        row = {"kernel": w.name, "args": list(w.args), "cpus": len(all_cpus)}
        rows.append(row)
        args = (w.name, *map(str, w.args))
        try:
            row["cold"] = probe("compile", *args, cache=primed_cache(), cpus=all_cpus)
            row["cold_1cpu"] = probe("compile", *args, cache=primed_cache(), cpus=all_cpus[:1])
            cache = Path(tempfile.mkdtemp(dir=workdir))
            row["empty_cache"] = probe("compile", *args, cache=cache, cpus=all_cpus)
            row["cache_load"] = probe("compile", *args, cache=cache)
            package = Path(tempfile.mkdtemp(dir=workdir))
            cli = [sys.executable, "-c", "from gradc.cli import main; main()"]
            subprocess.run([*cli, "compile", str(HERE / "kernels.py"), "-k", w.name, "--wrt", ",".join(w.wrt), "-o", str(package)],
                           env=dict(os.environ, GRADC_CACHE_DIR=str(cache)), capture_output=True, text=True, check=True)
            npz = package / "inputs.npz"
            np.savez(npz, **w.inputs)
            row["package"] = probe("package", str(package), w.name, str(npz), cache=cache)
        except subprocess.CalledProcessError as exc:
            row["error"] = f"{' '.join(exc.cmd[-6:])}: {(exc.stderr or '').strip()[-2000:]}"
    named = {}
    if any(w.name == "elementwise" for w in workloads):
        for n in (10, 10**6):
            try:
                named[str(n)] = probe("compile", "elementwise", str(n), cache=primed_cache(), cpus=all_cpus)
            except subprocess.CalledProcessError as exc:
                named[str(n)] = {"error": (exc.stderr or "").strip()[-2000:]}
    return {"kernels": rows, "named_dims": named}


def sum_accuracy(peer_names: list[str], workdir: Path) -> dict:
    import numpy as np

    import peers

    n = 10**6
    x = np.random.default_rng(1).random(n, dtype=np.float32)
    exact = math.fsum(x.astype(np.float64).tolist())
    out = {"n": n, "exact": exact, "rel_error": {}}
    for name, fn in peers.sums(x, peer_names, workdir).items():
        try:
            out["rel_error"][name] = abs(fn() - exact) / exact
        except Exception as exc:  # noqa: BLE001 - reported in the table
            out["rel_error"][name] = f"{type(exc).__name__}: {exc}"[:500]
    return out


# -- report ---------------------------------------------------------------------------------


def report(res: dict, peer_names: list[str]) -> str:
    stat = res["meta"]["stat"]
    out = []
    rows = []
    for r in res["workloads"]:
        rows.append([r["label"], cell(r["impls"]["gradc"], stat), cell(r["impls"]["gradc blas"], stat), *(cell(r["impls"][p], stat) for p in peer_names)])
    m = res["meta"]
    out.append(f"{stat.capitalize()} time per call (loss + all gradients), float32, {m['threads']} thread(s) on CPU(s) "
               f"{m['cpus']}; gradc at {m['gradc_source'] or 'an unknown commit'}, {m['date']}")
    out.append(table(["workload", "gradc", "gradc blas", *peer_names], rows))
    rows = []
    for r in res["workloads"]:
        rows.append([r["label"], *(fmt_ratio(r["speedup"][p]) for p in peer_names), r["fastest_peer"] or "-",
                     fmt_ratio(r["speedup_vs_fastest"]), fmt_ratio(r.get("blas_speedup_vs_fastest")), fmt_ratio(r["vg_over_forward"]), fmt_ratio(r["noise"])])
    out.append(f"\nSpeed-up of gradc = peer time / gradc time ({stat}s; > 1: gradc is faster); "
               f"'blas vs fastest' is gradc with backend='blas'")
    out.append(table(["workload", *peer_names, "fastest peer", "vs fastest", "blas vs fastest", "gradc vg/fwd", "noise"], rows))

    comp = res.get("compile")
    if comp:
        rows = []
        for k in comp["kernels"]:
            if "error" in k:
                rows.append([k["kernel"], "FAILED", *[""] * 6])
                continue
            pkg = k["package"]
            rows.append([k["kernel"], *(fmt_time(k[m]["compile_s"]) for m in ("cold", "cold_1cpu", "empty_cache", "cache_load")),
                         fmt_time(pkg["import_s"]), "yes" if pkg["imports_sympy"] else "no", fmt_time(k["cold"]["import_s"])])
        cpus = comp["kernels"][0].get("cpus", "all") if comp["kernels"] else "all"
        out.append(f"\ngradc compile times, each in a fresh process with a cache of its own (cold: the kernel is not cached, "
                   f"gradc's templates are; empty cache: neither is; {cpus} CPUs unless marked)")
        out.append(table(["kernel", "cold compile", "cold, 1 CPU", "empty cache", "cache load", "package import", "pkg imports sympy", "import gradc"], rows))
        nd = comp["named_dims"]
        if "10" in nd and "error" not in nd["10"] and "error" not in nd.get(str(10**6), {"error": 1}):
            a, b = nd["10"], nd[str(10**6)]
            same = a["c_source_sha256"] == b["c_source_sha256"]
            out.append(f"elementwise, cold compile at n = 10: {fmt_time(a['compile_s'])}, at n = 10^6: {fmt_time(b['compile_s'])}; "
                       f"generated C identical: {'yes' if same else 'NO'} ({a['c_source_bytes']} bytes)")

    acc = res.get("sum_accuracy")
    if acc:
        rows = [[name, f"{e:.1e}" if isinstance(e, float) else "FAILED"] for name, e in acc["rel_error"].items()]
        out.append(f"\nfloat32 sum of {acc['n']:.0e} uniform [0, 1) terms, relative error against the exact sum")
        out.append(table(["implementation", "relative error"], rows))

    notes = []
    for r in res["workloads"]:
        for name, e in r["impls"].items():
            if e["status"] not in ("ok",) and e["status"] != "unavailable":
                notes.append(f"{r['label']}: {name} {e['status'].upper()}: {e.get('detail', '')}".rstrip(": "))
    for k in (comp or {}).get("kernels", []):
        if "error" in k:
            notes.append(f"compile times of {k['kernel']} FAILED: {k['error']}")
    unavailable = sorted({n for r in res["workloads"] for n, e in r["impls"].items() if e["status"] == "unavailable"})
    if unavailable:
        notes.append(f"not installed: {', '.join(unavailable)} (pip install '.[bench]')")
    pinned = ",".join(map(str, m["cpus"]))
    loose = {cpus: n for cpus, n in m["thread_affinities"].items() if cpus != pinned}
    if loose:
        notes.append(f"threads not pinned to CPU(s) {pinned}: {loose}")
    notes.append(f"load average {m['loadavg_start'][0]:.2f} at the start, {m['loadavg_end'][0]:.2f} at the end "
                 f"({m['cpu_count']} CPUs): other processes on the machine add noise to every median")
    out.append("\n" + "\n".join(f"note: {n}" for n in notes))
    return "\n".join(out)


def plot(res: dict, peer_names: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    labels = [r["label"] for r in res["workloads"]]
    series = {p: [r["speedup"].get(p) for r in res["workloads"]] for p in peer_names}
    series["fastest peer, gradc blas"] = [r.get("blas_speedup_vs_fastest") for r in res["workloads"]]
    series = {name: ys for name, ys in series.items() if any(ys)}
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(labels)), 5))
    width = 0.8 / max(len(series), 1)
    for i, (name, ys) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [y or float("nan") for y in ys], width, label=name, hatch="//" if "blas" in name else None)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_yscale("log")
    ratio = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×")
    ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=(2, 5)))
    ax.yaxis.set_major_formatter(ratio)
    ax.yaxis.set_minor_formatter(ratio)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(range(len(labels)), [l.replace(" ", "\n", 1) for l in labels], fontsize=8)
    ax.set_ylabel("peer time / gradc time  (> 1: gradc faster)")
    ax.set_title(f"gradc speed-up over each peer, float32, {res['meta']['threads']} thread(s), {res['meta']['date']}")
    ax.legend(fontsize=8, ncol=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("gradc", "numpy", "torch", "jax", "jaxlib", "casadi", "cffi", "sympy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def source_state() -> str | None:
    """The commit gradc was measured at, "+dirty" when gradc/ or templates/ differ from it."""
    def git(*argv):
        return subprocess.run(["git", *argv], cwd=HERE.parent, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "gradc", "templates")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    args = parse_args(argv)
    all_cpus = sorted(os.sched_getaffinity(0))
    cpus = pin(args.threads)
    # Imported only now that the thread settings and the affinity are in place.
    import gradc
    import gradc.build
    import workloads as wl

    selected = [w for w in wl.all_workloads() if not args.only or any(s in w.label for s in args.only)]
    if not selected:
        print(f"no workload matches {args.only}; labels: {[w.label for w in wl.all_workloads()]}", file=sys.stderr)
        return 2
    meta = {
        "command": " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "threads": args.threads,
        "cpus": cpus,
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "versions": versions(),
        "gradc_source": source_state(),
        "cflags": gradc.build.default_cflags(),
        "budget_s": args.budget,
        "stat": args.stat,
        "tolerance": TOLERANCE,
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "loadavg_start": os.getloadavg(),
    }
    res: dict = {"meta": meta, "workloads": []}
    with tempfile.TemporaryDirectory(prefix="gradc-bench-") as tmp:
        workdir = Path(tmp)
        # gradc's kernels build into a cache of this run's own: a stale or shared cache entry
        # cannot stand in for the code being measured.
        os.environ["GRADC_CACHE_DIR"] = str(workdir / "gradc-cache")
        for w in selected:
            print(f"measuring {w.label} ...", file=sys.stderr, flush=True)
            res["workloads"].append(run_workload(w, args.peers, args, workdir))
        print("measuring compile times ...", file=sys.stderr, flush=True)
        res["compile"] = compile_times(selected, workdir, all_cpus)
        print("measuring float32 sum accuracy ...", file=sys.stderr, flush=True)
        res["sum_accuracy"] = sum_accuracy(args.peers, workdir)
    meta["loadavg_end"] = os.getloadavg()
    meta["thread_affinities"] = thread_affinities()
    text = report(res, args.peers)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    if plot(res, args.peers, args.out / "latest.png"):
        print(f"\nwrote {args.out / 'latest.json'} and {args.out / 'latest.png'}")
    else:
        print(f"\nwrote {args.out / 'latest.json'} (no plot: matplotlib is not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
