"""Helpers shared by the tests: backend parametrisation and mismatch reports."""

import importlib
import os
import sys
import zlib

import pytest
import torch

import refit_kernels as rk

GPU = torch.cuda.is_available()

# (backend, device its inputs live on) pairs every kernel test runs over.
BACKEND_DEVICES = [
    ("reference", "cpu"),
    ("cpu", "cpu"),
    ("triton", "cuda" if GPU else "cpu"),
    ("cuda", "cuda"),
]


def stable_seed(*key) -> int:
    """A seed in [0, 2**31) from a test's parameters, the same in every process (``hash`` of a string is
    salted per process, so a seed made with it drew other inputs on every run)."""
    return zlib.crc32(repr(key).encode()) % 2**31


def backend_params():
    """pytest params over BACKEND_DEVICES: CUDA ones marked, unusable ones skipped with the reason."""
    status = rk.available_backends()
    params = []
    for backend, device in BACKEND_DEVICES:
        marks = [pytest.mark.cuda] if device == "cuda" else []
        reason = status[backend]
        if reason is None and device == "cuda" and not GPU:
            reason = "no CUDA device"
        if reason is not None:
            marks.append(pytest.mark.skip(reason=f"{backend} backend unusable: {reason}"))
        params.append(pytest.param((backend, device), id=backend, marks=marks))
    return params


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, k: int = 5) -> str:
    """The k worst elements of a comparison, for failure messages."""
    diff = (actual.double() - expected.double()).abs().flatten()
    if diff.numel() == 0:
        return "(empty)"
    worst = torch.topk(diff, min(k, diff.numel())).indices
    lines = []
    for flat in worst.tolist():
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), actual.shape))
        lines.append(f"  at {idx}: got {actual.double().flatten()[flat].item()!r}, "
                     f"expected {expected.double().flatten()[flat].item()!r}")
    return "\n".join(lines)


def shared_dataset(name: str = "ml-1m_clean"):
    """Path of a data set in ../shared/data (or $REFIT_DATA), or None when it is absent."""
    import os

    root = os.environ.get("REFIT_DATA") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                        "shared", "data")
    path = os.path.join(root, name)
    return path if os.path.isdir(path) else None


#: A tiny synthetic sequence data set for the post-training method tests.
TINY_SEQ = {"n_users": 60, "n_items": 40, "mean_length": 8, "seed": 5}


def tiny_dreamrec(data, seed: int = 0):
    """An untrained DreamRec policy (width 8, 8 steps, w 1) over ``data``, its weights seeded by ``seed``."""
    from refit.diffusion import GaussianDiffusion
    from refit.families.dreamrec.network import DreamRec
    from refit.families.dreamrec.pretrain import DreamRecConfig
    from refit.families.dreamrec.recommender import SeqRecommender

    cfg = DreamRecConfig(hidden=8, steps=8, detach_target=True)
    torch.manual_seed(seed)
    return SeqRecommender(DreamRec(**cfg.model_config(data.n_items)), GaussianDiffusion(cfg.diffusion_config()), w=1.0)


def sigterm_after_first_evaluation(monkeypatch):
    """Makes the first ``refit.evaluate.evaluate_sequences`` call of a run send SIGTERM to this process
    (read by the run's StopRequests after that epoch), so the run stops there as if signalled. Returns the
    real function, to put back with ``monkeypatch.setattr(evaluation, "evaluate_sequences", real)``."""
    import os
    import signal

    import refit.evaluate as evaluation

    real = evaluation.evaluate_sequences
    calls = []

    def stop_after_the_first(score_fn, data_, splits, **kw):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(score_fn, data_, splits, **kw)

    monkeypatch.setattr(evaluation, "evaluate_sequences", stop_after_the_first)
    return real


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark_module(name: str):
    """The module ``benchmarks.<name>`` (``"studies.scale"``): the repository root goes at the end of
    ``sys.path``, so that the installed packages still come first."""
    if ROOT not in sys.path:
        sys.path.append(ROOT)
    return importlib.import_module("benchmarks." + name)


def benchmark_command(name: str):
    """(argv, env) that run ``python -m benchmarks.<name>`` from any folder (env: ``benchmarks.paths.child_env``
    with this process's thread setting)."""
    env = benchmark_module("paths").child_env(os.environ.get("OMP_NUM_THREADS"))
    return [sys.executable, "-m", "benchmarks." + name], env
