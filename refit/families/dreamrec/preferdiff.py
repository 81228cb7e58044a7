"""PreferDiff (Liu et al., ICLR 2025): DreamRec's guided latent diffusion, trained with a preference.

PreferDiff keeps DreamRec's generative setup: a causal transformer encodes the
history into the guidance h, a denoiser predicts the next item's embedding x0
from ``[x_t, h, step embedding]``, h is dropped to a learned null embedding
with probability ``p_uncond`` while training, and sampling mixes the two with
classifier-free guidance ``(1 + w) f(x, h, t) - w f(x, null, t)``. Items are
ranked by the inner product of the generated embedding with every item
embedding, as PreferDiff's ``predict`` does (``models/PreferDiff/_model.py``
l. 118-124 of lswhim/PreferDiff, commit fdf45b0): :meth:`item_scores` is
DreamRec's.

What differs is the training loss (:func:`refit.families.dreamrec.losses.preferdiff_loss`):
a reconstruction term (the squared cosine gap ``(cos(x0, x0_hat) - 1)^2``)
and a preference term, BPR recast as a diffusion likelihood, that asks the
denoising error toward the target to be smaller than the error toward a
negative (the mean embedding of the other targets of the batch):
``lamda * L_rec + (1 - lamda) * softplus(gamma * (L_pos - L_neg))``. Its
settings live on the network (like DreamRec's ``detach_target``) so that a
loaded checkpoint trains with the loss it was pretrained with.

The history encoder is the block of PreferDiff's SASRec backbone
(``modules.py`` l. 114-147: ``TransformerEncoder``), which wires the same
layers as DreamRec's block with two more residuals: ``s = s + (attn(ln_1(s), s)
+ ln_1(s))``, then ``s = s + mask * FFN(ln_2(s))`` with the FFN's own post-norm
residual, and ``ln_3(s)`` at the end. The attention scores are scaled by
1/sqrt(width), not of the head's width (l. 73); its query, key and value maps
start Xavier-uniform with zero biases (l. 126-135). The parameters have
DreamRec's names and shapes, so only the wiring and the defaults differ.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .network import DreamRec

RECONSTRUCTIONS = ("cosine", "mse")
PAIRINGS = ("batch", "row")


class PreferDiff(DreamRec):
    """PreferDiff's network: DreamRec's interface (``encode``, ``denoise``, ``guided``, ``item_scores``,
    ``item_embeddings``, ``hidden``, ``n_items``) with PreferDiff's encoder block and loss settings.

    Shapes as :class:`~refit.families.dreamrec.network.DreamRec`: histories (B, L) right-padded with ``n_items``.

    Loss settings (see :func:`refit.families.dreamrec.losses.preferdiff_loss`): ``lamda`` the reconstruction
    term's weight (the preference term gets ``1 - lamda``; PreferDiff's spelling), ``gamma`` the scale
    of the error difference inside the log-sigmoid, ``reconstruction`` the error both terms measure
    (``"cosine"``: ``(cos - 1)^2``; ``"mse"``: the mean squared error), ``pairing`` (``"batch"``: the
    log-sigmoid of the batch means of the two errors, as PreferDiff's code computes it; ``"row"``: of
    each row's own difference, averaged, as the paper writes the expectation), ``negatives`` (None:
    every other target of the batch, averaged into one negative embedding, PreferDiff's
    ``sample_func: batch``; k: k of them drawn without replacement, its ``sample_func: random``).
    """

    network_name = "preferdiff"

    def __init__(self, n_items: int, hidden: int = 3072, max_len: int = 10, dropout: float = 0.1, heads: int = 2,
                 diffuser: str = "mlp1", p_uncond: float = 0.1, detach_target: bool = False, lamda: float = 0.4,
                 gamma: float = 5.0, reconstruction: str = "cosine", pairing: str = "batch",
                 negatives: Optional[int] = None):
        super().__init__(n_items, hidden=hidden, max_len=max_len, dropout=dropout, heads=heads, diffuser=diffuser,
                         p_uncond=p_uncond, detach_target=detach_target)
        check_loss_settings(lamda, gamma, reconstruction, pairing, negatives)
        self.lamda, self.gamma = float(lamda), float(gamma)
        self.reconstruction, self.pairing = reconstruction, pairing
        self.negatives = None if negatives is None else int(negatives)
        for lin in (self.q, self.k, self.v):  # TransformerEncoder._reset_parameters
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def config(self) -> dict:
        return {**super().config(), "lamda": self.lamda, "gamma": self.gamma, "reconstruction": self.reconstruction,
                "pairing": self.pairing, "negatives": self.negatives}

    def encode(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) ids, (B,) lengths -> (B, D) guidance h: PreferDiff's block at the last real position."""
        seq, real = self._embed(history)  # emb_dropout(items + positions), then TransformerEncoder's seq * mask
        q_in = self.ln_1(seq)
        seq = seq + (self._attend(q_in, seq, real) + q_in)  # MultiHeadAttention adds its queries; the block adds seq
        seq = seq + self._feed_forward(self.ln_2(seq)) * real
        return self._at_last(self.ln_3(seq), lengths)


def check_loss_settings(lamda, gamma, reconstruction, pairing, negatives) -> None:
    """ValueError naming the first PreferDiff loss setting out of range."""
    import math

    for name, v in (("lamda", lamda), ("gamma", gamma)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not 0 <= lamda <= 1:
        raise ValueError(f"lamda (the reconstruction term's weight) must be in [0, 1], got {lamda}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if negatives is not None and (isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 1):
        raise ValueError(f"negatives must be None (every other target of the batch) or a positive integer, "
                         f"got {negatives!r}")


__all__ = ["PreferDiff", "RECONSTRUCTIONS", "PAIRINGS", "check_loss_settings"]
