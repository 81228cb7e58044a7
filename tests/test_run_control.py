"""How runs end: the last epoch evaluated, time budgets, signals, summaries, progress bars."""

import json
import os
import signal
import subprocess
import sys

import pytest

from refit.runtime import control
from refit.baselines import fit_baselines
from refit.data import load_dataset
from refit.families.diffrec.pretrain import PretrainConfig, pretrain
from refit.runtime.runs import load_checkpoint
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.run import finetune

DATA = {"n_users": 200, "n_items": 150}
SMALL = dict(data="synthetic", data_options=DATA, steps=8, batch_size=100, dims=(32, 64), progress=False)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **DATA)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("pre") / "run"
    pretrain(PretrainConfig(**SMALL, epochs=2, eval_every=1, out=str(out)), data)
    return str(out / "best.pt")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


# --- the last epoch is always evaluated -----------------------------------------------------------

def test_a_run_shorter_than_eval_every_still_ends_with_its_model(tmp_path, data):
    s = pretrain(PretrainConfig(**SMALL, epochs=2, eval_every=5, out=str(tmp_path / "run")), data)
    assert s["best_epoch"] == 2 and s["epochs_run"] == 2
    assert s["status"] == "finished" and s["stop_reason"] == "epochs" and not s["stopped_early"]
    assert os.path.exists(tmp_path / "run" / "best.pt")
    assert load_checkpoint(str(tmp_path / "run" / "best.pt"))["epoch"] == 2
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["epoch"] for r in records if "valid" in r] == [2]


def test_a_time_budget_stop_evaluates_names_itself_and_warns(tmp_path, data, caplog):
    # A budget that the first epoch alone exhausts: that epoch runs (nothing predicts its cost),
    # is evaluated and saved, and the run says why it stopped.
    s = pretrain(PretrainConfig(**SMALL, epochs=50, eval_every=5, patience=20, time_budget=1e-3,
                                out=str(tmp_path / "run")), data)
    assert s["stop_reason"] == "time_budget" and s["status"] == "finished" and s["stopped_early"]
    assert s["epochs_run"] == 1 and s["best_epoch"] == 1
    assert os.path.exists(tmp_path / "run" / "best.pt")
    assert any("before the first patience window" in w for w in s["warnings"])
    assert "before the first patience window" in caplog.text
    assert json.load(open(tmp_path / "run" / "summary.json"))["stop_reason"] == "time_budget"


def test_time_budget_predicts_the_next_unit(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(control.time, "perf_counter", lambda: now[0])
    budget = control.TimeBudget(10.0, started=100.0, spent_before=1.0)
    assert budget.next_fits()  # nothing measured yet: the first unit always runs
    for cost in (2.0, 1.0, 1.5):
        budget.record(cost)
    now[0] = 106.0  # 7 s spent (1 before the resume)
    assert budget.next_fits()  # 7 + 1.5 <= 10
    assert not budget.next_fits(extra=[2.0])  # 7 + 1.5 + 2 > 10: stop now, not after the overrun
    now[0] = 108.0
    assert not budget.next_fits()
    assert control.TimeBudget(None, started=0.0).next_fits(extra=[1e9])
    with pytest.raises(ValueError, match="time budget"):
        control.TimeBudget(0.0, started=0.0)


# --- signals ---------------------------------------------------------------------------------------

def test_sigterm_stops_pretraining_at_the_end_of_the_epoch(tmp_path, data, monkeypatch):
    calls = [0]
    real = control.Progress.update

    def update(self, n=1, **postfix):  # after epoch 1, as if `kill -TERM` came from outside
        calls[0] += 1
        if calls[0] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, n, **postfix)

    monkeypatch.setattr(control.Progress, "update", update)
    before = signal.getsignal(signal.SIGTERM)
    s = pretrain(PretrainConfig(**SMALL, epochs=30, eval_every=5, out=str(tmp_path / "run")), data)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    assert s["status"] == "stopped" and s["stop_reason"] == "SIGTERM"
    assert s["epochs_run"] == 2 and s["best_epoch"] == 2  # epoch 2 finished, evaluated and saved
    assert load_checkpoint(str(tmp_path / "run" / "last.pt"))["epoch"] == 2
    assert json.load(open(tmp_path / "run" / "summary.json"))["status"] == "stopped"


def test_sigterm_stops_finetune_with_a_summary_and_the_resume_command(pretrained, tmp_path):
    args = ["--checkpoint", pretrained, "--iterations", "40", "--batch-size", "16", "--eval-every", "4",
            "--checkpoint-every", "10", "--no-plot", "--out", str(tmp_path / "ft")]
    # The process signals itself when iteration 3 begins: a fixed point, no polling race.
    script = (
        "import os, signal, sys\n"
        "from refit import trainer\n"
        "step, calls = trainer.ReFiT.step, [0]\n"
        "def step_then_term(self):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return step(self)\n"
        "trainer.ReFiT.step = step_then_term\n"
        "from refit.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, "-q", "finetune", *args], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "--resume" in proc.stderr and "stopped by SIGTERM" in proc.stderr
    summary = json.load(open(tmp_path / "ft" / "summary.json"))
    assert summary["status"] == "stopped" and summary["stop_reason"] == "SIGTERM"
    assert summary["iterations"] == 3 and summary["iterations_planned"] == 40
    assert load_checkpoint(str(tmp_path / "ft" / "last.pt"))["iteration"] == 3  # saved although 3 % 10 != 0
    resumed = subprocess.run([sys.executable, "-m", "refit", "-q", "finetune", *args[:-2], "--iterations", "5",
                              "--out", str(tmp_path / "ft"), "--resume"], capture_output=True, text=True,
                             env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert json.load(open(tmp_path / "ft" / "summary.json"))["status"] == "finished"


def test_summary_is_current_at_every_evaluation(pretrained, tmp_path, data):
    cfg = FinetuneConfig(checkpoint=pretrained, iterations=10, batch_size=16, eval_every=2, checkpoint_every=2,
                         out=str(tmp_path / "ft"), progress=False, plot=False)
    finetune(cfg, data, max_iterations_this_run=5)  # as if killed during iteration 6
    summary = json.load(open(tmp_path / "ft" / "summary.json"))
    assert summary["status"] == "running" and summary["iterations"] == 4  # the evaluation at iteration 4


def test_stop_requests_outside_a_signal():
    with control.StopRequests() as stops:
        assert not stops.requested()
        stops._handler(signal.SIGINT, None)
        assert stops.requested() and stops.signal_name == "SIGINT" and stops.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            stops._handler(signal.SIGTERM, None)  # a second signal: at once


# --- progress bars ---------------------------------------------------------------------------------

def test_no_progress_bars_into_a_pipe_unless_asked(tmp_path):
    base = [sys.executable, "-m", "refit"]
    args = ["pretrain", "--data", "synthetic", "--epochs", "2", "--eval-every", "1", "--steps", "5",
            "--dims", "16,32", "--batch-size", "250"]
    quiet = subprocess.run(base + args + ["--out", "a"], capture_output=True, text=True, cwd=tmp_path, env=_env(),
                           timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "epoch/s" not in quiet.stderr and "s/epoch" not in quiet.stderr and "\r" not in quiet.stderr
    forced = subprocess.run(base + ["--progress"] + args + ["--out", "b"], capture_output=True, text=True,
                            cwd=tmp_path, env=_env(), timeout=300)
    assert forced.returncode == 0, forced.stderr
    assert "pretrain" in forced.stderr and "epoch" in forced.stderr
    assert not control.progress_enabled(False) and control.progress_enabled(True)


# --- baselines -------------------------------------------------------------------------------------

def test_a_grid_edge_choice_is_flagged(data, caplog):
    (knn,) = fit_baselines(data, ks=(20,), knn_grid=[1, 2], include=["itemknn"])
    # Either choice of a 2-value grid is an edge.
    assert len(knn.notes) == 1 and "of its grid" in knn.notes[0] and "extend the grid" in knn.notes[0]
    assert "of its grid" in caplog.text
    (one,) = fit_baselines(data, ks=(20,), ease_grid=[100.0], include=["ease"])
    assert one.notes == []  # a single value is no search
    # k at "every item" (n_items - 1) cannot be beaten by a larger k: no edge.
    (full,) = fit_baselines(data, ks=(20,), knn_grid=[5, 10_000], include=["itemknn"])
    assert full.params["k"] != DATA["n_items"] - 1 or full.notes == []


def test_cli_baselines_writes_its_file_by_default(tmp_path):
    out = subprocess.run([sys.executable, "-m", "refit", "-q", "baselines", "--data", "synthetic", "--knn-grid", "5",
                          "--ease-grid", "100", "--only", "most-popular,itemknn"], capture_output=True, text=True,
                         cwd=tmp_path, env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "runs" / "baselines-synthetic" / "baselines.json"
    assert path.exists() and str(path) in out.stdout
    assert json.load(open(path))["best"]
