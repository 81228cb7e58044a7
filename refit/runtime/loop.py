"""The one training loop of refit: evaluation, selection, stopping, the run folder.

A run supplies a :class:`LoopTask` (train one unit, evaluate, the checkpoint
contents, its own summary fields); :func:`run_loop` does the rest the same
way for pretraining (epochs; :func:`run_epochs` for every model family),
fine-tuning (iterations; :func:`refit.posttrain.run.finetune`) and SASRec's
training (epochs, in memory: :func:`refit.baselines.sasrec.train_sasrec`): it evaluates every
``eval_every`` units and always the last, keeps the best validation score in
``best.pt``, writes ``last.pt`` and a line of ``metrics.jsonl`` per unit,
rewrites ``summary.json`` at every evaluation, and stops at the last unit,
after ``patience`` units without improvement, before a unit that would not
fit in the time budget, or at the end of the unit in which SIGTERM / SIGINT
arrived. Resuming is :meth:`refit.runtime.runs.RunDir.resume_state`'s one rule.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from . import distributed as dist
from .control import Progress, StopRequests, TimeBudget
from .runs import RunDir, save_checkpoint

log = logging.getLogger(__name__)

#: Stop reasons of a run that ended by itself: all its units ("epochs", "iterations"), patience, the
#: time budget or a cap on its steps (anything else is a signal's name).
FINISHED = ("epochs", "iterations", "patience", "time_budget", "max_steps")


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class LoopTask:
    """What :func:`run_loop` needs from a run: one unit of training, evaluation, and what the run folder keeps.

    Attributes:
        train: ``train(position) -> dict``: one unit (an epoch, an iteration); the fields it returns go
            into that unit's record of ``metrics.jsonl`` (every rank calls it).
        evaluate: ``evaluate(position) -> {"valid": metrics, "test": metrics, ...}``; every field goes
            into the record (every rank; collective).
        checkpoint: ``checkpoint(position) -> dict``: the model's state, for ``best.pt`` and ``last.pt``.
        resume_state: ``resume_state() -> dict``: what ``last.pt`` adds for ``--resume`` (optimiser,
            generators, ...).
        summary: ``summary(loop) -> dict``: the run's own fields of every summary (``loop`` is the
            :class:`LoopState`).
        shown: ``shown(record) -> {name: text}``: what the progress bar shows after a unit.
        finish: ``finish(summary)``: called on the main process with the final summary before it is
            written (e.g. to add a plot).
        keep_best: ``keep_best(position)``: called on every rank when validation improves (a run without
            a folder keeps its best weights so).
    """

    train: Callable[[int], Dict[str, Any]]
    evaluate: Callable[[int], Dict[str, Any]]
    checkpoint: Callable[[int], Dict[str, Any]]
    resume_state: Callable[[], Dict[str, Any]]
    summary: Callable[["LoopState"], Dict[str, Any]] = lambda loop: {}
    shown: Callable[[Dict[str, Any]], Dict[str, str]] = lambda record: {}
    finish: Optional[Callable[[Dict[str, Any]], None]] = None
    keep_best: Optional[Callable[[int], None]] = None


@dataclass
class LoopState:
    """Where a :func:`run_loop` stands: the last unit run, why it stopped, the time each unit and
    evaluation took, and the notes for the summary's ``warnings``."""

    unit: str
    planned: int
    position: int
    stop_reason: str
    train_times: List[float] = field(default_factory=list)
    eval_times: List[float] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def run_loop(run: Optional[RunDir], task: LoopTask, *, unit: str, total: int, start: int, best: Dict[str, Any],
             selection: str, stops: Optional[StopRequests], t_start: float, elapsed_before: float, eval_every: int,
             checkpoint_every: int = 1, patience: Optional[int] = None, time_budget: Optional[float] = None,
             init_competes: bool = False, evaluate_on_stop: bool = True, train_key: Optional[str] = "train_s",
             progress: Optional[bool] = None, desc: str = "run",
             max_this_run: Optional[int] = None) -> Dict[str, Any]:
    """Runs units ``start .. total`` of ``unit`` ("epoch", "iteration"); returns the summary (also
    ``summary.json``).

    ``best`` is ``{unit: position, "value", "valid", "test", ...}`` (position 0 and value -1 before any
    evaluation); it is updated in place, and ``best.pt`` saved, whenever validation ``selection`` rises.
    A unit is evaluated every ``eval_every`` units and at the last one (the last planned, or the one in
    which a stop was asked for, unless ``evaluate_on_stop`` is False). ``last.pt`` is written every
    ``checkpoint_every`` units and at the last. The run stops at ``total``, after ``patience`` units
    without a better ``selection`` (None: never; ``init_competes``: the start was evaluated as unit 0
    and counts), before a unit that would not fit in ``time_budget`` seconds with its evaluation, or at
    the end of the unit in which SIGTERM / SIGINT arrived (``stops``). ``train_key`` names the record
    field of each unit's training time (None: none). ``max_this_run`` stops after that many units
    without finishing the run (as a killed run would) and returns ``{"stopped_at": position}``.

    A unit's ``train`` may end the run itself: a ``"stop"`` field in what it returns is the stop
    reason (that unit is the last). Without a run folder (``run`` None) nothing is written and the
    ranks do not wait for each other: ``keep_best`` keeps the best model.
    """
    main = dist.is_main()
    writes = main and run is not None  # this process writes the run folder
    bar = Progress(progress if main else False, total=total, initial=start - 1, desc=desc, unit=unit)
    budget = TimeBudget(time_budget, t_start, elapsed_before)
    done = f"{unit}s"  # the stop reason of a run that ran every unit
    loop = LoopState(unit=unit, planned=total, position=start - 1, stop_reason=done)

    def summary_now(status: str) -> Dict[str, Any]:
        return {
            "status": status,
            f"best_{unit}": best[unit],
            "selection": f"valid {selection}",
            "valid": best["valid"],
            "test": best["test"],
            "stop_reason": loop.stop_reason if status != "running" else None,
            "stopped_early": status != "running" and loop.stop_reason != done,
            "warnings": list(loop.notes),
            "seconds": round(budget.elapsed(), 2),
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "checkpoint": run.file("best.pt") if run is not None and best["valid"] is not None else None,
            "world_size": dist.world_size(),
            **task.summary(loop),
        }

    for position in range(start, total + 1):
        if max_this_run is not None and position - start >= max_this_run:
            bar.close()
            return {"stopped_at": position - 1}
        if patience is not None and position - best[unit] >= patience and (best[unit] > 0 or init_competes):
            loop.stop_reason = "patience"
            break
        loop.position = position
        t0 = time.perf_counter()
        record: Dict[str, Any] = {unit: position, **task.train(position)}
        train_s = time.perf_counter() - t0
        asked = record.pop("stop", None)
        if train_key is not None:
            record[train_key] = round(train_s, 4)
        loop.train_times.append(train_s)
        budget.record(train_s)
        last = position == total
        if asked is not None:
            loop.stop_reason, last = asked, True
        elif not last and stops is not None and stops.requested():
            loop.stop_reason, last = stops.signal_name, True
        if not last and time_budget is not None:
            next_evaluates = (position + 1) % eval_every == 0 or position + 1 == total
            eval_cost = [sorted(loop.eval_times)[len(loop.eval_times) // 2]] if loop.eval_times else []
            # The next unit must fit with its evaluation, or with the final one it would force.
            if not budget.next_fits(eval_cost if (next_evaluates or loop.eval_times) else []):
                loop.stop_reason, last = "time_budget", True
        # The last unit is evaluated whatever eval_every says, so a run always ends with its model
        # selected and saved.
        if position % eval_every == 0 or position == total or (last and evaluate_on_stop):
            t1 = time.perf_counter()
            metrics = task.evaluate(position)
            eval_s = time.perf_counter() - t1
            loop.eval_times.append(eval_s)
            record.update({k: v for k, v in metrics.items() if k != unit})
            record.setdefault("eval_s", round(eval_s, 4))
            if metrics["valid"][selection] > best["value"]:
                best.update({unit: position, "value": metrics["valid"][selection], "valid": metrics["valid"],
                             "test": metrics["test"]})
                if task.keep_best is not None:
                    task.keep_best(position)
                if writes:
                    save_checkpoint(run.file("best.pt"), task.checkpoint(position))
        if writes:
            run.log(record)
            if position % checkpoint_every == 0 or last:
                save_checkpoint(run.file("last.pt"), {**task.checkpoint(position), **task.resume_state(),
                                                      "elapsed": budget.elapsed()})
            if "valid" in record:  # summary.json stays current while the run goes on
                run.write_json("summary.json", summary_now("running"))
        bar.update(1, **task.shown(record), best=f"{best['value']:.4f}@{best[unit]}" if best[unit] or
                   best["valid"] is not None else "-")
        if last:
            break
    bar.close()

    if loop.stop_reason == "time_budget" and patience is not None and loop.position < patience:
        loop.notes.append(f"the time budget stopped the run after {loop.position} {unit}(s), before the first "
                          f"patience window ({patience} {unit}s) could tell whether it had converged")
    if loop.stop_reason not in FINISHED:
        loop.notes.append(f"stopped by {loop.stop_reason} after {unit} {loop.position} of {total}: continue with "
                          "--resume")
    if run is not None:  # the notes of a run without a folder are its summary's alone
        for note in loop.notes:
            log.warning("%s: %s", desc, note)
    summary = summary_now("finished" if loop.stop_reason in FINISHED else "stopped")
    if writes:
        if task.finish is not None:
            task.finish(summary)
        run.write_json("summary.json", summary)
    if run is not None:
        dist.barrier()  # the run folder is complete before any rank returns
    return summary


@dataclass
class EpochTask:
    """What :func:`run_epochs` needs from a model family.

    Attributes:
        train_epoch: ``train_epoch(epoch) -> mean training loss`` (every rank calls it).
        evaluate: ``evaluate() -> {"valid": metrics, "test": metrics}`` (every rank; collective).
        checkpoint: ``checkpoint(epoch, best) -> dict``: the model's state for ``best.pt``.
        resume_state: ``resume_state() -> dict``: what ``last.pt`` adds for ``--resume``
            (optimiser, generators, loss history).
    """

    train_epoch: Callable[[int], float]
    evaluate: Callable[[], Dict[str, Dict[str, float]]]
    checkpoint: Callable[[int, Dict[str, Any]], Dict[str, Any]]
    resume_state: Callable[[], Dict[str, Any]]


def run_epochs(run: RunDir, task: EpochTask, *, epochs: int, eval_every: int, patience: int,
               time_budget: Optional[float], progress: Optional[bool], selection: str, start_epoch: int,
               best: Dict[str, Any], t_start: float, elapsed_before: float, stops: StopRequests,
               summary_extra: Dict[str, Any], init_competes: bool = False, desc: str = "pretrain") -> Dict[str, Any]:
    """A pretraining run's epochs ``start_epoch .. epochs`` through :func:`run_loop`; returns the summary.

    ``best`` is ``{"epoch", "value", "valid", "test"}`` (epoch 0 and value -1
    before any evaluation); ``init_competes``: the starting model was
    evaluated as epoch 0, so patience counts from it. ``summary_extra`` is
    merged into every summary (data description).
    """
    def summary(loop: LoopState) -> Dict[str, Any]:
        return {"epochs_run": loop.position,
                "train_s_per_epoch": round(sum(loop.train_times) / len(loop.train_times), 4)
                if loop.train_times else None,
                "eval_s_per_pass": round(sum(loop.eval_times) / len(loop.eval_times), 4) if loop.eval_times else None,
                **summary_extra}

    return run_loop(
        run, LoopTask(train=lambda epoch: {"loss": task.train_epoch(epoch)}, evaluate=lambda epoch: task.evaluate(),
                      checkpoint=lambda epoch: task.checkpoint(epoch, best), resume_state=task.resume_state,
                      summary=summary, shown=lambda record: {"loss": f"{record['loss']:.4f}"}),
        unit="epoch", total=epochs, start=start_epoch, best=best, selection=selection, stops=stops, t_start=t_start,
        elapsed_before=elapsed_before, eval_every=eval_every, patience=patience, time_budget=time_budget,
        init_competes=init_competes, progress=progress, desc=desc)


__all__ = ["LoopTask", "LoopState", "run_loop", "EpochTask", "run_epochs", "peak_memory_mb", "FINISHED"]
