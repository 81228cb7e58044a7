"""What a checkpoint holds is checked before a model is built from it: damaged or NaN weights, shapes and
settings of imported DiffRec paper checkpoints, NumPy dtypes marked as holding objects, and the data a
checkpoint meets (its fingerprint)."""

import logging
import os
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from refit.data import load_dataset
from refit.diffusion import DiffusionConfig, GaussianDiffusion
from refit.integrations import diffrec_paper
from refit.integrations.diffrec_paper import load_diffrec_paper_checkpoint, read_paper_model
from refit.families.diffrec.denoisers import DiffRecMLP
from refit.families.dreamrec.network import DreamRec
from refit.families.diffrec.pretrain import load_recommender
from refit.families.diffrec.recommender import RowRecommender
from refit.runtime.runs import data_fingerprint, load_checkpoint, save_checkpoint
from refit.families.dreamrec.recommender import SeqRecommender
from refit.families.dreamrec.pretrain import load_seq_recommender
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.run import finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAGS = {"format": "refit-checkpoint", "version": 1}
SIZES = {"n_users": 60, "n_items": 40}


def _refit(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-m", "refit", "-q", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


def _diffrec(n_items, seed=0):
    torch.manual_seed(seed)
    return RowRecommender("diffrec", DiffRecMLP(n_items, dims=[8], emb_size=4),
                       GaussianDiffusion(DiffusionConfig(steps=5)))


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **SIZES, seed=1)


@pytest.fixture(scope="module")
def other(data):
    """Another data set with as many items."""
    d = load_dataset("synthetic", **SIZES, seed=2)
    assert d.n_items == data.n_items and data_fingerprint(d) != data_fingerprint(data)
    return d


def _save(path, rec, data=None, **extra):
    meta = {} if data is None else {"data": {"source": "synthetic", "options": dict(SIZES, seed=1),
                                             "fingerprint": data_fingerprint(data), "n_users": data.n_users,
                                             "n_items": data.n_items}}
    save_checkpoint(str(path), {"kind": "pretrain", "recommender": rec.state(), **meta, **extra})
    return str(path)


# --- a DiffRec paper-code checkpoint (a pickled models.DNN.DNN) -------------------------------------

class PaperDNN(nn.Module):
    """The paper code's DNN attributes and layers (what its pickle holds); no forward is needed here."""

    def __init__(self, in_dims, out_dims, emb_size, dropout=0.5):
        super().__init__()
        self.in_dims, self.out_dims, self.time_emb_dim, self.time_type, self.norm = \
            in_dims, out_dims, emb_size, "cat", False
        self.emb_layer = nn.Linear(emb_size, emb_size)
        widths = [in_dims[0] + emb_size] + in_dims[1:]
        self.in_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(out_dims[:-1], out_dims[1:]))
        self.drop = nn.Dropout(dropout)


def _paper_dnn(n_items=SIZES["n_items"]):
    torch.manual_seed(0)
    return PaperDNN([n_items, 16], [16, n_items], emb_size=4)


def _save_like_the_paper_code(dnn, path):
    """torch.save of the module, its class being the paper code's models.DNN.DNN."""
    package, fake = types.ModuleType("models"), types.ModuleType("models.DNN")
    cls = type("DNN", (PaperDNN,), {"__module__": "models.DNN"})
    fake.DNN, package.DNN, dnn.__class__ = cls, fake, cls
    sys.modules.update({"models": package, "models.DNN": fake})
    try:
        torch.save(dnn, path)
    finally:
        del sys.modules["models"], sys.modules["models.DNN"]
    return str(path)


def _write_split(data, folder):
    """The data as DiffRec's .npy split files (pairs of user, item)."""
    os.makedirs(folder, exist_ok=True)
    for name, m in (("train", data.train), ("valid", data.valid), ("test", data.test)):
        coo = m.tocoo()
        np.save(os.path.join(folder, f"{name}_list.npy"), np.stack([coo.row, coo.col], 1).astype(np.int64))


def test_a_paper_checkpoint_with_flipped_bytes_is_refused(tmp_path, data):
    dnn = _paper_dnn()
    path = _save_like_the_paper_code(dnn, tmp_path / "paper.pth")
    raw = bytearray(open(path, "rb").read())
    weight = dnn.out_layers[0].weight.detach().numpy().tobytes()  # stored as is (the archive is not compressed)
    at = bytes(raw).index(weight) + 40
    raw[at: at + 8] = bytes(b ^ 0xFF for b in raw[at: at + 8])
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(ValueError, match=r"DiffRec paper checkpoint '.*paper.pth' is truncated or corrupt "
                                         r"\(BadZipFile: Bad CRC-32"):
        read_paper_model(path)
    _write_split(data, tmp_path / "data")
    imp = _refit("import-diffrec", "paper.pth", "--data", "data", "--steps", "5", "--out", "imported.pt",
                 cwd=tmp_path)
    assert imp.returncode == 2 and "paper.pth' is truncated or corrupt" in imp.stderr, imp.stderr
    assert "Traceback" not in imp.stderr and not (tmp_path / "imported.pt").exists()


def test_an_archive_with_an_unknown_compression_method_is_named_as_corrupt(tmp_path, data):
    path = _save(tmp_path / "best.pt", _diffrec(data.n_items), data)
    raw = bytearray(open(path, "rb").read())
    entry = bytes(raw).index(b"PK\x01\x02")  # the first member's central directory entry
    raw[entry + 10: entry + 12] = (99).to_bytes(2, "little")  # its compression method
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(ValueError, match=r"best.pt' is truncated or corrupt \(NotImplementedError"):
        load_checkpoint(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_paper_checkpoint_with_non_finite_weights_is_refused(tmp_path, value):
    dnn = _paper_dnn()
    with torch.no_grad():
        dnn.in_layers[0].weight[3, 2] = value
    path = _save_like_the_paper_code(dnn, tmp_path / "paper.pth")
    with pytest.raises(ValueError, match=r"paper checkpoint '.*paper.pth' holds non-finite weights: tensor "
                                         r"'in_layers.0.weight' has 1 NaN or infinite"):
        load_diffrec_paper_checkpoint(path, steps=5)


@pytest.fixture
def no_model_built(monkeypatch):
    """Makes building refit's DiffRec MLP from a paper checkpoint fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a DiffRecMLP was built from the declared dims")

    monkeypatch.setattr(diffrec_paper, "DiffRecMLP", refuse)


@pytest.mark.parametrize("field,value,msg", [
    ("in_dims", 40, r"in_dims must be a list of at least two positive integers .*got 40"),
    ("out_dims", [16.0, 40.0], r"out_dims must be a list of at least two positive integers"),
    ("out_dims", [16, -40], r"out_dims must be a list of at least two positive integers"),
    ("time_emb_dim", 0, r"time_emb_dim must be a positive integer, got 0"),
    ("time_type", "add", r"time_type 'add'"),
    ("norm", "yes", r"norm must be True or False, got 'yes'"),
    ("dropout", float("nan"), r"dropout rate \(drop.p\) must be a number in \[0, 1\), got nan"),
    ("dropout", 1.0, r"dropout rate \(drop.p\) must be a number in \[0, 1\), got 1.0"),
])
def test_paper_settings_are_checked_naming_the_file_and_field(tmp_path, no_model_built, field, value, msg):
    dnn = _paper_dnn()
    if field == "dropout":
        dnn.drop.p = value
    else:
        setattr(dnn, field, value)
    path = _save_like_the_paper_code(dnn, tmp_path / "paper.pth")
    with pytest.raises(ValueError, match=msg) as info:
        load_diffrec_paper_checkpoint(path, steps=5)
    assert "paper.pth" in str(info.value)


def test_declared_dims_are_checked_before_anything_is_allocated(tmp_path, no_model_built):
    dnn = _paper_dnn()
    dnn.in_dims, dnn.out_dims = [10 ** 12, 32], [32, 10 ** 12]
    path = _save_like_the_paper_code(dnn, tmp_path / "huge.pth")
    with pytest.raises(ValueError, match=r"huge.pth' declares a DNN of 65,000,000,000,180 parameters"):
        load_diffrec_paper_checkpoint(path, steps=5)
    # Dims of a plausible size that the weights do not have: refused by shape, naming the weight.
    dnn = _paper_dnn()
    dnn.in_dims, dnn.out_dims = [40, 64], [64, 40]
    path = _save_like_the_paper_code(dnn, tmp_path / "wider.pth")
    with pytest.raises(ValueError, match=r"wider.pth': weight 'in_layers.0.weight' is a \(16, 44\) torch.float32 "
                                         r"tensor; the declared dims .* give a \(64, 44\)"):
        load_diffrec_paper_checkpoint(path, steps=5)


# --- NaN or infinite weights in a refit checkpoint ----------------------------------------------

def test_non_finite_weights_are_refused_naming_the_checkpoint_and_tensor(tmp_path, data):
    rec = _diffrec(data.n_items)
    with torch.no_grad():
        rec.model.out_layers[0].bias[5] = float("nan")
    path = _save(tmp_path / "nan.pt", rec, data)
    with pytest.raises(ValueError, match=r"checkpoint '.*nan.pt' holds non-finite weights: tensor "
                                         r"'out_layers.0.bias' has 1 NaN"):
        load_recommender(path, data)
    ev = _refit("evaluate", "--checkpoint", path, "--no-baselines", cwd=tmp_path)
    assert ev.returncode == 2 and "nan.pt' holds non-finite weights: tensor 'out_layers.0.bias'" in ev.stderr, \
        ev.stderr
    assert "topk_hits" not in ev.stderr and "Traceback" not in ev.stderr


def test_non_finite_dreamrec_weights_are_refused(tmp_path):
    seq = load_dataset("synthetic-seq", n_users=30, n_items=20, mean_length=6, seed=1)
    torch.manual_seed(0)
    rec = SeqRecommender(DreamRec(seq.n_items, hidden=8, max_len=5),
                         GaussianDiffusion(DiffusionConfig(steps=5, timestep_sampling="uniform")))
    state = rec.state()
    name = next(k for k, v in state["model"]["state_dict"].items() if v.is_floating_point())
    state["model"]["state_dict"][name][...] = float("inf")
    path = str(tmp_path / "inf.pt")
    save_checkpoint(path, {"kind": "pretrain", "recommender": state,
                           "data": {"fingerprint": data_fingerprint(seq)}})
    with pytest.raises(ValueError, match=rf"checkpoint '.*inf.pt' holds non-finite weights: tensor '{name}'"):
        load_seq_recommender(path, seq)


# --- NumPy arrays whose dtype is marked as holding objects ----------------------------------------

class _FlaggedDtype:
    """Pickles as numpy pickles int64, with a BUILD state whose flags mark it as holding Python objects."""

    def __init__(self, flags):
        self.flags = flags

    def __reduce__(self):
        return np.dtype, ("i8", False, True), (3, "<", None, None, None, -1, -1, self.flags)


class _ArrayOf:
    """Pickles as numpy pickles an array (``_reconstruct`` then a BUILD state), with any dtype and data."""

    def __init__(self, dtype, data, n):
        self.dtype, self.data, self.n = dtype, data, n

    def __reduce__(self):
        return np.zeros(1).__reduce__()[0], (np.ndarray, (0,), b"b"), (1, (self.n,), self.dtype, False, self.data)


class _ObjectDtypeWithoutBuild:
    """numpy.dtype('O8') called without a BUILD state (whose class the allow-list does not name)."""

    def __reduce__(self):
        return np.dtype, ("O8", False, True)


class _DirectNdarray:
    """numpy.ndarray(shape, dtype) called directly, which NumPy's own pickles never do."""

    def __reduce__(self):
        return np.ndarray, ((3,), _FlaggedDtype(1))


def _numpy1(path):
    """The same file with NumPy 1's module names (numpy.core instead of numpy._core)."""
    out = path + ".np1"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info, data)
    return out


@pytest.mark.parametrize("case", ["flags 1, bytes", "flags 63, a list", "object dtype without BUILD"])
def test_a_numpy_array_of_objects_is_refused_with_its_key_path(tmp_path, data, case):
    value = {"flags 1, bytes": _ArrayOf(_FlaggedDtype(1), b"\0" * 16, 2),
             "flags 63, a list": _ArrayOf(_FlaggedDtype(63), [1, 2], 2),
             "object dtype without BUILD": _ArrayOf(_ObjectDtypeWithoutBuild(), [1, 2], 2)}[case]
    path = _save(tmp_path / "obj.pt", _diffrec(data.n_items), data, rng={"numpy": ("MT19937", value)})
    for p in (path, _numpy1(path)):
        refused = r"that is not numbers: dtype (int64 is marked as holding Python objects|object \(kind 'O'\) does not)"
        with pytest.raises(ValueError, match=r"holds a NumPy value at rng.numpy\[1\] " + refused) as info:
            load_checkpoint(p)
        assert repr(p) in str(info.value)
    ev = _refit("evaluate", "--checkpoint", path, "--no-baselines", cwd=tmp_path)
    assert ev.returncode == 2 and "obj.pt' holds a NumPy value at rng.numpy[1]" in ev.stderr, ev.stderr
    assert "get_clear_loop" not in ev.stderr and "Traceback" not in ev.stderr


def test_other_numpy_values_are_checked_and_arrays_of_numbers_load(tmp_path):
    path = str(tmp_path / "x.pt")
    torch.save({**TAGS, "d": [_FlaggedDtype(1)]}, path)
    with pytest.raises(ValueError, match=r"at d\[0\] that is not numbers: dtype int64 is marked as holding"):
        load_checkpoint(path)
    torch.save({**TAGS, "a": _DirectNdarray()}, path)
    with pytest.raises(ValueError, match=r"holds something other than .*numpy.ndarray\(...\) directly"):
        load_checkpoint(path)
    np.random.seed(1)
    torch.save({**TAGS, "rng": np.random.get_state(), "a": np.arange(6.0).reshape(2, 3), "s": np.float32(2),
                "c": [np.ones(2, dtype=np.complex64)], "d": np.dtype("u2")}, path)
    state = load_checkpoint(path)
    assert type(state["a"]) is np.ndarray and state["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert type(state["rng"][1]) is np.ndarray and state["rng"][1].dtype == np.uint32
    assert state["s"] == 2 and state["c"][0].dtype == np.complex64 and state["d"] == np.dtype("u2")


# --- the data a checkpoint meets --------------------------------------------------------------------

def test_a_checkpoint_without_a_fingerprint_needs_allow_other_data(tmp_path, data, caplog):
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, _diffrec(data.n_items).state())  # a bare model: kind "model", no data recorded
    with pytest.raises(ValueError, match=r"checkpoint '.*model.pt' records no data fingerprint.*--allow-other-data"):
        load_recommender(path, data)
    with caplog.at_level(logging.WARNING, logger="refit.runtime.runs"):
        rec, got, _ = load_recommender(path, data, allow_other_data=True)
    assert got is data
    assert f"fingerprint none recorded, {data_fingerprint(data)} for these data" in caplog.text


def test_a_checkpoint_of_other_data_is_refused_unless_allowed(tmp_path, data, other, caplog):
    path = _save(tmp_path / "best.pt", _diffrec(data.n_items), data)
    load_recommender(path, data)  # its own data
    with pytest.raises(ValueError, match=r"'.*best.pt' was trained on other data .*--allow-other-data"):
        load_recommender(path, other)
    with caplog.at_level(logging.WARNING, logger="refit.runtime.runs"):
        load_recommender(path, other, allow_other_data=True)
    assert f"fingerprint {data_fingerprint(data)} recorded, {data_fingerprint(other)} for these data" in caplog.text


def test_finetune_on_other_data_needs_the_flag_and_records_its_data(tmp_path, data, other):
    path = _save(tmp_path / "best.pt", _diffrec(data.n_items), data)
    cfg = dict(checkpoint=path, iterations=1, batch_size=8, eval_every=1, checkpoint_every=1, probe_size=8,
               similar_users=3, progress=False, plot=False, ks=(10, 20))
    with pytest.raises(ValueError, match="trained on other data"):
        finetune(FinetuneConfig(**cfg, out=str(tmp_path / "refused")), other)
    finetune(FinetuneConfig(**cfg, allow_other_data=True, out=str(tmp_path / "ft")), other)
    saved = load_checkpoint(str(tmp_path / "ft" / "best.pt"))["data"]
    # The data object's own source and options: reloaded from them, the data are the run's again.
    assert saved["fingerprint"] == data_fingerprint(other)
    assert saved["source"] == "synthetic" and saved["options"] == {**SIZES, "seed": 2}
    load_recommender(str(tmp_path / "ft" / "best.pt"), other)  # the data it was fine-tuned on, no flag
    rec, reloaded, _ = load_recommender(str(tmp_path / "ft" / "best.pt"))  # and without any data given
    assert data_fingerprint(reloaded) == data_fingerprint(other)


def test_refit_evaluate_takes_other_data_only_with_the_flag(tmp_path):
    data = load_dataset("synthetic")
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, _diffrec(data.n_items).state())
    ev = _refit("evaluate", "--checkpoint", path, "--data", "synthetic", "--no-baselines", "--json", cwd=tmp_path)
    assert ev.returncode == 2 and "model.pt' records no data fingerprint" in ev.stderr, ev.stderr
    ev = _refit("evaluate", "--checkpoint", path, "--data", "synthetic", "--allow-other-data", "--no-baselines",
                "--json", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert f"fingerprint none recorded, {data_fingerprint(data)} for these data" in ev.stderr
