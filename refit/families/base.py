"""What every model family's pretraining configuration shares: the data, the run folder, the optimiser's
and the loop's settings (:func:`refit.runtime.loop.run_epochs`), with their flags and their checks.

A family's configuration subclasses :class:`PretrainSettings`, adds its model's settings, and gives the
shared ones other defaults by declaring them again with a plain default (``batch_size: int = 256``):
the flag and its help stay the ones declared here (:func:`refit.settings.flag_fields`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

from ..diffusion import PRECISIONS
from ..limits import check_run_settings
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

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = ["PretrainSettings"]
