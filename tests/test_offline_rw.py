"""Offline reward-weighted fine-tuning: logged ratings kept by the loaders, their weights, the weighted
loss against a direct implementation, its lambda -> inf limit, refusals, and a command-line run."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from refit.data import load_dataset
from refit.families.diffrec.pretrain import PretrainConfig, load_recommender, pretrain
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT
from refit.posttrain.common import rating_weights
from _testing import benchmark_module


def _ratings_file(tmp_path, n_users=40, n_items=30, per_user=12, seed=0):
    """A ratings.dat whose ratings favour low item ids (so high-rated items are a learnable signal)."""
    rng = np.random.default_rng(seed)
    lines = []
    for u in range(1, n_users + 1):
        items = rng.choice(n_items, size=per_user, replace=False) + 1
        for j, i in enumerate(items):
            r = int(np.clip(round(5 - 4 * (i - 1) / n_items + rng.normal(0, 0.7)), 1, 5))
            lines.append(f"{u}::{i}::{r}::{1000 * u + j}\n")
    path = tmp_path / "ratings.dat"
    path.write_text("".join(lines))
    return path


def test_loaders_keep_the_ratings_of_every_split(tmp_path):
    path = _ratings_file(tmp_path)
    d = load_dataset(str(path), min_rating=None)
    logged = {}
    for line in path.read_text().splitlines():
        u, i, rating, _ = line.split("::")
        logged[(int(u), int(i))] = float(rating)
    for split in ("train", "valid", "test"):
        r, pattern = getattr(d, f"{split}_ratings"), getattr(d, split)
        assert r is not None and r.shape == pattern.shape and pattern.nnz > 0, split
        assert np.array_equal(r.indptr, pattern.indptr) and np.array_equal(r.indices, pattern.indices), split
        # Each kept rating is the file's rating of that (user, item).
        coo = r.tocoo()
        for row, col, value in zip(coo.row, coo.col, coo.data):
            assert logged[(int(d.user_ids[row]), int(d.item_ids[col]))] == value
        assert set(np.unique(r.data)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    # The default min_rating keeps ratings >= 4 only; implicit data carry no ratings.
    kept = load_dataset(str(path))
    assert min(kept.train_ratings.data.min(), kept.test_ratings.data.min()) >= 4
    synthetic = load_dataset("synthetic", n_users=30, n_items=20)
    assert synthetic.train_ratings is None and synthetic.valid_ratings is None and synthetic.test_ratings is None


def test_rating_weights_on_a_hand_computed_case():
    present = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    ratings = torch.tensor([[5.0, 3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    w = rating_weights(present, ratings, 1.0)
    e = math.exp(2.0)  # exp(5) / exp(3)
    top, other = 3 * e / (e + 2), 3 / (e + 2)
    assert w[0].tolist() == pytest.approx([top, other, 1.0, other], rel=1e-6)
    assert w[1].tolist() == [1.0] * 4  # no logged items: plain loss
    assert w[2].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])
    # A user's logged weights average 1; huge lambda is uniform, tiny lambda puts everything on the best.
    assert float(w[0, [0, 1, 3]].mean()) == pytest.approx(1.0)
    assert rating_weights(present, ratings, 1e9)[0].tolist() == pytest.approx([1.0] * 4)
    assert rating_weights(present, ratings, 1e-3)[0].tolist() == pytest.approx([3.0, 0.0, 1.0, 0.0], abs=1e-9)
    with pytest.raises(ValueError, match="alike"):
        rating_weights(present, ratings[:, :3], 1.0)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offline")
    path = _ratings_file(tmp)
    out = tmp / "pre"
    pretrain(PretrainConfig(data=str(path), data_options={"min_rating": None}, steps=8, epochs=2, eval_every=1,
                            batch_size=16, dims=(16, 32), ks=(10, 20), progress=False, out=str(out)))
    return str(out / "best.pt"), str(path)


def _trainer(pretrained, **kw):
    checkpoint, path = pretrained
    base = dict(checkpoint=checkpoint, method="offline-reward-weighted", batch_size=8, lr=1e-2, grad_clip=1e9,
                seed=4, ks=(10, 20), progress=False, plot=False)
    base.update(kw)
    rec, data, _ = load_recommender(checkpoint, load_dataset(path, min_rating=None))
    torch.manual_seed(0)
    return ReFiT(rec, data, FinetuneConfig(**base))


def _grads(trainer, loss_fn):
    trainer.optimizer.zero_grad(set_to_none=True)
    loss_fn().backward()
    return [p.grad.clone() for p in trainer.policy.module.parameters() if p.grad is not None]


def _captured_step_grads(trainer):
    grads = []
    trainer.optimizer.register_step_pre_hook(lambda opt, a, k: grads.append(
        [p.grad.clone() for p in trainer.policy.module.parameters() if p.grad is not None]))
    trainer.step()
    return grads[0]


@pytest.mark.parametrize("lam", [0.7, 1e12])
def test_the_offline_update_is_the_gradient_of_the_directly_written_loss(pretrained, lam):
    """Same generator state: the trainer's gradient against the weighted ELBO written out by hand."""
    trainer = _trainer(pretrained, rw_lambda=lam)
    direct = _trainer(pretrained, rw_lambda=lam)
    rec, diffusion = direct.policy, direct.policy.diffusion

    def loss():
        episode, _, _ = direct.draw()
        rows = torch.from_numpy(direct.data.train[episode.users.numpy()].toarray())
        ratings = torch.from_numpy(direct.data.train_ratings[episode.users.numpy()].toarray())
        logged = rows > 0
        soft = torch.where(logged, ratings.double() / lam, torch.tensor(-math.inf, dtype=torch.float64))
        w = torch.where(logged, torch.softmax(soft, 1) * logged.sum(1, keepdim=True), torch.ones_like(soft)).float()
        g = direct.generator
        t, importance = diffusion.sample_timesteps(rows.shape[0], generator=g)
        noise = torch.randn(rows.shape, generator=g)
        x_t = diffusion.q_sample(rows, t, noise)
        out = rec.denoiser(episode.users, rows)(x_t, t)
        per_row = (w * (rows - out) ** 2).mean(1)
        snr = torch.where(t == 0, torch.ones(()), diffusion.snr(t - 1) - diffusion.snr(t))
        return (snr * per_row / importance).mean()

    rec.module.eval()
    want = _grads(direct, loss)
    got = _captured_step_grads(trainer)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in got)


def test_a_huge_lambda_is_plain_pretraining_on_the_logged_rows(pretrained):
    trainer = _trainer(pretrained, rw_lambda=1e12)
    plain = _trainer(pretrained, rw_lambda=1e12)

    def loss():
        episode, _, _ = plain.draw()
        rows = torch.from_numpy(plain.data.train[episode.users.numpy()].toarray())
        plain.policy.module.eval()
        return plain.policy.denoising_loss(episode.users, rows, rows, generator=plain.generator).mean()

    want = _grads(plain, loss)
    got = _captured_step_grads(trainer)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_offline_steps_favour_high_ratings_and_the_placebo_does_not(pretrained):
    real = _trainer(pretrained, rw_lambda=0.5)
    stats = [real.step() for _ in range(3)]
    assert all(s["weighted_rating"] > s["rating"] for s in stats)
    placebo = _trainer(pretrained, rw_lambda=0.5, placebo=True)
    p = placebo.step()
    # The placebo keeps each user's weights but moves them to random logged items.
    assert p["weighted_rating"] != pytest.approx(stats[0]["weighted_rating"])
    assert math.isfinite(p["loss"]) and p["grad_norm"] > 0


def test_offline_refuses_data_without_ratings_and_sampling_settings(pretrained, tmp_path):
    checkpoint, path = pretrained
    rec, data, _ = load_recommender(checkpoint, load_dataset(path, min_rating=None))
    data.train_ratings = None
    with pytest.raises(ValueError, match="carry none"):
        ReFiT(rec, data, FinetuneConfig(checkpoint=checkpoint, method="offline-reward-weighted", progress=False))
    for bad in (dict(group_size=2), dict(ppo_epochs=1), dict(anchor="kl", anchor_weight=0.1), dict(rw_lambda=0.0)):
        with pytest.raises(ValueError):
            FinetuneConfig(checkpoint=checkpoint, method="offline-reward-weighted", **bad)
    assert FinetuneConfig(method="offline-reward-weighted").rw_lambda == 1.0
    assert FinetuneConfig(method="reward-weighted", group_size=2).rw_lambda == 0.01


def test_offline_reward_weighted_runs_and_resumes_from_the_command_line(pretrained, tmp_path):
    checkpoint, path = pretrained
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "refit", "-q", "finetune", "--checkpoint", checkpoint,
            "--method", "offline-reward-weighted", "--rw-lambda", "0.5", "--batch-size", "8", "--eval-every", "2",
            "--ks", "10,20", "--no-plot"]

    def run(*extra):
        out = subprocess.run(base + list(extra), capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        return out

    run("--iterations", "4", "--out", str(tmp_path / "whole"))
    # Stopped after 2 iterations by a budget of 2, then resumed: the same records as one run of 4.
    run("--iterations", "2", "--out", str(tmp_path / "part"))
    run("--iterations", "4", "--out", str(tmp_path / "part"), "--resume")

    def records(name):
        with open(tmp_path / name / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
        return [{k: r[k] for k in ("iteration", "loss", "grad_norm", "weighted_rating")} for r in rows
                if "loss" in r]

    whole, part = records("whole"), records("part")
    assert [r["iteration"] for r in whole] == [1, 2, 3, 4]
    assert whole == part


def test_min_rating_from_the_command_line(tmp_path):
    """``--min-rating none`` keeps every rating; the checkpoint records it, so fine-tuning reads the same
    data; bad values and sources without ratings are refused by name."""
    path = _ratings_file(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def refit(*args):
        return subprocess.run([sys.executable, "-m", "refit", "-q", *args], capture_output=True, text=True,
                              env=env, cwd=str(tmp_path), timeout=300)

    out = refit("pretrain", "--data", str(path), "--min-rating", "none", "--steps", "5", "--epochs", "1",
                "--batch-size", "16", "--dims", "16,32", "--ks", "10,20", "--out", "all")
    assert out.returncode == 0, out.stderr
    from refit.runtime.runs import load_checkpoint

    saved = load_checkpoint(str(tmp_path / "all" / "best.pt"))["data"]
    assert saved["options"] == {"min_rating": None}
    assert saved["n_users"] == load_dataset(str(path), min_rating=None).n_users
    out = refit("finetune", "--checkpoint", "all/best.pt", "--method", "offline-reward-weighted", "--iterations", "2",
                "--batch-size", "8", "--eval-every", "2", "--ks", "10,20", "--no-plot", "--out", "ft")
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "ft" / "metrics.jsonl") as f:
        ratings = [json.loads(line)["rating"] for line in f if '"rating"' in line]
    assert ratings and min(ratings) < 4  # the ratings below 4 are in the fine-tuning data too
    bad = refit("pretrain", "--data", str(path), "--min-rating", "high")
    assert bad.returncode == 2 and "--min-rating: expected a number or 'none', got 'high'" in bad.stderr
    bad = refit("pretrain", "--data", "synthetic", "--min-rating", "3", "--epochs", "1")
    assert bad.returncode == 2 and "synthetic: unknown options: min_rating" in bad.stderr
    assert "Traceback" not in bad.stderr
    bad = refit("evaluate", "--checkpoint", "all/best.pt", "--min-rating", "3", "--ks", "10")
    assert bad.returncode == 2 and "--min-rating needs --data" in bad.stderr
    bad = refit("finetune", "--checkpoint", "all/best.pt", "--min-rating", "3", "--out", "x")
    assert bad.returncode == 2 and "--min-rating needs --data" in bad.stderr


def test_the_study_continues_pretraining_on_the_checkpoints_own_data(pretrained):
    """benchmarks/studies/post_training_study.py's continued arm: the data flags come from the checkpoint."""

    checkpoint, path = pretrained
    study = benchmark_module("studies.post_training_study")
    state = study._load(checkpoint)
    assert study._data_flags(state, checkpoint) == ["--data", path, "--min-rating", "none"]
    assert state["recommender"]["model"]["name"] == "diffrec"
    assert study._loss_flags(state) == []  # --ce-weight is a sequential model's flag


def _rated_data():
    """2 users x 5 items with a rating on every interaction of every split (hand-made)."""
    import scipy.sparse as sp

    from refit.data import InteractionData

    def split(rows):
        u, i, r = zip(*rows) if rows else ((), (), ())
        ratings = sp.csr_matrix((np.array(r, np.float32), (u, i)), shape=(2, 5))
        ratings.sort_indices()
        pattern = ratings.copy()
        pattern.data[:] = 1.0
        return pattern, ratings

    (train, r_train), (valid, r_valid), (test, r_test) = (
        split([(0, 0, 5), (1, 1, 3)]), split([(0, 1, 4), (1, 4, 2)]), split([(0, 2, 2), (0, 3, 5), (1, 2, 1)]))
    return InteractionData("hand", 2, 5, train, valid, test, np.arange(2), np.arange(5), {},
                           r_train, r_valid, r_test)


def test_held_out_items_rated_high_are_the_only_hits():
    from refit.evaluate import evaluate_many
    from refit.evaluate import evaluation_targets

    d = _rated_data()
    targets = evaluation_targets(d, ("valid", "test"), min_target_rating=4)
    (test_pos, test_exclude), (valid_pos, valid_exclude) = targets["test"], targets["valid"]
    assert test_pos.toarray().tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 0, 0]]  # (0, 3) rated 5; 2 and 1 are out
    assert valid_pos.toarray().tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert test_exclude[0] is d.train and test_exclude[1] is d.valid and valid_exclude == [d.train]  # masks as before
    # User 0 ranks the disliked held-out item 2 first and the liked item 3 second: no hit at 1, one at 2.
    scores = torch.tensor([[0.0, 0.0, 9.0, 8.0, 1.0], [0.0, 0.0, 9.0, 8.0, 1.0]])
    score_fn = lambda users: scores[users]  # noqa: E731
    rated = evaluate_many(score_fn, {"test": targets["test"]}, ks=(1, 2), exclude_users_without_positives=True)
    assert rated["test"]["recall@1"] == 0.0 and rated["test"]["recall@2"] == 1.0
    assert rated["test"]["n_users"] == 1  # user 1 has no held-out item rated >= 4
    plain = evaluate_many(score_fn, {"test": evaluation_targets(d, ("test",))["test"]}, ks=(1,))
    assert plain["test"]["recall@1"] == pytest.approx((1 / 2 + 1) / 2)


def test_held_out_ratings_are_required_and_checked():
    from refit.evaluate import evaluation_targets

    with pytest.raises(ValueError, match=r"min_target_rating needs data with ratings \('synthetic'"):
        evaluation_targets(load_dataset("synthetic", n_users=30, n_items=20), ("test",), min_target_rating=4)
    for bad in (float("nan"), float("inf"), True, "4"):
        with pytest.raises(ValueError, match="min_target_rating must be a finite number"):
            evaluation_targets(_rated_data(), ("test",), min_target_rating=bad)
    # NumPy numbers are numbers too.
    assert (evaluation_targets(_rated_data(), ("test",), min_target_rating=np.int64(4))["test"][0] !=
            evaluation_targets(_rated_data(), ("test",), min_target_rating=4.0)["test"][0]).nnz == 0


def test_evaluate_counts_held_out_items_rated_high_from_the_command_line(pretrained, tmp_path):
    checkpoint, path = pretrained
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def refit(*args):
        return subprocess.run([sys.executable, "-m", "refit", "-q", "evaluate", "--checkpoint", checkpoint,
                               "--ks", "10,20", *args], capture_output=True, text=True, env=env, timeout=300)

    out = refit("--min-target-rating", "4", "--split", "both", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    from refit.evaluate import evaluate_recommender
    from refit.families.diffrec.pretrain import load_recommender

    rec, data, _ = load_recommender(checkpoint)
    want = evaluate_recommender(rec, data, ("valid", "test"), ks=(10, 20), min_target_rating=4)
    assert "best_baseline" not in got  # the baselines' cached rows count every held-out item
    for split in ("valid", "test"):
        assert got[split] == pytest.approx(want[split])
        liked_users = int(((data.__dict__[f"{split}_ratings"] >= 4).sum(axis=1) > 0).sum())
        assert got[split]["n_users"] == liked_users < data.n_users
    bad = refit("--min-target-rating", "high")
    assert bad.returncode == 2 and "--min-target-rating: expected a number, got 'high'" in bad.stderr


def test_the_study_tabulates_selected_models_on_held_out_items_rated_high(pretrained):
    """post_training_study.py --min-target-rating: each run's selected checkpoint and the pretrained one
    evaluated again with only items rated >= R as hits; changes paired against the pretrained model."""

    from refit.evaluate import evaluate_recommender

    from refit.families.diffrec.pretrain import load_recommender

    checkpoint, _ = pretrained
    study = benchmark_module("studies.post_training_study")
    plain = {"recall@20": 0.5, "ndcg@20": 0.5}
    results = {"1": {"pretrained": {"valid": plain, "test": plain},
                     "arm": {"checkpoint": checkpoint, "valid": plain, "test": plain, "before": {"test": plain},
                             "seconds": 3.0}}}
    rated = study.rated_results(results, checkpoint, 4.0)
    rec, data, _ = load_recommender(checkpoint)
    want = evaluate_recommender(rec, data, ("valid", "test"), ks=(20,), min_target_rating=4.0)
    for arm in ("pretrained", "arm"):
        assert rated["1"][arm]["test"] == pytest.approx(want["test"]) and rated["1"][arm]["valid"] == want["valid"]
    assert "before" not in rated["1"]["arm"] and rated["1"]["arm"]["seconds"] == 3.0
    assert "| arm | " + f"{want['test']['recall@20']:.4f} ± 0.0000 | +0.0000 ± 0.0000" in study.table(
        rated, ["recall@20", "ndcg@20"])


@pytest.mark.slow
def test_the_rated_study_tunes_lambda_on_validation_and_evaluates_final_models(pretrained, tmp_path):
    """benchmarks/studies/offline_rated_study.py end to end on the small rated data: lambda is the first seed's
    best on validation, each arm's numbers are its final model's, baselines are tuned on the same metric."""

    from refit.evaluate import evaluate_recommender

    checkpoint, _ = pretrained
    study = benchmark_module("studies.offline_rated_study")
    out = tmp_path / "study"
    assert study.main(["--pretrained", checkpoint, "--seeds", "1", "--out", str(out), "--lambdas", "0.5,2",
                       "--iterations", "2", "--min-target-rating", "4", "--finetune", "--batch-size 8 --ks 10,20"]) == 0
    with open(out / "offline-rated.json") as f:
        saved = json.load(f)
    tried = saved["lambda_valid"]
    assert set(tried) == {"0.5", "2"} and tried[f"{saved['lambda']:g}"] == max(tried.values())
    res = saved["results"]["1"]
    for arm, flags in [("offline", []), ("placebo", ["--placebo"]), ("uniform", [])]:
        with open(out / f"{arm}-s1" / "config.json") as f:
            config = json.load(f)
        assert config["iterations"] == 2 and config["placebo"] == (flags == ["--placebo"])
        assert config["rw_lambda"] == (study.UNIFORM_LAMBDA if arm == "uniform" else saved["lambda"])
        rec, data, _ = load_recommender(res[arm]["checkpoint"])
        assert res[arm]["checkpoint"].endswith("last.pt")
        want = evaluate_recommender(rec, data, ("valid", "test"), ks=(20,), min_target_rating=4.0)
        assert res[arm]["rated"]["test"] == pytest.approx(want["test"])
    assert set(saved["baselines"]) == {"itemknn", "ease"}
    text = (out / "offline-rated.md").read_text()
    assert "| uniform |" in text and "| itemknn (" in text
