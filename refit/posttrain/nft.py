"""Negative-aware fine-tuning (DiffusionNFT): reward-weighted regression on the forward process, with an
implicit negative and no likelihood.

Each iteration:

1. An *old* policy (a copy of the policy, moved toward it after every update by an exponential moving
   average with decay ``nft_ema``) samples G final states per episode with the run's sampler
   (``rl_steps``, ``rl_noise``, ``temperature``), and the run's reward judges them.
2. The rewards become optimality weights ``r`` in [0, 1]: centred within each episode's group
   (``nft_normalize="group"``) or over the batch (``"batch"``), divided by the standard deviation of the
   centred values over the batch, clipped to ``±nft_adv_clip`` and mapped to ``clip / nft_adv_clip / 2 +
   0.5``. A group whose samples all score alike gets ``r = 0.5``.
3. Each final state ``x0`` is noised by the model's own forward process at ``nft_timesteps`` timesteps
   (one per equal stratum of the schedule, drawn anew each iteration, shared by the batch), and the
   current and the old policy predict from it (``policy.outputs``: the denoiser's output in its own
   parameterisation, x0 or noise). With ``v`` the current prediction and ``v_old`` the old one, the
   positive policy is ``β v + (1 - β) v_old`` and the implicit negative ``(1 + β) v_old - β v``; each
   regresses toward the sample's target (``x0``, or the noise for an eps model), and the loss is
   ``(r * e_pos + (1 - r) * e_neg) / β`` (see :func:`nft_loss`).

Expanded, the loss is ``β |v - v_old|^2 + 2 (2r - 1) (v - v_old) · (v_old - y)`` plus a constant: a
trust region around the old policy of strength β, and a signed regression toward the samples with
``r > 1/2`` and away from those with ``r < 1/2``. At ``v = v_old`` (and for β → 0) its gradient is that
of the old policy's own regression loss toward its samples, weighted by ``2r - 1``; samples judged
alike cancel, so training on the policy's own samples does not compound its biases as plain
self-training does.

The placebo permutes the optimality weights ``r`` across the batch (its own generator): the same
samples, the same weights in distribution, updates that no longer follow the reward.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Dict

import torch

from ..diffusion import Trajectory, _normal
from .base import PostTrainingMethod, register
from .common import Rows

NORMALIZE = ("group", "batch")


def nft_loss(pred: torch.Tensor, old: torch.Tensor, target: torch.Tensor, r: torch.Tensor, beta: float, *,
             adaptive: bool = True) -> torch.Tensor:
    """(B,) NFT's loss per row.

    ``pred`` (S, B, D) the current policy's outputs at S noised versions of each row's sample, with
    gradient; ``old`` (S, B, D) the old policy's outputs at the same inputs (no gradient); ``target``
    (S, B, D) what the outputs regress toward (the sample, or the noise drawn for an eps model); ``r``
    (B,) optimality weights in [0, 1]; ``beta`` > 0.

    With ``adaptive``, each (step, row)'s squared error is divided by its mean absolute error (a constant,
    floored at 1e-5), so rows and noise levels with large errors do not dominate. The result is the mean
    over S and D of ``(r * e_pos + (1 - r) * e_neg) / beta``.
    """
    old = old.detach()
    target = target.detach()
    pos = beta * pred + (1.0 - beta) * old
    neg = (1.0 + beta) * old - beta * pred
    err_pos, err_neg = pos - target, neg - target
    e_pos, e_neg = err_pos.pow(2), err_neg.pow(2)
    if adaptive:
        e_pos = e_pos / err_pos.detach().abs().mean(2, keepdim=True).clamp_min(1e-5)
        e_neg = e_neg / err_neg.detach().abs().mean(2, keepdim=True).clamp_min(1e-5)
    r = r.to(pred.dtype)[None, :]
    per = (r * e_pos.mean(2) + (1.0 - r) * e_neg.mean(2)) / beta
    return per.mean(0)


def optimality(reward: torch.Tensor, group_size: int, normalize: str, clip: float) -> torch.Tensor:
    """(B,) weights in [0, 1] of the (B,) rewards of the global batch (see the module docstring)."""
    r = reward.double()
    if normalize == "group":
        centred = (r.view(-1, group_size) - r.view(-1, group_size).mean(1, keepdim=True)).reshape(-1)
    else:
        centred = r - r.mean()
    std = centred.std(unbiased=False)
    adv = centred / std if float(std) > 1e-12 else torch.zeros_like(centred)
    return (adv.clamp(-clip, clip) / clip / 2 + 0.5).float()


@register
class NFT(PostTrainingMethod):
    name = "nft"

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.ppo_epochs or config.reuse_sampling_graph or config.explore_steps is not None \
                or config.timestep_fraction != 1.0:
            raise ValueError("nft uses no likelihood: ppo_epochs, reuse_sampling_graph, explore_steps and "
                             "timestep_fraction do not apply (nft_timesteps sets the noise levels it trains on)")
        if not config.nft_beta > 0:
            raise ValueError(f"nft_beta must be > 0, got {config.nft_beta}")
        if not 0.0 <= config.nft_ema < 1.0:
            raise ValueError(f"nft_ema (the old policy's moving-average decay) must be in [0, 1), got {config.nft_ema}")
        if isinstance(config.nft_timesteps, bool) or not isinstance(config.nft_timesteps, int) \
                or config.nft_timesteps < 1:
            raise ValueError(f"nft_timesteps must be an int >= 1, got {config.nft_timesteps!r}")
        if config.nft_normalize not in NORMALIZE:
            raise ValueError(f"nft_normalize must be one of {NORMALIZE}, got {config.nft_normalize!r}")
        if config.nft_normalize == "group" and config.group_size < 2:
            raise ValueError("nft_normalize='group' centres the rewards within each episode's group: "
                             "group_size must be >= 2 (or nft_normalize='batch')")
        if not config.nft_adv_clip > 0:
            raise ValueError(f"nft_adv_clip must be > 0, got {config.nft_adv_clip}")

    def check_policy(self, policy: Any) -> None:
        diffusion = getattr(policy, "diffusion", None)
        if diffusion is None or not callable(getattr(diffusion, "q_sample", None)) \
                or getattr(diffusion, "betas", None) is None:
            raise TypeError(f"nft needs {type(policy).__name__}.diffusion, a refit.diffusion.GaussianDiffusion with "
                            "a noise schedule: it noises the samples by the model's own forward process")
        T = diffusion.steps
        if self.trainer.config.nft_timesteps > T:
            raise ValueError(f"nft_timesteps is {self.trainer.config.nft_timesteps}, more than the {T} timesteps "
                             "of the model's schedule")

    def __init__(self, trainer: Any):
        super().__init__(trainer)
        # The sampling policy: frozen, moved toward the trained one after every update.
        self.old = copy.deepcopy(trainer.policy)
        self.old.module.eval()
        for p in self.old.module.parameters():
            p.requires_grad_(False)

    # --- the old policy ------------------------------------------------------------------------------

    @torch.no_grad()
    def _follow(self) -> None:
        """old <- nft_ema * old + (1 - nft_ema) * current, parameters and floating buffers alike."""
        decay = self.trainer.config.nft_ema
        now = self.trainer.policy.module.state_dict()
        for name, value in self.old.module.state_dict().items():
            src = now[name]
            if value.is_floating_point():
                value.mul_(decay).add_(src.detach().to(value.dtype), alpha=1.0 - decay)
            else:
                value.copy_(src)

    def state(self) -> Dict[str, Any]:
        return {"old": {k: v.detach().clone() for k, v in self.old.module.state_dict().items()}}

    def load(self, state: Dict[str, Any]) -> None:
        self.old.module.load_state_dict(state["old"])

    # --- one iteration -------------------------------------------------------------------------------

    def _noised(self, final: torch.Tensor, lo: int, n_global: int):
        """``(traj, target)``: a trajectory-shaped (S, B, D) set of noised samples at S stratified model
        timesteps (for ``policy.outputs``) and what the outputs regress toward."""
        tr = self.trainer
        d = tr.policy.diffusion
        S, T = tr.config.nft_timesteps, d.steps
        u = torch.rand(S, generator=tr.generator, dtype=torch.float64)
        t = ((torch.arange(S, dtype=torch.float64) + u) * T / S).floor().long().clamp_(0, T - 1)
        x0 = final.detach().float()
        rows = (lo, n_global) if tr.world > 1 else None
        states, targets = [], []
        for s in range(S):
            ts = torch.full((x0.shape[0],), int(t[s]), dtype=torch.long, device=x0.device)
            noise = _normal(x0.shape, x0.dtype, x0.device, tr.generator, rows)
            states.append(d.q_sample(x0, ts, noise))
            targets.append(noise if d.config.mean_type == "eps" else x0)
        zeros = torch.zeros(S, dtype=torch.float32, device=x0.device)
        model_t = d.model_timesteps(t.to(x0.device))
        traj = Trajectory(torch.stack(states + [x0]), torch.zeros(S, *x0.shape, device=x0.device), zeros, zeros,
                          zeros, model_t, x0)
        return traj, torch.stack(targets)

    def step(self) -> Dict[str, float]:
        tr = self.trainer
        cfg, policy = tr.config, tr.policy
        t0 = time.perf_counter()
        episode, lo, n_global = tr.draw()
        inputs, traj, reward = tr.rollout(episode, lo, n_global, policy=self.old)
        t_sample = time.perf_counter() - t0
        n_local = episode.users.numel()
        r_all = optimality(reward.reward, cfg.group_size, cfg.nft_normalize, cfg.nft_adv_clip)
        if tr.placebo_generator is not None:  # the control: the weights no longer belong to their samples
            r_all = r_all[torch.randperm(r_all.numel(), generator=tr.placebo_generator)]
        stats = tr._reward_stats(reward.reward)
        stats["kl"] = tr._kl_to_start(Rows(episode._replace(inputs=inputs), traj))  # of the sampling (old) policy
        noised, target = self._noised(traj.final, lo, n_global)
        policy.module.eval()
        with torch.no_grad():
            old_out = self.old.outputs(episode.users, inputs, noised)
        pred = policy.outputs(episode.users, inputs, noised)
        r = r_all[lo:lo + n_local].to(pred.device)
        per_row = nft_loss(pred, old_out, target, r, cfg.nft_beta)
        loss = tr._mean(per_row, n_global)
        loss, anchor = tr._add_anchor(loss, episode, inputs, traj, lo, n_global)
        grad_norm = tr._update(loss)
        self._follow()
        # How far the update has taken the policy from the one that sampled (NFT's own diagnostic).
        deviation = (pred.detach() - old_out).pow(2).mean(2).mean(0).double().cpu()
        if tr.world > 1:
            from ..runtime import distributed as dist

            deviation = dist.all_gather_rows(deviation)
        stats.update({
            "reward": float(reward.reward.mean()), "n_k": float(reward.n_k.mean()),
            "n_sim_k": float(reward.n_sim_k.mean()), "loss": tr._global_value(loss), "anchor": anchor,
            "grad_norm": grad_norm, "r_std": float(r_all.double().std(unbiased=False)),
            "old_deviation": float(deviation.mean()),
            "sample_s": round(t_sample, 4), "step_s": round(time.perf_counter() - t0, 4),
        })
        return stats

