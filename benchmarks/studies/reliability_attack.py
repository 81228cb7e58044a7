"""Reliability attack on the ``refit`` command line, from outside.

Crafted inputs in four classes (1. data loss and mixing of run folders, 2. integrity of checkpoints,
3. memory exhaustion, 4. bad values), each case one fresh ``python -m refit -q ...`` process with
OMP_NUM_THREADS=1, REFIT_MEMORY_LIMIT=4G and a timeout. A case holds when: its exit code is the
expected one (2 for a refusal, 0 for a run that must succeed); a refusal's stderr is one non-empty
line, without a traceback or "internal error", that names the flag, file or checkpoint; the process
ended within its timeout with a peak resident size (from ``wait4``) below PEAK_BOUND_MIB; and the
files it must not touch are unchanged byte for byte. Inputs are built small, in ``--out``/work.

    OMP_NUM_THREADS=1 python -m benchmarks.studies.reliability_attack --out /tmp/attack            # results.json
    OMP_NUM_THREADS=1 python -m benchmarks.studies.reliability_attack --out /tmp/attack --report   # and the tables
    python -m benchmarks.studies.reliability_attack --report /tmp/attack/results.json              # tables only
    OMP_NUM_THREADS=1 python -m benchmarks.studies.reliability_attack --out /tmp/a --only kill     # cases by name
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from benchmarks.paths import child_env
#: A case's process may not grow beyond this (a refusal is meant to come before anything large is allocated).
PEAK_BOUND_MIB = 1536
#: A process whose resident size passes this is killed at once (the machine is shared).
RSS_CAP_MIB = 6144
REFUSE_TIMEOUT = 60
RUN_TIMEOUT = 180
MEMORY_LIMIT = "4G"

CLASSES = {"loss": "1. data loss and mixing", "integrity": "2. integrity", "memory": "3. memory exhaustion",
           "values": "4. bad values"}

# Tiny settings: the built-in synthetic data (600 users, 400 items), a small MLP, 8 diffusion steps.
PRE = ["pretrain", "--data", "synthetic", "--dims", "16,32", "--steps", "8", "--batch-size", "100", "--ks", "10,20"]
FT = ["--iterations", "2", "--batch-size", "16", "--eval-every", "2", "--checkpoint-every", "2", "--no-plot",
      "--ks", "10,20"]
SEQ = ["--model", "dreamrec", "--hidden", "16", "--max-len", "10", "--steps", "8", "--epochs", "1",
       "--batch-size", "100", "--ks", "10,20"]

Needle = Union[str, Tuple[str, ...]]


# --- child processes ---------------------------------------------------------------------------------------

def _env() -> Dict[str, str]:
    return child_env(REFIT_MEMORY_LIMIT=MEMORY_LIMIT)


@dataclass
class Result:
    argv: List[str]
    rc: Optional[int]
    stdout: str
    stderr: str
    seconds: float
    peak_mib: float
    timed_out: bool
    capped: bool
    timeout: float


class Child:
    """``python -m refit -q ARGV`` started now; stdout and stderr go to files; reaped with wait4 (peak RSS)."""

    def __init__(self, argv: Sequence[str], logs: str, cwd: Optional[str] = None, umask: Optional[int] = None):
        self.argv = [str(a) for a in argv]
        os.makedirs(logs, exist_ok=True)
        self.out_path, self.err_path = os.path.join(logs, "stdout"), os.path.join(logs, "stderr")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen([sys.executable, "-m", "refit", "-q", *self.argv], cwd=cwd, env=_env(),
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))
        self.pid = self.popen.pid
        self.t0 = time.perf_counter()
        self.rc: Optional[int] = None
        self.maxrss_kib = 0
        self.capped = False

    def poll(self) -> bool:
        """True once the process has ended (and been reaped)."""
        if self.rc is not None:
            return True
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            if _rss_mib(self.pid) > RSS_CAP_MIB:
                self.capped = True
                os.kill(self.pid, signal.SIGKILL)
            return False
        self.rc = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.rc  # reaped here: Popen must not wait for it again
        self.maxrss_kib = usage.ru_maxrss
        self.seconds = time.perf_counter() - self.t0
        return True

    def wait(self, timeout: float) -> Result:
        timed_out = False
        while not self.poll():
            if time.perf_counter() - self.t0 > timeout:
                timed_out = True
                os.kill(self.pid, signal.SIGKILL)
                while not self.poll():
                    time.sleep(0.01)
                break
            time.sleep(0.02)
        return Result(self.argv, self.rc, _read(self.out_path), _read(self.err_path), self.seconds,
                      self.maxrss_kib / 1024, timed_out, self.capped, timeout)


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def _lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if line.strip()]


# --- files ----------------------------------------------------------------------------------------------------

def snapshot(folder: str) -> Dict[str, Tuple[str, int, int]]:
    """Every file of a folder (hidden ones too): sha256 of its bytes, modification time, mode."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            st = os.stat(path)
            out[name] = (digest, st.st_mtime_ns, st.st_mode & 0o777)
    return out


def snapshot_diff(before: dict, after: dict) -> List[str]:
    changes = [f"{n} removed" for n in before if n not in after]
    changes += [f"{n} added" for n in after if n not in before]
    changes += [f"{n} changed" for n in before if n in after and before[n] != after[n]]
    return changes


def epochs_of(path: str, key: str = "epoch") -> List[int]:
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line)[key])
            except (ValueError, KeyError):
                out.append(None)
    return out


def count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def copy_run(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def dead_pid() -> int:
    """The pid of a process that has ended (a child, waited for)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def flip_bytes(path: str, positions: Sequence[int], out: str) -> str:
    raw = bytearray(open(path, "rb").read())
    for p in positions:
        raw[p] ^= 0xFF
    with open(out, "wb") as f:
        f.write(raw)
    return out


# --- crafted pickles -----------------------------------------------------------------------------------------

class RunsCode:
    """Unpickles by calling os.system: a file that runs code when loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class FlaggedDtype:
    """Pickles as numpy pickles int64, with a BUILD state whose flags mark it as holding Python objects."""

    def __init__(self, flags):
        self.flags = flags

    def __reduce__(self):
        return np.dtype, ("i8", False, True), (3, "<", None, None, None, -1, -1, self.flags)


class ArrayOf:
    """Pickles as numpy pickles an array (``_reconstruct`` then a BUILD state), with any dtype and data."""

    def __init__(self, dtype, data, n):
        self.dtype, self.data, self.n = dtype, data, n

    def __reduce__(self):
        return np.zeros(1).__reduce__()[0], (np.ndarray, (0,), b"b"), (1, (self.n,), self.dtype, False, self.data)


def U(s: str) -> bytes:
    """A SHORT_BINUNICODE opcode."""
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def pkl_with_train(value_opcodes: bytes) -> bytes:
    """A protocol-4 dataset.pkl whose train[1] is what value_opcodes push (val {1: [4]}, test {1: [5]})."""
    return (b"\x80\x04}(" + U("train") + b"}K\x01" + value_opcodes + b"s"
            + U("val") + b"}K\x01]K\x04as" + U("test") + b"}K\x01]K\x05asu.")


def seq_dataset(n_users: int = 60, n_items: int = 40, seed: int = 0) -> dict:
    """A valid ml-1m_seq style dataset (items 1..n_items; 0 is padding)."""
    rng = random.Random(seed)
    train, val, test = {}, {}, {}
    for u in range(n_users):
        items = [rng.randint(1, n_items) for _ in range(rng.randint(6, 15))]
        train[u], val[u], test[u] = items[:-2], [items[-2]], [items[-1]]
    return {"train": train, "val": val, "test": test, "umap": {1000 + u: u for u in range(n_users)},
            "smap": {5000 + i: i for i in range(1, n_items + 1)}}


def write_pkl(folder: str, obj=None, raw: Optional[bytes] = None) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "dataset.pkl"), "wb") as f:
        f.write(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if raw is None else raw)
    return folder


DREAMREC_FILES = {"train": "train_data.df", "valid": "val_data.df", "test": "test_data.df"}


def write_dreamrec(folder: str, item_num: int = 40, seq_size: int = 10, train=None, seed: int = 0,
                   declared: Optional[dict] = None) -> str:
    """A valid DreamRec folder (data_statis.df and three splits of rows seq, seq_len, tgt), with the train split
    replaced (``train``: a DataFrame or a function of the valid one) or data_statis.df's values (``declared``)."""
    import pandas as pd

    os.makedirs(folder, exist_ok=True)
    stats = {"seq_size": seq_size, "item_num": item_num, **(declared or {})}
    pd.DataFrame({k: [v] for k, v in stats.items()}).to_pickle(os.path.join(folder, "data_statis.df"))
    rng = random.Random(seed)
    for split, fname in DREAMREC_FILES.items():
        rows = 200 if split == "train" else 60
        seqs, lens, tgts = [], [], []
        for _ in range(rows):
            n = rng.randint(1, min(seq_size, 10))
            window = [rng.randrange(min(item_num, 40)) for _ in range(n)]
            seqs.append(window + [item_num] * (seq_size - n))
            lens.append(n)
            tgts.append(rng.randrange(min(item_num, 40)))
        df = pd.DataFrame({"seq": seqs, "seq_len": lens, "tgt": tgts})
        if split == "train" and train is not None:
            df = train(df) if callable(train) else train
        df.to_pickle(os.path.join(folder, fname))
    return folder


def write_split(data, folder: str) -> str:
    """Interaction data as DiffRec's .npy split files (pairs of user, item)."""
    os.makedirs(folder, exist_ok=True)
    for name, m in (("train", data.train), ("valid", data.valid), ("test", data.test)):
        coo = m.tocoo()
        np.save(os.path.join(folder, f"{name}_list.npy"), np.stack([coo.row, coo.col], 1).astype(np.int64))
    return folder


def paper_dnn(n_items: int = 400, hidden: int = 16, emb: int = 4, seed: int = 0):
    """A module with the DiffRec paper code's DNN attributes and layers (what its pickle holds)."""
    import torch
    from torch import nn

    class PaperDNN(nn.Module):
        def __init__(self, in_dims, out_dims, emb_size, dropout=0.5):
            super().__init__()
            self.in_dims, self.out_dims, self.time_emb_dim, self.time_type, self.norm = \
                in_dims, out_dims, emb_size, "cat", False
            self.emb_layer = nn.Linear(emb_size, emb_size)
            widths = [in_dims[0] + emb_size] + in_dims[1:]
            self.in_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
            self.out_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(out_dims[:-1], out_dims[1:]))
            self.drop = nn.Dropout(dropout)

    torch.manual_seed(seed)
    return PaperDNN([n_items, hidden], [hidden, n_items], emb_size=emb)


def save_like_the_paper_code(dnn, path: str) -> str:
    """torch.save of the module, its class being the paper code's models.DNN.DNN."""
    import types

    import torch

    package, fake = types.ModuleType("models"), types.ModuleType("models.DNN")
    cls = type("DNN", (type(dnn),), {"__module__": "models.DNN"})
    fake.DNN, package.DNN, dnn.__class__ = cls, fake, cls
    sys.modules.update({"models": package, "models.DNN": fake})
    try:
        torch.save(dnn, path)
    finally:
        del sys.modules["models"], sys.modules["models.DNN"]
    return path


def state_dict_of(path: str):
    from refit.runtime.runs import load_checkpoint

    return load_checkpoint(path)["recommender"]["model"]["state_dict"]


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the attack ------------------------------------------------------------------------------------------------

class Attack:
    def __init__(self, out: str, only: Optional[str], classes: Sequence[str] = tuple(CLASSES)):
        self.out = os.path.abspath(out)
        self.work = os.path.join(self.out, "work")
        if os.path.exists(self.work):
            shutil.rmtree(self.work)
        os.makedirs(self.work)
        self.only = only
        self.classes = classes
        self.cases: List[dict] = []
        self.n = 0

    # helpers: folders, processes, records

    def dir(self, *parts: str) -> str:
        path = os.path.join(self.work, *parts)
        os.makedirs(path, exist_ok=True)
        return path

    def path(self, *parts: str) -> str:
        path = os.path.join(self.work, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def start(self, argv: Sequence[str], *, cwd=None, umask=None) -> Child:
        self.n += 1
        return Child(argv, os.path.join(self.out, "logs", f"{self.n:04d}"), cwd=cwd or self.work, umask=umask)

    def run(self, argv: Sequence[str], *, timeout: float = REFUSE_TIMEOUT, cwd=None, umask=None) -> Result:
        return self.start(argv, cwd=cwd, umask=umask).wait(timeout)

    def wanted(self, name: str) -> bool:
        return self.only is None or self.only.lower() in name.lower()

    def record(self, cls: str, name: str, expected: str, res: Optional[Result], problems: List[str],
               details: Optional[dict] = None) -> dict:
        lines = _lines(res.stderr) if res is not None else []
        case = {"class": cls, "name": name, "expected": expected, "rc": None if res is None else res.rc,
                "stderr_first_line": lines[0] if lines else "", "stderr_last_line": lines[-1] if lines else "",
                "stderr_lines": len(lines), "held": not problems, "problems": problems,
                "seconds": None if res is None else round(res.seconds, 2),
                "peak_mib": None if res is None else round(res.peak_mib, 1),
                "argv": None if res is None else res.argv, **({"details": details} if details else {})}
        self.cases.append(case)
        mark = "held" if case["held"] else "NOT HELD: " + "; ".join(problems)
        rc = "-" if res is None else res.rc
        secs = "-" if res is None else f"{res.seconds:.1f}s"
        print(f"[{cls}] {name}: rc {rc}, {secs} -- {mark}", flush=True)
        return case

    @staticmethod
    def process_problems(res: Result) -> List[str]:
        p = []
        if res.timed_out:
            p.append(f"still running after its {res.timeout:.0f} s timeout: killed")
        if res.capped:
            p.append(f"resident size passed {RSS_CAP_MIB} MiB: killed")
        if res.peak_mib > PEAK_BOUND_MIB:
            p.append(f"peak memory {res.peak_mib:.0f} MiB above the {PEAK_BOUND_MIB} MiB bound")
        if "Traceback" in res.stderr:
            p.append("a traceback on stderr")
        if "internal error" in res.stderr:
            p.append("stderr reports an internal error")
        return p

    def refused(self, cls: str, name: str, res: Result, needles: Sequence[Needle] = (),
                more: Sequence[Tuple[bool, str]] = ()) -> dict:
        """Exit code 2, one line on stderr naming every needle (a tuple: any of its spellings)."""
        p = self.process_problems(res)
        if res.rc != 2:
            p.append(f"exit code {res.rc}, expected 2")
        lines = _lines(res.stderr)
        if len(lines) != 1:
            p.append(f"stderr has {len(lines)} non-empty lines, expected 1")
        error = lines[-1] if lines else ""
        for needle in needles:
            alternatives = needle if isinstance(needle, tuple) else (needle,)
            if not any(a in error for a in alternatives):
                p.append("the error line does not name " + " / ".join(repr(a) for a in alternatives))
        p += [msg for ok, msg in more if not ok]
        return self.record(cls, name, "refused (rc 2, one named line)", res, p)

    def succeeded(self, cls: str, name: str, res: Result, more: Sequence[Tuple[bool, str]] = (),
                  expected: str = "succeeds (rc 0)", details: Optional[dict] = None) -> dict:
        p = self.process_problems(res)
        if res.rc != 0:
            p.append(f"exit code {res.rc}, expected 0 (stderr: {(_lines(res.stderr) or [''])[-1][:200]})")
        p += [msg for ok, msg in more if not ok]
        return self.record(cls, name, expected, res, p, details)

    def refused_or_succeeded(self, cls: str, name: str, res: Result, needles: Sequence[Needle] = ()) -> dict:
        """A size that may be clamped or refused: either is fine, bounded and without a traceback."""
        if res.rc == 0:
            return self.succeeded(cls, name, res, expected="refused, or succeeds within bounds")
        case = self.refused(cls, name, res, needles)
        case["expected"] = "refused, or succeeds within bounds"
        return case

    def harness_error(self, cls: str, name: str, exc: BaseException) -> None:
        self.record(cls, name, "(harness)", None, [f"the attack itself failed: {type(exc).__name__}: {exc}"])

    def attempt(self, cls: str, name: str, fn: Callable[[], None]) -> None:
        if not self.wanted(name):
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one broken case must not end the attack
            self.harness_error(cls, name, exc)

    # shared inputs

    def base(self) -> str:
        """A finished tiny pretraining run (2 epochs): its best.pt is the checkpoint most cases start from."""
        if not hasattr(self, "_base"):
            out = os.path.join(self.work, "base", "pre")
            res = self.run([*PRE, "--epochs", "2", "--eval-every", "1", "--out", out], timeout=RUN_TIMEOUT)
            self.succeeded("loss", "control: a tiny pretraining run", res,
                           [(os.path.exists(os.path.join(out, "best.pt")), "no best.pt written")])
            self._base = out
        return self._base

    # --- 1. data loss and mixing ------------------------------------------------------------------------------

    def class_loss(self) -> None:
        c = "loss"
        base = self.base()
        best = os.path.join(base, "best.pt")

        def pretrain_again():
            out = copy_run(base, self.path("c1", "again"))
            before = snapshot(out)
            res = self.run([*PRE, "--epochs", "1", "--seed", "2", "--out", out])
            after = snapshot(out)
            self.refused(c, "pretrain: a second run in a finished folder", res, [out, "--overwrite"],
                         [(not snapshot_diff(before, after), f"files changed: {snapshot_diff(before, after)}")])
        self.attempt(c, "pretrain: a second run in a finished folder", pretrain_again)

        def partial_folder():
            out = self.dir("c1", "partial")
            shutil.copy(os.path.join(base, "metrics.jsonl"), out)
            before = snapshot(out)
            res = self.run([*PRE, "--epochs", "1", "--out", out])
            after = snapshot(out)
            self.refused(c, "pretrain: a folder holding only metrics.jsonl", res, [out, "--overwrite"],
                         [(not snapshot_diff(before, after), f"files changed: {snapshot_diff(before, after)}")])
        self.attempt(c, "pretrain: a folder holding only metrics.jsonl", partial_folder)

        ft_out = os.path.join(self.work, "c1", "ft")

        def finetune_again():
            first = self.run(["finetune", "--checkpoint", best, *FT, "--out", ft_out], timeout=RUN_TIMEOUT)
            self.succeeded(c, "control: a tiny finetuning run", first)
            before = snapshot(ft_out)
            res = self.run(["finetune", "--checkpoint", best, *FT, "--seed", "2", "--out", ft_out])
            after = snapshot(ft_out)
            self.refused(c, "finetune: a second run in a finished folder", res, [ft_out, "--overwrite"],
                         [(not snapshot_diff(before, after), f"files changed: {snapshot_diff(before, after)}")])
        self.attempt(c, "finetune: a second run in a finished folder", finetune_again)

        def overwrite_own_input():
            if not os.path.exists(os.path.join(ft_out, "best.pt")):  # the case above was not run (--only)
                self.run(["finetune", "--checkpoint", best, *FT, "--out", ft_out], timeout=RUN_TIMEOUT)
            own = os.path.join(ft_out, "best.pt")
            before = snapshot(ft_out)
            res = self.run(["finetune", "--checkpoint", own, *FT, "--overwrite", "--out", ft_out])
            after = snapshot(ft_out)
            self.refused(c, "finetune --overwrite of the folder holding its own --checkpoint", res,
                         ["best.pt", ("starts from", "would delete")],
                         [(not snapshot_diff(before, after), f"files changed: {snapshot_diff(before, after)}")])
        self.attempt(c, "finetune --overwrite of the folder holding its own --checkpoint", overwrite_own_input)

        def resume_and_overwrite():
            out = copy_run(base, self.path("c1", "both"))
            before = snapshot(out)
            res = self.run([*PRE, "--epochs", "3", "--resume", "--overwrite", "--out", out])
            after = snapshot(out)
            self.refused(c, "pretrain --resume --overwrite together", res, ["--resume", "--overwrite"],
                         [(not snapshot_diff(before, after), f"files changed: {snapshot_diff(before, after)}")])
        self.attempt(c, "pretrain --resume --overwrite together", resume_and_overwrite)

        def overwrite():
            out = copy_run(base, self.path("c1", "overwrite"))
            with open(os.path.join(out, "notes.txt"), "w") as f:
                f.write("mine")
            res = self.run([*PRE, "--epochs", "1", "--seed", "2", "--overwrite", "--out", out], timeout=RUN_TIMEOUT)
            cfg = json.load(open(os.path.join(out, "config.json"))) if os.path.exists(
                os.path.join(out, "config.json")) else {}
            self.succeeded(c, "pretrain --overwrite replaces the run, keeps other files", res, [
                (open(os.path.join(out, "notes.txt")).read() == "mine", "notes.txt not kept"),
                (cfg.get("seed") == 2, f"config.json seed {cfg.get('seed')}, expected 2"),
                (epochs_of(os.path.join(out, "metrics.jsonl")) == [1], "metrics.jsonl is not the new run's [1]"),
                (not os.path.exists(os.path.join(out, ".lock")), ".lock left behind")])
        self.attempt(c, "pretrain --overwrite replaces the run, keeps other files", overwrite)

        def two_at_once():
            out = self.path("c1", "busy")
            a = self.start([*PRE, "--epochs", "100000", "--eval-every", "100000", "--patience", "100000",
                            "--time-budget", "120", "--out", out])
            lock = os.path.join(out, ".lock")
            t0 = time.perf_counter()
            while not (os.path.exists(lock) and os.path.exists(os.path.join(out, "config.json"))):
                if a.poll() or time.perf_counter() - t0 > 60:
                    raise RuntimeError(f"the first run did not take the lock (rc {a.rc})")
                time.sleep(0.05)
            time.sleep(0.3)
            held = open(lock).read()
            for name, extra in (("a second run while the first holds the lock", []),
                                ("--overwrite while another run holds the folder", ["--overwrite"]),
                                ("--resume while another run holds the folder", ["--resume"])):
                res = self.run([*PRE, "--epochs", "1", *extra, "--out", out])
                present = os.path.exists(os.path.join(out, "config.json"))
                lock_now = open(lock).read() if os.path.exists(lock) else None
                self.refused(c, f"pretrain: {name}", res, ["in use", f"pid {a.pid}"],
                             [(a.poll() is False, f"the first run ended meanwhile (rc {a.rc})"),
                              (lock_now == held, "the first run's .lock changed or went"),
                              (present, "the first run's config.json went")])
            os.kill(a.pid, signal.SIGTERM)
            res = a.wait(60)
            summary = os.path.join(out, "summary.json")
            status = json.load(open(summary)).get("status") if os.path.exists(summary) else None
            self.record(c, "pretrain: the first run stops on SIGTERM, saves and releases its lock",
                        "stops (rc 0 or 143), no .lock, summary not 'running'", res,
                        self.process_problems(res)
                        + ([] if res.rc in (0, 143) else [f"exit code {res.rc}"])
                        + ([] if not os.path.exists(lock) else [".lock left behind"])
                        + ([] if status not in (None, "running") else [f"summary.json status {status!r}"]))
        self.attempt(c, "pretrain: two runs at once in one folder", two_at_once)

        def write_lock(folder, pid, host=None, text=None):
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, ".lock"), "w") as f:
                f.write(text if text is not None else json.dumps({"pid": pid, "host": host or socket.gethostname()}))

        def live_lock():
            out = self.path("c1", "live")
            write_lock(out, os.getpid())
            before = snapshot(out)
            res = self.run([*PRE, "--epochs", "1", "--out", out])
            self.refused(c, "pretrain: a .lock of a live process", res, ["in use", f"pid {os.getpid()}"],
                         [(snapshot(out) == before, "the folder changed")])
        self.attempt(c, "pretrain: a .lock of a live process", live_lock)

        def other_host():
            out = self.path("c1", "otherhost")
            write_lock(out, dead_pid(), host="elsewhere.invalid")
            res = self.run([*PRE, "--epochs", "1", "--out", out])
            self.refused(c, "pretrain: a .lock of another host", res, ["elsewhere.invalid"])
        self.attempt(c, "pretrain: a .lock of another host", other_host)

        def garbage_lock():
            out = self.path("c1", "garbage")
            write_lock(out, 0, text="\x00garbage")
            res = self.run([*PRE, "--epochs", "1", "--out", out])
            self.refused(c, "pretrain: a .lock that names no process", res, [".lock"])
        self.attempt(c, "pretrain: a .lock that names no process", garbage_lock)

        def stale_lock():
            out = self.path("c1", "stale")
            dead = dead_pid()
            write_lock(out, dead)
            res = self.run([*PRE, "--epochs", "1", "--out", out], timeout=RUN_TIMEOUT)
            self.succeeded(c, "pretrain: a stale .lock (dead pid) is taken over", res, [
                (f"pid {dead}" in res.stderr, f"no warning naming pid {dead}"),
                (not os.path.exists(os.path.join(out, ".lock")), ".lock left behind"),
                (os.path.exists(os.path.join(out, "best.pt")), "no best.pt")])
        self.attempt(c, "pretrain: a stale .lock (dead pid) is taken over", stale_lock)

        def torn_line():
            out = copy_run(base, self.path("c1", "torn"))
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write('{"time": 1.0, "epoch": 3, "loss": 0.5, "trai')
            res = self.run([*PRE, "--epochs", "3", "--eval-every", "1", "--resume", "--out", out], timeout=RUN_TIMEOUT)
            ep = epochs_of(os.path.join(out, "metrics.jsonl"))
            self.succeeded(c, "pretrain --resume after a torn last line of metrics.jsonl", res, [
                (ep == [1, 2, 3], f"metrics.jsonl epochs {ep}, expected [1, 2, 3]"),
                ("last line" in res.stderr, "no warning about the dropped last line")])
        self.attempt(c, "pretrain --resume after a torn last line of metrics.jsonl", torn_line)

        def damaged_line():
            out = copy_run(base, self.path("c1", "damaged"))
            path = os.path.join(out, "metrics.jsonl")
            lines = open(path).read().splitlines(keepends=True)
            lines[0] = lines[0][:10] + "\n"
            with open(path, "w") as f:
                f.write("".join(lines))
            before = snapshot(out)
            res = self.run([*PRE, "--epochs", "3", "--eval-every", "1", "--resume", "--out", out])
            after = snapshot(out)
            self.refused(c, "pretrain --resume with a damaged first line of metrics.jsonl", res,
                         ["metrics.jsonl", "line 1"],
                         [(not snapshot_diff(before, after), f"files changed: {snapshot_diff(before, after)}")])
        self.attempt(c, "pretrain --resume with a damaged first line of metrics.jsonl", damaged_line)

        def killed_and_resumed(kind: str, argv: List[str], log_key: str, total: int):
            """kill -9 at three points (the log grown by a few lines, plus a sub-second delay), then --resume."""
            out = argv[argv.index("--out") + 1]
            metrics = os.path.join(out, "metrics.jsonl")
            rng = random.Random(7)
            killed_at = []
            for i, grow in enumerate((3, 2, 2)):
                child = self.start(argv + (["--resume"] if i else []))
                n0 = count_lines(metrics)
                t0 = time.perf_counter()
                while count_lines(metrics) < n0 + grow:
                    if child.poll():
                        raise RuntimeError(f"the run ended (rc {child.rc}) before it could be killed: "
                                           f"{_read(child.err_path)[-300:]}")
                    if time.perf_counter() - t0 > 90:
                        raise RuntimeError("the run did not log in 90 s")
                    time.sleep(0.005)
                time.sleep(rng.uniform(0, 0.08))
                os.kill(child.pid, signal.SIGKILL)
                child.wait(30)
                killed_at.append(count_lines(metrics))
            res = self.run(argv + ["--resume"], timeout=RUN_TIMEOUT)
            ep = [e for e in epochs_of(metrics, log_key)]
            summary = os.path.join(out, "summary.json")
            status = json.load(open(summary)).get("status") if os.path.exists(summary) else None
            loads = []
            for name in ("best.pt", "last.pt"):
                try:
                    state_dict_of(os.path.join(out, name))
                except Exception as exc:  # noqa: BLE001
                    loads.append(f"{name}: {exc}")
            consecutive = ep == list(range(ep[0], ep[0] + len(ep))) if ep and None not in ep else False
            self.succeeded(c, f"{kind}: kill -9 three times mid-run, then --resume finishes", res, [
                (consecutive and ep[-1] == total,
                 f"metrics.jsonl {log_key}s not consecutive up to {total}: {ep[:3]}...{ep[-3:]} ({len(ep)} lines; "
                 f"log lines at the kills: {killed_at})"),
                (status == "finished", f"summary.json status {status!r}"),
                (not os.path.exists(os.path.join(out, ".lock")), ".lock left behind"),
                (not loads, f"checkpoints do not load: {loads}")],
                details={"log_lines_at_the_kills": killed_at, f"{log_key}s_logged": len(ep)})

        self.attempt(c, "pretrain: kill -9 three times mid-run, then --resume finishes", lambda: killed_and_resumed(
            "pretrain", [*PRE, "--epochs", "60", "--eval-every", "1", "--patience", "1000",
                         "--out", os.path.join(self.work, "c1", "killed")], "epoch", 60))
        self.attempt(c, "finetune: kill -9 three times mid-run, then --resume finishes", lambda: killed_and_resumed(
            "finetune", ["finetune", "--checkpoint", best, "--iterations", "120", "--batch-size", "16",
                         "--eval-every", "1", "--checkpoint-every", "1", "--probe-size", "0", "--no-plot",
                         "--ks", "10,20", "--out", os.path.join(self.work, "c1", "ft-killed")], "iteration", 120))

        def modes(umask: int, mode: int):
            pre = self.path("c1", f"modes{umask:03o}", "pre")
            ft = self.path("c1", f"modes{umask:03o}", "ft")
            imported = self.path("c1", f"modes{umask:03o}", "imported.pt")
            r1 = self.run([*PRE, "--epochs", "1", "--out", pre], umask=umask, timeout=RUN_TIMEOUT)
            r2 = self.run(["finetune", "--checkpoint", os.path.join(pre, "best.pt"), *FT[:-3], "--plot",
                           "--ks", "10,20", "--out", ft], umask=umask, timeout=RUN_TIMEOUT)
            pth = save_like_the_paper_code(paper_dnn(), self.path("c1", f"modes{umask:03o}", "paper.pth"))
            r3 = self.run(["import-diffrec", pth, "--data", "synthetic", "--steps", "5", "--out", imported],
                          umask=umask, timeout=RUN_TIMEOUT)
            files = [os.path.join(d, n) for d in (pre, ft) if os.path.isdir(d) for n in os.listdir(d)] + [imported]
            wrong = [f"{os.path.relpath(f, self.work)} {os.stat(f).st_mode & 0o777:o}" for f in files
                     if os.path.exists(f) and os.stat(f).st_mode & 0o777 != mode]
            missing = [f for f in files if not os.path.exists(f)]
            problems = []
            for r in (r1, r2, r3):
                if r.rc != 0:
                    problems.append(f"{r.argv[0]}: exit code {r.rc}: {(_lines(r.stderr) or [''])[-1][:200]}")
                problems += self.process_problems(r)
            if not os.path.exists(os.path.join(ft, "plot.png")):
                problems.append("no plot.png")
            problems += [f"mode {w}, expected {mode:o}" for w in wrong] + [f"{m} missing" for m in missing]
            runs = (r1, r2, r3)  # one record for the three: the first non-zero exit code, summed time, top peak
            r = Result(r1.argv, next((x.rc for x in runs if x.rc != 0), 0), "", "".join(x.stderr for x in runs),
                       sum(x.seconds for x in runs), max(x.peak_mib for x in runs), False, False, RUN_TIMEOUT)
            self.record(c, f"file modes under umask {umask:03o}: every written file {mode:o}",
                        f"rc 0, files {mode:o}", r, problems)

        self.attempt(c, "file modes under umask 022", lambda: modes(0o022, 0o644))
        self.attempt(c, "file modes under umask 027", lambda: modes(0o027, 0o640))

        def import_over_best():
            out = copy_run(base, self.path("c1", "import-target"))
            pth = save_like_the_paper_code(paper_dnn(), self.path("c1", "import-target-paper.pth"))
            before = snapshot(out)
            res = self.run(["import-diffrec", pth, "--data", "synthetic", "--steps", "5", "--out",
                            os.path.join(out, "best.pt")], timeout=RUN_TIMEOUT)
            after = snapshot(out)
            self.refused(c, "import-diffrec --out onto a run's existing best.pt", res, ["best.pt"],
                         [(not snapshot_diff(before, after), f"files changed: {snapshot_diff(before, after)}")])
        self.attempt(c, "import-diffrec --out onto a run's existing best.pt", import_over_best)

    # --- 2. integrity -----------------------------------------------------------------------------------------

    def class_integrity(self) -> None:
        c = "integrity"
        import torch
        from refit.runtime.runs import load_checkpoint, save_checkpoint

        base = self.base()
        best = os.path.join(base, "best.pt")
        d = self.dir("c2")
        dnn = paper_dnn()
        clean = save_like_the_paper_code(dnn, os.path.join(d, "clean.pth"))
        imp = lambda pth, out, *extra: ["import-diffrec", pth, "--data", "synthetic", "--steps", "5", *extra,
                                        "--out", out]
        clean_sd = {}

        def control():
            out = os.path.join(d, "clean-imported.pt")
            res = self.run(imp(clean, out), timeout=RUN_TIMEOUT)
            self.succeeded(c, "control: import-diffrec of an intact paper .pth", res)
            clean_sd.update(state_dict_of(out))
        self.attempt(c, "control: import-diffrec of an intact paper .pth", control)

        raw = open(clean, "rb").read()
        size = len(raw)

        def flipped(name: str, positions: Sequence[int]):
            pth = flip_bytes(clean, positions, os.path.join(d, name.replace(" ", "_").replace(",", "") + ".pth"))
            out = pth + ".pt"
            res = self.run(imp(pth, out))
            if res.rc == 0 and clean_sd:  # accepted: then the bytes flipped carried nothing the model reads
                same = same_weights(state_dict_of(out), clean_sd)
                self.succeeded(c, name, res, [(same, "accepted with weights that differ from the intact file's")],
                               expected="refused naming the file, or imported with the intact file's weights")
            else:
                case = self.refused(c, name, res, [os.path.basename(pth)],
                                    [(not os.path.exists(out), "an output checkpoint was written")])
                case["expected"] = "refused naming the file, or imported with the intact file's weights"

        for k in (1, 4, 16):
            for seed in range(4):
                positions = random.Random(1000 * k + seed).sample(range(size), k)
                name = f"import-diffrec: {k} flipped byte(s) at random positions, seed {seed}"
                self.attempt(c, name, lambda name=name, positions=positions: flipped(name, positions))
        weight = dnn.out_layers[0].weight.detach().numpy().tobytes()
        at = raw.find(weight)
        self.attempt(c, "import-diffrec: 8 flipped bytes inside a weight tensor",
                     lambda: flipped("import-diffrec: 8 flipped bytes inside a weight tensor",
                                     range(at + 40, at + 48)))
        pkl_at = raw.find(b"data.pkl")
        body = raw.find(b"\x80\x02", pkl_at)  # the pickle's PROTO opcode: the member's data
        self.attempt(c, "import-diffrec: 1 flipped byte inside data.pkl",
                     lambda: flipped("import-diffrec: 1 flipped byte inside data.pkl", [body + 30]))

        def truncated(kind: str, src: str, frac: float, argv_fn):
            name = f"{kind} truncated to {frac:.0%}"
            path = os.path.join(d, os.path.basename(src) + f".cut{int(frac * 100)}")
            with open(path, "wb") as f:
                f.write(open(src, "rb").read()[:int(os.path.getsize(src) * frac)])
            res = self.run(argv_fn(path))
            self.refused(c, name, res, [os.path.basename(path)])

        for frac in (0.0, 0.5, 0.99):
            self.attempt(c, f"paper .pth truncated to {frac:.0%}", lambda frac=frac: truncated(
                "import-diffrec: paper .pth", clean, frac, lambda p: imp(p, p + ".pt")))
            self.attempt(c, f"evaluate: refit checkpoint truncated to {frac:.0%}", lambda frac=frac: truncated(
                "evaluate: refit checkpoint", best, frac, lambda p: ["evaluate", "--checkpoint", p, "--no-baselines"]))

        for value in ("nan", "inf"):
            def paper_nonfinite(value=value):
                m = paper_dnn()
                with torch.no_grad():
                    m.in_layers[0].weight[3, 2] = float(value)
                pth = save_like_the_paper_code(m, os.path.join(d, f"paper-{value}.pth"))
                res = self.run(imp(pth, pth + ".pt"))
                self.refused(c, f"import-diffrec: a paper .pth with a {value} weight", res,
                             [os.path.basename(pth), "in_layers.0.weight"],
                             [(not os.path.exists(pth + ".pt"), "an output checkpoint was written")])
            self.attempt(c, f"import-diffrec: a paper .pth with a {value} weight", paper_nonfinite)

        def paper_shapes():
            m = paper_dnn()
            m.in_dims, m.out_dims = [400, 64], [64, 400]
            pth = save_like_the_paper_code(m, os.path.join(d, "paper-wider.pth"))
            res = self.run(imp(pth, pth + ".pt"))
            self.refused(c, "import-diffrec: declared dims that the weights do not have", res,
                         [os.path.basename(pth), "in_layers.0.weight"])
        self.attempt(c, "import-diffrec: declared dims that the weights do not have", paper_shapes)

        def paper_items():
            pth = save_like_the_paper_code(paper_dnn(n_items=300), os.path.join(d, "paper-300.pth"))
            res = self.run(imp(pth, pth + ".pt"))
            self.refused(c, "import-diffrec: a model of 300 items for data of 400", res, ["300", "400"])
        self.attempt(c, "import-diffrec: a model of 300 items for data of 400", paper_items)

        def paper_code():
            marker = os.path.join(d, "RAN-paper")
            pth = os.path.join(d, "paper-code.pth")
            torch.save({"model": RunsCode(marker)}, pth)
            res = self.run(imp(pth, pth + ".pt"))
            self.refused(c, "import-diffrec: a .pth whose pickle calls os.system", res, [os.path.basename(pth)],
                         [(not os.path.exists(marker), "the code ran")])
        self.attempt(c, "import-diffrec: a .pth whose pickle calls os.system", paper_code)

        state = load_checkpoint(best)

        def with_state(name: str, change) -> str:
            s = load_checkpoint(best)
            change(s)
            path = os.path.join(d, name)
            save_checkpoint(path, s)
            return path

        def set_first_float(s, value):
            sd = s["recommender"]["model"]["state_dict"]
            key = next(k for k, v in sd.items() if v.is_floating_point())
            sd[key].view(-1)[0] = value
            return key

        for value in ("nan", "inf"):
            def refit_nonfinite(value=value):
                keys = []
                path = with_state(f"weights-{value}.pt", lambda s: keys.append(set_first_float(s, float(value))))
                res = self.run(["evaluate", "--checkpoint", path, "--no-baselines"])
                self.refused(c, f"evaluate: a refit checkpoint with a {value} weight", res,
                             [os.path.basename(path), keys[0]])
                out = os.path.join(d, f"ft-{value}")
                res = self.run(["finetune", "--checkpoint", path, *FT, "--out", out])
                self.refused(c, f"finetune: a refit checkpoint with a {value} weight", res,
                             [os.path.basename(path), keys[0]],
                             [(not os.path.exists(os.path.join(out, "config.json")), "a run was started")])
            self.attempt(c, f"refit checkpoint with a {value} weight", refit_nonfinite)

        def last_nan():
            out = copy_run(base, self.path("c2", "resume-nan"))
            s = load_checkpoint(os.path.join(out, "last.pt"))
            key = set_first_float(s, float("nan"))
            save_checkpoint(os.path.join(out, "last.pt"), s)
            before = snapshot(out)
            res = self.run([*PRE, "--epochs", "3", "--eval-every", "1", "--resume", "--out", out])
            after = snapshot(out)
            self.refused(c, "pretrain --resume from a last.pt with a NaN weight", res, ["last.pt", key],
                         [(not snapshot_diff(before, after), f"files changed: {snapshot_diff(before, after)}")])
        self.attempt(c, "pretrain --resume from a last.pt with a NaN weight", last_nan)

        def object_arrays():
            variants = {
                "an object-dtype array": np.array([1, "a", None], dtype=object),
                "an int64 dtype flagged as holding objects (bytes)": ArrayOf(FlaggedDtype(1), b"\0" * 16, 2),
                "an int64 dtype flagged as holding objects (a list)": ArrayOf(FlaggedDtype(63), [1, 2], 2),
            }
            for i, (what, value) in enumerate(variants.items()):
                path = with_state(f"object-{i}.pt", lambda s: s.__setitem__("extra", {"arr": value}))
                res = self.run(["evaluate", "--checkpoint", path, "--no-baselines"])
                self.refused(c, f"evaluate: a checkpoint holding {what}", res, [os.path.basename(path)])
        self.attempt(c, "checkpoint holding object arrays", object_arrays)

        def refit_code():
            marker = os.path.join(d, "RAN-ckpt")
            path = with_state("code.pt", lambda s: s.__setitem__("extra", RunsCode(marker)))
            res = self.run(["evaluate", "--checkpoint", path, "--no-baselines"])
            self.refused(c, "evaluate: a checkpoint whose pickle calls os.system", res, [os.path.basename(path)],
                         [(not os.path.exists(marker), "the code ran")])
        self.attempt(c, "evaluate: a checkpoint whose pickle calls os.system", refit_code)

        def no_fingerprint():
            path = os.path.join(d, "model.pt")
            save_checkpoint(path, state["recommender"])  # a bare model: kind "model", no data recorded
            ev = ["evaluate", "--checkpoint", path, "--data", "synthetic", "--no-baselines", "--json"]
            self.refused(c, "evaluate: a checkpoint without a data fingerprint", self.run(ev),
                         [os.path.basename(path), "fingerprint", "--allow-other-data"])
            self.succeeded(c, "evaluate: ... accepted with --allow-other-data",
                           self.run(ev + ["--allow-other-data"], timeout=RUN_TIMEOUT))
            out = os.path.join(d, "ft-nofp")
            ft = ["finetune", "--checkpoint", path, "--data", "synthetic", *FT, "--out", out]
            self.refused(c, "finetune: a checkpoint without a data fingerprint", self.run(ft),
                         [os.path.basename(path), "fingerprint"],
                         [(not os.path.exists(os.path.join(out, "config.json")), "a run was started")])
            self.succeeded(c, "finetune: ... accepted with --allow-other-data",
                           self.run(ft + ["--allow-other-data"], timeout=RUN_TIMEOUT))
        self.attempt(c, "checkpoint without a data fingerprint", no_fingerprint)

        def other_data():
            from refit.data import load_dataset

            folder = write_split(load_dataset("synthetic", seed=2), os.path.join(d, "other-data"))
            ev = ["evaluate", "--checkpoint", best, "--data", folder, "--no-baselines", "--json"]
            self.refused(c, "evaluate: a checkpoint on other data (same sizes)", self.run(ev),
                         [os.path.basename(best), "other data"])
            self.succeeded(c, "evaluate: ... on other data accepted with --allow-other-data",
                           self.run(ev + ["--allow-other-data"], timeout=RUN_TIMEOUT))
        self.attempt(c, "checkpoint on other data", other_data)

        def npy_objects():
            from refit.data import load_dataset

            folder = write_split(load_dataset("synthetic", n_users=50, n_items=40), os.path.join(d, "npy-object"))
            marker = os.path.join(d, "RAN-npy")
            np.save(os.path.join(folder, "train_list.npy"), np.array([[0, 1], [RunsCode(marker), 2]], dtype=object),
                    allow_pickle=True)
            res = self.run([*PRE, "--data", folder, "--epochs", "1", "--out", os.path.join(d, "npy-run")])
            self.refused(c, "pretrain: a train_list.npy holding an object array (a pickle)", res,
                         ["train_list.npy"], [(not os.path.exists(marker), "the code ran")])
        self.attempt(c, "pretrain: a train_list.npy holding an object array (a pickle)", npy_objects)

    # --- 3. memory exhaustion -------------------------------------------------------------------------------

    def class_memory(self) -> None:
        c = "memory"
        d = self.dir("c3")
        seq_run = lambda folder, *extra: ["pretrain", "--data", folder, *SEQ, *extra,
                                          "--out", os.path.join(d, "runs", os.path.basename(folder))]

        def control_pkl():
            folder = write_pkl(os.path.join(d, "pkl-ok"), seq_dataset())
            self.succeeded(c, "control: a small valid dataset.pkl trains",
                           self.run(seq_run(folder), timeout=RUN_TIMEOUT))
        self.attempt(c, "control: a small valid dataset.pkl trains", control_pkl)

        def control_df():
            folder = write_dreamrec(os.path.join(d, "df-ok"))
            self.succeeded(c, "control: a small valid DreamRec .df folder trains",
                           self.run(seq_run(folder), timeout=RUN_TIMEOUT))
        self.attempt(c, "control: a small valid DreamRec .df folder trains", control_df)

        def pkl_case(name: str, obj=None, raw=None, needles=("dataset.pkl",)):
            folder = write_pkl(os.path.join(d, name.split(":")[0].replace(" ", "-")), obj, raw)
            res = self.run(seq_run(folder))
            self.refused(c, name, res, needles)

        shared = list(range(1, 1001))
        self.attempt(c, "shared", lambda: pkl_case(
            "shared list: dataset.pkl with one 1,000-id list referenced by 2,000 users",
            {"train": {u: shared for u in range(2000)}, "val": {u: [1] for u in range(2000)},
             "test": {u: [2] for u in range(2000)}}, needles=("dataset.pkl", "refused to unpickle")))
        self.attempt(c, "fill-after", lambda: pkl_case(
            "fill-after: dataset.pkl referencing an empty list 3,000 times, then filling it",
            raw=pkl_with_train(b"]\x940" + b"(" + b"h\x00" * 3000 + b"l" + b"h\x00(" + b"K\x07" * 1000 + b"e0"),
            needles=("dataset.pkl", "refused to unpickle")))
        self.attempt(c, "list-copies", lambda: pkl_case(
            "list-copies: dataset.pkl calling list() on a shared list 3,000 times",
            raw=b"\x80\x02" + b"]q\x00(" + b"K\x07" * 1000 + b"e0" + b"c__builtin__\nlist\nh\x00\x85R0" * 3000
            + pickle.dumps({"train": {1: [1, 2]}, "val": {1: [3]}, "test": {1: [4]}}, protocol=2)[2:],
            needles=("dataset.pkl", "refused to unpickle")))
        # Ten levels of ten references each: 10**10 ids from a few hundred bytes.
        nested = b"(" + b"K\x07" * 10 + b"l\x940"  # level 0 (memo 0), popped
        for level in range(1, 10):  # level i: ten references to level i - 1 (memo i), popped
            nested += b"(" + (b"h" + bytes([level - 1])) * 10 + b"l\x940"
        nested += b"h\x09"
        self.attempt(c, "nested-sharing", lambda: pkl_case(
            "nested-sharing: dataset.pkl of ten levels of ten shared references (10**10 ids)",
            raw=pkl_with_train(nested), needles=("dataset.pkl",)))
        self.attempt(c, "deep", lambda: pkl_case(
            "deep: dataset.pkl nesting a list 200,000 deep", raw=pkl_with_train(b"]" * 200_000 + b"a" * 199_999),
            needles=("dataset.pkl", "nested")))

        def df_case(name: str, needles, **kw):
            folder = write_dreamrec(os.path.join(d, name.split(":")[0].replace(" ", "-")), **kw)
            res = self.run(seq_run(folder))
            self.refused(c, name, res, needles)

        self.attempt(c, "item_num", lambda: df_case("item_num: data_statis.df declaring item_num 2**40",
                                                    ["data_statis.df", "item_num"], item_num=2 ** 40))
        self.attempt(c, "seq_size", lambda: df_case("seq_size: data_statis.df declaring seq_size 2**36",
                                                    ["data_statis.df", "seq_size"], declared={"seq_size": 2 ** 36}))

        def shared_windows(df):
            import pandas as pd

            window = list(range(1000))
            return pd.DataFrame({"seq": [window] * 5000, "seq_len": [10] * 5000, "tgt": [0] * 5000})
        self.attempt(c, "shared-windows", lambda: df_case(
            "shared-windows: train_data.df of 5,000 rows sharing one 1,000-id window", ["train_data.df"],
            train=shared_windows))

        def dev_zero():
            self.refused(c, "--data /dev/zero", self.run([*PRE, "--data", "/dev/zero", "--epochs", "1",
                                                          "--out", os.path.join(d, "runs", "zero")]), ["/dev/zero"])
        self.attempt(c, "--data /dev/zero", dev_zero)

        def fifo():
            folder = self.dir("c3", "fifo")
            os.mkfifo(os.path.join(folder, "dataset.pkl"))
            self.refused(c, "--data a folder whose dataset.pkl is a FIFO (nobody writes)",
                         self.run(seq_run(folder), timeout=30), ["dataset.pkl"])
        self.attempt(c, "--data a folder whose dataset.pkl is a FIFO", fifo)

        def sparse():
            path = self.path("c3", "sparse", "ratings.dat")
            with open(path, "wb") as f:
                f.truncate(5 << 30)  # 5 GiB of holes: no disk used
            res = self.run([*PRE, "--data", path, "--epochs", "1", "--out", os.path.join(d, "runs", "sparse")])
            os.unlink(path)  # a 5 GiB file, even of holes, is no thing to leave behind
            self.refused(c, "--data a 5 GiB (sparse) ratings.dat", res, ["ratings.dat"])
        self.attempt(c, "--data a 5 GiB (sparse) ratings.dat", sparse)

        def npy_header():
            from refit.data import load_dataset

            folder = write_split(load_dataset("synthetic", n_users=50, n_items=40), os.path.join(d, "npy-huge"))
            with open(os.path.join(folder, "train_list.npy"), "wb") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False,
                                                         "shape": (10 ** 12, 2)})
                f.write(np.zeros(8, dtype=np.int64).tobytes())
            self.refused(c, "--data: a train_list.npy whose header declares 10**12 rows", self.run(
                [*PRE, "--data", folder, "--epochs", "1", "--out", os.path.join(d, "runs", "npy")]),
                ["train_list.npy"])
        self.attempt(c, "--data: a train_list.npy whose header declares 10**12 rows", npy_header)

        def flag(name, argv, needles, either=False):
            res = self.run(argv)
            (self.refused_or_succeeded if either else self.refused)(c, name, res, needles)

        out = lambda n: ["--out", os.path.join(d, "runs", n)]
        best = os.path.join(self.base(), "best.pt")
        ft = lambda n, *extra: ["finetune", "--checkpoint", best, *FT, *extra, *out(n)]
        seq_ok = os.path.join(d, "pkl-ok")
        self.attempt(c, "--steps 100000000", lambda: flag(
            "pretrain --steps 100000000", [*PRE, "--steps", "100000000", "--epochs", "1", *out("steps")],
            [("steps",)]))
        self.attempt(c, "--dims 1000000000000,32", lambda: flag(
            "pretrain --dims 1000000000000,32", [*PRE, "--dims", "1000000000000,32", "--epochs", "1", *out("dims")],
            ["dims"]))
        self.attempt(c, "--max-len 100000000", lambda: flag(
            "pretrain --model dreamrec --max-len 100000000",
            ["pretrain", "--data", seq_ok, *SEQ, "--max-len", "100000000", *out("maxlen")],
            [("max_len", "max-len")]))
        self.attempt(c, "--max-len 100000000 synthetic-seq", lambda: flag(
            "pretrain --model dreamrec --data synthetic-seq --max-len 100000000",
            ["pretrain", "--data", "synthetic-seq", *SEQ, "--max-len", "100000000", *out("maxlen2")],
            [("max_len", "max-len")]))
        self.attempt(c, "--similar-users 1000000000", lambda: flag(
            "finetune --similar-users 1000000000", ft("simusers", "--similar-users", "1000000000"),
            ["--similar-users"]))
        self.attempt(c, "--hidden 1000000000", lambda: flag(
            "pretrain --model dreamrec --hidden 1000000000",
            ["pretrain", "--data", seq_ok, *SEQ, "--hidden", "1000000000", *out("hidden")], ["hidden"]))
        self.attempt(c, "--emb-size 1000000000000", lambda: flag(
            "pretrain --emb-size 1000000000000", [*PRE, "--emb-size", "1000000000000", "--epochs", "1",
                                                  *out("emb")], [("emb", "emb_size", "emb-size")]))
        self.attempt(c, "--n-tokens", lambda: flag(
            "pretrain --model cfdiff --n-tokens 1000000000",
            [*PRE, "--model", "cfdiff", "--n-tokens", "1000000000", "--epochs", "1", *out("ntok")],
            [("tokens", "n_tokens", "n-tokens")]))
        self.attempt(c, "--d-model", lambda: flag(
            "pretrain --model cfdiff --d-model 1000000000",
            [*PRE, "--model", "cfdiff", "--d-model", "1000000000", "--epochs", "1", *out("dmodel")],
            [("d_model", "d-model")]))
        self.attempt(c, "--sampling-steps", lambda: flag(
            "pretrain --sampling-steps 1000000000 (above --steps)",
            [*PRE, "--sampling-steps", "1000000000", "--epochs", "1", *out("sampsteps")],
            [("sampling_steps", "sampling-steps")]))
        self.attempt(c, "--batch-size 10**12", lambda: flag(
            "pretrain --batch-size 1000000000000", [*PRE, "--batch-size", "1000000000000", "--epochs", "1",
                                                    *out("bs")], [("batch", "batch_size")], either=True))
        self.attempt(c, "--eval-batch-size 10**12", lambda: flag(
            "pretrain --eval-batch-size 1000000000000", [*PRE, "--eval-batch-size", "1000000000000",
                                                         "--epochs", "1", *out("ebs")], [("batch",)], either=True))
        self.attempt(c, "--ks 10,20,1000000000", lambda: flag(
            "pretrain --ks 10,20,1000000000", [*PRE[:-2], "--ks", "10,20,1000000000", "--epochs", "1", *out("ks")],
            [("--ks", "ks")]))
        self.attempt(c, "finetune --batch-size 10**9", lambda: flag(
            "finetune --batch-size 1000000000", ["finetune", "--checkpoint", best, "--iterations", "1",
                                                 "--batch-size", "1000000000", "--no-plot", "--ks", "10,20",
                                                 *out("ftbs")], [("batch",)], either=True))
        self.attempt(c, "finetune --group-size 10**9", lambda: flag(
            "finetune --method grpo --group-size 1000000000",
            ft("group", "--method", "grpo", "--group-size", "1000000000"), [("group",)]))
        self.attempt(c, "finetune --rl-steps 10**8", lambda: flag(
            "finetune --rl-steps 100000000", ft("rlsteps", "--rl-steps", "100000000"), [("rl-steps", "rl_steps")]))
        self.attempt(c, "finetune --k 10**9", lambda: flag(
            "finetune --k 1000000000", ft("k", "--k", "1000000000"), [("--k", "k=", " k = ")]))
        self.attempt(c, "finetune --probe-size 10**9", lambda: flag(
            "finetune --probe-size 1000000000", ft("probe", "--probe-size", "1000000000"),
            [("probe",)], either=True))
        self.attempt(c, "finetune --minibatch-size 10**12", lambda: flag(
            "finetune --ppo-epochs 1 --minibatch-size 1000000000000",
            ft("mb", "--ppo-epochs", "1", "--minibatch-size", "1000000000000"), [("minibatch",)], either=True))

        def paper_huge():
            m = paper_dnn()
            m.in_dims, m.out_dims = [10 ** 12, 32], [32, 10 ** 12]
            pth = save_like_the_paper_code(m, os.path.join(d, "huge.pth"))
            self.refused(c, "import-diffrec: a paper .pth declaring dims [10**12, 32]", self.run(
                ["import-diffrec", pth, "--data", "synthetic", "--steps", "5", "--out", pth + ".pt"]),
                ["huge.pth", "declares"])
        self.attempt(c, "import-diffrec: a paper .pth declaring dims", paper_huge)

        self.attempt(c, "import-diffrec --steps 100000000", lambda: flag(
            "import-diffrec --steps 100000000",
            ["import-diffrec", save_like_the_paper_code(paper_dnn(), os.path.join(d, "steps.pth")), "--data",
             "synthetic", "--steps", "100000000", "--out", os.path.join(d, "steps.pt")], [("steps",)]))

    # --- 4. bad values ----------------------------------------------------------------------------------------

    def class_values(self) -> None:
        c = "values"
        import argparse as _argparse

        from refit import cli

        d = self.dir("c4")
        best = os.path.join(self.base(), "best.pt")
        out = lambda n: ["--out", os.path.join(d, "runs", n)]
        required = {"pretrain": [*PRE[1:], "--epochs", "1"], "finetune": ["--checkpoint", best, *FT]}
        parser = cli.build_parser()
        sub = next(a for a in parser._actions if isinstance(a, _argparse._SubParsersAction))
        float_types = [t for t in (float, getattr(cli, "_finite_float", None), getattr(cli, "_positive_float", None),
                                   getattr(cli, "_min_rating", None)) if t is not None]
        for cmd in ("pretrain", "finetune"):
            actions = sub.choices[cmd]._actions
            floats = [a.option_strings[-1] for a in actions if a.option_strings and (
                a.type in float_types or "float" in getattr(a.type, "__name__", ""))]
            ints = [a.option_strings[-1] for a in actions if a.option_strings and a.type is int]
            for flag in floats:
                for value in ("nan", "inf"):
                    name = f"{cmd} {flag}={value}"
                    self.attempt(c, name, lambda cmd=cmd, flag=flag, value=value, name=name: self.refused(
                        c, name, self.run([cmd, *required[cmd], f"{flag}={value}", *out("f")]), [flag, "finite"]))
            for seed in ("-1", str(2 ** 32)):
                name = f"{cmd} --seed={seed}"
                self.attempt(c, name, lambda cmd=cmd, seed=seed, name=name: self.refused(
                    c, name, self.run([cmd, *required[cmd], f"--seed={seed}", *out("s")]), ["--seed"]))
            for flag in ints:  # flags parsed by a bare int(): a negative count
                name = f"{cmd} {flag}=-1 (a bare int flag)"
                self.attempt(c, name, lambda cmd=cmd, flag=flag, name=name: self.refused(
                    c, name, self.run([cmd, *required[cmd], f"{flag}=-1", *out(f"int{flag}")], timeout=RUN_TIMEOUT),
                    [(flag, flag.lstrip("-").replace("-", "_"))]))

        seq_run = lambda folder: ["pretrain", "--data", folder, *SEQ, *out(os.path.basename(folder))]

        def pkl_ids(name, change, needles):
            obj = seq_dataset()
            change(obj)
            folder = write_pkl(os.path.join(d, name.split(":")[0]), obj)
            self.refused(c, name, self.run(seq_run(folder)), ["dataset.pkl", *needles])

        self.attempt(c, "user-2**63", lambda: pkl_ids(
            "user-2**63: dataset.pkl with the user id 2**63",
            lambda o: [o[s].__setitem__(2 ** 63, o[s].pop(0)) for s in ("train", "val", "test")],
            ["9223372036854775808"]))
        self.attempt(c, "smap-2**70", lambda: pkl_ids(
            "smap-2**70: dataset.pkl whose smap maps to the item id 2**70",
            lambda o: o["smap"].__setitem__(99999, 2 ** 70), ["1180591620717411303424"]))
        self.attempt(c, "item-2**63", lambda: pkl_ids(
            "item-2**63: dataset.pkl with the item id 2**63 in a sequence",
            lambda o: o["train"][3].__setitem__(0, 2 ** 63), []))
        self.attempt(c, "item-negative", lambda: pkl_ids(
            "item-negative: dataset.pkl with the item id -5 in a sequence",
            lambda o: o["train"][3].__setitem__(0, -5), ["-5"]))
        self.attempt(c, "item-str", lambda: pkl_ids(
            "item-str: dataset.pkl with the item id '7' (a str) in a sequence",
            lambda o: o["train"][3].__setitem__(0, "7"), []))
        self.attempt(c, "item-bool", lambda: pkl_ids(
            "item-bool: dataset.pkl with the item id True in a sequence",
            lambda o: o["train"][3].__setitem__(0, True), []))
        self.attempt(c, "item-float", lambda: pkl_ids(
            "item-float: dataset.pkl with the item id 7.5 in a sequence",
            lambda o: o["train"][3].__setitem__(0, 7.5), []))

        def df_case(name, train, needles):
            folder = write_dreamrec(os.path.join(d, name.split(":")[0]), train=train)
            self.refused(c, name, self.run(seq_run(folder)), ["train_data.df", *needles])

        def dup(column):
            def change(df):
                import pandas as pd
                return pd.concat([df, df[[column]]], axis=1)
            return change

        for column in ("seq", "tgt", "seq_len"):
            self.attempt(c, f"dup-{column}", lambda column=column: df_case(
                f"dup-{column}: train_data.df with the column '{column}' twice", dup(column), [column]))

        def tgt_value(value):
            def change(df):
                df = df.copy()
                if isinstance(value, float):
                    df["tgt"] = df["tgt"].astype(float)
                df.loc[3, "tgt"] = value
                return df
            return change

        self.attempt(c, "tgt-nan", lambda: df_case("tgt-nan: train_data.df with a NaN target",
                                                   tgt_value(float("nan")), ["tgt"]))
        self.attempt(c, "tgt-big", lambda: df_case("tgt-big: train_data.df with the target 2**63 - 1",
                                                   tgt_value(2 ** 63 - 1), ["tgt"]))
        self.attempt(c, "tgt-neg", lambda: df_case("tgt-neg: train_data.df with the target -3",
                                                   tgt_value(-3), ["tgt"]))

        def seq_len_bad(df):
            df = df.copy()
            df.loc[2, "seq_len"] = 10 ** 12
            return df
        self.attempt(c, "seq_len-huge", lambda: df_case("seq_len-huge: train_data.df with seq_len 10**12",
                                                        seq_len_bad, ["seq_len"]))

        def paper_dropout():
            m = paper_dnn()
            m.drop.p = float("nan")
            pth = save_like_the_paper_code(m, os.path.join(d, "dropout-nan.pth"))
            self.refused(c, "import-diffrec: a paper .pth with dropout NaN", self.run(
                ["import-diffrec", pth, "--data", "synthetic", "--steps", "5", "--out", pth + ".pt"]),
                ["dropout-nan.pth", "dropout"])
        self.attempt(c, "import-diffrec: a paper .pth with dropout NaN", paper_dropout)

        # paths of the wrong kind
        afile = os.path.join(d, "afile")
        with open(afile, "w") as f:
            f.write("x")
        folder = self.dir("c4", "afolder")
        pth = save_like_the_paper_code(paper_dnn(), os.path.join(d, "paper.pth"))
        seq_pkl = write_pkl(os.path.join(d, "pkl-ok"), seq_dataset())
        paths = [
            ("pretrain --out a file", [*PRE, "--epochs", "1", "--out", afile], ["--out", "is a file"]),
            ("pretrain --out under a file", [*PRE, "--epochs", "1", "--out", os.path.join(afile, "run")],
             ["--out", "file"]),
            ("pretrain --out under a file, two levels down", [*PRE, "--epochs", "1", "--out",
                                                               os.path.join(afile, "a", "b")], ["--out", "file"]),
            ("finetune --out a file", ["finetune", "--checkpoint", best, *FT, "--out", afile], ["--out", "is a file"]),
            ("evaluate --checkpoint a folder", ["evaluate", "--checkpoint", folder], ["--checkpoint", "is a folder"]),
            ("evaluate --checkpoint a run folder", ["evaluate", "--checkpoint", self.base()],
             ["--checkpoint", "is a folder", "best.pt"]),
            ("finetune --checkpoint a folder", ["finetune", "--checkpoint", folder, *FT, *out("ckdir")],
             ["--checkpoint", "is a folder"]),
            ("pretrain --init a folder", [*PRE, "--epochs", "1", "--init", folder, *out("init")],
             ["--init", "folder"]),
            ("import-diffrec CHECKPOINT a folder", ["import-diffrec", folder, "--data", "synthetic", "--out",
                                                    os.path.join(d, "x.pt")], ["checkpoint", "is a folder"]),
            ("import-diffrec --out a folder", ["import-diffrec", pth, "--data", "synthetic", "--steps", "5", "--out",
                                               folder], ["--out", "folder"]),
            ("import-diffrec --out under a file", ["import-diffrec", pth, "--data", "synthetic", "--steps", "5",
                                                   "--out", os.path.join(afile, "x.pt")], ["--out", "file"]),
            ("evaluate --checkpoint missing", ["evaluate", "--checkpoint", os.path.join(d, "missing.pt")],
             ["missing.pt"]),
            ("pretrain --data missing", [*PRE[:1], "--data", os.path.join(d, "missing"), *PRE[3:], "--epochs", "1",
                                         *out("missing")], ["missing"]),
            ("pretrain --data an empty folder", [*PRE[:1], "--data", folder, *PRE[3:], "--epochs", "1",
                                                 *out("empty")], ["afolder"]),
            ("evaluate --checkpoint a dataset.pkl", ["evaluate", "--checkpoint", os.path.join(seq_pkl, "dataset.pkl")],
             ["dataset.pkl"]),
            ("evaluate --checkpoint a paper .pth", ["evaluate", "--checkpoint", pth], ["paper.pth"]),
            ("finetune --checkpoint a text file", ["finetune", "--checkpoint", afile, *FT, *out("txt")], ["afile"]),
            ("pretrain --init a text file", [*PRE, "--epochs", "1", "--init", afile, *out("inittxt")], ["afile"]),
        ]
        for name, argv, needles in paths:
            self.attempt(c, name, lambda name=name, argv=argv, needles=needles: self.refused(
                c, name, self.run(argv), needles))

    def run_all(self) -> None:
        t0 = time.perf_counter()
        for cls in (self.class_loss, self.class_integrity, self.class_memory, self.class_values):
            if cls.__name__.split("_")[1] not in self.classes:
                continue
            try:
                cls()
            except Exception as exc:  # noqa: BLE001 - a class whose inputs cannot be built
                self.harness_error(cls.__name__.split("_")[1], f"{cls.__name__} setup", exc)
        self.seconds = time.perf_counter() - t0


# --- report ------------------------------------------------------------------------------------------------------

def report(results: dict) -> str:
    cases = results["cases"]
    out = [f"Reliability attack: {len(cases)} cases, {sum(c['held'] for c in cases)} held, "
           f"{results['seconds']:.0f} s ({results['python']}, REFIT_MEMORY_LIMIT={results['memory_limit']}, "
           f"peak bound {results['peak_bound_mib']} MiB)", "",
           "| class | cases tried | cases held |", "| --- | ---: | ---: |"]
    for key, title in CLASSES.items():
        mine = [c for c in cases if c["class"] == key]
        out.append(f"| {title} | {len(mine)} | {sum(c['held'] for c in mine)} |")
    for key, title in CLASSES.items():
        failed = [c for c in cases if c["class"] == key and not c["held"]]
        if not failed:
            continue
        out += ["", f"### {title}: cases that did not hold", "",
                "| case | expected | rc | s | stderr (last line) | why |", "| --- | --- | ---: | ---: | --- | --- |"]
        for c in failed:
            cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
            out.append(f"| {cell(c['name'])} | {cell(c['expected'])} | {c['rc']} | {c['seconds']} | "
                       f"`{cell(c['stderr_last_line'][:220])}` | {cell('; '.join(c['problems']))} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for the crafted inputs (out/work, replaced), logs and results.json")
    p.add_argument("--report", nargs="?", const="", default=None, metavar="JSON",
                   help="print the markdown tables: of this run, or (given a results.json) of an earlier one")
    p.add_argument("--only", default=None, help="run only the cases whose name holds this text")
    p.add_argument("--classes", default=",".join(CLASSES), help=f"which classes to run (of {', '.join(CLASSES)})")
    args = p.parse_args(argv)
    if args.report:
        print(report(json.load(open(args.report))))
        return 0
    if not args.out:
        p.error("--out is required (unless --report names a results.json)")
    os.umask(0o022)
    classes = [k.strip() for k in args.classes.split(",") if k.strip()]
    unknown = [k for k in classes if k not in CLASSES]
    if unknown:
        p.error(f"--classes: unknown {', '.join(unknown)}; the classes are {', '.join(CLASSES)}")
    attack = Attack(args.out, args.only, classes)
    attack.run_all()
    results = {"python": sys.version.split()[0], "memory_limit": MEMORY_LIMIT, "peak_bound_mib": PEAK_BOUND_MIB,
               "seconds": round(attack.seconds, 1), "cases": attack.cases}
    path = os.path.join(attack.out, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    held = sum(c["held"] for c in attack.cases)
    print(f"\n{len(attack.cases)} cases, {held} held, {len(attack.cases) - held} did not; "
          f"{attack.seconds:.0f} s; results in {path}")
    if args.report is not None:
        print()
        print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
