"""Argument checks shared by the public functions of every op.

They run before the dispatcher picks a backend, so every backend refuses the
same inputs with the same exception and message. Each raises TypeError (a
wrong kind of object, dtype or layout) or ValueError (a wrong value, device
or memory layout) whose message names the argument.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Tuple

import numpy as np
import torch


def is_int(x: Any) -> bool:
    """Whether ``x`` is a Python or NumPy integer (bools are not: True is no row id)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def int_arg(x: Any, name: str, op: str) -> int:
    """``x`` as an int; TypeError naming ``name`` for floats, bools and anything else."""
    if not is_int(x):
        raise TypeError(f"{op}: {name} must be an int, got {x!r} ({type(x).__name__})")
    return int(x)


def dense_tensor(t: torch.Tensor, name: str, op: str) -> None:
    """TypeError naming ``name`` for a tensor the kernels cannot read: sparse or nested layouts."""
    if t.is_nested:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got a nested tensor")
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")


def has_data(t: torch.Tensor, name: str, op: str) -> None:
    """ValueError naming ``name`` for a meta tensor.

    Meta tensors carry shapes but no data. The registered ops
    (``torch.ops.refit.*``) take them for shape inference; the public
    functions, which compute values, do not. Each public function checks the
    tensor that fixes the device of the call (the others must be on the same
    device, which their device checks enforce).
    """
    if t.device.type == "meta":
        raise ValueError(f"{op}: {name} is a meta tensor, which holds no data; pass a CPU or CUDA tensor")


def int_sequence(x: Iterable[Any], name: str, op: str) -> torch.Tensor:
    """A list / tuple / range of ints as an int64 tensor; TypeError for floats, bools and the rest.

    Elements may be Python or NumPy ints, or 0-d integer tensors.
    """
    values = list(x)
    for v in values:
        if is_int(v):
            continue
        if (isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point()
                and not v.is_complex() and v.dtype != torch.bool):
            continue
        raise TypeError(f"{op}: {name} must hold ints, got {v!r} ({type(v).__name__})")
    try:
        return torch.tensor([int(v) for v in values], dtype=torch.int64)
    except (OverflowError, RuntimeError):
        raise ValueError(f"{op}: {name} holds an int outside the int64 range") from None


def _byte_span(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    """[first, last) addresses of the bytes ``t``'s elements occupy, or None when it has none."""
    if t.numel() == 0:
        return None
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + extent * t.element_size()


def check_no_overlap(out: torch.Tensor, inputs: Iterable[Tuple[str, Optional[torch.Tensor]]], op: str) -> None:
    """ValueError naming ``out`` when its memory overlaps that of any input.

    An output that aliases an input is overwritten while the kernels still
    read the input, so what they read depends on the order of the writes.
    The test compares address ranges (what the elements span), so it also
    catches tensors of different storages over the same memory (e.g. two
    ``torch.from_numpy`` of views of one array); it may refuse an ``out``
    whose gaps merely interleave with an input, never accept a real overlap.
    The C++ ops make the same test (csrc/gather_rows.h).
    """
    out_span = _byte_span(out)
    if out_span is None:
        return
    for name, t in inputs:
        if t is None:
            continue
        span = _byte_span(t)
        if span is not None and span[0] < out_span[1] and out_span[0] < span[1]:
            raise ValueError(f"{op}: out shares memory with {name}; pass an out that overlaps no input")
