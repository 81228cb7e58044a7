"""An adapter for outside guided latent sequential diffusion recommenders (DreamRec-style models).

DreamRec's published code keeps a sequential recommender in two pieces: an
``nn.Module`` (``Tenc``) that encodes a history into a guidance vector h
(``cacu_h``), embeds items (``cacu_x``) and predicts the clean embedding x0
from ``(x_t, h, step)`` (``forward``), and a plain ``diffusion`` object that
holds the betas and the guidance weight ``w``. :func:`LatentScheduleDenoiser`
turns such a pair into a diffusion policy (see :mod:`refit.policy`) that
:func:`refit.posttrain.run.finetune` post-trains, with refit's own DreamRec policy
(:class:`refit.families.dreamrec.recommender.SeqRecommender`) doing the sampling, the
classifier-free guidance ``(1 + w) f(x, h, t) - w f(x, null, t)``, the ranking
by inner products with the item embeddings, the losses and the evaluation.

What the adapter needs of the outside model is given as four parts, each
either the *name* of a method or attribute of the module, a submodule or a
bound method of the module, or a function taking the module as its first
argument:

``denoise(module, x_t, h, t) -> x0``
    x_t, h: (N, D) float; t: (N,) int64 timesteps in [0, T). Returns (N, D).
    Default: the module itself, ``module(x_t, h, t)`` (``Tenc.forward``).
``encode(module, history, lengths) -> h``
    history: (B, L) int64 item ids in the module's own padding convention
    (``pad``, ``pad_id``, ``id_offset``), lengths: (B,) int64. Returns (B, D)
    (a (D,) result is taken for B = 1, as ``Tenc.cacu_h`` squeezes it).
``item_embeddings(module) -> table``
    The (n_items, D) embeddings of the real items, in refit's id order
    (row i is item i; no padding row).
``null_embedding(module) -> null``
    The (D,) (or (1, D)) guidance of the unconditional model.

Parts are looked up on the module each time they are used rather than kept
as closures over it: the trainer deep-copies the policy to keep a frozen
pretrained reference (the KL anchor and the KL diagnostic), and a function
that reached the module from outside would make that copy compute with the
live, changing weights. That is why a plain ``lambda x, h, t: model(x, h, t)``
is refused and ``lambda m, x, h, t: m(x, h, t)`` is asked for.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .diffusion import GaussianDiffusion
from .policy import kept_modes
from .families.dreamrec.recommender import SEQ_KS, SeqRecommender, evaluate_dreamrec

PADS = ("left", "right")

Part = Union[str, Callable[..., Any], nn.Module, torch.Tensor, None]


# --- the outside model's parts ---------------------------------------------------------------------

def _positional_capacity(fn: Callable) -> Optional[range]:
    """How many positional arguments ``fn`` accepts, as a range (None: cannot tell, e.g. a builtin)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    return range(len(required), len(positional) + 1)


class _PartRef:
    """One part of the outside model, resolved on whichever module it is called with.

    ``path`` names an attribute of the module ("" the module itself, dotted for nested ones);
    ``fn`` is a function taking the module first. Both survive a deep copy of the wrapper: the
    copy looks the part up on its own copy of the module.
    """

    def __init__(self, what: str, spec: Part, module: nn.Module, arg_names: Sequence[str], table: bool):
        self.what, self.table = what, table
        self.path: Optional[str] = None
        self.fn: Optional[Callable] = None
        call = f"{what}(module{''.join(', ' + a for a in arg_names)})"
        if isinstance(spec, str):
            try:
                functools.reduce(getattr, spec.split("."), module) if spec else module
            except AttributeError:
                raise ValueError(f"{what}={spec!r}: {type(module).__name__} has no attribute {spec!r}") from None
            self.path = spec
        elif isinstance(spec, nn.Module):
            self.path = _module_path(module, spec, what)
        elif isinstance(spec, torch.Tensor):
            if not table:
                raise TypeError(f"{what} must be callable, got a tensor")
            self.path = _tensor_path(module, spec, what)
        elif inspect.ismethod(spec) and isinstance(spec.__self__, nn.Module):
            owner = _module_path(module, spec.__self__, what)
            self.path = f"{owner}.{spec.__func__.__name__}" if owner else spec.__func__.__name__
        elif callable(spec):
            n = len(arg_names)
            capacity = _positional_capacity(spec)
            if capacity is not None and (n + 1) not in capacity:
                hint = (" A function that reaches the module from outside (a closure or a global) would make "
                        "the trainer's frozen copy of the policy keep computing with the live weights."
                        if n in capacity else "")
                raise TypeError(f"{what} must take the module as its first argument, {call}, or be the name "
                                f"of a method or attribute of the module, or a bound method of it.{hint}")
            self.fn = spec
        else:
            raise TypeError(f"{what} must be a method or attribute name, a submodule, a bound method of the "
                            f"module or a function {call}; got {type(spec).__name__}")

    def resolve(self, module: nn.Module):
        if self.fn is not None:
            return functools.partial(self.fn, module)
        return functools.reduce(getattr, self.path.split("."), module) if self.path else module

    def __call__(self, module: nn.Module, *args):
        target = self.resolve(module)
        if self.table:
            if isinstance(target, nn.Embedding):
                return target.weight
            if isinstance(target, torch.Tensor):
                return target
            if not callable(target):
                raise TypeError(f"{self.what} ({self.describe()}) is a {type(target).__name__}: it must give a tensor")
        return target(*args)

    def describe(self) -> str:
        """A plain-text name of the part (for checkpoints and errors)."""
        if self.fn is not None:
            return f"function {getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', '?')}"
        return f"module.{self.path}" if self.path else "module"


def _module_path(module: nn.Module, sub: nn.Module, what: str) -> str:
    for name, m in module.named_modules():
        if m is sub:
            return name
    raise TypeError(f"{what}: the {type(sub).__name__} given is not part of the module being fine-tuned "
                    f"({type(module).__name__}); pass the module holding every trained parameter")


def _tensor_path(module: nn.Module, tensor: torch.Tensor, what: str) -> str:
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t is tensor:
            return name
    raise TypeError(f"{what}: the tensor given is not a parameter or buffer of the module; name the attribute "
                    f"or give a function {what}(module)")


def _check_betas(betas) -> np.ndarray:
    """(T,) float64 betas of an outside schedule, refused unless 1-D, T >= 2, all finite and in (0, 1)."""
    try:
        arr = (betas.detach().cpu().double().numpy() if isinstance(betas, torch.Tensor)
               else np.asarray(betas, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"betas must be a 1-D sequence of numbers, got {type(betas).__name__}") from exc
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(f"betas must be 1-D with at least 2 steps (the schedule of the T diffusion steps), got "
                         f"shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all() or arr.min() <= 0 or arr.max() >= 1:
        raise ValueError(f"betas must all lie in (0, 1), got values in [{arr.min()}, {arr.max()}]")
    return arr


# --- the module refit's DreamRec policy drives -----------------------------------------------------

class _OutsideLatentModel(nn.Module):
    """The outside module (submodule ``denoiser``) behind the interface :class:`SeqRecommender` uses.

    Histories arrive as refit gives them: (B, L) int64 right-padded with ``n_items``, lengths (B,)
    int64; they are converted to the module's own convention before ``encode``. Embeddings are
    (B, D) in the module's dtype; ``item_scores`` gives (B, n_items).
    """

    def __init__(self, module: nn.Module, *, n_items: int, denoise: Part, encode: Part, item_embeddings: Part,
                 null_embedding: Part, pad: str, pad_id: int, id_offset: int, p_uncond: float,
                 max_len: Optional[int], detach_target: bool, steps: int):
        super().__init__()
        self._user_modes = None  # each submodule's flag when eval() was last called from a non-eval state
        self.denoiser = module  # the name refit.policy.outside_state_dict strips
        self.n_items, self.pad, self.pad_id, self.id_offset = n_items, pad, pad_id, id_offset
        self.p_uncond, self.max_len, self.detach_target = float(p_uncond), max_len, bool(detach_target)
        self._denoise = _PartRef("denoise", "" if denoise is None else denoise, module, ("x_t", "h", "t"), False)
        self._encode = _PartRef("encode", encode, module, ("history", "lengths"), False)
        self._items = _PartRef("item_embeddings", item_embeddings, module, (), True)
        self._null = _PartRef("null_embedding", null_embedding, module, (), True)
        with torch.no_grad():
            table = self._items(module)
            if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != n_items:
                raise ValueError(f"item_embeddings must give the (n_items, D) = ({n_items}, D) embeddings of the "
                                 f"real items (no padding row), got {_shape(table)}")
            self.hidden = int(table.shape[1])
            self.none_embedding  # checks its shape against D
            # Fail here, not deep inside a fine-tuning run: one tiny forward pass (eval mode, modes kept).
            with kept_modes(module, eval_mode=True):
                x = torch.zeros((2, self.hidden), dtype=table.dtype, device=table.device)
                t = torch.tensor([0, steps - 1], dtype=torch.long, device=table.device)
                self.denoise(x, self.none_embedding.to(x.dtype).expand_as(x), t)

    # The wrapper's own flag follows the outside module's: refit saves ``module.training`` before it
    # samples or scores and restores it afterwards, and a user who switched the outside module
    # directly must find that mode again.
    @property
    def training(self) -> bool:
        inner = self.__dict__.get("_modules", {}).get("denoiser")
        return inner.training if inner is not None else self.__dict__.get("_own_training", True)

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_own_training"] = bool(mode)

    def train(self, mode: bool = True) -> "_OutsideLatentModel":
        """``eval()`` remembers each submodule's flag; the ``train()`` that follows puts them back.

        refit switches the policy's module with ``was = module.training; module.eval(); ...;
        module.train(was)``, which on its own would switch every submodule to training mode,
        parts the user froze in eval mode included. The flags are put back only when nothing was
        switched in between (the module is still wholly in eval mode); otherwise ``train()`` is
        plain.
        """
        inner = self.denoiser
        if not mode:
            if self._user_modes is None and any(m.training for m in inner.modules()):
                self._user_modes = [(name, m.training) for name, m in inner.named_modules()]
            return super().train(False)
        saved, self._user_modes = self._user_modes, None
        if saved is not None and not any(m.training for m in inner.modules()):
            found = dict(inner.named_modules())
            if all(name in found for name, _ in saved):
                for name, was in saved:
                    found[name].training = was
                self.__dict__["_own_training"] = True
                return self
        return super().train(True)

    def config(self) -> Dict[str, Any]:
        """The adapter's settings and what the outside model is (plain values, for checkpoints)."""
        cls = type(self.denoiser)
        return {"outside": f"{cls.__module__}.{cls.__qualname__}", "n_items": self.n_items, "hidden": self.hidden,
                "max_len": self.max_len, "pad": self.pad, "pad_id": self.pad_id, "id_offset": self.id_offset,
                "p_uncond": self.p_uncond, "detach_target": self.detach_target,
                "parts": {p.what: p.describe() for p in (self._denoise, self._encode, self._items, self._null)}}

    # --- embeddings ---------------------------------------------------------------------------------

    def item_table(self) -> torch.Tensor:
        """(n_items, D) item embeddings (with gradient)."""
        table = self._items(self.denoiser)
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != (self.n_items, self.hidden):
            raise ValueError(f"item_embeddings must give ({self.n_items}, {self.hidden}), got {_shape(table)}")
        return table

    def item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,) int64 item ids (refit's) -> (B, D) embeddings."""
        return self.item_table()[ids]

    @property
    def none_embedding(self) -> torch.Tensor:
        """(D,) the null guidance (with gradient)."""
        null = self._null(self.denoiser)
        if not isinstance(null, torch.Tensor) or null.numel() != self.hidden or null.dim() > 2 or (
                null.dim() == 2 and null.shape[0] != 1):
            raise ValueError(f"null_embedding must give a ({self.hidden},) or (1, {self.hidden}) tensor, "
                             f"got {_shape(null)}")
        return null.reshape(self.hidden)

    def item_scores(self, x: torch.Tensor, include_padding: bool = False) -> torch.Tensor:
        """(B, D) generated embeddings -> (B, n_items) inner products with every real item."""
        if include_padding:
            raise ValueError("an outside model's item table has no padding row to rank (include_padding)")
        return x @ self.item_table().t().to(x.dtype)

    def linear_parts(self):
        """None: the outside denoiser is not known to be linear, so no folded fast sampler."""
        return None

    # --- histories ----------------------------------------------------------------------------------

    def windows(self, history: torch.Tensor, lengths: torch.Tensor):
        """refit's right-padded (B, L) windows -> the module's (B, M) windows and (B,) lengths.

        The last ``min(length, M)`` items are kept (M = ``max_len``, default L), oldest first, shifted by
        ``id_offset`` and padded with ``pad_id`` on the ``pad`` side. The lengths count the kept items,
        with an empty window given length 1, as DreamRec's data files store it (its encoder reads
        position ``length - 1``, padding either way).
        """
        B, L = history.shape
        M = self.max_len or L
        dev = history.device
        n = lengths.to(device=dev, dtype=torch.long).clamp(0, L)
        k = n.clamp(max=M)
        slots = torch.arange(M, device=dev)[None, :]
        first = (n - k)[:, None]  # refit's slot of the oldest kept item
        if self.pad == "right":
            src, real = first + slots, slots < k[:, None]
        else:
            lead = (M - k)[:, None]
            src, real = first + slots - lead, slots >= lead
        items = history.gather(1, src.clamp(0, max(L - 1, 0))) + self.id_offset
        out = torch.where(real, items, torch.full_like(items, self.pad_id))
        return out, k.clamp(min=1)

    # --- the interface SeqRecommender and dreamrec_loss use -----------------------------------------

    def encode(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) refit windows, (B,) lengths -> (B, D) guidance h."""
        window, n = self.windows(history, lengths)
        h = self._encode(self.denoiser, window, n)
        B = history.shape[0]
        if isinstance(h, torch.Tensor) and B == 1 and tuple(h.shape) == (self.hidden,):
            h = h.unsqueeze(0)  # a squeezed (D,) from a batch of one
        if not isinstance(h, torch.Tensor) or tuple(h.shape) != (B, self.hidden):
            raise ValueError(f"encode must return the ({B}, {self.hidden}) guidance of {B} histories, "
                             f"got {_shape(h)}")
        return h

    def denoise(self, x: torch.Tensor, h: torch.Tensor, t: torch.Tensor, step=None) -> torch.Tensor:
        """(N, D) x_t, (N, D) h, (N,) timesteps -> (N, D) x0 prediction."""
        out = self._denoise(self.denoiser, x, h, t.to(torch.long))
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(f"denoise must return an x0 prediction shaped like x_t {tuple(x.shape)}, "
                             f"got {_shape(out)}")
        return out

    def guided(self, x: torch.Tensor, h: torch.Tensor, t: torch.Tensor, w: float, step=None) -> torch.Tensor:
        """Classifier-free guidance ``(1 + w) f(x, h, t) - w f(x, null, t)``, (N, D); w = 0: conditional.

        Both branches run as one call over 2N rows (larger matrix products than two calls)."""
        if w == 0:
            return self.denoise(x, h, t)
        N = x.shape[0]
        null = self.none_embedding.to(h.dtype).expand_as(h)
        t = t.to(torch.long).expand(N)
        both = self.denoise(torch.cat([x, x]), torch.cat([h, null]), torch.cat([t, t]))
        cond, uncond = both[:N], both[N:]
        return (1.0 + w) * cond - w * uncond


def _shape(v) -> str:
    return f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"


# --- the policy ------------------------------------------------------------------------------------

class OutsideSeqRecommender(SeqRecommender):
    """refit's DreamRec policy over an outside module (built by :func:`LatentScheduleDenoiser`).

    ``module`` is the wrapper whose only submodule, ``denoiser``, is the outside module: its
    ``state_dict`` is the outside one's with a ``denoiser.`` prefix (see
    :func:`refit.policy.outside_state_dict`). Every sampling and evaluation leaves each submodule of
    the outside module in the train/eval mode it was found in.
    """

    model_name = "external-latent"

    @property
    def device(self) -> torch.device:
        return next(self.model.denoiser.parameters()).device

    @property
    def outside(self) -> nn.Module:
        """The outside module itself."""
        return self.model.denoiser

    @torch.no_grad()
    def generate(self, history: torch.Tensor, lengths: torch.Tensor,
                 generator: Optional[torch.Generator] = None, fast: Optional[bool] = None) -> torch.Tensor:
        """(B, D) float32 generated embeddings for refit windows, in eval mode (then the modes found)."""
        with kept_modes(self.model.denoiser, eval_mode=True):
            h = self.guidance(history, lengths)
            x_T = self.start_noise(h.shape[0], generator)
            return self._eval_diffusion.sample(self.denoiser(h), x_T, noise=True, generator=generator)

    def training_target(self, users: torch.Tensor, inputs, final: torch.Tensor, *, exclude=None,
                        k: int = 20) -> torch.Tensor:
        """(B, D) sampled final states rescaled to the item embeddings' mean norm (detached), as
        :meth:`SeqRecommender.training_target` does for refit's DreamRec."""
        final = final.detach().float()
        scale = self.model.item_table().detach().float().norm(dim=1).mean()
        return final / final.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale

    def evaluate(self, data, *, ks=SEQ_KS, batch_size: int = 2048, seed: int = 0) -> Dict[str, Dict[str, float]]:
        """Full-ranking HR@k / NDCG@k on the valid and test splits (:func:`refit.families.dreamrec.recommender.evaluate_dreamrec`,
        seeded per batch); the outside module is left in the modes it was found in."""
        if getattr(data, "n_items", self.n_items) != self.n_items:
            raise ValueError(f"the outside model scores {self.n_items} items (n_items), the data have "
                             f"{data.n_items}")
        with kept_modes(self.model.denoiser):
            return evaluate_dreamrec(self, data, ks=ks, batch_size=batch_size, seed=seed, fast=False)

    @classmethod
    def from_state(cls, state: Dict[str, Any], device="cpu", precision: Optional[str] = None, *,
                   source: Optional[str] = None) -> "OutsideSeqRecommender":
        what = f"checkpoint {source!r}" if source else "the checkpoint"
        outside = state.get("model", {}).get("config", {}).get("outside", "an outside module")
        raise ValueError(f"{what} holds the weights of {outside}, which refit cannot build by itself: build the "
                         f"module again, load module.load_state_dict(refit.policy.outside_state_dict(state)) "
                         f"and wrap it with refit.latent_adapter.LatentScheduleDenoiser")


def LatentScheduleDenoiser(module: nn.Module, betas, *, n_items: int, encode: Part, item_embeddings: Part,
                           null_embedding: Part, denoise: Part = None, w: float = 2.0, pad: str = "right",
                           pad_id: Optional[int] = None, id_offset: int = 0, p_uncond: float = 0.1,
                           max_len: Optional[int] = None, detach_target: bool = False,
                           precision: str = "fp32", eval_steps: Optional[int] = None) -> OutsideSeqRecommender:
    """A diffusion policy over next-item embeddings from an outside guided latent model and its betas.

    Written for models built the way DreamRec's published code builds them (see the module
    docstring for the four parts and their shapes). The reverse process starts from x_T ~ N(0, I)
    (D = the item embeddings' width), takes the T posterior steps of ``betas`` with the guided x0
    prediction, and ranks the n_items items by inner product with the result.

    Args:
        module: the ``nn.Module`` holding every trained parameter (the one the optimiser steps).
        betas: the (T,) schedule, all in (0, 1) (e.g. ``diffusion.betas`` of DreamRec's code).
        n_items: number of real items; refit's item i is the module's id ``i + id_offset``.
        encode, item_embeddings, null_embedding, denoise: the model's parts (module docstring).
        w: the guidance weight (DreamRec's ``diffusion.w``).
        pad: ``"right"`` (DreamRec: items first) or ``"left"`` (items last) windows for ``encode``.
        pad_id: the padding id of those windows (default ``n_items + id_offset``, DreamRec's
            ``item_num``); it may not be an item's id.
        id_offset: added to every item id in a window (1 for models whose id 0 pads).
        p_uncond: probability of the null guidance in the pretraining loss (DreamRec's ``p``).
        max_len: the window length ``encode`` takes (DreamRec's ``state_size``; default: the data's).
        detach_target: the pretraining loss's target embedding carries no gradient (DreamRec's code
            trains it: False).
        precision, eval_steps: as for :class:`refit.families.dreamrec.recommender.SeqRecommender`.

    Returns an :class:`OutsideSeqRecommender`. Its pretraining loss (the ELBO anchor) is DreamRec's:
    the mean squared error of the x0 prediction toward the target item's embedding from a uniform
    timestep, the guidance replaced by the null embedding with probability ``p_uncond``. Checkpoints
    hold the outside module's weights: ``module.load_state_dict(outside_state_dict(state))``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if next(module.parameters(), None) is None:
        raise ValueError("module has no parameters to fine-tune")
    for name, v in (("n_items", n_items), ("id_offset", id_offset)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (1 if name == "n_items" else 0):
            raise ValueError(f"{name} must be an integer >= {1 if name == 'n_items' else 0}, got {v!r}")
    n_items, id_offset = int(n_items), int(id_offset)
    if pad not in PADS:
        raise ValueError(f"pad must be one of {PADS}, got {pad!r}")
    pad_id = n_items + id_offset if pad_id is None else pad_id
    if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or pad_id < 0:
        raise ValueError(f"pad_id must be an integer >= 0, got {pad_id!r}")
    if id_offset <= pad_id < id_offset + n_items:
        raise ValueError(f"pad_id {pad_id} is an item's id (items are {id_offset} .. {id_offset + n_items - 1} "
                         f"with id_offset {id_offset})")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer))
                                or max_len < 1):
        raise ValueError(f"max_len must be a positive integer or None, got {max_len!r}")
    if not 0.0 <= float(p_uncond) < 1.0:
        raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond}")
    b = _check_betas(betas)
    wrapper = _OutsideLatentModel(module, n_items=n_items, denoise=denoise, encode=encode,
                                  item_embeddings=item_embeddings, null_embedding=null_embedding, pad=pad,
                                  pad_id=int(pad_id), id_offset=id_offset, p_uncond=p_uncond,
                                  max_len=None if max_len is None else int(max_len), detach_target=detach_target,
                                  steps=int(b.size))
    device = next(module.parameters()).device
    diffusion = GaussianDiffusion.from_betas(b, mean_type="x0", device=device, timestep_sampling="uniform")
    return OutsideSeqRecommender(wrapper, diffusion, w=w, precision=precision, eval_steps=eval_steps)


__all__ = ["LatentScheduleDenoiser", "OutsideSeqRecommender", "kept_modes", "PADS"]
