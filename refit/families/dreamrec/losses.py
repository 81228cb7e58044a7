"""DreamRec's and PreferDiff's training losses, per row of a batch: the x0 prediction's error, the
auxiliary cross-entropy of the warm start, and PreferDiff's preference term against negatives."""

from __future__ import annotations

import math
from typing import Optional, Protocol, Tuple

import torch
from torch.nn import functional as F

from ...diffusion import GaussianDiffusion, _normal, autocast
from ...runtime import distributed as dist
from .preferdiff import PAIRINGS, RECONSTRUCTIONS, PreferDiff


class _SeqRecommender(Protocol):
    """What the losses read of a :class:`refit.families.dreamrec.recommender.SeqRecommender` (described
    here, not imported: the recommender module imports the losses)."""

    model: torch.nn.Module
    diffusion: GaussianDiffusion
    precision: str
    device: torch.device
    w: float


def _training_guidance(rec: _SeqRecommender, history: torch.Tensor, lengths: torch.Tensor,
                       generator: Optional[torch.Generator], rows: Optional[Tuple[int, int]], drop: bool = True):
    """(B, D) float32 guidance of a training batch, each row dropped to the null embedding with probability
    ``p_uncond`` (one uniform draw per row of the global batch, sliced) unless ``drop`` is False."""
    model = rec.model
    with autocast(rec.precision, rec.device):
        h = model.encode(history, lengths)
    if not drop:
        return h.float()
    n = history.shape[0] if rows is None else rows[1]
    keep = torch.rand((n, 1), generator=generator)
    if rows is not None:
        keep = keep[rows[0]:rows[0] + history.shape[0]]
    keep = (keep >= model.p_uncond).to(rec.device)
    return torch.where(keep, h.float(), model.none_embedding.float().expand_as(h))


def dreamrec_loss(rec: _SeqRecommender, history: torch.Tensor, lengths: torch.Tensor,
                  targets: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                  rows: Optional[Tuple[int, int]] = None, weights: Optional[torch.Tensor] = None,
                  x0: Optional[torch.Tensor] = None, detach_target: Optional[bool] = None,
                  guided: bool = False, ce_weight: float = 0.0) -> torch.Tensor:
    """DreamRec's training loss for a batch, (B,): the squared error of the x0 prediction from
    a uniformly drawn step, averaged over the embedding dimension, with the guidance dropped to the
    null embedding with probability ``p_uncond``. The clean state is the (B,) ``targets``' item
    embeddings (with gradient, as DreamRec trains them), or the given (B, D) ``x0``. ``rows``: a slice
    of a global batch (every random draw is the global batch's, sliced). ``weights``: (B,) factors.
    ``detach_target`` (default: the network's setting): the target embeddings carry no gradient (they
    are learned through the histories only); DreamRec's code lets the loss pull them too, which lets
    it fall by drawing all item embeddings together. ``guided``: the loss of the guided prediction
    ``(1 + w) f(x, h) - w f(x, null)`` (the mean the sampler uses), without dropping the guidance: the
    loss of the policy's own mean, for training toward the policy's own samples. ``ce_weight`` > 0 (with
    ``targets``): plus that weight times the (B,) cross-entropy of the x0 prediction's item scores toward
    the target (:func:`prediction_ce`)."""
    if (targets is None) == (x0 is None):
        raise ValueError("give exactly one of targets and x0")
    if ce_weight and targets is None:
        raise ValueError("ce_weight needs the targets")
    model, d = rec.model, rec.diffusion
    h = _training_guidance(rec, history, lengths, generator, rows, drop=not guided)
    if x0 is None:
        x0 = model.item_embeddings(targets).float()
        if model.detach_target if detach_target is None else detach_target:
            x0 = x0.detach()
    else:
        x0 = x0.float()

    predictions = []

    def f(x_t, t):
        with autocast(rec.precision, x_t.device):
            out = model.guided(x_t, h, t, rec.w) if guided else model.denoise(x_t, h, t)
        predictions.append(out)
        return out.float()

    per_row = d.training_loss(f, x0, reweight=False, generator=generator, rows=rows, record=False)
    if ce_weight:
        per_row = per_row + ce_weight * prediction_ce(rec, predictions[-1], targets)
    return per_row if weights is None else per_row * weights


def prediction_ce(rec: _SeqRecommender, pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) the softmax cross-entropy over all ``n_items`` items of (B, D) x0 predictions' item scores (their
    inner products with every item embedding, as recommending ranks) toward the (B,) targets."""
    with autocast(rec.precision, pred.device):
        scores = rec.model.item_scores(pred)
    return F.cross_entropy(scores.float(), targets, reduction="none")


def ce_loss(rec: _SeqRecommender, history: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
            rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """(B,) the next item's softmax cross-entropy over all ``n_items`` items (the padding id excluded),
    scored as recommending does: the inner product of the guidance ``encode(history)`` (not dropped)
    with every item embedding. The warm start of ``embedding_warmup="ce"``: it shapes the item table
    and the encoder for ranking before the diffusion loss, which alone can lower itself by drawing the
    item embeddings together. ``rows`` is accepted for a slice of a global batch (no draw is made)."""
    with autocast(rec.precision, rec.device):
        h = rec.model.encode(history, lengths)
    return prediction_ce(rec, h, targets)


def reconstruction_error(pred: torch.Tensor, x0: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """(B,) each row's error of a (B, D) prediction toward (B, D) ``x0``: ``"cosine"``, PreferDiff's
    ``(cos(pred, x0) - 1)^2`` (``F.normalize``'d rows, as its ``cosine_loss``); ``"mse"``, the mean
    squared error over the D dimensions."""
    if kind == "cosine":
        cos = (F.normalize(pred, p=2, dim=1) * F.normalize(x0, p=2, dim=1)).sum(dim=1)
        return (cos - 1.0) ** 2
    if kind == "mse":
        return ((pred - x0) ** 2).mean(dim=1)
    raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {kind!r}")


def preference_term(pos: torch.Tensor, neg: torch.Tensor, gamma: float, pairing: str = "batch",
                    rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """(B,) PreferDiff's preference term of rows whose (B,) errors toward the target are ``pos`` and toward
    the negative ``neg``: BPR on the diffusion likelihood, ``-log sigmoid(-gamma (pos - neg))`` =
    ``softplus(gamma (pos - neg))``.

    ``pairing="row"``: each row's own difference. ``"batch"``: the difference of the batch means, as
    PreferDiff's code takes it (its losses are batch means before the log-sigmoid): every row carries the
    batch's value ``L = softplus(gamma d)``, ``d = mean(pos) - mean(neg)``, plus
    ``L'(d) ((pos_i - neg_i) - (pos_i - neg_i).detach())``, a zero whose gradient makes the mean over the
    batch's rows differentiate exactly as ``L`` does. The means are those of the global batch when
    ``rows`` slices one across processes (summed over them), so each share's gradient is its part of the
    global one.
    """
    diff = pos - neg
    if pairing == "row":
        return F.softplus(gamma * diff)
    if pairing != "batch":
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    total = diff.detach().sum().double().reshape(1)
    n = diff.shape[0]
    if rows is not None and rows[1] != n and dist.is_distributed():
        total, n = dist.all_reduce_sum(total), rows[1]
    d = float(total[0]) / max(1, n)
    value, slope = float(F.softplus(torch.tensor(gamma * d, dtype=torch.float64))), gamma / (1.0 + math.exp(-gamma * d))
    return value + slope * (diff - diff.detach())


def _negative_embeddings(model, batch_targets: torch.Tensor, generator: Optional[torch.Generator],
                         detach: bool) -> Optional[torch.Tensor]:
    """(N, D) each row's negative: the mean embedding of the other N - 1 targets of the batch (all of them,
    or ``model.negatives`` of them drawn without replacement per row); None for a batch of one row."""
    N = batch_targets.shape[0]
    if N < 2:
        return None
    E = model.item_embeddings(batch_targets).float()
    if detach:
        E = E.detach()
    k = model.negatives
    if k is None or k >= N - 1:
        return (E.sum(0, keepdim=True) - E) / (N - 1)
    pick = torch.rand((N, N - 1), generator=generator).argsort(dim=1)[:, :k].to(E.device)  # k of the others
    pick = pick + (pick >= torch.arange(N, device=E.device)[:, None]).long()  # skip the row's own position
    return E[pick].mean(dim=1)


def preferdiff_loss(rec: _SeqRecommender, history: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                    generator: Optional[torch.Generator] = None, rows: Optional[Tuple[int, int]] = None,
                    batch_targets: Optional[torch.Tensor] = None, return_parts: bool = False,
                    ce_weight: float = 0.0):
    """PreferDiff's training loss for a batch, (B,): ``lamda * L_rec + (1 - lamda) * L_pref``.

    As PreferDiff's ``PreferenceDiffusion.p_losses`` (mode ``neg``): the guidance is dropped to the null
    embedding with probability ``p_uncond``; one uniform timestep t per row; the target's embedding x0
    and the row's negative (the mean embedding of the batch's other targets, see
    :class:`~refit.families.dreamrec.preferdiff.PreferDiff` ``negatives``) are noised to step t with independent
    noise; the denoiser predicts both from the same guidance. ``L_rec`` is the error toward the target
    (:func:`reconstruction_error`), ``L_pref`` :func:`preference_term` of the errors toward the target
    and toward the negative. Weights, gamma, the error and the pairing are the network's settings.

    ``batch_targets``: the (N,) targets of the whole batch these B rows are ``rows`` of (default: the
    rows themselves); every random draw is the global batch's, sliced. A batch of one row has no
    negative: its loss is ``lamda * L_rec``. ``ce_weight``: plus that weight times
    :func:`prediction_ce` of the prediction toward the target. ``return_parts``: also ``{"rec", "pos", "neg"}``, (B,)
    each (detached), for logs and tests.
    """
    model, d = rec.model, rec.diffusion
    if not isinstance(model, PreferDiff):
        raise ValueError(f"preferdiff_loss needs a PreferDiff network, got {type(model).__name__}")
    B = targets.shape[0]
    N = B if rows is None else rows[1]
    batch_targets = targets if batch_targets is None else batch_targets.to(targets.device)
    if batch_targets.shape[0] != N:
        raise ValueError(f"batch_targets holds {batch_targets.shape[0]} targets, the batch has {N} rows")
    lo = 0 if rows is None else rows[0]
    h = _training_guidance(rec, history, lengths, generator, rows)
    neg = _negative_embeddings(model, batch_targets, generator, model.detach_target)
    x0 = model.item_embeddings(targets).float()
    if model.detach_target:
        x0 = x0.detach()
    t, _ = d.sample_timesteps(B, rec.device, generator, rows=rows)
    x_t = d.q_sample(x0, t, _normal(x0.shape, x0.dtype, x0.device, generator, rows))
    with autocast(rec.precision, rec.device):
        step = model.step_features(t)
        if neg is None:
            pred = model.denoise(x_t, h, t, step).float()
        else:
            neg = neg[lo:lo + B]
            neg_t = d.q_sample(neg, t, _normal(neg.shape, neg.dtype, neg.device, generator, rows))
            # one pass over the target's and the negative's noisy states (the same guidance and step)
            both = model.denoise(torch.cat([x_t, neg_t]), torch.cat([h, h]), t, torch.cat([step, step])).float()
            pred, pred_neg = both[:B], both[B:]
    pos = reconstruction_error(pred, x0, model.reconstruction)
    if neg is None:
        loss, err_neg = model.lamda * pos, torch.full_like(pos, float("nan"))
    else:
        err_neg = reconstruction_error(pred_neg, neg, model.reconstruction)
        loss = model.lamda * pos + (1.0 - model.lamda) * preference_term(pos, err_neg, model.gamma, model.pairing,
                                                                         rows)
    if ce_weight:
        loss = loss + ce_weight * prediction_ce(rec, pred, targets)
    if return_parts:
        return loss, {"rec": pos.detach(), "pos": pos.detach(), "neg": err_neg.detach()}
    return loss


def preferdiff_denoising_loss(rec: _SeqRecommender, history: torch.Tensor, lengths: torch.Tensor, x0: torch.Tensor,
                              generator: Optional[torch.Generator] = None,
                              rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """(B,) PreferDiff's reconstruction error of the guided prediction ``(1 + w) f(x, h) - w f(x, null)``
    toward given (B, D) clean states ``x0`` from a uniform step (the policy protocol's ``denoising_loss``;
    see :meth:`SeqRecommender.denoising_loss`). Draws as :func:`dreamrec_loss` with ``guided``."""
    model, d = rec.model, rec.diffusion
    h = _training_guidance(rec, history, lengths, generator, rows, drop=False)
    x0 = x0.float()
    t, _ = d.sample_timesteps(x0.shape[0], rec.device, generator, rows=rows)
    x_t = d.q_sample(x0, t, _normal(x0.shape, x0.dtype, x0.device, generator, rows))
    with autocast(rec.precision, rec.device):
        pred = model.guided(x_t, h, t, rec.w).float()
    return reconstruction_error(pred, x0, model.reconstruction)


__all__ = ["dreamrec_loss", "ce_loss", "prediction_ce", "preferdiff_loss", "preferdiff_denoising_loss", "preference_term",
           "reconstruction_error"]
