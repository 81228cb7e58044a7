"""A CF-Diff style denoiser (Hou et al., SIGIR 2024): the user's row attends to its multi-hop context.

Besides the noisy row x_t, the network sees two signals of the user's
neighbourhood in the user-item graph, built from the training interactions
with ``refit_kernels.gather_rows`` (no dense users x items matrix):

* 2-hop: for each of the user's items, how many users interacted with it
  (the users reached through the user's items), as a fraction of all users;
  zero elsewhere.
* 3-hop: the items of the top-N users who share the most items with this
  user, weighted by how many items they share (a weighted average of their
  rows: one segmented, weighted ``gather_rows``).

Each of the three rows is encoded by one shared linear layer together with
the time embedding and split into tokens. Cross-attention takes its queries
from the hop encodings and its keys and values from the user's own encoding;
the attended tokens are mixed back into the user's tokens (residual), passed
through a token-wise layer, and projected back to all items.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import nn

import refit_kernels as rk

from ...limits import check_memory
from ...similarity import top_similar_users
from .mlp import _xavier_normal_, timestep_embedding


class HopInputs(NamedTuple):
    """(B, I) float32 2-hop and 3-hop signals of a batch of users."""

    two_hop: torch.Tensor
    three_hop: torch.Tensor


class ProjectedHops(NamedTuple):
    """(B, n_tokens * d_model) hop signals through the row part of the shared encoder (no bias)."""

    two_hop: torch.Tensor
    three_hop: torch.Tensor


class HopGraph:
    """What the hop signals need from the training interactions, computed once.

    Args:
        train: (n_users, n_items) CSR training interactions (any form
            ``refit_kernels.as_csr`` takes).
        top_n: co-users kept per user for the 3-hop signal.
    """

    def __init__(self, train: Any, top_n: int = 50):
        csr = rk.as_csr(train, "train")
        if csr.n_cols is None:
            raise ValueError("train: pass a matrix that knows its column count (scipy or torch sparse)")
        self.csr = rk.CSR(csr.indptr, csr.indices, None, csr.n_cols)  # 0/1 interactions
        self.n_users, self.n_items = csr.n_rows, int(csr.n_cols)
        degree = torch.bincount(csr.indices, minlength=self.n_items).to(torch.float32)
        self.item_popularity = degree / max(1, self.n_users)
        ids, shared = top_similar_users(self.csr, m=top_n, measure="overlap", return_similarity=True)
        valid = ids >= 0
        weights = torch.where(valid, shared, torch.zeros_like(shared))
        total = weights.sum(1, keepdim=True)
        self.co_users = ids
        self.co_weights = (weights / torch.where(total > 0, total, torch.ones_like(total))).to(torch.float32)

    def inputs(self, users: torch.Tensor, rows: torch.Tensor) -> HopInputs:
        """Hop signals of ``users`` ((B,) int64) whose interaction rows are ``rows`` ((B, I))."""
        users_cpu = users.cpu()
        two_hop = (rows > 0).to(torch.float32) * self.item_popularity.to(rows.device)
        ids = self.co_users[users_cpu]
        valid = ids >= 0
        counts = valid.sum(1)
        segments = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
        three_hop = rk.gather_rows(self.csr, ids[valid], segments=segments,
                                   weights=self.co_weights[users_cpu][valid])
        return HopInputs(two_hop, three_hop.to(rows.device))


class CFDiff(nn.Module):
    """Cross-attention denoiser over a user's row and its 2-hop and 3-hop context.

    Args:
        n_items: I.
        n_tokens, d_model: the shared encoding has n_tokens * d_model units,
            read as n_tokens tokens of width d_model.
        n_heads: attention heads (must divide d_model).
        emb_size: width of the sinusoidal time embedding.
        dropout: input dropout on the row (DiffRec's 0.5).
        top_n: co-users of the 3-hop signal (used by :class:`HopGraph`).
    """

    def __init__(self, n_items: int, n_tokens: int = 16, d_model: int = 32, n_heads: int = 4,
                 emb_size: int = 10, dropout: float = 0.5, top_n: int = 50):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model})")
        for name, v in (("n_items", n_items), ("n_tokens", n_tokens), ("d_model", d_model),
                        ("emb_size", emb_size), ("top_n", top_n)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0 <= dropout < 1:  # also refuses NaN
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.n_items, self.n_tokens, self.d_model = n_items, n_tokens, d_model
        self.n_heads, self.emb_size, self.top_n = n_heads, emb_size, top_n
        width = n_tokens * d_model
        # the encoder and the decoder dominate: (n_items + emb_size) x width and width x n_items
        check_memory(f"n_tokens {n_tokens} x d_model {d_model} over {n_items} items",
                     ((n_items + emb_size + 1) * width + (width + 1) * n_items + 4 * d_model * d_model
                      + emb_size * (emb_size + 1)) * 4,
                     "CF-Diff's weights (float32)")
        self.emb_layer = nn.Linear(emb_size, emb_size)
        self.encoder = nn.Linear(n_items + emb_size, width)  # shared by the row and both hops
        self.attention = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.token_layer = nn.Linear(d_model, d_model)
        self.decoder = nn.Linear(width, n_items)
        self.drop = nn.Dropout(dropout)
        for layer in (self.emb_layer, self.encoder, self.token_layer, self.decoder):
            _xavier_normal_(layer)
        self.graph: Optional[HopGraph] = None

    def config(self) -> dict:
        return {"n_items": self.n_items, "n_tokens": self.n_tokens, "d_model": self.d_model,
                "n_heads": self.n_heads, "emb_size": self.emb_size, "dropout": self.drop.p,
                "top_n": self.top_n}

    def attach(self, train: Any) -> "CFDiff":
        """Builds the hop tables from the training interactions (needed before use)."""
        self.graph = HopGraph(train, self.top_n)
        if self.graph.n_items != self.n_items:
            raise ValueError(f"train has {self.graph.n_items} items, the model {self.n_items}")
        return self

    def condition(self, users: torch.Tensor, rows: torch.Tensor) -> HopInputs:
        """The hop inputs of a batch: users (B,) int64 and their interaction rows (B, I)."""
        if self.graph is None:
            raise RuntimeError("CFDiff needs its training graph: call model.attach(train) first")
        return self.graph.inputs(users, rows)

    def _tokens(self, row: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.encoder(torch.cat([row, emb], dim=-1))
        return h.view(h.shape[0], self.n_tokens, self.d_model)

    def _hidden(self, user: torch.Tensor, emb: torch.Tensor, cond, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, n_tokens * d_model): the decoder's input, from the user's tokens and the hops.

        With :class:`ProjectedHops`, ``base`` is the time embedding's part of the
        shared encoder (bias included), which the caller has already computed.
        """
        dtype = user.dtype
        if isinstance(cond, ProjectedHops):  # the item-wide product was taken once per pass
            B = user.shape[0]
            hops = torch.cat([(cond.two_hop.to(dtype) + base).view(B, self.n_tokens, self.d_model),
                              (cond.three_hop.to(dtype) + base).view(B, self.n_tokens, self.d_model)], dim=1)
        else:
            hops = torch.cat([self._tokens(cond.two_hop.to(dtype), emb),
                              self._tokens(cond.three_hop.to(dtype), emb)], dim=1)
        attended, _ = self.attention(hops, user, user, need_weights=False)
        T = self.n_tokens
        h = user + attended[:, :T] + attended[:, T:]  # each hop token updates its user token
        h = torch.tanh(self.token_layer(torch.tanh(h)))
        return h.reshape(h.shape[0], -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: HopInputs) -> torch.Tensor:
        """(B, I) states, (B,) timesteps and the batch's hop inputs -> (B, I) predictions."""
        emb = self.emb_layer(timestep_embedding(t, self.emb_size).to(x.dtype))
        return self.decoder(self._hidden(self._tokens(self.drop(x), emb), emb, cond))

    # --- the noise-free reverse pass in the hidden space (see refit.diffusion.reverse_in_latent) ---

    def latent_parts(self):
        """(W_x, W_out, b_out): the row's part of the shared encoder, and the decoder (both linear in it)."""
        return self.encoder.weight[:, : self.n_items], self.decoder.weight, self.decoder.bias

    def project_condition(self, cond: HopInputs) -> ProjectedHops:
        """The hops through the row part of the shared encoder, ``W_x @ hop`` ((B, width) each).

        The hop signals do not change during a reverse pass, so the hidden-space
        pass takes these item-wide products once instead of at every step.
        """
        W_x = self.encoder.weight[:, : self.n_items]
        return ProjectedHops(nn.functional.linear(cond.two_hop.to(W_x.dtype), W_x),
                             nn.functional.linear(cond.three_hop.to(W_x.dtype), W_x))

    def hidden_from_projection(self, v: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The decoder's input, given ``v = W_x @ x`` (B, width) instead of the row x (eval mode).

        ``cond`` is the batch's :class:`HopInputs` or, cheaper, their :meth:`project_condition`.
        """
        emb = self.emb_layer(timestep_embedding(t, self.emb_size).to(v.dtype))
        base = nn.functional.linear(emb, self.encoder.weight[:, self.n_items:], self.encoder.bias)
        user = (v + base).view(v.shape[0], self.n_tokens, self.d_model)
        return self._hidden(user, emb, cond, base)
