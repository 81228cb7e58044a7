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

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

import refit_kernels as rk

from .runtime.control import StopRequests
from .limits import ThreadGovernor, check_run_settings
from .runtime.loop import LoopState, LoopTask, run_loop
from .pretrain import SELECTION_METRIC
from .recommender import PRECISIONS
from .policy import check_policy, episode_source, kept_modes
from .posttrain import METHOD_CLASSES
from .posttrain.nft import NORMALIZE
from .posttrain.reward_backprop import RB_REWARDS
# The shared helpers of the methods, importable from here as before.
from .posttrain.common import (Baseline, Rows as _Rows, group_weights, rating_weights,  # noqa: F401
                               reinforce_loss, select_rows as _select_rows, trajectory_logprob)
from .reward import (REWARDS, TARGETS, Episode, Reward, collaborative_reward, map_inputs, ranking_reward, rank_metrics,
                     repeat_episode, slice_episode)
from .runtime import distributed as dist
from .runtime.runs import (RunDir, atomic_write, data_fingerprint, load_checkpoint, rng_state, save_checkpoint,
                           set_rng_state)
from .settings import finite_float, int_list, positive_float, positive_int, seed as seed_type, setting
from .similarity import shared_similar_users

log = logging.getLogger(__name__)

BASELINES = ("mean", "mean-std", "ema", "group")
#: Every post-training method, each a strategy of refit.posttrain (in the order they registered).
METHODS = tuple(METHOD_CLASSES)
#: Default lambda of the exponential weights, on each method's reward scale. The ReFiT reward lies
#: in [0, 1]: 0.01 did best on ml-1m_seq's validation split (DreamRec, lr 1e-4, groups of 4; HR@20
#: 0.2040 against 0.2030 and 0.2031 for 0.05 and 0.2, all within the evaluation's spread, docs/post-training.md).
#: MovieLens ratings run from 1 to 5: 1.0 is the scale of one rating step.
RW_LAMBDA = {"reward-weighted": 0.01, "offline-reward-weighted": 1.0}
#: Default trajectories per episode of the methods that compare them: GRPO's groups of ml-1m_seq's recipe
#: (docs/post-training.md, "Which method when"); reward-weighted's groups of 4 (its lambda was chosen with them).
GROUP_SIZE = {"grpo": 16, "reward-weighted": 4, "nft": 8}
ANCHORS = ("none", "kl", "elbo")
LR_SCHEDULES = ("constant", "cosine")
#: The most trajectories of a batch the per-iteration KL diagnostic re-evaluates under the pretrained policy.
KL_ROWS = 32


@dataclass
class FinetuneConfig:
    """Everything a ReFiT run depends on."""

    checkpoint: str = ""
    # "module:function" building an outside policy from the data, for a checkpoint of one (load_policy)
    policy_factory: Optional[str] = setting(
        None, "for a checkpoint of an outside policy: the function that builds the policy from the data (see refit "
              "evaluate --policy)", type=str, flag="--policy", metavar="MODULE:FUNCTION")
    data: Optional[str] = None  # default: the checkpoint's own data source
    # take data the checkpoint records another fingerprint for, or none (refit.runtime.runs.checkpoint_data)
    allow_other_data: bool = setting(
        False, "use --data although the checkpoint records another data fingerprint, or none (a model saved "
               "without its data); a warning names both fingerprints", switch=True)
    iterations: int = setting(200, type=positive_int, group="training")
    batch_size: int = setting(64, "trajectories per iteration", type=positive_int, group="training")
    lr: float = setting(1e-5, group="training")
    # "constant", or "cosine": lr * (1 + cos(pi * (i - 1) / iterations)) / 2 at iteration i, from lr down to near 0.
    # An update is mostly noise (the probe's plateau, benchmarks/RESULTS.md): a smaller step late lets the
    # signal keep what it gained.
    lr_schedule: str = setting("constant", "constant, or cosine: from --lr down to near 0 over --iterations",
                               choices=LR_SCHEDULES, group="training")
    weight_decay: float = setting(0.0, group="training")
    grad_clip: float = setting(1.0, group="training")
    # reward
    reward: str = setting(  # what N_K becomes (refit.reward)
        "hit", "what the target term counts: hit (N_K / K, hits in the top-K list), or from each target's rank over "
               "every item not excluded: ndcg (1 / log2(rank + 2), normalised over a user's targets) or rr "
               "(1 / (rank + 1) of the best-ranked target)", choices=REWARDS, group="reward")
    k: int = setting(20, "length of the rewarded top-K list", type=positive_int, group="reward")
    alpha: float = setting(0.5, "weight of N_K against N_sim-K", group="reward")
    similar_users: int = setting(10, type=positive_int, group="reward")
    # the N_sim-K neighbours: "exact", "approximate" (pynndescent, the ann extra) or "auto" (exact up to
    # refit.similarity.APPROXIMATE_ABOVE_USERS users)
    similar_users_method: str = setting(
        "auto", "the similar-user table behind N_sim-K: exact (time quadratic in the users), approximate "
                "(pynndescent, the ann extra; about linear) or auto: exact up to 60,000 users",
        choices=("auto", "exact", "approximate"), group="reward")
    target: str = setting("hidden", choices=TARGETS, group="reward")
    hide_fraction: float = setting(0.2, group="reward")
    # policy gradient
    # trajectories per user in a batch; the "group" baseline compares them (None: GROUP_SIZE's value for the
    # method, 1 for the others)
    group_size: Optional[int] = setting(
        None, "trajectories per user", type=positive_int, group="policy gradient",
        default_text=", ".join(f"{v} for {k}" for k, v in GROUP_SIZE.items()) + ", else 1")
    temperature: float = setting(1.0, "scale of the sampling noise", group="policy gradient")
    # trajectories while fine-tuning: this many respaced reverse steps (None: the model's own T), DDIM's
    # eta as the noise level (None: the posterior's; > 1 explores more with the marginals kept), and the
    # share of their stochastic steps each update trains (a random subset, drawn per update)
    rl_steps: Optional[int] = setting(
        None, "sample trajectories with this many respaced reverse steps; the log-likelihood covers exactly those "
              "steps, evaluation keeps the model's sampler", type=positive_int, group="policy gradient",
        default_text="the model's own")
    rl_noise: Optional[float] = setting(
        None, "DDIM's eta while fine-tuning; above 1 explores with more noise and the same marginals; the "
              "log-likelihood is the one of that noise", type=finite_float, group="policy gradient",
        default_text="the posterior's noise, eta 1")
    timestep_fraction: float = setting(1.0, "train each update on this random share of the stochastic steps",
                                       group="policy gradient")
    # only this many consecutive steps draw noise (a window placed at random each iteration); the others
    # are DDIM's deterministic steps, and a group's trajectories share their start (None: every step)
    explore_steps: Optional[int] = setting(
        None, "only this many consecutive steps draw noise, a window placed at random each iteration; the others "
              "are deterministic (DDIM, eta 0) and a group shares its start, so each reward difference is credited "
              "to the steps that caused it", type=positive_int, group="policy gradient",
        default_text="every step draws noise")
    baseline: str = setting("mean-std", choices=BASELINES, group="policy gradient")
    ema_decay: float = setting(0.9, group="policy gradient")
    reduction: str = setting("mean", "log-likelihood summed (exact) or averaged over items", choices=("sum", "mean"),
                             group="policy gradient")
    reuse_sampling_graph: bool = setting(
        False, "take the log-probabilities from the sampling pass instead of one batched re-forward",
        group="policy gradient")
    anchor: str = setting("none", choices=ANCHORS, group="policy gradient")
    anchor_weight: float = setting(0.0, group="policy gradient")
    ppo_epochs: int = setting(0, "0: plain REINFORCE, one update per batch of trajectories", group="policy gradient")
    ppo_clip: float = setting(0.2, group="policy gradient")
    minibatch_size: Optional[int] = setting(
        None, "PPO: trajectories per update within an inner epoch", type=positive_int, group="policy gradient",
        default_text="the whole batch")
    placebo: bool = setting(  # control: shuffle each batch's advantages between trajectories (breaks reward -> update)
        False, "control run: shuffle each batch's advantages between trajectories (reward-weighted: the rewards "
               "within each user's group), so updates keep their size and noise but no longer follow the reward",
        switch=True, group="policy gradient")
    method: str = setting(
        "reinforce", "reinforce: ReFiT's policy gradient; grpo: the policy gradient with the advantages of each "
                     "episode's --group-size trajectories (their mean and std), groups whose rewards all tie dropped "
                     "and counted; reward-weighted: the model's own denoising loss toward its sampled final states, "
                     "weighted by softmax(reward / --rw-lambda) within each user's --group-size trajectories; "
                     "offline-reward-weighted: no sampling, the pretraining loss on the logged rows with each logged "
                     "item weighted by softmax(rating / --rw-lambda) over the user's items (data with ratings only); "
                     "reward-backprop: the targets' log-softmax over the items, differentiated through the last "
                     "--backprop-steps reverse steps; nft: negative-aware fine-tuning, a regression on the noised "
                     "samples of an old policy toward a positive and away from an implicit negative policy, weighted "
                     "by the reward (no likelihood)", choices=METHODS, group="policy gradient")
    rw_lambda: Optional[float] = setting(
        None, "the exponential weights' lambda, on the reward's scale", type=finite_float, group="policy gradient",
        default_text=", ".join(f"{v:g} for {k}" for k, v in RW_LAMBDA.items()))
    # reward-backprop (refit.posttrain.reward_backprop): the last K reverse steps keep their graph, and the
    # targets' log-softmax over the items (scores / rb_temperature) is ascended through them
    backprop_steps: int = setting(
        1, "reward-backprop: the last K reverse steps that keep their graph (the reward's gradient flows through "
           "them; memory grows with K)", type=positive_int, group="policy gradient")
    rb_temperature: float = setting(
        1.0, "reward-backprop: the scores are divided by this before the targets' log-softmax (for ndcg and topk: "
             "the sigmoids' temperature of the smooth ranks)", type=positive_float, group="policy gradient")
    # the differentiable reward: "log-softmax", "ndcg" (smooth ranks) or "topk" (soft recall at k)
    rb_reward: str = setting(
        "log-softmax", "reward-backprop: what is ascended: the targets' log-softmax over the items, a smooth NDCG of "
                       "the targets (each rank a sum of sigmoids of score differences), or a soft top-K (the share "
                       "of the targets whose smooth rank lies within --k)", choices=RB_REWARDS,
        group="policy gradient")
    # nft (refit.posttrain.nft): beta (the trust region around the old policy), the old policy's moving-average
    # decay, the noise levels trained per sample, how rewards become weights in [0, 1] (centred within each
    # group or over the batch; clipped at nft_adv_clip standard deviations)
    nft_beta: float = setting(
        1.0, "nft: the positive policy's step from the old one (its inverse is the strength of the trust region "
             "around the old policy)", type=positive_float, group="policy gradient")
    nft_ema: float = setting(
        0.5, "nft: the old (sampling) policy follows the trained one with this moving-average decay after every "
             "update, in [0, 1); 0: it is the trained one", group="policy gradient")
    nft_timesteps: int = setting(
        4, "nft: noise levels each sample is trained at (one per equal stratum of the schedule)", type=positive_int,
        group="policy gradient")
    nft_normalize: str = setting(
        "group", "nft: rewards are centred within each episode's --group-size samples, or over the batch, before "
                 "they become weights in [0, 1]", choices=NORMALIZE, group="policy gradient")
    nft_adv_clip: float = setting(
        5.0, "nft: centred rewards are clipped at this many standard deviations (weight 0 or 1)",
        type=positive_float, group="policy gradient")
    # bookkeeping
    probe_size: int = setting(
        1024, "training episodes of the probe reward (fixed episodes and noise), measured at every evaluation; "
              "0: no probe", group="bookkeeping")
    eval_every: int = setting(20, type=positive_int, group="bookkeeping")
    checkpoint_every: int = setting(20, type=positive_int, group="bookkeeping")
    seed: int = setting(1, type=seed_type, group="training")
    precision: str = setting("fp32", choices=PRECISIONS, group="training")
    eval_batch_size: int = setting(1024, type=positive_int, group="bookkeeping")
    ks: Optional[Tuple[int, ...]] = setting(  # None: the model family's
        None, "cut-offs", type=int_list, group="bookkeeping", default_text="10,20,50,100 (10,20,50 for sequences)")
    out: str = "runs/finetune"
    progress: Optional[bool] = None  # progress bar: None when stderr is a terminal, True always, False never
    plot: bool = setting(True, "write plot.png", group="bookkeeping")
    data_options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.group_size is None:
            self.group_size = GROUP_SIZE.get(self.method, 1)
        check_run_settings(self, positive=("iterations", "batch_size", "k", "similar_users", "eval_every",
                                           "checkpoint_every", "eval_batch_size"),
                           finite=("grad_clip", "alpha", "hide_fraction", "temperature", "rl_noise",
                                   "timestep_fraction", "ema_decay", "anchor_weight", "ppo_clip", "rw_lambda",
                                   "rb_temperature", "nft_beta", "nft_ema", "nft_adv_clip"),
                           precisions=PRECISIONS, selection=f"{SELECTION_METRIC} / hr@20")
        if self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.similar_users_method not in ("auto", "exact", "approximate"):
            raise ValueError(f"similar_users_method must be 'auto', 'exact' or 'approximate', "
                             f"got {self.similar_users_method!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if not 0.0 < self.hide_fraction < 1.0:
            raise ValueError(f"hide_fraction must be in (0, 1), got {self.hide_fraction}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1 or self.batch_size % self.group_size:
            raise ValueError(f"group_size must be a positive divisor of batch_size ({self.batch_size}), "
                             f"got {self.group_size!r}")
        if self.baseline == "group" and self.group_size < 2:
            raise ValueError("the group baseline needs group_size >= 2")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.rl_steps is not None and (isinstance(self.rl_steps, bool) or not isinstance(self.rl_steps, int)
                                          or self.rl_steps < 2):
            raise ValueError(f"rl_steps must be an integer >= 2 (one stochastic step at least), got {self.rl_steps!r}")
        if self.rl_noise is not None and not (isinstance(self.rl_noise, (int, float)) and math.isfinite(self.rl_noise)
                                              and self.rl_noise > 0):
            raise ValueError(f"rl_noise (DDIM's eta) must be a finite number > 0, got {self.rl_noise!r}")
        if self.explore_steps is not None:
            if isinstance(self.explore_steps, bool) or not isinstance(self.explore_steps, int) \
                    or self.explore_steps < 1:
                raise ValueError(f"explore_steps must be a positive integer, got {self.explore_steps!r}")
            if self.rl_steps is not None and self.explore_steps > self.rl_steps - 1:
                raise ValueError(f"explore_steps ({self.explore_steps}) must be at most rl_steps - 1 "
                                 f"({self.rl_steps - 1}), the steps that can draw noise")
        if not (isinstance(self.timestep_fraction, (int, float)) and 0.0 < self.timestep_fraction <= 1.0):
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction!r}")
        if self.minibatch_size is not None:
            if isinstance(self.minibatch_size, bool) or not isinstance(self.minibatch_size, int) \
                    or self.minibatch_size < 1:
                raise ValueError(f"minibatch_size must be a positive integer, got {self.minibatch_size!r}")
            if self.ppo_epochs == 0:
                raise ValueError("minibatch_size splits PPO's inner epochs: set ppo_epochs >= 1 too")
        if isinstance(self.probe_size, bool) or not isinstance(self.probe_size, int) or self.probe_size < 0:
            raise ValueError(f"probe_size must be an integer >= 0, got {self.probe_size!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {self.reduction!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.anchor_weight < 0 or (self.anchor != "none" and self.anchor_weight == 0):
            raise ValueError("anchor_weight must be > 0 with an anchor (and >= 0 always)")
        if self.ppo_epochs < 0 or not 0 < self.ppo_clip < 1:
            raise ValueError("ppo_epochs must be >= 0 and ppo_clip in (0, 1)")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.rw_lambda is None:
            self.rw_lambda = RW_LAMBDA.get(self.method, 1.0)
        METHOD_CLASSES[self.method].check_config(self)  # what the method itself refuses (and may settle)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class ReFiT:
    """One ReFiT run: the policy, its frozen pretrained copy (for the KL anchor), episodes, optimiser, RNG.

    ``policy`` is any diffusion policy (:mod:`refit.policy`): refit's
    DiffRec / CF-Diff :class:`~refit.recommender.Recommender`, DreamRec's
    :class:`~refit.sequential.SeqRecommender`, or an outside model through
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
        self.reward_fn = reward_fn
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
        if episodes is None:
            episodes = episode_source(data, config.target, config.hide_fraction)
        else:
            missing = [a for a in ("sample", "neighbor_sets", "__len__") if not hasattr(episodes, a)]
            if missing:
                raise TypeError(f"episodes ({type(episodes).__name__}) must have sample(n, generator), "
                                f"neighbor_sets and len(); it lacks {', '.join(missing)}")
        self.episodes = episodes
        self.train_csr = self.episodes.neighbor_sets
        self._neighbor_sets = None  # train_csr on the device of the scores (see rollout)
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
        self.candidates = getattr(self.episodes, "candidates", None)
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
        reward = self._reward(scores, episode)
        if self.world > 1:  # the global batch's rewards (B floats): the baseline is the global batch's
            parts = dist.all_gather_rows(torch.stack([reward.reward, reward.n_k, reward.n_sim_k], 1))
            reward = type(reward)(parts[:, 0], parts[:, 1], parts[:, 2])
        return inputs, traj, reward

    def _explore_window(self) -> Tuple[int, int]:
        """``(first, explore_steps)``: where the exploring window sits this iteration, uniformly placed."""
        E = self.config.explore_steps
        return int(torch.randint(0, self._stochastic_steps - E + 1, (1,), generator=self.generator)), E

    def _on_scores_device(self, scores: torch.Tensor, episode):
        """The episode's CSRs and the neighbour table (kept on the CPU) on the scores' device."""
        dev = scores.device
        if self._neighbor_sets is None or self._neighbor_sets.device != dev:
            self._neighbor_sets = self.train_csr.to(dev)
        on_dev = episode._replace(positives=episode.positives.to(dev),
                                  exclude=None if episode.exclude is None else episode.exclude.to(dev))
        return on_dev, self.neighbors[episode.users].to(dev)

    def _reward(self, scores: torch.Tensor, episode, ranks: Optional[torch.Tensor] = None):
        """(B,) rewards of final scores (see :func:`refit.reward.ranking_reward`; ``ranks``: the
        positives' ranks when already taken), on the CPU."""
        cfg = self.config
        on_dev, neighbors = self._on_scores_device(scores, episode)
        if self.reward_fn is not None:
            parts = collaborative_reward(scores, on_dev, neighbors, self._neighbor_sets, k=cfg.k, alpha=cfg.alpha)
            r = self.reward_fn(scores, on_dev)
            B = scores.shape[0]
            if not isinstance(r, torch.Tensor) or tuple(r.shape) != (B,) or not r.is_floating_point():
                got = f"{r.dtype} {tuple(r.shape)}" if isinstance(r, torch.Tensor) else type(r).__name__
                raise ValueError(f"reward_fn must return a ({B},) float tensor (one reward per row), got {got}")
            if not bool(torch.isfinite(r).all()):
                raise ValueError("reward_fn returned a NaN or infinite reward")
            return Reward(r.detach().float().cpu(), parts.n_k.cpu(), parts.n_sim_k.cpu())
        reward = ranking_reward(scores, on_dev, neighbors, self._neighbor_sets, kind=cfg.reward, k=cfg.k,
                                alpha=cfg.alpha, ranks=ranks)
        return type(reward)(*(r.cpu() for r in reward))

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
                on_dev, _ = self._on_scores_device(scores, part)
                ranks = rk.target_rank(scores.detach(), on_dev.positives, exclude=on_dev.exclude)
                reward = self._reward(scores, part, ranks)  # one ranking pass serves the reward and the metrics
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


#: The per-iteration diagnostics summarised in summary.json (means over the run's iterations).
DIAGNOSTICS = ("zero_variance_groups", "reward_within", "reward_between", "adv_std", "kept_fraction", "grad_norm",
               "kl", "ppo_clip_fraction", "old_deviation", "r_std")


def _diagnostics_summary(records, probe_start: Dict[str, float], probe_episodes: int = 0) -> Dict[str, Any]:
    """summary.json's view of the run's diagnostics: the probe at the start and at the last evaluation
    (and the relative change of the probe reward), and the mean of each per-iteration diagnostic."""
    out: Dict[str, Any] = {}
    probes = [r for r in records if "probe_reward" in r]
    if probe_start or probes:
        end = {k: v for k, v in probes[-1].items() if k.startswith("probe_")} if probes else {}
        out["probe"] = {"episodes": probe_episodes, "start": probe_start, "end": end,
                        "end_iteration": probes[-1]["iteration"] if probes else 0}
        r0, r1 = probe_start.get("probe_reward"), end.get("probe_reward")
        if r0 and r1 is not None:
            out["probe"]["reward_change"] = (r1 - r0) / abs(r0)
    steps = [r for r in records if r.get("iteration", 0) > 0]
    means = {k: float(np.mean([r[k] for r in steps if k in r])) for k in DIAGNOSTICS if any(k in r for r in steps)}
    if means:
        out["diagnostics"] = means
    return out


def _plot(run: RunDir) -> Optional[str]:
    """reward and validation Recall/NDCG@20 against iterations, as plot.png (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return None
    records = run.records()
    # The sampled reward; offline runs sample nothing, and show the rating their weights favour.
    key = "reward" if any("reward" in r for r in records) else "weighted_rating"
    it = [r["iteration"] for r in records if key in r]
    rw = [r[key] for r in records if key in r]
    ev = [r for r in records if "valid" in r]
    probes = [r for r in records if "probe_reward" in r]
    fig, ax = plt.subplots(1, 3 if probes else 2, figsize=(15 if probes else 10, 3.6))
    ax[0].plot(it, rw, lw=0.8, color="tab:blue", alpha=0.5, label="batch")
    if len(rw) >= 5:
        w = max(1, len(rw) // 20)
        smooth = np.convolve(rw, np.ones(w) / w, mode="valid")
        ax[0].plot(it[w - 1:], smooth, color="tab:blue", label=f"mean of {w}")
    ax[0].set(xlabel="iteration", ylabel=key.replace("_", " "),
              title="ReFiT reward" if key == "reward" else "rating under the weights")
    ax[0].legend()
    if ev:
        xs = [r["iteration"] for r in ev]
        first = "recall@20" if "recall@20" in ev[0]["valid"] else "hr@20"
        ax[1].plot(xs, [r["valid"][first] for r in ev], "o-", label=first.replace("recall", "Recall").replace(
            "hr", "HR"))
        ax[1].plot(xs, [r["valid"]["ndcg@20"] for r in ev], "s-", label="NDCG@20")
        ax[1].set(xlabel="iteration", title="validation")
        ax[1].legend()
    if probes:  # the optimiser's own objective on fixed episodes and noise: does it rise?
        xs = [r["iteration"] for r in probes]
        ax[2].plot(xs, [r["probe_reward"] for r in probes], "o-", label="reward")
        twin = ax[2].twinx()
        twin.plot(xs, [r["probe_ndcg"] for r in probes], "s--", color="tab:green", label="NDCG (full list)")
        twin.set_ylabel("NDCG")
        ax[2].set(xlabel="iteration", ylabel="reward", title="probe (fixed episodes and noise)")
        ax[2].legend(loc="upper left")
        twin.legend(loc="lower right")
    fig.tight_layout()
    path = run.file("plot.png")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def finetune(config: FinetuneConfig, data=None, *, resume: bool = False, overwrite: bool = False,
             device: Any = "cpu", max_iterations_this_run: Optional[int] = None, policy=None,
             reward_fn: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None, episodes=None) -> Dict[str, Any]:
    """Runs (or resumes) ReFiT from a pretrained checkpoint; returns the summary (also summary.json).

    ``config.checkpoint`` is any refit checkpoint (DiffRec, CF-Diff, DreamRec,
    or a model imported into refit's format); ``policy`` instead fine-tunes a
    policy built in this process (e.g. an outside model wrapped by
    :func:`refit.policy.ScheduleDenoiser`), with ``data`` given.

    ``reward_fn`` and ``episodes`` replace the collaborative reward and the data's episodes (see
    :class:`ReFiT`); neither is recorded, so a resumed run must be given them again.

    ``max_iterations_this_run`` stops early without finishing (as a killed run would). A ``policy``
    is checked first (:func:`refit.policy.check_policy`) and returned to the train/eval mode it had;
    ``config.precision`` sets its precision, as for a checkpoint's.

    SIGTERM or SIGINT stops the run at the end of the current iteration: it
    writes ``last.pt`` and a ``summary.json`` with ``status: "stopped"`` and
    the signal in ``stop_reason`` (``--resume`` continues it). The summary is
    also rewritten at every evaluation (``status: "running"``).

    Under torch.distributed every rank calls this; rank 0 alone writes the run
    folder. A run may be resumed with another number of processes: its
    checkpoint holds the global iteration, the optimiser and the generator
    state, which are the same on every rank.

    The run holds ``config.out`` from start to end (:meth:`refit.runtime.runs.RunDir.claim`): a second run in
    it is refused, and so is a new run in a folder that holds one, unless ``resume`` (continue it) or
    ``overwrite`` (remove its files first; never the checkpoint it starts from).
    """
    # A policy of the caller's goes back in the train/eval modes it came in, submodule by submodule
    # (the trainer samples and evaluates in eval mode).
    modes = (kept_modes(policy.module) if isinstance(getattr(policy, "module", None), torch.nn.Module)
             else contextlib.nullcontext())
    threads = torch.get_num_threads()
    try:
        with modes, StopRequests() as stops, RunDir(config.out).claim(resume=resume, overwrite=overwrite,
                                                                      inputs=[config.checkpoint]):
            return _finetune(config, data, resume, device, max_iterations_this_run, stops, policy, reward_fn,
                             episodes)
    finally:  # what the thread governor changed during the run ends with it
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def load_policy(path: str, data=None, *, device: Any = "cpu", precision: Optional[str] = None,
                allow_other_data: bool = False, factory: Optional[str] = None):
    """``(policy, data, state)`` of a saved refit checkpoint, whatever its model family.

    A checkpoint of an outside policy (:func:`refit.policy.ScheduleDenoiser`,
    :func:`refit.latent_adapter.LatentScheduleDenoiser`) holds the outside module's weights but not
    its code: ``factory``, ``"module:function"`` (see :func:`refit.policy.import_factory`), builds the
    policy from the data, and the checkpoint's weights are loaded into it. ValueError without one.
    """
    from .policy import OUTSIDE_MODELS, import_factory, load_outside_policy
    from .runtime.runs import checkpoint_data

    state = load_checkpoint(path)
    model = state.get("recommender", {}).get("model", {})
    if model.get("name") in OUTSIDE_MODELS:
        config = model.get("config", {})
        what = config.get("external") or config.get("outside") or "an outside module"
        if factory is None:
            raise ValueError(f"checkpoint {path!r} holds an outside policy's weights ({what}), not a model refit "
                             "can rebuild: name a function that builds the policy from the data with --policy "
                             "MODULE:FUNCTION (Python: factory=), or load "
                             "refit.policy.outside_state_dict(state) into your module")
        data = checkpoint_data(path, state, data, allow_other_data=allow_other_data)
        policy = load_outside_policy(path, state, data, import_factory(factory))
        if precision is not None and hasattr(policy, "precision"):
            policy.precision = precision
        return policy, data, state
    if factory is not None:
        raise ValueError(f"--policy is for checkpoints of outside policies; {path!r} holds refit's own "
                         f"{model.get('name')!r} model, which refit rebuilds itself")
    from . import families

    family = families.of_checkpoint(model.get("name"))
    if family is None:
        raise ValueError(f"checkpoint {path!r} holds a {model.get('name')!r} model, which no registered model family "
                         f"loads (registered: {', '.join(families.names())})")
    return family.load(path, data, device=device, precision=precision, allow_other_data=allow_other_data)


def _finetune(config: FinetuneConfig, data, resume: bool, device: Any, max_iterations_this_run: Optional[int],
              stops: StopRequests, policy=None, reward_fn=None, episodes=None) -> Dict[str, Any]:
    t_start = time.perf_counter()
    dist.warn_if_not_joined("finetune")
    run = RunDir(config.out)
    main = dist.is_main()
    from .data import load_dataset

    own_source = data is None and config.data is None and policy is None  # the checkpoint's own data
    if data is None and config.data is not None:
        data = load_dataset(config.data, **config.data_options)
    if policy is None:
        rec, data, pre_state = load_policy(config.checkpoint, data, device=device, precision=config.precision,
                                           allow_other_data=config.allow_other_data, factory=config.policy_factory)
    else:
        if data is None:
            raise ValueError("finetune(policy=...) needs the data (data=...)")
        check_policy(policy)  # before any attribute of it is read
        if hasattr(policy, "precision"):  # config.precision applies, as to a checkpoint's policy (load_policy)
            policy.precision = config.precision
        rec, pre_state = policy, {}
    fingerprint = data_fingerprint(data)
    selection = rec.selection_metric
    torch.manual_seed(config.seed)
    trainer = ReFiT(rec, data, config, reward_fn=reward_fn, episodes=episodes)

    start, best = 1, None
    elapsed_before = 0.0
    state = run.resume_state(config, fingerprint, resume=resume, position="iteration")
    if state is not None:
        rec.module.load_state_dict(state["recommender"]["model"]["state_dict"])
        trainer.load(state["trainer"])
        start, best, elapsed_before = state["iteration"] + 1, state["best"], state.get("elapsed", 0.0)
    if main:
        run.write_json("config.json", {**config.to_dict(), "data_fingerprint": fingerprint,
                                       "pretrained": os.path.abspath(config.checkpoint) if config.checkpoint else None})

    data_meta = dict(pre_state.get("data") or {})
    if data_meta.get("fingerprint") != fingerprint and not own_source:
        # Other data than the start checkpoint's (allow_other_data, or none recorded): its source would
        # name data this run was not trained on.
        # Given the data object itself (finetune(policy=..., data=...)), the source it was loaded from.
        source, options = ((config.data, dict(config.data_options)) if config.data else
                           (getattr(data, "source", None), dict(getattr(data, "source_options", {}))))
        data_meta.update(source=source, options=options,
                         **{k: getattr(data, k) for k in ("n_users", "n_items") if hasattr(data, k)})

    def ckpt(iteration: int) -> Dict[str, Any]:
        return {"kind": "finetune", "recommender": rec.state(), "config": config.to_dict(),
                "data": {**data_meta, "fingerprint": fingerprint},
                "iteration": iteration, "best": best,
                "pretrained": os.path.abspath(config.checkpoint) if config.checkpoint else None}

    def evaluate(iteration: int) -> Dict[str, Any]:
        t = time.perf_counter()
        # The default cut-offs that fit the item count (a small catalogue has no top 100).
        ks = config.ks or tuple(k for k in ((10, 20, 50) if hasattr(data, "targets") else (10, 20, 50, 100))
                                if k <= data.n_items)
        metrics = rec.evaluate(data, ks=ks, batch_size=config.eval_batch_size)
        probe = trainer.probe()
        return {"iteration": iteration, "valid": metrics["valid"], "test": metrics["test"], **probe,
                "eval_s": round(time.perf_counter() - t, 3)}

    if best is None:  # iteration 0: the pretrained model itself
        record = evaluate(0)
        best = {"iteration": 0, "value": record["valid"][selection], "valid": record["valid"],
                "test": record["test"], "before": {"valid": record["valid"], "test": record["test"]},
                "probe_start": {k: v for k, v in record.items() if k.startswith("probe_")}}
        if main:
            run.log(record)
            save_checkpoint(run.file("best.pt"), ckpt(0))

    step_times = []

    def train(iteration: int) -> Dict[str, Any]:
        trainer.set_iteration(iteration)
        stats = trainer.step()
        step_times.append(stats["step_s"])
        return stats

    def summary(loop: LoopState) -> Dict[str, Any]:
        return {
            **_diagnostics_summary(run.records() if main else [], best.get("probe_start", {}),
                                   0 if trainer._probe is None else int(trainer._probe.users.numel())),
            "before": best["before"],
            "iterations": loop.position,
            "iterations_planned": loop.planned,
            "s_per_iteration": round(float(np.median(step_times)), 4) if step_times else None,
        }

    def shown(record: Dict[str, Any]) -> Dict[str, str]:
        out = {"reward": f"{record.get('reward', record.get('weighted_rating', 0.0)):.3f}"}
        if "probe_reward" in record:
            out["probe"] = f"{record['probe_reward']:.4f}"
        return out

    def finish(summary: Dict[str, Any]) -> None:
        if config.plot:
            summary["plot"] = _plot(run)

    task = LoopTask(train=train, evaluate=evaluate, checkpoint=ckpt,
                    resume_state=lambda: {"trainer": trainer.state()}, summary=summary, shown=shown, finish=finish)
    return run_loop(run, task, unit="iteration", total=config.iterations, start=start, best=best,
                    selection=selection, stops=stops, t_start=t_start, elapsed_before=elapsed_before,
                    eval_every=config.eval_every, checkpoint_every=config.checkpoint_every, evaluate_on_stop=False,
                    train_key=None, progress=config.progress, desc="refit", max_this_run=max_iterations_this_run)
