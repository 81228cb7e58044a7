"""The cross-entropy warm start of the sequential backbones (``embedding_warmup="ce"``): the loss by hand,
which parameters each phase trains, the item table's start, exact resume across the phase boundary,
refusals, and the command line's ``--embedding-warmup`` / ``--train-targets``."""

import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from _testing import TINY_SEQ, sigterm_after_first_evaluation
from refit.data import load_dataset
from refit.diffusion import DiffusionConfig, GaussianDiffusion
from refit.families.dreamrec.network import DreamRec
from refit.runtime.runs import load_checkpoint
from refit.families.dreamrec.preferdiff import PreferDiff
from refit.families.dreamrec.pretrain import DreamRecConfig, PreferDiffConfig, pretrain_dreamrec
from refit.families.dreamrec.recommender import SeqRecommender
from refit.families.dreamrec.losses import ce_loss, dreamrec_loss, preferdiff_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(data="synthetic-seq", data_options=TINY_SEQ, hidden=16, steps=30, batch_size=32, eval_every=1,
             eval_batch_size=64, progress=False, lr=1e-3, ks=(10, 20))


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic-seq", **TINY_SEQ)


def _state(folder, name="last.pt"):
    return load_checkpoint(os.path.join(folder, name))["recommender"]["model"]["state_dict"]


def test_ce_loss_by_hand():
    torch.manual_seed(0)
    n, D, L = 12, 8, 5
    model = DreamRec(n, hidden=D, max_len=L, dropout=0.0).eval()
    rec = SeqRecommender(model, GaussianDiffusion(DiffusionConfig(mean_type="x0", steps=10,
                                                                  noise_schedule="ddpm-linear")))
    history = torch.tensor([[1, 2, 3, n, n], [4, 5, 6, 7, 8], [n, n, n, n, n]])
    lengths = torch.tensor([3, 5, 0])
    targets = torch.tensor([0, 11, 5])
    got = ce_loss(rec, history, lengths, targets)
    h = model.encode(history, lengths)
    logits = h @ model.item_embeddings.weight[:n].t()  # the padding row n is no candidate
    want = torch.logsumexp(logits, dim=1) - logits[torch.arange(3), targets]
    assert got.shape == (3,)
    torch.testing.assert_close(got, want)
    # the gradient reaches the item table (the target's row and the others) and the encoder, not the denoiser
    got.sum().backward()
    assert model.item_embeddings.weight.grad[:n].abs().sum(1).gt(0).all()
    assert model.item_embeddings.weight.grad[n].abs().sum() == 0  # padding: masked out of the history
    assert model.q.weight.grad.abs().sum() > 0
    assert model.diffuser[0].weight.grad is None and model.none_embedding.grad is None


@pytest.mark.parametrize("network", [DreamRec, PreferDiff])
def test_ce_weight_adds_the_predictions_cross_entropy(network):
    torch.manual_seed(0)
    n, D, L = 12, 8, 5
    model = network(n, hidden=D, max_len=L, dropout=0.0, heads=2).eval()
    rec = SeqRecommender(model, GaussianDiffusion(DiffusionConfig(mean_type="x0", steps=10,
                                                                  noise_schedule="ddpm-linear")))
    history = torch.tensor([[1, 2, 3, n, n], [4, 5, 6, 7, 8], [9, n, n, n, n], [0, 1, n, n, n]])
    lengths = torch.tensor([3, 5, 1, 2])
    targets = torch.tensor([0, 11, 5, 3])
    loss = dreamrec_loss if network is DreamRec else preferdiff_loss
    plain = loss(rec, history, lengths, targets, generator=torch.Generator().manual_seed(3))
    seen = []
    denoise = model.denoise

    def recording(x, h, t, step=None):
        out = denoise(x, h, t, step)
        seen.append(out)
        return out

    model.denoise = recording
    both = loss(rec, history, lengths, targets, generator=torch.Generator().manual_seed(3), ce_weight=0.5)
    pred = seen[-1][:4]  # PreferDiff denoises the target's and the negative's states in one pass: the first rows
    logits = pred @ model.item_embeddings.weight[:n].t()
    ce = torch.logsumexp(logits, dim=1) - logits[torch.arange(4), targets]
    torch.testing.assert_close(both, plain + 0.5 * ce)
    if network is DreamRec:
        with pytest.raises(ValueError, match="ce_weight needs the targets"):
            dreamrec_loss(rec, history, lengths, x0=torch.zeros(4, D), ce_weight=0.5)


@pytest.mark.parametrize("config", [DreamRecConfig, PreferDiffConfig])
def test_warmup_epochs_train_the_encoder_and_items_only_then_the_diffusion_loss(tmp_path, data, config):
    extra = {"heads": 2} if config is PreferDiffConfig else {}
    cfg = dict(SMALL, **extra, embedding_warmup="ce", warmup_epochs=1)
    pretrain_dreamrec(config(**cfg, epochs=1, out=str(tmp_path / "w")), data)
    c = config(**cfg, epochs=1, out=str(tmp_path / "x"))
    torch.manual_seed(c.seed)  # the network as the run built it, before training
    net = c.build_network(data.n_items)
    with torch.no_grad():
        net.item_embeddings.weight.normal_(0.0, c.hidden ** -0.5)
    start = net.state_dict()
    after = _state(str(tmp_path / "w"))
    for name in ("diffuser.0.weight", "diffuser.0.bias", "none_embedding", "step_mlp.0.weight"):
        assert torch.equal(after[name], start[name]), f"{name} moved during the warm start"
    for name in ("item_embeddings.weight", "q.weight", "ff_1.weight"):
        assert not torch.equal(after[name], start[name]), f"{name} did not move during the warm start"
    # the next epoch is the diffusion loss: the denoiser moves
    pretrain_dreamrec(config(**cfg, epochs=2, out=str(tmp_path / "w")), data, resume=True)
    assert not torch.equal(_state(str(tmp_path / "w"))["diffuser.0.weight"], after["diffuser.0.weight"])


def test_the_warm_start_begins_from_unit_norm_item_embeddings(tmp_path, data):
    cfg = dict(SMALL, hidden=64, epochs=1, lr=1e-12)  # a step too small to move the table measurably
    pretrain_dreamrec(DreamRecConfig(**cfg, embedding_warmup="ce", out=str(tmp_path / "ce")), data)
    pretrain_dreamrec(DreamRecConfig(**cfg, embedding_warmup="none", out=str(tmp_path / "plain")), data)
    ce = _state(str(tmp_path / "ce"))["item_embeddings.weight"][:-1]
    plain = _state(str(tmp_path / "plain"))["item_embeddings.weight"][:-1]
    assert 0.8 < float(ce.norm(dim=1).mean()) < 1.2  # N(0, 1/D) entries
    assert 6.4 < float(plain.norm(dim=1).mean()) < 9.6  # DreamRec's N(0, 1): about sqrt(64)


def test_resume_across_the_phase_boundary_is_exact(tmp_path, data):
    cfg = dict(SMALL, embedding_warmup="ce", warmup_epochs=2, epochs=3)
    pretrain_dreamrec(DreamRecConfig(**cfg, out=str(tmp_path / "full")), data)
    pretrain_dreamrec(DreamRecConfig(**{**cfg, "epochs": 1}, out=str(tmp_path / "part")), data)
    pretrain_dreamrec(DreamRecConfig(**cfg, out=str(tmp_path / "part")), data, resume=True)
    a, b = _state(str(tmp_path / "full")), _state(str(tmp_path / "part"))
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    with pytest.raises(ValueError, match="other settings.*warmup_epochs"):
        pretrain_dreamrec(DreamRecConfig(**{**cfg, "warmup_epochs": 1}, out=str(tmp_path / "part")), data,
                          resume=True)


def test_resume_inside_the_automatic_warm_start_is_exact(tmp_path, data, monkeypatch):
    """A run stopped (SIGTERM) after its first warm epoch and resumed ends with the weights of one never
    stopped: the warm start's best value, best weights and count are in last.pt."""
    import refit.evaluate as evaluation

    cfg = dict(SMALL, epochs=8)
    full = pretrain_dreamrec(DreamRecConfig(**cfg, out=str(tmp_path / "full")), data)
    assert full["warmup"]["epochs"] >= 2  # the stop below falls inside the warm start
    real = sigterm_after_first_evaluation(monkeypatch)
    part = pretrain_dreamrec(DreamRecConfig(**cfg, out=str(tmp_path / "part")), data)
    assert part["status"] == "stopped" and part["epochs_run"] == 1
    monkeypatch.setattr(evaluation, "evaluate_sequences", real)
    again = pretrain_dreamrec(DreamRecConfig(**cfg, out=str(tmp_path / "part")), data, resume=True)
    assert again["warmup"] == full["warmup"]
    a, b = _state(str(tmp_path / "full")), _state(str(tmp_path / "part"))
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def test_warmup_epochs_mean_nothing_without_the_warm_start(tmp_path, data):
    cfg = dict(SMALL, epochs=2, ce_weight=0.0)
    pretrain_dreamrec(DreamRecConfig(**cfg, embedding_warmup="none", out=str(tmp_path / "a")), data)
    pretrain_dreamrec(DreamRecConfig(**cfg, embedding_warmup="none", warmup_epochs=7, out=str(tmp_path / "b")),
                      data)
    a, b = _state(str(tmp_path / "a")), _state(str(tmp_path / "b"))
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_the_automatic_warm_start_ends_on_its_own_validation(tmp_path, data, monkeypatch):
    """warmup_epochs None: after each warm epoch the cross-entropy model's validation HR@20 is measured;
    the warm start ends WARMUP_PATIENCE epochs after its best (whose weights go on) or at half the
    epochs. The values the run records are those of the rule replayed on its own measurements."""
    import refit.evaluate as evaluation

    measured = []
    real = evaluation.evaluate_sequences

    def spy(score_fn, data_, splits, **kw):
        out = real(score_fn, data_, splits, **kw)
        if tuple(splits) == ("valid",) and kw.get("ks") == (20,):
            measured.append(out["valid"]["hr@20"])
        return out

    monkeypatch.setattr(evaluation, "evaluate_sequences", spy)
    # w_grid None: the guidance choice after the run makes validation passes of the same kind
    s = pretrain_dreamrec(DreamRecConfig(**SMALL, epochs=16, w_grid=None, out=str(tmp_path / "run")), data)
    from refit.families.dreamrec.pretrain import WARMUP_PATIENCE

    n = s["warmup"]["epochs"]
    assert 1 <= n <= 8 and len(measured) == n
    best = max(range(n), key=lambda i: (measured[i], -i))  # the first best
    assert s["warmup"]["valid_hr@20"] == measured[best]
    assert n == 8 or n - 1 - best == WARMUP_PATIENCE  # ended by its patience, or by half of the 16 epochs


def test_the_default_recipe_learns_and_beats_most_popular(tmp_path):
    from refit.baselines.sequences import most_popular_metrics

    opts = {"n_users": 120, "n_items": 60, "mean_length": 12, "seed": 3}
    data = load_dataset("synthetic-seq", **opts)
    cfg = DreamRecConfig(data="synthetic-seq", data_options=opts, hidden=16, steps=20, batch_size=64, eval_every=2,
                         eval_batch_size=256, progress=False, epochs=12, lr=5e-3, out=str(tmp_path / "run"))
    assert cfg.embedding_warmup == "ce" and cfg.ce_weight == 1.0 and cfg.warmup_epochs is None
    s = pretrain_dreamrec(cfg, data)
    assert 1 <= s["warmup"]["epochs"] <= 6  # half of the 12 at most
    assert s["valid"]["hr@20"] > most_popular_metrics(data)["valid"]["hr@20"]


@pytest.mark.parametrize("bad, match", [
    ({"embedding_warmup": "mse"}, "embedding_warmup must be one of"),
    ({"warmup_epochs": -1}, "warmup_epochs must be None \\(automatic\\) or an integer >= 0"),
    ({"warmup_epochs": 1.5}, "warmup_epochs must be None"),
    ({"warmup_epochs": True}, "warmup_epochs must be None"),
    ({"ce_weight": -0.1}, "ce_weight must be a finite number >= 0"),
    ({"ce_weight": float("nan")}, "ce_weight must be a finite number >= 0"),
])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        DreamRecConfig(**{**SMALL, **bad})


def _cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-m", "refit", "-q", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_cli_warmup_and_train_targets(tmp_path):
    folder = tmp_path / "pd"
    folder.mkdir()
    # PreferDiff's format: one sequence per line (1-based ids), the last id the target; split by user
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 40), ("valid", 8), ("test", 8)):
        lines = [" ".join(str(int(i) + 1) for i in torch.randperm(30, generator=g)[:int(torch.randint(2, 8, (1,),
                 generator=g))]) for _ in range(n)]
        (folder / f"{split}_data.txt").write_text("\n".join(lines) + "\n")
    common = ["pretrain", "--model", "dreamrec", "--data", str(folder), "--hidden", "8", "--steps", "10",
              "--epochs", "2", "--eval-every", "1", "--ks", "5,20", "--embedding-warmup", "ce",
              "--warmup-epochs", "1"]
    out = _cli(*common, "--out", str(tmp_path / "all"))
    assert out.returncode == 0, out.stderr
    ckpt = load_checkpoint(str(tmp_path / "all" / "last.pt"))
    assert ckpt["config"]["embedding_warmup"] == "ce" and ckpt["config"]["warmup_epochs"] == 1
    assert ckpt["config"]["data_options"] == {}  # the default: every target of a training sequence
    out = _cli(*common, "--out", str(tmp_path / "last"), "--train-targets", "last")
    assert out.returncode == 0, out.stderr
    assert load_checkpoint(str(tmp_path / "last" / "last.pt"))["config"]["data_options"] == {"train_targets": "last"}
    bad = _cli(*common, "--out", str(tmp_path / "bad"), "--warmup-epochs", "-1")
    assert bad.returncode == 2 and "--warmup-epochs" in bad.stderr and "Traceback" not in bad.stderr
    bad = _cli("pretrain", "--model", "dreamrec", "--data", "synthetic-seq", "--train-targets", "last",
               "--out", str(tmp_path / "x"))
    assert bad.returncode != 0 and "train_targets" in bad.stderr and "Traceback" not in bad.stderr
