"""Shared benchmark machinery: timing, hardware floor, and the summary table.

Each benchmark records its median in RESULTS (keyed by group and
implementation); at the end of the session a table puts every
implementation next to the eager reference, torch.compile of the reference
and the hardware floor measured in the same run.
"""

import os
import statistics
import time
from collections import defaultdict

import torch

QUICK = os.environ.get("REFIT_BENCH_QUICK", "") not in ("", "0")

# group -> {"floor_s": float, "impls": {name: median seconds}, "ratios": {label: (q1, median, q3)}}
RESULTS = defaultdict(lambda: {"floor_s": None, "note": "", "impls": {}, "ratios": {}})


def paired_ratios(fn, ref, rounds):
    """Times of ``fn`` over times of ``ref`` from calls made in pairs, the order alternating.

    On a shared machine a disturbance (another process, a cold cache) lasts
    many calls; the two calls of one pair see the same state, so their ratio
    holds where separate medians of each do not. Returns the per-pair ratios.
    """
    fn(), ref()
    ratios = []
    for r in range(rounds):
        first, second = (fn, ref) if r % 2 == 0 else (ref, fn)
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        t_fn, t_ref = (t1 - t0, t2 - t1) if r % 2 == 0 else (t2 - t1, t1 - t0)
        ratios.append(t_fn / t_ref)
    return ratios


def record_ratio(group, label, ratios):
    """Stores the quartiles of per-pair ratios (see paired_ratios) for the summary table."""
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    RESULTS[group]["ratios"][label] = (q1, med, q3)


def median_time(fn, repeat=15):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth_fixture():
    """Bytes per second that a large copy moves here (read + write), median of runs."""
    n = (8 if QUICK else 64) * 2**20
    src = torch.rand(n)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), repeat=5 if QUICK else 21)
    return 2 * n * src.element_size() / t


def record(benchmark, group, impl, floor_s=None, note="", baseline=None):
    """Stores the median of a finished benchmark for the summary table.

    ``baseline`` names the implementation of the group that every row is
    also compared with (for ops whose natural rival is not the reference).
    """
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: nothing was timed
        return
    entry = RESULTS[group]
    entry["impls"][impl] = stats.stats.median
    if floor_s is not None:
        entry["floor_s"] = floor_s
    if note:
        entry["note"] = note
    if baseline is not None:
        entry["baseline"] = baseline


def write_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("refit-kernels summary (medians; ratios are speed-ups)")
    for group, entry in RESULTS.items():
        tr.write_line(group + (f"   [{entry['note']}]" if entry["note"] else ""))
        impls = entry["impls"]
        eager = impls.get("reference")
        compiled = impls.get("reference-compiled")
        floor = entry["floor_s"]
        header = f"  {'implementation':<22}{'median ms':>11}{'vs eager':>10}{'vs compile':>12}{'/ floor':>9}"
        tr.write_line(header)
        for name, t in impls.items():
            cols = [f"  {name:<22}{t * 1e3:>11.2f}"]
            cols.append(f"{eager / t:>9.1f}x" if eager else f"{'-':>10}")
            cols.append(f"{compiled / t:>11.1f}x" if compiled else f"{'-':>12}")
            cols.append(f"{t / floor:>8.2f}x" if floor else f"{'-':>9}")
            tr.write_line("".join(cols))
        if floor:
            tr.write_line(f"  {'hardware floor':<22}{floor * 1e3:>11.2f}")
        for label, (q1, med, q3) in entry["ratios"].items():
            tr.write_line(f"  {label}, paired calls: median {med:.2f}x (quartiles {q1:.2f} .. {q3:.2f})")
        base = entry.get("baseline")
        if base in impls:
            tr.write_line(f"  speed-up over {base}: " + ", ".join(
                f"{name} {impls[base] / t:.1f}x" for name, t in impls.items() if name != base))
