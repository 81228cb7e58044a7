"""refit.runtime.runs checkpoints: only tensors, NumPy arrays of numbers and plain containers are unpickled;
broken files are named; everything refit writes (and wrote before) loads."""

import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from refit.data import load_dataset
from refit.families.diffrec.pretrain import PretrainConfig, load_recommender, pretrain
from refit.runtime.runs import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.run import finetune

TAGS = {"format": "refit-checkpoint", "version": 1}
ENV_FLAG = "REFIT_TEST_PAYLOAD_RAN"


class Payload:
    """Unpickling this creates a marker file and sets an environment variable (a global)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        code = f"import os; open({self.marker!r}, 'w').close(); os.environ[{ENV_FLAG!r}] = '1'"
        return (exec, (code,))


class PlainObject:
    """An importable class with no code in its pickle: still not tensors or plain containers."""

    def __init__(self):
        self.x = 1


def _nothing_ran(marker):
    return not os.path.exists(marker) and ENV_FLAG not in os.environ


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker, path = tmp_path / "ran", str(tmp_path / "evil.pt")
    torch.save({**TAGS, "recommender": {"model": Payload(marker)}}, path)
    with pytest.raises(ValueError, match="holds something other than tensors.*plain containers: builtins.exec") as info:
        load_checkpoint(path)
    assert repr(path) in str(info.value)
    assert _nothing_ran(marker)
    with pytest.raises(ValueError, match="something other than tensors"):
        load_recommender(path)
    assert _nothing_ran(marker)


def test_refit_evaluate_refuses_it_before_any_code_runs(tmp_path):
    marker, path = tmp_path / "ran", str(tmp_path / "evil.pt")
    torch.save({**TAGS, "kind": "pretrain", "recommender": Payload(marker)}, path)
    out = subprocess.run([sys.executable, "-m", "refit", "evaluate", "--checkpoint", path, "--no-baselines"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2, out.stderr
    assert "something other than tensors" in out.stderr and "evil.pt" in out.stderr
    assert not marker.exists()


@pytest.mark.parametrize("case,value", [
    ("object-array", lambda m: np.array([1, Payload(m)], dtype=object)),
    ("string-array", lambda m: np.array(["a", "b"])),
    ("class-instance", lambda m: PlainObject()),
])
def test_other_objects_are_refused(tmp_path, case, value):
    marker, path = tmp_path / "ran", str(tmp_path / f"{case}.pt")
    torch.save({**TAGS, "x": value(marker)}, path)
    with pytest.raises(ValueError, match="holds something other than tensors, NumPy arrays of numbers"):
        load_checkpoint(path)
    assert _nothing_ran(marker)


# --- what refit writes loads ---------------------------------------------------------------------

DATA = {"n_users": 120, "n_items": 110}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pretraining run and a fine-tuning run on it, each with best.pt and last.pt."""
    tmp = tmp_path_factory.mktemp("runs")
    data = load_dataset("synthetic", **DATA)
    pre = tmp / "pre"
    pretrain(PretrainConfig(data="synthetic", data_options=DATA, steps=5, epochs=2, eval_every=1, batch_size=60,
                            dims=(16, 32), progress=False, out=str(pre)), data)
    ft = tmp / "ft"
    finetune(FinetuneConfig(checkpoint=str(pre / "best.pt"), iterations=2, batch_size=16, eval_every=1,
                            checkpoint_every=1, baseline="ema", progress=False, plot=False, out=str(ft)), data)
    return pre, ft


def test_every_checkpoint_refit_writes_loads(runs):
    pre, ft = runs
    for path in (pre / "best.pt", pre / "last.pt", ft / "best.pt", ft / "last.pt"):
        state = load_checkpoint(str(path))
        assert state["recommender"]["model"]["state_dict"], path
    last = load_checkpoint(str(pre / "last.pt"))
    assert isinstance(last["loss_history"], np.ndarray) and last["optimizer"]["state"]
    name, key, *_ = last["rng"]["numpy"]
    assert name == "MT19937" and key.dtype == np.uint32
    tuned = load_checkpoint(str(ft / "last.pt"))
    assert tuned["trainer"]["optimizer"]["state"] and isinstance(tuned["trainer"]["rng"]["numpy"], tuple)
    # The restored states are the saved ones.
    generator = torch.Generator()
    set_rng_state(tuned["trainer"]["rng"], generator)
    again = rng_state(generator)
    assert torch.equal(again["torch"], tuned["trainer"]["rng"]["torch"])
    assert torch.equal(again["generator"], tuned["trainer"]["rng"]["generator"])
    for a, b in zip(again["numpy"], tuned["trainer"]["rng"]["numpy"]):
        np.testing.assert_array_equal(a, b)
    rec, _, state = load_recommender(str(ft / "best.pt"))
    assert state["kind"] == "finetune"


def _with_numpy1_names(src, dst):
    """The same checkpoint as NumPy 1.x writes it (numpy.core instead of numpy._core)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info, data)


def test_checkpoints_of_the_previous_code_still_load(tmp_path):
    """What save_checkpoint wrote so far (the same dict, NumPy's random state as its tuple), under NumPy 2 and 1."""
    np.random.seed(7)
    old = {**TAGS, "kind": "pretrain", "epoch": 3, "best": {"epoch": 2, "value": 0.25},
           "recommender": {"model": {"name": "diffrec", "config": {"dims": [8, 16]},
                                     "state_dict": {"w": torch.randn(4, 3)}}},
           "optimizer": torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]).state_dict(),
           "loss_history": np.zeros((5, 10)), "loss_count": np.arange(5, dtype=np.int64),
           "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                   "generator": torch.Generator().manual_seed(1).get_state()},
           "metric": np.float64(0.5), "elapsed": 1.5}
    path = str(tmp_path / "last.pt")
    with open(path, "wb") as f:
        torch.save(old, f)
    numpy1 = str(tmp_path / "numpy1.pt")
    _with_numpy1_names(path, numpy1)
    with zipfile.ZipFile(numpy1) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"numpy.core.multiarray" in pkl and b"numpy._core" not in pkl
    expected = np.random.get_state()
    for p in (path, numpy1):
        state = load_checkpoint(p)
        np.testing.assert_array_equal(state["loss_count"], old["loss_count"])
        assert state["metric"] == 0.5 and state["best"] == old["best"]
        np.random.seed(0)
        set_rng_state(state["rng"])
        assert np.random.get_state()[1].tolist() == expected[1].tolist()


# --- broken files ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("good") / "best.pt")
    g = torch.Generator().manual_seed(0)
    save_checkpoint(path, {"recommender": {"model": {"state_dict": {"a": torch.randn(300, 200, generator=g),
                                                                    "b": torch.randn(200, generator=g)}},
                                           "diffusion": {}, "inference": {}},
                           "rng": {"numpy": np.random.get_state()}})
    assert load_checkpoint(path)["recommender"]["model"]["state_dict"]["a"].shape == (300, 200)
    return open(path, "rb").read()


@pytest.mark.parametrize("cut,msg", [
    ("empty", r"is empty \(0 bytes\): the file is truncated"),
    ("3 bytes", r"could not be read: it is not a file written by torch.save .*or it is truncated or corrupt"),
    ("4 KiB", r"is truncated or corrupt"),
    ("half", r"is truncated or corrupt"),
    ("all but 10 bytes", r"is truncated or corrupt"),
    ("damaged data", r"is truncated or corrupt \(BadZipFile: Bad CRC-32"),
])
def test_truncated_or_corrupt_checkpoints_are_named(tmp_path, good_bytes, cut, msg):
    n = len(good_bytes)
    data = {"empty": b"", "3 bytes": good_bytes[:3], "4 KiB": good_bytes[:4096], "half": good_bytes[: n // 2],
            "all but 10 bytes": good_bytes[:-10]}.get(cut)
    if data is None:  # a run of zeros in the middle of the tensor data
        damaged = bytearray(good_bytes)
        damaged[n // 2: n // 2 + 64] = bytes(64)
        data = bytes(damaged)
    path = str(tmp_path / "best.pt")
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match=msg) as info:
        load_checkpoint(path)
    assert repr(path) in str(info.value)


def test_text_and_foreign_files(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a file written by torch.save"):
        load_checkpoint(str(path))
    buf = io.BytesIO()
    torch.save({"weights": torch.ones(1)}, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="is not a refit checkpoint"):
        load_checkpoint(str(path))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "missing.pt"))
