"""Every bad value gets a named error: non-finite numbers, out-of-range seeds, sizes beyond the machine's
memory, paths of the wrong kind; the command line turns every error into one line with exit code 2."""

import argparse
import math
import os
import subprocess
import sys

import pytest

from refit import cli
from refit.diffusion import DiffusionConfig
from refit.limits import available_memory, check_memory, format_bytes
from refit.families.diffrec.mlp import DiffRecMLP
from refit.families.dreamrec.network import DreamRec
from refit.families.diffrec.pretrain import PretrainConfig, pretrain
from refit.families.dreamrec.pretrain import DreamRecConfig
from refit.similarity import similar_users
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.run import finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = {"n_users": 200, "n_items": 150}
SMALL = dict(data="synthetic", data_options=DATA, steps=8, batch_size=100, dims=(16, 32), ks=(10, 20), progress=False)
FLOAT_TYPES = (cli._finite_float, cli._positive_float, cli._min_rating)


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _refit(*argv, **env):
    return subprocess.run([sys.executable, "-m", "refit", "-q", *argv], capture_output=True, text=True,
                          env=_env(**env), timeout=600)


def _commands(parser):
    """The parser's sub-command parsers by name."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _run_info_as(monkeypatch, func):
    """`refit info` runs ``func(args)`` instead: an error raised from inside a command."""
    real = cli.build_parser

    def patched():
        parser = real()
        _commands(parser)["info"].set_defaults(func=func)
        return parser

    monkeypatch.setattr(cli, "build_parser", patched)


def _number_flags():
    """(command, flag, type) of every flag of every command that takes a number."""
    for name, p in _commands(cli.build_parser()).items():
        for action in p._actions:
            if action.type in (float, *FLOAT_TYPES):
                yield name, action.option_strings[-1], action.type


NUMBER_FLAGS = list(_number_flags())


def test_no_flag_takes_a_bare_float():
    """A bare float() takes 'nan' and 'inf'; every number flag goes through a parser that refuses them."""
    assert NUMBER_FLAGS, "no number flags found: the parser's layout changed"
    bare = [(cmd, flag) for cmd, flag, kind in NUMBER_FLAGS if kind is float]
    assert bare == []


@pytest.mark.parametrize("cmd,flag", [(c, f) for c, f, _ in NUMBER_FLAGS])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_number_flag_refuses_nan_and_inf_naming_the_flag(cmd, flag, value, capsys):
    required = {"pretrain": ["--data", "synthetic"], "finetune": ["--checkpoint", "x.pt"],
                "evaluate": ["--checkpoint", "x.pt"], "import-diffrec": ["x.pth", "--data", "d", "--out", "o"],
                "baselines": ["--data", "synthetic"]}.get(cmd, [])
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args([cmd, *required, f"{flag}={value}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "finite" in err
    assert err.count("\n") == 1, err  # one line: no usage block before it


@pytest.mark.parametrize("cmd", ["pretrain", "finetune", "demo", "evaluate", "baselines"])
@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_out_of_range_is_refused_naming_the_flag(cmd, seed, capsys):
    required = {"pretrain": ["--data", "synthetic"], "finetune": ["--checkpoint", "x.pt"],
                "evaluate": ["--checkpoint", "x.pt"], "baselines": ["--data", "synthetic"]}.get(cmd, [])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([cmd, *required, "--seed", seed])
    assert "argument --seed" in capsys.readouterr().err


@pytest.mark.parametrize("make,field", [
    (lambda v: PretrainConfig(lr=v), "lr"),
    (lambda v: PretrainConfig(weight_decay=v), "weight_decay"),
    (lambda v: PretrainConfig(time_budget=v), "time_budget"),
    (lambda v: PretrainConfig(noise_scale=v), "noise_scale"),
    (lambda v: PretrainConfig(dropout=v), "dropout"),
    (lambda v: DreamRecConfig(lr=v), "lr"),
    (lambda v: DreamRecConfig(w=v), "w"),
    (lambda v: DreamRecConfig(weight_decay=v), "weight_decay"),
    (lambda v: DreamRecConfig(time_budget=v), "time_budget"),
    (lambda v: FinetuneConfig(lr=v), "lr"),
    (lambda v: FinetuneConfig(temperature=v), "temperature"),
    (lambda v: FinetuneConfig(grad_clip=v), "grad_clip"),
    (lambda v: FinetuneConfig(anchor_weight=v), "anchor_weight"),
    (lambda v: FinetuneConfig(alpha=v), "alpha"),
    (lambda v: FinetuneConfig(method="reward-weighted", rw_lambda=v), "rw_lambda"),
    (lambda v: DiffusionConfig(noise_min=v), "noise_min"),
])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_configs_refuse_non_finite_settings_by_name(make, field, value):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        make(value)


@pytest.mark.parametrize("make", [lambda: PretrainConfig(seed=-1), lambda: DreamRecConfig(seed=2**32),
                                  lambda: FinetuneConfig(seed=-5)])
def test_configs_refuse_seeds_that_torch_and_numpy_cannot_take(make):
    with pytest.raises(ValueError, match="seed must be an integer in"):
        make()


def test_a_time_budget_must_be_positive():
    with pytest.raises(ValueError, match="time_budget must be > 0"):
        PretrainConfig(time_budget=0.0)


# --- sizes are checked against a memory estimate before anything is allocated ------------------------

def test_memory_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv("REFIT_MEMORY_LIMIT", "1G")
    assert available_memory() <= 1 << 30
    with pytest.raises(ValueError, match=r"steps 9: the schedule would take 2\.0 GiB, more than the 1\.0 GiB"):
        check_memory("steps 9", 2 << 30, "the schedule")
    check_memory("steps 9", 1 << 20, "the schedule")
    monkeypatch.setenv("REFIT_MEMORY_LIMIT", "lots")
    with pytest.raises(ValueError, match="REFIT_MEMORY_LIMIT"):
        available_memory()
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(12) == "12 B"


def test_declared_sizes_beyond_memory_are_refused_before_allocation(monkeypatch):
    monkeypatch.setenv("REFIT_MEMORY_LIMIT", "256M")
    with pytest.raises(ValueError, match=r"steps 100000000: the diffusion schedule would take .*GiB"):
        DiffusionConfig(steps=100_000_000)
    with pytest.raises(ValueError, match=r"dims \[1000000000000, 32\], emb_size 10 over 50 items: DiffRec's weights"):
        DiffRecMLP(50, dims=(10**12, 32))
    with pytest.raises(ValueError, match=r"max_len 100000000 over 50 items: DreamRec's weights"):
        DreamRec(50, max_len=100_000_000)
    with pytest.raises(ValueError, match=r"hidden 64, max_len 100000000: DreamRec's positions and layers"):
        DreamRecConfig(max_len=100_000_000)
    with pytest.raises(ValueError, match=r"dims \[32\], emb_size 1000000000000 over 50 items"):
        DiffRecMLP(50, dims=(32,), emb_size=10**12)
    DiffusionConfig(steps=1000)  # ordinary sizes pass
    DiffRecMLP(50, dims=(32,))


def test_similar_users_beyond_the_users_is_refused_naming_the_flag():
    import scipy.sparse as sp

    matrix = sp.csr_matrix(sp.eye(5) + sp.eye(5, k=1))
    with pytest.raises(ValueError, match=r"--similar-users.*\[1, 4\] for these 5 users, got 1000000000"):
        similar_users(matrix, 10**9)
    assert similar_users(matrix, 4).shape == (5, 4)


def test_a_model_setting_that_is_nan_is_refused():
    with pytest.raises(ValueError, match="dropout"):
        DiffRecMLP(20, dims=(8,), dropout=math.nan)


# --- methods run with their defaults ---------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    pretrain(PretrainConfig(**SMALL, epochs=1, out=str(out)))
    return str(out / "best.pt")


@pytest.mark.parametrize("method,group", [("reward-weighted", 4), ("grpo", 16), ("reinforce", 1)])
def test_every_method_runs_with_its_defaults(method, group, pretrained, tmp_path):
    config = FinetuneConfig(checkpoint=pretrained, method=method, iterations=1, eval_every=1, checkpoint_every=1,
                            out=str(tmp_path / method), progress=False, plot=False, probe_size=0)
    assert config.group_size == group
    summary = finetune(config)
    assert summary["iterations"] == 1


def test_the_command_line_runs_reward_weighted_with_its_defaults(pretrained, tmp_path):
    res = _refit("finetune", "--checkpoint", pretrained, "--method", "reward-weighted", "--iterations", "1",
                 "--eval-every", "1", "--probe-size", "0", "--no-plot", "--out", str(tmp_path / "rw"))
    assert res.returncode == 0, res.stderr
    assert "group_size" not in res.stderr


# --- paths of the wrong kind, and every error as one line ------------------------------------------

def _one_line_error(res, *needles):
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_paths_of_the_wrong_kind_get_one_named_line(tmp_path, pretrained):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(_refit("pretrain", "--data", "synthetic", "--out", str(afile)), "--out", "is a file")
    _one_line_error(_refit("pretrain", "--data", "synthetic", "--out", str(afile / "run")), "--out", "is a file")
    _one_line_error(_refit("finetune", "--checkpoint", pretrained, "--out", str(afile)), "--out", "is a file")
    _one_line_error(_refit("evaluate", "--checkpoint", str(tmp_path)), "--checkpoint", "is a folder")
    _one_line_error(_refit("finetune", "--checkpoint", str(tmp_path)), "--checkpoint", "is a folder")
    _one_line_error(_refit("demo", "--out", str(afile)), "--out", "is a file")
    _one_line_error(_refit("baselines", "--data", "synthetic", "--out", str(afile)), "--out", "is a file")
    _one_line_error(_refit("import-diffrec", str(tmp_path), "--data", "synthetic", "--out", "x.pt"),
                    "checkpoint", "is a folder")


def test_a_size_beyond_memory_on_the_command_line_is_one_line(tmp_path):
    res = _refit("pretrain", "--data", "synthetic", "--steps", "100000000", "--out", str(tmp_path / "r"),
                 REFIT_MEMORY_LIMIT="1G")
    _one_line_error(res, "steps 100000000", "would take")
    assert not (tmp_path / "r" / "config.json").exists()


def test_an_unexpected_exception_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise TypeError("something inside went wrong")

    _run_info_as(monkeypatch, broken)
    assert cli.main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error (TypeError: something inside went wrong)" in err
    assert "--debug" in err
    with pytest.raises(TypeError, match="something inside"):
        cli.main(["--debug", "info"])


def test_os_errors_name_the_path(monkeypatch, capsys):
    def missing(args):
        open("/nonexistent-folder/file")

    _run_info_as(monkeypatch, missing)
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err.strip() == "refit info: '/nonexistent-folder/file': no such file or directory"


def test_argparse_errors_are_one_line_that_points_to_help():
    res = _refit("pretrain", "--data", "synthetic", "--lr", "nan")
    line = _one_line_error(res, "argument --lr", "expected a finite number")
    assert line.endswith("(see refit pretrain --help)")


def test_import_diffrec_does_not_replace_an_existing_file_without_overwrite(tmp_path):
    target = tmp_path / "best.pt"
    target.write_bytes(b"a model")
    res = _refit("import-diffrec", str(target), "--data", "synthetic", "--out", str(target))
    _one_line_error(res, "--out", "exists", "--overwrite")
    assert target.read_bytes() == b"a model"


def test_a_reward_list_longer_than_the_items_names_the_flag(pretrained, tmp_path):
    config = FinetuneConfig(checkpoint=pretrained, k=10**9, iterations=1, out=str(tmp_path / "k"),
                            progress=False, plot=False)
    with pytest.raises(ValueError, match=r"k \(--k\) is 1000000000: .* 150 items"):
        finetune(config)


def test_rl_steps_beyond_the_models_steps_names_the_flag(pretrained, tmp_path):
    config = FinetuneConfig(checkpoint=pretrained, rl_steps=10**8, iterations=1, out=str(tmp_path / "r"),
                            progress=False, plot=False)
    with pytest.raises(ValueError, match=r"rl_steps \(--rl-steps\) is 100000000: the model's diffusion has 8"):
        finetune(config)


def test_a_pickle_given_as_checkpoint_is_one_line_without_torch_warnings(tmp_path):
    import pickle

    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"train": [1, 2]}, protocol=5))
    _one_line_error(_refit("evaluate", "--checkpoint", str(path)), "checkpoint", "data.pkl")
