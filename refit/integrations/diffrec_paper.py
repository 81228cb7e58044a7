"""Checkpoints of DiffRec's paper code (Wang et al., SIGIR 2023) into refit.

That code saves the whole denoiser with ``torch.save(model, path)``: a pickled
``models.DNN.DNN`` module, with none of the diffusion settings it was trained
with. :func:`load_diffrec_paper_checkpoint` reads such a file without
importing anything of that code and without running anything in the file
(the pickle goes through the same inert unpickler as RecBole's files:
classes outside an exact allow-list become stand-ins that only keep their
data), takes the weights and the architecture (``in_dims``, ``out_dims``,
``time_emb_dim``, ``time_type``, ``norm``, the dropout rate) from the
stand-ins, and builds refit's :class:`~refit.families.diffrec.denoisers.DiffRecMLP` with the
diffusion settings given as arguments (``refit import-diffrec`` takes them as
flags with DiffRec's names). The two networks compute the same function
(tested), so the result can be evaluated, fine-tuned and saved as any refit
DiffRec.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Dict, List, Tuple

import torch

from ..diffusion import DiffusionConfig, GaussianDiffusion
from ..families.diffrec.denoisers import DiffRecMLP
from ..families.diffrec.recommender import RowRecommender
from ..runtime.runs import _check_archive, check_finite_weights
from ..data.safe_pickle import Opaque, read_pickle

#: The most parameters a paper checkpoint may declare (4 Gi: 16 GiB of float32 weights, held twice while
#: the model is built). Checked on the declared dims before anything is allocated from them.
MAX_PARAMETERS = 4 * 2 ** 30


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
    """Parameters and buffers of a pickled module tree, named as ``state_dict()`` names them (the file's
    own tensors: not copied yet, so that nothing is allocated before their shapes are checked)."""
    fields = _fields(module)
    out: Dict[str, torch.Tensor] = {}
    for kind in ("_parameters", "_buffers"):
        for name, value in (fields.get(kind) or {}).items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise PaperCheckpointError(f"the weight {prefix + name!r} is a {type(value).__name__}, not a tensor")
            # A tensor's size and strides come from the pickle: a view larger than its storage (stride 0)
            # would be allocated in full when copied.
            if value.untyped_storage().nbytes() < value.numel() * value.element_size():
                raise PaperCheckpointError(f"the weight {prefix + name!r} (shape {tuple(value.shape)}) is larger "
                                           "than the data stored for it")
            out[prefix + name] = value
    for name, child in (fields.get("_modules") or {}).items():
        if child is not None:
            out.update(_state_dict(child, f"{prefix}{name}."))
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _dims(path: str, name: str, value: Any) -> List[int]:
    if not isinstance(value, (list, tuple)) or len(value) < 2 or \
            not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in value):
        raise PaperCheckpointError(f"{path!r}: {name} must be a list of at least two positive integers (the layer "
                                   f"widths), got {_show(value)}")
    return [int(d) for d in value]


def _settings(path: str, fields: Dict[str, Any], dropout: Any) -> Dict[str, Any]:
    """The DNN's settings, checked: ValueError naming the file and the field for anything the paper code
    could not have written."""
    in_dims, out_dims = _dims(path, "in_dims", fields["in_dims"]), _dims(path, "out_dims", fields["out_dims"])
    emb = fields["time_emb_dim"]
    if not isinstance(emb, numbers.Integral) or isinstance(emb, bool) or emb < 1:
        raise PaperCheckpointError(f"{path!r}: time_emb_dim must be a positive integer, got {_show(emb)}")
    time_type = fields.get("time_type", "cat")
    if time_type != "cat":  # the only one the paper code's DNN builds (and refit's DiffRec)
        raise PaperCheckpointError(f"{path!r}: time_type {_show(time_type)}: refit's DiffRec concatenates the time "
                                   "embedding ('cat')")
    norm = fields.get("norm", False)
    if not isinstance(norm, bool):
        raise PaperCheckpointError(f"{path!r}: norm must be True or False, got {_show(norm)}")
    if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not math.isfinite(dropout) \
            or not 0 <= dropout < 1:
        raise PaperCheckpointError(f"{path!r}: the dropout rate (drop.p) must be a number in [0, 1), got "
                                   f"{_show(dropout)}")
    return {"in_dims": in_dims, "out_dims": out_dims, "emb_size": int(emb), "time_type": "cat", "norm": norm,
            "dropout": float(dropout)}


def _layer_shapes(in_dims: List[int], out_dims: List[int], emb: int) -> Dict[str, Tuple[int, ...]]:
    """The weight shapes of the paper code's DNN with these dims (its own layout: the time embedding is
    concatenated to the first layer's input)."""
    shapes: Dict[str, Tuple[int, ...]] = {"emb_layer.weight": (emb, emb), "emb_layer.bias": (emb,)}
    for part, widths in (("in_layers", [in_dims[0] + emb] + in_dims[1:]), ("out_layers", out_dims)):
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            shapes[f"{part}.{i}.weight"], shapes[f"{part}.{i}.bias"] = (b, a), (b,)
    return shapes


def _origin(obj: Any) -> str:
    cls = type(obj)
    origin = getattr(cls, "_origin", None)
    return f"{origin[0]}.{origin[1]}" if origin else f"{cls.__module__}.{cls.__qualname__}"


def read_paper_model(path: str) -> Dict[str, Any]:
    """The architecture and weights of a pickled paper-code DNN: ``{"in_dims", "out_dims", "emb_size",
    "time_type", "norm", "dropout", "state_dict", "class"}``. Nothing in the file is imported or run.

    The file is checked before its weights are used: the zip archive's CRC-32s (a damaged file is
    refused, not imported with other numbers), the settings (errors name the file and the field), the
    model's size from its declared dims (at most :data:`MAX_PARAMETERS`), every weight's shape against
    those dims, and every weight finite (errors name the file and the tensor).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    _check_archive(path, "DiffRec paper checkpoint")
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
    model = _settings(path, fields, dropout)
    shapes = _layer_shapes(model["in_dims"], model["out_dims"], model["emb_size"])
    n_parameters = sum(math.prod(s) for s in shapes.values())
    if n_parameters > MAX_PARAMETERS:
        raise PaperCheckpointError(f"{path!r} declares a DNN of {n_parameters:,} parameters (in_dims "
                                   f"{_show(model['in_dims'])}, out_dims {_show(model['out_dims'])}), more than the "
                                   f"{MAX_PARAMETERS:,} refit imports")
    try:
        weights = _state_dict(obj)
    except PaperCheckpointError as exc:
        raise PaperCheckpointError(f"{path!r}: {exc}") from None
    unknown, absent = sorted(set(weights) - set(shapes)), sorted(set(shapes) - set(weights))
    if unknown or absent:
        raise PaperCheckpointError(f"{path!r}: the DNN's weights do not match the layers its dims declare ("
                                   f"unexpected: {unknown[:6]}, missing: {absent[:6]})")
    for name, want in shapes.items():
        got = weights[name]
        if tuple(got.shape) != want or not got.is_floating_point():
            raise PaperCheckpointError(f"{path!r}: weight {name!r} is a {tuple(got.shape)} {got.dtype} tensor; the "
                                       f"declared dims (in_dims {_show(model['in_dims'])}, out_dims "
                                       f"{_show(model['out_dims'])}, time_emb_dim {model['emb_size']}) give a "
                                       f"{want} floating-point one")
    check_finite_weights(weights, f"DiffRec paper checkpoint {path!r}")
    return {"class": _origin(obj), **model,
            "state_dict": {k: v.detach().clone() for k, v in weights.items()}}


def diffrec_from_paper(model: Dict[str, Any], diffusion: DiffusionConfig, *, sampling_steps: int = 0,
                       sampling_noise: bool = False) -> RowRecommender:
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
    return RowRecommender("diffrec", net, GaussianDiffusion(diffusion), sampling_steps=sampling_steps,
                       sampling_noise=sampling_noise)


def load_diffrec_paper_checkpoint(path: str, *, mean_type: str = "x0", steps: int = 100,
                                  noise_schedule: str = "linear-var", noise_scale: float = 0.1,
                                  noise_min: float = 0.0001, noise_max: float = 0.02, sampling_steps: int = 0,
                                  sampling_noise: bool = False) -> RowRecommender:
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
