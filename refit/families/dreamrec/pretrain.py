"""DreamRec's and PreferDiff's pretraining: their configurations (``refit pretrain``'s flags), the run,
the guidance choice after training, and the checkpoint loader.

``pretrain_dreamrec(config)`` (a :class:`DreamRecConfig` or a
:class:`PreferDiffConfig`) trains a :class:`~refit.families.dreamrec.recommender.SeqRecommender` on the
training targets of a :class:`~refit.data.sequences.SequenceData` (each target predicted from the window of
``max_len`` items before it) with the loop every pretraining run shares
(:mod:`refit.runtime.loop`): run folder, checkpoints, ``--resume``, early stopping on
validation HR@20, time budget, signals, bf16 and torchrun.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch

from ...diffusion import FULL_SCHEDULES, SCHEDULES, DiffusionConfig, GaussianDiffusion
from ...limits import check_finite, check_memory
from ...runtime import distributed as dist
from ...runtime.control import StopRequests
from ...runtime.loop import EpochTask, run_epochs
from ...runtime.runs import (RunDir, checkpoint_data, data_fingerprint, load_checkpoint, rng_state,
                             save_checkpoint)
from ...settings import finite_float, nonnegative_int, positive_int, setting, weight_grid
from ..base import PretrainSettings, start_pretraining
from .losses import ce_loss, dreamrec_loss, preferdiff_loss
from .network import DIFFUSERS, DreamRec
from .preferdiff import PAIRINGS, RECONSTRUCTIONS, PreferDiff, check_loss_settings
from .recommender import SEQ_KS, SEQ_SELECTION, SeqRecommender, _check_eta, evaluate_dreamrec, select_guidance

log = logging.getLogger(__name__)

#: Warm starts of ``DreamRecConfig.embedding_warmup``.
WARMUPS = ("none", "ce")
#: The automatic warm start (``warmup_epochs=None``) ends after this many epochs without a better
#: validation HR@20 of the cross-entropy model's own scores (its best weights go on), or at half the
#: run's epochs or time budget; see docs/models.md.
WARMUP_PATIENCE = 2
#: The guidance weights a sequential run chooses among after training (``w_grid``), on validation.
W_GRID = (0.0, 0.5, 1.0, 2.0, 4.0)

#: Sections of ``refit pretrain --help``.
_GROUP, _LOSS_GROUP = "DreamRec and PreferDiff", "PreferDiff's loss"


@dataclass
class DreamRecConfig(PretrainSettings):
    """Everything a DreamRec pretraining run depends on. Defaults: DreamRec's published code
    (width 64, one block and head, dropout 0.1, p_uncond 0.1, mlp1 denoiser, batch 256, AdamW),
    with the steps, schedule, guidance and learning rate of ``refit pretrain --model dreamrec``'s
    documented ml-1m_seq choice."""

    data: str = "synthetic-seq"
    model: str = "dreamrec"
    batch_size: int = 256
    epochs: int = 100
    eval_batch_size: int = 2048
    ks: Tuple[int, ...] = SEQ_KS
    out: str = "runs/pretrain-dreamrec"
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
    exclude_history: Optional[bool] = setting(
        None, "never rank the history's items", type=bool, group=_GROUP,
        default_text="when items do not repeat in the data")
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
    selection_metric: ClassVar[str] = SEQ_SELECTION

    def __post_init__(self):
        name = self.network_class.network_name
        if self.model != name:
            raise ValueError(f"model must be {name!r}, got {self.model!r}")
        self.check_run(positive=("hidden", "max_len", "heads", "steps"),
                       finite=("w", "p_uncond", "dropout", "beta_start", "beta_end"))
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


def pretrain_dreamrec(config: DreamRecConfig, data=None, *, resume: bool = False, overwrite: bool = False,
                      device: Any = "cpu") -> Dict[str, Any]:
    """Runs (or resumes) a DreamRec pretraining run; returns the summary (also ``summary.json``).

    Each epoch visits every training target once in a seeded order
    (DreamRec's code draws its batches with replacement instead). Under
    torchrun each global batch is split into contiguous shares; the
    timesteps, noise and guidance drops are the global batch's draws, and the
    ranks' gradients are averaged. The run folder is held and checked as by
    :func:`refit.families.diffrec.pretrain.pretrain` (``resume`` / ``overwrite``).
    """
    with StopRequests() as stops, RunDir(config.out).claim(resume=resume, overwrite=overwrite,
                                                          inputs=[config.init]):
        return _pretrain_dreamrec(config, data, resume, torch.device(device), stops)


def _pretrain_dreamrec(config: DreamRecConfig, data, resume: bool, device: torch.device,
                       stops: StopRequests) -> Dict[str, Any]:
    from ...data import load_dataset

    t_start = time.perf_counter()
    dist.warn_if_not_joined("pretrain")
    run = RunDir(config.out)
    main, world = dist.is_main(), dist.world_size()
    data = data if data is not None else load_dataset(config.data, **config.data_options)
    if not hasattr(data, "targets"):
        raise ValueError(f"{config.network_class.__name__} needs sequence data (leave-one-out sequences, DreamRec's "
                         f".df files, a PreferDiff folder); {config.data!r} holds interactions without order")
    config.check_cutoffs(data.n_items)
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

    def evaluate():
        return evaluate_dreamrec(rec, data, ks=config.ks, batch_size=config.eval_batch_size,
                                 exclude_history=config.exclude_history, seed=config.seed)

    start = start_pretraining(
        run, config, fingerprint, resume=resume, main=main, rec=rec, model=model, optimizer=optimizer,
        generator=generator, sizes={"n_sequences": data.n_sequences, "n_items": data.n_items},
        data_meta={"n_users": data.n_sequences, "n_items": data.n_items, "sequential": True}, evaluate=evaluate)
    best = start.best
    saved_warmup = None if start.state is None else start.state.get("warmup")

    preferdiff = isinstance(model, PreferDiff)
    warmup = config.embedding_warmup == "ce" and config.init is None  # an --init model is already trained
    # The warm start's state, kept in last.pt: whether it is over, its epochs, and (automatic length) the
    # best validation HR@20 of the cross-entropy model's own scores, its weights and the epochs since.
    phase = saved_warmup or {"done": not warmup or config.warmup_epochs == 0, "epochs": 0, "best": -1.0,
                             "since": 0, "weights": None}
    info = {"epochs": phase["epochs"], "valid_hr@20": phase["best"] if phase["best"] >= 0 else None}

    def warm_validation() -> float:
        """Validation HR@20 of the warm-started encoder's own scores (the guidance against every item)."""
        from ...evaluate import evaluate_sequences

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
            spent = time.perf_counter() - t_start + start.elapsed
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
            from ..diffrec.pretrain import _rank_seed

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

    task = EpochTask(train_epoch=train_epoch, evaluate=evaluate, checkpoint=lambda e, b: start.checkpoint(e),
                     resume_state=lambda: {"optimizer": optimizer.state_dict(), "rng": rng_state(generator),
                                           "warmup": dict(phase)})
    summary = run_epochs(run, task, epochs=config.epochs, eval_every=config.eval_every, patience=config.patience,
                      time_budget=config.time_budget, progress=config.progress, selection=SEQ_SELECTION,
                      start_epoch=start.epoch, best=best, t_start=t_start, elapsed_before=start.elapsed,
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


__all__ = ["DreamRecConfig", "PreferDiffConfig", "pretrain_dreamrec", "load_seq_recommender", "sequence_fingerprint",
           "WARMUPS", "WARMUP_PATIENCE", "W_GRID"]
