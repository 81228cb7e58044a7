"""Simple, well-tuned baselines: most popular, item-based kNN and EASE.

Diffusion recommenders have been beaten by simple models that were tuned as
carefully as they were (Benigni, Ferrari Dacrema and Jannach, "Diffusion
Recommender Models and the Illusion of Progress", 2025). This module fits
three such models on the training split, tunes each one's hyper-parameter on
the validation split (Recall@20, as ``refit pretrain`` selects its models),
and evaluates them with :func:`refit.evaluate.evaluate_many` under the very
protocol the diffusion models are evaluated with: every user scored from
their training row, all items ranked, training items masked for validation
and training + validation items masked for the test.

* :class:`MostPopular` ranks items by their number of training interactions.
* :class:`ItemKNN` scores ``x_u @ W``, where column i of W holds the cosine
  similarities of item i to its ``k`` most similar items (item vectors are
  the columns of the training matrix); ``k`` is tuned.
* :class:`EASE` (Steck, WWW 2019) scores ``x_u @ B`` with the closed-form
  item-item matrix ``B = I - P diagMat(1 / diag(P))``, ``P = (X^T X + l2 I)^-1``
  (zero diagonal); ``l2`` is tuned.

Scores are computed per batch of users from their sparse training rows; no
users x items matrix is built (EASE's and kNN's item x item matrices are).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from ..data import InteractionData
from ..evaluate import DEFAULT_KS, evaluate_many

log = logging.getLogger(__name__)

SELECTION_METRIC = "recall@20"
DEFAULT_KNN_GRID = (5, 10, 20, 50, 100, 200, 500, 1000)
DEFAULT_EASE_GRID = (1.0, 10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0)
# EASE inverts a dense item x item float64 matrix: refuse sizes that cannot fit.
EASE_MAX_BYTES = 8 << 30


def _train_matrix(train: Any) -> sp.csr_matrix:
    """The training interactions as a float32 scipy CSR matrix with canonical (sorted, unique) indices."""
    if not sp.issparse(train):
        raise TypeError(f"train must be a scipy.sparse matrix (users x items), got {type(train).__name__}")
    m = sp.csr_matrix(train, dtype=np.float32, copy=True)
    m.sum_duplicates()
    m.sort_indices()
    return m


def _check_users(users: torch.Tensor, n_users: int) -> np.ndarray:
    u = users.detach().cpu().to(torch.int64).numpy().reshape(-1)
    if u.size and (u.min() < 0 or u.max() >= n_users):
        raise IndexError(f"users must be in [0, {n_users}), the rows of the training matrix")
    return u


class Baseline:
    """A fitted scoring model: ``scores(users)`` -> (b, n_items) float32 on the CPU."""

    name = "baseline"

    def __init__(self):
        self.train: Optional[sp.csr_matrix] = None

    def fit(self, train: Any) -> "Baseline":
        raise NotImplementedError

    def params(self) -> Dict[str, Any]:
        return {}

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _rows(self, users: torch.Tensor) -> sp.csr_matrix:
        if self.train is None:
            raise RuntimeError(f"{self.name}: call fit() before scores()")
        return self.train[_check_users(users, self.train.shape[0])]

    def label(self) -> str:
        p = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params().items())
        return f"{self.name} ({p})" if p else self.name


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


class MostPopular(Baseline):
    """Every user gets the items ranked by their number of training interactions (ties: lower id first)."""

    name = "most-popular"

    def fit(self, train: Any) -> "MostPopular":
        self.train = _train_matrix(train)
        self.popularity = torch.from_numpy(np.asarray(self.train.sum(axis=0), dtype=np.float32).reshape(-1))
        return self

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        u = self._rows(users)
        return self.popularity.expand(u.shape[0], -1).clone()


class ItemKNN(Baseline):
    """Item-based k-nearest-neighbours with cosine similarity.

    ``sim(i, j) = <x_i, x_j> / (|x_i| |x_j| + shrink)`` over the columns of the
    training matrix (0 for an item without interactions); item i's score for
    user u is the sum of ``sim(j, i)`` over the items j of u's row that are
    among the ``k`` most similar items of i (ties: lower id first; only
    positive similarities). The similarities are computed once per fit for the
    largest k asked for (:meth:`fit` with ``k_max``), so :meth:`set_k` switches
    between neighbourhood sizes without recomputing them.
    """

    name = "itemknn"

    def __init__(self, k: int = 100, shrink: float = 0.0, block: int = 512):
        super().__init__()
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if shrink < 0:
            raise ValueError(f"shrink must be >= 0, got {shrink}")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.k, self.shrink, self.block = int(k), float(shrink), int(block)
        self._nbr_idx = self._nbr_sim = None
        self.W: Optional[sp.csr_matrix] = None

    def params(self) -> Dict[str, Any]:
        p: Dict[str, Any] = {"k": self.k}
        if self.shrink:
            p["shrink"] = self.shrink
        return p

    def fit(self, train: Any, k_max: Optional[int] = None) -> "ItemKNN":
        """Computes each item's ``max(k, k_max)`` nearest neighbours, then the weights for ``k``."""
        X = _train_matrix(train)
        self.train = X
        n_items = X.shape[1]
        kmax = min(max(self.k, k_max or 0), max(n_items - 1, 1))
        Xt = X.T.tocsr()  # items x users
        Xc = X.tocsc()
        norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=0), dtype=np.float64).reshape(-1))
        # Only co-occurring items can have a positive similarity, so each block's Gram matrix stays
        # sparse: the cost follows the co-occurrences, not items x items. Entries past an item's
        # positive neighbours are padding (similarity 0), which set_k drops.
        idx = np.zeros((n_items, kmax), dtype=np.int64)
        sim = np.zeros((n_items, kmax), dtype=np.float32)
        for start in range(0, n_items, self.block):
            stop = min(start + self.block, n_items)
            gram = (Xt @ Xc[:, start:stop]).tocoo()  # (I, blk), sparse
            j, col = gram.row.astype(np.int64), gram.col.astype(np.int64)
            i = col + start
            denom = norms[j] * norms[i] + self.shrink
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.where(denom > 0, gram.data.astype(np.float64) / np.maximum(denom, 1e-300), 0.0)
            keep = (s > 0) & (j != i)  # an item is not its own neighbour
            j, i, s = j[keep], i[keep], s[keep]
            # Per item: descending similarity, equal similarities lower item id first.
            order = np.lexsort((j, -s, i))
            j, i, s = j[order], i[order], s[order]
            first = np.searchsorted(i, i, side="left")
            rank = np.arange(i.size) - first
            top = rank < kmax
            idx[i[top], rank[top]] = j[top]
            sim[i[top], rank[top]] = s[top].astype(np.float32)
        self._nbr_idx, self._nbr_sim = idx, sim
        self.set_k(self.k)
        return self

    @property
    def k_max(self) -> int:
        return 0 if self._nbr_idx is None else self._nbr_idx.shape[1]

    def set_k(self, k: int) -> "ItemKNN":
        """Uses the ``k`` nearest neighbours (k <= the k_max of the fit)."""
        if self._nbr_idx is None:
            raise RuntimeError("itemknn: call fit() before set_k()")
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        if k > self.k_max and self.k_max < self.train.shape[1] - 1:
            raise ValueError(f"k={k} exceeds the {self.k_max} neighbours computed by fit(); fit with k_max={k}")
        self.k = int(k)
        kk = min(self.k, self.k_max)
        n_items = self._nbr_idx.shape[0]
        sim = self._nbr_sim[:, :kk]
        keep = sim > 0
        cols = np.repeat(np.arange(n_items), kk).reshape(n_items, kk)
        # W[j, i] = sim(j, i) for j among i's neighbours: scores = X_u @ W.
        self.W = sp.csr_matrix((sim[keep], (self._nbr_idx[:, :kk][keep], cols[keep])), shape=(n_items, n_items),
                               dtype=np.float32)
        return self

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        rows = self._rows(users)
        return torch.from_numpy(np.asarray((rows @ self.W).toarray(), dtype=np.float32))


class EASE(Baseline):
    """EASE: a closed-form linear item-item model with L2 strength ``l2`` and a zero diagonal."""

    name = "ease"

    def __init__(self, l2: float = 500.0, max_bytes: int = EASE_MAX_BYTES):
        super().__init__()
        if not l2 > 0:
            raise ValueError(f"l2 must be > 0, got {l2}")
        self.l2, self.max_bytes = float(l2), int(max_bytes)
        self._gram: Optional[torch.Tensor] = None
        self.B: Optional[torch.Tensor] = None

    def params(self) -> Dict[str, Any]:
        return {"l2": self.l2}

    def fit(self, train: Any) -> "EASE":
        X = _train_matrix(train)
        n_items = X.shape[1]
        need = 3 * n_items * n_items * 8
        if need > self.max_bytes:
            raise ValueError(f"ease: {n_items} items need about {need / 2**30:.1f} GiB for the dense item x item "
                             f"matrices, more than max_bytes={self.max_bytes / 2**30:.1f} GiB")
        self.train = X
        self._gram = torch.from_numpy((X.T @ X).toarray().astype(np.float64))
        self.set_l2(self.l2)
        return self

    def set_l2(self, l2: float) -> "EASE":
        """Re-solves for another L2 strength from the Gram matrix kept by :meth:`fit`."""
        if self._gram is None:
            raise RuntimeError("ease: call fit() before set_l2()")
        if not l2 > 0:
            raise ValueError(f"l2 must be > 0, got {l2}")
        self.l2 = float(l2)
        G = self._gram.clone()
        G.diagonal().add_(self.l2)
        # G is symmetric positive definite (a Gram matrix plus l2 > 0): a Cholesky inverse is exact and fast.
        P = torch.cholesky_inverse(torch.linalg.cholesky(G))
        B = P / (-P.diagonal())[None, :]
        B.diagonal().zero_()
        self.B = B.float().contiguous()
        return self

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        rows = self._rows(users)
        # Sparse rows times the dense item x item matrix: only the rows' items are read.
        return torch.from_numpy(np.asarray(rows @ self.B.numpy(), dtype=np.float32))


# --- tuning and evaluation ------------------------------------------------------------------

@dataclass
class BaselineResult:
    """One tuned baseline: its hyper-parameters, metrics and times.

    ``fit_s`` is one fit at the chosen hyper-parameters; ``tune_s`` the whole
    search (every fit and validation pass of the grid), ``eval_s`` the final
    validation + test evaluation. ``grid`` lists each candidate with its
    validation Recall@20. ``notes`` flags what a reader should know, e.g. a
    chosen value on the edge of its grid (the best may lie beyond it).
    """

    name: str
    params: Dict[str, Any]
    valid: Dict[str, float]
    test: Dict[str, float]
    fit_s: float
    tune_s: float
    eval_s: float
    grid: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        p = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        return f"{self.name} ({p})" if p else self.name

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "params": self.params, "valid": self.valid, "test": self.test,
                "fit_s": self.fit_s, "tune_s": self.tune_s, "eval_s": self.eval_s, "grid": self.grid,
                "notes": self.notes}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "BaselineResult":
        return cls(d["name"], dict(d["params"]), d["valid"], d["test"], d["fit_s"], d["tune_s"], d["eval_s"],
                   list(d.get("grid", [])), list(d.get("notes", [])))


def _targets(data: InteractionData, splits: Sequence[str]):
    out = {}
    for split in splits:
        if split == "valid":
            out[split] = (data.valid, [data.train])
        elif split == "test":
            out[split] = (data.test, [data.train, data.valid])
        else:
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    return out


def evaluate_baseline(model: Baseline, data: InteractionData, splits: Sequence[str] = ("valid", "test"), *,
                      ks: Sequence[int] = DEFAULT_KS, batch_size: int = 1024,
                      progress: bool = False) -> Dict[str, Dict[str, float]]:
    """Metrics of a fitted baseline on each split, by :func:`refit.evaluate.evaluate_many`.

    Validation masks the training items; the test masks training and
    validation items (DiffRec's protocol, as for the diffusion models).
    Always in this process alone (under torchrun the commands fit and
    evaluate the baselines on rank 0 only: they take seconds).
    """
    return evaluate_many(model.scores, _targets(data, splits), ks=ks, batch_size=batch_size, progress=progress,
                         desc=model.name, distributed=False)


def _tune(name: str, data: InteractionData, grid: Sequence, param: str, fit_once: Callable[[], Baseline],
          set_param: Callable[[Baseline, Any], Any], make: Callable[[Any], Baseline], ks: Sequence[int],
          batch_size: int, progress: bool, ceiling: Optional[float] = None) -> BaselineResult:
    """Tries every grid value on the validation split and keeps the best by Recall@20.

    ``fit_once()`` fits a model that ``set_param(model, value)`` switches
    between grid values cheaply (both timed as tuning); ``make(value)`` builds
    an unfitted model for the final, separately timed fit at the chosen value.
    A choice at either end of a grid of several values gets a note (and a
    logged warning): the optimum may lie outside the grid. ``ceiling`` is a
    value no larger one could improve on (ItemKNN's k at "every item"), so a
    choice there is no edge.
    """
    t0 = time.perf_counter()
    model = fit_once()
    tried, best_value, best_param = [], -math.inf, None
    for value in grid:
        set_param(model, value)
        valid = evaluate_baseline(model, data, ("valid",), ks=(20,), batch_size=batch_size)["valid"]
        tried.append({param: value, f"valid {SELECTION_METRIC}": valid[SELECTION_METRIC]})
        if valid[SELECTION_METRIC] > best_value:  # ties keep the earlier (smaller) value
            best_value, best_param = valid[SELECTION_METRIC], value
    tune_s = time.perf_counter() - t0
    notes = []
    values = sorted(grid)
    if len(values) > 1 and best_param in (values[0], values[-1]) and best_param != ceiling:
        side = "smallest" if best_param == values[0] else "largest"
        notes.append(f"{name} chose {param}={_fmt(best_param)}, the {side} value of its grid "
                     f"({', '.join(_fmt(v) for v in values)}): the best value may lie beyond it; extend the grid")
        log.warning("baselines: %s", notes[-1])
    t1 = time.perf_counter()
    final = make(best_param).fit(data.train)
    fit_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    metrics = evaluate_baseline(final, data, ("valid", "test"), ks=ks, batch_size=batch_size, progress=progress)
    eval_s = time.perf_counter() - t2
    return BaselineResult(name, final.params(), metrics["valid"], metrics["test"], round(fit_s, 4),
                          round(tune_s, 4), round(eval_s, 4), tried, notes)


def fit_baselines(data: InteractionData, *, ks: Sequence[int] = DEFAULT_KS,
                  knn_grid: Sequence[int] = DEFAULT_KNN_GRID, ease_grid: Sequence[float] = DEFAULT_EASE_GRID,
                  include: Sequence[str] = ("most-popular", "itemknn", "ease"), batch_size: int = 1024,
                  progress: bool = False) -> List[BaselineResult]:
    """Fits, tunes (on validation Recall@20) and evaluates the baselines on ``data``.

    Args:
        data: the interactions; models are fitted on ``data.train``.
        ks: the cut-offs of the reported metrics.
        knn_grid: neighbourhood sizes tried for :class:`ItemKNN` (values at or
            above the number of items - 1 all mean "every item").
        ease_grid: L2 strengths tried for :class:`EASE`.
        include: which baselines, by name.

    Returns:
        One :class:`BaselineResult` per baseline, in the order of ``include``.
    """
    unknown = set(include) - {"most-popular", "itemknn", "ease"}
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; expected most-popular, itemknn, ease")
    # Recall@20 is always computed: the best baseline is chosen by it.
    ks = tuple(sorted(set(int(k) for k in ks) | {20}))
    knn_grid = sorted(set(int(k) for k in knn_grid))
    ease_grid = sorted(set(float(v) for v in ease_grid))
    if not knn_grid or knn_grid[0] < 1:
        raise ValueError(f"knn_grid must hold positive integers, got {knn_grid}")
    if not ease_grid or ease_grid[0] <= 0:
        raise ValueError(f"ease_grid must hold positive numbers, got {ease_grid}")
    # Neighbourhoods larger than the item count are all the same model: try it once.
    cap = max(data.n_items - 1, 1)
    knn_grid = sorted(set(min(k, cap) for k in knn_grid))
    results = []
    for name in include:
        if name == "most-popular":
            t0 = time.perf_counter()
            model = MostPopular().fit(data.train)
            fit_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            m = evaluate_baseline(model, data, ("valid", "test"), ks=ks, batch_size=batch_size, progress=progress)
            results.append(BaselineResult(name, {}, m["valid"], m["test"], round(fit_s, 4), round(fit_s, 4),
                                          round(time.perf_counter() - t1, 4)))
        elif name == "itemknn":
            results.append(_tune(name, data, knn_grid, "k", lambda: ItemKNN(k=knn_grid[-1]).fit(data.train),
                                 lambda m, k: m.set_k(k), lambda k: ItemKNN(k=k), ks, batch_size, progress,
                                 ceiling=cap))
        else:
            results.append(_tune(name, data, ease_grid, "l2", lambda: EASE(l2=ease_grid[0]).fit(data.train),
                                 lambda m, v: m.set_l2(v), lambda v: EASE(l2=v), ks, batch_size, progress))
    return results


def best_baseline(results: Sequence[BaselineResult]) -> BaselineResult:
    """The baseline with the highest validation Recall@20 (the earliest on ties)."""
    if not results:
        raise ValueError("no baseline results")
    return max(results, key=lambda r: (r.valid.get(SELECTION_METRIC, -math.inf)))


BASELINES_FILE = "baselines.json"


def cached_baselines(data: InteractionData, folder: str, *, ks: Sequence[int] = DEFAULT_KS,
                     knn_grid: Sequence[int] = DEFAULT_KNN_GRID, ease_grid: Sequence[float] = DEFAULT_EASE_GRID,
                     batch_size: int = 1024, progress: bool = False):
    """The baselines of ``data``, read from ``folder/baselines.json`` or fitted and written there.

    The file is reused only when it was made from the same interactions (the
    data fingerprint), cut-offs and grids; otherwise the baselines are fitted
    again and the file replaced.

    Returns:
        (results, path, from_cache); path is None when the folder is not writable.
    """
    from ..runtime.runs import RunDir, data_fingerprint

    key = {"fingerprint": data_fingerprint(data), "ks": sorted(set(int(k) for k in ks) | {20}),
           "knn_grid": sorted(set(int(k) for k in knn_grid)), "ease_grid": sorted(set(float(v) for v in ease_grid))}
    path = os.path.join(os.path.abspath(folder), BASELINES_FILE)
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and all(saved.get(k) == v for k, v in key.items()):
        try:
            return [BaselineResult.from_dict(d) for d in saved["results"]], path, True
        except (KeyError, TypeError):
            pass  # a damaged file: fit again and overwrite it
    results = fit_baselines(data, ks=ks, knn_grid=knn_grid, ease_grid=ease_grid, batch_size=batch_size,
                            progress=progress)
    try:
        RunDir(folder).write_json(BASELINES_FILE, {**key, "n_users": data.n_users, "n_items": data.n_items,
                                                   "best": best_baseline(results).label,
                                                   "results": [r.to_dict() for r in results]})
    except OSError as exc:  # a read-only folder: the results are still good, only not cached
        log.warning("could not cache the baselines in %s: %s", path, exc)
        path = None
    return results, path, False


def best_baseline_rows(data: InteractionData, folder: str, splits: Sequence[str] = ("test",), *,
                       ks: Sequence[int] = DEFAULT_KS, batch_size: int = 1024, progress: bool = False):
    """Table rows of the best baseline (by validation Recall@20) for ``splits``, via :func:`cached_baselines`.

    For the tables of ``refit evaluate`` (and the demo): returns ``(rows,
    best, path, from_cache)`` with rows ``[("<label>: <split>", metrics), ...]``.
    """
    results, path, from_cache = cached_baselines(data, folder, ks=ks, batch_size=batch_size, progress=progress)
    best = best_baseline(results)
    return [(f"{best.label}: {s}", getattr(best, s)) for s in splits], best, path, from_cache


__all__ = ["best_baseline_rows", "cached_baselines", "Baseline", "BaselineResult", "EASE", "ItemKNN", "MostPopular", "best_baseline", "evaluate_baseline",
           "fit_baselines", "DEFAULT_EASE_GRID", "DEFAULT_KNN_GRID"]
