"""Scale-out on ``torch.distributed``: process-group setup, collectives and sharding.

``torchrun --nproc_per_node N -m refit ...`` starts N copies of the command
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in their environment. :func:`init` turns those into a process
group (``nccl`` when the process has a CUDA device, ``gloo`` otherwise); every
other helper here is a no-op (or the identity) in a single process, so the
training and evaluation code calls them unconditionally and behaves exactly
as before when it is not launched under ``torchrun``.

Conventions shared by the callers:

* Work is split into contiguous shards (:func:`shard_range`): rank r takes the
  r-th block of a globally ordered sequence, so concatenating the ranks'
  pieces in rank order restores the global order.
* Random draws that must not depend on the number of processes (the users of
  a batch, the diffusion noise) are made for the whole global batch on every
  rank from the same seeded generator, and each rank keeps its slice. The
  generators then stay identical across ranks, and a checkpoint's RNG state
  (saved by rank 0) is valid for any world size.
* Only rank 0 writes files (:func:`is_main`).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RUN_ID", "GROUP_RANK")


@dataclass(frozen=True)
class WorldInfo:
    """Where this process stands: rank, world size, local rank, backend and device.

    ``initialized`` is False in a single process (rank 0 of 1, no backend).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    device: str = "cpu"
    initialized: bool = False

    @property
    def distributed(self) -> bool:
        return self.initialized and self.world_size > 1


def launched() -> bool:
    """Whether the environment describes a multi-process launch (``torchrun`` or the like)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def default_backend() -> str:
    """``nccl`` when CUDA (and NCCL) is usable in this process, else ``gloo``."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init(backend: Optional[str] = None) -> WorldInfo:
    """Joins the process group described by the environment (idempotent).

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by ``torchrun``);
    without ``WORLD_SIZE > 1`` it does nothing and returns the single-process
    :class:`WorldInfo`. ``backend`` defaults to :func:`default_backend`; with
    ``nccl`` the process's CUDA device becomes ``cuda:LOCAL_RANK``.

    Raises:
        RuntimeError: torch was built without distributed support.
        ValueError: the environment variables are malformed or inconsistent.
    """
    if dist.is_available() and dist.is_initialized():
        return world()
    if not launched():
        return world()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    rank, size = _env_int("RANK", -1), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < size:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={size}), got RANK={os.environ.get('RANK')!r}: "
                         "launch with torchrun, which sets both")
    backend = backend or default_backend()
    if backend not in ("gloo", "nccl", "mpi"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or 'mpi', got {backend!r}")
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                             "visible: start at most that many processes per node")
        torch.cuda.set_device(local_rank)
    # torch imports torch._dynamo lazily (the first optimiser does); imported after the group
    # exists, it keeps a reference to it that destroy_process_group() cannot drop, and the group's
    # threads then outlive shutdown(). Imported before, it holds none.
    import torch._dynamo  # noqa: F401

    dist.init_process_group(backend=backend)
    # A script that forgets shutdown() still leaves the group (and joins its threads) while the
    # interpreter is fully alive, not during its teardown.
    atexit.register(shutdown)
    return world()


def warn_if_not_joined(what: str) -> None:
    """Logs a warning when launched by torchrun but no process group was joined: every
    process would then run the whole job on its own (and write the same files)."""
    if launched() and not is_distributed():
        import logging

        logging.getLogger(__name__).warning(
            "%s: WORLD_SIZE=%s but no process group was joined, so this process runs the whole job alone; "
            "call refit.runtime.distributed.init() first (the refit command line does)", what,
            os.environ.get("WORLD_SIZE"))


def shutdown() -> None:
    """Leaves the process group (if one was joined); safe to call more than once.

    With gloo this joins the group's worker threads, so none of them is left
    to run while the interpreter shuts down (see :func:`average_gradients`).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> WorldInfo:
    """This process's :class:`WorldInfo`."""
    if not (dist.is_available() and dist.is_initialized()):
        return WorldInfo()
    backend = dist.get_backend()
    local_rank = _env_int("LOCAL_RANK", 0)
    device = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
    return WorldInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                     backend=str(backend), device=device, initialized=True)


def is_distributed() -> bool:
    """A process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective buffers must live: the CUDA device for nccl, the CPU otherwise."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (a new tensor on ``tensor``'s device).

    Same shape and dtype on every rank. In a single process: a copy.
    """
    if not is_distributed():
        return tensor.clone()
    buf = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum over all ranks (a new tensor)."""
    if not is_distributed():
        return tensor.clone()
    buf = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.to(tensor.device)


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank: keeps data-dependent stops collective."""
    return bool(all_reduce_max(torch.tensor([int(bool(flag))], dtype=torch.int64))[0])


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenation along dim 0 of every rank's ``tensor``, in rank order.

    The tensors may differ in their first dimension (not in the others, nor
    in dtype). In a single process: the tensor itself.
    """
    if not is_distributed():
        return tensor
    dev = _comm_device()
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros((longest,) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=dev)
    padded[: tensor.shape[0]] = tensor.detach().to(dev)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(tensor.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as it is on rank ``src`` (picklable objects; small ones: decisions, not data)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def shard_range(n: int, rank_: Optional[int] = None, world_size_: Optional[int] = None) -> Tuple[int, int]:
    """``(start, stop)`` of rank's contiguous share of ``n`` ordered items.

    The first ``n % world_size`` ranks get one item more; shares are in rank
    order, so they concatenate back to ``range(n)``. Defaults: this process.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world_size_ is None else world_size_
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank {r}, world_size {w}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(seq: Sequence, rank_: Optional[int] = None, world_size_: Optional[int] = None):
    """This rank's contiguous share of a sequence (tensor, array, list) along its first dimension."""
    start, stop = shard_range(len(seq), rank_, world_size_)
    return seq[start:stop]


#: Gradients are all-reduced in buckets of at most this many bytes (bounds the extra memory).
GRAD_BUCKET_BYTES = 64 * 1024 * 1024


def average_gradients(parameters: Iterable[torch.nn.Parameter], bucket_bytes: int = GRAD_BUCKET_BYTES) -> None:
    """Replaces every parameter's ``.grad`` by its mean over all ranks; a no-op in one process.

    Call it after ``loss.backward()`` and before clipping and the optimiser
    step, on every rank with the same parameters in the same order. The
    gradients are flattened into buckets (per dtype and device, at most
    ``bucket_bytes`` each), summed with one all-reduce per bucket and divided
    by the world size. A parameter whose gradient is ``None`` on every rank
    stays ``None`` (as in one process, the optimiser then skips it); one that
    has a gradient on some ranks only gets the mean with zeros for the others.

    Why not DistributedDataParallel: DDP launches its all-reduces from
    autograd hooks inside ``backward()``, where torch keeps a Python object in
    the thread-local state that each gloo work item copies. The gloo worker
    thread that drops the last reference to such a work item must take the
    GIL; when that happens while the interpreter shuts down the thread is
    killed inside a destructor and the process aborts ("terminate called
    without an active exception"), about one run in ten here. DDP also keeps
    the process group alive after ``destroy_process_group``, so its threads
    are never joined. All-reducing after ``backward()`` returns, from the
    calling thread, avoids both: :func:`shutdown` then joins the gloo threads
    before the interpreter exits. It also allows any number of forward passes
    per backward (DDP synchronises one).
    """
    if not is_distributed():
        return
    params = [p for p in parameters if p.requires_grad]
    world = dist.get_world_size()
    dev = _comm_device()
    groups: Dict[Tuple[torch.dtype, torch.device], List[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    for (dtype, _), group in groups.items():
        # Buckets of consecutive parameters; the last slot of each bucket counts, per parameter, the
        # ranks that hold a gradient, so "None everywhere" can be told from "zero somewhere".
        bucket: List[torch.nn.Parameter] = []
        size = 0
        limit = max(1, bucket_bytes // torch.empty((), dtype=dtype).element_size())
        for p in group + [None]:
            if p is not None and (not bucket or size + p.numel() <= limit):
                bucket.append(p)
                size += p.numel()
                continue
            if bucket:
                _all_reduce_bucket(bucket, dtype, dev, world)
            bucket, size = ([p], p.numel()) if p is not None else ([], 0)


def _all_reduce_bucket(bucket: List[torch.nn.Parameter], dtype: torch.dtype, dev: torch.device, world: int) -> None:
    n = sum(p.numel() for p in bucket)
    flat = torch.zeros(n + len(bucket), dtype=dtype, device=dev)
    offset = 0
    for i, p in enumerate(bucket):
        if p.grad is not None:
            flat[offset:offset + p.numel()].copy_(p.grad.detach().reshape(-1))
            flat[n + i] = 1
        offset += p.numel()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for i, p in enumerate(bucket):
        part = flat[offset:offset + p.numel()]
        offset += p.numel()
        if float(flat[n + i]) == 0:
            continue  # no rank has a gradient for it
        mean = part.view_as(p).to(p.device).div_(world)
        if p.grad is None:
            p.grad = mean.clone()
        else:
            p.grad.copy_(mean)


def describe() -> List[str]:
    """Lines for ``refit info``: the distributed setup of this process."""
    lines = ["distributed:"]
    if not dist.is_available():
        return lines + ["  torch.distributed is not available in this torch build"]
    avail = [name for name, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available()),
                                   ("mpi", dist.is_mpi_available())) if ok]
    lines.append(f"  backends    {', '.join(avail) or 'none'} built; default here: {default_backend()}")
    info = world()
    if not info.initialized:
        env = {k: os.environ[k] for k in ENV_VARS if k in os.environ}
        lines.append("  launch      single process (not under torchrun)" if not env else
                     f"  launch      environment {env} (WORLD_SIZE <= 1: single process)")
        return lines
    lines += [
        f"  world       {info.world_size} processes, this is rank {info.rank} (local rank {info.local_rank}, "
        f"{os.environ.get('LOCAL_WORLD_SIZE', '?')} on this node)",
        f"  backend     {info.backend}, device {info.device}",
        f"  rendezvous  {os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        + (f" (run id {os.environ['TORCHELASTIC_RUN_ID']})" if "TORCHELASTIC_RUN_ID" in os.environ else ""),
    ]
    check = all_reduce_sum(torch.tensor([float(info.rank)]))
    want = info.world_size * (info.world_size - 1) / 2
    lines.append(f"  all_reduce  {'ok' if float(check[0]) == want else 'WRONG'} "
                 f"(sum of ranks {float(check[0]):g}, expected {want:g})")
    return lines


__all__ = ["WorldInfo", "launched", "default_backend", "init", "warn_if_not_joined", "shutdown", "world",
           "is_distributed", "rank", "world_size", "is_main", "barrier", "all_reduce_sum", "all_reduce_max",
           "any_rank", "all_gather_rows", "broadcast_object", "shard_range", "shard", "average_gradients", "describe"]
