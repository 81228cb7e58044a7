"""topk_hits: batched top-K hit counting, N_K and N_sim-K (DESIGN.md, Op 2).

This module is the op's whole Python side: argument conversion and checks
shared by every backend (and, for the arguments they share, by target_rank),
the fake (meta) implementations of the compiled op
``refit::topk_hits`` and of the Triton op ``refit::topk_hits_triton``, and the
public function that dispatches. The op is not differentiable: scores are
detached.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import _extension, dispatch, reference
from .._checks import dense_tensor, has_data
from ..sparse import CSR, as_csr

_OP = "topk_hits"
_SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)
#: The largest Kmax the cuda and triton kernels rank (they keep the top list on chip).
GPU_MAX_K = 1024


class TopKHits(NamedTuple):
    """Outputs of :func:`topk_hits`; ``n_k = len(ks)``, ``Kmax = ks[-1]``.

    Attributes:
        hits: (B, n_k) int64, |top-k ∩ positives| for each k (N_K); zeros
            without ``positives``.
        dcg: (B, n_k) float32, the sum of 1 / log2(r + 2) over the ranks r < k
            holding a positive; zeros without ``positives``.
        neighbor_hits: (B, n_k) float32, the mean over valid neighbors v of
            |top-k ∩ neighbor_sets[v]| (N_sim-K); 0 for a row without valid
            neighbors, and zeros without ``neighbors``.
        first_hit: (B,) int64, the 0-based rank of the first positive within
            Kmax, or -1 (always -1 without ``positives``).
        indices: (B, Kmax) int64 ranked item ids, -1 where a row has fewer
            than Kmax rankable items; None unless ``return_indices``.
    """

    hits: torch.Tensor
    dcg: torch.Tensor
    neighbor_hits: torch.Tensor
    first_hit: torch.Tensor
    indices: Optional[torch.Tensor]


# --- argument checks ------------------------------------------------------------

def check_ks(ks, n_items: int, op: str = _OP) -> Tuple[int, ...]:
    """ks as a tuple of ints: non-empty, strictly ascending, each 1 <= k <= n_items."""
    if isinstance(ks, torch.Tensor):
        dense_tensor(ks, "ks", op)
        has_data(ks, "ks", op)
        if ks.dtype not in _INDEX_DTYPES or ks.dim() > 1:
            raise TypeError(f"{op}: ks must be an int or a sequence of ints, got a {ks.dtype} tensor "
                            f"of shape {tuple(ks.shape)}")
        ks = ks.reshape(-1).tolist()
    elif isinstance(ks, (int, np.integer)) and not isinstance(ks, bool):
        ks = [ks]
    try:
        values = list(ks)
    except TypeError:
        raise TypeError(f"{op}: ks must be an int or a sequence of ints, got {type(ks).__name__}") from None
    for k in values:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"{op}: ks must hold ints, got {k!r} ({type(k).__name__})")
    values = [int(k) for k in values]
    if not values:
        raise ValueError(f"{op}: ks must hold at least one k")
    if any(not 1 <= k <= n_items for k in values):
        raise ValueError(f"{op}: every k in ks must satisfy 1 <= k <= I = {n_items}, got ks = {values}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{op}: ks must be strictly ascending, got {values}")
    return tuple(values)


def check_scores(scores, op: str = _OP) -> None:
    """scores: a float16/bfloat16/float32/float64 (B, I) tensor with I < 2^31; TypeError/ValueError naming it."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{op}: scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dtype not in _SCORE_DTYPES:
        raise TypeError(f"{op}: scores must be float16, bfloat16, float32 or float64, got {scores.dtype}")
    if scores.dim() != 2:
        raise ValueError(f"{op}: scores must be 2-D (B, I), got shape {tuple(scores.shape)}")
    if scores.shape[1] >= 2**31:
        raise ValueError(f"{op}: at most 2^31 - 1 items, got I = {scores.shape[1]}")


def check_plain_users(users: Optional[torch.Tensor], B: int, device: torch.device, op: str) -> None:
    """users of a registered op: None, or (B,) int64 on ``device``."""
    if users is None:
        return
    if users.dtype != torch.int64:
        raise TypeError(f"{op}: users must be int64, got {users.dtype}")
    if users.dim() != 1 or users.shape[0] != B:
        raise ValueError(f"{op}: users must have shape (B,) = ({B},), got {tuple(users.shape)}")
    if users.device != device:
        raise ValueError(f"{op}: users is on {users.device} but scores is on {device}")


def check_plain_csr(name: str, indptr: Optional[torch.Tensor], indices: Optional[torch.Tensor],
                    device: torch.device, op: str, rows: Optional[int] = None) -> None:
    """A CSR argument of a registered op: both parts or neither, 1-D int64 on ``device``, and ``rows``
    rows when given (a CSR indexed by scores row, without users)."""
    if (indptr is None) != (indices is None):
        raise ValueError(f"{op}: {name}_indptr and {name}_indices must be given together")
    if indptr is None:
        return
    for part, t in (("indptr", indptr), ("indices", indices)):
        if t.dtype != torch.int64:
            raise TypeError(f"{op}: {name} {part} must be int64, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} {part} must be 1-D, got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but scores is on {device}")
    if indptr.shape[0] < 1:
        raise ValueError(f"{op}: {name} indptr must have n_rows + 1 >= 1 entries, got none")
    if rows is not None and indptr.shape[0] - 1 != rows:
        raise ValueError(f"{op}: {name} has {indptr.shape[0] - 1} rows but scores has B = {rows} "
                         "(pass users= to pick rows of a larger matrix)")


def check_plain_args(scores, ks, users, exclude_indptr, exclude_indices, positives_indptr,
                     positives_indices, neighbors, neighbor_sets_indptr, neighbor_sets_indices,
                     op: str = _OP) -> None:
    """The checks of the registered ops' arguments (plain tensors), as the C++ ops make them."""
    check_scores(scores, op)
    B, I = scores.shape
    check_ks(list(ks), I, op)
    dev = scores.device
    check_plain_users(users, B, dev, op)
    per_batch = B if users is None else None
    check_plain_csr("exclude", exclude_indptr, exclude_indices, dev, op, rows=per_batch)
    check_plain_csr("positives", positives_indptr, positives_indices, dev, op, rows=per_batch)
    check_plain_csr("neighbor_sets", neighbor_sets_indptr, neighbor_sets_indices, dev, op)
    if (neighbors is None) != (neighbor_sets_indptr is None):
        raise ValueError(f"{op}: neighbors and neighbor_sets must be given together")
    if neighbors is not None:
        if neighbors.dtype != torch.int64:
            raise TypeError(f"{op}: neighbors must be int64, got {neighbors.dtype}")
        if neighbors.dim() != 2 or neighbors.shape[0] != B:
            raise ValueError(f"{op}: neighbors must have shape (B, M) with B = {B}, got {tuple(neighbors.shape)}")
        if neighbors.device != dev:
            raise ValueError(f"{op}: neighbors is on {neighbors.device} but scores is on {dev}")


def index_tensor(x, name: str, dim: int, device: torch.device, op: str = _OP) -> torch.Tensor:
    """users / neighbors as int64 on ``device``: tensors must already be there, arrays are moved."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"{op}: {name} must hold integers, got {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    dense_tensor(x, name, op)
    if x.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be int32 or int64, got {x.dtype}")
    if x.dim() != dim:
        shape = "(B,)" if dim == 1 else "(B, M)"
        raise ValueError(f"{op}: {name} must be {dim}-D {shape}, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{op}: {name} is on {x.device} but scores is on {device}")
    return x.to(torch.int64)


def _holds_torch(x) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    return isinstance(x, (tuple, list)) and len(x) > 0 and isinstance(x[0], torch.Tensor)


def csr_arg(x, name: str, n_items: int, device: torch.device, op: str = _OP):
    """A CSR argument as (indptr, indices) int64 on ``device``, or (None, None).

    Torch inputs must already be on the scores' device; scipy matrices and
    numpy arrays, which live on the host, are moved there.
    """
    if x is None:
        return None, None
    if _holds_torch(x):
        first = x if isinstance(x, torch.Tensor) else x[0]
        if first.device != device:
            raise ValueError(f"{op}: {name} is on {first.device} but scores is on {device}")
    if isinstance(x, CSR):
        # Already converted and checked by as_csr: reused as is, e.g. across batches.
        if x.n_cols is not None and x.n_cols != n_items:
            raise ValueError(f"{name}: expected {n_items} columns, got a matrix with {x.n_cols}")
        if x.device != device:
            raise ValueError(f"{op}: {name} is on {x.device} but scores is on {device}")
        return x.indptr, x.indices
    if torch.compiler.is_compiling() and isinstance(x, (tuple, list)) and len(x) in (2, 3) \
            and all(isinstance(t, torch.Tensor) for t in x[:2]):
        # as_csr's structural checks read tensor values, which would break the
        # graph; the kernels check the indptr range and columns of every row they read.
        indptr, indices = x[0], x[1]
        for part, t in (("indptr", indptr), ("indices", indices)):
            dense_tensor(t, part, name)
            if t.dtype not in _INDEX_DTYPES or t.dim() != 1:
                raise TypeError(f"{name}: {part} must be a 1-D int32 or int64 tensor")
        csr_indptr, csr_indices = indptr.to(torch.int64), indices.to(torch.int64)
    else:
        csr = as_csr(x, name, n_cols=n_items)
        csr_indptr, csr_indices = csr.indptr, csr.indices
    if csr_indptr.device != device:
        if _holds_torch(x):
            raise ValueError(f"{op}: {name} is on {csr_indptr.device} but scores is on {device}")
        csr_indptr, csr_indices = csr_indptr.to(device), csr_indices.to(device)
    return csr_indptr, csr_indices


# --- fake implementations and the Triton op ----------------------------------------

def _fake(scores, ks, users, exclude_indptr, exclude_indices, positives_indptr, positives_indices,
          neighbors, neighbor_sets_indptr, neighbor_sets_indices, return_indices):
    check_plain_args(scores, ks, users, exclude_indptr, exclude_indices, positives_indptr,
                     positives_indices, neighbors, neighbor_sets_indptr, neighbor_sets_indices)
    B, n_k = scores.shape[0], len(ks)
    new = lambda shape, dtype: scores.new_empty(shape, dtype=dtype)  # noqa: E731
    return (new((B, n_k), torch.int64), new((B, n_k), torch.float32), new((B, n_k), torch.float32),
            new((B,), torch.int64), new((B, ks[-1] if return_indices else 0), torch.int64))


if _extension.MODULE is not None:
    torch.library.register_fake("refit::topk_hits")(_fake)


@torch.library.custom_op("refit::topk_hits_triton", mutates_args=())
def _topk_hits_triton(scores: torch.Tensor, ks: List[int], users: Optional[torch.Tensor],
                      exclude_indptr: Optional[torch.Tensor], exclude_indices: Optional[torch.Tensor],
                      positives_indptr: Optional[torch.Tensor], positives_indices: Optional[torch.Tensor],
                      neighbors: Optional[torch.Tensor], neighbor_sets_indptr: Optional[torch.Tensor],
                      neighbor_sets_indices: Optional[torch.Tensor],
                      return_indices: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor, torch.Tensor]:
    check_plain_args(scores, ks, users, exclude_indptr, exclude_indices, positives_indptr,
                     positives_indices, neighbors, neighbor_sets_indptr, neighbor_sets_indices)
    if scores.dtype == torch.float64:
        raise TypeError(f"{_OP} (triton): scores must be float16, bfloat16 or float32, got float64")
    if ks[-1] > GPU_MAX_K:
        raise ValueError(f"{_OP} (triton): Kmax must be at most {GPU_MAX_K}, got {ks[-1]}")
    from ..triton import topk_hits as kernels

    return kernels.topk_hits(scores, list(ks), users, exclude_indptr, exclude_indices, positives_indptr,
                             positives_indices, neighbors, neighbor_sets_indptr, neighbor_sets_indices,
                             return_indices)


_topk_hits_triton.register_fake(_fake)


def _reference(*args):
    hits, dcg, nbr, first, indices = reference.topk_hits(*args)
    return hits, dcg.to(torch.float32), nbr.to(torch.float32), first, indices


def _compiled(*args):
    return torch.ops.refit.topk_hits(*args)


_IMPLS = {
    "reference": _reference,
    "cpu": _compiled,
    "cuda": _compiled,
    "triton": _topk_hits_triton,
}


def _objection(scores: torch.Tensor, kmax: int):
    def objection(backend: str) -> Optional[str]:
        if backend in ("cuda", "triton"):
            if scores.dtype == torch.float64:
                return (f"the {backend} kernel ranks float16, bfloat16 and float32 scores; float64 "
                        "runs on the cpu and reference backends")
            if kmax > GPU_MAX_K:
                return f"the {backend} kernel ranks at most Kmax = {GPU_MAX_K} items per row, got {kmax}"
        return None

    return objection


def topk_hits(
    scores: torch.Tensor,
    ks,
    *,
    users=None,
    exclude=None,
    positives=None,
    neighbors=None,
    neighbor_sets=None,
    return_indices: bool = False,
    backend: Optional[str] = None,
) -> TopKHits:
    """Ranks every row of ``scores`` once and counts top-k hits for every k in ``ks``.

    Ranking rule: higher score first; equal scores, lower item id first; items
    in the row's ``exclude`` set are never ranked; ``-inf`` is a valid score;
    NaN is an error. The top-Kmax list (Kmax = ``ks[-1]``) is selected once
    and serves every k, the positives and every neighbor; nothing of size
    B x I is written.

    Args:
        scores: (B, I) float16, bfloat16 or float32 (float64 on the cpu and
            reference backends). Any strides. Not differentiated (detached).
        ks: an int or ascending ints, 1 <= k <= I, e.g. ``(10, 20, 50, 100)``.
        users: (B,) int32/int64, the CSR row of each scores row in
            ``exclude`` and ``positives`` (so a batch indexes global matrices
            without copying them). Default: row b of each is scores row b.
        exclude: CSR (n_rows x I) of items never ranked, e.g. the history.
        positives: CSR (n_rows x I) of target items: gives ``hits``, ``dcg``
            and ``first_hit``.
        neighbors: (B, M) int32/int64 rows of ``neighbor_sets`` (user ids, not
            picked through ``users``); -1 marks padding.
        neighbor_sets: CSR (n_users x I), the item set of every user a
            neighbor id may name: gives ``neighbor_hits``.
        return_indices: also return the (B, Kmax) ranked item ids.
        backend: force ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``;
            None lets the dispatcher choose (``REFIT_BACKEND`` overrides).

    CSR arguments take a ``torch.sparse_csr_tensor``, a ``scipy.sparse`` CSR
    matrix, an ``(indptr, indices[, values])`` tuple (values are ignored) or a
    :class:`refit_kernels.CSR` from ``rk.as_csr`` (reused without new checks);
    the column indices of every row used must be sorted and unique. Torch
    inputs must be on the scores' device; scipy and numpy inputs are moved.

    Validation, identical on every backend: the structure of each CSR
    argument's ``indptr`` (starts at 0, non-decreasing, ends at nnz) is
    checked for the whole matrix before anything runs; the column ids of the
    rows that are read (row ``users[b]`` of ``exclude`` and ``positives``,
    the rows of ``neighbor_sets`` named by a non-padding neighbor) must be in
    [0, I), sorted and unique. Rows that are not read are not looked at, so
    a bad row there is no error.

    Returns:
        :class:`TopKHits` (hits, dcg, neighbor_hits, first_hit, indices);
        fields whose inputs were not given keep their shapes, filled with
        zeros (``first_hit`` with -1).

    Raises:
        TypeError / ValueError naming the argument for wrong types, shapes,
        devices, layouts (sparse scores, meta tensors), ``ks`` or a broken
        ``indptr``; ValueError naming the row for NaN scores or an unsorted
        CSR row; IndexError for users, neighbor ids or column indices out of
        range; refit_kernels.BackendUnavailable when a forced
        backend cannot run (the cuda and triton kernels take Kmax <= 1024 and
        no float64).
    """
    if isinstance(scores, torch.Tensor):
        dense_tensor(scores, "scores", _OP)
        has_data(scores, "scores", _OP)
    check_scores(scores)
    B, I = scores.shape
    ks = check_ks(ks, I)
    if not isinstance(return_indices, bool):
        raise TypeError(f"{_OP}: return_indices must be a bool, got {type(return_indices).__name__}")
    dev = scores.device
    users_t = None if users is None else index_tensor(users, "users", 1, dev)
    check_plain_users(users_t, B, dev, _OP)
    ex_p, ex_i = csr_arg(exclude, "exclude", I, dev)
    po_p, po_i = csr_arg(positives, "positives", I, dev)
    if (neighbors is None) != (neighbor_sets is None):
        raise ValueError(f"{_OP}: neighbors and neighbor_sets must be given together")
    nb = None if neighbors is None else index_tensor(neighbors, "neighbors", 2, dev)
    ns_p, ns_i = csr_arg(neighbor_sets, "neighbor_sets", I, dev)
    args = (scores.detach(), list(ks), users_t, ex_p, ex_i, po_p, po_i, nb, ns_p, ns_i, return_indices)
    check_plain_args(*args[:-1])
    name = dispatch.select(_OP, dev, backend, objection=_objection(scores, ks[-1]))
    hits, dcg, nbr, first, indices = _IMPLS[name](*args)
    return TopKHits(hits, dcg, nbr, first, indices if return_indices else None)
