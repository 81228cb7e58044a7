"""DreamRec pretraining and evaluation on a tiny synthetic sequence set: library and command line."""

import json
import os
import subprocess
import sys

import pytest
import torch

from refit.data import load_dataset
from refit.runtime.runs import load_checkpoint
from refit.baselines.sequences import most_popular_metrics
from refit.families.dreamrec.pretrain import DreamRecConfig, load_seq_recommender, pretrain_dreamrec
from refit.families.dreamrec.recommender import evaluate_dreamrec

DATA = {"n_users": 120, "n_items": 60, "mean_length": 12, "seed": 3}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DreamRec's own loss (no warm start, no cross-entropy term; tests/test_warmup.py covers those)
SMALL = dict(embedding_warmup="none", ce_weight=0.0, data="synthetic-seq", data_options=DATA, hidden=16, steps=20, batch_size=64, eval_every=2,
             eval_batch_size=64, progress=False)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic-seq", **DATA)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("dreamrec") / "run"
    summary = pretrain_dreamrec(DreamRecConfig(**SMALL, epochs=12, lr=5e-3, out=str(out)), data)
    return out, summary


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def test_pretraining_learns_and_beats_most_popular(trained, data):
    out, s = trained
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    losses = [r["loss"] for r in records]
    assert len(records) == 12 and losses[-1] < 0.7 * losses[0]
    assert s["status"] == "finished" and s["best_epoch"] > 0
    assert s["valid"]["hr@20"] > most_popular_metrics(data)["valid"]["hr@20"]
    for name in ("config.json", "metrics.jsonl", "best.pt", "last.pt", "summary.json"):
        assert (out / name).exists(), name


def test_checkpoint_round_trip_gives_the_same_metrics(trained, data):
    out, s = trained
    rec, data2, state = load_seq_recommender(str(out / "best.pt"), data)
    again = evaluate_dreamrec(rec, data2, ks=(10, 20, 50), batch_size=64, seed=1)
    assert again["valid"] == s["valid"] and again["test"] == s["test"]
    assert state["epoch"] == s["best_epoch"] and state["recommender"]["model"]["name"] == "dreamrec"


def test_evaluation_is_seeded_and_protocols_differ(trained, data):
    rec, _, _ = load_seq_recommender(str(trained[0] / "best.pt"), data)
    a = evaluate_dreamrec(rec, data, ("test",), batch_size=50, seed=4)
    assert a == evaluate_dreamrec(rec, data, ("test",), batch_size=50, seed=4)
    # The folded sampler and the step-by-step one draw the same noise: the same metrics.
    b = evaluate_dreamrec(rec, data, ("test",), batch_size=50, seed=4, fast=False)
    assert a["test"]["hr@20"] == pytest.approx(b["test"]["hr@20"], abs=2 / data.n_sequences)
    d = evaluate_dreamrec(rec, data, ("test",), protocol="dreamrec")
    assert d["test"]["n"] == (len(data.targets["test"]) // 100) * 100  # the last partial batch dropped


def test_resume_continues_to_the_same_parameters(tmp_path, data):
    cfg = dict(SMALL, epochs=4, eval_every=2)
    pretrain_dreamrec(DreamRecConfig(**cfg, out=str(tmp_path / "full")), data)
    pretrain_dreamrec(DreamRecConfig(**{**cfg, "epochs": 2}, out=str(tmp_path / "part")), data)
    pretrain_dreamrec(DreamRecConfig(**cfg, out=str(tmp_path / "part")), data, resume=True)
    a = load_checkpoint(str(tmp_path / "full" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "part" / "last.pt"))
    assert a["epoch"] == b["epoch"] == 4
    for k, v in a["recommender"]["model"]["state_dict"].items():
        assert torch.equal(v, b["recommender"]["model"]["state_dict"][k]), k
    with pytest.raises(ValueError, match="other settings"):
        pretrain_dreamrec(DreamRecConfig(**{**cfg, "w": 4.0}, out=str(tmp_path / "part")), data, resume=True)


def test_a_new_run_in_a_used_folder_logs_only_its_own_epochs(tmp_path, data):
    cfg = dict(SMALL, eval_every=1)
    pretrain_dreamrec(DreamRecConfig(**cfg, epochs=2, out=str(tmp_path / "run")), data)
    pretrain_dreamrec(DreamRecConfig(**cfg, epochs=1, out=str(tmp_path / "run")), data, overwrite=True)
    epochs = [json.loads(line)["epoch"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert epochs == [1]


def test_dreamrec_refuses_interaction_data(tmp_path):
    with pytest.raises(ValueError, match="sequence data"):
        pretrain_dreamrec(DreamRecConfig(data="synthetic", data_options={"n_users": 50, "n_items": 30},
                                         out=str(tmp_path / "x"), progress=False))


def test_cli_pretrain_and_evaluate_dreamrec(tmp_path):
    opts = ["--model", "dreamrec", "--data", "synthetic-seq", "--epochs", "2", "--eval-every", "1", "--steps", "10",
            "--hidden", "16", "--batch-size", "128", "--out", "run"]
    pre = subprocess.run([sys.executable, "-m", "refit", "-q", "pretrain", *opts], capture_output=True, text=True,
                         cwd=tmp_path, env=_env(), timeout=600)
    assert pre.returncode == 0, pre.stderr
    assert "hr@20" in pre.stdout and "best epoch" in pre.stdout
    ev = subprocess.run([sys.executable, "-m", "refit", "-q", "evaluate", "--checkpoint", "run/best.pt", "--split",
                         "both", "--json", "--eval-steps", "5"], capture_output=True, text=True, cwd=tmp_path,
                        env=_env(), timeout=600)
    assert ev.returncode == 0, ev.stderr
    out = json.loads(ev.stdout)
    assert set(out) == {"valid", "test", "baselines"} and 0 <= out["test"]["hr@20"] <= 1
    assert set(out["baselines"]) == {"most-popular"}  # no SASRec fitted on these data
