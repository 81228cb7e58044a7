"""target_rank: the rank of each positive under topk_hits' ranking rule, in one pass (DESIGN.md, Op 4).

This module is the op's whole Python side: argument conversion and checks
shared by every backend (topk_hits' checks, which it shares), the fake
(meta) implementations of the compiled op ``refit::target_rank`` and of the
Triton op ``refit::target_rank_triton``, and the public function that
dispatches. The op is not differentiable: scores are detached.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _extension, dispatch, reference
from .._checks import dense_tensor, has_data
from .topk_hits import check_plain_csr, check_plain_users, check_scores, csr_arg, index_tensor

_OP = "target_rank"


def check_plain_args(scores, users, exclude_indptr, exclude_indices, positives_indptr, positives_indices) -> None:
    """The checks of the registered ops' arguments (plain tensors), as the C++ ops make them."""
    check_scores(scores, _OP)
    B = scores.shape[0]
    dev = scores.device
    check_plain_users(users, B, dev, _OP)
    per_batch = B if users is None else None
    check_plain_csr("exclude", exclude_indptr, exclude_indices, dev, _OP, rows=per_batch)
    if positives_indptr is None or positives_indices is None:
        raise ValueError(f"{_OP}: positives_indptr and positives_indices are required")
    check_plain_csr("positives", positives_indptr, positives_indices, dev, _OP, rows=per_batch)


# --- fake implementations and the Triton op ----------------------------------------

def _fake(scores, users, exclude_indptr, exclude_indices, positives_indptr, positives_indices):
    check_plain_args(scores, users, exclude_indptr, exclude_indices, positives_indptr, positives_indices)
    if users is None:
        n = positives_indices.shape[0]
    else:  # the rows users picks: how many positives they hold is known only from the values
        n = torch.library.get_ctx().new_dynamic_size()
    return scores.new_empty((n,), dtype=torch.int64)


if _extension.MODULE is not None:
    torch.library.register_fake("refit::target_rank")(_fake)


@torch.library.custom_op("refit::target_rank_triton", mutates_args=())
def _target_rank_triton(scores: torch.Tensor, users: Optional[torch.Tensor],
                        exclude_indptr: Optional[torch.Tensor], exclude_indices: Optional[torch.Tensor],
                        positives_indptr: torch.Tensor, positives_indices: torch.Tensor) -> torch.Tensor:
    check_plain_args(scores, users, exclude_indptr, exclude_indices, positives_indptr, positives_indices)
    from ..triton import target_rank as kernels

    return kernels.target_rank(scores, users, exclude_indptr, exclude_indices, positives_indptr, positives_indices)


_target_rank_triton.register_fake(_fake)


def _compiled(*args):
    return torch.ops.refit.target_rank(*args)


_IMPLS = {
    "reference": reference.target_rank,
    "cpu": _compiled,
    "cuda": _compiled,
    "triton": _target_rank_triton,
}


def target_rank(
    scores: torch.Tensor,
    positives,
    *,
    exclude=None,
    users=None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The 0-based rank of every positive among its row's rankable items, in one pass over the row.

    The ranking rule is ``topk_hits``': higher score first; equal scores,
    lower item id first; items in the row's ``exclude`` set are never ranked;
    ``-inf`` is a valid score; NaN is an error. For a positive p of scores
    row b::

        rank = #{items i != p of row b, not excluded :
                 s[b, i] > s[b, p]  or  (s[b, i] == s[b, p] and i < p)}

    so ``rank < k`` holds exactly when ``topk_hits`` counts p as a hit at k,
    for every k at once (e.g. ``rank < 20``, or ``1 / (rank + 1)`` for the
    reciprocal rank and ``1 / log2(rank + 2)`` for the DCG of a single
    target). A positive that is itself excluded is never ranked (topk_hits
    never counts it): its rank is -1. Each row is streamed once: no
    selection, no sort, nothing of size B x I written.

    Args:
        scores: (B, I) float16, bfloat16, float32 or float64. Any strides.
            Not differentiated (detached).
        positives: CSR (n_rows x I) of target items; an empty row is fine.
        exclude: CSR (n_rows x I) of items never ranked, e.g. the history.
        users: (B,) int32/int64, the CSR row of each scores row in
            ``exclude`` and ``positives`` (so a batch indexes global matrices
            without copying them). Default: row b of each is scores row b.
        backend: force ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``;
            None lets the dispatcher choose (``REFIT_BACKEND`` overrides).

    CSR arguments take the forms ``topk_hits`` takes (a
    ``torch.sparse_csr_tensor``, a ``scipy.sparse`` CSR matrix, an
    ``(indptr, indices[, values])`` tuple, values ignored, or a
    :class:`refit_kernels.CSR`), with the same validation: the whole
    ``indptr`` of each, and the column ids (in [0, I), sorted and unique) of
    the rows that are read.

    Returns:
        (n,) int64 ranks in the positives' CSR order. Without ``users``,
        n = nnz of ``positives`` and ``ranks[j]`` belongs to
        ``positives.indices[j]`` (row b's at ``indptr[b] .. indptr[b+1]``).
        With ``users``, the ranks of the positives of rows users[0],
        users[1], ... one after the other (a repeated row repeats its ranks);
        ``torch.compile`` then needs
        ``torch._dynamo.config.capture_dynamic_output_shape_ops = True``,
        since n depends on the values of ``users``.

    Raises:
        Exactly what ``topk_hits`` raises for these arguments, with this op's
        name: TypeError / ValueError naming the argument for wrong types,
        shapes, devices, layouts or a broken ``indptr``; ValueError naming
        the row for NaN scores or an unsorted CSR row; IndexError for users
        or column indices out of range; refit_kernels.BackendUnavailable when
        a forced backend cannot run.
    """
    if isinstance(scores, torch.Tensor):
        dense_tensor(scores, "scores", _OP)
        has_data(scores, "scores", _OP)
    check_scores(scores, _OP)
    B, I = scores.shape
    dev = scores.device
    users_t = None if users is None else index_tensor(users, "users", 1, dev, _OP)
    check_plain_users(users_t, B, dev, _OP)
    ex_p, ex_i = csr_arg(exclude, "exclude", I, dev, _OP)
    if positives is None:
        raise TypeError(f"{_OP}: positives must be a CSR matrix (torch.sparse_csr_tensor, scipy.sparse CSR "
                        "or an (indptr, indices[, values]) tuple), got None")
    po_p, po_i = csr_arg(positives, "positives", I, dev, _OP)
    args = (scores.detach(), users_t, ex_p, ex_i, po_p, po_i)
    check_plain_args(*args)
    name = dispatch.select(_OP, dev, backend)
    return _IMPLS[name](*args)
