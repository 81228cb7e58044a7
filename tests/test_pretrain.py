"""Pretraining, checkpoints and the CLI on small synthetic data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import refit_kernels as rk
from refit.data import load_dataset
from refit.evaluate import evaluate, evaluate_recommender
from refit.families.diffrec.denoisers import CFDiff, build_model
from refit.families.diffrec.pretrain import PretrainConfig, load_recommender, pretrain
from refit.runtime.runs import load_checkpoint

SMALL = dict(data="synthetic", steps=10, batch_size=100, eval_every=2, progress=False,
             data_options={"n_users": 300, "n_items": 200})


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", n_users=300, n_items=200)


def most_popular(data):
    pop = torch.from_numpy(np.asarray(data.train.sum(0)).ravel().astype(np.float32))
    return evaluate(lambda u: pop.expand(len(u), -1), data.test, [data.train, data.valid], ks=(10, 20))


def test_pretraining_lowers_the_loss_and_beats_most_popular(tmp_path, data):
    s = pretrain(PretrainConfig(**SMALL, epochs=12, out=str(tmp_path / "run")), data)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in records]
    assert len(records) == 12 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2])
    assert s["test"]["recall@20"] > most_popular(data)["recall@20"]
    for name in ("config.json", "metrics.jsonl", "best.pt", "last.pt", "summary.json"):
        assert os.path.exists(tmp_path / "run" / name), name
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["best_epoch"] == s["best_epoch"] and summary["best_epoch"] % 2 == 0
    assert {"recall@20", "ndcg@20"} <= set(summary["valid"]) and summary["test"]["ndcg@20"] > 0


def test_early_stopping_follows_patience(tmp_path, data):
    s = pretrain(PretrainConfig(**{**SMALL, "eval_every": 1}, epochs=50, patience=3, lr=1e-6,
                                out=str(tmp_path / "run")), data)
    assert s["stopped_early"] and s["epochs_run"] == s["best_epoch"] + 2


def test_checkpoint_round_trip_gives_the_same_metrics(tmp_path, data):
    s = pretrain(PretrainConfig(**SMALL, epochs=4, out=str(tmp_path / "run")), data)
    rec, data2, state = load_recommender(str(tmp_path / "run" / "best.pt"), data)
    again = evaluate_recommender(rec, data2, ks=(10, 20, 50, 100))
    assert again["test"] == s["test"] and again["valid"] == s["valid"]
    assert state["epoch"] == s["best_epoch"]


def test_resume_continues_to_the_same_result(tmp_path, data):
    full = pretrain(PretrainConfig(**SMALL, epochs=6, out=str(tmp_path / "full")), data)
    pretrain(PretrainConfig(**SMALL, epochs=3, out=str(tmp_path / "cut")), data)
    resumed = pretrain(PretrainConfig(**SMALL, epochs=6, out=str(tmp_path / "cut")), data, resume=True)
    a = load_checkpoint(str(tmp_path / "full" / "last.pt"))["recommender"]["model"]["state_dict"]
    b = load_checkpoint(str(tmp_path / "cut" / "last.pt"))["recommender"]["model"]["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["test"] == full["test"]
    epochs = [json.loads(line)["epoch"] for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert epochs == [1, 2, 3, 4, 5, 6]


def test_a_new_run_in_a_used_folder_logs_only_its_own_epochs(tmp_path, data):
    """Started again with overwrite, a run replaces the folder's metrics log instead of appending to it."""
    out = str(tmp_path / "run")
    pretrain(PretrainConfig(**SMALL, epochs=3, out=out), data)
    pretrain(PretrainConfig(**SMALL, epochs=2, out=out), data, overwrite=True)
    epochs = [json.loads(line)["epoch"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert epochs == [1, 2]


def test_resume_refuses_other_settings(tmp_path, data):
    pretrain(PretrainConfig(**SMALL, epochs=1, out=str(tmp_path / "run")), data)
    with pytest.raises(ValueError, match="other settings.*lr"):
        pretrain(PretrainConfig(**SMALL, epochs=2, lr=0.5, out=str(tmp_path / "run")), data, resume=True)


def test_mismatched_data_is_refused(tmp_path, data):
    pretrain(PretrainConfig(**SMALL, epochs=2, out=str(tmp_path / "run")), data)
    other = load_dataset("synthetic", n_users=300, n_items=200, seed=5)
    with pytest.raises(ValueError, match="other data"):
        load_recommender(str(tmp_path / "run" / "best.pt"), other)


def test_bad_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(ValueError, match="not a refit checkpoint"):
        load_recommender(str(bad))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_recommender(str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError):
        load_recommender(str(tmp_path / "missing.pt"))


def test_cfdiff_trains_and_its_hop_inputs_are_exact(tmp_path, data):
    model = build_model("cfdiff", {"n_items": 200, "top_n": 5}, train=data.train)
    users = torch.tensor([0, 7, 42])
    rows = rk.gather_rows(data.train, users)
    hops = model.condition(users, rows)
    A = data.train.toarray()
    deg = A.sum(0) / A.shape[0]
    overlap = A @ A.T
    for b, u in enumerate(users.tolist()):
        np.testing.assert_allclose(hops.two_hop[b].numpy(), A[u] * deg, rtol=1e-6)
        co = [v for v in np.argsort(-overlap[u], kind="stable") if v != u and overlap[u, v] > 0][:5]
        w = overlap[u, co] / overlap[u, co].sum()
        np.testing.assert_allclose(hops.three_hop[b].numpy(), (w[:, None] * A[co]).sum(0), rtol=1e-5, atol=1e-6)
    s = pretrain(PretrainConfig(**SMALL, model="cfdiff", top_n=5, epochs=4, out=str(tmp_path / "run")), data)
    assert s["test"]["recall@20"] > 0
    rec, _, _ = load_recommender(str(tmp_path / "run" / "best.pt"), data)
    assert isinstance(rec.model, CFDiff) and rec.model.graph is not None


def test_bf16_precision_runs(tmp_path, data, monkeypatch):
    """bf16 pretraining runs the denoiser under bfloat16 autocast, in training and in evaluation, and ends
    near the fp32 run of the same seed."""
    import refit.families.diffrec.pretrain as pretrain_module

    seen = {"fp32": set(), "bf16": set()}  # (module.training, output dtype) of every Linear layer call
    now = []
    build = pretrain_module.build_model

    def watched_build(*args, **kwargs):
        model = build(*args, **kwargs)
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.register_forward_hook(lambda m, args, out: seen[now[-1]].add((m.training, out.dtype)))
        return model

    monkeypatch.setattr(pretrain_module, "build_model", watched_build)
    runs = {}
    for precision in ("fp32", "bf16"):
        now.append(precision)
        runs[precision] = pretrain(PretrainConfig(**SMALL, epochs=2, precision=precision,
                                                  out=str(tmp_path / precision)), data)
    assert seen["fp32"] == {(True, torch.float32), (False, torch.float32)}
    assert seen["bf16"] == {(True, torch.bfloat16), (False, torch.bfloat16)}
    # bf16 arithmetic changed the training: other weights than fp32's ...
    w32, w16 = (load_checkpoint(str(tmp_path / p / "last.pt"))["recommender"]["model"]["state_dict"]
                for p in ("fp32", "bf16"))
    assert any(not torch.equal(w32[k], w16[k]) for k in w32)
    # ... but about the same model. Measured on these data (seeds 1-8, 2 epochs): the validation Recall@20
    # of bf16 and fp32 differ by at most 0.0026 (0.0014 at seed 1, this test's), around 0.35; a model that
    # did not train scores far lower. 0.01 leaves room for other CPUs' bf16 kernels.
    a, b = runs["fp32"]["valid"]["recall@20"], runs["bf16"]["valid"]["recall@20"]
    assert b > 0 and abs(b - a) <= 0.01, (a, b)


def test_bad_configs():
    with pytest.raises(ValueError, match="model"):
        PretrainConfig(model="vae")
    with pytest.raises(ValueError, match="precision"):
        PretrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        PretrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="ks must include 20"):
        PretrainConfig(ks=(10, 50))
    with pytest.raises(ValueError, match="noise_schedule"):
        PretrainConfig(noise_schedule="sigmoid")


def _refit(*args, cwd):
    return subprocess.run([sys.executable, "-m", "refit", "-q", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_cli_pretrain_and_evaluate(tmp_path):
    out = _refit("pretrain", "--data", "synthetic", "--steps", "5", "--epochs", "2", "--eval-every", "1",
                 "--batch-size", "200", "--dims", "32,64", "--out", "run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "best epoch" in out.stdout and "recall@20" in out.stdout
    ev = _refit("evaluate", "--checkpoint", "run/best.pt", "--split", "test", "--json", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert json.loads(ev.stdout)["test"] == summary["test"]
    table = _refit("evaluate", "--checkpoint", "run/best.pt", "--split", "both", cwd=tmp_path)
    assert table.returncode == 0 and "valid" in table.stdout and "ndcg@20" in table.stdout


def test_cli_reports_bad_flags_clearly(tmp_path):
    bad = _refit("pretrain", "--data", "synthetic", "--dims", "20,x", cwd=tmp_path)
    assert bad.returncode == 2 and "comma-separated integers" in bad.stderr
    bad = _refit("pretrain", "--data", "synthetic", "--noise-schedule", "sigmoid", cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    bad = _refit("pretrain", "--data", "no/such/folder", cwd=tmp_path)
    assert bad.returncode == 2 and "no data set" in bad.stderr
    bad = _refit("evaluate", "--checkpoint", "nothing.pt", cwd=tmp_path)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    info = _refit("info", cwd=tmp_path)
    assert info.returncode == 0 and "backends:" in info.stdout


@pytest.mark.parametrize("name,config", [("diffrec", {"n_items": 200, "dims": [16, 48]}),
                                         ("cfdiff", {"n_items": 200, "top_n": 4})])
@pytest.mark.parametrize("mean_type", ["x0", "eps"])
def test_hidden_space_reverse_pass_equals_the_step_by_step_pass(data, name, config, mean_type):
    from refit.diffusion import DiffusionConfig, GaussianDiffusion, reverse_in_latent
    from refit.families.diffrec.recommender import RowRecommender

    torch.manual_seed(0)
    model = build_model(name, config, train=data.train).eval()
    for p in model.parameters():  # weights of a trained model's size, not of an initialisation
        p.data.mul_(2.0)
    diffusion = GaussianDiffusion(DiffusionConfig(mean_type=mean_type, steps=12))
    users = torch.arange(40)
    rows = rk.gather_rows(data.train, users)
    # In float64 the two passes are the same function: equal to rounding.
    m64 = build_model(name, config, train=data.train).eval().double()
    m64.load_state_dict(model.state_dict())
    cond = m64.condition(users, rows)
    cond = None if cond is None else type(cond)(*(c.double() for c in cond))
    step = diffusion.sample(lambda x, t: m64(x, t, cond), rows.double())
    torch.testing.assert_close(reverse_in_latent(diffusion, m64, rows.double(), cond), step, rtol=1e-9, atol=1e-9)
    # In float32, through the recommender, with and without a noised start.
    rec = RowRecommender(name, model, diffusion)
    assert rec.latent_inference()
    torch.testing.assert_close(rec.scores(users, rows, latent=True), rec.scores(users, rows, latent=False),
                               rtol=1e-4, atol=1e-4)
    rec.sampling_steps = 3  # start from a noised row: the same noise for both passes
    a = rec.scores(users, rows, latent=False, generator=torch.Generator().manual_seed(1))
    b = rec.scores(users, rows, latent=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    rec.sampling_noise = True  # noise at every step: only the step-by-step pass applies
    assert not rec.latent_inference()
