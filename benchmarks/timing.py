"""Median call times, measured side by side.

Every implementation of one workload is calibrated, then sampled in interleaved rounds (one
sample of each per round), so that a change in the machine's load during the measurement
falls on all of them alike rather than on whichever happened to run then.  A sample is a
batch of back-to-back calls long enough for the clock's resolution not to matter; the
result is the median over samples of the time per call.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable

#: A sample lasts at least this long, so microsecond calls are timed in batches; it stays
#: short so that most samples fit in one scheduler time slice on a busy machine.
MIN_SAMPLE_S = 2e-4


@dataclass
class Plan:
    fn: Callable[[], object]
    inner: int  # calls per sample
    samples: int


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    samples: int
    calls_per_sample: int


def calibrate(fn: Callable[[], object], budget_s: float, min_samples: int, max_samples: int = 2000) -> Plan:
    """Warm ``fn`` up and choose a batch size and a sample count that fill ``budget_s``.

    The caller has already called ``fn`` once (to check its result).  Warming up for a
    tenth of the budget lets caches, allocators and lazy initialisation settle; the last
    warm-up call gives the per-call estimate.
    """
    warm_until = time.perf_counter() + budget_s / 10
    while True:
        t0 = time.perf_counter()
        fn()
        per_call = time.perf_counter() - t0
        if t0 + per_call > warm_until:
            break
    inner = max(1, int(MIN_SAMPLE_S / max(per_call, 1e-9)))
    samples = int(budget_s / (inner * per_call))
    return Plan(fn, inner, min(max(samples, min_samples), max_samples))


def _sample(plan: Plan) -> float:
    fn, inner = plan.fn, plan.inner
    t0 = time.perf_counter_ns()
    for _ in range(inner):
        fn()
    return (time.perf_counter_ns() - t0) / inner * 1e-9


def measure(plans: dict[str, Plan]) -> dict[str, Timing]:
    """Sample every plan in interleaved rounds until each has its sample count."""
    times: dict[str, list[float]] = {name: [] for name in plans}
    enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection triggered by one call would land on another
    try:
        while True:
            pending = [name for name, plan in plans.items() if len(times[name]) < plan.samples]
            if not pending:
                break
            for name in pending:
                times[name].append(_sample(plans[name]))
    finally:
        if enabled:
            gc.enable()
    return {
        name: Timing(statistics.median(t), min(t), max(t), len(t), plans[name].inner) for name, t in times.items()
    }
