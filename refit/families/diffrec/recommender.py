"""A diffusion recommender: a denoiser, its diffusion, and how it ranks (DiffRec's inference).

Scoring follows DiffRec's default: start the reverse process from the user's
clean training row (optionally noised to ``sampling_steps`` first), run every
reverse step without noise (unless ``sampling_noise``), and rank items by the
final state. ``precision="bf16"`` runs the denoiser under CPU/GPU autocast.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from ...diffusion import (PRECISIONS, DiffusionConfig, GaussianDiffusion, autocast, batched_outputs, reverse_in_latent,
                          rl_diffusion)
from .denoisers import build_model


class RowRecommender:
    """DiffRec's and CF-Diff's policy: a denoiser of a user's whole interaction row, its diffusion and
    the inference settings, saved and restored as one (the row counterpart of
    :class:`refit.families.dreamrec.recommender.SeqRecommender`)."""

    def __init__(self, model_name: str, model: torch.nn.Module, diffusion: GaussianDiffusion, *,
                 sampling_steps: int = 0, sampling_noise: bool = False, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if not 0 <= sampling_steps <= diffusion.steps:
            raise ValueError(f"sampling_steps must be in [0, {diffusion.steps}], got {sampling_steps}")
        self.model_name, self.model, self.diffusion = model_name, model, diffusion
        self.sampling_steps, self.sampling_noise, self.precision = sampling_steps, sampling_noise, precision

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def denoiser(self, users: torch.Tensor, rows: torch.Tensor) -> Callable:
        """``f(x_t, t)`` for a batch: the model with the batch's conditioning bound, under autocast.

        Its outputs are float32 whatever the precision, so the diffusion's
        arithmetic (means, noise, log-probabilities) stays in float32.
        """
        cond = self.model.condition(users, rows)
        ctx = self.precision
        module = self.model

        def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast(ctx, x.device):
                out = module(x, t, cond)
            return out.float()

        return f

    def latent_inference(self) -> bool:
        """Whether :meth:`scores` can run the reverse pass in the hidden space (see
        :func:`refit.diffusion.reverse_in_latent`): a noise-free pass, a noise
        schedule, and a denoiser that is linear in its row (DiffRec without
        normalisation, CF-Diff)."""
        return (not self.sampling_noise and self.diffusion.betas is not None
                and hasattr(self.model, "latent_parts") and not getattr(self.model, "norm", False))

    @torch.no_grad()
    def scores(self, users: torch.Tensor, rows: torch.Tensor,
               generator: Optional[torch.Generator] = None, latent: Optional[bool] = None) -> torch.Tensor:
        """(B, I) float32 ranking scores of users whose training rows are ``rows`` (B, I).

        ``latent`` (default: when possible) runs the noise-free reverse pass in
        the model's hidden space: the same scores up to float32 rounding, for
        a fraction of the work. ``latent=False`` takes every step on full rows.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            use_latent = self.latent_inference() if latent is None else latent
            if use_latent:
                x = rows
                if self.sampling_steps > 0:
                    t = torch.full((rows.shape[0],), self.sampling_steps - 1, dtype=torch.long, device=rows.device)
                    x = self.diffusion.q_sample(rows, t, generator=generator)
                return reverse_in_latent(self.diffusion, self.model, x, self.model.condition(users, rows),
                                         autocast=lambda: autocast(self.precision, rows.device))
            return self.diffusion.sample(self.denoiser(users, rows), rows, sampling_steps=self.sampling_steps,
                                         noise=self.sampling_noise, generator=generator)
        finally:
            self.model.train(was_training)

    # --- the diffusion-policy protocol (refit.policy) -------------------------------------------

    selection_metric = "recall@20"
    data_kind = "interactions"  # DiffRec-style models start from the user's row

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def sample(self, users: torch.Tensor, inputs: torch.Tensor, *, generator: Optional[torch.Generator] = None,
               temperature: float = 1.0, rows=None, keep_graph: bool = False, steps: Optional[int] = None,
               eta: Optional[float] = None, explore=None, group_size: int = 1):
        """A noisy reverse trajectory from the (B, I) start rows ``inputs`` (see :mod:`refit.policy`);
        ``steps`` respaced reverse steps instead of all T, DDIM's ``eta`` (None: the posterior), and
        ``explore``: only those steps draw noise (see :meth:`refit.diffusion.GaussianDiffusion.sample`).
        ``group_size`` is taken for the protocol's sake: the start (the user's row) is shared anyway."""
        return rl_diffusion(self, steps).sample(
            self.denoiser(users, inputs), inputs, noise=True, return_trajectory=True, keep_graph=keep_graph,
            generator=generator, temperature=temperature, rows=rows, eta=eta, explore=explore)

    def sample_final(self, users: torch.Tensor, inputs: torch.Tensor, *, generator: Optional[torch.Generator] = None,
                     temperature: float = 1.0, rows=None, grad_steps: int = 1, steps: Optional[int] = None,
                     eta: Optional[float] = None) -> torch.Tensor:
        """(B, I) final score rows from the (B, I) start rows ``inputs``, the last ``grad_steps`` reverse
        steps with their graph (reward backpropagation); the state they start from is a constant."""
        return rl_diffusion(self, steps).sample(self.denoiser(users, inputs), inputs, noise=True, generator=generator,
                                                temperature=temperature, rows=rows, eta=eta, grad_steps=grad_steps)

    def differentiable_scores(self, users: torch.Tensor, inputs: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """The final state is the (B, I) score row itself."""
        return final

    def outputs(self, users: torch.Tensor, inputs: torch.Tensor, traj) -> torch.Tensor:
        """(S, B, I) denoiser outputs along ``traj``, with gradient, in one batched forward pass."""
        cond = self.model.condition(users, inputs)
        S = traj.preds.shape[0]
        if cond is not None:
            cond = type(cond)(*(c.repeat(S, 1) for c in cond))

        def forward(x, t):
            with autocast(self.precision, x.device):
                return self.model(x, t, cond)

        return batched_outputs(forward, traj)

    def final_scores(self, users: torch.Tensor, inputs: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """The final state of a trajectory is the (B, I) score row itself."""
        return final

    def pretraining_loss(self, episode, *, generator: Optional[torch.Generator] = None, rows=None) -> torch.Tensor:
        """(B,) DiffRec's ELBO loss on the episode's start rows (importance-sampled timesteps; under
        torchrun the global batch's losses feed the importance sampler on every rank)."""
        return self.denoising_loss(episode.users, episode.inputs, episode.inputs, generator=generator, rows=rows,
                                   record=True)

    def denoising_loss(self, users: torch.Tensor, inputs: torch.Tensor, x0: torch.Tensor, *,
                       generator: Optional[torch.Generator] = None, rows=None, record: bool = False,
                       weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B,) ELBO loss of denoising toward the (B, I) rows ``x0``, conditioned on ``inputs``; ``weight``
        (B, I) weighs each item's squared error (see :meth:`GaussianDiffusion.training_loss`)."""
        from ...runtime import distributed as dist

        f = self.denoiser(users, inputs)
        if rows is None:
            return self.diffusion.training_loss(f, x0, generator=generator, record=record, weight=weight)
        per_row, t, raw = self.diffusion.training_loss(f, x0, generator=generator, rows=rows, record=False,
                                                       return_parts=True, weight=weight)
        if record:
            seen = dist.all_gather_rows(torch.stack([t.double().cpu(), raw.double().cpu()], 1))
            self.diffusion.record_losses(seen[:, 0].long(), seen[:, 1])
        return per_row

    def training_target(self, users: torch.Tensor, inputs: torch.Tensor, final: torch.Tensor, *,
                        exclude=None, k: int = 20) -> torch.Tensor:
        """The (B, I) binary row a sampled final state stands for, as a training target.

        DiffRec trains on binary interaction rows, and a final state is a row of
        real-valued scores; what the reward judged of it is its top-k list. The
        target is the start row's items plus the k best-scored items not in
        ``exclude`` (the list the reward counted hits in), all as ones.
        """
        import refit_kernels as rk

        top = rk.topk_hits(final.detach().float(), (k,), exclude=exclude, return_indices=True).indices
        target = (inputs > 0).to(torch.float32)
        keep = top >= 0
        rows = torch.arange(top.shape[0], device=top.device)[:, None].expand_as(top)
        target[rows[keep], top[keep]] = 1.0
        return target

    def evaluate(self, data, *, ks=(10, 20, 50, 100), batch_size: int = 1024) -> Dict[str, Dict[str, float]]:
        from ...evaluate import evaluate_recommender

        return evaluate_recommender(self, data, ks=ks, batch_size=batch_size)

    def state(self) -> Dict[str, Any]:
        """Everything needed to rebuild this recommender (without the data)."""
        return {
            "model": {"name": self.model_name, "config": self.model.config(),
                      "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}},
            "diffusion": self.diffusion.config.to_dict(),
            "inference": {"sampling_steps": self.sampling_steps, "sampling_noise": self.sampling_noise,
                          "precision": self.precision},
        }

    @classmethod
    def from_state(cls, state: Dict[str, Any], train: Any = None, device="cpu",
                   precision: Optional[str] = None, *, source: Optional[str] = None,
                   models: Optional[Dict[str, type]] = None) -> "RowRecommender":
        """Rebuilds a recommender from :meth:`state` (CF-Diff needs the training matrix); ``models``: the
        denoiser classes by name (default: :data:`refit.families.diffrec.denoisers.MODELS`).

        ``source``, the checkpoint the state was read from, is named in the errors. A state with a NaN
        or infinite weight is refused (ValueError naming the tensor).
        """
        from ...runtime.runs import check_finite_weights

        what = f"checkpoint {source!r}" if source else "the checkpoint"
        try:
            m = state["model"]
            check_finite_weights(m["state_dict"], what)
            try:
                model = build_model(m["name"], dict(m["config"]), train=train, models=models)
            except (ValueError, TypeError) as exc:  # settings the model refuses: say whose they are
                raise ValueError(f"{what}: its model settings are refused: {exc}") from exc
            missing = model.load_state_dict(m["state_dict"], strict=True)
            del missing
            diffusion = GaussianDiffusion(DiffusionConfig(**state["diffusion"]), device=device)
            inf = dict(state["inference"])
        except KeyError as exc:
            raise ValueError(f"{what} is missing its {exc.args[0]!r} entry") from exc
        except RuntimeError as exc:  # load_state_dict: shapes or names that do not fit the config
            raise ValueError(f"{what}: its weights do not fit its model config: {exc}") from exc
        if precision is not None:
            inf["precision"] = precision
        return cls(m["name"], model.to(device), diffusion, **inf)
