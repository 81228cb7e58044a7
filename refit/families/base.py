"""What every model family's pretraining configuration shares: the data, the run folder, the optimiser's
and the loop's settings (:func:`refit.runtime.loop.run_epochs`), with their flags and their checks.

A family's configuration subclasses :class:`PretrainSettings`, adds its model's settings, and gives the
shared ones other defaults by declaring them again with a plain default (``batch_size: int = 256``):
the flag and its help stay the ones declared here (:func:`refit.settings.flag_fields`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Optional, Sequence, Tuple

from ..diffusion import PRECISIONS
from ..limits import check_run_settings
from ..runtime.runs import RunDir, save_checkpoint, set_rng_state
from ..settings import int_list, positive_float, positive_int, seed as seed_type, setting


@dataclass
class PretrainSettings:
    """The settings of a pretraining run that do not depend on the model (defaults: DiffRec's)."""

    data: str = "synthetic"
    data_options: Dict[str, Any] = field(default_factory=dict)
    model: str = ""
    lr: float = setting(1e-3, "AdamW's learning rate", group="training")
    weight_decay: float = setting(0.0, group="training")
    batch_size: int = setting(400, type=positive_int, group="training")
    epochs: int = setting(1000, "epochs at most", type=positive_int, group="training")
    eval_every: int = setting(5, "evaluate every this many epochs (and always the last)", type=positive_int,
                              group="training")
    patience: int = setting(20, "epochs without improvement", type=positive_int, group="training")
    seed: int = setting(1, type=seed_type, group="training")
    precision: str = setting("fp32", choices=PRECISIONS, group="training")
    eval_batch_size: int = setting(1024, type=positive_int, group="training")
    ks: Tuple[int, ...] = setting((10, 20, 50, 100), "cut-offs, e.g. 10,20,50,100", type=int_list, group="training")
    out: str = "runs/pretrain"
    progress: Optional[bool] = None  # progress bar: None when stderr is a terminal, True always, False never
    init: Optional[str] = setting(None, "start from this checkpoint's weights (continued pretraining)", type=str)
    # stop after this many seconds (training and evaluation)
    time_budget: Optional[float] = setting(None, "stop after this many seconds", type=positive_float)

    #: The validation metric that selects the model (``ks`` must reach its cut-off).
    selection_metric: ClassVar[str] = "recall@20"

    def check_run(self, positive: Sequence[str] = (), finite: Sequence[str] = ()) -> None:
        """The shared checks (:func:`refit.limits.check_run_settings`), with the subclass's own integer
        settings that must be >= 1 (``positive``) and numbers that must be finite (``finite``)."""
        check_run_settings(self, positive=("batch_size", "epochs", "eval_every", "patience", "eval_batch_size",
                                           *positive), finite=finite, precisions=PRECISIONS,
                           selection=self.selection_metric)

    def check_cutoffs(self, n_items: int) -> None:
        """The cut-offs must fit the data's items (ValueError naming ``--ks`` otherwise)."""
        if max(self.ks) > n_items:
            raise ValueError(f"ks {list(self.ks)} go beyond the {n_items} items of {self.data!r}: pass smaller "
                             "cut-offs (--ks)")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunStart:
    """Where a pretraining run starts (:func:`start_pretraining`).

    Attributes:
        epoch: the first epoch to train (1 for a new run).
        best: ``{"epoch", "value", "valid", "test"}``, updated in place by the loop.
        elapsed: seconds the run spent before this process (a resumed run's).
        state: the resumed ``last.pt`` (None for a new run): what the family restores beyond the model,
            the optimiser and the generator.
        checkpoint: ``checkpoint(epoch) -> dict``: the run's state for ``best.pt`` and ``last.pt``.
    """

    epoch: int
    best: Dict[str, Any]
    elapsed: float
    state: Optional[Dict[str, Any]]
    checkpoint: Callable[[int], Dict[str, Any]]


def start_pretraining(run: RunDir, config: PretrainSettings, fingerprint: str, *, resume: bool, main: bool,
                      rec: Any, model: Any, optimizer: Any, generator: Any, sizes: Dict[str, int],
                      evaluate: Callable[[], Dict[str, Dict[str, float]]],
                      data_meta: Optional[Dict[str, Any]] = None) -> RunStart:
    """What every pretraining run does before its first epoch, by one rule for every family.

    A resumed run (:meth:`refit.runtime.runs.RunDir.resume_state`) gets its model's weights, the
    optimiser and ``generator`` back from ``last.pt``; the main process writes ``config.json`` (the
    config, the data's fingerprint and ``sizes``); and a run that starts from ``config.init`` evaluates
    that model as epoch 0, which competes for ``best.pt``. ``rec.state()`` and ``data_meta`` (default:
    ``sizes``; beside the data's source, options and fingerprint) make the checkpoints.
    """
    best: Dict[str, Any] = {"epoch": 0, "value": -1.0, "valid": None, "test": None}
    epoch, elapsed = 1, 0.0
    state = run.resume_state(config, fingerprint, resume=resume, position="epoch", data_name=config.data)
    if state is not None:
        model.load_state_dict(state["recommender"]["model"]["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], generator)
        epoch, elapsed = state["epoch"] + 1, state.get("elapsed", 0.0)
        best.update(state["best"])
    if main:
        run.write_json("config.json", {**config.to_dict(), "data_fingerprint": fingerprint, **sizes})

    def checkpoint(position: int) -> Dict[str, Any]:
        return {"kind": "pretrain", "recommender": rec.state(), "config": config.to_dict(),
                "data": {"source": config.data, "options": config.data_options, "fingerprint": fingerprint,
                         **(sizes if data_meta is None else data_meta)},
                "epoch": position, "best": best}

    if config.init is not None and epoch == 1:  # the starting point competes for "best" too
        metrics = evaluate()
        best.update({"epoch": 0, "value": metrics["valid"][config.selection_metric], "valid": metrics["valid"],
                     "test": metrics["test"]})
        if main:
            run.log({"epoch": 0, "valid": metrics["valid"], "test": metrics["test"]})
            save_checkpoint(run.file("best.pt"), checkpoint(0))
    return RunStart(epoch, best, elapsed, state, checkpoint)


__all__ = ["PretrainSettings", "RunStart", "start_pretraining"]
