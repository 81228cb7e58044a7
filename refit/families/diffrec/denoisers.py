"""Denoisers of the reverse diffusion process.

Every denoiser is called as ``model(x_t, t, cond)`` where ``cond`` comes from
``model.condition(users, rows)`` (None for DiffRec's MLP, which needs nothing
but the noisy row); :func:`build_model` makes one from its name and config.
"""

from typing import Any, Dict, Optional

from .cfdiff import CFDiff, HopGraph, HopInputs
from .mlp import DiffRecMLP, timestep_embedding

MODELS = {"diffrec": DiffRecMLP, "cfdiff": CFDiff}


def build_model(name: str, config: dict, train: Any = None, models: Optional[Dict[str, type]] = None):
    """A denoiser by name from its ``config()`` dict; ``models`` maps the names to classes (default:
    :data:`MODELS`, "diffrec" and "cfdiff").

    A denoiser with an ``attach(train)`` method (CF-Diff: its hop inputs) also gets the training
    interactions (``train``).
    """
    models = MODELS if models is None else models
    if name not in models:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(models)}")
    model = models[name](**config)
    if hasattr(model, "attach"):
        if train is None:
            raise ValueError(f"the {name} model needs the training interactions (train=)")
        model.attach(train)
    return model


__all__ = ["CFDiff", "DiffRecMLP", "HopGraph", "HopInputs", "MODELS", "build_model", "timestep_embedding"]
