"""The rules every kind of run shares: resuming (``RunDir.resume_state``), where DiffRec pretraining,
DreamRec pretraining and fine-tuning take the same settings as changeable and refuse the others alike, and
the checks of the settings they have in common (``refit.limits.check_run_settings``)."""

import json

import pytest

from _testing import TINY_SEQ
from refit.data import load_dataset
from refit.families.diffrec.pretrain import PretrainConfig, pretrain
from refit.runtime.runs import RESUME_MAY_CHANGE, load_checkpoint, save_checkpoint
from refit.families.dreamrec.pretrain import DreamRecConfig, pretrain_dreamrec
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.run import finetune

DATA = {"n_users": 200, "n_items": 150}
DIFFREC = dict(data="synthetic", data_options=DATA, steps=8, eval_every=1, batch_size=100, dims=(32, 64),
               progress=False)
DREAMREC = dict(data="synthetic-seq", data_options=TINY_SEQ, hidden=16, steps=20, batch_size=32, eval_every=1,
                progress=False, ks=(10, 20), embedding_warmup="none", ce_weight=0.0, w_grid=None)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **DATA)


def _epochs(folder):
    return [json.loads(line)["epoch"] for line in open(folder / "metrics.jsonl")]


def test_the_changeable_settings_are_where_a_run_stops_and_how_it_reports():
    assert RESUME_MAY_CHANGE == {"epochs", "iterations", "time_budget", "patience", "progress", "out", "plot",
                                 "eval_batch_size", "allow_other_data"}


def test_diffrec_and_dreamrec_both_resume_with_a_new_time_budget_and_refuse_a_new_lr(tmp_path, data):
    # DiffRec's pretraining used to refuse a changed --time-budget that DreamRec's accepted.
    def diffrec(resume=False, **kw):
        return pretrain(PretrainConfig(**DIFFREC, **kw), data, resume=resume)

    def dreamrec(resume=False, **kw):
        return pretrain_dreamrec(DreamRecConfig(**DREAMREC, **kw), resume=resume)

    runs = [(diffrec, tmp_path / "diffrec"), (dreamrec, tmp_path / "dreamrec")]
    for run, folder in runs:
        run(epochs=1, out=str(folder))
        summary = run(epochs=2, time_budget=3600.0, eval_batch_size=32, out=str(folder), resume=True)
        assert summary["epochs_run"] == 2 and _epochs(folder) == [1, 2]
        with pytest.raises(ValueError, match=r"cannot resume .*last\.pt: the run was started with other settings "
                                             r"\(lr\); start a new run folder"):
            run(epochs=3, lr=0.5, out=str(folder), resume=True)


def test_a_setting_the_checkpoint_lacks_counts_as_its_default(tmp_path, data):
    """A run saved before a setting existed resumes with that setting at its default, and only so."""
    folder = tmp_path / "run"
    pretrain(PretrainConfig(**DIFFREC, epochs=1, out=str(folder)), data)
    state = load_checkpoint(str(folder / "last.pt"))
    assert state["config"]["precision"] == "fp32"
    del state["config"]["precision"]  # as if saved before the field existed
    save_checkpoint(str(folder / "last.pt"), state)
    with pytest.raises(ValueError, match=r"other settings \(precision\)"):
        pretrain(PretrainConfig(**DIFFREC, epochs=2, precision="bf16", out=str(folder)), data, resume=True)
    assert pretrain(PretrainConfig(**DIFFREC, epochs=2, out=str(folder)), data, resume=True)["epochs_run"] == 2


def test_finetuning_follows_the_same_rule(tmp_path, data):
    pretrain(PretrainConfig(**DIFFREC, epochs=2, out=str(tmp_path / "pre")), data)
    base = dict(checkpoint=str(tmp_path / "pre" / "best.pt"), batch_size=16, eval_every=2, checkpoint_every=2,
                out=str(tmp_path / "ft"), progress=False, plot=False)
    finetune(FinetuneConfig(**base, iterations=2), data)
    summary = finetune(FinetuneConfig(**base, iterations=4), data, resume=True)
    assert summary["iterations"] == 4
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        finetune(FinetuneConfig(**{**base, "lr": 0.5}, iterations=6), data, resume=True)
    other = load_dataset("synthetic", n_users=200, n_items=150, seed=9)
    with pytest.raises(ValueError, match=r"cannot resume .*: it was trained on other data"):
        finetune(FinetuneConfig(**base, iterations=6, allow_other_data=True), other, resume=True)


@pytest.mark.parametrize("bad, message", [
    ({"lr": 0.0}, r"lr must be > 0, got 0.0"),
    ({"weight_decay": -1.0}, r"weight_decay must be >= 0"),
    ({"lr": float("nan")}, r"lr must be a finite number"),
    ({"time_budget": 0.0}, r"time_budget must be > 0 seconds"),
    ({"seed": -1}, r"seed must be an integer in"),
    ({"batch_size": 0}, r"batch_size must be a positive integer, got 0"),
    ({"batch_size": True}, r"batch_size must be a positive integer, got True"),
    ({"eval_batch_size": 2.0}, r"eval_batch_size must be a positive integer, got 2.0"),
])
def test_every_kind_of_run_refuses_the_shared_settings_alike(bad, message):
    """The settings every run shares are checked by one function (refit.limits.check_run_settings)."""
    from refit.baselines.sasrec import SASRecConfig

    import dataclasses

    for cls, extra in ((PretrainConfig, {}), (DreamRecConfig, {}), (FinetuneConfig, {"checkpoint": "x.pt"}),
                       (SASRecConfig, {})):
        if not set(bad) <= {f.name for f in dataclasses.fields(cls)}:
            continue  # fine-tuning stops by iterations, not by a time budget
        with pytest.raises(ValueError, match=message):
            cls(**extra, **bad)
