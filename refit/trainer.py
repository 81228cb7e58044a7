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
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

import refit_kernels as rk

from .data import InteractionData
from .diffusion import Trajectory
from .control import Progress, StopRequests
from .loop import peak_memory_mb
from .pretrain import SELECTION_METRIC, evaluate_recommender, load_recommender
from .recommender import PRECISIONS, Recommender
from .reward import TARGETS, collaborative_reward, make_episode, repeat_episode
from . import distributed as dist
from .runs import RunDir, data_fingerprint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .similarity import shared_similar_users

log = logging.getLogger(__name__)

BASELINES = ("mean", "mean-std", "ema", "group")
ANCHORS = ("none", "kl", "elbo")


@dataclass
class FinetuneConfig:
    """Everything a ReFiT run depends on."""

    checkpoint: str = ""
    data: Optional[str] = None  # default: the checkpoint's own data source
    iterations: int = 200
    batch_size: int = 64
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # reward
    k: int = 20
    alpha: float = 0.5
    similar_users: int = 10
    target: str = "hidden"
    hide_fraction: float = 0.2
    # policy gradient
    group_size: int = 1  # trajectories per user in a batch; the "group" baseline compares them
    temperature: float = 1.0  # scale of the sampling noise (exploration)
    baseline: str = "mean-std"
    ema_decay: float = 0.9
    reduction: str = "mean"  # of the log-likelihood over items: "sum" (exact) or "mean"
    reuse_sampling_graph: bool = False  # log-probs from the sampling pass instead of a batched re-forward
    anchor: str = "none"
    anchor_weight: float = 0.0
    ppo_epochs: int = 0  # 0: plain REINFORCE, one update per batch of trajectories
    ppo_clip: float = 0.2
    # bookkeeping
    eval_every: int = 20
    checkpoint_every: int = 20
    seed: int = 1
    precision: str = "fp32"
    eval_batch_size: int = 1024
    ks: Tuple[int, ...] = (10, 20, 50, 100)
    out: str = "runs/finetune"
    progress: Optional[bool] = None  # progress bar: None when stderr is a terminal, True always, False never
    plot: bool = True
    data_options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("iterations", "batch_size", "k", "similar_users", "eval_every", "checkpoint_every",
                     "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be > 0 and weight_decay >= 0")
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
        if self.ppo_epochs and self.reuse_sampling_graph:
            raise ValueError("PPO re-evaluates the trajectories each inner epoch: reuse_sampling_graph must be off")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.ks = tuple(sorted(int(k) for k in self.ks))
        if 20 not in self.ks:
            raise ValueError(f"ks must include 20 (model selection uses {SELECTION_METRIC})")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _repeat_cond(cond, times: int):
    if cond is None:
        return None
    return type(cond)(*(c.repeat(times, 1) for c in cond))


def reinforce_loss(adv: torch.Tensor, logp: torch.Tensor, mean=torch.mean) -> torch.Tensor:
    """REINFORCE's surrogate loss ``-mean_b(adv[b] * logp[b])``: (B,) advantages (no gradient) and
    (B,) trajectory log-likelihoods (with gradient) -> scalar whose gradient estimates -grad E[reward].

    ``mean`` takes the mean over the batch (under torchrun: this rank's share of the global mean).
    """
    return -mean(adv.detach() * logp)


def trajectory_logprob(rec: Recommender, users: torch.Tensor, rows: torch.Tensor, traj: Trajectory, *,
                       reduction: str = "mean", per_step: bool = False) -> torch.Tensor:
    """Log-likelihood of sampled trajectories under the current weights, with gradient.

    All stochastic steps are re-evaluated in one batched forward pass over
    (S * B) rows (larger matrix products than S passes of B rows), then
    scored by ``gaussian_logprob``: (B,) or, with ``per_step``, (S, B).
    """
    S, B, I = traj.preds.shape
    if S == 0:
        return traj.final.new_zeros((S, B) if per_step else (B,))
    cond = _repeat_cond(rec.model.condition(users, rows), S)
    t = traj.timesteps.repeat_interleave(B)
    with torch.enable_grad():
        with _autocast(rec):
            out = rec.model(traj.states[:-1].reshape(S * B, I), t, cond)
        preds = out.float().view(S, B, I)
        return rk.gaussian_logprob(preds, traj.states, traj.coef_pred, traj.coef_x, traj.log_var,
                                   reduction=reduction, per_step=per_step)


def _autocast(rec: Recommender):
    from .recommender import autocast

    return autocast(rec.precision, rec.device)


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


def slice_episode(episode, start: int, stop: int):
    """Rows ``[start, stop)`` of an episode (its users, start rows and CSR targets)."""
    from .reward import Episode

    def cut(c: Optional[rk.CSR]) -> Optional[rk.CSR]:
        if c is None:
            return None
        a, b = int(c.indptr[start]), int(c.indptr[stop])
        return rk.CSR(c.indptr[start:stop + 1] - a, c.indices[a:b], None if c.values is None else c.values[a:b],
                      c.n_cols)

    return Episode(episode.users[start:stop], episode.rows[start:stop], cut(episode.positives), cut(episode.exclude))


class ReFiT:
    """One ReFiT run: the model, its frozen pretrained copy (for anchors), data, optimiser, RNG.

    Under torch.distributed (see :mod:`refit.distributed`) every rank draws the
    same global batch of users, hidden items and sampling noise from the same
    seeded generator and works on its contiguous share of the rows; rewards
    are all-gathered so the baseline (mean, std, EMA) is that of the global
    batch, and each rank's loss is scaled so that the average of the ranks'
    gradients (:func:`refit.distributed.average_gradients`) is the gradient of ``-mean(adv * L)`` over the global batch. One
    step with N processes then leaves the parameters of one step in a single
    process with the same ``batch_size`` (up to float32 rounding), and the
    generator's state, identical on every rank, does not depend on N.
    """

    def __init__(self, rec: Recommender, data: InteractionData, config: FinetuneConfig):
        self.rec, self.data, self.config = rec, data, config
        self.world = dist.world_size()
        n_users = config.batch_size // config.group_size
        if self.world > 1 and n_users < self.world:
            raise ValueError(f"batch_size // group_size = {n_users} users per iteration cannot be shared by "
                             f"{self.world} processes: raise batch_size to at least {self.world * config.group_size}")
        self.train_csr = rk.as_csr(data.train, "train")
        self.generator = torch.Generator().manual_seed(config.seed)
        self.optimizer = torch.optim.AdamW(rec.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.baseline = Baseline(config.baseline, config.ema_decay, config.group_size)
        # Computed once, each rank a block of users, then shared (identical on every rank).
        self.neighbors = shared_similar_users(self.train_csr, m=config.similar_users)
        counts = self.train_csr.indptr.diff()
        min_items = 2 if config.target == "hidden" else 1
        self.candidates = torch.nonzero(counts >= min_items).flatten()
        if self.candidates.numel() == 0:
            raise ValueError(f"no user has {min_items} or more training items to fine-tune on")
        self.reference_model = None
        if config.anchor == "kl":
            self.reference_model = copy.deepcopy(rec.model).eval()
            for p in self.reference_model.parameters():
                p.requires_grad_(False)

    def sample_users(self) -> torch.Tensor:
        """batch_size / group_size distinct users (with replacement across iterations)."""
        n = self.config.batch_size // self.config.group_size
        pick = torch.randperm(self.candidates.numel(), generator=self.generator)[:n]
        return self.candidates[pick]

    def _mean(self, x: torch.Tensor, n_global: int) -> torch.Tensor:
        """The mean of ``x`` over the global batch (``n_global`` elements on all ranks together), as
        this rank's share: the ranks' gradients are averaged, so each rank contributes
        ``world * sum(local) / n_global``; in a single process, the plain mean."""
        if self.world == 1:
            return x.mean()
        return x.sum() * (self.world / n_global)

    def _global_value(self, local: torch.Tensor) -> float:
        """The value of a loss term over the global batch from the ranks' scaled shares (for logging)."""
        if self.world == 1:
            return float(local.detach())
        return float(dist.all_reduce_sum(local.detach().double().reshape(1))[0]) / self.world

    def step(self) -> Dict[str, float]:
        """One iteration: a batch of episodes, their rewards, and the policy update(s)."""
        cfg, rec, diffusion = self.config, self.rec, self.rec.diffusion
        t0 = time.perf_counter()
        users = self.sample_users()
        # The global batch's random draws (users, hidden items) are made on every rank alike.
        episode = make_episode(self.train_csr, users, cfg.target, cfg.hide_fraction, self.generator)
        n_global = users.numel() * cfg.group_size  # trajectories in the global batch
        lo = 0
        if self.world > 1:  # this rank's contiguous share of the users
            lo, hi = dist.shard_range(users.numel())
            episode = slice_episode(episode, lo, hi)
            users = episode.users
        if cfg.group_size > 1:  # the same episode for every member of a user's group
            episode = repeat_episode(episode, cfg.group_size)
            users = episode.users
        lo *= cfg.group_size
        n_local = users.numel()
        rows = episode.rows.to(rec.device)
        rec.model.eval()  # dropout off for sampling and for the log-probabilities alike
        denoise = rec.denoiser(users, rows)
        # Noise for the whole global batch, this rank's rows kept: trajectories do not depend on the split.
        traj = diffusion.sample(denoise, rows, noise=True, return_trajectory=True,
                                keep_graph=cfg.reuse_sampling_graph, generator=self.generator,
                                temperature=cfg.temperature, rows=(lo, n_global) if self.world > 1 else None)
        t_sample = time.perf_counter() - t0
        reward = collaborative_reward(traj.final, episode, self.neighbors[users], self.train_csr,
                                      k=cfg.k, alpha=cfg.alpha)
        if self.world > 1:  # the global batch's rewards (B floats): the baseline is the global batch's
            parts = dist.all_gather_rows(torch.stack([reward.reward, reward.n_k, reward.n_sim_k], 1))
            reward = type(reward)(parts[:, 0], parts[:, 1], parts[:, 2])
        adv = self.baseline.advantage(reward.reward)[lo:lo + n_local].to(rec.device)

        if cfg.ppo_epochs == 0:
            if cfg.reuse_sampling_graph:
                logp = rk.gaussian_logprob(traj.preds, traj.states, traj.coef_pred, traj.coef_x, traj.log_var,
                                           reduction=cfg.reduction)
            else:
                logp = trajectory_logprob(rec, users, rows, traj, reduction=cfg.reduction)
            loss = reinforce_loss(adv, logp, mean=lambda x: self._mean(x, n_global))
            loss, anchor = self._add_anchor(loss, users, rows, traj, lo, n_global)
            grad_norm = self._update(loss)
            clip_frac = 0.0
        else:
            with torch.no_grad():
                old = rk.gaussian_logprob(traj.preds, traj.states, traj.coef_pred, traj.coef_x, traj.log_var,
                                          reduction=cfg.reduction, per_step=True)
            for _ in range(cfg.ppo_epochs):
                new = trajectory_logprob(rec, users, rows, traj, reduction=cfg.reduction, per_step=True)
                ratio = torch.exp(new - old)
                clipped = torch.clamp(ratio, 1 - cfg.ppo_clip, 1 + cfg.ppo_clip)
                loss = -self._mean(torch.minimum(ratio * adv, clipped * adv), n_global * new.shape[0])
                loss, anchor = self._add_anchor(loss, users, rows, traj, lo, n_global)
                grad_norm = self._update(loss)
            clipped_count = ((ratio - 1).abs() > cfg.ppo_clip).float()
            clip_frac = float(clipped_count.mean()) if self.world == 1 else float(
                dist.all_reduce_sum(clipped_count.sum().double().reshape(1))[0]) / clipped_count.shape[0] / n_global
        return {
            "reward": float(reward.reward.mean()), "n_k": float(reward.n_k.mean()),
            "n_sim_k": float(reward.n_sim_k.mean()), "loss": self._global_value(loss), "anchor": anchor,
            "grad_norm": grad_norm, "ppo_clip_fraction": clip_frac,
            "sample_s": round(t_sample, 4), "step_s": round(time.perf_counter() - t0, 4),
        }

    def _add_anchor(self, loss, users, rows, traj, lo: int = 0, n_global: Optional[int] = None):
        """loss + anchor_weight * anchor (its gradient is averaged over the ranks with the rest)."""
        cfg = self.config
        n_global = rows.shape[0] if n_global is None else n_global
        if cfg.anchor == "none":
            return loss, 0.0
        if cfg.anchor == "elbo":
            self.rec.model.eval()
            diffusion = self.rec.diffusion
            if self.world == 1:
                anchor = diffusion.training_loss(self.rec.denoiser(users, rows), rows, generator=self.generator).mean()
            else:  # global draws, sliced; the global batch's losses feed the importance sampler
                per_user, t, raw = diffusion.training_loss(self.rec.denoiser(users, rows), rows,
                                                           generator=self.generator, rows=(lo, n_global),
                                                           record=False, return_parts=True)
                seen = dist.all_gather_rows(torch.stack([t.double().cpu(), raw.double().cpu()], 1))
                diffusion.record_losses(seen[:, 0].long(), seen[:, 1])
                anchor = self._mean(per_user, n_global)
        else:  # KL between the steps' Gaussians under the current and the pretrained model
            S, B, I = traj.preds.shape
            ref = Recommender(self.rec.model_name, self.reference_model, self.rec.diffusion,
                              precision=self.rec.precision)
            with torch.no_grad():
                cond = _repeat_cond(self.reference_model.condition(users, rows), S)
                t = traj.timesteps.repeat_interleave(B)
                with _autocast(ref):
                    old = self.reference_model(traj.states[:-1].reshape(S * B, I), t, cond).float()
            cond = _repeat_cond(self.rec.model.condition(users, rows), S)
            with _autocast(self.rec):
                new = self.rec.model(traj.states[:-1].reshape(S * B, I), t, cond).float()
            scale = (traj.coef_pred ** 2 * torch.exp(-traj.log_var) / 2).repeat_interleave(B)[:, None]
            anchor = self._mean((scale * (new - old) ** 2).sum(1).view(S, B).sum(0), n_global)
            if cfg.reduction == "mean":
                anchor = anchor / I
        return loss + cfg.anchor_weight * anchor, self._global_value(anchor)

    def _update(self, loss) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(self.rec.model.parameters())
        norm = torch.nn.utils.clip_grad_norm_(self.rec.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return float(norm)

    def state(self) -> Dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "baseline": self.baseline.state(),
                "rng": rng_state(self.generator)}

    def load(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline.load(state["baseline"])
        set_rng_state(state["rng"], self.generator)


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
    it = [r["iteration"] for r in records if "reward" in r]
    rw = [r["reward"] for r in records if "reward" in r]
    ev = [r for r in records if "valid" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(it, rw, lw=0.8, color="tab:blue", alpha=0.5, label="batch")
    if len(rw) >= 5:
        w = max(1, len(rw) // 20)
        smooth = np.convolve(rw, np.ones(w) / w, mode="valid")
        ax[0].plot(it[w - 1:], smooth, color="tab:blue", label=f"mean of {w}")
    ax[0].set(xlabel="iteration", ylabel="reward", title="ReFiT reward")
    ax[0].legend()
    if ev:
        xs = [r["iteration"] for r in ev]
        ax[1].plot(xs, [r["valid"]["recall@20"] for r in ev], "o-", label="Recall@20")
        ax[1].plot(xs, [r["valid"]["ndcg@20"] for r in ev], "s-", label="NDCG@20")
        ax[1].set(xlabel="iteration", title="validation")
        ax[1].legend()
    fig.tight_layout()
    path = run.file("plot.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finetune(config: FinetuneConfig, data: Optional[InteractionData] = None, *, resume: bool = False,
             device: Any = "cpu", max_iterations_this_run: Optional[int] = None) -> Dict[str, Any]:
    """Runs (or resumes) ReFiT from a pretrained checkpoint; returns the summary (also summary.json).

    ``max_iterations_this_run`` stops early without finishing (as a killed run would).

    SIGTERM or SIGINT stops the run at the end of the current iteration: it
    writes ``last.pt`` and a ``summary.json`` with ``status: "stopped"`` and
    the signal in ``stop_reason`` (``--resume`` continues it). The summary is
    also rewritten at every evaluation (``status: "running"``).

    Under torch.distributed every rank calls this; rank 0 alone writes the run
    folder. A run may be resumed with another number of processes: its
    checkpoint holds the global iteration, the optimiser and the generator
    state, which are the same on every rank.
    """
    with StopRequests() as stops:
        return _finetune(config, data, resume, device, max_iterations_this_run, stops)


def _finetune(config: FinetuneConfig, data: Optional[InteractionData], resume: bool, device: Any,
              max_iterations_this_run: Optional[int], stops: StopRequests) -> Dict[str, Any]:
    t_start = time.perf_counter()
    dist.warn_if_not_joined("finetune")
    run = RunDir(config.out)
    main = dist.is_main()
    from .data import load_dataset

    if data is None and config.data is not None:
        data = load_dataset(config.data, **config.data_options)
    rec, data, pre_state = load_recommender(config.checkpoint, data, device=device, precision=config.precision)
    fingerprint = data_fingerprint(data)
    torch.manual_seed(config.seed)
    trainer = ReFiT(rec, data, config)

    start, best = 1, None
    elapsed_before = 0.0
    if resume and os.path.exists(run.file("last.pt")):
        state = load_checkpoint(run.file("last.pt"))
        saved = {k: v for k, v in state["config"].items() if k not in ("iterations", "progress", "out", "plot")}
        mine = {k: v for k, v in config.to_dict().items() if k not in ("iterations", "progress", "out", "plot")}
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            raise ValueError(f"cannot resume {run.path}: started with other settings ({', '.join(diff)})")
        if state["data"]["fingerprint"] != fingerprint:
            raise ValueError(f"cannot resume {run.path}: it was fine-tuned on other data")
        rec.model.load_state_dict(state["recommender"]["model"]["state_dict"])
        trainer.load(state["trainer"])
        start, best, elapsed_before = state["iteration"] + 1, state["best"], state.get("elapsed", 0.0)
        if main:
            run.truncate_log(lambda r: r.get("iteration", 0) <= state["iteration"])
    if main:
        run.write_json("config.json", {**config.to_dict(), "data_fingerprint": fingerprint,
                                       "pretrained": os.path.abspath(config.checkpoint)})

    def ckpt(iteration: int) -> Dict[str, Any]:
        return {"kind": "finetune", "recommender": rec.state(), "config": config.to_dict(),
                "data": {**pre_state.get("data", {}), "fingerprint": fingerprint},
                "iteration": iteration, "best": best, "pretrained": os.path.abspath(config.checkpoint)}

    def evaluate(iteration: int) -> Dict[str, Any]:
        t = time.perf_counter()
        metrics = evaluate_recommender(rec, data, ks=config.ks, batch_size=config.eval_batch_size)
        return {"iteration": iteration, "valid": metrics["valid"], "test": metrics["test"],
                "eval_s": round(time.perf_counter() - t, 3)}

    if best is None:  # iteration 0: the pretrained model itself
        record = evaluate(0)
        best = {"iteration": 0, "value": record["valid"][SELECTION_METRIC], "valid": record["valid"],
                "test": record["test"], "before": {"valid": record["valid"], "test": record["test"]}}
        if main:
            run.log(record)
            save_checkpoint(run.file("best.pt"), ckpt(0))

    bar = Progress(config.progress if main else False, total=config.iterations, initial=start - 1, desc="refit",
                   unit="it")
    step_times = []
    iteration = start - 1
    stop_reason = "iterations"

    def summary_now(status: str) -> Dict[str, Any]:
        return {
            "status": status,
            "stop_reason": None if status == "running" else stop_reason,
            "best_iteration": best["iteration"],
            "selection": f"valid {SELECTION_METRIC}",
            "before": best["before"],
            "valid": best["valid"],
            "test": best["test"],
            "iterations": iteration,
            "iterations_planned": config.iterations,
            "seconds": round(elapsed_before + time.perf_counter() - t_start, 2),
            "s_per_iteration": round(float(np.median(step_times)), 4) if step_times else None,
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "checkpoint": run.file("best.pt"),
            "world_size": dist.world_size(),
        }

    for iteration in range(start, config.iterations + 1):
        if max_iterations_this_run is not None and iteration - start >= max_iterations_this_run:
            bar.close()
            return {"stopped_at": iteration - 1}
        stats = trainer.step()
        step_times.append(stats["step_s"])
        last = iteration == config.iterations
        if not last and stops.requested():
            stop_reason, last = stops.signal_name, True
        record = {"iteration": iteration, **stats}
        evaluated = iteration % config.eval_every == 0 or iteration == config.iterations
        if evaluated:
            record.update({k: v for k, v in evaluate(iteration).items() if k != "iteration"})
            if record["valid"][SELECTION_METRIC] > best["value"]:
                best.update(iteration=iteration, value=record["valid"][SELECTION_METRIC], valid=record["valid"],
                            test=record["test"])
                if main:
                    save_checkpoint(run.file("best.pt"), ckpt(iteration))
        if main:
            run.log(record)
        if main and (iteration % config.checkpoint_every == 0 or last):
            save_checkpoint(run.file("last.pt"), {**ckpt(iteration), "trainer": trainer.state(),
                                                  "elapsed": elapsed_before + time.perf_counter() - t_start})
        if main and evaluated and not last:
            run.write_json("summary.json", summary_now("running"))
        bar.update(1, reward=f"{stats['reward']:.3f}", best=f"{best['value']:.4f}@{best['iteration']}")
        if last:
            break
    bar.close()
    stopped = stop_reason != "iterations"
    if stopped:
        log.warning("finetune: stopped by %s after iteration %d of %d; last.pt holds it: continue with --resume",
                    stop_reason, iteration, config.iterations)
    summary = summary_now("stopped" if stopped else "finished")
    if main:
        if config.plot:
            summary["plot"] = _plot(run)
        run.write_json("summary.json", summary)
    dist.barrier()  # the run folder is complete before any rank returns
    return summary
