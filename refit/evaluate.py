"""Full-ranking evaluation, of interaction rows and of next-item sequences: refit's one evaluation module.

**Interaction rows** (:func:`evaluate_many`, :func:`evaluate_recommender`, :func:`evaluate`), with
``refit_kernels.topk_hits``. Every user's scores over all items are ranked with the user's history
excluded, and Recall, NDCG, Precision and MRR at each k are computed from the
kernel's hit counts, DCG and first-hit ranks. The protocol is DiffRec's
``computeTopNAccuracy``:

* Precision@k = hits / k; Recall@k = hits / |positives|;
* NDCG@k = DCG / IDCG, with IDCG the sum of 1 / log2(r + 2) over the ranks
  r < min(|positives|, k);
* MRR@k = 1 / (first_hit + 1) when the first hit is within the top k, else 0;
* each is averaged over all evaluated users, a user without positives
  counting as 0 (``exclude_users_without_positives=True`` leaves such users
  out of the average instead, as RecBole does).

DiffRec rounds the averages to 4 decimals for display; this module returns
them unrounded.

**Sequences** (:func:`evaluate_sequences`, :func:`evaluate_like_dreamrec`), with
``refit_kernels.target_rank``: each next-item target's rank over every item gives HR@k, NDCG@k
and MRR@k, under refit's full protocol, DreamRec's or PreferDiff's (see
:func:`evaluate_sequences`).
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import refit_kernels as rk
from refit_kernels.sparse import CSR, as_csr

from .runtime import distributed as dist
from .data.sequences import (DEFAULT_KS as SEQUENCE_KS, DREAMREC_BATCH, DREAMREC_TOPK, PREFERDIFF_KS, PROTOCOLS,
                             SequenceData, Targets)
from .runtime.control import progress_enabled

if TYPE_CHECKING:  # annotations only
    from .data import InteractionData

DEFAULT_KS = (10, 20, 50, 100)
METRICS = ("recall", "ndcg", "precision", "mrr")

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def _is_csr_list(x) -> bool:
    """A list/tuple of CSR matrices, as opposed to one (indptr, indices[, values]) tuple."""
    if isinstance(x, CSR) or not isinstance(x, (list, tuple)) or len(x) == 0:
        return False
    first = x[0]
    if isinstance(first, np.ndarray) or (isinstance(first, torch.Tensor) and first.layout == torch.strided):
        return False  # the indptr of a CSR tuple
    return True


def _canonical(x):
    """scipy matrices with unsorted or duplicate column indices are put in canonical form
    (a copy); other forms pass unchanged (the kernel checks their rows)."""
    if type(x).__module__.startswith("scipy.sparse") and hasattr(x, "tocsr"):
        m = x.tocsr()
        if not m.has_canonical_format:
            m = m.copy()
            m.sum_duplicates()
        return m
    return x


def _as_csr(x, name: str, n_cols: Optional[int] = None) -> CSR:
    """as_csr on the CPU, also taking a :class:`refit_kernels.CSR` (already checked) as is."""
    if isinstance(x, CSR):
        if n_cols is not None and x.n_cols is not None and x.n_cols != n_cols:
            raise ValueError(f"{name}: expected {n_cols} columns, got a matrix with {x.n_cols}")
        return x.to("cpu")
    return as_csr(_canonical(x), name, n_cols=n_cols, device="cpu")


def union_csr(matrices: Sequence, n_cols: int, name: str = "exclude") -> CSR:
    """The row-wise union of CSR matrices with the same shape: sorted, unique column indices.

    Args:
        matrices: CSR matrices in any form :func:`refit_kernels.as_csr` accepts.
        n_cols: the number of columns (items).
    """
    parts = [_as_csr(m, f"{name}[{j}]", n_cols) for j, m in enumerate(matrices)]
    n_rows = parts[0].n_rows
    for j, p in enumerate(parts):
        if p.n_rows != n_rows:
            raise ValueError(f"{name}[{j}] has {p.n_rows} rows, {name}[0] has {n_rows}")
    rows = torch.cat([torch.repeat_interleave(torch.arange(n_rows), p.indptr.diff()) for p in parts])
    cols = torch.cat([p.indices for p in parts])
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= n_cols):
        raise IndexError(f"{name}: column indices must be in [0, {n_cols})")
    key = torch.unique(rows * n_cols + cols)  # sorted: by row, then column
    counts = torch.bincount(key // n_cols, minlength=n_rows)
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=indptr[1:])
    return CSR(indptr, key % n_cols, None, n_cols)


def idcg_table(kmax: int) -> torch.Tensor:
    """(kmax + 1,) float64: entry n is the IDCG of n relevant items, sum_{r<n} 1/log2(r+2)."""
    disc = 1.0 / torch.log2(torch.arange(kmax, dtype=torch.float64) + 2.0)
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(disc, 0)])


def _per_user(out: rk.TopKHits, n_pos: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """(4, b, n_k) float64: Recall, NDCG, Precision, MRR of each user at each k (0 without positives)."""
    return _per_user_metrics(out.hits.cpu(), out.dcg.cpu(), out.first_hit.cpu(), n_pos, ks)


def _per_user_metrics(hits: torch.Tensor, dcg: torch.Tensor, first: torch.Tensor, n_pos: torch.Tensor,
                      ks: Sequence[int]) -> torch.Tensor:
    """(4, b, n_k) float64 metrics from the kernel's (b, n_k) hits and DCG and (b,) first-hit ranks (CPU)."""
    n_pos = n_pos.cpu().to(torch.int64)
    hits = hits.to(torch.float64)
    dcg = dcg.to(torch.float64)
    ks_t = torch.tensor(ks, dtype=torch.int64)
    has = (n_pos > 0)[:, None]
    ideal = idcg_table(max(ks))[torch.minimum(n_pos[:, None], ks_t[None, :])]
    n = n_pos.clamp(min=1).to(torch.float64)[:, None]
    within = (first[:, None] >= 0) & (first[:, None] < ks_t[None, :])
    rr = (1.0 / (first.to(torch.float64) + 1.0))[:, None]
    per_user = torch.stack([hits / n, dcg / ideal.clamp(min=1.0), hits / ks_t.to(torch.float64),
                            torch.where(within, rr, 0.0).expand_as(hits)])
    return torch.where(has[None], per_user, 0.0)


def metrics_from_hits(out: rk.TopKHits, n_pos: torch.Tensor, ks: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Per-user Recall, NDCG, Precision and MRR at each k from :func:`refit_kernels.topk_hits` outputs.

    Args:
        out: the kernel's outputs for a batch of b users.
        n_pos: (b,) the number of positives of each user.
        ks: the ks the kernel was called with.

    Returns:
        {"recall@k": (b,) float64, ...}; users without positives get 0.
    """
    per_user = _per_user(out, n_pos, ks)
    return {f"{m}@{k}": per_user[i, :, j] for i, m in enumerate(METRICS) for j, k in enumerate(ks)}


def evaluate(
    score_fn: ScoreFn,
    positives,
    exclude=None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
    users: Optional[Union[torch.Tensor, np.ndarray, Iterable[int]]] = None,
    exclude_users_without_positives: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    backend: Optional[str] = None,
    progress: Optional[bool] = False,
    distributed: Optional[bool] = None,
) -> Dict[str, float]:
    """Full-ranking evaluation over all items, history masked (DiffRec's protocol).

    Args:
        score_fn: maps a (b,) int64 tensor of user ids to (b, I) scores
            (float32, float16 or bfloat16; any device). It is called once per
            batch, with ids in increasing order.
        positives: CSR (n_users x I) of each user's target items (e.g. the
            test split), in any form ``refit_kernels.as_csr`` accepts, or a
            ``refit_kernels.CSR`` it returned.
        exclude: None, one CSR, or a list of CSRs (n_users x I) of items never
            ranked, e.g. ``[train]`` for validation and ``[train, valid]`` for
            the test, as DiffRec masks them. A list is merged once.
        ks: the cut-offs, ascending.
        batch_size: users per call of ``score_fn``.
        users: the users to evaluate (rows of ``positives``); default all.
        exclude_users_without_positives: average over users with at least one
            positive only (DiffRec averages over all evaluated users, counting
            the others as 0).
        device: where the CSR arguments go (default: the device of the first
            scores).
        backend: forced ``topk_hits`` backend (default: the dispatcher's choice).
        progress: show a progress bar (on rank 0 only under torch.distributed): True always, None when
            stderr is a terminal, False never.
        distributed: shard the users across the ranks of the active process
            group and sum the metrics over ranks (default: whenever a group of
            more than one process is active). Every rank must then call this
            function with the same arguments, and every rank gets the same
            result, bit-identical to a single process's: ranks score whole
            batches of ``batch_size`` consecutive users and the per-batch sums
            are added in batch order. Communication: one all-reduce of
            ``n_targets x n_batches x (4 len(ks) + 1)`` float64.

    Returns:
        {"recall@k", "ndcg@k", "precision@k", "mrr@k" for every k: float}
        plus "n_users", the number of users averaged over.
    """
    return evaluate_many(score_fn, {"result": (positives, exclude)}, ks=ks, batch_size=batch_size, users=users,
                         exclude_users_without_positives=exclude_users_without_positives, device=device,
                         backend=backend, progress=progress, distributed=distributed)["result"]


def evaluate_many(
    score_fn: ScoreFn,
    targets: Dict[str, tuple],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
    users: Optional[Union[torch.Tensor, np.ndarray, Iterable[int]]] = None,
    exclude_users_without_positives: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    backend: Optional[str] = None,
    progress: Optional[bool] = False,
    desc: str = "evaluate",
    distributed: Optional[bool] = None,
) -> Dict[str, Dict[str, float]]:
    """:func:`evaluate` against several targets from one scoring of every user.

    ``targets`` maps a name to ``(positives, exclude)``, e.g.
    ``{"valid": (valid, [train]), "test": (test, [train, valid])}``: each batch
    of users is scored once and ranked once per target, so a model's
    expensive forward pass serves the validation and the test metrics alike.
    Every target's positives must have the same rows (users). Other arguments
    as in :func:`evaluate`; returns {name: metrics}.
    """
    if not targets:
        raise ValueError("targets must name at least one (positives, exclude) pair")
    ks = tuple(int(k) for k in ks)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = list(targets)
    pos = {name: _as_csr(targets[name][0], f"{name} positives") for name in names}
    n_users = pos[names[0]].n_rows
    for name in names:
        if pos[name].n_rows != n_users:
            raise ValueError(f"{name} positives has {pos[name].n_rows} rows, {names[0]} positives {n_users}")
    if users is None:
        user_ids = torch.arange(n_users)
    else:
        user_ids = torch.as_tensor(np.asarray(users) if not isinstance(users, torch.Tensor) else users)
        user_ids = user_ids.to(torch.int64).cpu().reshape(-1)
        if user_ids.numel() and (int(user_ids.min()) < 0 or int(user_ids.max()) >= n_users):
            raise IndexError(f"users must be in [0, {n_users}), the rows of positives")
    n_pos_all = {name: pos[name].indptr.diff() for name in names}
    n_eval = int(user_ids.numel())

    csr_cache = {}

    def csr_args(name: str, n_items: int, dev: torch.device):
        key = (name, dev)
        if key not in csr_cache:
            p = pos[name]
            if p.n_cols is not None and p.n_cols != n_items:
                raise ValueError(f"{name} positives has {p.n_cols} columns but score_fn returned {n_items} items")
            exclude = targets[name][1]
            if exclude is None:
                ex = None
            elif _is_csr_list(exclude):
                ex = union_csr(exclude, n_items)
            else:
                ex = _as_csr(exclude, "exclude", n_items)
            if ex is not None and ex.n_rows != n_users:
                raise ValueError(f"{name} exclude has {ex.n_rows} rows but positives has {n_users}")
            csr_cache[key] = (p.to(dev), None if ex is None else ex.to(dev))
        return csr_cache[key]

    # Users are scored in batches of consecutive ids; under torch.distributed each rank
    # takes a contiguous share of those batches, so every batch (and every user's
    # scores) is the same whatever the number of processes.
    starts = list(range(0, n_eval, batch_size))
    if distributed is None:
        distributed = dist.is_distributed()
    first = 0
    if distributed:
        first, stop = dist.shard_range(len(starts))
        mine = starts[first:stop]
    else:
        mine = starts
    n_k = len(ks)
    # Per batch: the sums of each metric over its users, and the number of users
    # averaged over. The totals are sums of these per-batch rows in batch order; each
    # row comes from exactly one rank (the others hold zeros), so the all-reduce adds
    # only exact zeros and the result is bit-identical to a single process.
    sums = torch.zeros(len(names), len(starts), len(METRICS) * n_k + 1, dtype=torch.float64)
    # The kernel's outputs of every batch go into arrays allocated once: kept as one
    # small tensor per batch, they pinned the freed score buffers between them in the
    # heap (7 GB resident at 300k users where the scores need 12 MB a batch).
    # This process's batches are consecutive: their users are one slice of user_ids.
    base = mine[0] if mine else 0
    my_users = user_ids[base:base + sum(min(batch_size, n_eval - start) for start in mine)]
    kept = {}  # name -> (hits, dcg, first_hit), a row per user of my_users, on the scores' device
    batches = mine
    if dist.is_main() and progress_enabled(progress):
        from tqdm.auto import tqdm

        batches = tqdm(mine, total=len(mine), desc=desc, unit="batch")
    for start in batches:
        batch = user_ids[start:start + batch_size]
        scores = score_fn(batch)
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] != batch.numel():
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"score_fn must return ({batch.numel()}, I) scores for {batch.numel()} users, "
                             f"got {shape}")
        dev = scores.device if device is None else torch.device(device)
        scores = scores.to(dev)
        batch_dev = batch.to(dev)
        for name in names:
            p_csr, ex_csr = csr_args(name, scores.shape[1], dev)
            out = rk.topk_hits(scores, ks, users=batch_dev, exclude=ex_csr, positives=p_csr, backend=backend)
            if name not in kept:
                kept[name] = tuple(torch.empty((my_users.numel(),) + t.shape[1:], dtype=t.dtype, device=dev)
                                   for t in (out.hits, out.dcg, out.first_hit))
            for dst, src in zip(kept[name], (out.hits, out.dcg, out.first_hit)):
                dst[start - base:start - base + batch.numel()].copy_(src)
        del scores, out
    # The metrics of every user come from one pass over all the batches' outputs
    # (a few dozen small tensor operations per batch were a fifth of a fast
    # evaluation); each batch's sums are then taken over that batch's users alone,
    # in the same order as a batch at a time.
    for a, name in enumerate(names):
        if name not in kept:
            continue
        hits, dcg, first_hit = (t.cpu() for t in kept.pop(name))
        n_pos = n_pos_all[name][my_users]
        per_user = _per_user_metrics(hits, dcg, first_hit, n_pos, ks)  # (4, n, n_k)
        for j, start in enumerate(mine, start=first):
            rows = slice(start - base, min(start + batch_size, n_eval) - base)
            n_pos_rows, rows = n_pos[rows], per_user[:, rows]
            if exclude_users_without_positives:
                rows = rows[:, n_pos_rows > 0]
            sums[a, j, :-1] = rows.contiguous().sum(1).reshape(-1)
            sums[a, j, -1] = rows.shape[1]
    if distributed:
        sums = dist.all_reduce_sum(sums)
    results = {}
    for a, name in enumerate(names):
        total = sums[a].sum(0)
        count = int(total[-1])
        totals = total[:-1].view(len(METRICS), n_k)
        means = (totals / count if count else totals).tolist()
        result = {f"{m}@{k}": means[i][j] for j, k in enumerate(ks) for i, m in enumerate(METRICS)}
        result["n_users"] = count
        results[name] = result
    return results


# --- DiffRec-style recommenders (refit.families.diffrec.recommender.RowRecommender) ------------------------------------------

def evaluation_targets(data: InteractionData, splits: Sequence[str] = ("valid", "test"),
                       min_target_rating: Optional[float] = None):
    """(positives, exclude) per split: validation masks train; test masks train + valid (DiffRec).

    min_target_rating: count only the held-out interactions rated at least this
    (data with ratings only, e.g. read with ``min_rating=None``). The split's other
    items are neither hits nor masked: ranking a held-out item the user rated low
    takes a slot like any miss. (:func:`evaluate_recommender` then leaves the
    users with no such item out of the split's means.)
    """
    targets = {}
    for split in splits:
        if split == "valid":
            positives, exclude = data.valid, [data.train]
        elif split == "test":
            positives, exclude = data.test, [data.train, data.valid]
        else:
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        if min_target_rating is not None:
            positives = _rated_at_least(data, split, min_target_rating)
        targets[split] = (positives, exclude)
    return targets


def _rated_at_least(data: InteractionData, split: str, min_rating: float):
    """The binary CSR of ``split``'s interactions rated >= min_rating (ValueError without ratings)."""
    if isinstance(min_rating, bool) or not isinstance(min_rating, numbers.Real) or not math.isfinite(min_rating):
        raise ValueError(f"min_target_rating must be a finite number, got {min_rating!r}")
    ratings = getattr(data, f"{split}_ratings", None)
    if ratings is None:
        raise ValueError(f"min_target_rating needs data with ratings ({data.name!r} carries none for its "
                         f"{split} split; read ratings.dat, u.data, a .inter with ratings or ml-100k)")
    liked = ratings.copy()
    liked.data = (liked.data >= min_rating).astype(np.float32)
    liked.eliminate_zeros()
    return liked


def evaluate_recommender(rec: Any, data: InteractionData, splits: Sequence[str] = ("valid", "test"), *,
                         ks: Sequence[int] = (10, 20, 50, 100), batch_size: int = 1024,
                         progress: bool = False, min_target_rating: Optional[float] = None
                         ) -> Dict[str, Dict[str, float]]:
    """Metrics of ``rec`` (anything with ``scores(users, rows)`` and ``device``, as
    :class:`refit.families.diffrec.recommender.RowRecommender`) on each split, from one reverse pass per batch of users.

    Every user is scored from their training row (densified per batch with
    ``gather_rows``); no users x items matrix is built. min_target_rating: see
    :func:`evaluation_targets`.
    """
    device = rec.device
    train = rk.as_csr(data.train, "train", index_dtype=None).to(device)  # rows are gathered where the model is

    def score_fn(users: torch.Tensor) -> torch.Tensor:
        users = users.to(device)
        rows = rk.gather_rows(train, users)
        return rec.scores(users, rows)

    # Users with no held-out item rated that high have nothing to recall: left out, not counted as 0.
    return evaluate_many(score_fn, evaluation_targets(data, splits, min_target_rating), ks=ks,
                         batch_size=batch_size, progress=progress, desc="evaluate",
                         exclude_users_without_positives=min_target_rating is not None)


# --- sequences: next-item targets (HR@k, NDCG@k, MRR@k) under the full, DreamRec and PreferDiff protocols -----------------------------------------------------------------------------------------------

def _check_ks(ks, limit: Optional[int] = None) -> Tuple[int, ...]:
    ks = tuple(int(k) for k in ([ks] if isinstance(ks, int) else ks))
    if not ks or any(k < 1 for k in ks) or any(b <= a for a, b in zip(ks, ks[1:])):
        raise ValueError(f"ks must be positive and strictly ascending, got {ks}")
    if limit is not None and ks[-1] > limit:
        raise ValueError(f"DreamRec's protocol ranks the top {limit} items only: every k must be <= {limit}, "
                         f"got {ks}")
    return ks


def _rank(score_fn, data: SequenceData, t: Targets, ks: Tuple[int, ...], batch_size: int, *, exclude: bool,
          max_len: Optional[int], n_cols: int, backend: Optional[str], progress: Optional[bool],
          desc: str) -> Dict[str, float]:
    """Scores the targets t in order, batch by batch, and averages HR / NDCG / MRR at each k."""
    
    n = len(t)
    n_k = len(ks)
    ks_t = torch.tensor(ks, dtype=torch.int64)
    sums = torch.zeros(3, n_k, dtype=torch.float64)
    starts = range(0, n, batch_size)
    if progress_enabled(progress):
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for start in starts:
        b = t[start:start + batch_size]
        B = len(b)
        history, lengths = data.windows(b.seq, b.pos, max_len)
        scores = score_fn(history, lengths, b.seq)
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or tuple(scores.shape) != (B, n_cols):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"score_fn must return ({B}, {n_cols}) scores for a batch of {B} targets, got {shape}")
        dev = scores.device
        target = data.target_items(b).to(dev)
        positives = CSR(torch.arange(B + 1, dtype=torch.int64, device=dev), target, None, n_cols)
        ex = data.history_csr(b).to(dev) if exclude else None
        # One positive per row: its rank over the whole list gives every metric at every k, in one
        # pass over the scores and without a top-K selection (rank < k exactly when topk_hits hits).
        rank = rk.target_rank(scores, positives, exclude=ex, backend=backend).cpu()
        within = (rank[:, None] >= 0) & (rank[:, None] < ks_t[None, :])  # -1: the target was history
        r = rank.clamp_min(0).to(torch.float64)[:, None]
        sums[0] += within.to(torch.float64).sum(0)
        sums[1] += torch.where(within, 1.0 / torch.log2(r + 2.0), 0.0).sum(0)  # one positive: IDCG = 1
        sums[2] += torch.where(within, 1.0 / (r + 1.0), 0.0).sum(0)
    means = (sums / n if n else sums).tolist()
    result: Dict[str, float] = {}
    for j, k in enumerate(ks):
        result[f"hr@{k}"] = means[0][j]
        result[f"ndcg@{k}"] = means[1][j]
        result[f"mrr@{k}"] = means[2][j]
    result["n"] = n
    return result


def evaluate_sequences(score_fn, data: SequenceData, splits=("valid", "test"), *, ks=None,
                       batch_size: int = 1024, exclude_history: Optional[bool] = None, max_len: Optional[int] = None,
                       progress: Optional[bool] = False, backend: Optional[str] = None,
                       protocol: str = "full") -> Dict[str, Dict[str, float]]:
    """Full-ranking HR@k (= Recall@k with one positive) and NDCG@k of each split, via ``target_rank``.

    Three protocols:

    * ``"full"`` (default): every target of the split, in batches of
      ``batch_size``, is ranked against all ``n_items`` items with
      ``refit_kernels.target_rank`` (higher score first, equal scores by lower
      item id, ``-inf`` allowed, NaN an error); the positive of a row is its
      target item and, when excluding, the row's history
      (:meth:`SequenceData.history_csr`) is never ranked. HR@k = 1 when the
      target is in the top k; NDCG@k = 1 / log2(rank + 2) (0-based rank < k);
      MRR@k = 1 / (rank + 1) (rank < k).
    * ``"dreamrec"``: DreamRec's own evaluation (``evaluate`` and
      ``calculate_hit`` of its ``DreamRec.py`` / ``utility.py``), for
      comparison with its published numbers; see :func:`evaluate_like_dreamrec`.
      The history is never excluded, ``score_fn`` returns ``n_items + 1``
      columns (the padding id is ranked like an item), targets are scored in
      batches of 100 in split order and a last partial batch is dropped;
      ``batch_size`` is ignored, every k must be <= 100.
    * ``"preferdiff"``: PreferDiff's evaluation (``Evaluator`` of its
      ``evaluator.py``, ``predict`` of its models): every target of the split
      ranked against all ``n_items`` items (``score_fn`` returns ``n_items``
      columns; PreferDiff scores ids 1..item_num, its padding id 0 is not
      ranked), nothing masked: the history is never excluded, so an item of
      the history can take a place in the top k and a target that occurred
      in its history can be hit. Ranking and metrics as for ``"full"``
      (Recall@k = HR@k with one positive, NDCG@k = 1 / log2(rank + 2)),
      averaged over every target; ks default to 5 and 10 (PreferDiff's
      ``topk``), and the results also hold ``"recall@k"`` (equal to ``"hr@k"``),
      PreferDiff's name. Ties rank by lower item id, where PreferDiff's
      ``torch.topk`` orders them as its kernel happens to.

    Args:
        score_fn: ``score_fn(history (B, L), lengths (B,), seq (B,)) -> (B, n_items)`` float scores of
            every item for a batch of targets (history windows as :meth:`SequenceData.windows` gives them).
        ks: the cutoffs, ascending; default (10, 20, 50), or (5, 10) for ``"preferdiff"``.
        exclude_history: never rank the items before the target in its sequence (all of them, not
            only the window). Default: exclude exactly when ``data.repeats`` is False ("full"), never
            ("dreamrec", "preferdiff", which refuse True).
        max_len: window length handed to ``score_fn`` (default ``data.max_len``).
        protocol: ``"full"``, ``"dreamrec"`` or ``"preferdiff"`` (see above).

    Returns:
        {split: {"hr@k": ..., "ndcg@k": ..., "mrr@k": ..., "n": number of targets}} averaged over
        every target of the split (each target counts once; a target excluded as history counts as
        a miss); with ``"preferdiff"`` also "recall@k".
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(map(repr, PROTOCOLS))}, got {protocol!r}")
    if ks is None:
        ks = PREFERDIFF_KS if protocol == "preferdiff" else SEQUENCE_KS
    if protocol == "dreamrec":
        if exclude_history:
            raise ValueError("DreamRec's protocol never excludes the history; pass exclude_history=None or False")
        return evaluate_like_dreamrec(score_fn, data, splits, ks=ks, max_len=max_len, progress=progress,
                                      backend=backend)
    if protocol == "preferdiff" and exclude_history:
        raise ValueError("PreferDiff's protocol never excludes the history; pass exclude_history=None or False")
    ks = _check_ks(ks)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if protocol == "preferdiff":
        exclude = False
    else:
        exclude = (not data.repeats) if exclude_history is None else bool(exclude_history)
    results = {}
    for split in ([splits] if isinstance(splits, str) else splits):
        if split not in data.targets:
            raise ValueError(f"unknown split {split!r} (splits: {', '.join(data.targets)})")
        results[split] = _rank(score_fn, data, data.targets[split], ks, batch_size, exclude=exclude,
                               max_len=max_len, n_cols=data.n_items, backend=backend, progress=progress,
                               desc=f"evaluate {split}" + (" (PreferDiff)" if protocol == "preferdiff" else ""))
        if protocol == "preferdiff":
            results[split].update({f"recall@{k}": results[split][f"hr@{k}"] for k in ks})
    return results


def evaluate_like_dreamrec(score_fn, data: SequenceData, splits=("valid", "test"), *, ks=(10, 20, 50),
                           batch_size: int = DREAMREC_BATCH, max_len: Optional[int] = None,
                           progress: Optional[bool] = False, backend: Optional[str] = None
                           ) -> Dict[str, Dict[str, float]]:
    """HR@k and NDCG@k exactly as DreamRec's ``evaluate`` computes them, for comparison with its numbers.

    DreamRec (``DreamRec.py``, ``evaluate``; ``utility.py``, ``calculate_hit``):

    * walks the split's rows in file order in batches of 100 and scores only
      ``len // 100`` full batches: the last ``len % 100`` targets are dropped,
      and HR and NDCG are averaged over the scored ones (``"n"``);
    * scores the ``item_num + 1`` rows of its item embedding table, so the
      padding id (``n_items`` here) is ranked like any item and can take a
      place in the top k: ``score_fn`` must return (B, n_items + 1) scores;
    * never excludes the history (items seen earlier in the session can be
      recommended and hit);
    * takes ``prediction.topk(100)``, flips it to ascending order and, for
      each k, looks for the target among the last k columns: rank =
      k - column (1-based), HR counts a hit, NDCG adds 1 / log2(rank + 1).
      With one target per row this is the 0-based rank r < k with
      1 / log2(r + 2), as here; ks above 100 are refused (DreamRec's rank
      formula is wrong there). Ties: ``torch.topk`` orders equal scores as its
      kernel happens to, ``topk_hits`` by lower item id; with float scores
      from a model ties are rare.

    MRR@k (which DreamRec does not report) is given on the same ranks.
    ``score_fn`` gets the windows of ``max_len`` (default ``data.max_len``,
    DreamRec's ``seq_size`` for its folders: the ``seq`` column itself);
    its ``lengths`` are 0 where DreamRec's ``len_seq`` says 1.

    Returns:
        {split: {"hr@k", "ndcg@k", "mrr@k" for every k, "n"}}.
    """
    ks = _check_ks(ks, DREAMREC_TOPK)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    results = {}
    for split in ([splits] if isinstance(splits, str) else splits):
        if split not in data.targets:
            raise ValueError(f"unknown split {split!r} (splits: {', '.join(data.targets)})")
        t = data.targets[split]
        kept = t[:(len(t) // batch_size) * batch_size]
        results[split] = _rank(score_fn, data, kept, ks, batch_size, exclude=False, max_len=max_len,
                               n_cols=data.n_items + 1, backend=backend, progress=progress,
                               desc=f"evaluate {split} (DreamRec)")
    return results
