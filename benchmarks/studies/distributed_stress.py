"""Repeats the multi-process runs until they show they do not fail by chance.

    python -m benchmarks.studies.distributed_stress                      # 30 test runs, 20 finetune runs, control
    python -m benchmarks.studies.distributed_stress --tests 5 --finetunes 5 --control 0   # a quick look

Three loops, each in fresh processes, counting exits that are not 0:

* ``tests``: ``pytest tests/test_distributed.py`` (2-process gloo runs against
  one process, the command line under torchrun);
* ``finetunes``: ``torchrun --standalone --nproc_per_node 2 -m refit finetune``
  on a small synthetic model (pretrained once, in one process, first);
* ``control``: a 12-line script that trains one step with
  ``DistributedDataParallel`` on gloo and exits, the pattern refit used before
  (see ``refit.runtime.distributed.average_gradients``). It is expected to abort now
  and then ("terminate called without an active exception"); its failures
  show that the loop can see the abort at all on this machine.

Prints the counts, the last lines of every failure, and writes a JSON
summary with ``--json``. Each process gets ``OMP_NUM_THREADS=1``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.paths import ROOT, child_env

CONTROL = r"""
import torch, torch.distributed as dist
dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(10, 10))
model(torch.randn(4, 10)).sum().backward()
dist.destroy_process_group()
"""


def _env():
    env = child_env()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def _loop(name, n, make_cmd, cwd, timeout):
    fails, seconds = [], []
    for i in range(n):
        cmd = make_cmd(i)
        t0 = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=timeout)
            rc, text = out.returncode, out.stdout[-1500:] + out.stderr[-2500:]
        except subprocess.TimeoutExpired as exc:
            rc, text = "timeout", str(exc)
        seconds.append(time.perf_counter() - t0)
        if rc != 0:
            fails.append({"run": i, "returncode": rc, "tail": text})
        print(f"{name:10s} run {i + 1:3d}/{n}: {'ok' if rc == 0 else f'FAILED ({rc})'} "
              f"in {seconds[-1]:.1f} s", flush=True)
    return {"runs": n, "failures": len(fails), "failed_runs": fails,
            "median_s": sorted(seconds)[len(seconds) // 2] if seconds else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tests", type=int, default=30, help="runs of pytest tests/test_distributed.py")
    p.add_argument("--finetunes", type=int, default=20, help="runs of torchrun -m refit finetune")
    p.add_argument("--control", type=int, default=60, help="runs of the DistributedDataParallel control script")
    p.add_argument("--json", default=None, help="write the counts (and failure tails) here")
    args = p.parse_args(argv)

    results = {}
    with tempfile.TemporaryDirectory(prefix="refit-stress-") as tmp:
        if args.tests:
            results["tests"] = _loop(
                "tests", args.tests,
                lambda i: [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(ROOT, "tests", "test_distributed.py")], ROOT, 1200)
        if args.finetunes:
            subprocess.run([sys.executable, "-m", "refit", "-q", "pretrain", "--data", "synthetic", "--epochs", "2",
                            "--eval-every", "1", "--steps", "8", "--dims", "32,64", "--batch-size", "100",
                            "--out", "pre"], cwd=tmp, env=_env(), check=True, capture_output=True)
            ckpt = os.path.join(tmp, "pre", "best.pt")
            results["finetunes"] = _loop(
                "finetune", args.finetunes,
                lambda i: _torchrun("-m", "refit", "-q", "finetune", "--checkpoint", ckpt, "--iterations", "6",
                                    "--batch-size", "16", "--eval-every", "3", "--no-plot", "--out", f"ft{i}"),
                tmp, 600)
        if args.control:
            script = os.path.join(tmp, "ddp_control.py")
            with open(script, "w") as f:
                f.write(CONTROL)
            results["control"] = _loop("control", args.control, lambda i: _torchrun(script), tmp, 300)

    print()
    for name, r in results.items():
        print(f"{name:10s} {r['failures']} failed of {r['runs']} (median {r['median_s']:.1f} s per run)")
        for f in r["failed_runs"][:3]:
            print(f"  run {f['run']}: exit {f['returncode']}\n    " + "\n    ".join(f["tail"].strip().splitlines()[-6:]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    bad = {k: r["failures"] for k, r in results.items() if k != "control" and r["failures"]}
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
