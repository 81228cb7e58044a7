"""Denoisers of the reverse diffusion process.

Every denoiser is called as ``model(x_t, t, cond)`` where ``cond`` comes from
``model.condition(users, rows)`` (None for DiffRec's MLP, which needs nothing
but the noisy row); :func:`build_model` makes one from its name and config.
"""

from typing import Any

from .cfdiff import CFDiff, HopGraph, HopInputs
from .diffrec import DiffRecMLP, timestep_embedding

MODELS = {"diffrec": DiffRecMLP, "cfdiff": CFDiff}


def build_model(name: str, config: dict, train: Any = None):
    """A denoiser by name ("diffrec" or "cfdiff") from its ``config()`` dict.

    CF-Diff also needs the training interactions (``train``) for its hop inputs.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    model = MODELS[name](**config)
    if name == "cfdiff":
        if train is None:
            raise ValueError("the cfdiff model needs the training interactions (train=)")
        model.attach(train)
    return model


__all__ = ["CFDiff", "DiffRecMLP", "HopGraph", "HopInputs", "MODELS", "build_model", "timestep_embedding"]
