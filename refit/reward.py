"""The collaborative reward of ReFiT: hits of the final top-K list.

``r = alpha * N_K / K + (1 - alpha) * N_simK / K`` where N_K counts the
user's target items in the top-K list ranked from the trajectory's final
state, and N_simK the mean number of items of each of the user's M most
similar users (by cosine similarity of training rows) in that same list.
Both come from one ``topk_hits`` call per batch.

What is the target? Two readings are offered:

* ``target="hidden"`` (default): each episode hides a random fraction of the
  user's training items from the input; N_K counts hits on the hidden items,
  and the visible items are excluded from the ranking (as at evaluation,
  where the history is masked). The model is rewarded for recommending what
  the user did interact with but it was not shown: the task it is evaluated
  on.
* ``target="observed"``: the input is the whole training row, the positives
  are that same row and nothing is excluded. The reward then measures how
  much of its own input the model puts back on top of the list.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional

import torch

import refit_kernels as rk

TARGETS = ("hidden", "observed")
#: What N_K is replaced by: "hit" (the count of positives in the top-K list), or a dense reward from
#: each positive's rank over every item not excluded: "ndcg" (the full list's NDCG of the positives)
#: or "rr" (the reciprocal rank of the best-ranked positive).
REWARDS = ("hit", "ndcg", "rr")


class Episode(NamedTuple):
    """A batch's policy inputs and the CSR rows its reward is counted against.

    Attributes:
        users: (B,) int64 ids of the rows of the similarity table (users; for
            sequence data, sequences).
        inputs: what the policy conditions on: (B, I) float32 start rows for
            interaction data, a ``(history (B, L), lengths (B,))`` pair of int64
            tensors for sequence data.
        positives: CSR (B rows) of each row's target items.
        exclude: CSR (B rows) of items never ranked, or None.
    """

    users: torch.Tensor
    inputs: Any
    positives: rk.CSR
    exclude: Optional[rk.CSR]

    @property
    def rows(self):
        """The start rows (interaction data): another name of ``inputs``."""
        return self.inputs


def map_inputs(inputs, fn):
    """``fn`` applied to a tensor, or to every tensor of a tuple of them (policy inputs)."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    return type(inputs)(fn(x) for x in inputs)


class Reward(NamedTuple):
    """Per-user reward and its parts, (B,) float32 each."""

    reward: torch.Tensor
    n_k: torch.Tensor
    n_sim_k: torch.Tensor


def _rows_csr(indptr: torch.Tensor, indices: torch.Tensor, n_items: int) -> rk.CSR:
    return rk.CSR(indptr.to(torch.int64), indices.to(torch.int64), None, n_items)


def make_episode(train: rk.CSR, users: torch.Tensor, target: str = "hidden", hide_fraction: float = 0.2,
                 generator: Optional[torch.Generator] = None) -> Episode:
    """Start rows and targets for ``users`` (CPU tensors; ``train`` a CSR with sorted rows).

    In ``"hidden"`` mode every user keeps at least one visible item and hides
    at least one (users with a single training item hide nothing);
    ``round(hide_fraction * n)`` items are hidden otherwise, chosen uniformly.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if not 0.0 < hide_fraction < 1.0:
        raise ValueError(f"hide_fraction must be in (0, 1), got {hide_fraction}")
    n_items = int(train.n_cols)
    starts, ends = train.indptr[users], train.indptr[users + 1]
    lens = ends - starts
    B = users.shape[0]
    owner = torch.repeat_interleave(torch.arange(B), lens)
    pos_in_row = torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    items = train.indices[starts[owner] + pos_in_row].to(torch.int64)
    full_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])
    if target == "observed":
        rows = rk.gather_rows(train, users)
        return Episode(users, rows, _rows_csr(full_ptr, items, n_items), None)
    n_hide = torch.clamp(torch.round(lens.to(torch.float64) * hide_fraction).to(torch.int64), min=1)
    n_hide = torch.where(lens >= 2, torch.minimum(n_hide, lens - 1), torch.zeros_like(lens))
    # A uniform choice per row: the n_hide items with the smallest random keys.
    keys = torch.rand(items.shape[0], generator=generator)
    order = torch.argsort(owner.to(torch.float64) * 2.0 + keys.to(torch.float64))  # by row, then key
    rank = torch.empty_like(order)
    rank[order] = pos_in_row
    hidden = rank < n_hide[owner]  # row order of items is kept: both parts stay sorted
    counts_h = torch.bincount(owner[hidden], minlength=B)
    counts_v = lens - counts_h
    ptr_h = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts_h, 0)])
    ptr_v = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts_v, 0)])
    visible = _rows_csr(ptr_v, items[~hidden], n_items)
    rows = rk.gather_rows(visible, torch.arange(B))
    return Episode(users, rows, _rows_csr(ptr_h, items[hidden], n_items), visible)


def collaborative_reward(scores: torch.Tensor, episode: Episode, neighbors: torch.Tensor, neighbor_sets,
                         *, k: int = 20, alpha: float = 0.5, backend: Optional[str] = None) -> Reward:
    """r = alpha * N_K / K + (1 - alpha) * N_simK / K from one top-K selection per row.

    Args:
        scores: (B, I) final states of the episode's trajectories.
        episode: from :func:`make_episode` (its CSRs have one row per score row).
        neighbors: (B, M) similar users of each row's user (-1 padding).
        neighbor_sets: CSR (n_users x I) training interactions.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = rk.topk_hits(scores.detach(), (k,), exclude=episode.exclude, positives=episode.positives,
                       neighbors=neighbors, neighbor_sets=neighbor_sets, backend=backend)
    n_k = out.hits[:, 0].to(torch.float32)
    n_sim_k = out.neighbor_hits[:, 0].to(torch.float32)
    return Reward(alpha * n_k / k + (1.0 - alpha) * n_sim_k / k, n_k, n_sim_k)


def rank_metrics(ranks: torch.Tensor, indptr: torch.Tensor, k: int) -> Dict[str, torch.Tensor]:
    """Per-row metrics from the ranks of each row's positives, (B,) float32 each.

    Args:
        ranks: (nnz,) int64 0-based rank of each positive among its row's ranked items, -1 for a
            positive that is never ranked (excluded), as :func:`refit_kernels.target_rank` gives them.
        indptr: (B + 1,) int64 offsets of each row's positives in ``ranks``.
        k: the cut-off of ``hits``.

    Returns ``hits`` (the positives ranked above k: N_K), ``recall`` (hits over the row's positives),
    ``ndcg`` (sum of 1 / log2(rank + 2) over the positives, over its ideal value for that many
    positives, with no cut-off) and ``rr`` (1 / (rank + 1) of the best-ranked positive). A row without
    positives scores 0 on each.
    """
    B = indptr.numel() - 1
    n_pos = indptr.diff()
    owner = torch.repeat_interleave(torch.arange(B, device=ranks.device), n_pos.to(ranks.device))
    ranked = ranks >= 0
    r = ranks.clamp_min(0).to(torch.float64)
    zeros = torch.zeros(B, dtype=torch.float64, device=ranks.device)
    hits = zeros.index_add(0, owner, (ranked & (ranks < k)).to(torch.float64))
    dcg = zeros.index_add(0, owner, torch.where(ranked, 1.0 / torch.log2(r + 2.0), 0.0))
    ideal = torch.cumsum(1.0 / torch.log2(torch.arange(int(n_pos.max()) if B else 0, dtype=torch.float64) + 2.0), 0)
    n = n_pos.to(ranks.device)
    idcg = torch.where(n > 0, ideal[(n - 1).clamp_min(0)] if ideal.numel() else zeros, 1.0)
    rr = zeros.scatter_reduce(0, owner, torch.where(ranked, 1.0 / (r + 1.0), 0.0), reduce="amax")
    safe = n.clamp_min(1).to(torch.float64)
    return {"hits": hits.float(), "recall": (hits / safe).float(), "ndcg": (dcg / idcg).float(), "rr": rr.float()}


def ranking_reward(scores: torch.Tensor, episode: Episode, neighbors: torch.Tensor, neighbor_sets, *,
                   kind: str = "hit", k: int = 20, alpha: float = 0.5, backend: Optional[str] = None,
                   ranks: Optional[torch.Tensor] = None) -> Reward:
    """``r = alpha * G + (1 - alpha) * N_simK / K`` with ``G`` the reward ``kind`` of :data:`REWARDS`.

    ``kind="hit"`` is :func:`collaborative_reward` (G = N_K / K). The dense kinds take each
    positive's rank over every item not excluded from :func:`refit_kernels.target_rank`, one pass
    over each row, with topk_hits' tie rule, so that ``rank < K`` exactly when N_K counts it;
    ``n_k`` is N_K either way. N_sim-K comes from one top-K selection per row as before.
    Shapes as in :func:`collaborative_reward`.
    """
    if kind not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {kind!r}")
    base = collaborative_reward(scores, episode, neighbors, neighbor_sets, k=k, alpha=alpha, backend=backend)
    if kind == "hit":
        return base
    if ranks is None:  # a caller that already ranked these positives passes its ranks
        ranks = rk.target_rank(scores.detach(), episode.positives, exclude=episode.exclude, backend=backend)
    m = rank_metrics(ranks, episode.positives.indptr.to(ranks.device), k)
    return Reward(alpha * m[kind] + (1.0 - alpha) * base.n_sim_k / k, base.n_k, base.n_sim_k)


class RunReward:
    """A run's reward of final scores: the collaborative reward (:func:`ranking_reward`) with its neighbor
    table and the item sets it counts, or a reward of the caller's, computed where the scores are.

    Args:
        neighbor_sets: (U, I) CSR of every user's items (the training rows), counted by N_sim-K.
        neighbors: (U, M) int64 table of each user's M most similar users (-1: padding).
        kind, k, alpha: as in :func:`ranking_reward`.
        reward_fn: ``reward_fn(scores, episode) -> (B,)`` float rewards to use instead (N_K and N_sim-K
            are still reported beside them).
    """

    def __init__(self, neighbor_sets, neighbors: torch.Tensor, *, kind: str = "hit", k: int = 20,
                 alpha: float = 0.5, reward_fn=None):
        self.neighbor_sets, self.neighbors = neighbor_sets, neighbors
        self.kind, self.k, self.alpha, self.reward_fn = kind, k, alpha, reward_fn
        self._sets_on_device = None  # neighbor_sets on the device of the last scores

    def on_device(self, scores: torch.Tensor, episode: Episode):
        """``(episode, neighbors)``: the episode's CSRs and its users' neighbor rows on the scores' device
        (the tables themselves stay on the CPU; the item sets are copied once per device)."""
        dev = scores.device
        if self._sets_on_device is None or self._sets_on_device.device != dev:
            self._sets_on_device = self.neighbor_sets.to(dev)
        on_dev = episode._replace(positives=episode.positives.to(dev),
                                  exclude=None if episode.exclude is None else episode.exclude.to(dev))
        return on_dev, self.neighbors[episode.users].to(dev)

    def __call__(self, scores: torch.Tensor, episode: Episode, ranks: Optional[torch.Tensor] = None) -> Reward:
        """(B,) rewards of (B, I) final scores, on the CPU (``ranks``: the positives' ranks when already
        taken, see :func:`ranking_reward`)."""
        on_dev, neighbors = self.on_device(scores, episode)
        if self.reward_fn is not None:
            parts = collaborative_reward(scores, on_dev, neighbors, self._sets_on_device, k=self.k, alpha=self.alpha)
            r = self.reward_fn(scores, on_dev)
            B = scores.shape[0]
            if not isinstance(r, torch.Tensor) or tuple(r.shape) != (B,) or not r.is_floating_point():
                got = f"{r.dtype} {tuple(r.shape)}" if isinstance(r, torch.Tensor) else type(r).__name__
                raise ValueError(f"reward_fn must return a ({B},) float tensor (one reward per row), got {got}")
            if not bool(torch.isfinite(r).all()):
                raise ValueError("reward_fn returned a NaN or infinite reward")
            return Reward(r.detach().float().cpu(), parts.n_k.cpu(), parts.n_sim_k.cpu())
        reward = ranking_reward(scores, on_dev, neighbors, self._sets_on_device, kind=self.kind, k=self.k,
                                alpha=self.alpha, ranks=ranks)
        return type(reward)(*(r.cpu() for r in reward))


def _csr_rows(c: Optional[rk.CSR], rows: torch.Tensor) -> Optional[rk.CSR]:
    """Rows ``rows`` (int64, any order, repeats allowed) of a CSR, as a new CSR."""
    if c is None:
        return None
    lens = c.indptr.diff()[rows]
    starts = c.indptr[:-1][rows]
    owner = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    offset = torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    indices = c.indices[starts[owner] + offset]
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])
    values = None if c.values is None else c.values[starts[owner] + offset]
    return rk.CSR(indptr, indices, values, c.n_cols)


def select_episode(episode: Episode, rows: torch.Tensor) -> Episode:
    """Rows ``rows`` ((n,) int64, CPU; any order, repeats allowed) of an episode: its ids, inputs (on
    whatever device they are) and CSR targets."""
    return Episode(episode.users[rows], map_inputs(episode.inputs, lambda x: x[rows.to(x.device)]),
                   _csr_rows(episode.positives, rows), _csr_rows(episode.exclude, rows))


def repeat_episode(episode: Episode, times: int) -> Episode:
    """Each row's episode ``times`` times in a row (rows u0, u0, ..., u1, u1, ...)."""
    rows = torch.arange(episode.users.numel()).repeat_interleave(times)
    return Episode(episode.users.repeat_interleave(times),
                   map_inputs(episode.inputs, lambda x: x.repeat_interleave(times, dim=0)),
                   _csr_rows(episode.positives, rows), _csr_rows(episode.exclude, rows))


def slice_episode(episode: Episode, start: int, stop: int) -> Episode:
    """Rows ``[start, stop)`` of an episode (its ids, inputs and CSR targets)."""
    def cut(c: Optional[rk.CSR]) -> Optional[rk.CSR]:
        if c is None:
            return None
        a, b = int(c.indptr[start]), int(c.indptr[stop])
        return rk.CSR(c.indptr[start:stop + 1] - a, c.indices[a:b], None if c.values is None else c.values[a:b],
                      c.n_cols)

    return Episode(episode.users[start:stop], map_inputs(episode.inputs, lambda x: x[start:stop]),
                   cut(episode.positives), cut(episode.exclude))


def sequence_episode(data, targets) -> Episode:
    """Episodes of sequence data: predict each target item from the window before it.

    ``targets`` is a :class:`refit.data.sequences.Targets`. N_K counts the target
    item; the history (every item before the target) is excluded from the
    ranking when the data's items do not repeat, as at evaluation.
    """
    history, lengths = data.windows(targets.seq, targets.pos)
    items = data.target_items(targets)
    B = items.numel()
    positives = rk.CSR(torch.arange(B + 1, dtype=torch.int64), items.to(torch.int64), None, data.n_items)
    exclude = None if data.repeats else data.history_csr(targets)
    return Episode(targets.seq.to(torch.int64), (history, lengths), positives, exclude)
