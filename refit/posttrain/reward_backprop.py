"""Reward backpropagation (DRaFT-K / AlignProp): the gradient of a differentiable reward through the
last K denoising steps.

Each iteration samples the reverse chain without gradient down to K steps before the end, runs the
last K steps with their graph (the state they start from is a constant), scores the final state
against every item, and ascends a differentiable ranking reward of the episode's targets: the mean,
over a row's positives, of their log-softmax over the row's items that are not excluded
(``score / rb_temperature``). For a latent model (DreamRec) the scores are inner products with the
item table, so the item embeddings and the guidance encoder get gradients too; for a row model
(DiffRec) the final row is the scores. No likelihood ratio is used.

``rb_reward`` chooses the differentiable reward: ``"log-softmax"`` (above), ``"ndcg"`` (a smooth NDCG of
the row's positives: each positive's rank over the row's items that are not excluded is replaced by
the sum of sigmoids of the score differences, ``sum_j sigmoid((s_j - s_i) / rb_temperature)``; ApproxNDCG)
or ``"topk"`` (a soft top-K: the share of the row's positives whose smooth rank lies in the run's top
``k``, each ``sigmoid((k - 1/2 - rank) / rb_temperature)``, over ``min(positives, k)``). Both tend to the exact NDCG and
recall at K (:func:`refit.reward.rank_metrics`) as the temperature goes to 0.

The placebo replaces each row's targets with one item drawn uniformly at random (from its own
generator, for the global batch): the same updates in size and kind, toward nothing in the data.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

import torch

import refit_kernels as rk

from ..reward import map_inputs
from .base import PostTrainingMethod, register


def listwise_logprob(scores: torch.Tensor, positives: rk.CSR, exclude: Optional[rk.CSR] = None) -> torch.Tensor:
    """(B,) the mean over each row's positives of their log-softmax over the row's non-excluded items.

    ``scores`` (B, I) float, differentiable; ``positives`` / ``exclude`` CSRs with B rows (sorted,
    unique columns). A row without positives gives 0. An excluded positive takes part in its own
    numerator but not in the normaliser (it is never ranked).
    """
    B, I = scores.shape
    dev = scores.device
    s = scores.float()
    if exclude is not None and exclude.nnz:
        rows = torch.repeat_interleave(torch.arange(B, device=dev), exclude.indptr.diff().to(dev))
        mask = torch.zeros(B, I, dtype=torch.bool, device=dev)
        mask[rows, exclude.indices.to(dev)] = True
        norm = torch.logsumexp(s.masked_fill(mask, float("-inf")), dim=1)
    else:
        norm = torch.logsumexp(s, dim=1)
    counts = positives.indptr.diff().to(dev)
    owner = torch.repeat_interleave(torch.arange(B, device=dev), counts)
    per_pos = s[owner, positives.indices.to(dev)] - norm[owner]
    total = torch.zeros(B, device=dev, dtype=s.dtype).index_add(0, owner, per_pos)
    return total / counts.clamp_min(1).to(s.dtype)


#: The differentiable rewards reward-backprop can ascend (see the module docstring).
RB_REWARDS = ("log-softmax", "ndcg", "topk")


def soft_ranks(scores: torch.Tensor, positives: rk.CSR, exclude: Optional[rk.CSR] = None, *,
               temperature: float = 1.0) -> torch.Tensor:
    """(nnz,) smooth 0-based ranks of each row's positives among the row's items that are not excluded:
    ``sum over those items j != i of sigmoid((s_j - s_i) / temperature)``, differentiable in ``scores``
    (B, I). An excluded positive gets ``nan`` (it is never ranked). Memory: one (nnz, I) float32 block.
    """
    B, I = scores.shape
    dev = scores.device
    s = scores.float()
    counts = positives.indptr.diff().to(dev)
    owner = torch.repeat_interleave(torch.arange(B, device=dev), counts)
    cols = positives.indices.to(dev)
    mine = s[owner, cols]
    ranked = torch.ones(B, I, dtype=torch.bool, device=dev)
    if exclude is not None and exclude.nnz:
        rows = torch.repeat_interleave(torch.arange(B, device=dev), exclude.indptr.diff().to(dev))
        ranked[rows, exclude.indices.to(dev)] = False
    keep = ranked[owner]
    keep[torch.arange(cols.numel(), device=dev), cols] = False  # a positive does not outrank itself
    above = torch.sigmoid((s[owner] - mine[:, None]) / temperature) * keep
    rank = above.sum(1)
    return torch.where(ranked[owner, cols], rank, torch.full_like(rank, float("nan")))


def smooth_metric(scores: torch.Tensor, positives: rk.CSR, exclude: Optional[rk.CSR], kind: str, *,
                  temperature: float, k: int) -> torch.Tensor:
    """(B,) the smooth ``"ndcg"`` (no cut-off, over the ideal DCG of the row's positives) or ``"topk"``
    (soft recall at k) of each row, differentiable in ``scores``; 0 for a row without positives, and an
    excluded positive adds nothing (as in :func:`refit.reward.rank_metrics`)."""
    B = scores.shape[0]
    dev = scores.device
    rank = soft_ranks(scores, positives, exclude, temperature=temperature)
    counts = positives.indptr.diff().to(dev)
    owner = torch.repeat_interleave(torch.arange(B, device=dev), counts)
    ok = ~torch.isnan(rank)
    r = torch.where(ok, rank, torch.zeros_like(rank))
    if kind == "ndcg":
        gain = torch.where(ok, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))
        n_max = int(counts.max()) if B else 0
        ideal = torch.cumsum(1.0 / torch.log2(torch.arange(n_max, device=dev, dtype=torch.float32) + 2.0), 0)
        norm = torch.where(counts > 0, ideal[(counts - 1).clamp_min(0)] if n_max else torch.ones(B, device=dev),
                           torch.ones(B, device=dev))
    else:
        gain = torch.where(ok, torch.sigmoid((k - 0.5 - r) / temperature), torch.zeros_like(r))
        norm = counts.clamp(min=1, max=k).float()
    total = torch.zeros(B, device=dev, dtype=gain.dtype).index_add(0, owner, gain)
    return total / norm


@register
class RewardBackprop(PostTrainingMethod):
    name = "reward-backprop"

    @classmethod
    def check_config(cls, config: Any) -> None:
        if config.group_size != 1:
            raise ValueError("reward-backprop takes one sample per episode: group_size must be 1")
        if config.ppo_epochs or config.reuse_sampling_graph or config.anchor == "kl" \
                or config.explore_steps is not None or config.timestep_fraction != 1.0:
            raise ValueError("reward-backprop uses no likelihood: ppo_epochs, reuse_sampling_graph, the kl anchor, "
                             "explore_steps and timestep_fraction do not apply")
        if not isinstance(config.backprop_steps, int) or config.backprop_steps < 1:
            raise ValueError(f"backprop_steps must be an int >= 1, got {config.backprop_steps!r}")
        if not config.rb_temperature > 0:
            raise ValueError(f"rb_temperature must be > 0, got {config.rb_temperature}")
        if config.rb_reward not in RB_REWARDS:
            raise ValueError(f"rb_reward must be one of {RB_REWARDS}, got {config.rb_reward!r}")

    def check_policy(self, policy: Any) -> None:
        missing = [m for m in ("sample_final", "differentiable_scores") if not callable(getattr(policy, m, None))]
        if missing:
            raise TypeError(f"reward-backprop needs {type(policy).__name__}.{' and .'.join(missing)} (a final state "
                            "sampled with its last steps' graph, and scores with gradient; see "
                            "refit.policy.DiffusionPolicy)")
        steps = self.trainer.config.rl_steps or getattr(getattr(policy, "diffusion", None), "steps", None)
        if steps is not None and self.trainer.config.backprop_steps > steps:
            raise ValueError(f"backprop_steps is {self.trainer.config.backprop_steps}, more than the {steps} "
                             "reverse steps the sampler runs")

    def _targets(self, positives: rk.CSR, lo: int, n_local: int, n_global: int, n_items: int) -> rk.CSR:
        """The placebo's targets: one uniform item per row of the global batch, this rank's rows."""
        tr = self.trainer
        if tr.placebo_generator is None:
            return positives
        items = torch.randint(0, n_items, (n_global,), generator=tr.placebo_generator)[lo:lo + n_local]
        return rk.as_csr((torch.arange(n_local + 1), items), "placebo targets", n_cols=n_items).to(
            positives.indptr.device)

    def step(self) -> Dict[str, float]:
        tr = self.trainer
        cfg, policy = tr.config, tr.policy
        t0 = time.perf_counter()
        episode, lo, n_global = tr.draw()
        inputs = map_inputs(episode.inputs, lambda x: x.to(policy.device))
        n_local = episode.users.numel()
        policy.module.eval()  # dropout off, as for every sampling method
        options = {k: v for k, v in tr._sample_options.items() if k in ("steps", "eta")}
        final = policy.sample_final(episode.users, inputs, generator=tr.generator, temperature=cfg.temperature,
                                    rows=(lo, n_global) if tr.world > 1 else None, grad_steps=cfg.backprop_steps,
                                    **options)
        t_sample = time.perf_counter() - t0
        scores = policy.differentiable_scores(episode.users, inputs, final)
        on_dev, _ = tr.reward.on_device(scores, episode)
        targets = self._targets(on_dev.positives, lo, n_local, n_global, scores.shape[1])
        if cfg.rb_reward == "log-softmax":
            surrogate = listwise_logprob(scores / cfg.rb_temperature, targets, on_dev.exclude)
        else:
            surrogate = smooth_metric(scores, targets, on_dev.exclude, cfg.rb_reward, temperature=cfg.rb_temperature,
                                      k=cfg.k)
        loss = tr._mean(-surrogate, n_global)
        loss, anchor = tr._add_anchor(loss, episode, inputs, None, lo, n_global)
        grad_norm = tr._update(loss)
        reward = tr.reward(scores.detach(), episode)  # the run's ranking reward of these samples (for the logs)
        parts = torch.stack([reward.reward, reward.n_k, reward.n_sim_k, surrogate.detach().float().cpu()], 1)
        if tr.world > 1:
            from ..runtime import distributed as dist

            parts = dist.all_gather_rows(parts)
        return {
            "reward": float(parts[:, 0].mean()), "n_k": float(parts[:, 1].mean()),
            "n_sim_k": float(parts[:, 2].mean()), "surrogate": float(parts[:, 3].mean()),
            "loss": tr._global_value(loss), "anchor": anchor, "grad_norm": grad_norm,
            "sample_s": round(t_sample, 4), "step_s": round(time.perf_counter() - t0, 4),
        }

