"""The dispatcher, the extension loader and `python -m refit_kernels.info`."""

import os
import subprocess
import sys

import pytest
import torch

import refit_kernels as rk
from refit_kernels import _extension, dispatch

CPU = torch.device("cpu")


def test_available_backends_lists_every_backend():
    status = rk.available_backends()
    assert set(status) == set(rk.BACKENDS)
    assert status["reference"] is None
    for name, reason in status.items():
        assert reason is None or (isinstance(reason, str) and reason), name


def test_extension_is_built_and_current():
    """The project's own build must give a usable CPU backend (CI fails loudly otherwise)."""
    assert _extension.LOAD_ERROR is None, _extension.LOAD_ERROR
    assert rk.available_backends()["cpu"] is None
    assert _extension.build_facts()["torch_version"] == torch.__version__


def test_triton_usable_when_installed():
    pytest.importorskip("triton")
    # conftest sets TRITON_INTERPRET=1 without a GPU, so Triton must be usable here.
    assert rk.available_backends()["triton"] is None


def test_cpu_inputs_prefer_the_cpu_kernel(monkeypatch):
    monkeypatch.delenv("REFIT_BACKEND", raising=False)
    want = "cpu" if rk.available_backends()["cpu"] is None else "reference"
    assert dispatch.select("gaussian_logprob", CPU) == want


def test_triton_is_never_chosen_for_cpu_tensors_unasked(monkeypatch):
    monkeypatch.delenv("REFIT_BACKEND", raising=False)
    assert dispatch.select("op", CPU, objection=lambda b: "no" if b == "cpu" else None) == "reference"


def test_backend_argument_forces(monkeypatch):
    monkeypatch.delenv("REFIT_BACKEND", raising=False)
    assert dispatch.select("op", CPU, backend="reference") == "reference"


def test_environment_forces(monkeypatch):
    monkeypatch.setenv("REFIT_BACKEND", "reference")
    assert dispatch.select("op", CPU) == "reference"
    # The call's own choice wins over the environment.
    if rk.available_backends()["cpu"] is None:
        assert dispatch.select("op", CPU, backend="cpu") == "cpu"


def test_environment_forcing_reaches_the_op(monkeypatch):
    """REFIT_BACKEND=reference makes the op run the reference: its float32 result differs in rounding."""
    from test_gaussian_logprob import make_trajectory

    pred, traj, cp, cx, lv = make_trajectory(4, 8, 300, seed=4)
    monkeypatch.setenv("REFIT_BACKEND", "reference")
    via_env = rk.gaussian_logprob(pred, traj, cp, cx, lv)
    assert torch.equal(via_env, rk.gaussian_logprob(pred, traj, cp, cx, lv, backend="reference"))


def test_unknown_backend_is_a_value_error(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.select("op", CPU, backend="vulkan")
    monkeypatch.setenv("REFIT_BACKEND", "vulkan")
    with pytest.raises(ValueError, match="REFIT_BACKEND must be one of"):
        dispatch.select("op", CPU)


def test_forced_backend_that_cannot_serve_raises_with_reason(monkeypatch):
    monkeypatch.delenv("REFIT_BACKEND", raising=False)
    with pytest.raises(rk.BackendUnavailable, match="'cuda' cannot serve"):
        dispatch.select("op", CPU, backend="cuda")
    with pytest.raises(rk.BackendUnavailable, match="because of dtype"):
        dispatch.select("op", CPU, backend="reference", objection=lambda b: "because of dtype")
    meta = torch.device("meta")
    with pytest.raises(rk.BackendUnavailable, match="takes CPU tensors"):
        dispatch.select("op", meta, backend="cpu")
    # Unknown devices fall back to the reference.
    assert dispatch.select("op", meta) == "reference"


def test_stale_reason_names_both_versions():
    assert _extension.stale_reason("2.13.0", "2.13.0") is None
    msg = _extension.stale_reason("2.12.0+cpu", "2.13.0+cpu")
    assert "built for torch 2.12.0+cpu, running 2.13.0+cpu" in msg and "rebuild" in msg


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("REFIT_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_survives_a_missing_extension():
    code = (
        "import sys, torch\n"
        "sys.modules['refit_kernels._C'] = None  # as if it had never been built\n"
        "import refit_kernels as rk\n"
        "s = rk.available_backends()\n"
        "assert s['reference'] is None, s\n"
        "assert 'not built' in s['cpu'] and 'rebuild' in s['cpu'], s['cpu']\n"
        "p = torch.rand(2, 3, 4); t = torch.rand(3, 3, 4); c = torch.ones(2, dtype=torch.float64)\n"
        "assert rk.gaussian_logprob(p, t, c, c, -c).shape == (3,)\n"
        "try:\n"
        "    rk.gaussian_logprob(p, t, c, c, -c, backend='cpu')\n"
        "except rk.BackendUnavailable as e:\n"
        "    assert 'rebuild' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('forcing the cpu backend should have raised')\n"
        "print('ok')\n"
    )
    out = _run_python(code)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_import_survives_a_stale_extension():
    code = (
        "import torch\n"
        "real = torch.__version__\n"
        "torch.__version__ = '0.0.1'  # as if torch had been upgraded since the build\n"
        "import refit_kernels as rk\n"
        "reason = rk.available_backends()['cpu']\n"
        "assert reason and 'running 0.0.1' in reason and 'rebuild' in reason, reason\n"
        "p = torch.rand(2, 3, 4); t = torch.rand(3, 3, 4); c = torch.ones(2, dtype=torch.float64)\n"
        "assert rk.gaussian_logprob(p, t, c, c, -c).shape == (3,)\n"
        "print('ok')\n"
    )
    out = _run_python(code)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_info_reports_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "refit_kernels.info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"torch         {torch.__version__}" in out.stdout
    for name in rk.BACKENDS:
        assert f"  {name}" in out.stdout
    assert "reference  usable" in out.stdout


def test_refit_kernels_does_not_import_refit():
    out = _run_python("import sys, refit_kernels\nprint(any(m == 'refit' or m.startswith('refit.') for m in sys.modules))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
