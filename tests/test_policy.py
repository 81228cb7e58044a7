"""The diffusion-policy protocol: an outside model fine-tuned through the adapter, DiffRec paper-code
checkpoints imported, DreamRec fine-tuned, and the checkpoint layout."""

import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import refit_kernels as rk
from refit.data import load_dataset
from refit.policy import ScheduleDenoiser, check_policy, episode_source, outside_state_dict
from refit.reward import collaborative_reward
from refit.runtime.runs import load_checkpoint, save_checkpoint
from refit.families.dreamrec.pretrain import DreamRecConfig, load_seq_recommender, pretrain_dreamrec
from refit.families.dreamrec.losses import dreamrec_loss
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT
from refit.posttrain.run import finetune
from refit.posttrain.common import trajectory_logprob

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = {"n_users": 150, "n_items": 120}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


# --- a model written the way DiffRec's paper code writes it, not refit's -----------------------------

def sinusoid(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PaperDNN(nn.Module):
    """Attributes and layers as the paper code's DNN keeps them; its own forward."""

    def __init__(self, in_dims, out_dims, emb_size, time_type="cat", norm=False, dropout=0.5):
        super().__init__()
        self.in_dims, self.out_dims, self.time_type, self.time_emb_dim, self.norm = \
            in_dims, out_dims, time_type, emb_size, norm
        self.emb_layer = nn.Linear(emb_size, emb_size)
        dims_in = [in_dims[0] + emb_size] + in_dims[1:]
        self.in_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_in[:-1], dims_in[1:]))
        self.out_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(out_dims[:-1], out_dims[1:]))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, timesteps):
        emb = self.emb_layer(sinusoid(timesteps, self.time_emb_dim))
        if self.norm:
            x = nn.functional.normalize(x)
        h = torch.cat([self.drop(x), emb], dim=-1)
        for layer in self.in_layers:
            h = torch.tanh(layer(h))
        for i, layer in enumerate(self.out_layers):
            h = layer(h)
            if i != len(self.out_layers) - 1:
                h = torch.tanh(h)
        return h


def paper_betas(steps=10, scale=0.1, lo=1e-4, hi=0.02):
    """The paper code's linear-var schedule: cumulative variance linear in t, first beta fixed."""
    variance = np.linspace(scale * lo, scale * hi, steps)
    alpha_bar = 1 - variance
    betas = [1 - alpha_bar[0]] + [min(1 - alpha_bar[i] / alpha_bar[i - 1], 0.999) for i in range(1, steps)]
    betas = np.array(betas)
    betas[0] = 1e-5
    return betas


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **DATA)


def make_dnn(n_items, seed=0):
    torch.manual_seed(seed)
    return PaperDNN([n_items, 32], [32, n_items], emb_size=8)


def test_an_outside_model_is_fine_tuned_through_the_adapter(data, tmp_path):
    dnn = make_dnn(data.n_items)
    before = {k: v.clone() for k, v in dnn.state_dict().items()}
    policy = ScheduleDenoiser(dnn, paper_betas(), n_items=data.n_items)
    check_policy(policy)
    cfg = FinetuneConfig(iterations=4, batch_size=16, eval_every=2, checkpoint_every=2, lr=1e-3,
                         out=str(tmp_path / "ft"), progress=False, plot=False)
    summary = finetune(cfg, data, policy=policy)
    assert summary["iterations"] == 4 and summary["status"] == "finished"
    assert {"recall@20", "ndcg@20"} <= set(summary["test"])
    moved = max(float((dnn.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert moved > 1e-5  # the outside module itself was trained
    # The checkpoint holds the outside module's weights, loadable back into it.
    fresh = make_dnn(data.n_items, seed=1)
    fresh.load_state_dict(outside_state_dict(load_checkpoint(str(tmp_path / "ft" / "last.pt"))))
    for k, v in dnn.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_the_adapters_log_probability_is_the_outside_models(data):
    dnn = make_dnn(data.n_items).eval()
    betas = paper_betas(steps=6)
    policy = ScheduleDenoiser(dnn, betas, n_items=data.n_items)
    episode = episode_source(data).sample(5, torch.Generator().manual_seed(0))
    traj = policy.sample(episode.users, episode.inputs, generator=torch.Generator().manual_seed(1))
    got = trajectory_logprob(policy, episode.users, episode.inputs, traj, reduction="sum")
    # The same from the outside model and the schedule directly (float64).
    b = torch.tensor(betas)
    ac = torch.cumprod(1 - b, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    c1, c2 = b * ac_prev.sqrt() / (1 - ac), (1 - ac_prev) * (1 - b).sqrt() / (1 - ac)
    var = b * (1 - ac_prev) / (1 - ac)
    want = torch.zeros(5, dtype=torch.float64)
    for s, t in enumerate(traj.timesteps.tolist()):
        with torch.no_grad():
            out = dnn(traj.states[s], torch.full((5,), t)).double()
        mean = c1[t] * out + c2[t] * traj.states[s].double()
        want += (-0.5 * ((traj.states[s + 1].double() - mean) ** 2 / var[t] + torch.log(2 * math.pi * var[t]))).sum(1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-2)


def save_like_the_paper_code(dnn, path):
    """torch.save of the module, its class being the paper code's models.DNN.DNN."""
    package, fake = types.ModuleType("models"), types.ModuleType("models.DNN")
    cls = type("DNN", (PaperDNN,), {"__module__": "models.DNN"})
    fake.DNN, package.DNN, dnn.__class__ = cls, fake, cls
    assert "models" not in sys.modules
    sys.modules.update({"models": package, "models.DNN": fake})
    try:
        torch.save(dnn, path)
    finally:
        del sys.modules["models"], sys.modules["models.DNN"]


def write_diffrec_split(data, folder):
    """The data as DiffRec's .npy split files (pairs of user, item)."""
    os.makedirs(folder, exist_ok=True)
    for name, m in (("train", data.train), ("valid", data.valid), ("test", data.test)):
        coo = m.tocoo()
        np.save(os.path.join(folder, f"{name}_list.npy"), np.stack([coo.row, coo.col], 1).astype(np.int64))


def test_a_paper_checkpoint_is_imported_without_its_code(data, tmp_path):
    from refit.integrations.diffrec_paper import load_diffrec_paper_checkpoint, read_paper_model

    dnn = make_dnn(data.n_items, seed=3).eval()
    save_like_the_paper_code(dnn, tmp_path / "paper.pth")
    with pytest.raises(ModuleNotFoundError):  # what a plain load does without the paper code
        torch.load(tmp_path / "paper.pth", weights_only=False)
    info = read_paper_model(str(tmp_path / "paper.pth"))
    assert info["class"] == "models.DNN.DNN" and info["out_dims"] == [32, data.n_items]
    assert info["emb_size"] == 8 and info["dropout"] == 0.5 and not info["norm"]
    rec = load_diffrec_paper_checkpoint(str(tmp_path / "paper.pth"), steps=10)
    rec.model.eval()
    x, t = torch.rand(4, data.n_items), torch.tensor([0, 3, 7, 9])
    with torch.no_grad():  # the same function as the paper code's network
        torch.testing.assert_close(rec.model(x, t, None), PaperDNN.forward(dnn, x, t), rtol=1e-5, atol=1e-6)
    # A pickle that would run code when loaded is refused, and nothing runs.
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError):
        read_paper_model(str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_an_imported_checkpoint_is_evaluated_and_fine_tuned_by_the_cli(data, tmp_path):
    write_diffrec_split(data, tmp_path / "data")
    save_like_the_paper_code(make_dnn(data.n_items, seed=4), tmp_path / "paper.pth")

    def refit(*args):
        return subprocess.run([sys.executable, "-m", "refit", "-q", *args], capture_output=True, text=True,
                              env=_env(), timeout=300, cwd=tmp_path)

    imp = refit("import-diffrec", "paper.pth", "--data", "data", "--steps", "10", "--out", "imported.pt")
    assert imp.returncode == 0, imp.stderr
    assert load_checkpoint(str(tmp_path / "imported.pt"))["kind"] == "import"
    ev = refit("evaluate", "--checkpoint", "imported.pt", "--no-baselines", "--json")
    assert ev.returncode == 0, ev.stderr
    assert 0 <= json.loads(ev.stdout)["test"]["recall@20"] <= 1
    ft = refit("finetune", "--checkpoint", "imported.pt", "--iterations", "2", "--batch-size", "8",
               "--eval-every", "2", "--no-plot", "--out", "ft")
    assert ft.returncode == 0, ft.stderr
    assert load_checkpoint(str(tmp_path / "ft" / "last.pt"))["iteration"] == 2
    bad = refit("import-diffrec", "imported.pt", "--data", "data", "--out", "x.pt")
    assert bad.returncode == 2 and "not a pickled DNN" in bad.stderr


def test_a_bare_recommender_state_saves_as_a_checkpoint(data, tmp_path):
    rec = ScheduleDenoiser(make_dnn(data.n_items), paper_betas(), n_items=data.n_items)
    save_checkpoint(str(tmp_path / "m.pt"), rec.state())
    state = load_checkpoint(str(tmp_path / "m.pt"))
    assert state["kind"] == "model" and state["recommender"]["model"]["name"] == "external"
    with pytest.raises(ValueError, match="'recommender' entry"):
        save_checkpoint(str(tmp_path / "x.pt"), {"weights": 1})
    with pytest.raises(ValueError, match="lacks diffusion, inference"):
        save_checkpoint(str(tmp_path / "x.pt"), {"recommender": {"model": {}}})


def test_check_policy_names_what_is_missing():
    with pytest.raises(TypeError, match="lacks sample, outputs"):
        check_policy(object())


def test_the_users_module_keeps_its_mode_through_scoring_and_fine_tuning(data, tmp_path):
    # The wrapper had a mode of its own (train, as every new Module): restoring it after a score put
    # the user's module into train mode, dropout on, and the user's next comparison was off.
    dnn = make_dnn(data.n_items).eval()
    policy = ScheduleDenoiser(dnn, paper_betas(), n_items=data.n_items)
    rows = torch.from_numpy(data.train[:8].toarray())
    a = policy.scores(torch.arange(8), rows)
    assert not dnn.training
    torch.testing.assert_close(policy.scores(torch.arange(8), rows), a)  # no dropout in either
    policy.evaluate(data, ks=(20,))
    assert not dnn.training
    dnn.train()
    policy.evaluate(data, ks=(20,))
    assert dnn.training
    cfg = FinetuneConfig(iterations=2, batch_size=8, eval_every=2, out=str(tmp_path / "ft"), progress=False,
                         plot=False)
    finetune(cfg, data, policy=policy)
    assert dnn.training
    dnn.eval()
    finetune(FinetuneConfig(**{**cfg.to_dict(), "out": str(tmp_path / "ft2")}), data, policy=policy)
    assert not dnn.training


def test_the_configs_precision_applies_to_a_given_policy(data, tmp_path):
    # It was applied to a checkpoint's policy only: finetune(policy=..., precision="bf16") ran in fp32.
    dnn = make_dnn(data.n_items)
    dtypes = set()
    dnn.out_layers[-1].register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    policy = ScheduleDenoiser(dnn, paper_betas(), n_items=data.n_items)
    cfg = FinetuneConfig(iterations=1, batch_size=8, precision="bf16", out=str(tmp_path / "ft"), progress=False,
                         plot=False)
    finetune(cfg, data, policy=policy)
    assert policy.precision == "bf16" and torch.bfloat16 in dtypes


def test_outside_state_dict_refuses_a_checkpoint_without_outside_weights(data):
    from refit.diffusion import GaussianDiffusion
    from refit.families.diffrec.denoisers import build_model
    from refit.families.diffrec.recommender import RowRecommender

    dnn = make_dnn(data.n_items)
    state = ScheduleDenoiser(dnn, paper_betas(), n_items=data.n_items).state()
    assert outside_state_dict(state).keys() == dnn.state_dict().keys()
    own = RowRecommender("diffrec", build_model("diffrec", {"n_items": data.n_items, "dims": [16]}),
                      GaussianDiffusion.from_betas(paper_betas()))
    with pytest.raises(ValueError, match="holds a 'diffrec' model, not an outside module's weights"):
        outside_state_dict({"recommender": own.state()})
    with pytest.raises(ValueError, match="not a refit checkpoint"):
        outside_state_dict({"weights": {}})


def test_an_unwrapped_module_is_refused_before_anything_reads_it(data, tmp_path):
    # Passing the outside module itself failed deep in the trainer with "'PaperDNN' object has no
    # attribute 'selection_metric'"; the protocol's check names everything it lacks, first.
    cfg = FinetuneConfig(iterations=1, batch_size=8, out=str(tmp_path / "ft"), progress=False, plot=False)
    with pytest.raises(TypeError, match="PaperDNN is not a diffusion policy: it lacks sample, outputs"):
        finetune(cfg, data, policy=make_dnn(data.n_items))


def test_a_row_adapter_is_refused_on_sequence_data(tmp_path):
    seq = load_dataset("synthetic-seq", n_users=40, n_items=30, mean_length=6, seed=1)
    policy = ScheduleDenoiser(make_dnn(seq.n_items), paper_betas(), n_items=seq.n_items)
    cfg = FinetuneConfig(iterations=1, batch_size=8, out=str(tmp_path / "ft"), progress=False, plot=False)
    with pytest.raises(ValueError, match="a policy over interactions data, and these data are sequences"):
        finetune(cfg, seq, policy=policy)
    assert not os.path.exists(tmp_path / "ft" / "metrics.jsonl")


class _Delegate:
    """A policy that forwards every protocol call to a real one, so one method can be broken."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        if name == "_inner":  # not set yet (copy.deepcopy builds the object before its __dict__)
            raise AttributeError(name)
        return getattr(self._inner, name)

    def sample(self, users, inputs, *, generator=None, temperature=1.0, rows=None, keep_graph=False, **options):
        return self._inner.sample(users, inputs, generator=generator, temperature=temperature, rows=rows,
                                  keep_graph=keep_graph, **options)

    def outputs(self, users, inputs, traj):
        return self._inner.outputs(users, inputs, traj)

    def final_scores(self, users, inputs, final):
        return self._inner.final_scores(users, inputs, final)

    def pretraining_loss(self, episode, *, generator=None, rows=None):
        return self._inner.pretraining_loss(episode, generator=generator, rows=rows)

    def denoising_loss(self, users, inputs, x0, *, generator=None, rows=None):
        return self._inner.denoising_loss(users, inputs, x0, generator=generator, rows=rows)

    def training_target(self, users, inputs, final, *, exclude=None, k=20):
        return self._inner.training_target(users, inputs, final, exclude=exclude, k=k)

    def evaluate(self, data, *, ks=(20,), batch_size=64):
        return self._inner.evaluate(data, ks=ks, batch_size=batch_size)

    def state(self):
        return self._inner.state()


class _BatchMeanLoss(_Delegate):
    def denoising_loss(self, users, inputs, x0, *, generator=None, rows=None):
        per_row = self._inner.denoising_loss(users, inputs, x0, generator=generator, rows=rows)
        return per_row.mean().expand(per_row.shape[0])  # the model's scalar loss, broadcast


class _PaddingColumn(_Delegate):
    def final_scores(self, users, inputs, final):
        s = self._inner.final_scores(users, inputs, final)
        return torch.cat([s, s[:, :1]], 1)


class _UnsavableState(_Delegate):
    def state(self):  # refit's layout without diffusion / inference: save_checkpoint would refuse it
        return {"model": {"name": "mine", "config": {}, "state_dict": self.module.state_dict()}}


class _NoKeepGraph(_Delegate):
    def sample(self, users, inputs, *, generator=None, temperature=1.0, rows=None):
        return self._inner.sample(users, inputs, generator=generator, temperature=temperature, rows=rows)


@pytest.mark.parametrize("broken, message", [
    (_BatchMeanLoss, "denoising_loss returned the same value for each of 4 rows"),
    (_PaddingColumn, r"final_scores must return \(B, n_items\) scores \(4, 120\), got \(4, 121\)"),
    (_NoKeepGraph, r"sample: the signature .* keep_graph"),
    (_UnsavableState, r"state\(\) names its model 'mine', which refit would rebuild"),
])
def test_check_policy_refuses_wrong_signatures_and_shapes(data, tmp_path, broken, message):
    dnn = make_dnn(data.n_items)
    policy = broken(ScheduleDenoiser(dnn, paper_betas(), n_items=data.n_items))
    check_policy(_Delegate(policy._inner), data)  # the unbroken delegate passes
    with pytest.raises(TypeError, match=message):
        check_policy(policy, data)
    cfg = FinetuneConfig(method="reward-weighted", group_size=4, iterations=1, batch_size=8,
                         out=str(tmp_path / "ft"), progress=False, plot=False)
    with pytest.raises(TypeError, match=message):
        finetune(cfg, data, policy=policy)


def test_the_shape_check_leaves_the_runs_random_draws_alone(data):
    dnn = make_dnn(data.n_items)
    dnn.train()
    policy = ScheduleDenoiser(dnn, paper_betas(), n_items=data.n_items)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    check_policy(policy, data, sample_options={"steps": 5})
    assert torch.equal(torch.get_rng_state(), before)
    assert dnn.training


def test_a_run_given_loaded_data_records_their_source(tmp_path):
    data = load_dataset("synthetic", **DATA)
    assert data.source == "synthetic" and data.source_options == DATA
    policy = ScheduleDenoiser(make_dnn(data.n_items), paper_betas(), n_items=data.n_items)
    cfg = FinetuneConfig(iterations=1, batch_size=8, out=str(tmp_path / "ft"), progress=False, plot=False)
    finetune(cfg, data, policy=policy)
    meta = load_checkpoint(str(tmp_path / "ft" / "best.pt"))["data"]
    assert meta["source"] == "synthetic" and meta["options"] == DATA


class _OwnState(_Delegate):
    """A policy of one's own that writes its checkpoint entry with policy_state."""

    def state(self):
        from refit.policy import policy_state

        return policy_state(self.module, "my-policy", steps=10, note="kept")


def test_policy_state_writes_a_checkpoint_refit_resumes_and_reloads(data, tmp_path):
    from refit.policy import load_outside_policy, policy_state

    def make(d):
        return _OwnState(ScheduleDenoiser(make_dnn(d.n_items, seed=3), paper_betas(), n_items=d.n_items))

    policy = make(data)
    cfg = FinetuneConfig(iterations=4, batch_size=8, eval_every=2, checkpoint_every=2, lr=1e-2,
                         out=str(tmp_path / "ft"), progress=False, plot=False)
    finetune(cfg, data, policy=policy, max_iterations_this_run=2)
    resumed = make(data)  # fresh weights: only a real resume gives the uninterrupted run's
    finetune(cfg, data, policy=resumed, resume=True)
    whole = make(data)
    finetune(FinetuneConfig(**{**cfg.to_dict(), "out": str(tmp_path / "whole")}), data, policy=whole)
    for k, v in whole.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[k], v, msg=k)
    state = load_checkpoint(str(tmp_path / "ft" / "last.pt"))
    model = state["recommender"]["model"]
    assert model["name"] == "external" and model["config"] == {"external": "my-policy", "steps": 10,
                                                                 "note": "kept", "weights_prefix": ""}
    assert outside_state_dict(state).keys() == resumed.module.state_dict().keys()
    again = load_outside_policy("last.pt", state, data, make)
    for k, v in resumed.module.state_dict().items():
        assert torch.equal(again.module.state_dict()[k], v), k
    with pytest.raises(TypeError, match=r"policy_state meta\['table'\] must be a plain value"):
        policy_state(policy.module, "x", table=torch.zeros(2))
    with pytest.raises(TypeError, match="name must be a non-empty string"):
        policy_state(policy.module, "")


OUTSIDE_MODULE = """
import torch
from torch import nn

from refit.policy import ScheduleDenoiser


class Net(nn.Module):
    def __init__(self, n_items, hidden=16):
        super().__init__()
        self.n_items = n_items
        self.inp = nn.Linear(n_items + 1, hidden)
        self.out = nn.Linear(hidden, n_items)

    def forward(self, x, t):
        return self.out(torch.tanh(self.inp(torch.cat([x, t[:, None].float() / 10], 1))))


def make(data):
    torch.manual_seed(0)
    return ScheduleDenoiser(Net(data.n_items), [1e-4 * (i + 1) for i in range(10)], n_items=data.n_items)
"""


def test_an_outside_checkpoint_round_trips_through_the_cli(tmp_path, monkeypatch):
    # The CLI read only refit's own models: an outside policy's checkpoint failed with "unknown model
    # 'external'". A factory named with --policy rebuilds the policy, and the weights are loaded into it.
    (tmp_path / "outside_net.py").write_text(OUTSIDE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import outside_net

    data = load_dataset("synthetic", **DATA)
    summary = finetune(FinetuneConfig(iterations=2, batch_size=8, eval_every=2, lr=1e-2, out=str(tmp_path / "ft"),
                                      progress=False, plot=False), data, policy=outside_net.make(data))

    def refit(*args):
        return subprocess.run([sys.executable, "-m", "refit", "-q", *args], capture_output=True, text=True,
                              env=_env(), timeout=300, cwd=tmp_path)

    bare = refit("evaluate", "--checkpoint", "ft/best.pt", "--json")
    assert bare.returncode == 2 and "holds an outside policy's weights (Net)" in bare.stderr
    assert "--policy MODULE:FUNCTION" in bare.stderr
    ev = refit("evaluate", "--checkpoint", "ft/best.pt", "--policy", "outside_net:make", "--json")
    assert ev.returncode == 0, ev.stderr
    got = json.loads(ev.stdout)["test"]
    assert got["recall@20"] == pytest.approx(summary["test"]["recall@20"], abs=1e-6)
    ft = refit("finetune", "--checkpoint", "ft/best.pt", "--policy", "outside_net:make", "--iterations", "2",
               "--batch-size", "8", "--eval-every", "2", "--no-plot", "--out", "ft2")
    assert ft.returncode == 0, ft.stderr
    state = load_checkpoint(str(tmp_path / "ft2" / "last.pt"))
    assert state["iteration"] == 2 and state["config"]["policy_factory"] == "outside_net:make"
    resumed = refit("finetune", "--checkpoint", "ft/best.pt", "--policy", "outside_net:make", "--iterations", "3",
                    "--batch-size", "8", "--eval-every", "2", "--no-plot", "--out", "ft2", "--resume")
    assert resumed.returncode == 0, resumed.stderr  # a run continues to more iterations
    assert load_checkpoint(str(tmp_path / "ft2" / "last.pt"))["iteration"] == 3
    for spec, message in [("outside_net:nope", "outside_net has no function 'nope'"),
                          ("no_such_module:make", "cannot import 'no_such_module'"),
                          ("outside_net", "--policy must be MODULE:FUNCTION")]:
        bad = refit("evaluate", "--checkpoint", "ft/best.pt", "--policy", spec)
        assert bad.returncode == 2 and message in bad.stderr, (spec, bad.stderr)
    own = refit("evaluate", "--checkpoint", "ft2/best.pt", "--policy", "outside_net:make", "--json")
    assert own.returncode == 0, own.stderr


# --- DreamRec through the same trainer -----------------------------------------------------------

SEQ = {"n_users": 100, "n_items": 50, "mean_length": 10, "seed": 2}


@pytest.fixture(scope="module")
def dreamrec(tmp_path_factory):
    out = tmp_path_factory.mktemp("dreamrec") / "run"
    # w_grid None: the policy keeps w 2, so both halves of the guided mean carry gradient (a weight chosen
    # on validation may be 0, which leaves the unconditional half out of the policy).
    pretrain_dreamrec(DreamRecConfig(data="synthetic-seq", data_options=SEQ, hidden=16, steps=12, batch_size=64,
                                     epochs=3, eval_every=3, eval_batch_size=64, lr=5e-3, progress=False,
                                     w_grid=None, out=str(out)))
    return str(out / "best.pt")


def test_dreamrec_episodes_count_the_target_and_similar_sequences(dreamrec):
    rec, data, _ = load_seq_recommender(dreamrec)
    trainer = ReFiT(rec, data, FinetuneConfig(checkpoint=dreamrec, batch_size=8, progress=False, plot=False))
    episode, lo, n = trainer.draw()
    assert n == 8 and lo == 0
    history, lengths = episode.inputs
    assert history.shape == (8, data.max_len) and episode.positives.indptr.tolist() == list(range(9))
    inputs, traj, reward = trainer.rollout(episode, lo, n)
    assert traj.states.shape == (rec.diffusion.steps, 8, 16)
    scores = rec.final_scores(episode.users, inputs, traj.final)
    want = collaborative_reward(scores, episode, trainer.neighbors[episode.users], trainer.train_csr, k=20)
    torch.testing.assert_close(reward.reward, want.reward)
    # N_K counts the target item in the top 20, nothing else.
    top = rk.topk_hits(scores, (20,), exclude=episode.exclude, return_indices=True).indices
    targets = episode.positives.indices
    assert reward.n_k.tolist() == [float(int(t) in r.tolist()) for t, r in zip(targets, top)]
    # The ELBO anchor of DreamRec is its own training loss on the episodes' targets.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = rec.pretraining_loss(episode._replace(inputs=inputs), generator=g1)
    b = dreamrec_loss(rec, history, lengths, targets=targets, generator=g2)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("options", [
    dict(baseline="mean-std"),
    dict(group_size=4, baseline="group", anchor="kl", anchor_weight=0.5),
    dict(anchor="elbo", anchor_weight=0.1, ppo_epochs=2),
    dict(reuse_sampling_graph=True, precision="bf16"),
])
def test_dreamrec_fine_tunes_with_every_option(dreamrec, tmp_path, options):
    rec, data, _ = load_seq_recommender(dreamrec)
    before = {k: v.clone() for k, v in rec.model.state_dict().items()}
    cfg = FinetuneConfig(checkpoint=dreamrec, iterations=2, batch_size=16, eval_every=2, lr=1e-3, grad_clip=10.0,
                         out=str(tmp_path / "ft"), progress=False, plot=False, **options)
    trainer = ReFiT(rec, data, cfg)
    stats = trainer.step()
    assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    if options.get("anchor") == "kl":
        assert stats["anchor"] == pytest.approx(0.0, abs=1e-6)  # the policy is still the reference
    moved = max(float((rec.model.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert moved > 0
    summary = finetune(cfg)
    assert summary["status"] == "finished" and "hr@20" in summary["test"]


def test_dreamrec_policy_gradient_reaches_the_encoder(dreamrec):
    rec, data, _ = load_seq_recommender(dreamrec)
    trainer = ReFiT(rec, data, FinetuneConfig(checkpoint=dreamrec, batch_size=8, progress=False, plot=False))
    episode, lo, n = trainer.draw()
    inputs, traj, _ = trainer.rollout(episode, lo, n)
    logp = trajectory_logprob(rec, episode.users, inputs, traj)
    logp.sum().backward()
    grads = {name: p.grad for name, p in rec.model.named_parameters()}
    assert grads["q.weight"] is not None and float(grads["q.weight"].abs().sum()) > 0  # through the guidance
    assert float(grads["diffuser.0.weight"].abs().sum()) > 0
    assert float(grads["none_embedding"].abs().sum()) > 0  # the unconditional half of the guided mean
