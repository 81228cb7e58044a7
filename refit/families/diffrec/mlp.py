"""DiffRec's MLP denoiser (Wang et al., SIGIR 2023)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ...limits import check_memory


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) float32 sinusoidal embedding [cos | sin] (zero-padded when dim is odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _xavier_normal_(layer: nn.Linear) -> None:
    fan_out, fan_in = layer.weight.shape
    with torch.no_grad():
        layer.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
        layer.bias.normal_(0.0, 0.001)


class DiffRecMLP(nn.Module):
    """The reverse-process network: (x_t, t) -> x0 (or eps) prediction over all items.

    The (B, I) input row goes through dropout, is concatenated with a linear
    map of the sinusoidal time embedding, then through tanh layers of widths
    ``reversed(dims)`` (the encoder) and ``dims[1:] + [I]`` (the decoder; no
    tanh after the last layer). ``dims=(200, 600)`` on ML-1M gives
    2810+10 -> 600 -> 200 -> 600 -> 2810.
    """

    def __init__(self, n_items: int, dims: Sequence[int] = (200, 600), emb_size: int = 10,
                 dropout: float = 0.5, norm: bool = False):
        super().__init__()
        dims = [int(d) for d in dims]
        if not dims or any(d < 1 for d in dims):
            raise ValueError(f"dims must be positive layer widths, got {dims}")
        if n_items < 1 or emb_size < 1:
            raise ValueError(f"n_items and emb_size must be positive, got {n_items}, {emb_size}")
        if not 0 <= dropout < 1:  # also refuses NaN
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.n_items, self.dims, self.emb_size, self.norm = n_items, dims, emb_size, norm
        out_dims = dims + [n_items]
        in_dims = [n_items + emb_size] + out_dims[::-1][1:]
        n_params = sum((a + 1) * b for dims_ in (in_dims, out_dims) for a, b in zip(dims_[:-1], dims_[1:]))
        n_params += (emb_size + 1) * emb_size  # the time embedding's layer
        check_memory(f"dims {dims}, emb_size {emb_size} over {n_items} items", n_params * 4,
                     "DiffRec's weights (float32)")
        self.emb_layer = nn.Linear(emb_size, emb_size)
        self.in_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(in_dims[:-1], in_dims[1:]))
        self.out_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(out_dims[:-1], out_dims[1:]))
        self.drop = nn.Dropout(dropout)
        for layer in [*self.in_layers, *self.out_layers, self.emb_layer]:
            _xavier_normal_(layer)

    def config(self) -> dict:
        return {"n_items": self.n_items, "dims": list(self.dims), "emb_size": self.emb_size,
                "dropout": self.drop.p, "norm": self.norm}

    # --- the noise-free reverse pass in the hidden space (see refit.diffusion.reverse_in_latent) ---

    def latent_parts(self):
        """(W_x, W_out, b_out): the input row's part of the first layer, and the last layer.

        The row enters the network only through ``W_x @ x`` and the output is
        ``W_out @ h + b_out``: both linear, which lets a noise-free reverse
        pass run in the hidden space (valid without input normalisation).
        """
        if self.norm:
            raise ValueError("the hidden-space reverse pass needs norm=False (normalisation is not linear)")
        first, last = self.in_layers[0], self.out_layers[-1]
        return first.weight[:, : self.n_items], last.weight, last.bias

    def hidden_from_projection(self, v: torch.Tensor, t: torch.Tensor, cond: None = None) -> torch.Tensor:
        """The input of the last layer, given ``v = W_x @ x`` (B, H) instead of the row x (eval mode)."""
        emb = self.emb_layer(timestep_embedding(t, self.emb_size).to(v.dtype))
        first = self.in_layers[0]
        h = torch.tanh(v + nn.functional.linear(emb, first.weight[:, self.n_items:], first.bias))
        for layer in self.in_layers[1:]:
            h = torch.tanh(layer(h))
        for layer in self.out_layers[:-1]:
            h = torch.tanh(layer(h))
        return h

    def condition(self, users: torch.Tensor, rows: torch.Tensor) -> None:
        """DiffRec's MLP is conditioned on nothing but its input row."""
        return None

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: None = None) -> torch.Tensor:
        """(B, I) states and (B,) int64 timesteps -> (B, I) predictions."""
        emb = self.emb_layer(timestep_embedding(t, self.emb_size).to(x.dtype))
        if self.norm:
            x = nn.functional.normalize(x)
        h = torch.cat([self.drop(x), emb], dim=-1)
        for layer in self.in_layers:
            h = torch.tanh(layer(h))
        for k, layer in enumerate(self.out_layers):
            h = layer(h)
            if k != len(self.out_layers) - 1:
                h = torch.tanh(h)
        return h
