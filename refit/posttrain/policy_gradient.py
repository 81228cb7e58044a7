"""The policy-gradient methods: REINFORCE (``reinforce``, ReFiT's own) and GRPO (``grpo``).

Both sample trajectories with the run's sampler, turn the rewards into advantages (the run's
``baseline``; GRPO: the z-scores within each episode's group, groups whose rewards all tie dropped and
counted), and ascend ``mean(adv * L)`` with ``L`` the exact log-likelihood of the trajectories' stochastic
steps, in one update or in PPO's clipped inner epochs over minibatches. Training every step, the
surrogate's value and gradient come from :func:`refit_kernels.policy_loss` in one pass over the
trajectory; a random share of the steps (``timestep_fraction``) goes through
:func:`refit_kernels.gaussian_logprob` and autograd. The placebo permutes the advantages among the kept
trajectories.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

import refit_kernels as rk

from ..runtime import distributed as dist
from .base import PostTrainingMethod, register
from .common import Rows, reinforce_loss, select_rows


@register
class Reinforce(PostTrainingMethod):
    """REINFORCE with the run's baseline (``mean``, ``mean-std``, ``ema`` or ``group``), optionally PPO."""

    name = "reinforce"

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.reuse_sampling_graph and config.timestep_fraction < 1.0:
            raise ValueError("reuse_sampling_graph takes every step's graph from the sampling pass: "
                             "timestep_fraction must be 1")
        if config.ppo_epochs and config.reuse_sampling_graph:
            raise ValueError("PPO re-evaluates the trajectories each inner epoch: reuse_sampling_graph must be off")

    def step(self) -> Dict[str, float]:
        return self._policy_gradient_step()

    def _keep(self, reward: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the trajectories that enter the loss (all of them)."""
        return torch.ones_like(reward, dtype=torch.bool)

    def _advantages(self, reward: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B,) advantages of the global batch's rewards and (B,) bool, the trajectories that enter the loss.

        GRPO drops the groups whose rewards are all equal (their advantages are 0: nothing to compare);
        every other method keeps every trajectory. The placebo permutes the advantages among the kept
        trajectories, so the update keeps its size and noise but no longer follows the reward."""
        tr = self.trainer
        adv = tr.baseline.advantage(reward)
        keep = self._keep(reward)
        if tr.placebo_generator is not None:
            idx = torch.nonzero(keep).flatten()
            adv = adv.clone()
            adv[idx] = adv[idx[torch.randperm(idx.numel(), generator=tr.placebo_generator)]]
        return adv, keep

    def _policy_gradient_step(self) -> Dict[str, float]:
        """REINFORCE / GRPO: the advantage-weighted log-likelihood of the batch's trajectories, over the
        steps chosen by ``timestep_fraction``, in one update or in PPO's clipped inner epochs over
        minibatches."""
        tr = self.trainer
        cfg, policy = tr.config, tr.policy
        t0, episode, lo, n_global, inputs, traj, reward, t_sample = tr._sampled()
        n_local = episode.users.numel()
        adv_all, keep_all = self._advantages(reward.reward)
        stats = tr._reward_stats(reward.reward, adv_all, keep_all)
        n_kept = int(keep_all.sum())
        adv = adv_all[lo:lo + n_local].to(policy.device)
        if tr.world == 1:  # dropped trajectories are not re-evaluated at all
            rows = torch.nonzero(keep_all).flatten() if n_kept < n_local else torch.arange(n_local)
            anchor_rows = (0, rows.numel())
        else:  # every rank runs its rows (the ranks update in step); dropped ones weigh 0 (advantage 0)
            rows = torch.arange(n_local)
            adv = adv * keep_all[lo:lo + n_local].to(adv)
            anchor_rows = (lo, n_global)
        sub = Rows(*select_rows(episode._replace(inputs=inputs), traj, rows))
        # The diagnostic over the kept trajectories, whatever the number of processes (under torchrun
        # ``sub`` also holds the dropped groups' rows, which weigh 0 in the update).
        kept_local = torch.nonzero(keep_all[lo:lo + n_local]).flatten()
        stats["kl"] = tr._kl_to_start(sub if tr.world == 1 else
                                        Rows(*select_rows(episode._replace(inputs=inputs), traj, kept_local)))
        steps = self._train_steps(traj.preds.shape[0])
        loss, anchor, grad_norm, clip_frac = torch.zeros(()), 0.0, 0.0, 0.0
        if n_kept:
            adv = adv[rows.to(adv.device)]
            if cfg.ppo_epochs == 0:
                loss, anchor, grad_norm = self._reinforce_update(sub, adv, steps, n_kept, anchor_rows)
            else:
                loss, anchor, grad_norm, clip_frac = self._ppo_updates(sub, adv, steps, n_kept, anchor_rows)
        stats.update({
            "reward": float(reward.reward.mean()), "n_k": float(reward.n_k.mean()),
            "n_sim_k": float(reward.n_sim_k.mean()), "loss": tr._global_value(loss), "anchor": anchor,
            "grad_norm": grad_norm, "ppo_clip_fraction": clip_frac, "trained_steps": len(steps),
            "sample_s": round(t_sample, 4), "step_s": round(time.perf_counter() - t0, 4),
        })
        return stats

    def _train_steps(self, S: int) -> List[int]:
        """The stochastic steps whose log-likelihood this update trains: all S, or a random
        ``timestep_fraction`` of them (at least one), in order."""
        tr = self.trainer
        f = tr.config.timestep_fraction
        if f >= 1.0 or S == 0:
            return list(range(S))
        n = max(1, int(round(f * S)))
        return sorted(torch.randperm(S, generator=tr.generator)[:n].tolist())

    def _preds(self, sub: "Rows", steps: List[int]) -> torch.Tensor:
        """(S, B, I) denoiser outputs along the rows ``sub`` under the current weights: the chosen steps
        with gradient (with ``reuse_sampling_graph``, from the sampling pass itself), the others as
        sampled (no gradient)."""
        tr = self.trainer
        cfg, traj = tr.config, sub.traj
        users, inputs = sub.episode.users, sub.episode.inputs
        if cfg.reuse_sampling_graph:
            return traj.preds
        if len(steps) == traj.preds.shape[0]:
            return tr.policy.outputs(users, inputs, traj)
        idx = torch.tensor(steps, dtype=torch.long, device=traj.preds.device)
        part = traj._replace(states=torch.cat([traj.states[idx], traj.states[-1:]]), preds=traj.preds[idx],
                             timesteps=traj.timesteps[idx])
        return traj.preds.detach().index_copy(0, idx, tr.policy.outputs(users, inputs, part))

    def _logprob(self, sub: "Rows", steps: List[int]) -> torch.Tensor:
        """(S', B) log-likelihood of each chosen step of the rows ``sub`` under the current weights, with
        gradient."""
        traj = sub.traj
        per_step = rk.gaussian_logprob(self._preds(sub, steps), traj.states, traj.coef_pred, traj.coef_x,
                                       traj.log_var, reduction=self.trainer.config.reduction, per_step=True)
        return per_step if len(steps) == traj.preds.shape[0] else per_step[steps]

    def _fused_loss(self, sub: "Rows", steps: List[int], adv: torch.Tensor, divisor: float, old=None):
        """:func:`refit_kernels.policy_loss` over every step of the rows ``sub``: the surrogate's value
        and gradient in one pass over the trajectory, and the (S, B) per-step log-likelihoods."""
        tr, traj = self.trainer, sub.traj
        return rk.policy_loss(self._preds(sub, steps), traj.states, traj.coef_pred, traj.coef_x, traj.log_var,
                              adv, old_logprob=old, clip=tr.config.ppo_clip, reduction=tr.config.reduction,
                              normalizer=divisor)

    def _reinforce_update(self, sub: "Rows", adv: torch.Tensor, steps: List[int], n_kept: int, anchor_rows):
        """One update on ``-mean(adv * L)`` over the kept trajectories (``n_kept`` in the global batch).

        Training every step (the default), the fused policy loss gives value and gradient in one pass;
        a random share of the steps (``timestep_fraction``) takes the log-likelihood of those steps."""
        tr = self.trainer
        if len(steps) == sub.traj.preds.shape[0]:
            loss = self._fused_loss(sub, steps, adv, tr._mean_divisor(adv.numel(), n_kept)).loss
        else:
            logp = self._logprob(sub, steps).sum(0)
            loss = reinforce_loss(adv, logp, mean=lambda x: tr._mean(x, n_kept))
        loss, anchor = tr._add_anchor(loss, sub.episode, sub.episode.inputs, sub.traj, *anchor_rows)
        return loss, anchor, tr._update(loss)

    def _ppo_updates(self, sub: "Rows", adv: torch.Tensor, steps: List[int], n_kept: int, anchor_rows):
        """PPO's clipped surrogate over ``ppo_epochs`` inner epochs, each over the kept trajectories in
        shuffled minibatches of ``minibatch_size`` (one update per minibatch); the ratios are per step
        against the sampling pass's log-likelihoods."""
        tr = self.trainer
        cfg, traj = tr.config, sub.traj
        B = sub.episode.users.numel()
        with torch.no_grad():
            old = rk.gaussian_logprob(traj.preds, traj.states, traj.coef_pred, traj.coef_x, traj.log_var,
                                      reduction=cfg.reduction, per_step=True)[steps]
        mb = min(cfg.minibatch_size or B, B)
        clipped_n, count, norms = 0.0, 0, []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=tr.generator) if mb < B else torch.arange(B)
            for a in range(0, B, mb):
                rows = order[a:a + mb]
                part = Rows(*select_rows(sub.episode, traj, rows)) if mb < B else sub
                old_mb = old[:, rows.to(old.device)]
                a_mb = adv[rows.to(adv.device)]
                # A minibatch's loss is its own mean, so each update has the size of a full-batch one.
                n_mb, rows_mb = (n_kept, anchor_rows) if mb >= B else (rows.numel(), (0, rows.numel()))
                fused = len(steps) == traj.preds.shape[0]  # every step: the fused loss, one pass
                if fused:
                    divisor = tr._mean_divisor(old_mb.numel(), n_mb * old_mb.shape[0])
                    loss, new = self._fused_loss(part, steps, a_mb, divisor, old=old_mb.contiguous())
                else:
                    new = self._logprob(part, steps)
                ratio = torch.exp(new - old_mb)
                if not fused:
                    clipped = torch.clamp(ratio, 1 - cfg.ppo_clip, 1 + cfg.ppo_clip)
                    loss = -tr._mean(torch.minimum(ratio * a_mb, clipped * a_mb), n_mb * new.shape[0])
                loss, anchor = tr._add_anchor(loss, part.episode, part.episode.inputs, part.traj, *rows_mb)
                norms.append(tr._update(loss))
                clipped_n += float(((ratio.detach() - 1).abs() > cfg.ppo_clip).double().sum())
                count += ratio.numel()
        if tr.world > 1:
            tot = dist.all_reduce_sum(torch.tensor([clipped_n, float(count)], dtype=torch.float64))
            clipped_n, count = float(tot[0]), float(tot[1])
        return loss, anchor, float(np.mean(norms)), clipped_n / max(count, 1)


@register
class GRPO(Reinforce):
    """REINFORCE with group advantages; the groups whose rewards all tie are dropped (and counted)."""

    name = "grpo"

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.group_size < 2:
            raise ValueError("grpo compares the trajectories of an episode: group_size must be >= 2")
        config.baseline = "group"  # GRPO's advantages are the group's, whatever the baseline default says
        super().check_config(config)

    def _keep(self, reward: torch.Tensor) -> torch.Tensor:
        g = reward.view(-1, self.trainer.config.group_size)
        return ((g.amax(1) - g.amin(1)) > 0).repeat_interleave(self.trainer.config.group_size)
