"""benchmarks/gpu/gpu_check.sh, the one command a lent GPU runs: its dry run, so it cannot rot unseen.

The dry run takes every phase of the GPU run on the CPU with tiny shapes
(no CUDA build, Triton interpreted, the cpu kernel in the GPU kernels'
place, the capture-safe loops eagerly) and writes the same files. These
tests check that it passes, that what it leaves would come back from the
device machine (at most 8 files, one folder deep, plain names), that the
report holds every phase, benchmark group and loop row, and that a GPU run
without a GPU stops at once, as does a run out of time.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from _testing import benchmark_command, benchmark_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu", "gpu_check.sh")
PHASES = ["preflight", "build", "info", "tests", "bench", "loops"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="the script needs bash and coreutils' timeout")


def run_script(out, *args, timeout=600, **env):
    full = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    # The stand-in data: the GPU machine gets no ../shared/data, so that path is the one to keep working.
    proc = run_script(out, "--dry-run", REFIT_GPU_CHECK_STANDIN="1")
    return proc, out


@pytest.mark.slow
def test_dry_run_passes_every_phase(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    for phase in PHASES:
        assert re.search(rf"\] {phase}: ok in \d+ s", proc.stdout), f"phase {phase} did not pass:\n{proc.stdout}"
    assert "every phase passed" in proc.stdout


@pytest.mark.slow
def test_dry_run_files_would_come_back_from_the_device(dry_run):
    _, out = dry_run
    files = []
    for dirpath, _, names in os.walk(out):
        for name in names:
            files.append(os.path.relpath(os.path.join(dirpath, name), out))
    assert sorted(files) == sorted(["summary.md", "bench.json", "loops.json", "logs/info.txt", "logs/build.log",
                                    "logs/tests.log", "logs/bench.log", "logs/loops.log"])
    for f in files:
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in f.split(os.sep)), f
        assert f.count(os.sep) <= 1 and os.path.getsize(os.path.join(out, f)) < 16 * 2**20, f


@pytest.mark.slow
def test_dry_run_report_holds_every_row(dry_run):
    _, out = dry_run
    summary = open(os.path.join(out, "summary.md")).read()
    for phase in PHASES:
        assert re.search(rf"^\| {phase} \| ok \| [\d.]+ \|", summary, re.M), f"{phase} missing from the summary"
    bench = json.load(open(os.path.join(out, "bench.json")))
    groups = {b["group"].split(" ")[0] + " " + b["group"].split(" ")[1] for b in bench["benchmarks"]}
    assert groups >= {"copy bandwidth", "gaussian_logprob fwd+bwd", "policy_loss reinforce", "gather_rows plain", "gather_rows segmented",
                      "gather_rows plain-large", "topk_hits full", "topk_hits reward"}, groups
    impls = {b["extra_info"]["impl"] for b in bench["benchmarks"]}
    assert impls >= {"cpu", "reference", "reference-compiled", "dense", "copy"}, impls
    targets = [b for b in bench["benchmarks"] if b["extra_info"].get("target")]
    assert {b["extra_info"]["target"] for b in targets} == {"bandwidth", "speedup"}
    loops = json.load(open(os.path.join(out, "loops.json")))
    whats = " | ".join(r["what"] for r in loops["rows"])
    for needle in ("ReFiT iteration DiffRec B=8 fp32", "ReFiT iteration DiffRec B=8 bf16", "ReFiT sampling",
                   "hidden-space pass", "full-row pass", "evaluation end to end", "DreamRec evaluation sampler"):
        assert needle in whats, f"{needle!r} not among the loop rows: {whats}"
    assert all(r.get("eager_ms") and r.get("graph_ms") for r in loops["rows"])
    assert loops["checks"] and all(c["ok"] for c in loops["checks"]), loops["checks"]
    assert "## Targets" in summary and "## Reverse loops" in summary and "refit_kernels 0." in summary


def test_a_gpu_run_without_a_gpu_stops_at_the_preflight(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the GPU run would start building")
    proc = run_script(tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stdout
    assert "preflight: FAILED" in proc.stdout and "no CUDA device is visible" in proc.stdout
    assert "build: started" not in proc.stdout  # fails early: nothing is built
    assert "FAILED in preflight" in open(tmp_path / "summary.md").read()


def test_a_run_out_of_time_skips_what_is_left_and_still_reports(tmp_path):
    proc = run_script(tmp_path, "--dry-run", timeout=300, GPU_CHECK_DEADLINE_S="20")
    assert proc.returncode == 1
    assert "preflight: skipped, the deadline of 20 s is reached" in proc.stdout
    assert "skipped (deadline)" in open(tmp_path / "summary.md").read()


def test_unknown_arguments_are_refused(tmp_path):
    proc = run_script(tmp_path, "--gpu", timeout=60)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


# --- the report's reading of GPU rows (which a dry run has none of) -------------------------------------

def _row(group, impl, median_s, **info):
    return {"group": group, "name": f"test[{impl}]", "extra_info": {"impl": impl, **info},
            "stats": {"median": median_s}}


def test_report_judges_the_gpu_targets(tmp_path):
    bw = 4.0e12
    rows = [
        _row("copy bandwidth cuda", "copy", 2 * 2**30 / bw, bytes=2 * 2**30),
        # 0.2 GB at 4 TB/s is 50 us: 60 us is 83 % of the copy bandwidth, 100 us is 50 %.
        _row("glp", "cuda", 60e-6, bytes=0.2e9, target="bandwidth", target_fraction=0.7),
        _row("glp", "triton", 100e-6, bytes=0.2e9, target="bandwidth", target_fraction=0.7),
        _row("glp", "reference", 400e-6, bytes=0.2e9),
        _row("glp", "reference-compiled", 200e-6, bytes=0.2e9),
        _row("eval", "cuda", 1e-3, target="speedup", target_speedup=3.0, versus="reference"),
        _row("eval", "triton", 2e-3, target="speedup", target_speedup=3.0, versus="reference"),
        _row("eval", "reference", 4e-3),
    ]
    (tmp_path / "bench.json").write_text(json.dumps({"benchmarks": rows}))
    (tmp_path / "loops.json").write_text(json.dumps({"device_name": "NVIDIA H200", "rows": [
        {"what": "ReFiT sampling B=64 fp32", "eager_ms": 12.0, "graph_ms": 3.0}],
        "checks": [{"name": "no host sync inside the loop", "ok": True, "detail": ""}]}))
    phases = tmp_path / "phases.tsv"
    phases.write_text("preflight\tok\t3\t60\t\nbuild\tok\t80\t240\t\n")
    report, env = benchmark_command("gpu.gpu_report")
    out = subprocess.run([*report, str(tmp_path), str(phases), "gpu", "benchmarks/gpu/gpu_check.sh"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "summary.md").read_text()
    assert "# GPU check: NVIDIA H200" in text and "every phase passed" in text
    assert "- met: glp, cuda: 83% of copy bandwidth (target 70%)" in text
    assert "- MISSED: glp, triton: 50% of copy bandwidth (target 70%)" in text
    assert "- met: eval, cuda: 4.00x the vectorised PyTorch path (target 3x)" in text
    assert "- MISSED: eval, triton: 2.00x the vectorised PyTorch path (target 3x)" in text
    assert "| glp | cuda | 0.060 | 6.67x | 3.33x | 83% |" in text
    assert "| ReFiT sampling B=64 fp32 | 12.0 | 3.0 | 4.00x |" in text
    assert "| **total** | | **83.0** |" in text


def test_the_standin_data_has_the_published_sizes(tmp_path):
    gpu_data = benchmark_module("gpu.gpu_data")
    pairs = gpu_data.standin_pairs()
    assert {k: len(v) for k, v in pairs.items()} == gpu_data.SPLITS
    keys = [set((p[:, 0] * gpu_data.N_ITEMS + p[:, 1]).tolist()) for p in pairs.values()]
    assert sum(len(k) for k in keys) == sum(gpu_data.SPLITS.values()), "a pair repeats within or across splits"
    train = pairs["train"]
    assert train[:, 0].max() == gpu_data.N_USERS - 1 and train[:, 1].max() == gpu_data.N_ITEMS - 1
    assert train.min() >= 0


def test_the_gpu_pytest_plugin_skips_only_the_interpreter_only_failures(tmp_path):
    """On a GPU the triton backend refuses CPU tensors; tests written for the interpreter then fail for that
    reason alone. The plugin turns exactly those into counted skips; anything else still fails."""
    (tmp_path / "test_sample.py").write_text('''
import refit_kernels as rk

REFUSAL = ("gather_rows: the triton backend takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, "
           "set before triton is imported), got cpu")

def test_refused():
    raise rk.BackendUnavailable(REFUSAL)

def test_compared_and_refused():  # a fuzz test's comparison of the outcomes
    try:
        test_refused()
    except rk.BackendUnavailable as exc:
        raise AssertionError("gather_rows: only one of cpu, triton raised") from exc

def test_grouped():  # hypothesis reports distinct failures as a group
    raise ExceptionGroup("two failures", [ValueError("x"), rk.BackendUnavailable(REFUSAL)])

def test_triton_refuses_a_cpu_pointer():  # a registered triton op called with CPU tensors
    raise ValueError("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)")

def test_a_real_failure():
    assert 1 == 2

def test_passes():
    pass
''')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "benchmarks", "gpu"), ROOT]))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_pytest_plugin",
                          "-rfs", "test_sample.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "1 failed, 1 passed, 4 skipped" in out.stdout, out.stdout
    assert "FAILED test_sample.py::test_a_real_failure" in out.stdout
    assert "gpu_check: 4 interpreter-only Triton tests skipped" in out.stdout
    assert "interpreter-only Triton test: it hands the compiled triton backend CPU tensors" in out.stdout
