"""ReFiT: fine-tuning a pretrained diffusion recommender with policy gradients.

The reverse denoising trajectory is the episode: from the user's (partly
hidden) training row, every reverse step is taken with noise but the last,
and the final state ranks the items. The only reward comes at the end
(:mod:`refit.reward`). REINFORCE maximises the exact log-likelihood of the
trajectory weighted by the advantage,

    loss = -mean_b(adv[b] * L[b]),   L[b] = sum over the stochastic steps of log p(x_{s+1} | x_s)

with ``L`` from :func:`refit_kernels.gaussian_logprob` and ``adv`` the reward
minus a baseline. Dropout is off both while sampling and while the
log-probabilities are taken, from the same weights.

Options: a KL or ELBO anchor to the pretrained model, PPO-style ratio
clipping over a few inner epochs per batch of trajectories (DDPO's form),
and bf16 autocast for the denoiser.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch

import refit_kernels as rk

from ..limits import ThreadGovernor
from ..policy import check_policy, episode_source
from ..reward import RunReward, map_inputs, rank_metrics, repeat_episode, slice_episode
from ..runtime import distributed as dist
from ..runtime.runs import rng_state, set_rng_state
from ..similarity import shared_similar_users
from .base import METHOD_CLASSES
from .common import Baseline, Rows as _Rows, select_rows as _select_rows
from .config import FinetuneConfig

log = logging.getLogger(__name__)

#: The most trajectories of a batch the per-iteration KL diagnostic re-evaluates under the pretrained policy.
KL_ROWS = 32


class ReFiT:
    """One ReFiT run: the policy, its frozen pretrained copy (for the KL anchor), episodes, optimiser, RNG.

    ``policy`` is any diffusion policy (:mod:`refit.policy`): refit's
    DiffRec / CF-Diff :class:`~refit.families.diffrec.recommender.RowRecommender`, DreamRec's
    :class:`~refit.families.dreamrec.recommender.SeqRecommender`, or an outside model through
    :func:`refit.policy.ScheduleDenoiser`. Episodes come from the data
    (:func:`refit.policy.episode_source`): users with hidden items for
    interaction data, training targets with their history windows for
    sequence data.

    Under torch.distributed (see :mod:`refit.runtime.distributed`) every rank draws the
    same global batch of episodes and sampling noise from the same seeded
    generator and works on its contiguous share of the rows; rewards are
    all-gathered so the baseline (mean, std, EMA) is that of the global
    batch, and each rank's loss is scaled so that the average of the ranks'
    gradients (:func:`refit.runtime.distributed.average_gradients`) is the gradient of
    ``-mean(adv * L)`` over the global batch. One step with N processes then
    leaves the parameters of one step in a single process with the same
    ``batch_size`` (up to float32 rounding), and the generator's state,
    identical on every rank, does not depend on N.
    """

    def __init__(self, policy, data, config: FinetuneConfig, *, neighbors: Optional[torch.Tensor] = None,
                 reward_fn: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None, episodes=None):
        """``neighbors``: an (n_users, config.similar_users) int64 similar-user table (-1 padded, as
        from :func:`refit.similarity.similar_users`) to use instead of computing one, e.g. to share
        one table between runs on the same training data.

        ``reward_fn(scores, episode) -> (B,)``: the reward to optimise instead of the collaborative one
        (``config.reward``, ``k``, ``alpha``). ``scores`` are the (B, n_items) float32 final scores,
        ``episode`` the :class:`~refit.reward.Episode` of those rows (its CSRs on the scores' device);
        it returns (B,) finite floats, higher is better. The probe reward is then this reward too; the
        logged ``n_k`` and ``n_sim_k`` still count the collaborative parts.

        ``episodes``: where episodes come from instead of :func:`refit.policy.episode_source`: an
        object with ``sample(n, generator) -> Episode`` (n distinct episodes, drawn with the
        generator alone), ``neighbor_sets`` (the n_users x n_items CSR whose rows N_sim-K counts) and
        ``len()`` (how many distinct episodes it draws from).
        """
        check_policy(policy)
        if reward_fn is not None and not callable(reward_fn):
            raise TypeError(f"reward_fn must be a function (scores, episode) -> (B,) rewards, got "
                            f"{type(reward_fn).__name__}")
        self.policy = self.rec = policy  # ``rec``: the former name
        self.data, self.config = data, config
        self.world = dist.world_size()
        n_items = getattr(data, "n_items", None)
        if n_items is not None and config.k > n_items:
            raise ValueError(f"k (--k) is {config.k}: the rewarded top-K list cannot be longer than the "
                             f"{n_items} items")
        T_policy = getattr(getattr(policy, "diffusion", None), "steps", None)
        if config.rl_steps is not None and T_policy is not None and config.rl_steps > T_policy:
            raise ValueError(f"rl_steps (--rl-steps) is {config.rl_steps}: the model's diffusion has {T_policy} "
                             f"steps to respace, so at most {T_policy}")
        n_users = config.batch_size // config.group_size
        if self.world > 1 and n_users < self.world:
            raise ValueError(f"batch_size // group_size = {n_users} users per iteration cannot be shared by "
                             f"{self.world} processes: raise batch_size to at least {self.world * config.group_size}")
        if self.world > 1 and config.minibatch_size is not None:
            raise ValueError("minibatch_size is for one process: under torchrun each rank's share of the batch "
                             "is already a minibatch of the global one; use ppo_epochs without it")
        self._sample_options = {}  # passed to policy.sample only when set: outside policies may lack them
        if config.rl_steps is not None:
            self._sample_options["steps"] = config.rl_steps
        if config.rl_noise is not None:
            self._sample_options["eta"] = config.rl_noise
        self._stochastic_steps = None
        if config.explore_steps is not None:
            self._sample_options["group_size"] = config.group_size
            self._sample_options["explore"] = None  # placed anew each iteration
            T = config.rl_steps or getattr(getattr(policy, "diffusion", None), "steps", None)
            if T is None:
                raise ValueError(f"explore_steps needs rl_steps for {type(policy).__name__}, which has no "
                                 f"diffusion.steps to count its steps from")
            if config.explore_steps > T - 1:
                raise ValueError(f"explore_steps ({config.explore_steps}) must be at most {T - 1}, the steps of "
                                 f"the sampler that can draw noise")
            self._stochastic_steps = T - 1
        if self._sample_options:
            import inspect

            params = inspect.signature(policy.sample).parameters
            missing = [k for k in self._sample_options if k not in params
                       and not any(p.kind == p.VAR_KEYWORD for p in params.values())]
            if missing:
                raise TypeError(f"{type(policy).__name__}.sample takes no {' or '.join(missing)}= keyword: "
                                f"rl_steps, rl_noise and explore_steps need a policy that samples respaced, "
                                f"DDIM or partly deterministic steps (see refit.policy)")
        # Before any training: a policy over other data, or one whose methods return the wrong shapes
        # (a loss that is a batch mean, scores with a padding column), fails here, naming the method.
        check_policy(policy, data, sample_options=self._sample_options)
        if episodes is None:
            episodes = episode_source(data, config.target, config.hide_fraction)
        else:
            missing = [a for a in ("sample", "neighbor_sets", "__len__") if not hasattr(episodes, a)]
            if missing:
                raise TypeError(f"episodes ({type(episodes).__name__}) must have sample(n, generator), "
                                f"neighbor_sets and len(); it lacks {', '.join(missing)}")
        self.episodes = episodes
        self.train_csr = self.episodes.neighbor_sets
        self.generator = torch.Generator().manual_seed(config.seed)
        self.threads = ThreadGovernor()
        # Its own generator, so a placebo run draws the same episodes and noise as the real run would.
        self.placebo_generator = torch.Generator().manual_seed(config.seed + 7_654_321) if config.placebo else None
        self.optimizer = torch.optim.AdamW(policy.module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.baseline = Baseline(config.baseline, config.ema_decay, config.group_size)
        if neighbors is None:
            neighbors = shared_similar_users(self.train_csr, m=config.similar_users,
                                             method=config.similar_users_method)
        else:
            n_rows = rk.as_csr(self.train_csr, "train").n_rows
            if (not isinstance(neighbors, torch.Tensor) or neighbors.dtype != torch.int64
                    or tuple(neighbors.shape) != (n_rows, config.similar_users)):
                raise ValueError(f"neighbors must be an int64 tensor of shape ({n_rows}, {config.similar_users}) "
                                 f"(users x similar_users), got "
                                 f"{getattr(neighbors, 'dtype', type(neighbors).__name__)} "
                                 f"{tuple(getattr(neighbors, 'shape', ()))}")
            if neighbors.numel() and (int(neighbors.min()) < -1 or int(neighbors.max()) >= n_rows):
                raise ValueError(f"neighbors: ids must be -1 (padding) or users in [0, {n_rows})")
        self.neighbors = neighbors
        self.reward = RunReward(self.train_csr, neighbors, kind=config.reward, k=config.k, alpha=config.alpha,
                                reward_fn=reward_fn)
        self.candidates = getattr(self.episodes, "candidates", None)
        # The method (a strategy of refit.posttrain) runs the iterations.
        self.method = METHOD_CLASSES[config.method](self)
        self._probe = None  # (episode, seed) of the probe reward, drawn on first use
        # The pretrained policy, frozen: the KL anchor, and the KL diagnostic of the sampling methods.
        self.reference = None
        if config.anchor == "kl" or self.method.samples:
            self.reference = copy.deepcopy(policy)
            self.reference.module.eval()
            for p in self.reference.module.parameters():
                p.requires_grad_(False)

    def sample_users(self) -> torch.Tensor:
        """batch_size / group_size distinct users of interaction data (with replacement across iterations)."""
        if self.candidates is None:
            raise ValueError("sample_users is for interaction data; sequence data samples targets")
        n = self.config.batch_size // self.config.group_size
        pick = torch.randperm(self.candidates.numel(), generator=self.generator)[:n]
        return self.candidates[pick]

    def _mean(self, x: torch.Tensor, n_global: int) -> torch.Tensor:
        """The mean of ``x`` over the global batch (``n_global`` elements on all ranks together), as
        this rank's share: the ranks' gradients are averaged, so each rank contributes
        ``world * sum(local) / n_global``; in a single process, the plain mean."""
        if self.world == 1:
            return x.mean()
        return x.sum() / self._mean_divisor(x.numel(), n_global)

    def _mean_divisor(self, n_local: int, n_global: int) -> float:
        """What :meth:`_mean` divides the sum of ``n_local`` local elements by: ``n_local`` in a single
        process, ``n_global / world`` under torchrun (at least 1: an empty batch sums to 0)."""
        return float(max(1, n_local)) if self.world == 1 else n_global / self.world

    def _global_value(self, local: torch.Tensor) -> float:
        """The value of a loss term over the global batch from the ranks' scaled shares (for logging)."""
        if self.world == 1:
            return float(local.detach())
        return float(dist.all_reduce_sum(local.detach().double().reshape(1))[0]) / self.world

    def draw(self):
        """This rank's episodes of one iteration: ``(episode, lo, n_global)`` where the episode holds the
        rank's rows (groups repeated), ``lo`` their offset in the global batch of ``n_global``."""
        cfg = self.config
        # The global batch's random draws (episodes, hidden items) are made on every rank alike.
        episode = self.episodes.sample(cfg.batch_size // cfg.group_size, self.generator)
        n_global = episode.users.numel() * cfg.group_size  # trajectories in the global batch
        lo = 0
        if self.world > 1:  # this rank's contiguous share of the episodes
            lo, hi = dist.shard_range(episode.users.numel())
            episode = slice_episode(episode, lo, hi)
        if cfg.group_size > 1:  # the same episode for every member of a user's group
            episode = repeat_episode(episode, cfg.group_size)
        return episode, lo * cfg.group_size, n_global

    def rollout(self, episode, lo: int, n_global: int, policy=None):
        """Trajectories of the episode (dropout off) and their rewards: ``(inputs, traj, reward)``, the
        reward being the global batch's (all-gathered) under torch.distributed. ``policy``: the one that
        samples, when not the trained one (NFT's old policy)."""
        cfg, policy = self.config, (self.policy if policy is None else policy)
        inputs = map_inputs(episode.inputs, lambda x: x.to(policy.device))
        policy.module.eval()  # dropout off for sampling and for the log-probabilities alike
        # Noise for the whole global batch, this rank's rows kept: trajectories do not depend on the split.
        options = dict(self._sample_options)
        if cfg.explore_steps is not None:
            options["explore"] = self._explore_window()
        traj = policy.sample(episode.users, inputs, generator=self.generator, temperature=cfg.temperature,
                             rows=(lo, n_global) if self.world > 1 else None, keep_graph=cfg.reuse_sampling_graph,
                             **options)
        scores = policy.final_scores(episode.users, inputs, traj.final)
        reward = self.reward(scores, episode)
        if self.world > 1:  # the global batch's rewards (B floats): the baseline is the global batch's
            parts = dist.all_gather_rows(torch.stack([reward.reward, reward.n_k, reward.n_sim_k], 1))
            reward = type(reward)(parts[:, 0], parts[:, 1], parts[:, 2])
        return inputs, traj, reward

    def _explore_window(self) -> Tuple[int, int]:
        """``(first, explore_steps)``: where the exploring window sits this iteration, uniformly placed."""
        E = self.config.explore_steps
        return int(torch.randint(0, self._stochastic_steps - E + 1, (1,), generator=self.generator)), E

    @torch.no_grad()
    def probe(self) -> Dict[str, float]:
        """The probe: ``probe_size`` training episodes drawn once (seeded by the run's seed alone, so a
        placebo run probes the same ones) and sampled with the same noise every time, with the
        fine-tuning sampler. Returns the mean ``reward`` (the one optimised), and from the targets'
        ranks over the full list ``ndcg``, ``rr`` and ``recall`` at K (HR@K for one target per
        episode), and the KL to the pretrained policy along these trajectories (``kl``), each
        prefixed ``probe_``. With ``explore_steps`` the probe follows the deterministic path the
        exploration varies (no step draws noise: only the start is random, and fixed), and its KL is 0.
        Every rank computes it alike; it draws nothing from the run's generator."""
        cfg, policy = self.config, self.policy
        if cfg.probe_size == 0:
            return {}
        if self._probe is None:
            n = min(cfg.probe_size, len(self.episodes))
            self._probe = self.episodes.sample(n, torch.Generator().manual_seed(cfg.seed + 104_729))
        episode = self._probe
        gen = torch.Generator().manual_seed(cfg.seed + 15_485_863)
        was = policy.module.training
        policy.module.eval()
        sums: Dict[str, float] = {}
        n_total = episode.users.numel()
        try:
            for a in range(0, n_total, cfg.eval_batch_size):
                part = slice_episode(episode, a, min(a + cfg.eval_batch_size, n_total))
                inputs = map_inputs(part.inputs, lambda x: x.to(policy.device))
                options = dict(self._sample_options)
                if cfg.explore_steps is not None:  # the path the exploration varies: every step deterministic
                    options.update(explore=(0, 0), group_size=1)
                traj = policy.sample(part.users, inputs, generator=gen, temperature=cfg.temperature, **options)
                scores = policy.final_scores(part.users, inputs, traj.final)
                on_dev, _ = self.reward.on_device(scores, part)
                ranks = rk.target_rank(scores.detach(), on_dev.positives, exclude=on_dev.exclude)
                reward = self.reward(scores, part, ranks)  # one ranking pass serves the reward and the metrics
                m = rank_metrics(ranks, on_dev.positives.indptr, cfg.k)
                kl = self._kl_to_start(_Rows(part._replace(inputs=inputs), traj), all_ranks=False)
                n = part.users.numel()
                for key, v in (("reward", float(reward.reward.sum())), ("ndcg", float(m["ndcg"].sum())),
                               ("rr", float(m["rr"].sum())), ("recall", float(m["recall"].sum())),
                               ("kl", kl * n)):
                    sums[key] = sums.get(key, 0.0) + v
        finally:
            policy.module.train(was)
        return {f"probe_{k}": v / max(n_total, 1) for k, v in sums.items()}

    def _sampled(self):
        """One iteration's draw and rollout, timed: ``(t0, episode, lo, n_global, inputs, traj, reward,
        sampling seconds)``."""
        t0 = time.perf_counter()
        episode, lo, n_global = self.draw()
        inputs, traj, reward = self.rollout(episode, lo, n_global)
        return t0, episode, lo, n_global, inputs, traj, reward, time.perf_counter() - t0

    def lr_at(self, iteration: int) -> float:
        """The learning rate of iteration ``iteration`` (1-based) under ``config.lr_schedule``."""
        cfg = self.config
        if cfg.lr_schedule == "cosine":
            return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (iteration - 1) / cfg.iterations))
        return cfg.lr

    def set_iteration(self, iteration: int) -> None:
        """Sets the optimiser's learning rate for ``iteration``. Computed from the iteration alone, so a
        resumed run continues the schedule exactly."""
        lr = self.lr_at(iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> Dict[str, float]:
        """One iteration of the run's method: a batch of episodes, their rewards, and the update(s).

        Each iteration first lets the thread governor (:class:`refit.limits.ThreadGovernor`) fit torch's
        thread count to the cores other processes leave free, and logs a warning when it changes it."""
        note = self.threads.tick()
        if note is not None:
            log.warning(note)
        return self.method.step()

    def _reward_stats(self, reward: torch.Tensor, adv: Optional[torch.Tensor] = None,
                      keep: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Diagnostics of one batch's (global) rewards: the advantages' spread, the share of trajectories
        kept, and with groups the share of zero-variance groups and the reward's spread within groups
        (mean of each group's standard deviation) against between them (standard deviation of the
        group means)."""
        G = self.config.group_size
        out = {}
        if adv is not None:
            out["adv_std"] = float(adv.double().std(unbiased=False)) if adv.numel() else 0.0
        if keep is not None:
            out["kept_fraction"] = float(keep.double().mean())
        if G > 1:
            g = reward.double().view(-1, G)
            out["zero_variance_groups"] = float(((g.amax(1) - g.amin(1)) == 0).double().mean())
            out["reward_within"] = float(g.std(1, unbiased=False).mean())
            out["reward_between"] = float(g.mean(1).std(unbiased=False)) if g.shape[0] > 1 else 0.0
        return out

    def _kl_to_start(self, sub: "_Rows", all_ranks: bool = True) -> float:
        """KL from the pretrained policy to the current one along this batch's trajectories: the sum over
        the stochastic steps of ``coef_pred^2 / (2 v) * |out_now - out_start|^2`` per trajectory (the
        steps' Gaussians share their variance), averaged over the trajectories (and divided by the state
        width with ``reduction="mean"``), over at most :data:`KL_ROWS` of them (the first). ``traj.preds``
        are the current policy's outputs: sampling used these very weights with dropout off."""
        traj = sub.traj
        if self.reference is None or traj.preds.shape[0] == 0:
            return 0.0
        if traj.preds.shape[1] > KL_ROWS:  # a bounded share of the batch: the diagnostic's cost stays small
            sub = _Rows(*_select_rows(sub.episode, traj, torch.arange(KL_ROWS)))
            traj = sub.traj
        with torch.no_grad():
            kl = traj.preds.new_zeros((traj.preds.shape[1],), dtype=torch.float32)
            if kl.numel():
                start = self.reference.outputs(sub.episode.users, sub.episode.inputs, traj).float()
                scale = (traj.coef_pred.float() ** 2 * torch.exp(-traj.log_var.float()) / 2)[:, None, None]
                kl = (scale * (traj.preds.detach().float() - start) ** 2).sum(2).sum(0)
                if self.config.reduction == "mean":
                    kl = kl / traj.preds.shape[2]
            total = torch.stack([kl.double().sum().cpu(), torch.tensor(float(kl.numel()), dtype=torch.float64)])
        if self.world > 1 and all_ranks:
            total = dist.all_reduce_sum(total)
        return float(total[0] / total[1].clamp_min(1))

    def _add_anchor(self, loss, episode, inputs, traj, lo: int = 0, n_global: Optional[int] = None):
        """loss + anchor_weight * anchor (its gradient is averaged over the ranks with the rest)."""
        cfg, policy = self.config, self.policy
        users = episode.users
        n_global = users.numel() if n_global is None else n_global
        if cfg.anchor == "none":
            return loss, 0.0
        if cfg.anchor == "elbo":  # the model's own pretraining loss on the episodes' data
            policy.module.eval()
            local = episode._replace(inputs=inputs)
            per_row = policy.pretraining_loss(local, generator=self.generator,
                                              rows=(lo, n_global) if self.world > 1 else None)
            anchor = self._mean(per_row, n_global)
        else:  # KL between the steps' Gaussians under the current and the pretrained model
            S, B, D = traj.preds.shape
            with torch.no_grad():
                old = self.reference.outputs(users, inputs, traj)
            new = policy.outputs(users, inputs, traj)
            scale = (traj.coef_pred ** 2 * torch.exp(-traj.log_var) / 2)[:, None, None]
            anchor = self._mean((scale * (new - old) ** 2).sum(2).sum(0), n_global)
            if cfg.reduction == "mean":
                anchor = anchor / D
        return loss + cfg.anchor_weight * anchor, self._global_value(anchor)

    def _update(self, loss) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(self.policy.module.parameters())
        norm = torch.nn.utils.clip_grad_norm_(self.policy.module.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return float(norm)

    def state(self) -> Dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "baseline": self.baseline.state(),
                 "rng": rng_state(self.generator)}
        if self.placebo_generator is not None:
            state["placebo_rng"] = self.placebo_generator.get_state()
        method = self.method.state()
        if method:
            state["method"] = method
        return state

    def load(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline.load(state["baseline"])
        set_rng_state(state["rng"], self.generator)
        if self.placebo_generator is not None and "placebo_rng" in state:
            self.placebo_generator.set_state(state["placebo_rng"])
        if "method" in state:
            self.method.load(state["method"])
