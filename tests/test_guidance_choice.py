"""The guidance weight chosen on validation after a sequential run (``w_grid`` / ``--w-grid``): the rule on
planted validation metrics, the finished run's checkpoint and summary, what is left alone (last.pt, a
stopped run, ``w_grid=None``), refusals, and the command line."""

import json
import os
import subprocess
import sys

import pytest

from _testing import TINY_SEQ, benchmark_command, sigterm_after_first_evaluation
from refit.families.dreamrec import recommender as dreamrec_recommender
from refit.runtime.runs import load_checkpoint
from refit.families.dreamrec.recommender import SEQ_SELECTION, evaluate_dreamrec, select_guidance
from refit.families.dreamrec.pretrain import W_GRID, DreamRecConfig, load_seq_recommender, pretrain_dreamrec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(data="synthetic-seq", data_options=TINY_SEQ, hidden=16, steps=30, batch_size=32, eval_every=1,
             eval_batch_size=64, progress=False, lr=1e-3, ks=(10, 20), embedding_warmup="none", ce_weight=0.0)


class _Rec:
    w = 2.0


@pytest.mark.parametrize("planted, want", [
    ({0.0: 0.30, 1.0: 0.35, 2.0: 0.32}, 1.0),  # the best validation metric
    ({0.0: 0.30, 1.0: 0.32, 2.0: 0.32}, 2.0),  # a tie: the weight the network trained with
    ({0.0: 0.32, 1.0: 0.32, 2.0: 0.30}, 0.0),  # a tie without it: the smallest weight
])
def test_the_rule_on_planted_metrics(monkeypatch, planted, want):
    seen = []

    def fake(rec, data, splits, **kw):
        seen.append((rec.w, splits, kw["ks"]))
        return {"valid": {SEQ_SELECTION: planted[rec.w]}}

    monkeypatch.setattr(dreamrec_recommender, "evaluate_dreamrec", fake)
    rec = _Rec()
    w, values = select_guidance(rec, None, sorted(planted))
    assert w == want and values == planted
    assert rec.w == 2.0  # left as it was
    assert [s for _, s, _ in seen] == [("valid",)] * 3  # validation only, never test
    assert all(ks == (20,) for _, _, ks in seen)


def test_the_config_keeps_w_in_its_grid_and_refuses_bad_grids():
    assert DreamRecConfig(w=3.0, **SMALL).w_grid == tuple(sorted(set(W_GRID) | {3.0}))
    assert DreamRecConfig(w_grid=[1, 0.5, 1], **SMALL).w_grid == (0.5, 1.0, 2.0)
    assert DreamRecConfig(w_grid=None, **SMALL).w_grid is None
    for bad in ([], [-1.0], [float("nan")], [True], "0,1", [float("inf")]):
        with pytest.raises(ValueError, match="w_grid"):
            DreamRecConfig(w_grid=bad, **SMALL)


def test_a_finished_run_recommends_with_the_weight_validation_favours(tmp_path):
    out = str(tmp_path / "run")
    summary = pretrain_dreamrec(DreamRecConfig(out=out, epochs=3, w=2.0, w_grid=(0.0, 4.0), **SMALL))
    g = summary["guidance"]
    values = g[f"valid_{SEQ_SELECTION}"]
    assert set(values) == {"0", "2", "4"} and g["trained_w"] == 2.0
    assert values[f"{g['w']:g}"] == max(values.values())
    # best.pt recommends with it, and the summary's metrics are that model's own (re-evaluated from the file)
    best = load_checkpoint(os.path.join(out, "best.pt"))
    assert best["recommender"]["inference"]["w"] == g["w"]
    rec, data, _ = load_seq_recommender(os.path.join(out, "best.pt"))
    again = evaluate_dreamrec(rec, data, ks=(10, 20), batch_size=64, seed=1)
    assert again["valid"] == pytest.approx(summary["valid"]) and again["test"] == pytest.approx(summary["test"])
    assert summary["valid"][SEQ_SELECTION] == pytest.approx(values[f"{g['w']:g}"])
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["guidance"]["w"] == g["w"]
    # last.pt keeps the training state: the weight the network trained with
    assert load_checkpoint(os.path.join(out, "last.pt"))["recommender"]["inference"]["w"] == 2.0


def test_a_stopped_run_chooses_when_resumed_to_its_end(tmp_path, monkeypatch):
    """A run stopped by SIGTERM keeps the weight it trained with; resumed to its end, it chooses as a run
    never stopped does."""
    import refit.evaluate as evaluation

    cfg = dict(SMALL, epochs=3, w=2.0, w_grid=(0.0, 4.0))
    full = pretrain_dreamrec(DreamRecConfig(**cfg, out=str(tmp_path / "full")))
    real = sigterm_after_first_evaluation(monkeypatch)
    part = pretrain_dreamrec(DreamRecConfig(**cfg, out=str(tmp_path / "part")))
    assert part["status"] == "stopped" and "guidance" not in part
    assert load_checkpoint(str(tmp_path / "part" / "best.pt"))["recommender"]["inference"]["w"] == 2.0
    monkeypatch.setattr(evaluation, "evaluate_sequences", real)
    again = pretrain_dreamrec(DreamRecConfig(**cfg, out=str(tmp_path / "part")), resume=True)
    assert again["guidance"]["w"] == full["guidance"]["w"]
    assert again["guidance"][f"valid_{SEQ_SELECTION}"] == full["guidance"][f"valid_{SEQ_SELECTION}"]
    assert again["test"] == full["test"]


def test_without_a_grid_the_run_recommends_with_w(tmp_path):
    out = str(tmp_path / "run")
    summary = pretrain_dreamrec(DreamRecConfig(out=out, epochs=2, w=1.0, w_grid=None, **SMALL))
    assert "guidance" not in summary
    assert load_checkpoint(os.path.join(out, "best.pt"))["recommender"]["inference"]["w"] == 1.0


def test_the_command_line(tmp_path):
    def refit(*args):
        return subprocess.run([sys.executable, "-m", "refit", *args], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, timeout=600)

    common = ["pretrain", "--model", "dreamrec", "--data", "synthetic-seq", "--hidden", "16", "--steps", "30",
              "--epochs", "2", "--eval-every", "1", "--embedding-warmup", "none", "--ce-weight", "0"]
    r = refit(*common, "--w-grid", "0,1", "--out", "a")
    assert r.returncode == 0, r.stderr
    assert "chosen on validation (trained with 2)" in r.stdout
    with open(tmp_path / "a" / "summary.json") as f:
        assert set(json.load(f)["guidance"][f"valid_{SEQ_SELECTION}"]) == {"0", "1", "2"}
    r = refit(*common, "--w-grid", "none", "--out", "b")
    assert r.returncode == 0, r.stderr
    assert "chosen on validation" not in r.stdout
    for bad, message in (("0,x", "comma-separated numbers"), ("-1", "guidance weights >= 0"),
                         ("nan", "guidance weights >= 0")):
        r = refit(*common, "--w-grid", bad, "--out", "c")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_script_for_older_runs_chooses_as_a_run_does(tmp_path):
    """benchmarks/studies/choose_guidance.py on a run made without the choice gives what the choice at the end of
    the same run gives, and leaves the source folder alone."""
    cfg = dict(SMALL, epochs=3, w=2.0)
    chose = pretrain_dreamrec(DreamRecConfig(**cfg, w_grid=(0.0, 4.0), out=str(tmp_path / "chose")))
    pretrain_dreamrec(DreamRecConfig(**cfg, w_grid=None, out=str(tmp_path / "old")))
    before = os.path.getmtime(tmp_path / "old" / "best.pt")
    script, env = benchmark_command("studies.choose_guidance")
    r = subprocess.run([*script, str(tmp_path / "old"), str(tmp_path / "new"), "--w-grid", "0,4"],
                       capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "new" / "summary.json") as f:
        new = json.load(f)
    assert new["guidance"]["w"] == chose["guidance"]["w"]
    assert new["guidance"][f"valid_{SEQ_SELECTION}"] == chose["guidance"][f"valid_{SEQ_SELECTION}"]
    assert new["test"] == chose["test"] and new["valid"] == chose["valid"]
    assert load_checkpoint(str(tmp_path / "new" / "best.pt"))["recommender"]["inference"]["w"] == chose["guidance"]["w"]
    assert os.path.getmtime(tmp_path / "old" / "best.pt") == before
    again = subprocess.run([*script, str(tmp_path / "old"), str(tmp_path / "new")], capture_output=True, text=True,
                           env=env, timeout=600)
    assert again.returncode == 2 and "already holds a best.pt" in again.stderr
