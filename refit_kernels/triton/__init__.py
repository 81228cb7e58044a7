"""Triton kernels of refit_kernels.

Nothing here imports triton until a kernel runs, so ``import refit_kernels``
stays fast and works without triton. On a machine without a GPU the kernels
run in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before triton
is imported.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch


def interpret_mode() -> bool:
    """Whether Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def unavailable_reason() -> Optional[str]:
    """None when the Triton kernels can run in this process, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'refit-kernels[triton]')"
    if interpret_mode():
        return None
    if not torch.cuda.is_available():
        return (
            "no CUDA device is available (set TRITON_INTERPRET=1 before triton is imported "
            "to run the Triton kernels on the CPU, slowly)"
        )
    return None
