"""The interface of a post-training method and the registry of methods (see :mod:`refit.posttrain`)."""

from __future__ import annotations

from typing import Any, Dict, Type


class PostTrainingMethod:
    """One post-training method: ``step()`` runs one iteration on the trainer it was given.

    Subclasses set ``name`` and implement :meth:`step`; :meth:`check_config` refuses settings that do
    not apply to them and :meth:`check_policy` what their policy must offer beyond the protocol.
    """

    name: str = ""
    #: Whether the method samples trajectories (the trainer then keeps a frozen copy of the start policy
    #: for the KL diagnostic).
    samples: bool = True

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.check_policy(trainer.policy)

    @classmethod
    def check_config(cls, config: Any) -> None:
        """ValueError naming a setting of ``config`` (a FinetuneConfig) this method cannot honour."""

    def check_policy(self, policy: Any) -> None:
        """TypeError naming what ``policy`` lacks for this method."""

    def state(self) -> Dict[str, Any]:
        """What a checkpoint must hold of the method itself for an exact resume (beyond the trainer's)."""
        return {}

    def load(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state`."""

    def step(self) -> Dict[str, float]:
        """One iteration: draw, roll out, build the loss, update; returns the iteration's statistics."""
        raise NotImplementedError


METHOD_CLASSES: Dict[str, Type[PostTrainingMethod]] = {}


def register(cls: Type[PostTrainingMethod]) -> Type[PostTrainingMethod]:
    """Class decorator: makes ``cls`` selectable as ``method=cls.name``."""
    if not cls.name or cls.name in METHOD_CLASSES:
        raise ValueError(f"a post-training method needs a new name, got {cls.name!r}")
    METHOD_CLASSES[cls.name] = cls
    return cls
