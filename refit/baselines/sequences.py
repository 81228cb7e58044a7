"""Baselines for sequential recommendation on :class:`refit.data.sequences.SequenceData`: most-popular, and
:func:`fit_sequence_baselines` (most-popular and a tuned SASRec, as ``refit baselines`` runs them)."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from ..data.sequences import SequenceData
from ..evaluate import evaluate_sequences


class SequenceMostPopular:
    """Scores every item by how often it is a training target: the same ranking for every history.

    A score function for :func:`refit.evaluate.evaluate_sequences`. Equal
    counts rank by lower item id (``topk_hits``'s rule).

    Args:
        data: the sequences; only the targets of ``data.targets["train"]`` are counted.
        pad_column: also score the padding id ``n_items`` (count 0), as
            DreamRec's protocol ranks it (``protocol="dreamrec"``).

    Attributes:
        counts: (n_items,) or (n_items + 1,) float32 training-target count of each item.
    """

    def __init__(self, data: SequenceData, *, pad_column: bool = False):
        items = data.target_items(data.targets["train"])
        n = data.n_items + (1 if pad_column else 0)
        self.counts = torch.bincount(items, minlength=n).to(torch.float32)

    def __call__(self, history: torch.Tensor, lengths: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) windows, (B,) lengths, (B,) sequence ids -> (B, n_items[+1]) float32 scores."""
        return self.counts.to(history.device).expand(history.shape[0], -1)


def most_popular_metrics(data: SequenceData, splits=("valid", "test"), *, ks=(10, 20, 50),
                         protocol: str = "full", exclude_history: Optional[bool] = None,
                         batch_size: int = 1024, backend: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """:func:`refit.evaluate.evaluate_sequences` of :class:`SequenceMostPopular` (arguments as there).

    Returns:
        {split: {"hr@k", "ndcg@k", "mrr@k" for every k, "n"}}.
    """
    model = SequenceMostPopular(data, pad_column=protocol == "dreamrec")
    return evaluate_sequences(model, data, splits, ks=ks, batch_size=batch_size, exclude_history=exclude_history,
                              backend=backend, protocol=protocol)


SEQ_BASELINES = ("most-popular", "sasrec")


def fit_sequence_baselines(data: SequenceData, *, ks: Sequence[int] = (10, 20, 50),
                           include: Sequence[str] = SEQ_BASELINES, sasrec_grid: Optional[Mapping[str, Any]] = None,
                           progress: Optional[bool] = False, **sasrec_overrides) -> List[Any]:
    """Most-popular and SASRec (tuned on validation HR@20 by :func:`refit.baselines.sasrec.fit_sasrec` over
    ``sasrec_grid``, its settings overridden by ``sasrec_overrides``, e.g. ``time_budget`` seconds per
    configuration) on ``data``; returns :class:`refit.baselines.BaselineResult` rows in that order."""
    from .rows import BaselineResult
    from .sasrec import DEFAULT_GRID, fit_sasrec

    unknown = set(include) - set(SEQ_BASELINES)
    if unknown or not include:
        raise ValueError(f"sequence baselines are {', '.join(SEQ_BASELINES)}; got {list(include)}")
    ks = tuple(sorted(set(int(k) for k in ks) | {20}))
    rows: List[Any] = []
    if "most-popular" in include:
        t0 = time.perf_counter()
        metrics = most_popular_metrics(data, ks=ks)
        dt = time.perf_counter() - t0
        rows.append(BaselineResult("most-popular", {}, metrics["valid"], metrics["test"], fit_s=0.0, tune_s=0.0,
                                   eval_s=dt))
    if "sasrec" in include:
        rows.append(fit_sasrec(data, DEFAULT_GRID if sasrec_grid is None else sasrec_grid, ks=ks, progress=progress,
                               **sasrec_overrides))
    return rows


__all__ = ["SequenceMostPopular", "most_popular_metrics", "fit_sequence_baselines", "SEQ_BASELINES"]
