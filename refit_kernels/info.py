"""``python -m refit_kernels.info``: what was built and what is usable here.

The first thing to paste into a bug report.
"""

from __future__ import annotations

import importlib.util
import platform
import sys

import torch

from . import __version__, _extension
from .dispatch import BACKENDS, available_backends


def _version_of(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # noqa: BLE001 - report, never fail
        return f"import failed ({type(exc).__name__}: {exc})"


def report() -> str:
    """The report as text."""
    lines = [
        f"refit_kernels {__version__}",
        f"python        {platform.python_version()} ({sys.executable})",
        f"platform      {platform.platform()}",
        f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
        f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU(s) visible; "
        f"{torch.get_num_threads()} CPU threads)",
        f"triton        {_version_of('triton')}",
        "",
        "compiled extension refit_kernels._C:",
    ]
    facts = _extension.build_facts()
    if facts:
        lines += [
            f"  path        {facts['path']}",
            f"  built for   torch {facts['torch_version']}",
            f"  CUDA        {'yes (CUDA ' + str(facts['cuda_version']) + ')' if facts['with_cuda'] else 'no'}",
            f"  OpenMP      {'yes' if facts['with_openmp'] else 'no'}",
            f"  AVX-512     {'yes' if facts['cpu_avx512'] else 'no'} (the CPU kernels' hand-written loops; "
            "REFIT_CPU_AVX512=0 turns them off)",
        ]
        if facts["sanitized"]:
            lines.append("  sanitizers  AddressSanitizer, UBSan (a REFIT_SANITIZE=1 build, for tests)")
    if _extension.LOAD_ERROR:
        lines.append(f"  problem     {_extension.LOAD_ERROR}")
    lines += ["", "backends:"]
    status = available_backends()
    for name in BACKENDS:
        reason = status[name]
        lines.append(f"  {name:<10} {'usable' if reason is None else 'unusable: ' + reason}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
