"""The reward-weighted methods: on-policy (``reward-weighted``: the model's own denoising loss toward its
sampled final states, weighted by ``softmax(reward / rw_lambda)`` within each user's group) and offline
(``offline-reward-weighted``: no sampling, the pretraining loss on the logged rows with each logged
item's error weighted by ``softmax(rating / rw_lambda)`` over the user's items).
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Dict

import torch

import refit_kernels as rk

from ..runtime import distributed as dist
from .base import PostTrainingMethod, register
from .common import Rows, group_weights, rating_weights, shuffle_within_groups, shuffle_within_rows


@register
class RewardWeighted(PostTrainingMethod):
    name = "reward-weighted"

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.group_size < 2:
            raise ValueError("reward-weighted fine-tuning compares the trajectories of a user: group_size must "
                             "be >= 2")
        if not config.rw_lambda > 0:
            raise ValueError(f"rw_lambda must be > 0, got {config.rw_lambda}")
        if config.ppo_epochs or config.reuse_sampling_graph or config.timestep_fraction < 1.0:
            raise ValueError("ppo_epochs, reuse_sampling_graph and timestep_fraction belong to the policy "
                             "gradient, not to reward-weighted fine-tuning")

    def step(self) -> Dict[str, float]:
        """Reward-weighted fine-tuning: G trajectories per user, the model's own denoising loss toward each
        sampled final state, weighted by the self-normalised ``softmax(reward / rw_lambda)`` of the user's
        group (see :func:`group_weights`)."""
        tr = self.trainer
        cfg, policy = tr.config, tr.policy
        t0, episode, lo, n_global, inputs, traj, reward, t_sample = tr._sampled()
        users, n_local = episode.users, episode.users.numel()
        r = reward.reward
        if tr.placebo_generator is not None:
            # The control: rewards no longer belong to their trajectories. They are permuted within each
            # user's group, not across the batch: rewards spread about 14x more between users than within
            # a group, so a batch-wide shuffle would give peaked weights where the real run's are nearly
            # flat, and the two arms would differ in update size, not only in whether updates follow the reward.
            r = shuffle_within_groups(r, cfg.group_size, tr.placebo_generator)
        weights = group_weights(r, cfg.group_size, cfg.rw_lambda)
        stats = tr._reward_stats(reward.reward)
        stats["kl"] = tr._kl_to_start(Rows(episode._replace(inputs=inputs), traj))
        w = weights[lo:lo + n_local].to(policy.device)
        target = policy.training_target(users, inputs, traj.final, exclude=episode.exclude, k=cfg.k)
        policy.module.eval()
        per_row = policy.denoising_loss(users, inputs, target, generator=tr.generator,
                                        rows=(lo, n_global) if tr.world > 1 else None)
        # sum_g w_g = 1 per user: the loss is the mean over users of their weighted denoising losses.
        loss = tr._mean(w * per_row * cfg.group_size, n_global)
        loss, anchor = tr._add_anchor(loss, episode, inputs, traj, lo, n_global)
        grad_norm = tr._update(loss)
        ess = 1.0 / (weights.view(-1, cfg.group_size) ** 2).sum(1)
        stats.update({
            "reward": float(reward.reward.mean()), "n_k": float(reward.n_k.mean()),
            "n_sim_k": float(reward.n_sim_k.mean()), "loss": tr._global_value(loss), "anchor": anchor,
            "grad_norm": grad_norm, "effective_group_size": float(ess.mean()),
            "sample_s": round(t_sample, 4), "step_s": round(time.perf_counter() - t0, 4),
        })
        return stats


@register
class OfflineRewardWeighted(PostTrainingMethod):
    name = "offline-reward-weighted"
    samples = False

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.explore_steps is not None:
            raise ValueError("offline reward-weighted fine-tuning samples nothing: explore_steps does not apply")
        if not config.rw_lambda > 0:
            raise ValueError(f"rw_lambda must be > 0, got {config.rw_lambda}")
        if config.group_size != 1 or config.ppo_epochs or config.reuse_sampling_graph or config.anchor == "kl":
            raise ValueError("offline reward-weighted fine-tuning samples no trajectories: group_size must be 1, "
                             "and ppo_epochs, reuse_sampling_graph and the kl anchor do not apply")

    def check_policy(self, policy: Any) -> None:
        data = self.trainer.data
        ratings = getattr(data, "train_ratings", None)
        if ratings is None:
            raise ValueError(f"offline reward-weighted fine-tuning takes the logged ratings as rewards, and "
                             f"{getattr(data, 'name', 'these data')!r} carry none: use a source with ratings "
                             f"(ratings.dat, u.data, a .inter file with a rating column, ml-100k)")
        if "weight" not in inspect.signature(policy.denoising_loss).parameters:
            raise TypeError(f"{type(policy).__name__}.denoising_loss takes no per-item weights (weight=): "
                            f"offline reward-weighted fine-tuning needs them")
        self._ratings = rk.as_csr(ratings, "train_ratings")

    def step(self) -> Dict[str, float]:
        """Offline reward-weighted fine-tuning: the pretraining loss on the users' logged training rows,
        each logged item's error weighted by :func:`rating_weights` of its rating. Nothing is sampled."""
        tr = self.trainer
        cfg, policy = tr.config, tr.policy
        t0 = time.perf_counter()
        episode, lo, n_global = tr.draw()
        users = episode.users
        dev = policy.device
        rows = rk.gather_rows(tr.train_csr, users).to(dev)
        ratings = rk.gather_rows(self._ratings, users).to(dev)
        weight = rating_weights(rows, ratings, cfg.rw_lambda)
        if tr.placebo_generator is not None:  # the control: each user's weights moved to random logged items
            weight = shuffle_within_rows(weight, rows != 0, tr.placebo_generator)
        policy.module.eval()
        per_row = policy.denoising_loss(users, rows, rows, generator=tr.generator,
                                        rows=(lo, n_global) if tr.world > 1 else None, record=True, weight=weight)
        loss = tr._mean(per_row, n_global)
        loss, anchor = tr._add_anchor(loss, episode, rows, None, lo, n_global)
        grad_norm = tr._update(loss)
        logged = rows != 0
        w_logged = torch.where(logged, weight, torch.zeros_like(weight))
        # The mean logged rating, and the mean rating as the weights see it (their gap is what lambda
        # does), over the global batch: sums and counts from every rank.
        sums = torch.stack([(ratings * logged).sum(), logged.sum(), (w_logged * ratings).sum(),
                            w_logged.sum()]).to(torch.float64)
        if tr.world > 1:
            sums = dist.all_reduce_sum(sums)
        sums = sums.tolist()
        return {
            "loss": tr._global_value(loss), "anchor": anchor, "grad_norm": grad_norm,
            "rating": sums[0] / sums[1] if sums[1] > 0 else 0.0,
            "weighted_rating": sums[2] / sums[3] if sums[3] > 0 else 0.0,
            "sample_s": 0.0, "step_s": round(time.perf_counter() - t0, 4),
        }
