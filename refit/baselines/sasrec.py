"""Training and tuning SASRec (:mod:`refit.baselines.sasrec_network`), the sequential baseline of DreamRec.

Training follows the SASRec paper: each step takes B training sequences,
each cut to its last ``max_len`` tokens before its last training target and
left-padded, and every slot of the window predicts the item that follows it
in one causal forward pass, with the full-softmax cross-entropy averaged over
the labelled slots. One epoch is one pass over the sequences, not over every
prefix: the model's positions count from the oldest item of the window, so the
state at a slot is exactly what the prefix ending there would give on its own
and the loss is RecBole's per-prefix loss for every sequence that fits in the
window, at about 1 / (mean sequence length) of the forward passes. A slot is
labelled only when the next item is a training target of the split, so for
DreamRec's session data (every target of a training session is a training
target) the same holds per session; a target with an empty history (the
first item of a session) is learned through the model's start token, which
:func:`train_sasrec` turns on by itself when any split has such targets.

``cover="last"`` (the paper's choice) trains on the last window of each
sequence only, so targets more than ``max_len`` items before a sequence's end
are never trained on; ``cover="all"`` cuts each sequence into consecutive
windows so that every training target is predicted once per epoch.

Models are selected and stopped early on the validation HR@20 from
:func:`refit.evaluate.evaluate_sequences` (full ranking; history excluded when
items do not repeat), evaluated with windows of the model's ``max_len``.
:func:`fit_sasrec` tunes a small grid that way and reports a
:class:`SASRecResult` (a :class:`refit.baselines.BaselineResult`, so it sits in
the same tables as the CF baselines).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..data import sequences as seqdata
from ..evaluate import evaluate_sequences
from ..runtime.loop import LoopTask, run_loop
from ..limits import check_run_settings
from .sasrec_network import IGNORE, SASRec, left_pad
from .rows import BaselineResult, _fmt

log = logging.getLogger(__name__)

SELECTION_METRIC = "hr@20"
DEFAULT_KS = (10, 20, 50)
# The grid tuned by default: 8 configurations around the paper's and RecBole's settings
# (hidden 50-64, 2 blocks, lr 1e-3). Dropout and window length matter most on ML-1M
# (the paper used 0.2 and 200 there, 0.5 and 50 on its sparser sets); one or two heads.
DEFAULT_GRID: Dict[str, Sequence[Any]] = {
    "hidden": (64,), "n_blocks": (2,), "n_heads": (1, 2), "dropout": (0.2, 0.5), "max_len": (50, 200),
    "lr": (1e-3,),
}


@dataclass
class SASRecConfig:
    """Everything one SASRec training run depends on.

    Model: ``hidden``, ``n_blocks``, ``n_heads``, ``inner`` (None: 4 x hidden), ``dropout``,
    ``attn_dropout`` (None: ``dropout``), ``max_len`` (window of training and evaluation),
    ``start_token`` (None: on exactly when some target of the data has an empty history),
    ``padding_class`` (RecBole's extra softmax class; off).
    Optimisation: AdamW with ``lr`` and ``weight_decay`` (0, the paper's Adam), ``batch_size``
    sequences (windows) per step, ``cover`` ("last" or "all", see the module doc).
    Stopping: at most ``max_epochs``; validation every ``eval_every`` epochs, stop after
    ``patience`` validations without a better HR@20; ``time_budget`` seconds for the whole run
    (checked before every step, counting the predicted cost of the closing validation);
    ``max_steps`` caps the optimiser steps (a smoke test). The best validated weights are kept.
    ``seed`` fixes the initialisation, the order of the windows and the dropout masks.
    """

    hidden: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    inner: Optional[int] = None
    dropout: float = 0.2
    attn_dropout: Optional[float] = None
    max_len: int = 200
    start_token: Optional[bool] = None
    padding_class: bool = False
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    cover: str = "last"
    max_epochs: int = 200
    eval_every: int = 1
    patience: int = 10
    time_budget: Optional[float] = None
    max_steps: Optional[int] = None
    eval_batch_size: int = 512
    seed: int = 0
    device: Optional[str] = None

    def __post_init__(self):
        if self.cover not in ("last", "all"):
            raise ValueError(f"cover must be 'last' or 'all', got {self.cover!r}")
        check_run_settings(self, positive=("batch_size", "max_epochs", "eval_every", "patience", "max_len",
                                           "eval_batch_size"), finite=("dropout",))
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")

    def model_kwargs(self, n_items: int, start_token: bool) -> Dict[str, Any]:
        return {"n_items": n_items, "max_len": self.max_len, "hidden": self.hidden, "n_blocks": self.n_blocks,
                "n_heads": self.n_heads, "inner": self.inner, "dropout": self.dropout,
                "attn_dropout": self.attn_dropout, "start_token": start_token, "padding_class": self.padding_class}


# --- training windows ----------------------------------------------------------------------------

@dataclass
class TrainingWindows:
    """The windows one epoch trains on (one per sequence with ``cover="last"``).

    Attributes:
        seq: (E,) int64 sequence of each window.
        start, end: (E,) int64 token indices: the window's input is tokens ``start .. end - 1``
            of its sequence and predicts tokens ``start + 1 .. end`` (token t is item position
            ``t - 1`` with a start token, ``t`` without; token 0 is the start token).
        is_target: (N,) bool over ``data.items``: which positions are training targets used.
        start_token: whether token 0 is the start token.
        n_targets: training targets in the data; n_used: those some window predicts;
        n_dropped: targets no window may predict (an empty history without a start token, or
            after an evaluation target of their sequence, whose history would contain it).
    """

    seq: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    is_target: torch.Tensor
    start_token: bool
    n_targets: int
    n_used: int
    n_dropped: int

    def __len__(self) -> int:
        return int(self.seq.numel())


def needs_start_token(data: "seqdata.SequenceData") -> bool:
    """Whether some target of ``data`` (any split) has an empty history (position 0)."""
    return any(bool((t.pos == 0).any()) for t in data.targets.values() if len(t))


def training_windows(data: "seqdata.SequenceData", max_len: int, start_token: bool,
                     cover: str = "last") -> TrainingWindows:
    """The training windows of ``data`` (see :class:`TrainingWindows`), without a loop over sequences."""
    S = data.n_sequences
    offsets = data.offsets.to(torch.int64)
    tr = data.targets["train"]
    seq, pos = tr.seq.to(torch.int64), tr.pos.to(torch.int64)
    big = torch.iinfo(torch.int64).max
    first_eval = torch.full((S,), big, dtype=torch.int64)
    for name, t in data.targets.items():
        if name != "train" and len(t):
            first_eval.scatter_reduce_(0, t.seq.to(torch.int64), t.pos.to(torch.int64), "amin")
    b0 = int(bool(start_token))
    ok = (pos < first_eval[seq]) & (pos + b0 >= 1)
    n_dropped = int((~ok).sum())
    if n_dropped:
        log.warning("sasrec: %d of %d training targets cannot be trained on (%s)", n_dropped, len(tr),
                    "empty history and no start token, or after an evaluation target of their sequence")
    seq, tok = seq[ok], pos[ok] + b0
    is_target = torch.zeros(int(data.items.numel()), dtype=torch.bool)
    is_target[offsets[seq] + tok - b0] = True
    last = torch.full((S,), -1, dtype=torch.int64).scatter_reduce_(0, seq, tok, "amax")
    first = torch.full((S,), big, dtype=torch.int64).scatter_reduce_(0, seq, tok, "amin")
    s = torch.nonzero(last >= 0).reshape(-1)
    e, f = last[s], first[s]
    if cover == "last":
        ws, we = s, e
    elif cover == "all":
        # Consecutive windows ending at e, e - L, e - 2L, ...: together they predict tokens f .. e once.
        n = (e - f + max_len) // max_len
        ws = torch.repeat_interleave(s, n)
        k = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        we = torch.repeat_interleave(e, n) - k * max_len
    else:
        raise ValueError(f"cover must be 'last' or 'all', got {cover!r}")
    wa = (we - max_len).clamp(min=0)
    if cover == "last":
        # A target is trained on when it falls inside its sequence's window: tokens start + 1 .. end.
        lo = torch.full((S,), big, dtype=torch.int64)
        lo[s] = wa + 1
        n_used = int((tok >= lo[seq]).sum())
    else:
        n_used = int(seq.numel())
    return TrainingWindows(ws, wa, we, is_target, bool(start_token), len(tr), n_used, n_dropped)


def window_batch(data: "seqdata.SequenceData", windows: TrainingWindows, index: torch.Tensor,
                 start_id: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tokens and labels of some training windows.

    Args:
        index: (B,) int64 rows of ``windows``.
        start_id: the model's start token id (needed when ``windows.start_token``).

    Returns:
        (tokens (B, L) int64, labels (B, L) int64), left-padded with ``data.n_items``; L is the
        longest of the B windows (leading all-padding columns change no output, so they are cut).
        ``labels[b, j]`` is the training target that follows slot j, or ``IGNORE``.
    """
    seq, a, e = windows.seq[index], windows.start[index], windows.end[index]
    L = max(int((e - a).max()), 1) if index.numel() else 1
    b0 = int(windows.start_token)
    if b0 and start_id is None:
        raise ValueError("these windows hold a start token: pass the model's start token id")
    items = data.items.to(torch.int64)
    N, pad = items.numel(), data.n_items
    t = e[:, None] - L + torch.arange(L)[None, :]  # token index in the slot
    valid = t >= a[:, None]
    p = t - b0  # item position of the slot's token
    base = data.offsets.to(torch.int64)[seq][:, None]
    tokens = torch.where(valid & (p >= 0), items[(base + p).clamp(0, N - 1)], pad)
    if b0:
        tokens = torch.where(valid & (p == -1), start_id, tokens)
    nxt = (base + p + 1).clamp(0, N - 1)
    labels = torch.where(valid & windows.is_target[nxt], items[nxt], IGNORE)
    return tokens, labels


# --- scoring and evaluation ----------------------------------------------------------------------

def score_fn_for(model: SASRec, device: Optional[Union[str, torch.device]] = None,
                 pad_column: bool = False) -> Callable:
    """``score_fn(history, lengths, seq) -> (B, n_items)`` float32 for :func:`refit.evaluate.evaluate_sequences`.

    Takes its right-padded history windows (best of width ``model.max_len``), turns them into
    the model's left-padded layout (with the start token before a whole history, when the
    model has one) and scores every item with dropout off. ``pad_column`` appends a column of
    ``-inf`` for the padding id, which DreamRec's protocol ranks like an item: SASRec never
    recommends it.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device

    def score_fn(history: torch.Tensor, lengths: torch.Tensor, seq: Optional[torch.Tensor] = None) -> torch.Tensor:
        history, lengths = history.to(device, torch.int64), lengths.to(device, torch.int64)
        width = min(model.max_len, int(lengths.max()) + 1 if lengths.numel() else 1)
        tokens = left_pad(history, lengths, model.pad, width, model.start)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                scores = model.scores(tokens).float()
            if pad_column:
                scores = torch.cat([scores, scores.new_full((scores.shape[0], 1), float("-inf"))], dim=1)
            return scores
        finally:
            model.train(was_training)

    return score_fn


def evaluate_sasrec(model: SASRec, data: "seqdata.SequenceData", splits: Sequence[str] = ("valid", "test"), *,
                    ks: Sequence[int] = DEFAULT_KS, batch_size: int = 512, protocol: str = "full",
                    progress: Optional[bool] = False) -> Dict[str, Dict[str, float]]:
    """HR@k / NDCG@k / MRR@k of ``model`` on ``splits`` by :func:`refit.evaluate.evaluate_sequences`.

    Windows of ``model.max_len`` items; ``protocol`` "full" (every target, all items ranked,
    history excluded when items do not repeat) or "dreamrec" (DreamRec's own evaluation, for
    comparison with its published numbers; ``batch_size`` is then ignored).
    """
    return evaluate_sequences(score_fn_for(model, pad_column=protocol == "dreamrec"), data, tuple(splits),
                                      ks=tuple(ks), batch_size=batch_size, max_len=model.max_len, progress=progress,
                                      protocol=protocol)


# --- training ------------------------------------------------------------------------------------

@dataclass
class TrainedSASRec:
    """One training run: the model with its best validated weights, and what happened.

    ``history`` has one row per validation: epoch (fractional for a partial last epoch),
    steps, mean training loss since the previous row, validation HR@20, seconds.
    ``stopped`` says why the run ended: "early stopping", "max_epochs", "time budget" or "max_steps".
    """

    model: SASRec
    config: SASRecConfig
    best_valid: float
    best_epoch: float
    epochs: float
    steps: int
    train_s: float
    stopped: str
    history: List[Dict[str, Any]] = field(default_factory=list)
    windows: Dict[str, int] = field(default_factory=dict)


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_sasrec(data: "seqdata.SequenceData", config: Optional[SASRecConfig] = None, *,
                 progress: Optional[bool] = False, **overrides) -> TrainedSASRec:
    """Trains one SASRec on ``data`` (``config`` with ``overrides`` applied), early-stopped on validation HR@20.

    The global torch RNG is used (for dropout) under :func:`torch.random.fork_rng`, so the
    caller's random state is left as it was; the run depends on ``config.seed`` only (and, in
    the last bits, on the number of threads).
    """
    config = replace(config or SASRecConfig(), **overrides)
    start_token = needs_start_token(data) if config.start_token is None else bool(config.start_token)
    device = _device(config.device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        return _train(data, config, start_token, device, progress)


def _train(data, config: SASRecConfig, start_token: bool, device: torch.device, progress) -> TrainedSASRec:
    t_start = time.perf_counter()
    model = SASRec(**config.model_kwargs(data.n_items, start_token)).to(device)
    windows = training_windows(data, config.max_len, start_token, config.cover)
    if len(windows) == 0:
        raise ValueError("sasrec: no training target can be trained on (see the warning above)")
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    E, B = len(windows), config.batch_size
    steps_per_epoch = math.ceil(E / B)
    log.info("sasrec: %d windows (%d of %d training targets), %d steps per epoch, start token %s",
             E, windows.n_used, windows.n_targets, steps_per_epoch, start_token)
    deadline = None if config.time_budget is None else t_start + config.time_budget
    step_costs: List[float] = []
    eval_cost = 0.0
    best_state = None
    history: List[Dict[str, Any]] = []
    steps, loss_sum, loss_n, since_eval = 0, 0.0, 0, 0
    stopping = False  # the budget or max_steps ended the run within an epoch

    def out_of_time() -> bool:
        if deadline is None:
            return False
        recent = statistics.median(step_costs[-25:]) if step_costs else 0.0
        return time.perf_counter() + recent + eval_cost > deadline

    def train_epoch(epoch: int) -> Dict[str, Any]:
        """One epoch's steps; ``{"stop": reason}`` when max_steps or the time budget ends it early."""
        nonlocal steps, loss_sum, loss_n, since_eval, stopping
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch - 1)
        order = torch.randperm(E, generator=g)
        model.train()
        for i in range(steps_per_epoch):
            if config.max_steps is not None and steps >= config.max_steps:
                stopping = True
                return {"stop": "max_steps"}
            if out_of_time():
                stopping = True
                return {"stop": "time_budget"}
            t0 = time.perf_counter()
            tokens, labels = window_batch(data, windows, order[i * B:(i + 1) * B], model.start)
            if not bool((labels != IGNORE).any()):  # possible only with cover="all" and gaps between targets
                continue
            loss = model.loss(tokens.to(device), labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            since_eval += 1
            loss_sum += float(loss.detach())
            loss_n += 1
            step_costs.append(time.perf_counter() - t0)
        return {}

    def validate(epoch: int) -> Dict[str, Any]:
        nonlocal eval_cost, loss_sum, loss_n, since_eval
        if stopping and not since_eval and history:  # stopped right after a validation: validated already
            return {"valid": {SELECTION_METRIC: -math.inf}, "test": {}}
        t0 = time.perf_counter()
        hr = evaluate_sasrec(model, data, ("valid",), ks=(20,), batch_size=config.eval_batch_size)["valid"][
            SELECTION_METRIC]
        eval_cost = time.perf_counter() - t0
        # A full epoch by its number; a run stopped within an epoch, by the share of the steps run.
        history.append({"epoch": round(steps / steps_per_epoch if stopping else epoch, 4), "steps": steps,
                        "loss": loss_sum / loss_n if loss_n else float("nan"), f"valid {SELECTION_METRIC}": hr,
                        "elapsed_s": round(time.perf_counter() - t_start, 3)})
        loss_sum, loss_n, since_eval = 0.0, 0, 0
        log.info("sasrec: epoch %.2f loss %.4f valid %s %.4f", history[-1]["epoch"], history[-1]["loss"],
                 SELECTION_METRIC, hr)
        return {"valid": {SELECTION_METRIC: hr}, "test": {}}

    def keep(epoch: int) -> None:
        nonlocal best_state
        best_state = copy.deepcopy(model.state_dict())

    # Patience counts validations without improvement; the loop counts epochs since the best one, and
    # stops before the epoch after the patience-th such validation.
    summary = run_loop(None, LoopTask(train=train_epoch, evaluate=validate, checkpoint=lambda epoch: {},
                                      resume_state=dict, keep_best=keep,
                                      shown=lambda record: {"hr@20": f"{history[-1][f'valid {SELECTION_METRIC}']:.4f}"}
                                      if history else {}),
                       unit="epoch", total=config.max_epochs, start=1,
                       best={"epoch": 0, "value": -1.0, "valid": None, "test": None}, selection=SELECTION_METRIC,
                       stops=None, t_start=t_start, elapsed_before=0.0, eval_every=config.eval_every,
                       patience=config.patience * config.eval_every + 1, train_key=None, progress=progress,
                       desc=f"sasrec (max_len {config.max_len})")
    stopped = {"epochs": "max_epochs", "patience": "early stopping", "time_budget": "time budget"}.get(
        summary["stop_reason"], summary["stop_reason"])
    done = steps / steps_per_epoch
    best_row = max(history, key=lambda r: r[f"valid {SELECTION_METRIC}"])  # the first of equals, as selected
    best, best_epoch = best_row[f"valid {SELECTION_METRIC}"], best_row["epoch"]
    model.load_state_dict(best_state)
    model.eval()
    return TrainedSASRec(model, config, best, best_epoch, round(done, 4), steps,
                         round(time.perf_counter() - t_start, 3), stopped, history,
                         {"windows": E, "training_targets": windows.n_targets, "used": windows.n_used,
                          "dropped": windows.n_dropped, "start_token": int(start_token)})


# --- tuning --------------------------------------------------------------------------------------

@dataclass
class SASRecResult(BaselineResult):
    """A tuned SASRec: :class:`refit.baselines.BaselineResult` plus the trained model and its curve.

    ``params`` are the chosen configuration's grid values; ``fit_s`` is its training run
    (no refit: the run selected on validation is the model), ``tune_s`` every run of the
    grid, ``eval_s`` the final validation + test evaluation. ``grid`` has one row per
    configuration: its values, validation HR@20, epochs, best epoch, seconds and why it stopped.
    """

    model: Optional[SASRec] = field(default=None, repr=False, compare=False)
    config: Optional[Dict[str, Any]] = None
    history: List[Dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        d.update({"config": self.config, "history": self.history})
        return d


def expand_grid(grid: Union[Mapping[str, Sequence[Any]], Sequence[Mapping[str, Any]]]) -> List[Dict[str, Any]]:
    """A grid as a list of configurations: a mapping name -> values is expanded to its cartesian
    product (in the mapping's order); a list of mappings is taken as it is. Names are
    :class:`SASRecConfig` fields."""
    if isinstance(grid, Mapping):
        names = list(grid)
        values = [list(v) if isinstance(v, (list, tuple)) else [v] for v in grid.values()]
        configs = [dict(zip(names, combo)) for combo in itertools.product(*values)]
    else:
        configs = [dict(c) for c in grid]
    known = {f.name for f in fields(SASRecConfig)}
    for c in configs:
        unknown = set(c) - known
        if unknown:
            raise ValueError(f"unknown SASRec settings {sorted(unknown)}; expected some of {sorted(known)}")
    if not configs:
        raise ValueError("the grid is empty")
    return configs


def fit_sasrec(data: "seqdata.SequenceData", grid: Union[Mapping[str, Sequence[Any]], Sequence[Mapping[str, Any]]]
               = DEFAULT_GRID, *, ks: Sequence[int] = DEFAULT_KS, base: Optional[SASRecConfig] = None,
               protocol: str = "full", progress: Optional[bool] = False, **overrides) -> SASRecResult:
    """Trains SASRec for every configuration of ``grid``, keeps the best by validation HR@20, evaluates it.

    Args:
        data: the sequences; trained on the training targets, selected on the validation ones.
        grid: see :func:`expand_grid`; each configuration is applied over ``base`` and ``overrides``
            (e.g. ``time_budget=1800`` seconds per configuration, ``max_epochs``, ``seed``).
        ks: cut-offs of the reported metrics (20 is always added: selection uses it).
        protocol: the protocol of the reported metrics ("full" or "dreamrec", see
            :func:`evaluate_sasrec`); selection always uses the full protocol's validation HR@20.

    Returns:
        A :class:`SASRecResult` named "sasrec" with the chosen values as ``params``, the
        validation and test metrics of the chosen model, and one ``grid`` row per configuration.
    """
    ks = tuple(sorted(set(int(k) for k in ks) | {20}))
    configs = expand_grid(grid)
    base = replace(base or SASRecConfig(), **overrides)
    t0 = time.perf_counter()
    tried: List[Dict[str, Any]] = []
    best: Optional[TrainedSASRec] = None
    best_params: Dict[str, Any] = {}
    for i, values in enumerate(configs):
        cfg = replace(base, **values)
        log.info("sasrec: configuration %d/%d %s", i + 1, len(configs), values)
        run = train_sasrec(data, cfg, progress=progress)
        tried.append({**values, f"valid {SELECTION_METRIC}": run.best_valid, "epochs": run.epochs,
                      "best_epoch": run.best_epoch, "train_s": run.train_s, "stopped": run.stopped})
        if best is None or run.best_valid > best.best_valid:  # ties keep the earlier configuration
            best, best_params = run, values
        else:
            del run
    tune_s = time.perf_counter() - t0
    notes = []
    for name in best_params:
        vals = sorted({c[name] for c in configs if name in c and isinstance(c[name], (int, float))
                       and not isinstance(c[name], bool)})
        # With two values every choice is an edge; the note says something only from three on.
        if len(vals) > 2 and best_params[name] in (vals[0], vals[-1]):
            side = "smallest" if best_params[name] == vals[0] else "largest"
            notes.append(f"sasrec chose {name}={_fmt(best_params[name])}, the {side} value of its grid "
                         f"({', '.join(_fmt(v) for v in vals)}): the best value may lie beyond it")
    if best.stopped in ("time budget", "max_steps", "max_epochs"):
        notes.append(f"the chosen run ended by {best.stopped} after {best.epochs:g} epochs (best at "
                     f"{best.best_epoch:g}), not by early stopping: it may be undertrained")
    for n in notes:
        log.warning("sasrec: %s", n)
    t1 = time.perf_counter()
    metrics = evaluate_sasrec(best.model, data, ("valid", "test"), ks=ks, batch_size=base.eval_batch_size,
                              protocol=protocol)
    eval_s = time.perf_counter() - t1
    return SASRecResult("sasrec", dict(best_params), metrics["valid"], metrics["test"], best.train_s,
                        round(tune_s, 4), round(eval_s, 4), tried, notes, model=best.model,
                        config={**asdict(best.config), "start_token": best.model.start_token, "protocol": protocol,
                                "windows": best.windows, "stopped": best.stopped, "best_epoch": best.best_epoch},
                        history=best.history)


# --- checkpoints ---------------------------------------------------------------------------------

def save_sasrec(model: SASRec, path: str) -> None:
    """Writes the model's architecture and weights (plain tensors and values: loadable with weights_only)."""
    torch.save({"config": model.config(), "state_dict": model.state_dict()}, path)


def load_sasrec(path: str, map_location: Union[str, torch.device] = "cpu") -> SASRec:
    """A model written by :func:`save_sasrec` (read with ``torch.load(weights_only=True)``)."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    model = SASRec(**state["config"])
    model.load_state_dict(state["state_dict"])
    return model.eval()


__all__ = ["DEFAULT_GRID", "DEFAULT_KS", "SASRecConfig", "SASRecResult", "TrainedSASRec", "TrainingWindows",
           "evaluate_sasrec", "expand_grid", "fit_sasrec", "load_sasrec", "needs_start_token", "save_sasrec",
           "score_fn_for", "train_sasrec", "training_windows", "window_batch"]
