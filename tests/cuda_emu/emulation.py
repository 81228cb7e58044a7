"""Builds and runs the CUDA kernels of csrc/cuda on the CPU, under the host emulation in this folder.

Each kernel source is copied with its ``<<<...>>>`` launches rewritten into
``emu_launch(...)`` calls and its ``extern __shared__`` arrays into the
emulated dynamic shared memory, and compiled (g++, C++20) together with a
small driver (``<op>_main.cpp``) that reads one case from a file and writes
the kernels' outputs to another. The drivers are built with AddressSanitizer
and UBSan when the compiler has them: every buffer a driver hands a kernel
has its exact size, so a read or write out of bounds ends the run with a
report. Every run has a timeout: a barrier that only part of a block reaches
deadlocks under the emulation.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
EMU_DIR = Path(__file__).resolve().parent

LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.+?)>>>\s*\((.*?)\)\s*;", re.S)
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")

#: Launches each kernel source holds: a launch the rewriting misses would not compile, but a source
#: that gained one the pattern does not see must fail here first, saying so.
LAUNCHES = {"gaussian_logprob": 4, "gather_rows": 3, "target_rank": 1}

#: Drivers whose kernels live in another op's source: policy_loss's kernel shares gaussian_logprob's rows.
KERNEL_SOURCE = {"policy_loss": "gaussian_logprob"}

#: refit::DType of csrc/include/refit/common.h.
DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
# A case takes seconds (2x300x3 gaussian_logprob: 4 s), but the emulation runs a thread per CUDA thread,
# so it slows down far more than other work on a busy machine: at 120 s, four cases timed out while
# other jobs held both cores. A deadlock never ends, so a generous limit still catches it.
RUN_TIMEOUT_S = 600


def compiler() -> Optional[str]:
    return shutil.which("g++") or shutil.which("c++")


@functools.lru_cache(maxsize=None)
def _sanitizers_work(cxx: str, work: str) -> bool:
    probe = Path(work) / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    out = subprocess.run([cxx, *SANITIZE, str(probe), "-o", str(Path(work) / "probe")], capture_output=True,
                         timeout=120)
    return out.returncode == 0


def rewrite(source: str) -> tuple[str, int]:
    """A kernel source with its launches and dynamic shared arrays in emulated form, and its launch count."""
    source, launches = LAUNCH.subn(r"emu_launch(\1, \2, \3);", source)
    source = DYNAMIC_SHARED.sub(r"\1* \2 = emu_dynamic_shared<\1>();", source)
    return source, launches


def build(op: str, work: Path, sanitize: bool = True) -> Path:
    """Compiles the driver of ``op`` ("gaussian_logprob", "policy_loss", "gather_rows", "target_rank" or
    "convert") into ``work``."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler")
    work.mkdir(parents=True, exist_ok=True)
    if op != "convert":
        kernels = KERNEL_SOURCE.get(op, op)
        source, launches = rewrite((ROOT / "csrc" / "cuda" / f"{kernels}_cuda.cu").read_text())
        if launches != LAUNCHES[kernels]:
            raise RuntimeError(f"{kernels}_cuda.cu: expected {LAUNCHES[kernels]} kernel launches, the rewriting "
                               f"found {launches}: update tests/cuda_emu/emulation.py")
        (work / f"{kernels}_emulated.cpp").write_text(source)
    exe = work / f"{op}_main"
    flags = ["-std=c++20", "-O1", "-pthread"]
    if sanitize and _sanitizers_work(cxx, str(work)):
        flags += SANITIZE
    cmd = [cxx, *flags, "-I", str(work), "-I", str(EMU_DIR), "-I", str(ROOT / "csrc" / "cuda"),
           "-I", str(ROOT / "csrc" / "include"), str(EMU_DIR / f"{op}_main.cpp"), "-o", str(exe)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{out.stderr[-4000:]}")
    return exe


def _run(exe: Path, payload: bytes) -> bytes:
    work = exe.parent
    src, dst = work / f"{exe.name}.in", work / f"{exe.name}.out"
    src.write_bytes(payload)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1")
    out = subprocess.run([str(exe), str(src), str(dst)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                         env=env)
    if out.returncode != 0:
        raise AssertionError(f"{exe.name} failed (exit {out.returncode}):\n{out.stderr[-6000:]}")
    return dst.read_bytes()


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.offset = data, 0

    def take(self, dtype, n: int) -> torch.Tensor:
        """n elements of a torch dtype (16-bit types read as their bits)."""
        np_dtype = {torch.float16: np.float16, torch.bfloat16: np.int16, torch.float32: np.float32,
                    torch.float64: np.float64, torch.int64: np.int64, torch.int16: np.int16}[dtype]
        arr = np.frombuffer(self.data, dtype=np_dtype, count=n, offset=self.offset)
        self.offset += arr.nbytes
        t = torch.from_numpy(arr.copy())
        return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t

    def done(self) -> None:
        assert self.offset == len(self.data), f"{len(self.data) - self.offset} bytes of output left unread"


def _raw(t: torch.Tensor) -> bytes:
    """The bytes of a contiguous CPU tensor (16-bit floats by their bits)."""
    t = t.detach().contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def storage_span(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(flat, strides)``: the 1-d stretch of storage a strided view reaches, from its first element, and its strides."""
    if any(s < 0 for s in t.stride()):
        raise ValueError("negative strides are not passed to the kernels")
    span = 0 if t.numel() == 0 else 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    flat = torch.as_strided(t, (span,), (1,), t.storage_offset())
    return flat, tuple(t.stride())


# --- gaussian_logprob ------------------------------------------------------------------------

def gaussian_logprob(exe: Path, pred: torch.Tensor, traj: torch.Tensor, coef_pred, coef_x, log_var,
                     grad: torch.Tensor, *, mean: bool, per_step: bool):
    """The CUDA forward and backward on one case: ``(value, grad_pred)``.

    ``pred`` (S, B, I) and ``traj`` (S+1, B, I) of one dtype, any non-negative strides with unit
    item stride (what the host glue passes); the constants (S,) and the incoming ``grad``
    ((S, B) or (B,)) are converted to the accumulation type as the host glue does.
    Returns the value ((S, B) or (B,), float32 or float64) and the contiguous (S, B, I) gradient.
    """
    dtype = pred.dtype
    assert traj.dtype == dtype
    S, B, I = pred.shape
    assert I <= 1 or (pred.stride(2) == 1 and traj.stride(2) == 1), "the host glue passes unit item strides"
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    p_flat, ps = storage_span(pred)
    t_flat, ts = storage_span(traj)
    header = [DTYPE_CODE[dtype], S, B, I, ps[0], ps[1], ts[0], ts[1], p_flat.numel(), t_flat.numel(),
              int(mean), int(per_step)]
    payload = b"".join([np.asarray(header, dtype=np.int64).tobytes(), _raw(p_flat), _raw(t_flat),
                        *(_raw(c.to(acc)) for c in (coef_pred, coef_x, log_var)), _raw(grad.to(acc))])
    r = _Reader(_run(exe, payload))
    fwd = int(r.take(torch.int64, 1)[0])
    value = r.take(acc, S * B if per_step else B)
    bwd = int(r.take(torch.int64, 1)[0])
    grad_pred = r.take(dtype, S * B * I)
    r.done()
    assert fwd == 0 and bwd == 0, f"launch status: forward {fwd}, backward {bwd}"
    return value.view((S, B) if per_step else (B,)), grad_pred.view(S, B, I)


# --- policy_loss -----------------------------------------------------------------------------

def policy_loss(exe: Path, pred: torch.Tensor, traj: torch.Tensor, coef_pred, coef_x, log_var, advantages,
                old_logprob, *, clip: float, mean: bool, normalizer: float):
    """The CUDA policy_loss kernel on one case, with the host glue's final sum: ``(loss, logprob, grad_pred)``.

    ``pred`` (S, B, I) and ``traj`` (S+1, B, I) of one dtype, any non-negative strides with unit
    item stride (what the host glue passes); the constants (S,), ``advantages`` (B,) and
    ``old_logprob`` ((S, B) or None) are converted to the accumulation type as the host glue does.
    Returns the () loss (the sum of the kernel's (S, B) per-row shares, as the host glue takes it)
    and the (S, B) terms in float32, or float64 for float64 inputs, and the contiguous (S, B, I)
    gradient in pred's dtype.
    """
    dtype = pred.dtype
    assert traj.dtype == dtype
    S, B, I = pred.shape
    assert I <= 1 or (pred.stride(2) == 1 and traj.stride(2) == 1), "the host glue passes unit item strides"
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    p_flat, ps = storage_span(pred)
    t_flat, ts = storage_span(traj)
    has_old = old_logprob is not None
    header = [DTYPE_CODE[dtype], S, B, I, ps[0], ps[1], ts[0], ts[1], p_flat.numel(), t_flat.numel(),
              int(mean), int(has_old)]
    parts = [np.asarray(header, dtype=np.int64).tobytes(), np.asarray([clip, normalizer], dtype=np.float64).tobytes(),
             _raw(p_flat), _raw(t_flat), *(_raw(c.to(acc)) for c in (coef_pred, coef_x, log_var, advantages))]
    if has_old:
        parts.append(_raw(old_logprob.to(acc)))
    r = _Reader(_run(exe, b"".join(parts)))
    status = int(r.take(torch.int64, 1)[0])
    terms = r.take(acc, S * B)
    shares = r.take(acc, S * B)
    grad_pred = r.take(dtype, S * B * I)
    r.done()
    assert status == 0, f"launch status {status}"
    return shares.sum(), terms.view(S, B), grad_pred.view(S, B, I)


# --- gather_rows -----------------------------------------------------------------------------

def gather_rows(exe: Path, indptr, indices, values, rows, segments, weights, n_cols: int, out: torch.Tensor):
    """The CUDA validation and gather on one case, into the (B, n_cols) view ``out`` (modified in place).

    ``out`` is a float32, float16 or bfloat16 view of any non-negative strides; the whole stretch
    of storage it spans goes to the kernel, so elements between its rows or columns must come
    back untouched. Returns ``(validate_status, bad, gather_status)``; ``gather_status`` is -1
    when the validation flagged the input (the gather is not run, as the host glue raises).
    """
    index64 = indptr.dtype == torch.int64
    assert indices.dtype == indptr.dtype
    n = rows.shape[0]
    batch = n if segments is None else segments.shape[0] - 1
    assert tuple(out.shape) == (batch, n_cols)
    flat, (s0, s1) = storage_span(out)
    header = [int(index64), indptr.shape[0] - 1, indices.shape[0], n_cols, n, batch, int(values is not None),
              int(segments is not None), int(weights is not None), DTYPE_CODE[out.dtype], s0, s1, flat.numel()]
    parts: Sequence[bytes] = [np.asarray(header, dtype=np.int64).tobytes(), _raw(indptr), _raw(indices)]
    if values is not None:
        parts.append(_raw(values.to(torch.float32)))
    parts.append(_raw(rows.to(torch.int64)))
    if segments is not None:
        parts.append(_raw(segments.to(torch.int64)))
    if weights is not None:
        parts.append(_raw(weights.to(torch.float32)))
    parts.append(_raw(flat))
    r = _Reader(_run(exe, b"".join(parts)))
    status = [int(v) for v in r.take(torch.int64, 3)]
    flat.copy_(r.take(out.dtype, flat.numel()))
    r.done()
    return tuple(status)


# --- target_rank -----------------------------------------------------------------------------

def target_rank(exe: Path, scores: torch.Tensor, users, exclude_indptr, exclude_indices, positives_indptr,
                positives_indices) -> torch.Tensor:
    """The CUDA kernel on one case, with the host glue around it: the (n,) int64 ranks, or the error the
    host glue raises from the kernel's report.

    The arguments are the registered op's (plain int64 tensors, unchecked contents). ``scores`` has any
    non-negative row stride and unit item stride (what the host glue passes); only the stretch of
    storage its rows span goes to the kernel. The output is laid out as the host glue lays it out
    (csrc/target_rank.h), with the same row sizes (``positive_counts``).
    """
    from refit_kernels import reference
    from refit_kernels.sparse import positive_counts

    B, I = scores.shape
    assert B == 0 or I <= 1 or scores.stride(1) == 1, "the host glue passes unit item strides"
    flat, strides = storage_span(scores)
    nnz = positives_indices.shape[0]
    lengths = positive_counts(positives_indptr, nnz, users, B)
    starts = None if users is None else torch.cumsum(lengths, 0) - lengths
    n_ranks = nnz if users is None else int(lengths.sum())
    ex_rows = -1 if exclude_indptr is None else exclude_indptr.shape[0] - 1
    header = [DTYPE_CODE[scores.dtype], B, I, strides[0] if B else I, flat.numel(), int(users is not None),
              ex_rows, 0 if exclude_indices is None else exclude_indices.shape[0], positives_indptr.shape[0] - 1,
              nnz, int(starts is not None), n_ranks]
    parts = [np.asarray(header, dtype=np.int64).tobytes(), _raw(flat)]
    parts += [_raw(t.to(torch.int64)) for t in (users, exclude_indptr, exclude_indices, positives_indptr,
                                                 positives_indices, starts) if t is not None]
    r = _Reader(_run(exe, b"".join(parts)))
    status = int(r.take(torch.int64, 1)[0])
    ranks = r.take(torch.int64, n_ranks)
    report = r.take(torch.int64, B * 4).view(B, 4)
    r.done()
    assert status == 0, f"launch status {status}"
    n_rows = {"exclude": None if exclude_indptr is None else ex_rows, "positives": positives_indptr.shape[0] - 1}
    error = reference.topk_row_error(report, I, n_rows, op="target_rank")
    if error is not None:
        raise error
    return ranks


# --- conversions -----------------------------------------------------------------------------

def convert(exe: Path, x: torch.Tensor):
    """The host stand-ins of __float2half_rn / __float2bfloat16_rn and back on float32 ``x`` (n,):
    ``(half_bits, bf16_bits, half_as_float, bf16_as_float)``, int16 bits and float32 values."""
    x = x.to(torch.float32).contiguous()
    n = x.numel()
    r = _Reader(_run(exe, np.asarray([n], dtype=np.int64).tobytes() + _raw(x)))
    out = (r.take(torch.int16, n), r.take(torch.int16, n), r.take(torch.float32, n), r.take(torch.float32, n))
    r.done()
    return out
