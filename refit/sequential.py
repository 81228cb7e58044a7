"""Sequential recommendation with DreamRec and PreferDiff: the recommender, its sampler, pretraining, evaluation.

A :class:`SeqRecommender` is a :class:`~refit.models.dreamrec.DreamRec`
network (or a :class:`~refit.models.preferdiff.PreferDiff` one: the same
interface, PreferDiff's encoder block and loss), a Gaussian diffusion over
D-dimensional item embeddings (x0 prediction, uniform timesteps, one of the
full-range schedules of :mod:`refit.diffusion`) and the guidance weight ``w``. Recommending for a
history means: encode it into the guidance h, start from x_T ~ N(0, I), take
the T reverse steps with the guided x0 prediction as the step's mean input
(posterior noise at every step but the last), and rank items by the inner
product of the result with every item embedding.

PreferDiff's checkpoints are written under the same model name, ``"dreamrec"``
(the family every loader dispatches on: :func:`load_seq_recommender`,
:func:`refit.trainer.load_policy`, ``refit evaluate``), with ``"network":
"preferdiff"`` beside it; :data:`NETWORKS` maps that entry to the class. With
``eval_eta=0`` (PreferDiff's default) recommending takes DDIM's deterministic
steps over ``eval_steps`` respaced timesteps instead of the posterior's.

``pretrain_dreamrec(config)`` (a :class:`DreamRecConfig` or a
:class:`PreferDiffConfig`) trains it on the training targets of a
:class:`~refit.data.sequences.SequenceData` (each target predicted from the window of
``max_len`` items before it) with the loop every pretraining run shares
(:mod:`refit.runtime.loop`): run folder, checkpoints, ``--resume``, early stopping on
validation HR@20, time budget, signals, bf16 and torchrun.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

from .runtime import distributed as dist
from .runtime.control import StopRequests
from .diffusion import FULL_SCHEDULES, SCHEDULES, DiffusionConfig, GaussianDiffusion, _normal, rl_diffusion
from .limits import check_finite, check_memory, check_run_settings
from .runtime.loop import EpochTask, run_epochs
from .models.dreamrec import DIFFUSERS, DreamRec
from .models.preferdiff import PAIRINGS, RECONSTRUCTIONS, PreferDiff, check_loss_settings
from .recommender import PRECISIONS, autocast
from .settings import (finite_float, int_list, nonnegative_int, positive_float, positive_int, seed as seed_type,
                       setting, weight_grid)
from .runtime.runs import (RunDir, checkpoint_data, data_fingerprint, load_checkpoint, rng_state, save_checkpoint,
                   set_rng_state)

log = logging.getLogger(__name__)

SEQ_SELECTION = "hr@20"
SEQ_KS = (10, 20, 50)

#: Warm starts of ``DreamRecConfig.embedding_warmup``.
WARMUPS = ("none", "ce")
#: The automatic warm start (``warmup_epochs=None``) ends after this many epochs without a better
#: validation HR@20 of the cross-entropy model's own scores (its best weights go on), or at half the
#: run's epochs or time budget; see docs/models.md.
WARMUP_PATIENCE = 2
#: The guidance weights a sequential run chooses among after training (``w_grid``), on validation.
W_GRID = (0.0, 0.5, 1.0, 2.0, 4.0)

#: The networks a sequential checkpoint can hold (its ``model.network`` entry; absent: DreamRec).
NETWORKS = {"dreamrec": DreamRec, "preferdiff": PreferDiff}


def _check_eta(eta) -> Optional[float]:
    if eta is None:
        return None
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eval_eta must be None (the posterior) or a finite number >= 0, got {eta!r}")
    return float(eta)


class SeqRecommender:
    """DreamRec (or PreferDiff) + its diffusion + guidance weight + evaluation sampler, saved and restored as one.

    Shapes: histories (B, L) int64 right-padded with ``n_items``, lengths
    (B,) int64; embeddings (B, D) float32; scores (B, n_items) float32.
    """

    model_name = "dreamrec"

    def __init__(self, model: DreamRec, diffusion: GaussianDiffusion, *, w: float = 2.0, precision: str = "fp32",
                 eval_steps: Optional[int] = None, eval_eta: Optional[float] = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if diffusion.betas is None or diffusion.config.mean_type != "x0":
            raise ValueError("DreamRec needs an x0-predicting diffusion with a noise schedule")
        if not w >= 0:
            raise ValueError(f"the guidance weight w must be >= 0, got {w}")
        self.model, self.diffusion, self.w, self.precision = model, diffusion, float(w), precision
        self.eval_steps = None
        self.set_eval_steps(eval_steps)
        self.eval_eta = _check_eta(eval_eta)

    def set_eval_eta(self, eta: Optional[float]) -> None:
        """Recommend with DDIM's reverse steps of noise level ``eta`` (0: deterministic, PreferDiff's
        sampler; None or 1: the posterior, DreamRec's; see
        :meth:`refit.diffusion.GaussianDiffusion.step_constants`). Trajectories for fine-tuning take the
        ``eta`` their caller passes, not this one."""
        self.eval_eta = _check_eta(eta)

    @property
    def network(self) -> str:
        """Which network this recommender holds: ``"dreamrec"`` or ``"preferdiff"`` (:data:`NETWORKS`), or
        an outside module's class name (:class:`refit.latent_adapter.OutsideSeqRecommender`)."""
        return getattr(self.model, "network_name", type(self.model).__name__)

    def set_eval_steps(self, steps: Optional[int]) -> None:
        """Recommend (:meth:`generate`, :meth:`scores`) with ``steps`` respaced reverse steps instead of all T
        (``None``: all; see :meth:`refit.diffusion.GaussianDiffusion.respaced`). Training, and the
        trajectories of :meth:`sample` and :meth:`sample_from`, use the full schedule unless given ``steps``."""
        if steps is not None and steps != self.diffusion.steps:
            self._eval_diffusion = self.diffusion.respaced(int(steps))
            self.eval_steps = int(steps)
        else:
            self._eval_diffusion, self.eval_steps = self.diffusion, None

    @property
    def device(self) -> torch.device:
        return self.model.none_embedding.device

    @property
    def n_items(self) -> int:
        return self.model.n_items

    def guidance(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, D) float32 guidance h of history windows (in the model's current train/eval mode)."""
        with autocast(self.precision, self.device):
            h = self.model.encode(history.to(self.device), lengths.to(self.device))
        return h.float()

    def denoiser(self, h: torch.Tensor):
        """``f(x_t, t)``: the guided x0 prediction for guidance h, float32 (the policy's mean input)."""
        model, w, ctx = self.model, self.w, self.precision

        def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast(ctx, x.device):
                out = model.guided(x, h, t, w)
            return out.float()

        return f

    def start_noise(self, batch: int, generator: Optional[torch.Generator] = None,
                    rows: Optional[Tuple[int, int]] = None, group_size: int = 1) -> torch.Tensor:
        """x_T ~ N(0, I), (B, D) float32 (``rows``: a slice of a global batch's draw); with ``group_size``
        G, one draw for each run of G consecutive rows of the global batch (a group's shared start)."""
        if group_size == 1:
            return _normal((batch, self.model.hidden), torch.float32, self.device, generator, rows)
        total = batch if rows is None else rows[1]
        if total % group_size:
            raise ValueError(f"a batch of {total} rows does not split into groups of {group_size}")
        x = _normal((total // group_size, self.model.hidden), torch.float32, self.device, generator)
        x = x.repeat_interleave(group_size, 0)
        return x if rows is None else x[rows[0]:rows[0] + batch]

    def sample_from(self, h: torch.Tensor, *, generator: Optional[torch.Generator] = None,
                    return_trajectory: bool = False, keep_graph: bool = False, temperature: float = 1.0,
                    rows: Optional[Tuple[int, int]] = None, steps: Optional[int] = None,
                    eta: Optional[float] = None, explore: Optional[Tuple[int, int]] = None, group_size: int = 1):
        """Ancestral sampling from pure noise: the final (B, D) embeddings, or a
        :class:`~refit.diffusion.Trajectory` of the stochastic steps (whose ``preds`` are the guided
        x0 predictions and whose ``final`` is the generated embedding). ``steps``: that many respaced
        reverse steps instead of all T (``steps - 1`` of them stochastic); ``eta``: DDIM's noise level
        (None: the posterior; see :meth:`refit.diffusion.GaussianDiffusion.step_constants`);
        ``explore``: only these steps draw noise (see :meth:`~refit.diffusion.GaussianDiffusion.sample`);
        ``group_size``: each run of that many rows starts from one shared x_T."""
        x_T = self.start_noise(h.shape[0], generator, rows, group_size)
        return rl_diffusion(self, steps).sample(self.denoiser(h), x_T, noise=True, return_trajectory=return_trajectory,
                                                keep_graph=keep_graph, generator=generator, temperature=temperature,
                                                rows=rows, eta=eta, explore=explore)

    @torch.no_grad()
    def generate(self, history: torch.Tensor, lengths: torch.Tensor,
                 generator: Optional[torch.Generator] = None, fast: Optional[bool] = None) -> torch.Tensor:
        """(B, D) generated embeddings for history windows, in eval mode.

        ``fast`` (default: when the denoiser is ``mlp1``): the same reverse
        process with its linear algebra folded: since the denoiser is linear
        in x, h and the step features, one step is
        ``x' = x A_t + cp_t (G + c_t) + sigma_t eps`` with
        ``A_t = cp_t W_x^T + cx_t I``, ``G = (1 + w) h W_h^T - w null W_h^T``
        and ``c_t`` the step's constant, all computed once per pass; the noise
        is drawn in the same order as :meth:`sample_from`, so both give the same
        embeddings up to float32 rounding. No tensor is allocated per step.
        With ``eval_eta`` set the steps are DDIM's of that noise level (eta 0:
        no noise is drawn after x_T).
        """
        was = self.model.training
        self.model.eval()
        try:
            h = self.guidance(history, lengths)
            parts = self.model.linear_parts()
            if fast is False or parts is None or self.precision != "fp32":
                x_T = self.start_noise(h.shape[0], generator)
                return self._eval_diffusion.sample(self.denoiser(h), x_T, noise=self.eval_eta != 0,
                                                   generator=generator, eta=self.eval_eta)
            return self._generate_linear(h, parts, generator)
        finally:
            self.model.train(was)

    def _generate_linear(self, h, parts, generator):
        W_x, W_h, W_t, b = (p.detach().float() for p in parts)
        d = self._eval_diffusion
        T, D, B = d.steps, self.model.hidden, h.shape[0]
        dev = h.device
        cp, cx, lv = d.step_constants(dev, self.eval_eta)
        noisy = self.eval_eta != 0
        steps = d.model_timesteps(torch.arange(T, device=dev))
        c = self.model.step_features(steps).float() @ W_t.t() + b  # (T, D)
        null = self.model.none_embedding.detach().float()
        G = (1.0 + self.w) * (h @ W_h.t()) - self.w * (null @ W_h.t())  # (B, D)
        eye = torch.eye(D, device=dev)
        A = cp[:, None, None] * W_x.t()[None] + cx[:, None, None] * eye[None]  # (T, D, D)
        cp_c = c * cp[:, None]  # (T, D): cp_t c_t
        cps, sigmas = cp.tolist(), torch.exp(0.5 * lv).tolist()
        x = self.start_noise(B, generator)
        nxt = torch.empty_like(x)
        eps = torch.empty_like(x)
        gen_dev = generator.device if generator is not None else dev
        for i in range(T - 1, -1, -1):
            torch.mm(x, A[i], out=nxt)
            nxt.add_(G, alpha=cps[i])
            nxt.add_(cp_c[i])
            if i > 0 and noisy:
                if gen_dev == dev:
                    torch.randn((B, D), generator=generator, out=eps)
                else:
                    eps.copy_(torch.randn((B, D), generator=generator, device=gen_dev))
                nxt.add_(eps, alpha=sigmas[i])
            x, nxt = nxt, x
        return x

    # --- the diffusion-policy protocol (refit.policy) -------------------------------------------

    selection_metric = "hr@20"
    data_kind = "sequences"

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def sample(self, users: torch.Tensor, inputs, *, generator: Optional[torch.Generator] = None,
               temperature: float = 1.0, rows: Optional[Tuple[int, int]] = None, keep_graph: bool = False,
               steps: Optional[int] = None, eta: Optional[float] = None, explore: Optional[Tuple[int, int]] = None,
               group_size: int = 1):
        """A trajectory from pure noise for the ``(history, lengths)`` windows ``inputs``: the guided
        predictions are the policy's step outputs (see :mod:`refit.policy`; ``steps``, ``eta``,
        ``explore``, ``group_size``: see :meth:`sample_from`)."""
        history, lengths = inputs
        with torch.set_grad_enabled(keep_graph):
            h = self.guidance(history, lengths)
        return self.sample_from(h, generator=generator, return_trajectory=True, keep_graph=keep_graph,
                                temperature=temperature, rows=rows, steps=steps, eta=eta, explore=explore,
                                group_size=group_size)

    def sample_final(self, users: torch.Tensor, inputs, *, generator: Optional[torch.Generator] = None,
                     temperature: float = 1.0, rows: Optional[Tuple[int, int]] = None, grad_steps: int = 1,
                     steps: Optional[int] = None, eta: Optional[float] = None) -> torch.Tensor:
        """(B, D) generated embeddings whose last ``grad_steps`` reverse steps keep their graph (reward
        backpropagation): differentiable in the denoiser's weights and, through the guidance, in the
        encoder's; the state those steps start from is a constant. The same noise as :meth:`sample_from`
        with the same generator (``steps``, ``eta``: as there)."""
        history, lengths = inputs
        with torch.enable_grad():
            h = self.guidance(history, lengths)
        x_T = self.start_noise(h.shape[0], generator, rows)
        return rl_diffusion(self, steps).sample(self.denoiser(h), x_T, noise=True, generator=generator,
                                                temperature=temperature, rows=rows, eta=eta, grad_steps=grad_steps)

    def differentiable_scores(self, users: torch.Tensor, inputs, final: torch.Tensor) -> torch.Tensor:
        """(B, n_items) inner products with every item embedding, with gradient (the item table's too)."""
        return self.model.item_scores(final).float()

    def outputs(self, users: torch.Tensor, inputs, traj) -> torch.Tensor:
        """(S, B, D) guided x0 predictions along ``traj``, with gradient (through the guidance too)."""
        from .policy import batched_outputs

        history, lengths = inputs
        with torch.enable_grad():
            h = self.guidance(history, lengths).repeat(traj.preds.shape[0], 1)
        model, w, ctx = self.model, self.w, self.precision

        def forward(x, t):
            with autocast(ctx, x.device):
                return model.guided(x, h, t, w)

        return batched_outputs(forward, traj)

    def final_scores(self, users: torch.Tensor, inputs, final: torch.Tensor) -> torch.Tensor:
        """(B, n_items) inner products of generated embeddings with every item embedding."""
        with torch.no_grad():
            return self.model.item_scores(final).float()

    def pretraining_loss(self, episode, *, generator: Optional[torch.Generator] = None,
                         rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(B,) the network's own loss on the episode: DreamRec's denoising toward the target item's
        embedding, or PreferDiff's (:func:`preferdiff_loss`, the episode's targets its batch; under
        torchrun the global batch's, gathered)."""
        history, lengths = episode.inputs
        targets = episode.positives.indices.to(self.device)
        if isinstance(self.model, PreferDiff):
            batch = targets if rows is None or rows[1] == targets.shape[0] else dist.all_gather_rows(targets)
            return preferdiff_loss(self, history, lengths, targets, generator=generator, rows=rows,
                                   batch_targets=batch)
        return dreamrec_loss(self, history, lengths, targets=targets, generator=generator, rows=rows)

    def denoising_loss(self, users: torch.Tensor, inputs, x0: torch.Tensor, *,
                       generator: Optional[torch.Generator] = None,
                       rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(B,) the squared error of the guided prediction (the policy's mean input) toward given (B, D)
        embeddings ``x0`` (sampled ones, detached). Training the guided mean, not each branch, keeps
        training on the model's own samples from compounding the guidance: a branch trained toward
        guided samples would be extrapolated by the guidance again at the next sampling."""
        history, lengths = inputs
        if isinstance(self.model, PreferDiff):  # its own reconstruction error (cosine by default)
            return preferdiff_denoising_loss(self, history, lengths, x0.detach(), generator=generator, rows=rows)
        return dreamrec_loss(self, history, lengths, x0=x0.detach(), generator=generator, rows=rows, guided=True)

    def training_target(self, users: torch.Tensor, inputs, final: torch.Tensor, *, exclude=None,
                        k: int = 20) -> torch.Tensor:
        """(B, D) the sampled final states rescaled to the item embeddings' mean norm (detached).

        Items are ranked by inner product, so a final state's norm changes neither its ranking nor its
        reward. Guidance inflates it, though (on ml-1m_seq about 21 against 8 for an item embedding),
        and a model trained toward its own inflated samples samples larger ones still: the loss grew
        from about 2 to over 100 within 120 iterations of reward-weighted fine-tuning, and validation
        HR@20 fell from 0.199 to 0.06. At the items' scale the same runs stayed level."""
        final = final.detach().float()
        scale = self.model.item_embeddings.weight[: self.model.n_items].detach().float().norm(dim=1).mean()
        return final / final.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale

    def evaluate(self, data, *, ks=SEQ_KS, batch_size: int = 2048, seed: int = 0) -> Dict[str, Dict[str, float]]:
        return evaluate_dreamrec(self, data, ks=ks, batch_size=batch_size, seed=seed)

    @torch.no_grad()
    def scores(self, history: torch.Tensor, lengths: torch.Tensor, generator: Optional[torch.Generator] = None,
               include_padding: bool = False) -> torch.Tensor:
        """(B, n_items) float32 scores: inner products of generated embeddings with the item embeddings."""
        x = self.generate(history, lengths, generator)
        return self.model.item_scores(x, include_padding=include_padding).float()

    def state(self) -> Dict[str, Any]:
        return {
            "model": {"name": self.model_name, "config": self.model.config(),
                      "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                      # refit's own networks only: an outside module is rebuilt by its owner
                      **({"network": self.network} if self.network in NETWORKS else {})},
            "diffusion": self.diffusion.config.to_dict(),
            "inference": {"w": self.w, "precision": self.precision, "eval_steps": self.eval_steps,
                          "eval_eta": self.eval_eta},
        }

    @classmethod
    def from_state(cls, state: Dict[str, Any], device="cpu", precision: Optional[str] = None, *,
                   source: Optional[str] = None) -> "SeqRecommender":
        """Rebuilds a DreamRec (or the PreferDiff its ``network`` entry names) from :meth:`state`;
        ``source``, the checkpoint it was read from, is named in the errors. A state with a NaN or infinite
        weight is refused (ValueError naming the tensor)."""
        from .runtime.runs import check_finite_weights

        what = f"checkpoint {source!r}" if source else "the checkpoint"
        try:
            m = state["model"]
            if m["name"] != cls.model_name:
                raise ValueError(f"{what} holds a {m['name']!r} model, not {cls.model_name!r}")
            network = m.get("network", "dreamrec")
            if network not in NETWORKS:
                raise ValueError(f"{what} holds a {network!r} network; refit knows {', '.join(NETWORKS)}")
            check_finite_weights(m["state_dict"], what)
            model = NETWORKS[network](**dict(m["config"]))
            model.load_state_dict(m["state_dict"], strict=True)
            diffusion = GaussianDiffusion(DiffusionConfig(**state["diffusion"]), device=device)
            inf = dict(state["inference"])
        except KeyError as exc:
            raise ValueError(f"{what} is missing its {exc.args[0]!r} entry") from exc
        except RuntimeError as exc:
            raise ValueError(f"{what}: its weights do not fit its model config: {exc}") from exc
        if precision is not None:
            inf["precision"] = precision
        return cls(model.to(device), diffusion, **inf)


def _batch_seed(seed: int, seq: torch.Tensor) -> int:
    """A generator seed for one evaluation batch, fixed by its first target's sequence and its size,
    so the sampled embeddings do not depend on how batches are shared between processes."""
    first = int(seq[0]) if seq.numel() else 0
    return (seed * 1_000_003 + 7919 * first + seq.numel()) % (2 ** 63)


def evaluate_dreamrec(rec: SeqRecommender, data, splits: Sequence[str] = ("valid", "test"), *,
                      ks: Sequence[int] = SEQ_KS, batch_size: int = 2048, exclude_history: Optional[bool] = None,
                      seed: int = 0, progress: Optional[bool] = False, fast: Optional[bool] = None,
                      protocol: str = "full", backend: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """HR@k / NDCG@k of ``rec`` on each split (full ranking; see :func:`refit.evaluate.evaluate_sequences`).

    Sampling is seeded per batch of targets (``seed`` and the batch's first
    target), so a call is repeatable; ``seed`` draws another set of samples.
    ``backend`` forces the ``topk_hits`` backend. ``protocol="dreamrec"`` evaluates as DreamRec's own code does, for
    comparison with its published numbers: dropout left on while sampling,
    the padding id ranked as an item, no history excluded, batches of 100
    with the last partial one dropped, samples from the global RNG.
    """
    from .evaluate import evaluate_sequences

    if protocol == "dreamrec":
        def score_fn(history, lengths, seq):
            was = rec.model.training
            rec.model.train()  # DreamRec's evaluation never calls eval(): dropout stays on
            try:
                with torch.no_grad():
                    h = rec.guidance(history, lengths)
                    x = rec.sample_from(h) if rec.eval_steps is None and rec.eval_eta is None else \
                        rec._eval_diffusion.sample(rec.denoiser(h), rec.start_noise(h.shape[0]),
                                                   noise=rec.eval_eta != 0, eta=rec.eval_eta)
                    return rec.model.item_scores(x, include_padding=True).float()
            finally:
                rec.model.train(was)
    else:
        def score_fn(history, lengths, seq):
            g = torch.Generator(device="cpu").manual_seed(_batch_seed(seed, seq))
            return rec.model.item_scores(rec.generate(history, lengths, g, fast=fast)).float()

    return evaluate_sequences(score_fn, data, splits, ks=ks, batch_size=batch_size, exclude_history=exclude_history,
                              max_len=rec.model.max_len, progress=progress, protocol=protocol, backend=backend)


def select_guidance(rec: SeqRecommender, data, grid: Sequence[float], *, batch_size: int = 2048,
                    exclude_history: Optional[bool] = None, seed: int = 0) -> Tuple[float, Dict[float, float]]:
    """The guidance weight of ``grid`` whose recommendations score the best validation ``SEQ_SELECTION``,
    and that metric for each weight.

    Ties go to ``rec.w`` (the weight the network trained with), then to the
    smallest weight. ``rec.w`` is left as it was; the evaluation is
    :func:`evaluate_dreamrec`'s, with its seed.
    """
    trained, values = rec.w, {}
    try:
        for w in grid:
            rec.w = float(w)
            m = evaluate_dreamrec(rec, data, ("valid",), ks=(int(SEQ_SELECTION.split("@")[1]),),
                                  batch_size=batch_size, exclude_history=exclude_history, seed=seed)
            values[float(w)] = float(m["valid"][SEQ_SELECTION])
    finally:
        rec.w = trained
    order = sorted(values)
    return max(order, key=lambda w: (values[w], w == trained)), values


# --- pretraining ---------------------------------------------------------------------------------

#: Sections of ``refit pretrain --help``.
_GROUP, _LOSS_GROUP = "DreamRec and PreferDiff", "PreferDiff's loss"


@dataclass
class DreamRecConfig:
    """Everything a DreamRec pretraining run depends on. Defaults: DreamRec's published code
    (width 64, one block and head, dropout 0.1, p_uncond 0.1, mlp1 denoiser, batch 256, AdamW),
    with the steps, schedule, guidance and learning rate of ``refit pretrain --model dreamrec``'s
    documented ml-1m_seq choice."""

    data: str = "synthetic-seq"
    data_options: Dict[str, Any] = field(default_factory=dict)
    model: str = "dreamrec"
    hidden: int = setting(64, "embedding width", type=positive_int, group=_GROUP)
    max_len: int = setting(10, "history window (items)", type=positive_int, group=_GROUP)
    dropout: float = setting(0.1, "dropout of the denoiser's input", type=finite_float, group="training")
    heads: int = setting(1, type=positive_int, group=_GROUP)
    diffuser: str = setting("mlp1", choices=DIFFUSERS, group=_GROUP)
    p_uncond: float = setting(0.1, "guidance dropout while training", group=_GROUP)
    detach_target: bool = setting(  # chosen on ml-1m_seq's validation split (see docs/models.md)
        True, "the target item's embedding is a constant of the loss (DreamRec's and PreferDiff's code train it "
              "too)", group=_GROUP)
    steps: int = setting(500, "diffusion steps T", type=positive_int, group="diffusion")
    noise_schedule: str = setting("ddpm-linear", choices=SCHEDULES, group="diffusion")
    beta_start: float = setting(1e-4, "ddpm-linear schedule", group=_GROUP)
    beta_end: float = setting(0.02, "ddpm-linear schedule", group=_GROUP)
    w: float = setting(2.0, "classifier-free guidance weight", group=_GROUP)
    lr: float = setting(1e-3, "AdamW's learning rate", group="training")
    weight_decay: float = setting(0.0, group="training")
    batch_size: int = setting(256, type=positive_int, group="training")
    epochs: int = setting(100, "epochs at most", type=positive_int, group="training")
    eval_every: int = setting(5, "evaluate every this many epochs (and always the last)", type=positive_int,
                              group="training")
    patience: int = setting(20, "epochs without improvement", type=positive_int, group="training")
    seed: int = setting(1, type=seed_type, group="training")
    precision: str = setting("fp32", choices=PRECISIONS, group="training")
    eval_batch_size: int = setting(2048, type=positive_int, group="training")
    ks: Tuple[int, ...] = setting(SEQ_KS, "cut-offs, e.g. 10,20,50,100", type=int_list, group="training")
    exclude_history: Optional[bool] = setting(
        None, "never rank the history's items", type=bool, group=_GROUP,
        default_text="when items do not repeat in the data")
    out: str = "runs/pretrain-dreamrec"
    progress: Optional[bool] = None
    init: Optional[str] = setting(None, "start from this checkpoint's weights (continued pretraining)", type=str)
    time_budget: Optional[float] = setting(None, "stop after this many seconds", type=positive_float)
    # recommend with this many respaced steps (None: all T)
    eval_steps: Optional[int] = setting(None, "recommend with this many respaced reverse steps (none: all T)",
                                        type=positive_int, group=_GROUP)
    # ... and DDIM's steps of this noise level (None: the posterior)
    eval_eta: Optional[float] = setting(None, "recommend with DDIM steps of this noise level (0: deterministic; "
                                              "none: the posterior)", type=finite_float, group=_GROUP)
    # A ranking-aware warm start (ADRec's remedy for the embedding collapse of a regression loss):
    # "ce" trains the encoder and the item table with the next item's softmax cross-entropy over all
    # items (:func:`ce_loss`) for the first ``warmup_epochs`` epochs (None: until the validation HR@20
    # of its own scores stops rising, see WARMUP_PATIENCE), then the network's own loss.
    embedding_warmup: str = setting(
        "ce", "ce: train the encoder and item embeddings with the next item's cross-entropy for --warmup-epochs "
              "epochs before the diffusion loss (against the embedding collapse)", choices=WARMUPS, group=_GROUP)
    warmup_epochs: Optional[int] = setting(
        None, "epochs of the --embedding-warmup", type=nonnegative_int, group=_GROUP,
        default_text=f"until its own validation HR@20 has not risen for {WARMUP_PATIENCE} epochs, at most half of "
                     "--epochs or --time-budget")
    # After the warm start, the same cross-entropy on the denoiser's x0 prediction (its inner products
    # with every item), added with this weight to the network's loss (ADRec trains with both).
    ce_weight: float = setting(
        1.0, "after the warm start, add this weight times the cross-entropy of the denoiser's x0 prediction (its "
             "item scores) toward the target to the diffusion loss", group=_GROUP)
    # The guidance weights recommending may use: after a finished run, the selected model (best.pt)
    # recommends the validation split with each, and the best ``SEQ_SELECTION`` keeps its weight in the
    # checkpoint (its inference w) and in the summary's metrics. ``w`` itself, with which the network
    # trained, is always among them. None: recommend with ``w``.
    w_grid: Optional[Tuple[float, ...]] = setting(
        W_GRID, "after training, recommend with the guidance weight among these (and --w) that scores the best "
                "validation HR@20; none: with --w", type=weight_grid, metavar="W,W,...|none", group=_GROUP)

    #: The network this configuration trains.
    network_class: ClassVar[type] = DreamRec

    def __post_init__(self):
        name = self.network_class.network_name
        if self.model != name:
            raise ValueError(f"model must be {name!r}, got {self.model!r}")
        check_run_settings(self, positive=("batch_size", "epochs", "eval_every", "patience", "eval_batch_size",
                                           "hidden", "max_len", "heads", "steps"),
                           finite=("w", "p_uncond", "dropout", "beta_start", "beta_end"), precisions=PRECISIONS,
                           selection=SEQ_SELECTION)
        if self.diffuser not in DIFFUSERS:
            raise ValueError(f"diffuser must be one of {DIFFUSERS}, got {self.diffuser!r}")
        if self.noise_schedule not in FULL_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {FULL_SCHEDULES} for DreamRec, got {self.noise_schedule!r}")
        if self.eval_steps is not None and (isinstance(self.eval_steps, bool) or not isinstance(self.eval_steps, int)
                                            or not 1 <= self.eval_steps <= self.steps):
            raise ValueError(f"eval_steps must be None or an integer in [1, steps={self.steps}], "
                             f"got {self.eval_steps!r}")
        _check_eta(self.eval_eta)
        if self.embedding_warmup not in WARMUPS:
            raise ValueError(f"embedding_warmup must be one of {WARMUPS}, got {self.embedding_warmup!r}")
        if self.warmup_epochs is not None and (isinstance(self.warmup_epochs, bool) or
                                               not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0):
            raise ValueError(f"warmup_epochs must be None (automatic) or an integer >= 0, got {self.warmup_epochs!r}")
        if isinstance(self.ce_weight, bool) or not isinstance(self.ce_weight, (int, float)) or \
                not math.isfinite(self.ce_weight) or self.ce_weight < 0:
            raise ValueError(f"ce_weight must be a finite number >= 0, got {self.ce_weight!r}")
        if self.w < 0:
            raise ValueError(f"w must be >= 0, got {self.w}")
        if self.w_grid is not None:
            grid = list(self.w_grid) if isinstance(self.w_grid, (tuple, list)) else []
            if not grid or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
                               for v in grid):
                raise ValueError(f"w_grid must be None or a non-empty list of finite numbers >= 0, "
                                 f"got {self.w_grid!r}")
            self.w_grid = tuple(sorted({float(v) for v in grid} | {float(self.w)}))
        self.diffusion_config()
        # Before the network is built for its checks: the positions and layers alone (the item table's
        # size waits for the data, and DreamRec's own check then names the items).
        check_memory(f"hidden {self.hidden}, max_len {self.max_len}",
                     (self.max_len * self.hidden + 16 * self.hidden * (self.hidden + 1)) * 4,
                     "DreamRec's positions and layers (float32)")
        with torch.device("meta"):  # validates the network settings without allocating its weights
            self.network_class(2, **self._net())

    def _net(self) -> Dict[str, Any]:
        return {"hidden": self.hidden, "max_len": self.max_len, "dropout": self.dropout, "heads": self.heads,
                "diffuser": self.diffuser, "p_uncond": self.p_uncond, "detach_target": self.detach_target}

    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig(mean_type="x0", steps=self.steps, noise_schedule=self.noise_schedule,
                               beta_start=self.beta_start, beta_end=self.beta_end, timestep_sampling="uniform")

    def model_config(self, n_items: int) -> Dict[str, Any]:
        return {"n_items": n_items, **self._net()}

    def build_network(self, n_items: int) -> DreamRec:
        return self.network_class(**self.model_config(n_items))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PreferDiffConfig(DreamRecConfig):
    """A PreferDiff pretraining run (``refit pretrain --model preferdiff``): the same run as DreamRec's
    (:func:`pretrain_dreamrec`), with PreferDiff's network, loss and sampler.

    Defaults are PreferDiff's published settings (lswhim/PreferDiff at commit fdf45b0; files and lines):
    - width 3072 (``models/PreferDiff/config.yaml`` l. 4, README l. 41 and its table l. 58-60), one
      block (l. 5) of 2 heads (l. 6), dropout 0.1 (l. 7), guidance dropout 0.1 (``p``, l. 18), the
      linear denoiser (``_model.py`` l. 26-28), a window of 10 items (``default.yaml`` l. 10);
    - T = 2000 steps, linear betas 1e-4 .. 0.02 (``config.yaml`` l. 13-16);
    - loss (``diffusion.py`` l. 189-254, mode ``neg``, ``config.yaml`` l. 20): the cosine
      reconstruction (README l. 41 ``--loss_type=cosine``; ``config.yaml`` l. 2 says l2), lamda 0.4
      (README l. 41 and table; ``config.yaml`` l. 23 says 0.5), gamma 5 (l. 22), batch-mean pairing
      (``diffusion.py`` l. 236-254), every other target of the batch averaged into the negative
      (``sample_func: batch``, l. 25; ``modules.py`` l. 149; ``diffusion.py`` l. 194); the target's
      embedding trained through the loss (``_model.py`` l. 111), so ``detach_target`` False;
    - guidance w 2 (README l. 41 and the Sports row; Beauty's row, l. 59, has 8, Toys' 6;
      ``config.yaml`` l. 12 has 4);
    - sampling: DDIM with eta 0 over 21 timesteps (``ddim_step: 100`` of T = 2000, ``config.yaml``
      l. 17; ``diffusion.py`` l. 43-54 and 74-79 take ``range(0, T + 1, 100)``: 21 steps). refit's
      even respacing keeps timesteps 0, 100, .., 1000, 1099, .., 1999 and calls the model with them;
      PreferDiff reads its cumulative alphas at 0, 99, .., 1999 and calls the model with 0, 100, .., 2000;
    - AdamW (``trainer.py`` l. 31-35) at lr 1e-4 (``config.yaml`` l. 1, README table), no weight decay
      (``default.yaml`` l. 15), batch 256 (l. 12), no scheduler and no clipping (``trainer.py`` l. 57-63),
      up to 150 epochs (l. 18) evaluated every epoch (l. 20) with patience 10 (l. 21). PreferDiff
      selects on validation Recall@5 (l. 25); refit's loop on HR@20.
    """

    model: str = "preferdiff"
    embedding_warmup: str = "none"  # PreferDiff's published training: its own loss from the start
    ce_weight: float = 0.0
    hidden: int = 3072
    heads: int = 2
    detach_target: bool = False
    steps: int = 2000
    w: float = 2.0
    lr: float = 1e-4
    epochs: int = 150
    eval_every: int = 1
    patience: int = 10
    out: str = "runs/pretrain-preferdiff"
    eval_steps: Optional[int] = 21
    eval_eta: Optional[float] = 0.0
    lamda: float = setting(0.4, "weight of the reconstruction term; the preference term gets 1 - lamda",
                           group=_LOSS_GROUP)
    gamma: float = setting(5.0, "scale of the error difference in the preference term", group=_LOSS_GROUP)
    reconstruction: str = setting("cosine", "the denoising error both terms measure", choices=RECONSTRUCTIONS,
                                  group=_LOSS_GROUP)
    pairing: str = setting("batch", "batch: the log-sigmoid of the batch means of the errors (PreferDiff's code); "
                                    "row: of each row's own difference", choices=PAIRINGS, group=_LOSS_GROUP)
    negatives: Optional[int] = setting(None, "average this many of the batch's other targets into the negative",
                                       type=positive_int, group=_LOSS_GROUP, default_text="all")

    network_class: ClassVar[type] = PreferDiff

    def __post_init__(self):
        check_finite(self, ("lamda", "gamma"))
        check_loss_settings(self.lamda, self.gamma, self.reconstruction, self.pairing, self.negatives)
        super().__post_init__()

    def _net(self) -> Dict[str, Any]:
        return {**super()._net(), "lamda": self.lamda, "gamma": self.gamma, "reconstruction": self.reconstruction,
                "pairing": self.pairing, "negatives": self.negatives}


def sequence_fingerprint(data) -> str:
    """A short hash of a sequence data set (see :func:`refit.runtime.runs.data_fingerprint`)."""
    return data_fingerprint(data)


def _training_guidance(rec: SeqRecommender, history: torch.Tensor, lengths: torch.Tensor,
                       generator: Optional[torch.Generator], rows: Optional[Tuple[int, int]], drop: bool = True):
    """(B, D) float32 guidance of a training batch, each row dropped to the null embedding with probability
    ``p_uncond`` (one uniform draw per row of the global batch, sliced) unless ``drop`` is False."""
    model = rec.model
    with autocast(rec.precision, rec.device):
        h = model.encode(history, lengths)
    if not drop:
        return h.float()
    n = history.shape[0] if rows is None else rows[1]
    keep = torch.rand((n, 1), generator=generator)
    if rows is not None:
        keep = keep[rows[0]:rows[0] + history.shape[0]]
    keep = (keep >= model.p_uncond).to(rec.device)
    return torch.where(keep, h.float(), model.none_embedding.float().expand_as(h))


def dreamrec_loss(rec: SeqRecommender, history: torch.Tensor, lengths: torch.Tensor,
                  targets: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                  rows: Optional[Tuple[int, int]] = None, weights: Optional[torch.Tensor] = None,
                  x0: Optional[torch.Tensor] = None, detach_target: Optional[bool] = None,
                  guided: bool = False, ce_weight: float = 0.0) -> torch.Tensor:
    """DreamRec's training loss for a batch, (B,): the squared error of the x0 prediction from
    a uniformly drawn step, averaged over the embedding dimension, with the guidance dropped to the
    null embedding with probability ``p_uncond``. The clean state is the (B,) ``targets``' item
    embeddings (with gradient, as DreamRec trains them), or the given (B, D) ``x0``. ``rows``: a slice
    of a global batch (every random draw is the global batch's, sliced). ``weights``: (B,) factors.
    ``detach_target`` (default: the network's setting): the target embeddings carry no gradient (they
    are learned through the histories only); DreamRec's code lets the loss pull them too, which lets
    it fall by drawing all item embeddings together. ``guided``: the loss of the guided prediction
    ``(1 + w) f(x, h) - w f(x, null)`` (the mean the sampler uses), without dropping the guidance: the
    loss of the policy's own mean, for training toward the policy's own samples. ``ce_weight`` > 0 (with
    ``targets``): plus that weight times the (B,) cross-entropy of the x0 prediction's item scores toward
    the target (:func:`prediction_ce`)."""
    if (targets is None) == (x0 is None):
        raise ValueError("give exactly one of targets and x0")
    if ce_weight and targets is None:
        raise ValueError("ce_weight needs the targets")
    model, d = rec.model, rec.diffusion
    h = _training_guidance(rec, history, lengths, generator, rows, drop=not guided)
    if x0 is None:
        x0 = model.item_embeddings(targets).float()
        if model.detach_target if detach_target is None else detach_target:
            x0 = x0.detach()
    else:
        x0 = x0.float()

    predictions = []

    def f(x_t, t):
        with autocast(rec.precision, x_t.device):
            out = model.guided(x_t, h, t, rec.w) if guided else model.denoise(x_t, h, t)
        predictions.append(out)
        return out.float()

    per_row = d.training_loss(f, x0, reweight=False, generator=generator, rows=rows, record=False)
    if ce_weight:
        per_row = per_row + ce_weight * prediction_ce(rec, predictions[-1], targets)
    return per_row if weights is None else per_row * weights


def prediction_ce(rec: SeqRecommender, pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) the softmax cross-entropy over all ``n_items`` items of (B, D) x0 predictions' item scores (their
    inner products with every item embedding, as recommending ranks) toward the (B,) targets."""
    with autocast(rec.precision, pred.device):
        scores = rec.model.item_scores(pred)
    return F.cross_entropy(scores.float(), targets, reduction="none")


def ce_loss(rec: SeqRecommender, history: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
            rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """(B,) the next item's softmax cross-entropy over all ``n_items`` items (the padding id excluded),
    scored as recommending does: the inner product of the guidance ``encode(history)`` (not dropped)
    with every item embedding. The warm start of ``embedding_warmup="ce"``: it shapes the item table
    and the encoder for ranking before the diffusion loss, which alone can lower itself by drawing the
    item embeddings together. ``rows`` is accepted for a slice of a global batch (no draw is made)."""
    with autocast(rec.precision, rec.device):
        h = rec.model.encode(history, lengths)
    return prediction_ce(rec, h, targets)


def reconstruction_error(pred: torch.Tensor, x0: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """(B,) each row's error of a (B, D) prediction toward (B, D) ``x0``: ``"cosine"``, PreferDiff's
    ``(cos(pred, x0) - 1)^2`` (``F.normalize``'d rows, as its ``cosine_loss``); ``"mse"``, the mean
    squared error over the D dimensions."""
    if kind == "cosine":
        cos = (F.normalize(pred, p=2, dim=1) * F.normalize(x0, p=2, dim=1)).sum(dim=1)
        return (cos - 1.0) ** 2
    if kind == "mse":
        return ((pred - x0) ** 2).mean(dim=1)
    raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {kind!r}")


def preference_term(pos: torch.Tensor, neg: torch.Tensor, gamma: float, pairing: str = "batch",
                    rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """(B,) PreferDiff's preference term of rows whose (B,) errors toward the target are ``pos`` and toward
    the negative ``neg``: BPR on the diffusion likelihood, ``-log sigmoid(-gamma (pos - neg))`` =
    ``softplus(gamma (pos - neg))``.

    ``pairing="row"``: each row's own difference. ``"batch"``: the difference of the batch means, as
    PreferDiff's code takes it (its losses are batch means before the log-sigmoid): every row carries the
    batch's value ``L = softplus(gamma d)``, ``d = mean(pos) - mean(neg)``, plus
    ``L'(d) ((pos_i - neg_i) - (pos_i - neg_i).detach())``, a zero whose gradient makes the mean over the
    batch's rows differentiate exactly as ``L`` does. The means are those of the global batch when
    ``rows`` slices one across processes (summed over them), so each share's gradient is its part of the
    global one.
    """
    diff = pos - neg
    if pairing == "row":
        return F.softplus(gamma * diff)
    if pairing != "batch":
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    total = diff.detach().sum().double().reshape(1)
    n = diff.shape[0]
    if rows is not None and rows[1] != n and dist.is_distributed():
        total, n = dist.all_reduce_sum(total), rows[1]
    d = float(total[0]) / max(1, n)
    value, slope = float(F.softplus(torch.tensor(gamma * d, dtype=torch.float64))), gamma / (1.0 + math.exp(-gamma * d))
    return value + slope * (diff - diff.detach())


def _negative_embeddings(model, batch_targets: torch.Tensor, generator: Optional[torch.Generator],
                         detach: bool) -> Optional[torch.Tensor]:
    """(N, D) each row's negative: the mean embedding of the other N - 1 targets of the batch (all of them,
    or ``model.negatives`` of them drawn without replacement per row); None for a batch of one row."""
    N = batch_targets.shape[0]
    if N < 2:
        return None
    E = model.item_embeddings(batch_targets).float()
    if detach:
        E = E.detach()
    k = model.negatives
    if k is None or k >= N - 1:
        return (E.sum(0, keepdim=True) - E) / (N - 1)
    pick = torch.rand((N, N - 1), generator=generator).argsort(dim=1)[:, :k].to(E.device)  # k of the others
    pick = pick + (pick >= torch.arange(N, device=E.device)[:, None]).long()  # skip the row's own position
    return E[pick].mean(dim=1)


def preferdiff_loss(rec: SeqRecommender, history: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                    generator: Optional[torch.Generator] = None, rows: Optional[Tuple[int, int]] = None,
                    batch_targets: Optional[torch.Tensor] = None, return_parts: bool = False,
                    ce_weight: float = 0.0):
    """PreferDiff's training loss for a batch, (B,): ``lamda * L_rec + (1 - lamda) * L_pref``.

    As PreferDiff's ``PreferenceDiffusion.p_losses`` (mode ``neg``): the guidance is dropped to the null
    embedding with probability ``p_uncond``; one uniform timestep t per row; the target's embedding x0
    and the row's negative (the mean embedding of the batch's other targets, see
    :class:`~refit.models.preferdiff.PreferDiff` ``negatives``) are noised to step t with independent
    noise; the denoiser predicts both from the same guidance. ``L_rec`` is the error toward the target
    (:func:`reconstruction_error`), ``L_pref`` :func:`preference_term` of the errors toward the target
    and toward the negative. Weights, gamma, the error and the pairing are the network's settings.

    ``batch_targets``: the (N,) targets of the whole batch these B rows are ``rows`` of (default: the
    rows themselves); every random draw is the global batch's, sliced. A batch of one row has no
    negative: its loss is ``lamda * L_rec``. ``ce_weight``: plus that weight times
    :func:`prediction_ce` of the prediction toward the target. ``return_parts``: also ``{"rec", "pos", "neg"}``, (B,)
    each (detached), for logs and tests.
    """
    model, d = rec.model, rec.diffusion
    if not isinstance(model, PreferDiff):
        raise ValueError(f"preferdiff_loss needs a PreferDiff network, got {type(model).__name__}")
    B = targets.shape[0]
    N = B if rows is None else rows[1]
    batch_targets = targets if batch_targets is None else batch_targets.to(targets.device)
    if batch_targets.shape[0] != N:
        raise ValueError(f"batch_targets holds {batch_targets.shape[0]} targets, the batch has {N} rows")
    lo = 0 if rows is None else rows[0]
    h = _training_guidance(rec, history, lengths, generator, rows)
    neg = _negative_embeddings(model, batch_targets, generator, model.detach_target)
    x0 = model.item_embeddings(targets).float()
    if model.detach_target:
        x0 = x0.detach()
    t, _ = d.sample_timesteps(B, rec.device, generator, rows=rows)
    x_t = d.q_sample(x0, t, _normal(x0.shape, x0.dtype, x0.device, generator, rows))
    with autocast(rec.precision, rec.device):
        step = model.step_features(t)
        if neg is None:
            pred = model.denoise(x_t, h, t, step).float()
        else:
            neg = neg[lo:lo + B]
            neg_t = d.q_sample(neg, t, _normal(neg.shape, neg.dtype, neg.device, generator, rows))
            # one pass over the target's and the negative's noisy states (the same guidance and step)
            both = model.denoise(torch.cat([x_t, neg_t]), torch.cat([h, h]), t, torch.cat([step, step])).float()
            pred, pred_neg = both[:B], both[B:]
    pos = reconstruction_error(pred, x0, model.reconstruction)
    if neg is None:
        loss, err_neg = model.lamda * pos, torch.full_like(pos, float("nan"))
    else:
        err_neg = reconstruction_error(pred_neg, neg, model.reconstruction)
        loss = model.lamda * pos + (1.0 - model.lamda) * preference_term(pos, err_neg, model.gamma, model.pairing,
                                                                         rows)
    if ce_weight:
        loss = loss + ce_weight * prediction_ce(rec, pred, targets)
    if return_parts:
        return loss, {"rec": pos.detach(), "pos": pos.detach(), "neg": err_neg.detach()}
    return loss


def preferdiff_denoising_loss(rec: SeqRecommender, history: torch.Tensor, lengths: torch.Tensor, x0: torch.Tensor,
                              generator: Optional[torch.Generator] = None,
                              rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """(B,) PreferDiff's reconstruction error of the guided prediction ``(1 + w) f(x, h) - w f(x, null)``
    toward given (B, D) clean states ``x0`` from a uniform step (the policy protocol's ``denoising_loss``;
    see :meth:`SeqRecommender.denoising_loss`). Draws as :func:`dreamrec_loss` with ``guided``."""
    model, d = rec.model, rec.diffusion
    h = _training_guidance(rec, history, lengths, generator, rows, drop=False)
    x0 = x0.float()
    t, _ = d.sample_timesteps(x0.shape[0], rec.device, generator, rows=rows)
    x_t = d.q_sample(x0, t, _normal(x0.shape, x0.dtype, x0.device, generator, rows))
    with autocast(rec.precision, rec.device):
        pred = model.guided(x_t, h, t, rec.w).float()
    return reconstruction_error(pred, x0, model.reconstruction)


def pretrain_dreamrec(config: DreamRecConfig, data=None, *, resume: bool = False, overwrite: bool = False,
                      device: Any = "cpu") -> Dict[str, Any]:
    """Runs (or resumes) a DreamRec pretraining run; returns the summary (also ``summary.json``).

    Each epoch visits every training target once in a seeded order
    (DreamRec's code draws its batches with replacement instead). Under
    torchrun each global batch is split into contiguous shares; the
    timesteps, noise and guidance drops are the global batch's draws, and the
    ranks' gradients are averaged. The run folder is held and checked as by
    :func:`refit.pretrain.pretrain` (``resume`` / ``overwrite``).
    """
    with StopRequests() as stops, RunDir(config.out).claim(resume=resume, overwrite=overwrite,
                                                          inputs=[config.init]):
        return _pretrain_dreamrec(config, data, resume, torch.device(device), stops)


def _pretrain_dreamrec(config: DreamRecConfig, data, resume: bool, device: torch.device,
                       stops: StopRequests) -> Dict[str, Any]:
    from .data import load_dataset

    t_start = time.perf_counter()
    dist.warn_if_not_joined("pretrain")
    run = RunDir(config.out)
    main, world = dist.is_main(), dist.world_size()
    data = data if data is not None else load_dataset(config.data, **config.data_options)
    if not hasattr(data, "targets"):
        raise ValueError(f"{config.network_class.__name__} needs sequence data (leave-one-out sequences, DreamRec's "
                         f".df files, a PreferDiff folder); {config.data!r} holds interactions without order")
    if max(config.ks) > data.n_items:
        raise ValueError(f"ks {list(config.ks)} go beyond the {data.n_items} items of {config.data!r}: pass smaller "
                         "cut-offs (--ks)")
    fingerprint = sequence_fingerprint(data)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    if config.init is not None:
        init = load_checkpoint(config.init)["recommender"]
        model = SeqRecommender.from_state(init, device=device, source=config.init).model
        if model.config() != config.model_config(data.n_items):
            raise ValueError(f"init checkpoint {config.init!r} has other model settings than those given")
    else:
        model = config.build_network(data.n_items).to(device)
        if config.embedding_warmup == "ce":
            # Item embeddings of unit norm on average: N(0, 1) entries (DreamRec's start, the noise's
            # scale) give logits of about +-D that the cross-entropy barely moves under Adam's steps.
            with torch.no_grad():
                model.item_embeddings.weight.normal_(0.0, model.hidden ** -0.5)
    rec = SeqRecommender(model, GaussianDiffusion(config.diffusion_config(), device=device), w=config.w,
                         precision=config.precision, eval_steps=config.eval_steps, eval_eta=config.eval_eta)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    batches = data.batches("train", config.batch_size, shuffle=True, seed=config.seed, max_len=config.max_len)

    start_epoch, best = 1, {"epoch": 0, "value": -1.0, "valid": None, "test": None}
    elapsed_before, saved_warmup = 0.0, None
    state = run.resume_state(config, fingerprint, resume=resume, position="epoch", data_name=config.data)
    if state is not None:
        model.load_state_dict(state["recommender"]["model"]["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], generator)
        saved_warmup = state.get("warmup")
        start_epoch, best, elapsed_before = state["epoch"] + 1, state["best"], state.get("elapsed", 0.0)
    if main:
        run.write_json("config.json", {**config.to_dict(), "data_fingerprint": fingerprint,
                                       "n_sequences": data.n_sequences, "n_items": data.n_items})

    def checkpoint_state(epoch: int) -> Dict[str, Any]:
        return {"kind": "pretrain", "recommender": rec.state(), "config": config.to_dict(),
                "data": {"source": config.data, "options": config.data_options, "fingerprint": fingerprint,
                         "n_users": data.n_sequences, "n_items": data.n_items, "sequential": True},
                "epoch": epoch, "best": best}

    def evaluate():
        return evaluate_dreamrec(rec, data, ks=config.ks, batch_size=config.eval_batch_size,
                                 exclude_history=config.exclude_history, seed=config.seed)

    if config.init is not None and start_epoch == 1:
        metrics = evaluate()
        best = {"epoch": 0, "value": metrics["valid"][SEQ_SELECTION], "valid": metrics["valid"],
                "test": metrics["test"]}
        if main:
            run.log({"epoch": 0, "valid": metrics["valid"], "test": metrics["test"]})
            save_checkpoint(run.file("best.pt"), checkpoint_state(0))

    preferdiff = isinstance(model, PreferDiff)
    warmup = config.embedding_warmup == "ce" and config.init is None  # an --init model is already trained
    # The warm start's state, kept in last.pt: whether it is over, its epochs, and (automatic length) the
    # best validation HR@20 of the cross-entropy model's own scores, its weights and the epochs since.
    phase = saved_warmup or {"done": not warmup or config.warmup_epochs == 0, "epochs": 0, "best": -1.0,
                             "since": 0, "weights": None}
    info = {"epochs": phase["epochs"], "valid_hr@20": phase["best"] if phase["best"] >= 0 else None}

    def warm_validation() -> float:
        """Validation HR@20 of the warm-started encoder's own scores (the guidance against every item)."""
        from .evaluate import evaluate_sequences

        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                m = evaluate_sequences(lambda hist, lengths, seq: model.item_scores(model.encode(hist, lengths)).float(),
                                       data, ("valid",), ks=(20,), batch_size=config.eval_batch_size,
                                       exclude_history=config.exclude_history, max_len=model.max_len)
        finally:
            model.train(was)
        return float(m["valid"]["hr@20"])

    def end_warm_epoch(epoch: int) -> None:
        phase["epochs"] = epoch
        if config.warmup_epochs is not None:
            phase["done"] = epoch >= config.warmup_epochs
        else:
            value = warm_validation()
            if value > phase["best"]:
                phase.update(best=value, since=0,
                             weights={k: v.detach().clone() for k, v in model.state_dict().items()})
            else:
                phase["since"] += 1
            spent = time.perf_counter() - t_start + elapsed_before
            limit = epoch >= config.epochs // 2 or (config.time_budget is not None and spent >= config.time_budget / 2)
            if world > 1:  # one decision for every rank (their clocks differ; the validation is the same)
                limit = float(dist.all_reduce_sum(torch.tensor([float(limit)], dtype=torch.float64))[0]) > 0
            if phase["since"] >= WARMUP_PATIENCE or limit:
                model.load_state_dict(phase["weights"])  # the best cross-entropy model goes on
                phase.update(done=True, weights=None)
        info.update(epochs=phase["epochs"], **{"valid_hr@20": phase["best"] if phase["best"] >= 0 else None})
        if phase["done"] and main:
            log.info("warm start over after %d epochs (cross-entropy model's validation HR@20: %s)",
                     phase["epochs"], info["valid_hr@20"])

    def train_epoch(epoch: int) -> float:
        model.train()
        batches.set_epoch(epoch)
        if world > 1:  # dropout masks: per rank, from (seed, epoch, rank)
            from .pretrain import _rank_seed

            torch.manual_seed(_rank_seed(config.seed, epoch, dist.rank()))
        total, n = 0.0, 0
        warm = not phase["done"]
        for history, lengths, targets, _ in batches:
            B = targets.numel()
            rows, batch_targets = None, targets.to(device)
            if world > 1:
                lo, hi = dist.shard_range(B)
                history, lengths, targets, rows = history[lo:hi], lengths[lo:hi], targets[lo:hi], (lo, B)
            if warm:
                per_row = ce_loss(rec, history.to(device), lengths.to(device), targets.to(device), rows)
            elif preferdiff:
                per_row = preferdiff_loss(rec, history.to(device), lengths.to(device), targets.to(device),
                                          generator, rows, batch_targets=batch_targets, ce_weight=config.ce_weight)
            else:
                per_row = dreamrec_loss(rec, history.to(device), lengths.to(device), targets.to(device),
                                        generator, rows, ce_weight=config.ce_weight)
            loss = per_row.sum() * (world / B) if world > 1 else per_row.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients(model.parameters())
            optimizer.step()
            total += float(dist.all_reduce_sum(per_row.detach().sum().double().reshape(1))[0]) / B \
                if world > 1 else float(loss.detach())
            n += 1
        if warm:
            end_warm_epoch(epoch)
        return total / max(1, n)

    task = EpochTask(train_epoch=train_epoch, evaluate=evaluate, checkpoint=lambda e, b: checkpoint_state(e),
                     resume_state=lambda: {"optimizer": optimizer.state_dict(), "rng": rng_state(generator),
                                           "warmup": dict(phase)})
    summary = run_epochs(run, task, epochs=config.epochs, eval_every=config.eval_every, patience=config.patience,
                      time_budget=config.time_budget, progress=config.progress, selection=SEQ_SELECTION,
                      start_epoch=start_epoch, best=best, t_start=t_start, elapsed_before=elapsed_before,
                      stops=stops, init_competes=config.init is not None,
                      summary_extra={"warmup": info,
                                     "data": {"source": config.data, "fingerprint": fingerprint,
                                              "n_sequences": data.n_sequences, "n_items": data.n_items},
                                     "world_size": world})
    if config.w_grid is not None and summary["status"] == "finished" and best["valid"] is not None:
        summary = _choose_guidance(config, rec, data, run, best, summary, evaluate, main)
    return summary


def _choose_guidance(config: DreamRecConfig, rec: SeqRecommender, data, run, best: Dict[str, Any],
                     summary: Dict[str, Any], evaluate, main: bool) -> Dict[str, Any]:
    """After a finished run: the selected model (best.pt) recommends with the ``config.w_grid`` weight that
    validation favours (:func:`select_guidance`). best.pt's inference w and the summary's metrics become
    that weight's; the summary records each weight's validation metric under ``guidance``. last.pt keeps
    the training state as it was, so a resumed run compares its epochs as before."""
    path = run.file("best.pt")
    state = load_checkpoint(path)
    rec.model.load_state_dict(state["recommender"]["model"]["state_dict"])
    t0 = time.perf_counter()
    w, values = select_guidance(rec, data, config.w_grid, batch_size=config.eval_batch_size,
                                exclude_history=config.exclude_history, seed=config.seed)
    if w != rec.w:
        rec.w = w
        metrics = evaluate()
        best.update(valid=metrics["valid"], test=metrics["test"], value=metrics["valid"][SEQ_SELECTION])
        state["recommender"]["inference"]["w"] = w
        state["best"] = dict(best)
        if main:
            save_checkpoint(path, state)
    summary = {**summary, "valid": best["valid"], "test": best["test"],
               "guidance": {"w": w, "trained_w": config.w,
                            f"valid_{SEQ_SELECTION}": {f"{k:g}": v for k, v in values.items()},
                            "seconds": round(time.perf_counter() - t0, 2)}}
    if main:
        run.write_json("summary.json", summary)
        log.info("guidance weight %g chosen on validation (%s %s; trained with %g)", w, SEQ_SELECTION,
                 ", ".join(f"w {k:g}: {v:.4f}" for k, v in values.items()), config.w)
    dist.barrier()
    return summary


def load_seq_recommender(path: str, data=None, *, device: Any = "cpu", precision: Optional[str] = None,
                         allow_other_data: bool = False):
    """A saved DreamRec with its sequence data (loaded from the checkpoint's source unless given; data
    other than those the checkpoint records need ``allow_other_data``, see
    :func:`refit.runtime.runs.checkpoint_data`)."""
    state = load_checkpoint(path)
    data = checkpoint_data(path, state, data, allow_other_data=allow_other_data)
    rec = SeqRecommender.from_state(state["recommender"], device=device, precision=precision, source=path)
    if rec.n_items != data.n_items:
        raise ValueError(f"checkpoint {path!r} scores {rec.n_items} items, the data has {data.n_items}")
    return rec, data, state


__all__ = ["SeqRecommender", "DreamRecConfig", "PreferDiffConfig", "pretrain_dreamrec", "evaluate_dreamrec",
           "dreamrec_loss", "ce_loss", "prediction_ce", "preferdiff_loss", "preferdiff_denoising_loss",
           "preference_term", "reconstruction_error", "load_seq_recommender", "sequence_fingerprint", "NETWORKS",
           "WARMUPS", "WARMUP_PATIENCE", "SEQ_SELECTION", "SEQ_KS", "W_GRID", "select_guidance"]
