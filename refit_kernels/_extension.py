"""Loading of the compiled extension ``refit_kernels._C``.

Importing refit_kernels never fails because the extension is missing, stale or
broken: the failure is recorded in :data:`LOAD_ERROR` and reported by
:func:`refit_kernels.available_backends`, and the reference backend keeps
working.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

REBUILD_HINT = "rebuild with `pip install --no-build-isolation -e .` in the refit-kernels checkout"


def stale_reason(built_for: str, running: str) -> Optional[str]:
    """Why an extension built for torch ``built_for`` is unusable under ``running``.

    Returns None when they match. The C++ ABI of torch is not stable across
    releases, so any difference (local version suffix included) counts.
    """
    if built_for == running:
        return None
    return f"built for torch {built_for}, running {running}: {REBUILD_HINT}"


def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    try:
        module = importlib.import_module("refit_kernels._C")
    except ImportError as exc:
        if getattr(exc, "name", None) == "refit_kernels._C":
            return None, f"the compiled extension refit_kernels._C is not built: {REBUILD_HINT}"
        return None, f"refit_kernels._C failed to load ({exc}): {REBUILD_HINT}"
    except Exception as exc:  # noqa: BLE001 - any load failure must stay an explanation
        return None, f"refit_kernels._C failed to load ({type(exc).__name__}: {exc}): {REBUILD_HINT}"
    reason = stale_reason(getattr(module, "torch_version", "unknown"), torch.__version__)
    return module, reason


#: The extension module when it imported, else None.
MODULE, LOAD_ERROR = _load()

#: True when the compiled ops can be trusted in this process.
LOADED: bool = MODULE is not None and LOAD_ERROR is None


def built_with_cuda() -> bool:
    """Whether the loaded extension carries the CUDA kernels."""
    return LOADED and bool(getattr(MODULE, "with_cuda", 0))


def build_facts() -> dict:
    """Versions and switches the extension was built with (empty when not loaded)."""
    if MODULE is None:
        return {}
    return {
        "torch_version": getattr(MODULE, "torch_version", "unknown"),
        "cuda_version": getattr(MODULE, "cuda_version", "") or None,
        "with_cuda": bool(getattr(MODULE, "with_cuda", 0)),
        "with_openmp": bool(getattr(MODULE, "with_openmp", 0)),
        "sanitized": bool(getattr(MODULE, "sanitized", 0)),
        "cpu_avx512": bool(MODULE.cpu_avx512()) if hasattr(MODULE, "cpu_avx512") else False,
        "path": getattr(MODULE, "__file__", None),
    }
