"""Checkpoints of DiffRec's paper code (Wang et al., SIGIR 2023) into refit.

That code saves the whole denoiser with ``torch.save(model, path)``: a pickled
``models.DNN.DNN`` module, with none of the diffusion settings it was trained
with. :func:`load_diffrec_paper_checkpoint` reads such a file without
importing anything of that code and without running anything in the file
(the pickle goes through the same inert unpickler as RecBole's files:
classes outside an exact allow-list become stand-ins that only keep their
data), takes the weights and the architecture (``in_dims``, ``out_dims``,
``time_emb_dim``, ``time_type``, ``norm``, the dropout rate) from the
stand-ins, and builds refit's :class:`~refit.models.DiffRecMLP` with the
diffusion settings given as arguments (``refit import-diffrec`` takes them as
flags with DiffRec's names). The two networks compute the same function
(tested), so the result can be evaluated, fine-tuned and saved as any refit
DiffRec.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from ..diffusion import DiffusionConfig, GaussianDiffusion
from ..models import DiffRecMLP
from ..recommender import Recommender
from .recbole import Opaque, read_pickle


class PaperCheckpointError(ValueError):
    """A file that is not a DiffRec paper-code checkpoint refit can reproduce; the message says why."""


def _fields(obj: Any) -> Dict[str, Any]:
    """The attribute dict a pickled module carried (its BUILD state)."""
    state = obj.state if isinstance(obj, Opaque) else getattr(obj, "__dict__", None)
    if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
        state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
        raise PaperCheckpointError(f"expected a pickled torch module, found {type(obj).__name__} without a state")
    return state


def _state_dict(module: Any, prefix: str = "") -> Dict[str, torch.Tensor]:
    """Parameters and buffers of a pickled module tree, named as ``state_dict()`` names them."""
    fields = _fields(module)
    out: Dict[str, torch.Tensor] = {}
    for kind in ("_parameters", "_buffers"):
        for name, value in (fields.get(kind) or {}).items():
            if value is not None:
                out[prefix + name] = torch.as_tensor(value).detach().clone()
    for name, child in (fields.get("_modules") or {}).items():
        if child is not None:
            out.update(_state_dict(child, f"{prefix}{name}."))
    return out


def _origin(obj: Any) -> str:
    cls = type(obj)
    origin = getattr(cls, "_origin", None)
    return f"{origin[0]}.{origin[1]}" if origin else f"{cls.__module__}.{cls.__qualname__}"


def read_paper_model(path: str) -> Dict[str, Any]:
    """The architecture and weights of a pickled paper-code DNN: ``{"in_dims", "out_dims", "emb_size",
    "time_type", "norm", "dropout", "state_dict", "class"}``. Nothing in the file is imported or run."""
    obj = read_pickle(path)
    if isinstance(obj, dict):
        raise PaperCheckpointError(f"{path!r} holds a dict ({sorted(map(str, obj))[:6]}...), not a pickled DNN "
                                   "module; a refit checkpoint is read with refit evaluate / finetune directly")
    fields = _fields(obj)
    missing = [k for k in ("in_dims", "out_dims", "time_emb_dim") if k not in fields]
    if missing:
        raise PaperCheckpointError(f"{path!r} holds a {_origin(obj)} without {', '.join(missing)}: not DiffRec's DNN")
    drop = (fields.get("_modules") or {}).get("drop")
    dropout = _fields(drop).get("p", 0.5) if drop is not None else 0.5
    return {"class": _origin(obj), "in_dims": [int(d) for d in fields["in_dims"]],
            "out_dims": [int(d) for d in fields["out_dims"]], "emb_size": int(fields["time_emb_dim"]),
            "time_type": str(fields.get("time_type", "cat")), "norm": bool(fields.get("norm", False)),
            "dropout": float(dropout), "state_dict": _state_dict(obj)}


def diffrec_from_paper(model: Dict[str, Any], diffusion: DiffusionConfig, *, sampling_steps: int = 0,
                       sampling_noise: bool = False) -> Recommender:
    """refit's DiffRec with the weights of :func:`read_paper_model`'s result and the given diffusion."""
    in_dims, out_dims = model["in_dims"], model["out_dims"]
    if model["time_type"] != "cat":
        raise PaperCheckpointError(f"time_type {model['time_type']!r}: refit's DiffRec concatenates the time "
                                   "embedding ('cat')")
    if in_dims != out_dims[::-1]:
        raise PaperCheckpointError(f"in_dims {in_dims} and out_dims {out_dims} are not mirrored; refit's DiffRec "
                                   "MLP is (the paper code's own run.sh settings are)")
    n_items, dims = out_dims[-1], out_dims[:-1]
    net = DiffRecMLP(n_items, dims=dims, emb_size=model["emb_size"], dropout=model["dropout"], norm=model["norm"])
    want = set(net.state_dict())
    have = model["state_dict"]
    if set(have) != want:
        raise PaperCheckpointError(f"the pickled DNN's weights {sorted(set(have) ^ want)[:6]} do not match "
                                   "DiffRec's layers")
    try:
        net.load_state_dict({k: v.float() for k, v in have.items()}, strict=True)
    except RuntimeError as exc:
        raise PaperCheckpointError(f"the pickled DNN's weights do not fit its dims: {exc}") from None
    return Recommender("diffrec", net, GaussianDiffusion(diffusion), sampling_steps=sampling_steps,
                       sampling_noise=sampling_noise)


def load_diffrec_paper_checkpoint(path: str, *, mean_type: str = "x0", steps: int = 100,
                                  noise_schedule: str = "linear-var", noise_scale: float = 0.1,
                                  noise_min: float = 0.0001, noise_max: float = 0.02, sampling_steps: int = 0,
                                  sampling_noise: bool = False) -> Recommender:
    """A refit DiffRec from a ``torch.save(model)`` file of DiffRec's paper code.

    The diffusion settings are not in that file: pass the ones the model was
    trained with (the defaults are those of the paper code's ``main.py``;
    its ``run.sh`` lists the published ones per data set).
    """
    diffusion = DiffusionConfig(mean_type=mean_type, steps=steps, noise_schedule=noise_schedule,
                                noise_scale=noise_scale, noise_min=noise_min, noise_max=noise_max)
    if not 0 <= sampling_steps <= steps:
        raise ValueError(f"sampling_steps must be in [0, {steps}], got {sampling_steps}")
    return diffrec_from_paper(read_paper_model(path), diffusion, sampling_steps=sampling_steps,
                              sampling_noise=sampling_noise)


__all__ = ["PaperCheckpointError", "read_paper_model", "diffrec_from_paper", "load_diffrec_paper_checkpoint"]
