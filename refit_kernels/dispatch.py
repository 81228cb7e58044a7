"""One dispatcher for every op.

Each op has up to four implementations of one contract: ``reference``
(PyTorch), ``cpu`` (C++), ``cuda`` (CUDA C++) and ``triton``. For every call the
dispatcher picks the first usable one for the inputs' device, in the order

* CUDA tensors: ``cuda``, ``triton``, ``reference``
* CPU tensors:  ``cpu``, ``reference``  (``triton`` only when asked for: on
  the CPU it runs in Triton's interpreter, which is slow)

``backend=`` on a call, or the ``REFIT_BACKEND`` environment variable for the
whole process, forces one; a forced backend that cannot serve the inputs
raises :class:`BackendUnavailable` saying why, never falls back silently.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch

from . import _extension
from . import triton as _triton

BACKENDS = ("reference", "cpu", "cuda", "triton")

_PREFERENCE = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}


class BackendUnavailable(RuntimeError):
    """A backend was asked for (by ``backend=`` or ``REFIT_BACKEND``) and cannot serve the call."""


def _cuda_reason() -> Optional[str]:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if not _extension.LOADED:
        return _extension.LOAD_ERROR
    if not _extension.built_with_cuda():
        return (
            "refit_kernels._C was built without the CUDA kernels (nvcc was not found or "
            "REFIT_SKIP_CUDA was set at build time): rebuild with FORCE_CUDA=1 "
            "pip install --no-build-isolation -e ."
        )
    return None


_STATUS: Optional[Dict[str, Optional[str]]] = None


def backend_status() -> Dict[str, Optional[str]]:
    """Backend name -> None when usable in this process, else the reason it is not.

    Computed once per process (availability does not change while it runs).
    """
    global _STATUS
    if _STATUS is None:
        _STATUS = {
            "reference": None,
            "cpu": _extension.LOAD_ERROR,
            "cuda": _cuda_reason(),
            "triton": _triton.unavailable_reason(),
        }
    return _STATUS


def available_backends() -> Dict[str, Optional[str]]:
    """Every backend's name mapped to None if usable here, else the reason it is not."""
    return dict(backend_status())


def device_objection(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot take tensors on ``device`` (None when it can)."""
    if backend == "reference":
        return None
    if backend == "cpu":
        return None if device.type == "cpu" else f"the cpu backend takes CPU tensors, got {device}"
    if backend == "cuda":
        return None if device.type == "cuda" else f"the cuda backend takes CUDA tensors, got {device}"
    if backend == "triton":
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _triton.interpret_mode():
            return None
        return (
            f"the triton backend takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, "
            f"set before triton is imported), got {device}"
        )
    return f"unknown backend {backend!r}"


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The backend forced by the call, else by ``REFIT_BACKEND``, else None."""
    if backend is not None:
        source = "backend"
        name = backend
    else:
        name = os.environ.get("REFIT_BACKEND") or None
        source = "REFIT_BACKEND"
        if name is None:
            return None
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)} (or unset), got {name!r}")
    return name


def select(
    op: str,
    device: torch.device,
    backend: Optional[str] = None,
    objection: Optional[Callable[[str], Optional[str]]] = None,
) -> str:
    """Chooses the backend that runs ``op`` on inputs living on ``device``.

    ``objection(name)`` may veto a backend for these particular inputs (a dtype
    or size it does not handle), returning the reason.
    """
    status = backend_status()
    forced = requested_backend(backend)
    if forced is not None:
        reason = status[forced] or device_objection(forced, device)
        if reason is None and objection is not None:
            reason = objection(forced)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {forced!r} cannot serve this call: {reason}")
        return forced
    for name in _PREFERENCE.get(device.type, ("reference",)):
        if status[name] is not None or device_objection(name, device) is not None:
            continue
        if objection is not None and objection(name) is not None:
            continue
        return name
    return "reference"
