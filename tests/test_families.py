"""The model-family registry: a family registered from outside refit is pretrained, evaluated and
fine-tuned through the command line, with nothing of refit changed; the registry's refusals."""

import dataclasses
import functools
import json
import os
import re

import pytest
import torch

from refit import cli, families
from refit.diffusion import DiffusionConfig, GaussianDiffusion
from refit.families import Family
from refit.families.diffrec.pretrain import PretrainConfig, load_recommender, pretrain
from refit.families.diffrec.recommender import RowRecommender
from refit.runtime.runs import load_checkpoint, save_checkpoint
from refit.settings import positive_int, setting


class ToyDenoiser(torch.nn.Module):
    """A one-hidden-layer denoiser of the interaction row, with the timestep as one more input."""

    def __init__(self, n_items: int, width: int, steps: int):
        super().__init__()
        self.n_items, self.width, self.steps = n_items, width, steps
        self.hidden = torch.nn.Linear(n_items + 1, width)
        self.out = torch.nn.Linear(width, n_items)

    def condition(self, users, rows):
        return None

    def forward(self, x, t, cond=None):
        time = (t.to(x.dtype) / self.steps)[:, None]
        return self.out(torch.tanh(self.hidden(torch.cat([x, time], 1))))

    def config(self):
        return {"n_items": self.n_items, "width": self.width, "steps": self.steps}


@dataclasses.dataclass
class ToyConfig(PretrainConfig):
    model: str = "toy"
    width: int = setting(8, "the toy's hidden width", type=positive_int, group="toy")

    models = {"toy": ToyDenoiser}

    def model_config(self, n_items):
        return {"n_items": n_items, "width": self.width, "steps": self.steps}


TOY = Family(name="toy", config=ToyConfig, pretrain=pretrain,
             load=functools.partial(load_recommender, models=ToyConfig.models), data_kind="interactions",
             policy_type=RowRecommender, help="a test's toy")


@pytest.fixture
def toy():
    families.register(TOY)
    try:
        yield TOY
    finally:
        families.unregister("toy")
    assert "toy" not in families.names()


def test_a_toy_family_runs_pretrain_evaluate_and_finetune_through_the_command_line(toy, tmp_path, capsys):
    out = str(tmp_path / "pre")
    code = cli.main(["-q", "pretrain", "--model", "toy", "--data", "synthetic", "--width", "12", "--steps", "5",
                     "--epochs", "2", "--eval-every", "1", "--batch-size", "200", "--out", out])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "recall@20" in printed.out
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model"] == "toy" and config["width"] == 12 and config["steps"] == 5
    assert config["dims"] == [200, 600]  # the parent config's default, kept
    state = load_checkpoint(os.path.join(out, "best.pt"))
    assert state["recommender"]["model"]["name"] == "toy"
    assert state["recommender"]["model"]["config"] == {"n_items": config["n_items"], "width": 12, "steps": 5}

    code = cli.main(["-q", "evaluate", "--checkpoint", os.path.join(out, "best.pt"), "--json", "--no-baselines",
                     "--split", "both"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    metrics = json.loads(printed.out)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert metrics["test"]["recall@20"] == pytest.approx(summary["test"]["recall@20"], abs=1e-6)
    assert metrics["valid"]["recall@20"] == pytest.approx(summary["valid"]["recall@20"], abs=1e-6)

    fine = str(tmp_path / "fine")
    code = cli.main(["-q", "finetune", "--checkpoint", os.path.join(out, "best.pt"), "--iterations", "2",
                     "--batch-size", "8", "--eval-every", "1", "--probe-size", "16", "--no-plot", "--out", fine])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    done = json.load(open(os.path.join(fine, "summary.json")))
    assert done["status"] == "finished" and done["iterations"] == 2
    tuned = load_checkpoint(os.path.join(fine, "last.pt"))["recommender"]["model"]
    assert tuned["name"] == "toy"
    before = state["recommender"]["model"]["state_dict"]
    assert any(not torch.equal(before[k], v) for k, v in tuned["state_dict"].items())  # it trained


def test_a_flag_of_another_family_is_refused_by_name(toy, tmp_path, capsys):
    code = cli.main(["-q", "pretrain", "--model", "diffrec", "--data", "synthetic", "--width", "4",
                     "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--width is not a setting of --model diffrec (it is one of toy)" in err
    assert not os.path.exists(tmp_path / "r" / "config.json")


def test_without_the_family_its_flag_and_its_checkpoints_are_unknown(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--model", "toy", "--data", "synthetic"])
    assert "invalid choice: 'toy'" in capsys.readouterr().err
    rec = RowRecommender("toy", ToyDenoiser(5, 4, 3), GaussianDiffusion(DiffusionConfig(steps=3)))
    save_checkpoint(str(tmp_path / "t.pt"), {"kind": "pretrain", "recommender": rec.state()})
    code = cli.main(["evaluate", "--checkpoint", str(tmp_path / "t.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "holds a 'toy' model, which no registered model family loads" in err


def test_the_registry_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match="registered already"):
        families.register(dataclasses.replace(families.get("diffrec"), data_kind="sequences"))
    with pytest.raises(ValueError, match="data_kind"):
        Family(name="x", config=ToyConfig, pretrain=pretrain, load=load_recommender, data_kind="graphs")

    @dataclasses.dataclass
    class Bare:
        lr: float = 1.0

    with pytest.raises(TypeError, match="lacks the fields data, data_options, model, out, progress, ks, epochs"):
        Family(name="x", config=Bare, pretrain=pretrain, load=load_recommender)
    with pytest.raises(TypeError, match="load must be callable"):
        Family(name="x", config=ToyConfig, pretrain=pretrain, load=None)
    with pytest.raises(TypeError, match="evaluate must be callable or None"):
        Family(name="x", config=ToyConfig, pretrain=pretrain, load=load_recommender, evaluate="full")
    with pytest.raises(ValueError, match="unknown model family 'nope'; registered: diffrec, cfdiff, dreamrec"):
        families.get("nope")
    with pytest.raises(TypeError, match="no graphed sampler for object"):
        families.graphed(object())


def test_the_built_in_families_are_found_by_checkpoint_and_by_policy():
    assert families.names()[:4] == ["diffrec", "cfdiff", "dreamrec", "preferdiff"]
    assert families.of_checkpoint("dreamrec").name == "dreamrec"  # PreferDiff's checkpoints are DreamRec's kind
    assert families.of_checkpoint("cfdiff").name == "cfdiff"
    assert families.of_checkpoint("nope") is None
    assert families.get("preferdiff").metrics == ("hr", "ndcg", "mrr")
    assert families.get("cfdiff").metrics == ("recall", "ndcg", "precision", "mrr")


def test_the_example_of_docs_models_md_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/models.md's block that adds a family runs unchanged: pretrain, evaluate and finetune of it."""
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "models.md"),
                encoding="utf-8").read()
    section = text[text.index("\n## Model families: adding a backbone\n"):]
    block = re.search(r"^```python\n(.*?)^```$", section, flags=re.S | re.M).group(1)
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(block, "docs/models.md", "exec"), {"__name__": "docs_example"})
    finally:
        families.unregister("mine")
    printed = capsys.readouterr()
    assert "recall@20" in printed.out, printed.err
    pre = json.load(open(tmp_path / "runs" / "mine" / "summary.json"))
    assert pre["status"] == "finished" and pre["epochs_run"] == 3
    assert json.load(open(tmp_path / "runs" / "mine" / "config.json"))["width"] == 32
    fine = json.load(open(tmp_path / "runs" / "mine-refit" / "summary.json"))
    assert fine["status"] == "finished" and fine["iterations"] == 5


def test_a_sequence_family_without_its_own_evaluation_is_evaluated_by_its_policy(capsys):
    """``refit evaluate`` of a sequence family that registers no ``evaluate``: the policy's own
    ``evaluate(data, ks=, batch_size=)`` on the full protocol, the family's metrics in the table; the
    DreamRec protocols and --eval-steps are refused by name."""
    import argparse

    from refit.data import load_dataset

    data = load_dataset("synthetic-seq", n_users=60, n_items=30, seed=0)
    seen = []

    class Policy:
        def evaluate(self, data, *, ks, batch_size):
            seen.append((ks, batch_size))
            return {s: {f"{m}@{k}": 0.5 for m in ("hr", "ndcg", "mrr") for k in ks} for s in ("valid", "test")}

    family = Family(name="seqtoy", config=ToyConfig, pretrain=pretrain, data_kind="sequences",
                    load=lambda path, d=None, **kw: (Policy(), data, {"data": {"source": "s"}}))
    args = argparse.Namespace(data=None, split="test", ks=None, protocol="full", eval_steps=None, batch_size=16,
                              exclude_history=None, seed=0, json=False, baselines=False, checkpoint="toy.pt",
                              precision=None, allow_other_data=False, progress=False, quiet=True)
    assert cli.cmd_evaluate_sequential(args, family) == 0
    out = capsys.readouterr().out.splitlines()
    assert seen == [((10, 20, 50), 16)]
    assert out[0] == "toy.pt: seqtoy on s (60 sequences, 30 items; full protocol)"
    assert out[1].split() == [f"{m}@{k}" for k in (10, 20, 50) for m in ("hr", "ndcg", "mrr")]
    assert out[2].split() == ["test"] + ["0.5000"] * 9
    with pytest.raises(ValueError, match="--protocol dreamrec: the seqtoy family evaluates with the full protocol"):
        cli.cmd_evaluate_sequential(argparse.Namespace(**{**vars(args), "protocol": "dreamrec"}), family)
    with pytest.raises(ValueError, match="--eval-steps: a seqtoy policy has no respaced sampler"):
        cli.cmd_evaluate_sequential(argparse.Namespace(**{**vars(args), "eval_steps": 5}), family)


_STARTS = {
    "diffrec": dict(data="synthetic", data_options={"n_users": 120, "n_items": 60}, steps=10, batch_size=60,
                    eval_every=1, progress=False, ks=(10, 20)),
    "dreamrec": dict(data="synthetic-seq", data_options={"n_users": 60, "n_items": 40, "mean_length": 8, "seed": 5},
                     hidden=16, steps=20, batch_size=32, eval_every=1, progress=False, ks=(10, 20),
                     embedding_warmup="none", ce_weight=0.0, w_grid=None),
}


@pytest.mark.parametrize("name", list(_STARTS))
def test_every_family_starts_its_runs_by_one_rule(name, tmp_path):
    """refit.families.base.start_pretraining, for each built-in family: cut-offs beyond the items are
    refused by name; config.json records the data's fingerprint; an --init model is evaluated as epoch
    0 and competes for best.pt (its metrics are the init checkpoint's own); a resumed run goes on from
    last.pt's epoch with its best."""
    family = families.get(name)
    settings = _STARTS[name]
    with pytest.raises(ValueError, match=r"ks \[10, 20, 500\] go beyond the \d+ items of .*--ks"):
        family.pretrain(family.config(**{**settings, "ks": (10, 20, 500)}, epochs=1, out=str(tmp_path / "ks")))
    first = family.pretrain(family.config(**settings, epochs=2, out=str(tmp_path / "a")))
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["data_fingerprint"] and config["epochs"] == 2 and first["status"] == "finished"

    cont = family.pretrain(family.config(**settings, epochs=1, init=str(tmp_path / "a" / "best.pt"),
                                         out=str(tmp_path / "b")))
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[0]["valid"] == pytest.approx(first["valid"])  # the init model is the first run's best
    assert cont["best_epoch"] in (0, 1) and (tmp_path / "b" / "best.pt").exists()

    resumed = family.pretrain(family.config(**settings, epochs=3, out=str(tmp_path / "a")), resume=True)
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3] and resumed["epochs_run"] == 3
    assert resumed["best_epoch"] in (first["best_epoch"], 3)
