"""SASRec: self-attentive sequential recommendation (Kang and McAuley, ICDM 2018).

The network is RecBole 1.2's ``SASRec`` layer for layer, so that the two can
be compared weight for weight (:meth:`SASRec.from_recbole_state_dict`):

* the input of window slot j is ``LayerNorm(E[token_j] + P[position_j])``
  followed by dropout, where E holds the item embeddings (tied with the output
  layer) and P the learned positional embeddings;
* ``n_blocks`` post-LN transformer layers, each ``x = LN(x + drop(W_o attn(x)))``
  then ``x = LN(x + drop(W_2 act(W_1 x)))``, with causal self-attention
  (a slot attends to itself and to the earlier non-padding slots), GELU
  (erf form), LayerNorm eps 1e-12 and dropout on the attention probabilities;
* the score of item i after a window is the inner product of the window's
  last hidden state with E[i], and training minimises the full softmax
  cross-entropy over all items (RecBole's ``loss_type = "CE"``).

Token ids: items are ``0 .. n_items - 1``, ``n_items`` is the padding id (the
id :mod:`refit.data.sequences` pads its windows with) and, with ``start_token``,
``n_items + 1`` is a learned start-of-sequence token. Windows are
left-padded: the newest token sits in the last slot.

Positions count from the oldest non-padding token of the window (0, 1, ...),
as in RecBole, not from the window's first slot as in the paper's code. With
this convention and causal attention, the hidden state at slot j of one pass
over a sequence equals the last hidden state of the prefix ending at j fed on
its own, so training every position of a sequence in one pass (the paper's
training) optimises exactly RecBole's per-prefix objective as long as the
sequence fits in the window (see :meth:`SASRec.loss`).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # label of a slot that predicts nothing (F.cross_entropy's default ignore_index)

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # the erf form, as RecBole's FeedForward.gelu
    "relu": F.relu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


class SASRecBlock(nn.Module):
    """One post-LN transformer layer: multi-head causal self-attention, then a point-wise feed-forward net."""

    def __init__(self, hidden: int, n_heads: int, inner: int, dropout: float, attn_dropout: float,
                 layer_norm_eps: float, act: str):
        super().__init__()
        self.n_heads, self.attn_dropout = n_heads, attn_dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.ffn_in = nn.Linear(hidden, inner)
        self.ffn_out = nn.Linear(inner, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.drop = nn.Dropout(dropout)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """One layer.

        Args:
            x: (B, L, H) float input states.
            mask: (B, 1, L, L) float additive attention mask (0 where a slot may attend, -inf elsewhere).
            last_only: compute the output of the last slot only (its keys and values still come from
                every slot): what scoring needs from the last layer.

        Returns:
            (B, L, H), or (B, 1, H) with ``last_only``.
        """
        B, L, H = x.shape
        heads = lambda t: t.view(B, t.shape[1], self.n_heads, H // self.n_heads).transpose(1, 2)  # noqa: E731
        q_in = x[:, -1:] if last_only else x
        if last_only:
            mask = mask[:, :, -1:]
        a = F.scaled_dot_product_attention(heads(self.query(q_in)), heads(self.key(x)), heads(self.value(x)),
                                           attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0)
        x = self.attn_norm(q_in + self.drop(self.dense(a.transpose(1, 2).reshape(B, q_in.shape[1], H))))
        return self.ffn_norm(x + self.drop(self.ffn_out(self.act(self.ffn_in(x)))))


class SASRec(nn.Module):
    """SASRec over ``n_items`` items with windows of ``max_len`` tokens.

    Args:
        n_items: number of items (ids ``0 .. n_items - 1``).
        max_len: window length; longer inputs keep their last ``max_len`` tokens.
        hidden: embedding and hidden size (``hidden_size``).
        n_blocks: transformer layers (``n_layers``).
        n_heads: attention heads; must divide ``hidden``.
        inner: feed-forward width (``inner_size``; default ``4 * hidden``, RecBole's 256 for 64).
        dropout: dropout of the embeddings and of both sub-layers' outputs (``hidden_dropout_prob``).
        attn_dropout: dropout of the attention probabilities (``attn_dropout_prob``; default ``dropout``).
        start_token: prepend a learned start token to every sequence, so that a target with an
            empty history (the first item of a session) is predicted from it; without it such a
            target gets the scores of an all-padding window, which training never shapes.
        padding_class: count the padding id as one more class of the training softmax, as
            RecBole does (its padding id 0 is a row of its item table); it is never a target and
            never ranked, so it only adds a negative. Off by default.
        layer_norm_eps, initializer_range, hidden_act: as RecBole's (1e-12, 0.02, "gelu").
    """

    def __init__(self, n_items: int, max_len: int = 50, hidden: int = 64, n_blocks: int = 2, n_heads: int = 1,
                 inner: Optional[int] = None, dropout: float = 0.2, attn_dropout: Optional[float] = None,
                 start_token: bool = False, padding_class: bool = False, layer_norm_eps: float = 1e-12,
                 initializer_range: float = 0.02, hidden_act: str = "gelu"):
        super().__init__()
        if n_items < 1 or max_len < 1 or hidden < 1 or n_blocks < 0 or n_heads < 1:
            raise ValueError(f"need n_items, max_len, hidden, n_heads >= 1 and n_blocks >= 0; got {n_items}, "
                             f"{max_len}, {hidden}, {n_heads}, {n_blocks}")
        if hidden % n_heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of n_heads ({n_heads})")
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {', '.join(_ACTIVATIONS)}, got {hidden_act!r}")
        inner = 4 * hidden if inner is None else int(inner)
        attn_dropout = dropout if attn_dropout is None else float(attn_dropout)
        for name, p in (("dropout", dropout), ("attn_dropout", attn_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        self.n_items, self.max_len, self.hidden = n_items, max_len, hidden
        self.n_blocks, self.n_heads = n_blocks, n_heads
        self.inner, self.dropout_p, self.attn_dropout_p = inner, float(dropout), attn_dropout
        self.start_token, self.padding_class = bool(start_token), bool(padding_class)
        self.layer_norm_eps, self.initializer_range, self.hidden_act = layer_norm_eps, initializer_range, hidden_act
        self.pad = n_items
        self.start = n_items + 1 if start_token else None
        self.item_embedding = nn.Embedding(n_items + 1 + int(start_token), hidden, padding_idx=self.pad)
        self.position_embedding = nn.Embedding(max_len, hidden)
        self.input_norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.input_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(hidden, n_heads, inner, dropout, attn_dropout, layer_norm_eps,
                                                hidden_act) for _ in range(n_blocks))
        self.reset_parameters()

    def config(self) -> Dict[str, object]:
        """The constructor arguments (``SASRec(**model.config())`` rebuilds the architecture)."""
        return {"n_items": self.n_items, "max_len": self.max_len, "hidden": self.hidden, "n_blocks": self.n_blocks,
                "n_heads": self.n_heads, "inner": self.inner, "dropout": self.dropout_p,
                "attn_dropout": self.attn_dropout_p, "start_token": self.start_token,
                "padding_class": self.padding_class, "layer_norm_eps": self.layer_norm_eps,
                "initializer_range": self.initializer_range, "hidden_act": self.hidden_act}

    def reset_parameters(self) -> None:
        """RecBole's initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, self.initializer_range)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():  # the padding row only ever feeds masked slots; keep it at nn.Embedding's zero
            self.item_embedding.weight[self.pad].zero_()

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Hidden states of every slot (or of the last one).

        Args:
            tokens: (B, L) int64 token ids, padding ``n_items``; L <= ``max_len`` (longer windows keep
                their last ``max_len`` slots). Padding may sit anywhere: it is masked out of the
                attention and positions count the non-padding tokens, so left and right padding give
                the same states at the non-padding slots.
            last_only: return the last slot's state only, skipping the other slots of the last layer.

        Returns:
            (B, L, hidden) float32, or (B, hidden) with ``last_only``; a padding slot's state is
            meaningless.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, L), got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.max_len:
            tokens = tokens[:, -self.max_len:]
        real = tokens != self.pad
        positions = (real.cumsum(1) - 1).clamp(min=0)
        x = self.input_drop(self.input_norm(self.item_embedding(tokens) + self.position_embedding(positions)))
        L = tokens.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=tokens.device).tril()
        # A padding query attends to itself only: a row with nothing to attend to would be NaN.
        allowed = (causal & real[:, None, :]) | torch.eye(L, dtype=torch.bool, device=tokens.device)
        # One additive float mask for every layer (a bool mask is converted inside each attention call).
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, float("-inf"))
        mask = mask[:, None]  # (B, 1, L, L), broadcast over heads
        for i, block in enumerate(self.blocks):
            x = block(x, mask, last_only=last_only and i == len(self.blocks) - 1)
        return x[:, -1] if last_only else x

    def item_weights(self, with_padding: bool = False) -> torch.Tensor:
        """(n_items [+ 1], hidden) the output-layer rows: the item embeddings (and the padding row)."""
        return self.item_embedding.weight[: self.n_items + int(with_padding)]

    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 left-padded windows -> (B, n_items) float32 scores of the next item after each."""
        return self.forward(tokens, last_only=True) @ self.item_weights().t()

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Full-softmax cross-entropy of every labelled slot's next item, from one causal pass.

        Args:
            tokens: (B, L) int64 windows (as :meth:`forward`).
            labels: (B, L) int64; ``labels[b, j]`` is the item that follows slot j (the target the
                state at slot j predicts) or ``IGNORE`` (-100) for a slot that predicts nothing.
            reduction: "mean" over the labelled slots (RecBole's mean over a batch of prefixes) or "sum".

        Returns:
            () float32. Only labelled slots reach the (M, n_items) logits, so padding costs no softmax.
        """
        if labels.shape != tokens.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of tokens {tuple(tokens.shape)}")
        if tokens.shape[1] > self.max_len:
            tokens, labels = tokens[:, -self.max_len:], labels[:, -self.max_len:]
        keep = labels != IGNORE
        h = self.forward(tokens)[keep]  # (M, hidden)
        logits = h @ self.item_weights(self.padding_class).t()
        return F.cross_entropy(logits, labels[keep], reduction=reduction)

    # --- RecBole -----------------------------------------------------------------------------------

    @classmethod
    def from_recbole_state_dict(cls, state_dict: Dict[str, torch.Tensor], *, n_heads: int,
                                hidden_act: str = "gelu", layer_norm_eps: float = 1e-12,
                                dropout: float = 0.0, attn_dropout: Optional[float] = None,
                                padding_class: bool = True) -> "SASRec":
        """A model holding the weights of a RecBole 1.2 ``SASRec`` (its ``state_dict()``).

        RecBole's item id ``j >= 1`` (its internal, re-indexed id) becomes item ``j - 1`` here and its
        padding row 0 becomes the padding row ``n_items``; sizes come from the tensors. The number
        of heads and the activation are not in a state dict and must be given. ``padding_class``
        defaults to True so that :meth:`loss` is RecBole's loss exactly.
        """
        sd = {k: v.detach().clone().float() for k, v in state_dict.items()}
        emb = sd["item_embedding.weight"]
        n_items, hidden = emb.shape[0] - 1, emb.shape[1]
        n_blocks = len({k.split(".")[2] for k in sd if k.startswith("trm_encoder.layer.")})
        inner = sd["trm_encoder.layer.0.feed_forward.dense_1.weight"].shape[0] if n_blocks else 4 * hidden
        model = cls(n_items, max_len=sd["position_embedding.weight"].shape[0], hidden=hidden, n_blocks=n_blocks,
                    n_heads=n_heads, inner=inner, dropout=dropout, attn_dropout=attn_dropout,
                    padding_class=padding_class, layer_norm_eps=layer_norm_eps, hidden_act=hidden_act)
        ours = {"item_embedding.weight": torch.cat([emb[1:], emb[:1]]),
                "position_embedding.weight": sd["position_embedding.weight"],
                "input_norm.weight": sd["LayerNorm.weight"], "input_norm.bias": sd["LayerNorm.bias"]}
        names = {"multi_head_attention.query": "query", "multi_head_attention.key": "key",
                 "multi_head_attention.value": "value", "multi_head_attention.dense": "dense",
                 "multi_head_attention.LayerNorm": "attn_norm", "feed_forward.dense_1": "ffn_in",
                 "feed_forward.dense_2": "ffn_out", "feed_forward.LayerNorm": "ffn_norm"}
        for i in range(n_blocks):
            for theirs, mine in names.items():
                for p in ("weight", "bias"):
                    ours[f"blocks.{i}.{mine}.{p}"] = sd[f"trm_encoder.layer.{i}.{theirs}.{p}"]
        model.load_state_dict(ours)
        return model


def left_pad(history: torch.Tensor, lengths: torch.Tensor, pad: int, length: int,
             start: Optional[int] = None) -> torch.Tensor:
    """Right-padded history windows (:meth:`refit.data.sequences.SequenceData.windows`) -> left-padded SASRec input.

    Args:
        history: (B, Lh) int64, each row's items oldest first in its first ``lengths[b]`` slots.
        lengths: (B,) int64 number of items of each row (clamped to Lh).
        pad: the padding id. length: L, the output width.
        start: the start token id, or None. It goes before the first item of a row whose window
            is not full (``lengths[b] < Lh``: the row holds the whole history); a full row may be
            truncated, so it gets none (were it a whole history of exactly Lh items, L = Lh
            leaves no room for it anyway, as in training).

    Returns:
        (B, L) int64: the last L tokens of ``[start] + history[b, :lengths[b]]``, right-aligned,
        padded on the left with ``pad``.
    """
    B, Lh = history.shape
    n = lengths.to(torch.int64).clamp(0, Lh)
    has_start = (n < Lh).to(torch.int64) if start is not None else torch.zeros_like(n)
    m = n + has_start  # tokens of each row before truncation to L
    i = torch.arange(length, device=history.device)[None, :] - (length - m)[:, None]  # index into the row's tokens
    item = torch.gather(history, 1, (i - has_start[:, None]).clamp(0, max(Lh - 1, 0))) if Lh else \
        torch.full((B, length), pad, dtype=torch.int64, device=history.device)
    out = torch.where(i >= 0, item, torch.full_like(item, pad))
    if start is not None:
        out = torch.where((i == 0) & (has_start[:, None] == 1), torch.full_like(out, start), out)
    return out


__all__ = ["IGNORE", "SASRec", "SASRecBlock", "left_pad"]
