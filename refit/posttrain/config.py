"""What a post-training run depends on: :class:`FinetuneConfig` (whose :func:`refit.settings.setting`
fields are ``refit finetune``'s flags) and the choices and defaults its fields take."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from ..diffusion import PRECISIONS
from ..limits import check_run_settings
from ..reward import REWARDS, TARGETS
from ..settings import finite_float, int_list, positive_float, positive_int, seed as seed_type, setting
from .base import METHOD_CLASSES
from .nft import NORMALIZE
from .reward_backprop import RB_REWARDS

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
                           precisions=PRECISIONS, selection="the policy's selection_metric, recall@20 or hr@20")
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
