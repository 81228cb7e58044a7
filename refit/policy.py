"""The diffusion-policy protocol: all the ReFiT trainer knows of a diffusion recommender.

A reverse denoising process is a policy: each of its stochastic steps draws
``x_{s+1} ~ N(coef_pred[s] * out_s + coef_x[s] * x_s, exp(log_var[s]))``
where ``out_s`` is the denoiser's output. Post-training needs only this of a
model (``inputs`` are an :class:`~refit.reward.Episode`'s policy inputs,
``users`` its ids; B rows, S stochastic steps, D the dimension of a state):

``sample(users, inputs, *, generator=None, temperature=1.0, rows=None, keep_graph=False) -> Trajectory``
    Runs the reverse process with noise and returns a
    :class:`~refit.diffusion.Trajectory`: ``states`` (S+1, B, D), ``preds``
    (S, B, D), per-step ``coef_pred``, ``coef_x``, ``log_var``, ``timesteps``
    (S,), and the ``final`` (B, D) state. No gradient unless ``keep_graph``.
    ``rows=(offset, total)``: the batch is a slice of a global batch; every
    random draw is the global batch's, sliced (see :mod:`refit.distributed`).
``outputs(users, inputs, traj) -> Tensor``
    The denoiser's (S, B, D) outputs along a given trajectory, re-evaluated
    with gradient (in one batched forward pass). With the trajectory's
    constants they give its log-likelihood through
    :func:`refit_kernels.gaussian_logprob`.
``final_scores(users, inputs, final) -> Tensor``
    (B, n_items) ranking scores of final states (for the reward).
``pretraining_loss(episode, *, generator=None, rows=None) -> Tensor``
    (B,) the model's own training loss on the episode's data (the ELBO
    anchor).
``denoising_loss(users, inputs, x0, *, generator=None, rows=None) -> Tensor``
    (B,) the model's denoising loss toward given clean states ``x0`` (B, D)
    (reward-weighted fine-tuning toward sampled final states).
``training_target(users, inputs, final, *, exclude=None, k=20) -> Tensor``
    (B, D) what a sampled final state stands for as a target of
    ``denoising_loss`` (reward-weighted fine-tuning): DreamRec's generated
    embedding itself; for DiffRec's score rows, the binary row of the start
    row's items and the top-k list the reward judged.
``evaluate(data, *, ks, batch_size) -> {"valid": metrics, "test": metrics}``
    Full-ranking metrics; ``selection_metric`` names the one that selects
    the best model ("recall@20", "hr@20").
``module``, ``precision``, ``device``, ``state()``
    The ``torch.nn.Module`` holding every trained parameter (optimised,
    switched between train and eval mode, deep-copied for the KL anchor), the
    autocast precision, the device, and everything a checkpoint holds.

refit's :class:`~refit.recommender.Recommender` (DiffRec, CF-Diff) and
:class:`~refit.sequential.SeqRecommender` (DreamRec) implement it;
:class:`ScheduleDenoiser` adapts any ``denoiser(x_t, t)`` with a beta schedule
written the way DiffRec's paper code is.

Where episodes come from depends on the data, not on the model:
:func:`episode_source` gives interaction data's (a user's training row with a
fraction of its items hidden: :func:`refit.reward.make_episode`) or sequence
data's (a training target and the window before it:
:func:`refit.reward.sequence_episode`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence

import numpy as np
import torch

import refit_kernels as rk

from .diffusion import MEAN_TYPES, GaussianDiffusion, Trajectory
from .reward import Episode, make_episode, sequence_episode

#: The protocol's method names (what :func:`check_policy` looks for).
PROTOCOL = ("sample", "outputs", "final_scores", "pretraining_loss", "denoising_loss", "training_target", "evaluate",
            "state", "module",
            "selection_metric", "precision", "device")


def check_policy(policy: Any) -> None:
    """Raises TypeError naming what a would-be policy lacks."""
    missing = [name for name in PROTOCOL if not hasattr(policy, name)]
    if missing:
        raise TypeError(f"{type(policy).__name__} is not a diffusion policy: it lacks {', '.join(missing)} "
                        "(see refit.policy)")


def batched_outputs(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], traj: Trajectory) -> torch.Tensor:
    """(S, B, D) outputs of ``forward(x (S*B, D), t (S*B,))`` along a trajectory, in one call.

    Every stochastic step is re-evaluated in one forward pass over S * B rows
    (larger matrix products than S passes of B rows); ``forward`` repeats any
    per-row conditioning S times itself.
    """
    S, B, D = traj.preds.shape
    if S == 0:
        return traj.preds.new_zeros((0, B, D))
    t = traj.timesteps.repeat_interleave(B)
    with torch.enable_grad():
        out = forward(traj.states[:-1].reshape(S * B, D), t)
    return out.float().view(S, B, D)


# --- where episodes come from ------------------------------------------------------------------------

class InteractionEpisodes:
    """Episodes of interaction data: users with at least ``min_items`` training items, drawn
    uniformly; each episode hides a fraction of the user's items (``target="hidden"``) or
    shows them all (``"observed"``); see :func:`refit.reward.make_episode`."""

    selection_metric = "recall@20"

    def __init__(self, data, target: str = "hidden", hide_fraction: float = 0.2):
        self.train = rk.as_csr(data.train, "train")
        self.target, self.hide_fraction = target, hide_fraction
        counts = self.train.indptr.diff()
        min_items = 2 if target == "hidden" else 1
        self.candidates = torch.nonzero(counts >= min_items).flatten()
        if self.candidates.numel() == 0:
            raise ValueError(f"no user has {min_items} or more training items to fine-tune on")

    @property
    def neighbor_sets(self) -> rk.CSR:
        """The training interactions whose rows N_sim-K counts (n_users x n_items)."""
        return self.train

    def sample(self, n: int, generator: torch.Generator) -> Episode:
        pick = torch.randperm(self.candidates.numel(), generator=generator)[:n]
        return make_episode(self.train, self.candidates[pick], self.target, self.hide_fraction, generator)


class SequenceEpisodes:
    """Episodes of sequence data: training targets drawn uniformly, each predicted from the window
    before it; N_K counts the target, N_sim-K the training items of the most similar sequences."""

    selection_metric = "hr@20"

    def __init__(self, data):
        self.data = data
        self.targets = data.targets["train"]
        if len(self.targets) == 0:
            raise ValueError("the sequence data has no training targets to fine-tune on")
        self.train = rk.as_csr(data.train, "train")

    @property
    def neighbor_sets(self) -> rk.CSR:
        return self.train

    def sample(self, n: int, generator: torch.Generator) -> Episode:
        pick = torch.randperm(len(self.targets), generator=generator)[:n]
        return sequence_episode(self.data, self.targets[pick])


def episode_source(data, target: str = "hidden", hide_fraction: float = 0.2):
    """:class:`SequenceEpisodes` for sequence data, :class:`InteractionEpisodes` otherwise."""
    if hasattr(data, "targets") and hasattr(data, "windows"):
        return SequenceEpisodes(data)
    return InteractionEpisodes(data, target, hide_fraction)


# --- an adapter for outside models -------------------------------------------------------------------

class _Wrapped(torch.nn.Module):
    """An outside ``denoiser(x_t, t)`` behind refit's denoiser interface ``model(x_t, t, cond)``."""

    def __init__(self, denoiser: torch.nn.Module, n_items: int):
        super().__init__()
        self.denoiser, self.n_items = denoiser, n_items

    def condition(self, users, rows):
        return None

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.denoiser(x, t)

    def config(self) -> Dict[str, Any]:
        return {"n_items": self.n_items, "external": type(self.denoiser).__qualname__}


def ScheduleDenoiser(denoiser: torch.nn.Module, betas: Sequence[float], *, n_items: int, mean_type: str = "x0",
                     sampling_steps: int = 0, sampling_noise: bool = False, precision: str = "fp32"):
    """A diffusion policy over interaction rows from any ``denoiser(x_t, t)`` and its betas.

    Written for models built the way DiffRec's paper code builds them: a
    module called as ``denoiser(x (B, I), timesteps (B,) int64)`` that
    predicts x0 (``mean_type="x0"``) or the noise (``"eps"``), and the (T,)
    betas of its schedule (e.g. ``GaussianDiffusion.betas`` of that code).
    The reverse process starts from the user's (partly hidden) training row,
    as DiffRec's does. Returns a :class:`refit.recommender.Recommender`, which
    implements the protocol; its checkpoints hold the outside module's
    ``state_dict`` (load it back into that module with
    ``denoiser.load_state_dict(state["recommender"]["model"]["state_dict"])``
    after stripping the ``denoiser.`` prefix, or with :func:`outside_state_dict`).
    """
    from .recommender import Recommender

    if mean_type not in MEAN_TYPES:
        raise ValueError(f"mean_type must be one of {MEAN_TYPES}, got {mean_type!r}")
    device = next(denoiser.parameters()).device
    diffusion = GaussianDiffusion.from_betas(np.asarray(betas, dtype=np.float64), mean_type=mean_type, device=device)
    return Recommender("external", _Wrapped(denoiser, n_items), diffusion, sampling_steps=sampling_steps,
                       sampling_noise=sampling_noise, precision=precision)


def outside_state_dict(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The outside module's own ``state_dict`` from a checkpoint of a :func:`ScheduleDenoiser` policy."""
    sd = state["recommender"]["model"]["state_dict"] if "recommender" in state else state["model"]["state_dict"]
    return {k[len("denoiser."):]: v for k, v in sd.items() if k.startswith("denoiser.")}


__all__ = ["PROTOCOL", "check_policy", "batched_outputs", "InteractionEpisodes", "SequenceEpisodes",
           "episode_source", "ScheduleDenoiser", "outside_state_dict"]
