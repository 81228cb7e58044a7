"""The policy protocol's examples in docs/drop-in.md run as written (they lived in README.md before
the README was split into docs/ pages, hence this file's name).

The section "## Any diffusion recommender: the policy protocol (`refit.policy`)" holds two Python
blocks (an outside row model through ScheduleDenoiser on ml-1m_clean, an outside latent sequence model
through LatentScheduleDenoiser on ml-1m_seq) and a bash block (`--policy mymodels:make_policy`). Each
block is read from docs/drop-in.md by the section's heading and run unchanged: only the objects it assumes
the reader has (their module, betas, schedule) are provided, and the run length is cut (iterations,
eval_every) by a wrapper around ``refit.posttrain.finetune`` or by flags added to the command.

The blocks name their data relative to the repository's parent (``../shared/data/...``) and write
``runs/...`` relative to the working directory: they run in ``<tmp>/repo`` with ``<tmp>/shared/data``
a link to the shared data (``$REFIT_DATA`` or ``../shared/data``); without the data the tests skip.
"""

import dataclasses
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import refit.posttrain
from refit.policy import outside_state_dict
from refit.runtime.runs import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join("docs", "drop-in.md")  # the page that holds SECTION, relative to ROOT
SECTION = "## Any diffusion recommender: the policy protocol (`refit.policy`)"
SHARED_DATA = os.environ.get("REFIT_DATA") or os.path.join(ROOT, "..", "shared", "data")
NEEDED = ("ml-1m_clean", "ml-1m_seq")
SHORT = dict(iterations=2, eval_every=2)  # what the wrapper changes of each run

needs_data = pytest.mark.skipif(
    not all(os.path.isdir(os.path.join(SHARED_DATA, n)) for n in NEEDED),
    reason=f"{DOC}'s examples read ../shared/data/{{{','.join(NEEDED)}}}: not found under {SHARED_DATA} "
           "(set REFIT_DATA to the folder holding them)")


def doc_blocks():
    """{"python": [...], "bash": [...]}: the fenced blocks of docs/drop-in.md's policy-protocol section."""
    text = open(os.path.join(ROOT, DOC), encoding="utf-8").read()
    start = text.index("\n" + SECTION + "\n")  # ValueError when the heading is renamed
    end = text.find("\n## ", start + len(SECTION) + 2)
    section = text[start:end if end >= 0 else len(text)]
    blocks = {"python": [], "bash": []}
    for lang, body in re.findall(r"^```(\w+)\n(.*?)^```$", section, flags=re.S | re.M):
        blocks.setdefault(lang, []).append(body)
    return blocks


# The reader's module: a DiffRec paper-code style DNN (its layers, attributes and forward pass as the
# paper code keeps them), the paper's linear-var betas, and the factory the bash block names.
MYMODELS = '''
import math

import numpy as np
import torch
from torch import nn

from refit.policy import ScheduleDenoiser


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class DNN(nn.Module):
    def __init__(self, in_dims, out_dims, emb_size, time_type="cat", norm=False, dropout=0.5):
        super().__init__()
        self.in_dims, self.out_dims = in_dims, out_dims
        self.time_type, self.time_emb_dim, self.norm = time_type, emb_size, norm
        self.emb_layer = nn.Linear(self.time_emb_dim, self.time_emb_dim)
        in_dims_temp = [self.in_dims[0] + self.time_emb_dim] + self.in_dims[1:]
        out_dims_temp = self.out_dims
        self.in_layers = nn.ModuleList([nn.Linear(d_in, d_out) for d_in, d_out in
                                        zip(in_dims_temp[:-1], in_dims_temp[1:])])
        self.out_layers = nn.ModuleList([nn.Linear(d_in, d_out) for d_in, d_out in
                                         zip(out_dims_temp[:-1], out_dims_temp[1:])])
        self.drop = nn.Dropout(dropout)

    def forward(self, x, timesteps):
        emb = self.emb_layer(timestep_embedding(timesteps, self.time_emb_dim).to(x.device))
        if self.norm:
            x = nn.functional.normalize(x)
        x = self.drop(x)
        h = torch.cat([x, emb], dim=-1)
        for layer in self.in_layers:
            h = torch.tanh(layer(h))
        for i, layer in enumerate(self.out_layers):
            h = layer(h)
            if i != len(self.out_layers) - 1:
                h = torch.tanh(h)
        return h


def get_betas(steps=10, noise_scale=0.1, noise_min=1e-4, noise_max=0.02):
    """The paper code's "linear-var" schedule."""
    variance = noise_scale * np.linspace(noise_min, noise_max, steps, dtype=np.float64)
    alpha_bar = 1 - variance
    betas = [1 - alpha_bar[0]]
    for i in range(1, steps):
        betas.append(min(1 - alpha_bar[i] / alpha_bar[i - 1], 0.999))
    return np.array(betas)


def make_dnn(n_items, seed=0):
    torch.manual_seed(seed)
    return DNN([n_items, 64], [64, n_items], emb_size=10)


def make_policy(data):
    return ScheduleDenoiser(make_dnn(data.n_items), get_betas(), n_items=data.n_items, mean_type="x0")
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """<tmp>/repo (the working directory, mymodels.py in it) beside <tmp>/shared/data (the data)."""
    base = tmp_path_factory.mktemp("readme")
    (base / "shared").mkdir()
    os.symlink(os.path.abspath(SHARED_DATA), base / "shared" / "data")
    repo = base / "repo"
    repo.mkdir()
    (repo / "mymodels.py").write_text(MYMODELS)
    return repo


@pytest.fixture(scope="module")
def mymodels(workdir):
    sys.path.insert(0, str(workdir))
    try:
        import mymodels
    finally:
        sys.path.remove(str(workdir))
    yield mymodels
    sys.modules.pop("mymodels", None)


def run_block(block, namespace, workdir):
    """exec's ``block`` unchanged in ``namespace`` from ``workdir``, with refit.posttrain.finetune cut to
    SHORT; returns the configs the block's runs got."""
    real, seen = refit.posttrain.finetune, []

    def short_finetune(config, data=None, **kwargs):
        # The block's out is relative ("runs/..."): from the working directory it lands under tmp.
        assert not os.path.isabs(config.out), config.out
        config = dataclasses.replace(config, **SHORT)
        seen.append(config)
        return real(config, data, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.setattr(refit.posttrain, "finetune", short_finetune)
        exec(compile(block, DOC, "exec"), namespace)
    return seen


def test_the_section_holds_the_examples_this_file_runs():
    blocks = doc_blocks()
    assert len(blocks["python"]) == 2
    assert "ScheduleDenoiser(dnn, betas" in blocks["python"][0]
    assert "LatentScheduleDenoiser(" in blocks["python"][1]
    # The section's other bash block imports a DiffRec paper checkpoint (tests/test_policy.py runs that path).
    assert [("--policy mymodels:make_policy" in b) for b in blocks["bash"]] == [True, False]


@pytest.fixture(scope="module")
def row_run(workdir, mymodels):
    """The row-model block, run once: its namespace, the configs of its runs, the starting weights."""
    block = doc_blocks()["python"][0]
    dnn = mymodels.make_dnn(2810)  # ml-1m_clean's items (checked below against the loaded data)
    start = {k: v.clone() for k, v in dnn.state_dict().items()}
    namespace = {"dnn": dnn, "betas": mymodels.get_betas()}
    seen = run_block(block, namespace, workdir)
    return namespace, seen, start


@needs_data
def test_the_row_model_block_runs_as_written(row_run, workdir):
    namespace, seen, start = row_run
    data, summary, dnn = namespace["data"], namespace["summary"], namespace["dnn"]
    assert data.n_items == 2810 and data.source == os.path.join(os.path.dirname(str(workdir)), "shared", "data", "ml-1m_clean")
    assert len(seen) == 1 and seen[0].out == "runs/mine" and seen[0].iterations == 2
    assert summary["status"] == "finished" and summary["iterations"] == 2 and summary["iterations_planned"] == 2
    assert {"best_iteration", "before", "valid", "test", "checkpoint", "selection"} <= set(summary)
    assert summary["selection"] == "valid recall@20"
    assert {"recall@20", "ndcg@20", "recall@100"} <= set(summary["test"])
    assert os.path.samefile(summary["checkpoint"], workdir / "runs" / "mine" / "best.pt")
    # The block's last line loaded best.pt's weights into the reader's module: the weights of the
    # selected iteration (the start itself, or those after iteration 2, which last.pt holds). finetune
    # left the module with last.pt's weights, which differ from the start (asserted last), so when the
    # start is selected (on this data, at the default lr) only that line can give the start back.
    best = load_checkpoint(str(workdir / "runs" / "mine" / "best.pt"))
    assert best["iteration"] == summary["best_iteration"] in (0, 2)
    last = load_checkpoint(str(workdir / "runs" / "mine" / "last.pt"))
    want = start if summary["best_iteration"] == 0 else outside_state_dict(last)
    assert dnn.state_dict().keys() == want.keys()
    for k, v in dnn.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert any(not torch.equal(start[k], v) for k, v in outside_state_dict(last).items())  # the run trained it


@needs_data
def test_the_latent_model_block_runs_as_written(workdir):
    from test_latent_adapter import Tenc, diffusion

    block = doc_blocks()["python"][1]
    torch.manual_seed(0)
    model = Tenc(32, 3706, 10)  # ml-1m_seq's items; max_len=10 is the block's (DreamRec's state_size)
    diff = diffusion(20, 1e-4, 0.02, 2.0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    namespace = {"model": model, "diff": diff}  # the block imports all it uses: it runs on its own
    seen = run_block(block, namespace, workdir)
    data, summary, policy = namespace["data"], namespace["summary"], namespace["policy"]
    assert data.n_items == 3706 and hasattr(data, "targets")
    assert len(seen) == 1 and seen[0].out == "runs/mine-seq" and seen[0].method == "grpo"
    assert seen[0].group_size == 16  # GRPO's default groups
    assert summary["status"] == "finished" and summary["iterations"] == 2
    assert summary["selection"] == "valid hr@20" and {"hr@20", "ndcg@20", "hr@50"} <= set(summary["test"])
    assert policy.outside is model
    last = load_checkpoint(str(workdir / "runs" / "mine-seq" / "last.pt"))
    assert last["recommender"]["model"]["name"] == "external-latent" and last["iteration"] == 2
    # last.pt holds the module's own (trained) weights, loadable back into a Tenc.
    saved = outside_state_dict(last)
    assert saved.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(saved[k], v), k
    fresh = Tenc(32, 3706, 10)
    fresh.load_state_dict(saved, strict=True)
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())  # GRPO updated it


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@needs_data
def test_the_command_line_block_runs_as_written(row_run, workdir):
    # row_run wrote runs/mine/best.pt (the row block's short run) with mymodels' network: the checkpoint
    # the commands name. Only the run length of `refit finetune` is added.
    block = next(b for b in doc_blocks()["bash"] if "--policy mymodels:make_policy" in b)
    commands = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert [shlex.split(c)[:2] for c in commands] == [["refit", "evaluate"], ["refit", "finetune"]]
    outputs = []
    for command in commands:
        args = shlex.split(command)[1:]
        if args[0] == "finetune":
            args += ["--iterations", "2", "--eval-every", "2", "--no-plot"]
        out = subprocess.run([sys.executable, "-m", "refit", *args], capture_output=True, text=True, env=_env(),
                             cwd=workdir, timeout=300)
        assert out.returncode == 0, f"{command}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        outputs.append(out)
    assert "(built by mymodels:make_policy)" in outputs[0].stdout and "recall" in outputs[0].stdout
    state = load_checkpoint(str(workdir / "runs" / "mine-grpo" / "last.pt"))
    assert state["iteration"] == 2 and state["config"]["method"] == "grpo"
    assert state["config"]["policy_factory"] == "mymodels:make_policy"
    assert state["recommender"]["model"]["name"] == "external"
    assert state["pretrained"] == os.path.abspath(workdir / "runs" / "mine" / "best.pt")
