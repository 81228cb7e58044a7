"""Pretraining of a diffusion recommender with the ELBO (DiffRec's recipe).

``pretrain(config)`` trains with AdamW on batches of users densified by
``gather_rows``, evaluates every ``eval_every`` epochs (one reverse pass per
user batch serves both the validation and the test ranking), keeps the model
with the best validation Recall@20, stops after ``patience`` epochs without
improvement, and writes everything into the run folder: ``config.json``,
``metrics.jsonl``, ``best.pt``, ``last.pt`` (to resume) and ``summary.json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple

import numpy as np
import torch

from ...data import InteractionData, load_dataset
from ...diffusion import SCHEDULES, DiffusionConfig, GaussianDiffusion
from ...evaluate import evaluate_recommender
from ...runtime import distributed as dist
from ...runtime.control import StopRequests
from ...runtime.loop import EpochTask, run_epochs
from ...runtime.runs import RunDir, checkpoint_data, data_fingerprint, load_checkpoint, rng_state
from ...settings import finite_float, int_list, positive_int, setting
from ..base import PretrainSettings, start_pretraining
from .denoisers import MODELS, build_model
from .recommender import RowRecommender

SELECTION_METRIC = "recall@20"


@dataclass
class PretrainConfig(PretrainSettings):
    """Everything a DiffRec or CF-Diff pretraining run depends on. Defaults: DiffRec's published ML-1M
    settings. The data, optimiser and loop settings are those of :class:`refit.families.base.PretrainSettings`."""

    model: str = "diffrec"
    # DiffRec MLP
    dims: Tuple[int, ...] = setting((200, 600), "encoder widths, e.g. 200,600", type=int_list, group="DiffRec MLP")
    emb_size: int = setting(10, "timestep embedding width", type=positive_int, group="DiffRec MLP")
    dropout: float = setting(0.5, "dropout of the denoiser's input", type=finite_float, group="training")
    # CF-Diff
    n_tokens: int = setting(16, type=positive_int, group="CF-Diff")
    d_model: int = setting(32, type=positive_int, group="CF-Diff")
    n_heads: int = setting(4, type=positive_int, group="CF-Diff")
    top_n: int = setting(50, "co-users of the 3-hop signal", type=positive_int, group="CF-Diff")
    # diffusion
    mean_type: str = setting("x0", "what the denoiser predicts", choices=("x0", "eps"), group="diffusion")
    steps: int = setting(40, "diffusion steps T", type=positive_int, group="diffusion")
    noise_schedule: str = setting("linear-var", choices=SCHEDULES, group="diffusion")
    noise_scale: float = setting(0.005, group="diffusion")
    noise_min: float = setting(0.005, group="diffusion")
    noise_max: float = setting(0.01, group="diffusion")
    sampling_steps: int = setting(0, "recommend from the user's row noised to this step (0: the clean row)",
                                  group="diffusion")
    sampling_noise: bool = setting(False, "recommend with noisy reverse steps", group="diffusion")
    reweight: bool = setting(True, "importance-sample the timesteps by their loss", group="diffusion")

    selection_metric: ClassVar[str] = SELECTION_METRIC

    #: The denoisers this configuration builds, by ``model`` name (a family of other denoisers subclasses
    #: the config and names its own).
    models: ClassVar[Dict[str, type]] = MODELS

    def __post_init__(self):
        if self.model not in self.models:
            raise ValueError(f"model must be one of {', '.join(self.models)}, got {self.model!r}")
        self.check_run(positive=("emb_size",), finite=("dropout", "noise_scale", "noise_min", "noise_max"))
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.dims = tuple(int(d) for d in self.dims)
        self.diffusion_config()  # validates the diffusion settings

    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig(mean_type=self.mean_type, steps=self.steps, noise_schedule=self.noise_schedule,
                               noise_scale=self.noise_scale, noise_min=self.noise_min, noise_max=self.noise_max)

    def model_config(self, n_items: int) -> Dict[str, Any]:
        if self.model == "diffrec":
            return {"n_items": n_items, "dims": list(self.dims), "emb_size": self.emb_size,
                    "dropout": self.dropout, "norm": False}
        return {"n_items": n_items, "n_tokens": self.n_tokens, "d_model": self.d_model, "n_heads": self.n_heads,
                "emb_size": self.emb_size, "dropout": self.dropout, "top_n": self.top_n}


def pretrain(config: PretrainConfig, data: Optional[InteractionData] = None, *, resume: bool = False,
             overwrite: bool = False, device: Any = "cpu") -> Dict[str, Any]:
    """Runs (or resumes) a pretraining run; returns the summary that is also written to summary.json.

    Under torch.distributed (``torchrun``) every rank calls this: each global batch of the epoch's
    seeded permutation is split into contiguous shares (one per rank), the
    timesteps and noise are drawn for the global batch on every rank from the
    same generator and sliced, the losses that steer the importance sampling
    of timesteps are those of the global batch, and each rank's loss is
    scaled so that the average of the ranks' gradients
    (:func:`refit.runtime.distributed.average_gradients`) is the gradient of the global
    batch's mean loss. Dropout masks come from a per-rank seed derived from
    (seed, epoch, rank). Rank 0 alone writes the run folder; the checkpoint
    (global epoch, generator state, loss history) resumes with any number of
    processes.

    The run always ends with an evaluated model in ``best.pt``: the last
    epoch is evaluated whatever ``eval_every`` says. It stops at ``epochs``,
    after ``patience`` epochs without a better validation score, before an
    epoch that would not fit in ``time_budget`` seconds (with its
    evaluation), or at the end of the epoch during which SIGTERM or SIGINT
    arrived; ``summary.json`` (rewritten at every evaluation) says which in
    ``stop_reason`` and ``status``.

    The run holds ``config.out`` from start to end (:meth:`refit.runtime.runs.RunDir.claim`): a second run in
    it is refused, and so is a new run in a folder that holds one, unless ``resume`` (continue it) or
    ``overwrite`` (remove its files first).
    """
    with StopRequests() as stops, RunDir(config.out).claim(resume=resume, overwrite=overwrite,
                                                          inputs=[config.init]):
        return _pretrain(config, data, resume, torch.device(device), stops)


def _pretrain(config: PretrainConfig, data: Optional[InteractionData], resume: bool, device: torch.device,
              stops: StopRequests) -> Dict[str, Any]:
    t_start = time.perf_counter()
    dist.warn_if_not_joined("pretrain")
    run = RunDir(config.out)
    main, world = dist.is_main(), dist.world_size()
    data = data if data is not None else load_dataset(config.data, **config.data_options)
    config.check_cutoffs(data.n_items)
    fingerprint = data_fingerprint(data)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    if config.init is not None:  # continue from a saved model, with its own architecture
        init_state = load_checkpoint(config.init)["recommender"]
        if init_state["model"]["name"] != config.model or init_state["diffusion"] != config.diffusion_config().to_dict():
            raise ValueError(f"init checkpoint {config.init!r} has another model or diffusion than the settings "
                             "given: pass the settings it was trained with")
        model = RowRecommender.from_state(init_state, train=data.train, device=device, source=config.init,
                                       models=config.models).model
    else:
        model = build_model(config.model, config.model_config(data.n_items), train=data.train,
                            models=config.models).to(device)
    diffusion = GaussianDiffusion(config.diffusion_config(), device=device)
    rec = RowRecommender(config.model, model, diffusion, sampling_steps=config.sampling_steps,
                      sampling_noise=config.sampling_noise, precision=config.precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    batches = data.batches(config.batch_size, "train", shuffle=True, seed=config.seed, device=device,
                           shard=(dist.rank(), world) if world > 1 else None)

    start = start_pretraining(
        run, config, fingerprint, resume=resume, main=main, rec=rec, model=model, optimizer=optimizer,
        generator=generator, sizes={"n_users": data.n_users, "n_items": data.n_items},
        evaluate=lambda: evaluate_recommender(rec, data, ks=config.ks, batch_size=config.eval_batch_size))
    if start.state is not None:  # the importance sampler's loss history goes on too
        diffusion.loss_history[...] = start.state["loss_history"]
        diffusion.loss_count[...] = start.state["loss_count"]

    def train_epoch(epoch: int) -> float:
        model.train()
        batches.set_epoch(epoch)
        total, n_batches = 0.0, 0
        if world > 1:  # dropout masks: per rank, re-derived from (seed, epoch, rank) on resume
            torch.manual_seed(_rank_seed(config.seed, epoch, dist.rank()))
        for users, rows in batches:
            if world == 1:
                loss = diffusion.training_loss(rec.denoiser(users, rows), rows, reweight=config.reweight,
                                               generator=generator).mean()
                report = loss
            else:
                loss, report = _distributed_loss(rec, diffusion, users, rows, batches.current_slice,
                                                 config.reweight, generator, world)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients(model.parameters())
            optimizer.step()
            total += float(report.detach())
            n_batches += 1
        return total / max(1, n_batches)

    task = EpochTask(
        train_epoch=train_epoch,
        evaluate=lambda: evaluate_recommender(rec, data, ks=config.ks, batch_size=config.eval_batch_size),
        checkpoint=lambda epoch, best: start.checkpoint(epoch),
        resume_state=lambda: {"optimizer": optimizer.state_dict(), "loss_history": diffusion.loss_history.copy(),
                              "loss_count": diffusion.loss_count.copy(), "rng": rng_state(generator)})
    return run_epochs(
        run, task, epochs=config.epochs, eval_every=config.eval_every, patience=config.patience,
        time_budget=config.time_budget, progress=config.progress, selection=SELECTION_METRIC,
        start_epoch=start.epoch, best=start.best, t_start=t_start, elapsed_before=start.elapsed, stops=stops,
        init_competes=config.init is not None,
        summary_extra={"data": {"source": config.data, "fingerprint": fingerprint, "n_users": data.n_users,
                                "n_items": data.n_items}, "world_size": world})


def _rank_seed(seed: int, epoch: int, rank: int) -> int:
    """A 63-bit seed derived from (seed, epoch, rank), for the per-rank dropout RNG."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


def _distributed_loss(rec: RowRecommender, diffusion: GaussianDiffusion, users: torch.Tensor, rows: torch.Tensor,
                      rows_slice: Tuple[int, int], reweight: bool, generator: torch.Generator, world: int):
    """This rank's share of a global batch's ELBO loss, and the global batch's mean loss (to report).

    ``rows_slice = (offset, total)``: the rank holds rows [offset, offset + b) of
    a global batch of ``total``. The timesteps and noise are the global
    batch's draws (identical on every rank), the loss history records every
    row of the global batch in order (so the importance sampling stays
    identical on every rank, and equal to a single process's), and the
    returned loss ``world * sum(local) / total`` makes the average of the
    ranks' gradients the gradient of the global mean.
    """
    per_user, t, raw = diffusion.training_loss(rec.denoiser(users, rows), rows, reweight=reweight,
                                               generator=generator, rows=rows_slice, record=False,
                                               return_parts=True)
    seen = dist.all_gather_rows(torch.stack([t.double().cpu(), raw.double().cpu(),
                                             per_user.detach().double().cpu()], 1))
    diffusion.record_losses(seen[:, 0].long(), seen[:, 1])
    return per_user.sum() * (world / rows_slice[1]), seen[:, 2].float().mean()


def load_recommender(path: str, data: Optional[InteractionData] = None, *, device: Any = "cpu",
                     precision: Optional[str] = None, allow_other_data: bool = False,
                     models: Optional[Dict[str, type]] = None) -> Tuple[RowRecommender, InteractionData, Dict[str, Any]]:
    """A saved recommender with its data (loaded from the checkpoint's source unless given); ``models``:
    the denoiser classes by name (default: :data:`refit.families.diffrec.denoisers.MODELS`).

    Raises ValueError when the data differs from what the model was trained on, or when data are given
    and the checkpoint records no fingerprint to check them against, unless ``allow_other_data`` (see
    :func:`refit.runtime.runs.checkpoint_data`); and when a weight is NaN or infinite.
    """
    state = load_checkpoint(path)
    data = checkpoint_data(path, state, data, allow_other_data=allow_other_data)
    n_items = state["recommender"]["model"]["config"].get("n_items")
    if n_items != data.n_items:
        raise ValueError(f"checkpoint {path!r} scores {n_items} items, the data has {data.n_items}")
    rec = RowRecommender.from_state(state["recommender"], train=data.train, device=device, precision=precision,
                                 source=path, models=models)
    return rec, data, state
