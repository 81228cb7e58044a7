"""Run folders: a finished run is never replaced by accident, one run at a time, whole files, their modes."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from refit.runtime import runs
from refit.data import load_dataset
from refit.families.diffrec.pretrain import PretrainConfig, pretrain
from refit.runtime.runs import RunDir, atomic_write, load_checkpoint
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.run import finetune

DATA = {"n_users": 200, "n_items": 150}
SMALL = dict(data="synthetic", data_options=DATA, steps=8, batch_size=100, dims=(32, 64), progress=False)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **DATA)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("pre") / "run"
    pretrain(PretrainConfig(**SMALL, epochs=2, eval_every=1, out=str(out)), data)
    return str(out / "best.pt")


def _ft(pretrained, out, **kw):
    return FinetuneConfig(**{**dict(checkpoint=pretrained, iterations=2, batch_size=16, eval_every=2,
                                    checkpoint_every=2, out=str(out), progress=False, plot=False), **kw})


def _snapshot(folder):
    """Every file of a folder with its bytes and modification time."""
    return {name: (open(os.path.join(folder, name), "rb").read(), os.stat(os.path.join(folder, name)).st_mtime_ns)
            for name in sorted(os.listdir(folder))}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _dead_pid() -> int:
    """The pid of a process that has ended (a child, waited for)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- a finished run is not replaced without --overwrite --------------------------------------------

def test_a_new_pretraining_run_in_a_finished_folder_is_refused_and_changes_nothing(tmp_path, data):
    out = tmp_path / "run"
    pretrain(PretrainConfig(**SMALL, epochs=2, out=str(out)), data)
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"run folder .*run already holds a run .*--resume.*--overwrite") as err:
        pretrain(PretrainConfig(**SMALL, epochs=1, seed=2, out=str(out)), data)
    assert str(out) in str(err.value)
    assert _snapshot(out) == before  # no file written, none emptied, no lock left behind


def test_a_new_finetuning_run_in_a_finished_folder_is_refused_and_keeps_its_best_model(pretrained, tmp_path, data):
    out = tmp_path / "ft"
    finetune(_ft(pretrained, out), data)
    before = _snapshot(out)
    with pytest.raises(ValueError, match="already holds a run.*pass --resume to continue it or --overwrite"):
        finetune(_ft(pretrained, out, seed=2), data)
    assert _snapshot(out) == before
    assert load_checkpoint(str(out / "best.pt"))["config"]["seed"] == 1


def test_overwrite_replaces_the_run_and_keeps_the_folders_other_files(tmp_path, data):
    out = tmp_path / "run"
    pretrain(PretrainConfig(**SMALL, epochs=3, out=str(out)), data)
    (out / "notes.txt").write_text("mine")
    s = pretrain(PretrainConfig(**SMALL, epochs=1, seed=2, out=str(out)), data, overwrite=True)
    assert s["epochs_run"] == 1
    assert [json.loads(line)["epoch"] for line in open(out / "metrics.jsonl")] == [1]
    assert json.load(open(out / "config.json"))["seed"] == 2
    assert load_checkpoint(str(out / "last.pt"))["epoch"] == 1
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / ".lock").exists()


def test_overwrite_never_deletes_the_checkpoint_the_run_starts_from(pretrained, tmp_path, data):
    out = tmp_path / "ft"
    finetune(_ft(pretrained, out), data)
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"would delete .*best\.pt, which this run starts from"):
        finetune(_ft(str(out / "best.pt"), out), data, overwrite=True)
    assert _snapshot(out) == before


def test_resume_and_overwrite_exclude_each_other(tmp_path, data):
    with pytest.raises(ValueError, match="--resume .* --overwrite .*one of them"):
        pretrain(PretrainConfig(**SMALL, epochs=1, out=str(tmp_path / "run")), data, resume=True, overwrite=True)


def test_resume_still_continues_a_run(tmp_path, data):
    out = tmp_path / "run"
    pretrain(PretrainConfig(**SMALL, epochs=2, out=str(out)), data)
    s = pretrain(PretrainConfig(**SMALL, epochs=3, out=str(out)), data, resume=True)
    assert s["epochs_run"] == 3
    assert [json.loads(line)["epoch"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]


def test_resume_without_last_pt_starts_again_and_says_so(tmp_path, data, caplog):
    # A run killed before its first checkpoint left a config and a log, nothing to go on from.
    out = tmp_path / "run"
    pretrain(PretrainConfig(**SMALL, epochs=2, out=str(out)), data)
    os.unlink(out / "last.pt")
    with caplog.at_level(logging.WARNING, logger="refit.runtime.runs"):
        s = pretrain(PretrainConfig(**SMALL, epochs=1, out=str(out)), data, resume=True)
    assert s["epochs_run"] == 1
    assert "no last.pt" in caplog.text and str(out) in caplog.text
    assert [json.loads(line)["epoch"] for line in open(out / "metrics.jsonl")] == [1]


def test_cli_finetune_refuses_a_finished_folder_and_overwrite_replaces_it(pretrained, tmp_path):
    cmd = [sys.executable, "-m", "refit", "-q", "finetune", "--checkpoint", pretrained, "--iterations", "2",
           "--batch-size", "16", "--eval-every", "2", "--no-plot", "--out", str(tmp_path / "ft")]
    first = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert first.returncode == 0, first.stderr
    before = _snapshot(tmp_path / "ft")
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert again.returncode == 2
    assert "refit finetune:" in again.stderr and str(tmp_path / "ft") in again.stderr
    assert "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert _snapshot(tmp_path / "ft") == before
    replaced = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, env=_env(), timeout=600)
    assert replaced.returncode == 0, replaced.stderr
    assert _snapshot(tmp_path / "ft") != before


def test_cli_demo_refuses_an_earlier_demos_folder_before_any_work(tmp_path):
    (tmp_path / "demo" / "pretrain").mkdir(parents=True)
    (tmp_path / "demo" / "pretrain" / "config.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "refit", "-q", "demo", "--data", "synthetic", "--out",
                           str(tmp_path / "demo")], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 2
    assert "earlier demo" in proc.stderr and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "demo" / "pretrain" / "config.json").read_text() == "{}"


# --- one run at a time: the lock ----------------------------------------------------------------------

def _hold(folder, pid, host=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as f:
        json.dump({"pid": pid, "host": host or socket.gethostname()}, f)


def test_a_folder_in_use_by_a_live_run_is_refused(tmp_path, data):
    out = tmp_path / "run"
    _hold(out, os.getpid())  # a process that runs: this one
    lock = (out / ".lock").read_text()
    with pytest.raises(ValueError, match=rf"run folder .*run is in use by another run \(pid {os.getpid()}\)"):
        pretrain(PretrainConfig(**SMALL, epochs=1, out=str(out)), data)
    assert (out / ".lock").read_text() == lock
    assert sorted(os.listdir(out)) == [".lock"]


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    _hold(tmp_path, _dead_pid(), host="elsewhere.invalid")
    with pytest.raises(ValueError, match="in use by another run .* on host elsewhere.invalid"):
        RunDir(str(tmp_path)).lock()


def test_a_stale_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, data, caplog):
    out = tmp_path / "run"
    dead = _dead_pid()
    _hold(out, dead)
    with caplog.at_level(logging.WARNING, logger="refit.runtime.runs"):
        s = pretrain(PretrainConfig(**SMALL, epochs=1, out=str(out)), data)
    assert s["status"] == "finished"
    assert f"lock of pid {dead}" in caplog.text and str(out) in caplog.text
    assert not (out / ".lock").exists()  # released at the end


def test_a_torchrun_restart_takes_over_its_earlier_attempts_lock(tmp_path, monkeypatch, caplog):
    # After a restart rank 0 may run on another node than the attempt before: the job's id tells.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with open(tmp_path / ".lock", "w") as f:
        json.dump({"pid": 12345, "host": "node-a.invalid", "job": "job-7", "attempt": 0}, f)
    with pytest.raises(ValueError, match="in use by another run .* on host node-a.invalid"):
        RunDir(str(tmp_path)).lock()  # the same attempt: another rank 0 can only be another job's
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    run = RunDir(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="refit.runtime.runs"):
        run.lock()
    assert "pid 12345" in caplog.text and "earlier attempt" in caplog.text
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    run.unlock()
    assert not (tmp_path / ".lock").exists()


def test_the_lock_is_held_during_the_run_and_released_when_it_fails(tmp_path, data, monkeypatch):
    out = tmp_path / "run"
    seen = []

    def interrupted(*args, **kwargs):
        seen.append(json.loads((out / ".lock").read_text()))
        raise KeyboardInterrupt("second SIGINT")

    monkeypatch.setattr("refit.families.diffrec.pretrain.run_epochs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain(PretrainConfig(**SMALL, epochs=1, out=str(out)), data)
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
    assert not (out / ".lock").exists()


def test_only_the_main_rank_takes_the_lock(tmp_path, monkeypatch):
    # Under torchrun the other ranks share the folder with rank 0, which alone locks and checks it.
    _hold(tmp_path, os.getpid())
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(runs.dist, "is_main", lambda: False)
    with RunDir(str(tmp_path)).claim():
        pass
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert (tmp_path / "config.json").read_text() == "{}"


# --- metrics.jsonl: a torn last line ------------------------------------------------------------------

def test_resume_drops_a_torn_last_line_with_a_warning(tmp_path, data, caplog):
    out = tmp_path / "run"
    pretrain(PretrainConfig(**SMALL, epochs=2, out=str(out)), data)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"time": 1.0, "epoch": 3, "loss": 0.5, "trai')  # killed while writing epoch 3
    with caplog.at_level(logging.WARNING, logger="refit.runtime.runs"):
        s = pretrain(PretrainConfig(**SMALL, epochs=3, out=str(out)), data, resume=True)
    assert s["epochs_run"] == 3
    assert "metrics.jsonl" in caplog.text and "last line" in caplog.text
    assert [json.loads(line)["epoch"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]


def test_a_damaged_line_inside_the_log_names_the_file_and_line(tmp_path, data):
    out = tmp_path / "run"
    pretrain(PretrainConfig(**SMALL, epochs=2, out=str(out)), data)
    lines = open(out / "metrics.jsonl").read().splitlines(keepends=True)
    lines[0] = lines[0][:10] + "\n"
    (out / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 1: not a JSON record"):
        pretrain(PretrainConfig(**SMALL, epochs=3, out=str(out)), data, resume=True)
    assert not (out / ".lock").exists()


def test_records_keeps_a_whole_last_line_without_its_newline(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}')
    assert RunDir(str(tmp_path)).records() == [{"epoch": 1}, {"epoch": 2}]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n[2]\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a JSON object"):
        RunDir(str(tmp_path)).records()


# --- file modes -----------------------------------------------------------------------------------------

@pytest.fixture
def umask():
    def set_(mask):
        os.umask(mask)
    old = os.umask(0o022)
    yield set_
    os.umask(old)


def test_run_files_get_the_mode_open_gives_them(pretrained, tmp_path, data, umask):
    umask(0o022)
    pretrain(PretrainConfig(**SMALL, epochs=1, out=str(tmp_path / "pre")), data)
    finetune(_ft(pretrained, tmp_path / "ft", plot=True), data)
    for run in ("pre", "ft"):
        for name in os.listdir(tmp_path / run):
            assert os.stat(tmp_path / run / name).st_mode & 0o777 == 0o644, (run, name)
    assert (tmp_path / "ft" / "plot.png").exists()
    umask(0o027)
    atomic_write(str(tmp_path / "x.json"), lambda f: f.write(b"{}"))
    assert os.stat(tmp_path / "x.json").st_mode & 0o777 == 0o640
