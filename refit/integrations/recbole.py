"""RecBole drop-in: load a RecBole DiffRec checkpoint, check it, fine-tune it with refit, export it back.

RecBole (1.2.x) saves a model as ``torch.save({"config": Config, "state_dict":
..., ...})``. Reading that file normally imports RecBole, whose pinned
dependencies clash with current NumPy and setuptools. This module never
imports RecBole: it unpickles the file with every class but those tensors,
NumPy arrays and plain containers need (an exact list, never whole modules)
replaced by an inert stand-in that keeps the object's data (:class:`Opaque`),
so the config can be read and the whole checkpoint written back, with the
original classes, for RecBole to load. Nothing in the file runs code.

* :func:`load_recbole_checkpoint` builds a :class:`refit.families.diffrec.recommender.RowRecommender`
  with the same denoiser (RecBole's ``DNN``: time embedding, layer sizes,
  tanh, input dropout), the same noise schedule and steps, and the same
  inference settings, and checks that it scores a batch of users exactly as
  RecBole's DiffRec does (:func:`recbole_reference_scores`, a line-by-line
  re-implementation of RecBole's ``p_sample``); a difference raises
  :class:`RecBoleMismatch` naming it.
* :func:`recbole_data` gives the interactions in RecBole's own id space (its
  ``field2id_token`` remapping, with the ``[PAD]`` user and item at index 0),
  split as RecBole split them, so that evaluation ranks the same items; read
  from RecBole's saved dataloaders (exact, any configuration) or rebuilt from
  the atomic ``.inter`` file for RecBole's default data settings.
* :func:`evaluate_like_recbole` evaluates with RecBole's conventions: the
  ``[PAD]`` item never ranked, users without positives left out.
* :func:`export_recbole_checkpoint` writes a refit recommender back into the
  checkpoint's format; RecBole loads and evaluates it with its own code.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch

from ..data import InteractionData, binary_csr
from ..diffusion import DiffusionConfig, GaussianDiffusion
from ..evaluate import DEFAULT_KS, evaluate_many
from ..families.diffrec.denoisers import DiffRecMLP
from ..families.diffrec.recommender import RowRecommender
from ..data.safe_pickle import RECBOLE_PICKLE_MODULE, Opaque, read_pickle  # noqa: F401  (importable from here)


class RecBoleMismatch(ValueError):
    """A RecBole model or data set that refit cannot reproduce exactly; the message says what differs."""


def _config_dict(config: Any) -> Dict[str, Any]:
    """The final config dict of a RecBole Config (stand-in or real) or a plain dict."""
    if isinstance(config, dict):
        return config.get("final_config_dict", config)
    for getter in (lambda c: c.final_config_dict, lambda c: c.state["final_config_dict"]):
        try:
            d = getter(config)
        except (AttributeError, KeyError, TypeError):
            continue
        if isinstance(d, dict):
            return d
    raise ValueError(f"the checkpoint's config ({type(config).__name__}) has no final_config_dict")


# --- the model ------------------------------------------------------------------------------------

_LINEAR = re.compile(r"^mlp\.mlp_layers\.mlp_layers\.(\d+)\.weight$")
_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid,
                "leakyrelu": torch.nn.functional.leaky_relu, "none": None}


def _linear_layers(state_dict: Dict[str, torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """RecBole's MLPLayers linear (weight, bias) pairs in order (Sequential indices interleave dropouts)."""
    found = sorted((int(m.group(1)), k) for k in state_dict for m in [_LINEAR.match(k)] if m)
    if not found or "mlp.emb_layer.weight" not in state_dict:
        raise RecBoleMismatch("the state_dict has no RecBole DiffRec layers (expected mlp.emb_layer.* and "
                              f"mlp.mlp_layers.mlp_layers.<i>.*; found {sorted(state_dict)[:6]})")
    return [(state_dict[k], state_dict[k[:-len("weight")] + "bias"]) for _, k in found]


def _recbole_betas(cfg: Dict[str, Any]) -> np.ndarray:
    """RecBole DiffRec's ``get_betas`` (+ ``beta_fixed``), float64."""
    schedule, T = cfg["noise_schedule"], int(cfg["steps"])
    scale, lo, hi = float(cfg["noise_scale"]), float(cfg["noise_min"]), float(cfg["noise_max"])
    if schedule in ("linear", "linear-var"):
        start, end = scale * lo, scale * hi
        lin = np.linspace(start, end, T, dtype=np.float64)
        if schedule == "linear":
            betas = lin
        else:
            alpha_bar = 1 - lin
            betas = np.array([1 - alpha_bar[0]] + [min(1 - alpha_bar[i] / alpha_bar[i - 1], 0.999)
                                                   for i in range(1, T)])
    elif schedule == "cosine":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    elif schedule == "binomial":
        betas = np.array([1 / (T - t + 1) for t in np.arange(T)], dtype=np.float64)
    else:
        raise RecBoleMismatch(f"unknown noise_schedule {schedule!r}")
    betas = np.array(betas, dtype=np.float64)
    if cfg.get("beta_fixed", True):
        betas[0] = 0.00001
    return betas


def _sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """RecBole's ``timestep_embedding`` (max period 10000, [cos | sin], zero-padded when odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


@torch.no_grad()
def recbole_reference_scores(state_dict: Dict[str, torch.Tensor], config: Any, rows: torch.Tensor,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """RecBole DiffRec's ``full_sort_predict`` for (B, n_items) float32 input rows, re-implemented.

    Follows RecBole 1.2.1's code step by step (``DNN.forward`` in eval mode,
    ``get_betas``, ``calculate_for_diffusion``, ``p_sample``,
    ``p_mean_variance``), independently of refit's model and diffusion, so
    that comparing the two checks the mapping. Random draws (the forward
    noising to ``sampling_steps``, and the noise of every step but the last
    when ``sampling_noise``) come from ``generator`` in the order refit draws
    them.
    """
    cfg = _config_dict(config)
    layers = _linear_layers(state_dict)
    act = _ACTIVATIONS.get(str(cfg.get("mlp_act_func", "tanh")).lower())
    emb_w, emb_b = state_dict["mlp.emb_layer.weight"], state_dict["mlp.emb_layer.bias"]
    emb_size = emb_w.shape[1]

    def mlp(x, t):
        emb = torch.nn.functional.linear(_sinusoid(t, emb_size), emb_w, emb_b)
        if cfg.get("norm", False):
            x = torch.nn.functional.normalize(x)
        h = torch.cat([x, emb], dim=-1)
        for j, (w, b) in enumerate(layers):
            h = torch.nn.functional.linear(h, w, b)
            if j < len(layers) - 1 and act is not None:
                h = act(h)
        return h

    x_start = rows.float()
    B = x_start.shape[0]
    T = int(cfg["steps"])
    sampling_steps = int(cfg.get("sampling_steps", 0))
    noise_scale = float(cfg["noise_scale"])

    def randn(shape):
        return torch.randn(shape, generator=generator)

    if noise_scale == 0.0:
        x_t = x_start
        for i in reversed(range(T)):
            x_t = mlp(x_t, torch.full((B,), i, dtype=torch.long))
        return x_t
    betas = torch.tensor(_recbole_betas(cfg), dtype=torch.float64)
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.tensor([1.0], dtype=torch.float64), ac[:-1]])
    sqrt_ac, sqrt_1m_ac = torch.sqrt(ac), torch.sqrt(1.0 - ac)
    sqrt_recip, sqrt_recipm1 = torch.sqrt(1.0 / ac), torch.sqrt(1.0 / ac - 1)
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    post_logvar = torch.log(torch.cat([post_var[1].unsqueeze(0), post_var[1:]]))
    coef1 = betas * torch.sqrt(ac_prev) / (1.0 - ac)
    coef2 = (1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac)

    def at(arr, i):
        return arr[i].float()

    if sampling_steps == 0:
        x_t = x_start
    else:
        i = sampling_steps - 1
        x_t = at(sqrt_ac, i) * x_start + at(sqrt_1m_ac, i) * randn(x_start.shape)
    eps_mode = cfg["mean_type"] == "eps"
    for i in reversed(range(T)):
        out = mlp(x_t, torch.full((B,), i, dtype=torch.long))
        pred_x0 = at(sqrt_recip, i) * x_t - at(sqrt_recipm1, i) * out if eps_mode else out
        mean = at(coef1, i) * pred_x0 + at(coef2, i) * x_t
        if cfg.get("sampling_noise", False) and i > 0:
            x_t = mean + torch.exp(0.5 * at(post_logvar, i)) * randn(x_t.shape)
        else:
            x_t = mean
    return x_t


def _layout(layers, n_items: int, emb_size: int) -> List[int]:
    """Hidden widths of RecBole's MLP, checking that the layers chain."""
    widths = [layers[0][0].shape[1]] + [w.shape[0] for w, _ in layers]
    for j, (w, b) in enumerate(layers):
        if j and w.shape[1] != layers[j - 1][0].shape[0] or b.shape != (w.shape[0],):
            raise RecBoleMismatch(f"RecBole MLP layer {j} has weight {tuple(w.shape)} and bias {tuple(b.shape)}, "
                                  "which do not chain with the layer before")
    if widths[0] != n_items + emb_size or widths[-1] != n_items:
        raise RecBoleMismatch(f"RecBole MLP maps {widths[0]} -> {widths[-1]} features; DiffRec over {n_items} items "
                              f"with a {emb_size}-wide time embedding maps {n_items + emb_size} -> {n_items}")
    return widths[1:-1]


def diffrec_from_recbole(state_dict: Dict[str, torch.Tensor], config: Any) -> RowRecommender:
    """A refit DiffRec recommender with the weights and settings of a RecBole DiffRec.

    Raises :class:`RecBoleMismatch` naming what refit's DiffRec cannot
    reproduce (activation, T-DiffRec weighting, an unfixed first beta, the
    binomial schedule, a non-mirrored layer layout).
    """
    cfg = _config_dict(config)
    layers = _linear_layers(state_dict)
    model_name = cfg.get("model")
    if model_name not in (None, "DiffRec"):
        raise RecBoleMismatch(f"the checkpoint holds a RecBole {model_name!r} model; only DiffRec is supported")
    act = str(cfg.get("mlp_act_func", "tanh")).lower()
    if act != "tanh":
        raise RecBoleMismatch(f"mlp_act_func is {act!r}; refit's DiffRec MLP uses tanh")
    if cfg.get("time-aware", False):
        raise RecBoleMismatch("time-aware is True (T-DiffRec's time-weighted input rows); refit's DiffRec takes "
                              "binary rows")
    if not cfg.get("beta_fixed", True):
        raise RecBoleMismatch("beta_fixed is False; refit's diffusion always fixes the first beta at 1e-5")
    if cfg.get("noise_schedule") not in ("linear", "linear-var", "cosine"):
        raise RecBoleMismatch(f"noise_schedule {cfg.get('noise_schedule')!r} is not one of refit's "
                              "linear, linear-var, cosine")
    emb_w = state_dict["mlp.emb_layer.weight"]
    emb_size = int(emb_w.shape[1])
    if cfg.get("embedding_size") not in (None, emb_size):
        raise RecBoleMismatch(f"embedding_size is {cfg.get('embedding_size')} but mlp.emb_layer is "
                              f"{tuple(emb_w.shape)}")
    n_items = int(layers[-1][0].shape[0])
    hidden = _layout(layers, n_items, emb_size)
    if cfg.get("dims_dnn") is not None and list(cfg["dims_dnn"]) != hidden:
        raise RecBoleMismatch(f"dims_dnn is {list(cfg['dims_dnn'])} but the state_dict's hidden widths are {hidden}")
    # refit's DiffRec MLP is mirrored: dims (d1..dm) give hidden widths dm..d1..dm.
    m = (len(hidden) + 1) // 2
    if len(hidden) % 2 == 0 or hidden != hidden[::-1]:
        raise RecBoleMismatch(
            f"RecBole's hidden widths {hidden} (dims_dnn) are not mirrored; refit's DiffRec MLP has widths "
            "[dm, ..., d1, ..., dm] (e.g. RecBole dims_dnn [600, 200, 600] is refit dims (200, 600), "
            "the original DiffRec layout)")
    dims = hidden[m - 1:]
    model = DiffRecMLP(n_items, dims=dims, emb_size=emb_size, dropout=0.5, norm=bool(cfg.get("norm", False)))
    mapped = {"emb_layer.weight": emb_w, "emb_layer.bias": state_dict["mlp.emb_layer.bias"]}
    for j, (w, b) in enumerate(layers):
        prefix = f"in_layers.{j}" if j < m else f"out_layers.{j - m}"
        mapped[f"{prefix}.weight"], mapped[f"{prefix}.bias"] = w, b
    model.load_state_dict({k: v.detach().float().clone() for k, v in mapped.items()}, strict=True)
    diffusion = GaussianDiffusion(diffusion_config(cfg))
    steps = int(cfg.get("sampling_steps", 0))
    return RowRecommender("diffrec", model, diffusion, sampling_steps=steps,
                       sampling_noise=bool(cfg.get("sampling_noise", False)))


def diffusion_config(config: Any) -> DiffusionConfig:
    """refit's diffusion settings from a RecBole DiffRec config."""
    cfg = _config_dict(config)
    try:
        return DiffusionConfig(mean_type=cfg["mean_type"], steps=int(cfg["steps"]),
                               noise_schedule=cfg["noise_schedule"], noise_scale=float(cfg["noise_scale"]),
                               noise_min=float(cfg["noise_min"]), noise_max=float(cfg["noise_max"]),
                               history_per_step=int(cfg.get("history_num_per_term", 10)))
    except KeyError as exc:
        raise RecBoleMismatch(f"the RecBole config has no {exc.args[0]!r}: not a DiffRec config") from exc


def recbole_state_dict(rec: RowRecommender, like: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The weights of a refit DiffRec under RecBole's names, shaped like ``like`` (a RecBole state_dict)."""
    if not isinstance(rec.model, DiffRecMLP):
        raise RecBoleMismatch(f"only DiffRec exports to RecBole, not {rec.model_name!r}")
    ours = rec.model.state_dict()
    layers = sorted((int(m.group(1)), k) for k in like for m in [_LINEAR.match(k)] if m)
    n_in = len(rec.model.in_layers)
    if len(layers) != n_in + len(rec.model.out_layers):
        raise RecBoleMismatch(f"the RecBole model has {len(layers)} linear layers, this DiffRec "
                              f"{n_in + len(rec.model.out_layers)}")
    out = {"mlp.emb_layer.weight": ours["emb_layer.weight"], "mlp.emb_layer.bias": ours["emb_layer.bias"]}
    for j, (_, key) in enumerate(layers):
        src = f"in_layers.{j}" if j < n_in else f"out_layers.{j - n_in}"
        out[key] = ours[f"{src}.weight"]
        out[key[:-len("weight")] + "bias"] = ours[f"{src}.bias"]
    if set(out) != set(like):
        raise RecBoleMismatch(f"RecBole's state_dict has entries {sorted(set(like) - set(out))} that refit does "
                              "not know")
    for k, v in out.items():
        if tuple(v.shape) != tuple(like[k].shape):
            raise RecBoleMismatch(f"{k}: this DiffRec has shape {tuple(v.shape)}, the RecBole model "
                                  f"{tuple(like[k].shape)}")
    return {k: v.detach().to(like[k].dtype).cpu().clone() for k, v in out.items()}


def check_scores(rec: RowRecommender, state_dict: Dict[str, torch.Tensor], config: Any, rows: torch.Tensor, *,
                 seed: int = 0, rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Checks that ``rec`` scores ``rows`` as RecBole's DiffRec with these weights does.

    Both run with the same random draws (seeded generators). Raises
    :class:`RecBoleMismatch` with the largest difference and where it is;
    returns the largest absolute difference otherwise.
    """
    rows = rows.float().cpu()
    users = torch.arange(rows.shape[0])
    ours = rec.scores(users, rows.to(rec.device), generator=torch.Generator().manual_seed(seed)).float().cpu()
    ref = recbole_reference_scores(state_dict, config, rows, generator=torch.Generator().manual_seed(seed))
    if ours.shape != ref.shape:
        raise RecBoleMismatch(f"scores have shape {tuple(ours.shape)} in refit, {tuple(ref.shape)} in RecBole")
    diff = (ours - ref).abs()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    worst = float(diff.max()) if diff.numel() else 0.0
    if not torch.isfinite(ours).all() or worst > atol + rtol * scale:
        b, i = divmod(int(diff.argmax()), ref.shape[1])
        raise RecBoleMismatch(
            f"refit's DiffRec does not reproduce RecBole's scores: largest difference {worst:.3g} (scores up to "
            f"{scale:.3g}) at row {b}, item {i}: refit {float(ours[b, i]):.6g}, RecBole {float(ref[b, i]):.6g} "
            f"(settings: {_settings(config)})")
    return worst


def _settings(config: Any) -> str:
    cfg = _config_dict(config)
    keys = ("mean_type", "steps", "noise_schedule", "noise_scale", "noise_min", "noise_max", "sampling_steps",
            "sampling_noise", "dims_dnn", "embedding_size", "norm")
    return ", ".join(f"{k}={cfg.get(k)!r}" for k in keys)


# --- the data in RecBole's id space --------------------------------------------------------------------

@dataclass
class RecBoleIds:
    """RecBole's id remapping: internal id i of a user (item) is token ``user_tokens[i]``; 0 is ``[PAD]``."""

    user_field: str
    item_field: str
    user_tokens: np.ndarray
    item_tokens: np.ndarray

    def user_index(self, tokens: Sequence[Any]) -> np.ndarray:
        return _token_index(self.user_tokens, tokens, "user")

    def item_index(self, tokens: Sequence[Any]) -> np.ndarray:
        return _token_index(self.item_tokens, tokens, "item")


def _token_index(table: np.ndarray, tokens: Sequence[Any], what: str) -> np.ndarray:
    lookup = {str(t): i for i, t in enumerate(table)}
    out, missing = [], []
    for t in np.atleast_1d(np.asarray(tokens)).tolist():
        if str(t) in lookup and str(t) != "[PAD]":
            out.append(lookup[str(t)])
        else:
            missing.append(t)
    if missing:
        raise KeyError(f"unknown {what} tokens: {missing[:5]}")
    return np.asarray(out, dtype=np.int64)


def _build(name: str, ids: RecBoleIds, parts: Sequence[Tuple[np.ndarray, np.ndarray]]) -> InteractionData:
    nu, ni = len(ids.user_tokens), len(ids.item_tokens)
    mats = [binary_csr(u, i, nu, ni) for u, i in parts]
    summary = {"read": sum(len(u) for u, _ in parts), "train": mats[0].nnz, "valid": mats[1].nnz,
               "test": mats[2].nnz}
    return InteractionData(name, nu, ni, *mats, np.arange(nu, dtype=np.int64), np.arange(ni, dtype=np.int64),
                           summary)


def _interaction_arrays(dataset: Any, ufield: str, ifield: str) -> Tuple[np.ndarray, np.ndarray]:
    inter = dataset.inter_feat
    cols = getattr(inter, "interaction", None)
    if cols is None and isinstance(getattr(inter, "state", None), dict):
        cols = inter.state.get("interaction")
    if not isinstance(cols, dict) or ufield not in cols or ifield not in cols:
        raise ValueError(f"a saved RecBole data set without its {ufield}/{ifield} interaction columns")
    return (np.asarray(torch.as_tensor(cols[ufield]), dtype=np.int64),
            np.asarray(torch.as_tensor(cols[ifield]), dtype=np.int64))


def _from_dataloaders(path: str, name: str) -> Tuple[InteractionData, RecBoleIds]:
    loaded = read_pickle(path)
    if not isinstance(loaded, (list, tuple)) or len(loaded) != 3:
        raise ValueError(f"{path!r} is not RecBole's saved (train, valid, test) dataloaders")
    parts, ids = [], None
    for entry in loaded:
        loader = entry[0] if isinstance(entry, tuple) else entry
        dataset = getattr(loader, "_dataset", None) or getattr(loader, "dataset", None)
        if dataset is None:
            raise ValueError(f"{path!r}: a dataloader without its data set")
        if ids is None:
            uf, itf = dataset.uid_field, dataset.iid_field
            ids = RecBoleIds(uf, itf, np.asarray(dataset.field2id_token[uf]).astype(str),
                             np.asarray(dataset.field2id_token[itf]).astype(str))
        parts.append(_interaction_arrays(dataset, ids.user_field, ids.item_field))
    return _build(name, ids, parts), ids


def _read_inter(path: str, cfg: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """The loaded columns of a RecBole ``.inter`` file: token fields as str arrays, float fields as float64."""
    sep = cfg.get("field_separator", "\t")
    load_col = cfg.get("load_col")
    keep = None
    if isinstance(load_col, dict) and "inter" in load_col and load_col["inter"] != "*":
        keep = set(load_col["inter"])
    unload = set((cfg.get("unload_col") or {}).get("inter", []) or [])
    with open(path, encoding=cfg.get("encoding", "utf-8")) as f:
        header = f.readline().rstrip("\n").split(sep)
        fields = []
        for h in header:
            if ":" not in h:
                raise ValueError(f"{path}, line 1: header field {h!r} is not name:type")
            fname, ftype = h.split(":", 1)
            fields.append((fname, ftype))
        wanted = [(j, n, t) for j, (n, t) in enumerate(fields)
                  if (keep is None or n in keep) and n not in unload]
        cols: Dict[str, list] = {n: [] for _, n, _ in wanted}
        for no, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split(sep)
            if len(parts) != len(fields):
                raise ValueError(f"{path}, line {no}: expected {len(fields)} fields, got {len(parts)}")
            for j, n, _ in wanted:
                cols[n].append(parts[j])
    out = {}
    for _, n, t in wanted:
        if t == "float":
            out[n] = np.array([float(v) if v != "" else np.nan for v in cols[n]], dtype=np.float64)
        else:
            out[n] = np.array(cols[n], dtype=object)
    return out


_UNSUPPORTED_DATA_OPTIONS = ("rm_dup_inter", "val_interval", "threshold", "benchmark_filename", "preload_weight",
                             "alias_of_user_id", "alias_of_item_id")


def _from_atomic(cfg: Dict[str, Any], data_path: Optional[str], name: str) -> Tuple[InteractionData, RecBoleIds]:
    """Rebuilds RecBole's remapping and split from the ``.inter`` file, for the default data settings."""
    for key in _UNSUPPORTED_DATA_OPTIONS:
        if cfg.get(key) not in (None, [], {}):
            raise RecBoleMismatch(f"the RecBole config sets {key}={cfg.get(key)!r}, which refit does not replay; "
                                  "pass the dataloaders RecBole saved with save_dataloaders: True")
    for key in ("user_inter_num_interval", "item_inter_num_interval"):
        if cfg.get(key) not in (None, "[0,inf)", "[0, inf)"):
            raise RecBoleMismatch(f"the RecBole config filters with {key}={cfg.get(key)!r}, which refit does not "
                                  "replay; pass the dataloaders RecBole saved with save_dataloaders: True")
    dataset = cfg.get("dataset")
    folder = data_path or cfg.get("data_path")
    path = os.path.join(folder, f"{dataset}.inter") if folder else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"RecBole's atomic file {path!r} is not there: pass data_path= (the folder holding "
                                f"{dataset}.inter) or the saved dataloaders")
    for extra in ("user", "item"):
        load_col = cfg.get("load_col")
        loaded = load_col is None or (isinstance(load_col, dict) and extra in load_col)
        if loaded and os.path.isfile(os.path.join(os.path.dirname(path), f"{dataset}.{extra}")):
            raise RecBoleMismatch(f"RecBole also loads {dataset}.{extra} (load_col), whose ids join the "
                                  "remapping; pass the dataloaders RecBole saved with save_dataloaders: True")
    uf, itf, tf = cfg.get("USER_ID_FIELD", "user_id"), cfg.get("ITEM_ID_FIELD", "item_id"), cfg.get("TIME_FIELD")
    cols = _read_inter(path, cfg)
    for f in (uf, itf):
        if f not in cols:
            raise ValueError(f"{path}: no {f} column among the loaded ones {sorted(cols)}")
    users, items = cols[uf], cols[itf]
    ok = (users != "") & (items != "")
    users, items = users[ok], items[ok]
    times = cols[tf][ok] if tf in cols else None

    def remap(tokens):
        # pandas.factorize order (first appearance), ids from 1; 0 is [PAD].
        uniq, first, inverse = np.unique(tokens.astype(str), return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty(len(uniq), dtype=np.int64)
        rank[order] = np.arange(len(uniq))
        return rank[inverse.reshape(-1)] + 1, np.array(["[PAD]"] + list(uniq[order]))

    u, user_tokens = remap(users)
    i, item_tokens = remap(items)
    ids = RecBoleIds(uf, itf, user_tokens, item_tokens)
    args = cfg.get("eval_args") or {}
    order = args.get("order", "RO")
    split = args.get("split") or {"RS": [0.8, 0.1, 0.1]}
    group_by = args.get("group_by", "user")
    if list(split) != ["RS"] or len(split["RS"]) != 3 or group_by != "user":
        raise RecBoleMismatch(f"eval_args {args!r}: refit replays RS splits of three parts grouped by user; pass "
                              "the dataloaders RecBole saved with save_dataloaders: True")
    n = len(u)
    if order == "RO":
        # RecBole seeds torch with config['seed'] and shuffles once with torch.randperm before splitting.
        torch.manual_seed(int(cfg.get("seed", 2020)))
        perm = torch.randperm(n).numpy()
    elif order == "TO":
        if times is None:
            raise ValueError(f"eval_args order 'TO' needs the {tf} column")
        perm = np.argsort(times, kind="stable")
    else:
        raise RecBoleMismatch(f"eval_args order {order!r} is not RO or TO")
    u, i = u[perm], i[perm]
    ratios = [float(r) / sum(split["RS"]) for r in split["RS"]]
    part = np.empty(n, dtype=np.int64)
    # Group each user's positions in the shuffled order, then cut as RecBole's _calcu_split_ids does.
    order_u = np.argsort(u, kind="stable")
    bounds = np.flatnonzero(np.diff(u[order_u])) + 1
    for group in np.split(order_u, bounds):
        cuts = _split_ids(len(group), ratios)
        for p, (a, b) in enumerate(zip([0] + cuts, cuts + [len(group)])):
            part[group[a:b]] = p
    parts = [(u[part == p], i[part == p]) for p in range(3)]
    return _build(name, ids, parts), ids


def _split_ids(tot: int, ratios: Sequence[float]) -> List[int]:
    """RecBole's ``Dataset._calcu_split_ids``: the first part takes the rounding; small parts get one."""
    cnt = [int(ratios[k] * tot) for k in range(len(ratios))]
    cnt[0] = tot - sum(cnt[1:])
    for k in range(1, len(ratios)):
        if cnt[0] <= 1:
            break
        if 0 < ratios[-k] * tot < 1:
            cnt[-k] += 1
            cnt[0] -= 1
    return [int(c) for c in np.cumsum(cnt)[:-1]]


def recbole_data(config: Any, *, dataloaders: Optional[str] = None,
                 data_path: Optional[str] = None) -> Tuple[InteractionData, RecBoleIds]:
    """The interactions in RecBole's id space, split as RecBole split them.

    Args:
        config: the checkpoint's RecBole config (or its final config dict).
        dataloaders: RecBole's saved ``<dataset>-for-DiffRec-dataloader.pth``
            (written with ``save_dataloaders: True``): the exact ids and split
            for any configuration.
        data_path: the folder with ``<dataset>.inter`` when it moved since
            training (default: the config's ``data_path``). Without
            ``dataloaders`` the remapping (tokens numbered from 1 in order of
            first appearance) and the split (RS ratios per user, after the
            ``RO`` shuffle RecBole draws from its seed, or the ``TO`` time
            order) are rebuilt from the file for RecBole's default data
            settings; other settings raise :class:`RecBoleMismatch`.

    Returns:
        (data, ids): ``data`` has ``n_users`` / ``n_items`` counting the
        ``[PAD]`` user and item (row and column 0, always empty);
        ``ids`` maps internal ids to RecBole's tokens.
    """
    cfg = _config_dict(config)
    name = f"recbole:{cfg.get('dataset', '?')}"
    if dataloaders is not None:
        return _from_dataloaders(dataloaders, name)
    return _from_atomic(cfg, data_path, name)


def evaluate_like_recbole(rec_or_score_fn: Any, data: InteractionData, splits: Sequence[str] = ("valid", "test"), *,
                          ks: Sequence[int] = DEFAULT_KS, batch_size: int = 1024) -> Dict[str, Dict[str, float]]:
    """Full-ranking metrics with RecBole's conventions on data from :func:`recbole_data`.

    As RecBole's evaluator: the ``[PAD]`` item (0) is never ranked, validation
    masks the training items and the test training + validation items, and
    only users with positives in the split are averaged. Takes a
    :class:`RowRecommender` (scored from its users' training rows) or a score
    function of user ids.
    """
    import refit_kernels as rk

    if isinstance(rec_or_score_fn, RowRecommender):
        rec = rec_or_score_fn
        train = rk.as_csr(data.train, "train", index_dtype=None)

        def score_fn(users):
            users = users.to(rec.device)
            return rec.scores(users, rk.gather_rows(train, users).to(rec.device))
    else:
        score_fn = rec_or_score_fn
    pad = sp.csr_matrix((np.ones(data.n_users, np.float32), (np.arange(data.n_users), np.zeros(data.n_users))),
                        shape=(data.n_users, data.n_items))
    targets = {}
    for split in splits:
        if split == "valid":
            targets[split] = (data.valid, [data.train, pad])
        elif split == "test":
            targets[split] = (data.test, [data.train, data.valid, pad])
        else:
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    return evaluate_many(score_fn, targets, ks=ks, batch_size=batch_size, exclude_users_without_positives=True)


# --- checkpoints --------------------------------------------------------------------------------------------

@dataclass
class RecBoleCheckpoint:
    """A RecBole DiffRec checkpoint loaded into refit.

    Attributes:
        path: where it was read from.
        state: the whole checkpoint dict (RecBole objects as :class:`Opaque`).
        config: RecBole's final config dict.
        recommender: the refit recommender with its weights and settings.
        data, ids: the interactions in RecBole's id space and the token
            mapping (None when loaded with ``data=False``).
        max_score_difference: the largest difference found by the check on load.
    """

    path: str
    state: Dict[str, Any]
    config: Dict[str, Any]
    recommender: RowRecommender
    data: Optional[InteractionData] = None
    ids: Optional[RecBoleIds] = None
    max_score_difference: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def load_recbole_checkpoint(path: str, *, data: bool = True, dataloaders: Optional[str] = None,
                            data_path: Optional[str] = None, check: bool = True, check_users: int = 64,
                            seed: int = 0) -> RecBoleCheckpoint:
    """Loads a RecBole DiffRec checkpoint (``saved/DiffRec-*.pth``) without importing RecBole.

    Args:
        path: the checkpoint RecBole's trainer saved.
        data: also load the interactions in RecBole's id space
            (:func:`recbole_data` with ``dataloaders`` / ``data_path``).
        check: score ``check_users`` users (their training rows, or seeded
            random rows without data) with refit and with the re-implementation
            of RecBole's DiffRec, and raise :class:`RecBoleMismatch` if they differ.

    Raises:
        RecBoleMismatch: a model refit cannot reproduce, or different scores.
        ValueError / FileNotFoundError: a file that is not a RecBole checkpoint.
    """
    state = read_pickle(path)
    if not isinstance(state, dict) or "state_dict" not in state or "config" not in state:
        raise ValueError(f"{path!r} is not a RecBole checkpoint (expected a dict with 'config' and 'state_dict')")
    cfg = _config_dict(state["config"])
    sd = {k: v for k, v in state["state_dict"].items()}
    rec = diffrec_from_recbole(sd, cfg)
    out = RecBoleCheckpoint(path, state, cfg, rec)
    if data:
        out.data, out.ids = recbole_data(cfg, dataloaders=dataloaders, data_path=data_path)
        if out.data.n_items != rec.model.n_items:
            raise RecBoleMismatch(f"the model scores {rec.model.n_items} items (with [PAD]) but RecBole's data set "
                                  f"has {out.data.n_items}: not the data it was trained on")
    if check:
        n_items = rec.model.n_items
        if out.data is not None:
            users = np.flatnonzero(np.diff(out.data.train.indptr) > 0)[:check_users]
            rows = torch.from_numpy(out.data.train[users].toarray())
        else:
            g = torch.Generator().manual_seed(seed)
            rows = (torch.rand((check_users, n_items), generator=g) < 0.05).float()
            rows[:, 0] = 0.0  # the [PAD] item is never interacted with
        out.max_score_difference = check_scores(rec, sd, cfg, rows, seed=seed)
    return out


def export_recbole_checkpoint(rec: RowRecommender, template: Any, path: str) -> str:
    """Writes ``rec`` as a RecBole checkpoint that RecBole's trainer loads and evaluates.

    ``template`` is the :class:`RecBoleCheckpoint` (or the path of the
    RecBole checkpoint) the model came from: its config (with the original
    RecBole classes), epoch and optimizer entries are kept and only the
    weights are replaced. The diffusion and inference settings of ``rec``
    must be those of the template's config (RecBole reads them from there);
    a difference raises :class:`RecBoleMismatch` naming it.
    """
    if not isinstance(template, RecBoleCheckpoint):
        template = load_recbole_checkpoint(str(template), data=False, check=False)
    cfg = template.config
    mine, theirs = rec.diffusion.config, diffusion_config(cfg)
    for name in ("mean_type", "steps", "noise_schedule", "noise_scale", "noise_min", "noise_max"):
        if getattr(mine, name) != getattr(theirs, name):
            raise RecBoleMismatch(f"{name}: this recommender has {getattr(mine, name)!r}, the RecBole config "
                                  f"{getattr(theirs, name)!r}")
    for name, theirs_v in (("sampling_steps", int(cfg.get("sampling_steps", 0))),
                           ("sampling_noise", bool(cfg.get("sampling_noise", False)))):
        if getattr(rec, name) != theirs_v:
            raise RecBoleMismatch(f"{name}: this recommender has {getattr(rec, name)!r}, the RecBole config "
                                  f"{theirs_v!r}")
    if bool(getattr(rec.model, "norm", False)) != bool(cfg.get("norm", False)):
        raise RecBoleMismatch(f"norm: this recommender has {rec.model.norm}, the RecBole config {cfg.get('norm')}")
    state = dict(template.state)
    state["state_dict"] = recbole_state_dict(rec, template.state["state_dict"])
    from ..runtime.runs import atomic_write

    atomic_write(path, lambda f: torch.save(state, f, pickle_module=RECBOLE_PICKLE_MODULE, pickle_protocol=4))
    return path


__all__ = ["Opaque", "RecBoleCheckpoint", "RecBoleIds", "RecBoleMismatch", "check_scores", "diffrec_from_recbole",
           "diffusion_config", "evaluate_like_recbole", "export_recbole_checkpoint", "load_recbole_checkpoint",
           "read_pickle", "recbole_data", "recbole_reference_scores", "recbole_state_dict"]
