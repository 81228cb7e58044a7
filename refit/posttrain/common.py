"""What the post-training methods share: rows of an iteration, the controls' shuffles, the reward
baseline, and the weights and losses of the methods (re-exported by :mod:`refit.trainer`)."""

from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch

import refit_kernels as rk

from ..diffusion import Trajectory
from ..reward import Episode, select_episode


def group_weights(reward: torch.Tensor, group_size: int, lam: float) -> torch.Tensor:
    """(B,) self-normalised exponential weights: ``softmax(reward / lam)`` within each run of
    ``group_size`` consecutive rows (one user's group), so every group's weights sum to 1.

    ``reward`` is (B,) with B a multiple of ``group_size``; float64 inside, float32 out.
    """
    if reward.numel() % group_size:
        raise ValueError(f"{reward.numel()} rewards do not split into groups of {group_size}")
    g = reward.detach().double().view(-1, group_size) / lam
    return torch.softmax(g, dim=1).reshape(-1).float()


def rating_weights(present: torch.Tensor, ratings: torch.Tensor, lam: float) -> torch.Tensor:
    """(B, I) weights of offline reward-weighted fine-tuning for each item's error in a user's row.

    ``present`` (B, I) marks the logged interactions (nonzero) and ``ratings`` (B, I) holds their
    ratings. A user's n logged items get ``n * softmax(rating / lam)`` over those items (the
    self-normalised exp(rating / lam), scaled so they average 1, as in plain pretraining); every
    other item keeps weight 1. ``lam -> inf`` is plain pretraining. float64 inside, float32 out.
    """
    if present.shape != ratings.shape or present.dim() != 2:
        raise ValueError(f"present and ratings must be (B, I) alike, got {tuple(present.shape)} and "
                         f"{tuple(ratings.shape)}")
    mask = present != 0
    z = torch.where(mask, ratings.detach().double() / lam, torch.full_like(ratings, -math.inf, dtype=torch.float64))
    n = mask.sum(1, keepdim=True)
    soft = torch.softmax(z, dim=1).nan_to_num(0.0)  # a user without logged items: no weights to share
    return torch.where(mask, soft * n, torch.ones_like(soft)).float()


def reinforce_loss(adv: torch.Tensor, logp: torch.Tensor, mean=torch.mean) -> torch.Tensor:
    """REINFORCE's surrogate loss ``-mean_b(adv[b] * logp[b])``: (B,) advantages (no gradient) and
    (B,) trajectory log-likelihoods (with gradient) -> scalar whose gradient estimates -grad E[reward].

    ``mean`` takes the mean over the batch (under torchrun: this rank's share of the global mean).
    """
    return -mean(adv.detach() * logp)


def trajectory_logprob(policy, users: torch.Tensor, inputs, traj: Trajectory, *,
                       reduction: str = "mean", per_step: bool = False) -> torch.Tensor:
    """Log-likelihood of sampled trajectories under the current weights, with gradient.

    The policy re-evaluates its denoiser along the trajectory
    (``policy.outputs``: all stochastic steps in one batched forward pass)
    and ``gaussian_logprob`` scores them: (B,) or, with ``per_step``, (S, B).
    ``reduction="mean"`` divides by the state's dimension (items, or the
    embedding width).
    """
    S, B = traj.preds.shape[:2]
    if S == 0:
        return traj.final.new_zeros((S, B) if per_step else (B,))
    preds = policy.outputs(users, inputs, traj)
    return rk.gaussian_logprob(preds, traj.states, traj.coef_pred, traj.coef_x, traj.log_var,
                               reduction=reduction, per_step=per_step)


def shuffle_within_rows(values: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``values`` with each row's masked entries permuted among themselves (the others untouched)."""
    out = values.clone()
    for b in range(values.shape[0]):
        idx = torch.nonzero(mask[b]).flatten()
        out[b, idx] = values[b, idx[torch.randperm(idx.numel(), generator=generator)]]
    return out


def shuffle_within_groups(values: torch.Tensor, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """(B,) ``values`` with each run of ``group_size`` consecutive entries permuted among themselves
    (a uniform random permutation per group, from ``generator``)."""
    g = values.view(-1, group_size)
    order = torch.rand(g.shape, generator=generator).argsort(dim=1).to(values.device)
    return g.gather(1, order).reshape(-1)


class Rows(NamedTuple):
    """Some rows of an iteration's episode (inputs on the policy's device) and their trajectories."""

    episode: Episode
    traj: Trajectory


def select_rows(episode: Episode, traj: Trajectory, rows: torch.Tensor) -> Tuple[Episode, Trajectory]:
    """Rows ``rows`` ((n,) int64, CPU) of an episode and of its (S+1, B, D) trajectory."""
    if rows.numel() == episode.users.numel() and bool((rows == torch.arange(rows.numel())).all()):
        return episode, traj
    r = rows.to(traj.states.device)
    return (select_episode(episode, rows),
            traj._replace(states=traj.states[:, r], preds=traj.preds[:, r], final=traj.final[r]))


class Baseline:
    """The reward baseline: batch mean (optionally / batch std), an exponential moving
    average, or the mean of the user's own group of trajectories (divided by its std)."""

    def __init__(self, kind: str, decay: float = 0.9, group_size: int = 1):
        self.kind, self.decay, self.ema, self.group_size = kind, decay, None, group_size

    def advantage(self, reward: torch.Tensor) -> torch.Tensor:
        if self.kind == "group":  # rows come as group_size consecutive samples per user
            g = reward.view(-1, self.group_size)
            adv = (g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-6)
            return adv.reshape(-1)
        if self.kind == "ema":
            batch_mean = float(reward.mean())
            base = batch_mean if self.ema is None else self.ema
            self.ema = batch_mean if self.ema is None else self.decay * self.ema + (1 - self.decay) * batch_mean
            return reward - base
        adv = reward - reward.mean()
        if self.kind == "mean-std":
            adv = adv / (reward.std(unbiased=False) + 1e-8)
        return adv

    def state(self):
        return {"ema": self.ema}

    def load(self, state):
        self.ema = state.get("ema")
