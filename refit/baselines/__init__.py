"""Baselines that every model is compared with.

* :mod:`refit.baselines.rows`: row (interaction-matrix) baselines: most-popular,
  ItemKNN and EASE, each tuned on validation (:func:`fit_baselines`), and the
  ``baselines.json`` cache a model's evaluation reads;
* :mod:`refit.baselines.sequences`: most-popular over training targets for
  sequence data (:class:`SequenceMostPopular`), and the sequence baselines'
  table (:func:`fit_sequence_baselines`);
* :mod:`refit.baselines.sasrec`: SASRec's training, tuning and evaluation (its
  network is :class:`refit.baselines.sasrec_network.SASRec`).

The row baselines are importable from here, as before
(``from refit.baselines import EASE, ItemKNN, fit_baselines``).
"""

from .rows import (DEFAULT_EASE_GRID, DEFAULT_KNN_GRID, EASE, Baseline, BaselineResult, ItemKNN, MostPopular,
                   best_baseline, best_baseline_rows, cached_baselines, evaluate_baseline, fit_baselines)

__all__ = ["best_baseline_rows", "cached_baselines", "Baseline", "BaselineResult", "EASE", "ItemKNN", "MostPopular",
           "best_baseline", "evaluate_baseline", "fit_baselines", "DEFAULT_EASE_GRID", "DEFAULT_KNN_GRID"]
