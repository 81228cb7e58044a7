"""The markdown summary of a benchmarks/gpu/gpu_check.sh run, from the files it left in $OUT.

    python -m benchmarks.gpu.gpu_report OUT PHASES_TSV MODE COMMAND

reads ``OUT/bench.json`` (pytest-benchmark, rows of benchmarks/gpu/gpu_bench.py),
``OUT/loops.json`` (benchmarks/gpu/gpu_loops.py), ``OUT/logs/info.txt`` and the
phase table (tab-separated: phase, status, seconds, budget, note), writes
``OUT/summary.md`` and prints it. The issue's targets are reported, never
asserted: a missed target is a finding, not a failure.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import OrderedDict


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def phases_table(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4:
                    rows.append(parts + [""] * (5 - len(parts)))
    out = ["| phase | status | seconds | budget (s) | note |", "| --- | --- | ---: | ---: | --- |"]
    total = 0.0
    for name, status, secs, budget, note in rows:
        total += float(secs or 0)
        out.append(f"| {name} | {status} | {float(secs or 0):.1f} | {budget} | {note} |")
    out.append(f"| **total** | | **{total:.1f}** | | |")
    return out, rows


def kernel_tables(bench, gpu: bool):
    if not bench:
        return ["(no benchmark results: the bench phase did not finish)"], []
    groups = OrderedDict()
    bw = None
    for b in bench.get("benchmarks", []):
        info = b.get("extra_info", {})
        if info.get("impl") == "copy":
            bw = info.get("bytes_per_s") or info["bytes"] / b["stats"]["median"]
            continue
        groups.setdefault(b["group"], []).append(b)
    out = []
    if bw:
        out.append(f"Copy bandwidth (device-to-device copy, bytes read + written): **{bw / 1e9:.0f} GB/s**.")
        out.append("")
    targets = []
    out += ["| benchmark | implementation | median ms | vs eager reference | vs torch.compile | "
            "of copy bandwidth | target |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for group, rows in groups.items():
        med = {r["extra_info"].get("impl", r["name"]): r["stats"]["median"] for r in rows}
        for r in rows:
            info = r["extra_info"]
            impl = info.get("impl", r["name"])
            t = r["stats"]["median"]
            eager, comp = med.get("reference"), med.get("reference-compiled")
            frac = info["bytes"] / t / bw if bw and info.get("bytes") else None
            target = ""
            kind = info.get("target")
            if kind == "bandwidth" and frac is not None:
                goal = info.get("target_fraction", 0.7)
                met = frac >= goal
                target = f"{'met' if met else 'missed'} (>= {goal:.0%} of copy bandwidth)"
                targets.append((group, impl, met, f"{frac:.0%} of copy bandwidth (target {goal:.0%})"))
            elif kind == "speedup" and med.get(info.get("versus")):
                goal = info.get("target_speedup")
                speed = med[info["versus"]] / t
                met = speed >= goal
                target = f"{'met' if met else 'missed'} (>= {goal:g}x {info['versus']})"
                targets.append((group, impl, met, f"{speed:.2f}x the vectorised PyTorch path (target {goal:g}x)"))
            out.append(f"| {group} | {impl} | {t * 1e3:.3f} | {eager / t:.2f}x | " if eager else
                       f"| {group} | {impl} | {t * 1e3:.3f} | - | ")
            out[-1] += (f"{comp / t:.2f}x | " if comp else "- | ") + (f"{frac:.0%} | " if frac is not None else "- | ")
            out[-1] += f"{target} |"
    if not gpu:
        out += ["", "(A CPU dry run: the cpu kernel stands in for the CUDA and Triton kernels and the targets are "
                "those of a GPU; these numbers only show that every row runs.)"]
    return out, targets


def loops_table(loops, gpu: bool):
    if not loops:
        return ["(no loop results: the loops phase did not finish)"], []
    out = ["| what | eager ms | graph ms | graph speed-up | more |", "| --- | ---: | ---: | ---: | --- |"]
    for r in loops.get("rows", []):
        eager, graph = r.get("eager_ms"), r.get("graph_ms")
        more = ", ".join(f"{k.replace('_ms', '')} {v} ms" for k, v in r.items()
                         if k not in ("what", "eager_ms", "graph_ms"))
        gain = f"{eager / graph:.2f}x" if eager and graph and gpu else "-"
        out.append(f"| {r['what']} | {eager if eager is not None else '-'} | {graph if graph is not None else '-'} "
                   f"| {gain} | {more} |")
    if not gpu:
        out += ["", "(Off a GPU, \"graph\" is the capture-safe loop run eagerly: the columns only show that it runs.)"]
    return out, loops.get("checks", [])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4:
        print("usage: python -m benchmarks.gpu.gpu_report OUT PHASES_TSV MODE COMMAND", file=sys.stderr)
        return 2
    out_dir, phases_path, mode, command = argv
    gpu = mode == "gpu"
    bench = _load(os.path.join(out_dir, "bench.json"))
    loops = _load(os.path.join(out_dir, "loops.json"))
    info_path = os.path.join(out_dir, "logs", "info.txt")
    info = open(info_path).read().strip().splitlines() if os.path.exists(info_path) else []
    phase_lines, phases = phases_table(phases_path)
    kernel_lines, targets = kernel_tables(bench, gpu)
    loop_lines, checks = loops_table(loops, gpu)
    failed = [p[0] for p in phases if p[1] not in ("ok", "skipped (dry run)")]
    device = (loops or {}).get("device_name") or ("GPU" if gpu else "CPU (dry run)")
    lines = [f"# GPU check: {device}" if gpu else "# GPU check, dry run on the CPU", "",
             f"Command: `{command}` ({'GPU run' if gpu else 'dry run: tiny shapes, no CUDA build, Triton interpreted'})",
             "", f"Result: **{'FAILED in ' + ', '.join(failed) if failed else 'every phase passed'}**", "",
             "## Where the time went", ""] + phase_lines
    tests_log = os.path.join(out_dir, "logs", "tests.log")
    if os.path.exists(tests_log):
        pattern = re.compile(r"^(gpu_check: |-m cuda: |=* ?\d+ (passed|failed|skipped|deselected)|\d+ Triton cases)")
        found = [line.strip().strip("=").strip() for line in open(tests_log) if pattern.match(line)]
        lines += ["", "## Tests", ""] + [f"- {line}" for line in found or ["(no pytest summary in logs/tests.log)"]]
    lines += ["", "## Targets (reported, not asserted)" if gpu else
              "## Targets (a GPU's; on this CPU dry run they only exercise the report)", ""]
    if targets:
        lines += [f"- {'met' if met else 'MISSED'}: {group}, {impl}: {what}" for group, impl, met, what in targets]
    else:
        lines.append("- none measured" + ("" if gpu else " (the CUDA and Triton rows exist only on a GPU)"))
    lines += ["", "## Kernels", ""] + kernel_lines
    lines += ["", "## Reverse loops and ReFiT iterations (refit.runtime.cudagraph)", ""] + loop_lines
    lines += ["", "## Checks", ""]
    lines += [f"- {'ok' if c['ok'] else 'FAILED'}: {c['name']}" + (f" ({c['detail']})" if c.get("detail") else "")
              for c in checks] or ["- none ran"]
    if info:
        lines += ["", "## Environment", "", "```"] + info[:60] + ["```"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
