"""RecBole drop-in: checkpoints in and out, scores, ids, split and metrics against RecBole itself.

The round trip tests train tiny DiffRec models with RecBole 1.2.x (in a
subprocess: RecBole needs NumPy aliases that NumPy 2 removed, patched there
only) and skip when RecBole cannot be imported. refit itself reads and writes
the checkpoints in this process without importing RecBole. The other tests
need no RecBole: they build RecBole-shaped checkpoints by hand.
"""

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import refit_kernels as rk
from refit.integrations.recbole import (
    Opaque,
    RecBoleMismatch,
    check_scores,
    diffrec_from_recbole,
    evaluate_like_recbole,
    export_recbole_checkpoint,
    load_recbole_checkpoint,
    read_pickle,
    recbole_data,
    recbole_reference_scores,
)
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT

# --- RecBole itself, in a subprocess --------------------------------------------------------------

_SHIM = """
import numpy as np
# RecBole 1.2.1 uses aliases that NumPy 2 removed (np.float in its metrics, np.float_ in its
# Config); its Config restores some of them, but a Config read from a checkpoint does not.
for _old, _new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_),
                   ("float", float), ("int", int), ("bool", bool), ("object", object), ("complex", complex),
                   ("str", str), ("long", int), ("unicode", str)):
    if _old not in np.__dict__:
        setattr(np, _old, _new)
"""

_SCRIPT = _SHIM + textwrap.dedent("""
import json, os, sys
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.general_recommender import DiffRec
from recbole.trainer import Trainer
from recbole.utils import init_logger, init_seed

mode, spec_file = sys.argv[1], sys.argv[2]
spec = json.load(open(spec_file))


def scores_of(model, users, seed):
    model.eval()
    torch.manual_seed(seed)  # RecBole draws its noise from the global generator
    with torch.no_grad():
        return model.full_sort_predict({model.USER_ID: torch.tensor(users)})


def build(config):
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    return train, valid, test, DiffRec(config, train._dataset)


if mode == "train":
    results = []
    for run in spec["runs"]:
        config = Config(model="DiffRec", dataset="ml-100k", config_dict=run["config"])
        train, valid, test, model = build(config)
        trainer = Trainer(config, model)
        trainer.fit(train, valid, saved=True, show_progress=False)
        metrics = trainer.evaluate(test, load_best_model=True, show_progress=False)
        ds = train._dataset
        split = {name: [loader._dataset.inter_feat[ds.uid_field].tolist(),
                        loader._dataset.inter_feat[ds.iid_field].tolist()]
                 for name, loader in (("train", train), ("valid", valid), ("test", test))}
        users = list(range(1, 1 + spec["n_users"]))
        torch.save({"users": users, "scores": scores_of(model, users, spec["seed"]),
                    "user_tokens": list(ds.field2id_token[ds.uid_field]),
                    "item_tokens": list(ds.field2id_token[ds.iid_field]), "split": split},
                   os.path.join(run["config"]["checkpoint_dir"], "recbole_view.pt"))
        results.append({"checkpoint": trainer.saved_model_file, "test": {k: float(v) for k, v in metrics.items()}})
    json.dump(results, open(spec["out"], "w"))
else:  # evaluate a checkpoint with RecBole's own loading and evaluator
    checkpoint = torch.load(spec["checkpoint"], weights_only=False)
    config = checkpoint["config"]  # a real RecBole Config again
    train, valid, test, model = build(config)
    trainer = Trainer(config, model)
    metrics = trainer.evaluate(test, load_best_model=True, model_file=spec["checkpoint"], show_progress=False)
    users = list(range(1, 1 + spec["n_users"]))
    torch.save({"scores": scores_of(model, users, spec["seed"]), "type": type(config).__module__},
               spec["out"] + ".pt")
    json.dump({"test": {k: float(v) for k, v in metrics.items()}}, open(spec["out"], "w"))
""")


def _recbole_skip_reason():
    if importlib.util.find_spec("recbole") is None:
        return "RecBole is not installed (see docs/drop-in.md: RecBole drop-in)"
    probe = subprocess.run([sys.executable, "-c", _SHIM + "\nimport recbole.config, recbole.data, recbole.trainer\n"
                            "import recbole.model.general_recommender"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"RecBole is installed but cannot be imported here: {last}"
    return None


_REASON = None


def _need_recbole():
    global _REASON
    if _REASON is None:
        _REASON = _recbole_skip_reason() or ""
    if _REASON:
        pytest.skip(_REASON)


def _run(mode, spec, tmp):
    script = tmp / "recbole_script.py"
    script.write_text(_SCRIPT)
    spec_file = tmp / f"spec-{mode}.json"
    spec_file.write_text(json.dumps(spec))
    # One thread: the models are tiny, and an OpenMP team of two stalls at its barriers whenever another
    # process holds a core (measured 30x slower in benchmarks/results/contention.md), which took this training past
    # its timeout on a shared machine.
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script), mode, str(spec_file)], capture_output=True, text=True,
                         cwd=tmp, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.load(open(spec["out"]))


def _config(tmp, name, **overrides):
    import refit.data as refit_data

    folder = os.path.dirname(refit_data._recbole_ml100k())
    cfg = {"data_path": os.path.dirname(folder), "checkpoint_dir": str(tmp / name), "epochs": 3,
           "dims_dnn": [64], "steps": 5, "train_batch_size": 256, "eval_batch_size": 4096, "topk": [10, 20],
           "metrics": ["Recall", "NDCG", "MRR", "Precision"], "valid_metric": "Recall@20", "show_progress": False,
           "use_gpu": False, "state": "WARNING", "save_dataloaders": True,
           "dataloaders_save_path": None}
    cfg.update(overrides)
    return cfg


N_CHECK, SEED = 48, 123


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three tiny RecBole DiffRecs on ML-100K: the default x0 model and two other configurations."""
    _need_recbole()
    tmp = tmp_path_factory.mktemp("recbole")
    runs = [
        {"config": _config(tmp, "x0")},
        # eps prediction, cosine schedule, normalised input, noised start, mirrored 3-layer MLP
        {"config": _config(tmp, "eps", epochs=1, mean_type="eps", noise_schedule="cosine", steps=8,
                           noise_scale=0.01, norm=True, sampling_steps=3, dims_dnn=[48, 24, 48])},
        # linear-var schedule with sampling noise at every step
        {"config": _config(tmp, "noisy", epochs=1, noise_schedule="linear-var", noise_scale=0.005,
                           noise_min=0.005, noise_max=0.01, steps=6, sampling_noise=True)},
    ]
    results = _run("train", {"runs": runs, "out": str(tmp / "trained.json"), "n_users": N_CHECK, "seed": SEED}, tmp)
    for run, res in zip(runs, results):
        res["view"] = torch.load(os.path.join(run["config"]["checkpoint_dir"], "recbole_view.pt"), weights_only=False)
        res["dir"] = run["config"]["checkpoint_dir"]
    return tmp, results


def _refit_scores(rec, data, users, seed):
    rows = rk.gather_rows(data.train, torch.tensor(users))
    return rec.scores(torch.tensor(users), rows, generator=torch.Generator().manual_seed(seed))


def _close_metrics(ours, recbole_metrics):
    """RecBole rounds its metrics to 4 decimals."""
    for key, value in recbole_metrics.items():
        assert abs(round(ours[key], 4) - value) < 1e-9, (key, ours[key], value)


def test_load_reproduces_recbole_scores_ids_split_and_metrics(trained):
    tmp, results = trained
    res = results[0]
    ck = load_recbole_checkpoint(res["checkpoint"])  # also runs the score check on load
    assert "recbole" not in sys.modules, "loading a checkpoint imported RecBole"
    view = res["view"]
    np.testing.assert_array_equal(ck.ids.user_tokens, np.array(view["user_tokens"], dtype=str))
    np.testing.assert_array_equal(ck.ids.item_tokens, np.array(view["item_tokens"], dtype=str))
    for split in ("train", "valid", "test"):
        u, i = view["split"][split]
        theirs = sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(ck.data.n_users, ck.data.n_items))
        assert (getattr(ck.data, split) != (theirs > 0).astype(np.float32)).nnz == 0, split
    # The same split read from RecBole's saved dataloaders.
    saved = [f for f in os.listdir(res["dir"]) if f.endswith("-dataloader.pth")]
    d2, ids2 = recbole_data(ck.config, dataloaders=os.path.join(res["dir"], saved[0]))
    assert (d2.test != ck.data.test).nnz == 0 and (d2.train != ck.data.train).nnz == 0
    np.testing.assert_array_equal(ids2.item_tokens, ck.ids.item_tokens)
    ours = _refit_scores(ck.recommender, ck.data, view["users"], SEED)
    torch.testing.assert_close(ours, view["scores"].float(), rtol=1e-5, atol=1e-6)
    _close_metrics(evaluate_like_recbole(ck.recommender, ck.data, ("test",), ks=(10, 20))["test"], res["test"])


@pytest.mark.parametrize("which", [1, 2], ids=["eps-cosine-norm-noised-start", "linear-var-sampling-noise"])
def test_other_configurations_reproduce_recbole_scores(trained, which):
    _, results = trained
    res = results[which]
    ck = load_recbole_checkpoint(res["checkpoint"])
    ours = _refit_scores(ck.recommender, ck.data, res["view"]["users"], SEED)
    # Both configurations draw noise at inference (same seeded draws on both sides), so the
    # scores are compared here, not RecBole's metrics (drawn from its own random state).
    torch.testing.assert_close(ours, res["view"]["scores"].float(), rtol=1e-4, atol=1e-5)


def test_finetune_export_and_evaluate_with_recbole(trained):
    tmp, results = trained
    res = results[0]
    ck = load_recbole_checkpoint(res["checkpoint"])
    rec, data = ck.recommender, ck.data
    before = {k: v.clone() for k, v in rec.model.state_dict().items()}
    # A few ReFiT iterations (REINFORCE on the collaborative reward); a large learning rate so that
    # five steps visibly move the scores.
    trainer = ReFiT(rec, data, FinetuneConfig(batch_size=32, lr=1e-3, seed=0, progress=False, plot=False))
    for _ in range(5):
        stats = trainer.step()
        assert np.isfinite(stats["loss"]) and 0.0 <= stats["reward"] <= 1.0
    rec.model.eval()
    assert any(not torch.equal(before[k], v) for k, v in rec.model.state_dict().items())
    tuned = evaluate_like_recbole(rec, data, ("test",), ks=(10, 20))["test"]
    ours = _refit_scores(rec, data, res["view"]["users"], SEED)
    assert not torch.allclose(ours, res["view"]["scores"].float())

    out = str(tmp / "exported.pth")
    export_recbole_checkpoint(rec, ck, out)
    # refit reads its own export back (the check on load passes) ...
    again = load_recbole_checkpoint(out)
    torch.testing.assert_close(_refit_scores(again.recommender, again.data, res["view"]["users"], SEED), ours)
    # ... and RecBole loads it with its own classes and evaluates it with its own evaluator.
    theirs = _run("evaluate", {"checkpoint": out, "out": str(tmp / "evaluated.json"), "n_users": N_CHECK,
                               "seed": SEED}, tmp)
    view = torch.load(str(tmp / "evaluated.json") + ".pt", weights_only=False)
    assert view["type"].startswith("recbole.")
    torch.testing.assert_close(view["scores"].float(), ours, rtol=1e-5, atol=1e-6)
    _close_metrics(tuned, theirs["test"])


# --- without RecBole: hand-made RecBole-shaped checkpoints -------------------------------------------------

def _recbole_like(n_items=30, hidden=(16,), emb=6, seed=0, **cfg):
    g = torch.Generator().manual_seed(seed)
    widths = [n_items + emb, *hidden, n_items]
    sd = {"mlp.emb_layer.weight": torch.randn(emb, emb, generator=g) * 0.3,
          "mlp.emb_layer.bias": torch.randn(emb, generator=g) * 0.1}
    for j, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        sd[f"mlp.mlp_layers.mlp_layers.{3 * j + 1}.weight"] = torch.randn(b, a, generator=g) / a ** 0.5
        sd[f"mlp.mlp_layers.mlp_layers.{3 * j + 1}.bias"] = torch.randn(b, generator=g) * 0.1
    config = {"model": "DiffRec", "mean_type": "x0", "steps": 5, "noise_schedule": "linear", "noise_scale": 0.001,
              "noise_min": 0.0005, "noise_max": 0.005, "sampling_steps": 0, "sampling_noise": False,
              "beta_fixed": True, "embedding_size": emb, "dims_dnn": list(hidden), "mlp_act_func": "tanh",
              "time-aware": False, "norm": False, "history_num_per_term": 10}
    config.update(cfg)
    return sd, config


def _rows(n_items=30, b=8, seed=1):
    r = (torch.rand((b, n_items), generator=torch.Generator().manual_seed(seed)) < 0.2).float()
    r[:, 0] = 0
    return r


@pytest.mark.parametrize("cfg", [
    {},
    {"mean_type": "eps", "noise_schedule": "cosine", "norm": True, "sampling_steps": 2},
    {"noise_schedule": "linear-var", "sampling_noise": True, "steps": 7},
    {"noise_scale": 0.0, "steps": 3},
], ids=["x0-linear", "eps-cosine", "linear-var-noise", "no-noise"])
def test_mapping_reproduces_the_reference(cfg):
    sd, config = _recbole_like(hidden=(20, 12, 20), **cfg)
    rec = diffrec_from_recbole(sd, config)
    assert rec.model.dims == [12, 20]
    worst = check_scores(rec, sd, config, _rows())
    scale = float(recbole_reference_scores(sd, config, _rows(), torch.Generator().manual_seed(0)).abs().max())
    assert worst <= 1e-6 * scale  # float32 rounding only (eps mode folds RecBole's two steps into one)


def test_the_check_catches_a_wrong_model():
    sd, config = _recbole_like()
    rec = diffrec_from_recbole(sd, config)
    with torch.no_grad():
        rec.model.out_layers[0].bias[3] += 0.05  # a mapping bug in one output
    with pytest.raises(RecBoleMismatch, match="does not reproduce RecBole's scores.*item 3"):
        check_scores(rec, sd, config, _rows())
    # A diffusion that differs from RecBole's (here: another schedule) is caught too.
    rec = diffrec_from_recbole(sd, {**config, "noise_schedule": "cosine"})
    with pytest.raises(RecBoleMismatch, match="largest difference"):
        check_scores(rec, sd, config, _rows())


@pytest.mark.parametrize("change, message", [
    ({"mlp_act_func": "relu"}, "mlp_act_func"),
    ({"time-aware": True}, "time-aware"),
    ({"beta_fixed": False}, "beta_fixed"),
    ({"noise_schedule": "binomial"}, "binomial"),
    ({"embedding_size": 9}, "embedding_size"),
    ({"dims_dnn": [17]}, "dims_dnn"),
    ({"model": "LDiffRec"}, "only DiffRec"),
])
def test_unsupported_settings_are_named(change, message):
    sd, config = _recbole_like()
    with pytest.raises(RecBoleMismatch, match=message):
        diffrec_from_recbole(sd, {**config, **change})


def test_unmirrored_layers_are_named():
    sd, config = _recbole_like(hidden=(24, 12))
    with pytest.raises(RecBoleMismatch, match=r"hidden widths \[24, 12\].*not mirrored"):
        diffrec_from_recbole(sd, config)
    sd, config = _recbole_like()
    sd["mlp.mlp_layers.mlp_layers.4.weight"] = torch.zeros(30, 15)
    with pytest.raises(RecBoleMismatch, match="do not chain"):
        diffrec_from_recbole(sd, config)


def test_reference_follows_recbole_definitions():
    """The re-implementation against RecBole's formulas written out by hand, independent of refit."""
    sd, config = _recbole_like(steps=2, noise_scale=0.1, noise_min=0.1, noise_max=0.5)
    rows = _rows()
    out = recbole_reference_scores(sd, config, rows)

    def mlp(x, t):
        half = 3
        freqs = torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        temb = torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)]).expand(x.shape[0], -1)
        emb = torch.nn.functional.linear(temb, sd["mlp.emb_layer.weight"], sd["mlp.emb_layer.bias"])
        h = torch.tanh(torch.nn.functional.linear(torch.cat([x, emb], 1), sd["mlp.mlp_layers.mlp_layers.1.weight"],
                                                  sd["mlp.mlp_layers.mlp_layers.1.bias"]))
        return torch.nn.functional.linear(h, sd["mlp.mlp_layers.mlp_layers.4.weight"],
                                          sd["mlp.mlp_layers.mlp_layers.4.bias"])

    # linear schedule over 2 steps: betas = (0.01, 0.05), the first fixed at 1e-5 (beta_fixed)
    b0, b1 = 1e-5, 0.05
    a0, a1 = 1 - b0, (1 - b0) * (1 - b1)
    coef1_t1 = b1 * np.sqrt(a0) / (1 - a1)
    coef2_t1 = (1 - a0) * np.sqrt(1 - b1) / (1 - a1)
    x1 = float(coef1_t1) * mlp(rows, 1.0) + float(coef2_t1) * rows
    # at t = 0: alpha_bar_prev = 1, so coef1 = b0 / (1 - a0) = 1 and coef2 = 0
    expected = mlp(x1, 0.0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _fake_recbole_module():
    mod = types.ModuleType("fakebole_config")

    class Config:
        def __init__(self, d):
            self.final_config_dict = d
            self.parameters = {"x": [1]}

    Config.__module__ = "fakebole_config"
    Config.__qualname__ = "Config"
    mod.Config = Config
    return mod


def test_checkpoint_round_trip_keeps_foreign_classes(tmp_path, monkeypatch):
    """A checkpoint holding a class refit does not import is read as an Opaque and written back as that class."""
    mod = _fake_recbole_module()
    monkeypatch.setitem(sys.modules, "fakebole_config", mod)
    sd, config = _recbole_like()
    path = str(tmp_path / "DiffRec-x.pth")
    torch.save({"config": mod.Config(config), "epoch": 3, "state_dict": sd, "other_parameter": {},
                "optimizer": {"state": {}}}, path)
    monkeypatch.delitem(sys.modules, "fakebole_config")
    ck = load_recbole_checkpoint(path, data=False)
    assert isinstance(ck.state["config"], Opaque) and ck.config["steps"] == 5
    rec = ck.recommender
    with torch.no_grad():
        rec.model.emb_layer.bias.add_(0.25)
    out = str(tmp_path / "export.pth")
    export_recbole_checkpoint(rec, ck, out)
    monkeypatch.setitem(sys.modules, "fakebole_config", mod)
    back = torch.load(out, weights_only=False)
    assert type(back["config"]) is mod.Config and back["config"].final_config_dict == config
    assert back["config"].parameters == {"x": [1]} and back["epoch"] == 3
    torch.testing.assert_close(back["state_dict"]["mlp.emb_layer.bias"], sd["mlp.emb_layer.bias"] + 0.25)
    assert set(back["state_dict"]) == set(sd)


def test_export_refuses_other_settings(tmp_path):
    sd, config = _recbole_like()
    path = str(tmp_path / "c.pth")
    torch.save({"config": config, "state_dict": sd}, path)
    ck = load_recbole_checkpoint(path, data=False)
    other = diffrec_from_recbole(sd, {**config, "steps": 9})
    with pytest.raises(RecBoleMismatch, match="steps"):
        export_recbole_checkpoint(other, ck, str(tmp_path / "o.pth"))
    wider = diffrec_from_recbole(*_recbole_like(hidden=(18,)))
    with pytest.raises(RecBoleMismatch, match="shape"):
        export_recbole_checkpoint(wider, ck, str(tmp_path / "o.pth"))


def test_bad_files_are_refused(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        read_pickle(str(tmp_path / "junk.pth"))
    torch.save({"weights": 1}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a RecBole checkpoint"):
        load_recbole_checkpoint(str(tmp_path / "other.pth"), data=False)
    with pytest.raises(FileNotFoundError):
        load_recbole_checkpoint(str(tmp_path / "missing.pth"))
    torch.save({"config": {"model": "DiffRec"}, "state_dict": {"w": torch.zeros(1)}}, tmp_path / "empty.pth")
    with pytest.raises(RecBoleMismatch, match="no RecBole DiffRec layers"):
        load_recbole_checkpoint(str(tmp_path / "empty.pth"), data=False)


def test_unpickling_never_imports_unknown_modules(tmp_path):
    """Classes outside torch/numpy/builtins become Opaque stand-ins: nothing of theirs runs."""
    payload = pickle.dumps({"x": os.system}, protocol=4)  # a global that a plain pickle.load would resolve
    (tmp_path / "p.pkl").write_bytes(payload)
    loaded = read_pickle(str(tmp_path / "p.pkl"))
    assert isinstance(loaded["x"], type) and issubclass(loaded["x"], Opaque)


_PAYLOAD_FLAG = "REFIT_TEST_RECBOLE_PAYLOAD_RAN"


class _Payload:
    """Unpickling this with plain pickle creates a marker file and sets an environment variable."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        code = f"import os; open({self.marker!r}, 'w').close(); os.environ[{_PAYLOAD_FLAG!r}] = '1'"
        return (exec, (code,))


def _text(s):
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE


def _arg(a):
    if a is None:
        return b"N"
    if a is True:
        return b"\x88"
    if isinstance(a, str):
        return _text(a)
    return b"B" + len(a).to_bytes(4, "little") + a  # BINBYTES


def _call(module, name, *args):
    """A protocol 4 pickle calling module.name(*args) (str, bytes, None, True arguments); names may be dotted."""
    return b"\x80\x04" + _text(module) + _text(name) + b"\x93(" + b"".join(map(_arg, args)) + b"tR."


def _malicious(case, tmp_path, marker):
    evil = pickle.dumps(_Payload(marker), protocol=2)
    if case == "reduce":  # the class's __reduce__: builtins.exec
        return evil
    if case == "dotted-global":  # os.system reached through an attribute path from torch
        return _call("torch", "serialization.os.system", f"touch {marker}")
    if case == "numpy-load":  # numpy.load(path, None, allow_pickle=True) of a second, plain pickle
        (tmp_path / "second.npy").write_bytes(evil)
        return _call("numpy", "load", str(tmp_path / "second.npy"), None, True)
    if case == "nested-torch-bytes":  # torch.storage._load_from_bytes unpickles its bytes with plain pickle
        return _call("torch.storage", "_load_from_bytes", evil)
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["reduce", "dotted-global", "numpy-load", "nested-torch-bytes"])
def test_malicious_pickles_never_run(tmp_path, case):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    path.write_bytes(_malicious(case, tmp_path, marker))
    try:
        read_pickle(str(path))
    except ValueError as exc:
        assert "evil.pth" in str(exc)
    assert not marker.exists() and _PAYLOAD_FLAG not in os.environ
    # The same inside a torch.save checkpoint, as RecBole writes them.
    sd, config = _recbole_like()
    torch.save({"config": {**config, "evil": _Payload(marker)}, "state_dict": sd, "other_parameter": _Payload(marker)},
               tmp_path / "c.pth")
    ck = load_recbole_checkpoint(str(tmp_path / "c.pth"), data=False)
    assert isinstance(ck.state["other_parameter"], Opaque)
    assert not marker.exists() and _PAYLOAD_FLAG not in os.environ


def test_a_pickle_cannot_set_attributes_of_classes_or_functions(tmp_path):
    """BUILD on a global (not an instance) would change it for the whole process."""
    for module, name in (("torch", "Tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict")):
        state = b"N}" + _text("refit_was_here") + b"K\x01s\x86"  # (None, {"refit_was_here": 1}): slot state
        payload = b"\x80\x04" + _text(module) + _text(name) + b"\x93" + state + b"b."
        (tmp_path / "p.pkl").write_bytes(payload)
        with pytest.raises(ValueError, match="sets attributes of"):
            read_pickle(str(tmp_path / "p.pkl"))
    assert not hasattr(torch.Tensor, "refit_was_here")
    assert not hasattr(torch._utils._rebuild_tensor_v2, "refit_was_here")


def _write_inter(path, rows, header="user_id:token\titem_id:token\ttimestamp:float"):
    path.write_text(header + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))


def test_atomic_data_replays_recbole_remapping_and_split(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for u in ["u7", "u3", "u9", "u1"]:
        for it in rng.choice(40, size=int(rng.integers(3, 15)), replace=False):
            rows.append((u, f"i{it}", int(rng.integers(0, 1000))))
    rng.shuffle(rows)
    folder = tmp_path / "toy"
    folder.mkdir()
    _write_inter(folder / "toy.inter", rows)
    base = {"dataset": "toy", "data_path": str(folder), "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id",
            "TIME_FIELD": "timestamp", "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "seed": 5}
    for order in ("RO", "TO"):
        cfg = {**base, "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": order, "group_by": "user"}}
        data, ids = recbole_data(cfg)
        # Tokens are numbered from 1 in order of first appearance; 0 is [PAD].
        users_seen = list(dict.fromkeys(r[0] for r in rows))
        items_seen = list(dict.fromkeys(r[1] for r in rows))
        assert ids.user_tokens.tolist() == ["[PAD]"] + users_seen
        assert ids.item_tokens.tolist() == ["[PAD]"] + items_seen
        assert data.n_users == 5 and data.train[0].nnz == 0 and data.train[:, 0].nnz == 0
        # Per user, RecBole's counts: int(0.1 n) for valid and test (at least one each), the rest train.
        for u in users_seen:
            mine = [r for r in rows if r[0] == u]
            n, iu = len(mine), int(ids.user_index([u])[0])
            counts = [data.train[iu].nnz, data.valid[iu].nnz, data.test[iu].nnz]
            assert sum(counts) == n and counts[1] == max(int(0.1 * n), 1) == counts[2]
            if order == "TO":  # the latest interactions go to the test
                latest = sorted(mine, key=lambda r: r[2])[-counts[2]:]
                assert set(ids.item_index([r[1] for r in latest])) == set(data.test[iu].indices)
    with pytest.raises(RecBoleMismatch, match="rm_dup_inter"):
        recbole_data({**base, "rm_dup_inter": "first"})
    with pytest.raises(RecBoleMismatch, match="user_inter_num_interval"):
        recbole_data({**base, "user_inter_num_interval": "[5,inf)"})
    with pytest.raises(FileNotFoundError, match="data_path"):
        recbole_data({**base, "data_path": str(tmp_path / "gone")})
    with pytest.raises(KeyError, match="unknown user"):
        ids.user_index(["nobody"])


def test_evaluate_like_recbole_masks_pad_and_skips_users_without_positives():
    train = sp.csr_matrix(np.array([[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float32))
    valid = sp.csr_matrix(np.array([[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=np.float32))
    test = sp.csr_matrix(np.array([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]], dtype=np.float32))
    from refit.data import InteractionData

    data = InteractionData("t", 3, 4, train, valid, test, np.arange(3), np.arange(4))
    # [PAD] (item 0) scores highest: it must never be ranked.
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0]).expand(3, -1)
    m = evaluate_like_recbole(lambda u: scores[: len(u)], data, ks=(1, 2))
    assert m["valid"]["n_users"] == 1 and m["valid"]["recall@1"] == 1.0
    assert m["test"]["n_users"] == 2 and m["test"]["recall@1"] == 0.5 and m["test"]["recall@2"] == 1.0
