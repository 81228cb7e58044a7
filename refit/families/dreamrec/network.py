"""DreamRec (Yang et al., NeurIPS 2023): guided diffusion over the next item's embedding.

A causal transformer block encodes the last L items of a history into the
guidance ``h`` (its output at the last real position). A denoiser predicts
the clean embedding x0 from ``[x_t, h, step embedding]``; during training
``h`` is replaced by a learned null embedding with probability
``p_uncond``, so the same network also models the unconditional
distribution, and sampling mixes the two with classifier-free guidance:
``(1 + w) f(x, h, t) - w f(x, null, t)``. Items are ranked by the inner
product of the generated embedding with every item embedding. The item
embeddings are learned with the rest: the diffusion target of a training
example is its target item's embedding.

The layers follow DreamRec's published code: width 64, one block with one
head, attention scores scaled by 1/sqrt(width), queries layer-normalised and
keys and values not, a residual from the normalised queries, a ReLU
feed-forward with a post-norm residual, and a final layer norm; the step
embedding is sinusoidal [sin | cos] through Linear(D, 2D), GELU,
Linear(2D, D); the ``mlp1`` denoiser is one linear map of the 3D
concatenation (``mlp2``: Linear, GELU, Linear). Padding is masked by item
id (DreamRec infers it from all-zero rows, which gives the same masks).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ...limits import check_memory

DIFFUSERS = ("mlp1", "mlp2")


def step_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) float32 sinusoidal embedding [sin | cos] (DreamRec's layout)."""
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -scale)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class DreamRec(nn.Module):
    """History encoder, item embeddings and x0-denoiser of DreamRec.

    Shapes: histories are (B, L) int64 item ids right-padded with ``n_items``
    (L = ``max_len``), ``lengths`` (B,) the number of real items (0 allowed:
    the guidance is then that of an empty history); embeddings are (B, D)
    float32 with D = ``hidden``.
    """

    #: Which network a checkpoint rebuilds (:data:`refit.families.dreamrec.recommender.NETWORKS`).
    network_name = "dreamrec"

    def __init__(self, n_items: int, hidden: int = 64, max_len: int = 10, dropout: float = 0.1, heads: int = 1,
                 diffuser: str = "mlp1", p_uncond: float = 0.1, detach_target: bool = False):
        super().__init__()
        if n_items < 1 or hidden < 4 or hidden % 2 or max_len < 1 or heads < 1 or hidden % heads:
            raise ValueError(f"need n_items >= 1, an even hidden >= 4 divisible by heads, max_len >= 1; got "
                             f"n_items={n_items}, hidden={hidden}, heads={heads}, max_len={max_len}")
        if diffuser not in DIFFUSERS:
            raise ValueError(f"diffuser must be one of {DIFFUSERS}, got {diffuser!r}")
        if not 0 <= p_uncond < 1 or not 0 <= dropout < 1:
            raise ValueError(f"p_uncond and dropout must be in [0, 1), got {p_uncond}, {dropout}")
        # the item table, the positions and about 16 D x D layers (the attention, the diffuser's MLP)
        check_memory(f"hidden {hidden}, max_len {max_len} over {n_items} items",
                     ((n_items + 1 + max_len) * hidden + 16 * hidden * (hidden + 1)) * 4, "DreamRec's weights (float32)")
        self.n_items, self.hidden, self.max_len, self.heads = n_items, hidden, max_len, heads
        self.diffuser_type, self.p_uncond, self.dropout_p = diffuser, p_uncond, dropout
        # Training setting kept with the network (see refit.families.dreamrec.losses.dreamrec_loss): whether the
        # diffusion target's embedding is a constant of the loss or, as in DreamRec's code, trained by it.
        self.detach_target = bool(detach_target)
        D = hidden
        self.item_embeddings = nn.Embedding(n_items + 1, D)  # row n_items: the padding id
        self.none_embedding = nn.Parameter(torch.empty(D))
        self.positions = nn.Embedding(max_len, D)
        nn.init.normal_(self.item_embeddings.weight, 0.0, 1.0)
        nn.init.normal_(self.none_embedding, 0.0, 1.0)
        self.emb_dropout = nn.Dropout(dropout)
        self.ln_1, self.ln_2, self.ln_3 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.attn_dropout = nn.Dropout(dropout)
        self.ff_1, self.ff_2 = nn.Linear(D, D), nn.Linear(D, D)
        self.ff_dropout = nn.Dropout(dropout)
        self.ff_norm = nn.LayerNorm(D)
        self.step_mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        if diffuser == "mlp1":
            self.diffuser = nn.Sequential(nn.Linear(3 * D, D))
        else:
            self.diffuser = nn.Sequential(nn.Linear(3 * D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def config(self) -> dict:
        return {"n_items": self.n_items, "hidden": self.hidden, "max_len": self.max_len,
                "dropout": self.dropout_p, "heads": self.heads, "diffuser": self.diffuser_type,
                "p_uncond": self.p_uncond, "detach_target": self.detach_target}

    # --- the history encoder -------------------------------------------------------------------

    def encode(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) ids, (B,) lengths -> (B, D) guidance h: the block's output at the last real position."""
        seq, real = self._embed(history)
        q_in = self.ln_1(seq)
        att = self._attend(q_in, seq, real) + q_in
        ff = self._feed_forward(self.ln_2(att))
        out = self.ln_3(ff * real)
        return self._at_last(out, lengths)

    def _embed(self, history: torch.Tensor) -> tuple:
        """(B, L) ids -> the (B, L, D) dropped-out item + position embeddings with padding zeroed, and
        the (B, L, 1) float mask of real items."""
        L = history.shape[1]
        if L > self.max_len:
            raise ValueError(f"history windows may hold at most max_len={self.max_len} items, got {L}")
        real = (history != self.n_items).unsqueeze(-1).to(self.none_embedding.dtype)  # (B, L, 1)
        x = self.item_embeddings(history) + self.positions.weight[:L]
        return self.emb_dropout(x) * real, real

    def _attend(self, q_in: torch.Tensor, keys: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Causal multi-head attention of the (B, L, D) queries ``q_in`` over ``keys`` (values too), scores
        scaled by 1/sqrt(width), padded keys masked and padded queries' weights zeroed; no residual."""
        B, L, _ = keys.shape
        H, d = self.heads, self.hidden // self.heads
        q = self.q(q_in).view(B, L, H, d).transpose(1, 2)
        k = self.k(keys).view(B, L, H, d).transpose(1, 2)
        v = self.v(keys).view(B, L, H, d).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.hidden)  # (B, H, L, L)
        allowed = torch.tril(torch.ones(L, L, dtype=torch.bool, device=keys.device))
        allowed = allowed & (real.squeeze(-1) > 0)[:, None, None, :]
        # A fully masked row (a padded query) gets uniform weights, then the query mask zeroes it.
        scores = scores.masked_fill(~allowed, -2.0 ** 32 + 1)
        weights = torch.softmax(scores, dim=-1) * (real.squeeze(-1) > 0)[:, None, :, None]
        return (self.attn_dropout(weights) @ v).transpose(1, 2).reshape(B, L, self.hidden)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The position-wise ReLU feed-forward with its post-norm residual: norm(x + drop(W2 relu(W1 x)))."""
        return self.ff_norm(self.ff_dropout(self.ff_2(F.relu(self.ff_1(x)))) + x)

    @staticmethod
    def _at_last(out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L, D) block outputs -> (B, D) at each window's last real position (the first if empty)."""
        last = (lengths.clamp(min=1) - 1).to(torch.long)
        return out[torch.arange(out.shape[0], device=out.device), last]

    def drop_guidance(self, h: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """h with each row replaced by the null embedding with probability ``p_uncond`` (training)."""
        if self.p_uncond == 0:
            return h
        keep = torch.rand(h.shape[0], 1, device=h.device, generator=generator) >= self.p_uncond
        return torch.where(keep, h, self.none_embedding.to(h.dtype).expand_as(h))

    # --- the denoiser --------------------------------------------------------------------------

    def step_features(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, D) step embedding through the step MLP."""
        return self.step_mlp(step_embedding(t, self.hidden))

    def denoise(self, x: torch.Tensor, h: torch.Tensor, t: torch.Tensor,
                step: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x0 prediction from (B, D) x_t and guidance h at (B,) timesteps t (``step``: precomputed features)."""
        step = self.step_features(t) if step is None else step
        return self.diffuser(torch.cat([x, h, step.expand(x.shape[0], -1)], dim=1))

    def guided(self, x: torch.Tensor, h: torch.Tensor, t: torch.Tensor, w: float,
               step: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Classifier-free guidance: (1 + w) f(x, h, t) - w f(x, null, t); w = 0 is the conditional model."""
        step = self.step_features(t) if step is None else step
        cond = self.denoise(x, h, t, step)
        if w == 0:
            return cond
        uncond = self.denoise(x, self.none_embedding.to(x.dtype).expand_as(h), t, step)
        return (1.0 + w) * cond - w * uncond

    def linear_parts(self):
        """For the ``mlp1`` denoiser, (W_x, W_h, W_t, b): f = x W_x^T + h W_h^T + step W_t^T + b."""
        if self.diffuser_type != "mlp1":
            return None
        W, b = self.diffuser[0].weight, self.diffuser[0].bias
        D = self.hidden
        return W[:, :D], W[:, D:2 * D], W[:, 2 * D:], b

    def item_scores(self, x: torch.Tensor, include_padding: bool = False) -> torch.Tensor:
        """(B, D) generated embeddings -> (B, n_items) inner products with every item embedding
        (``include_padding``: also the padding id's, as DreamRec's own evaluation ranks it)."""
        E = self.item_embeddings.weight if include_padding else self.item_embeddings.weight[: self.n_items]
        return x @ E.t().to(x.dtype)


__all__ = ["DreamRec", "DIFFUSERS", "step_embedding"]
