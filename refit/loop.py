"""The epoch loop every pretraining run shares: evaluation, selection, stopping, run folder.

A model family supplies an :class:`EpochTask` (train one epoch, evaluate,
the checkpoint contents); :func:`run_epochs` does the rest the same way for
all of them: it evaluates every ``eval_every`` epochs and always the last
epoch, keeps the best validation score in ``best.pt``, writes ``last.pt``
and a line of ``metrics.jsonl`` per epoch, rewrites ``summary.json`` at every
evaluation, and stops at ``epochs``, after ``patience`` epochs without
improvement, before an epoch that would not fit in the time budget, or at the
end of the epoch in which SIGTERM / SIGINT arrived.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from . import distributed as dist
from .control import Progress, StopRequests, TimeBudget
from .runs import RunDir, save_checkpoint

log = logging.getLogger(__name__)

#: Stop reasons of a run that ended by itself (anything else is a signal's name).
FINISHED = ("epochs", "patience", "time_budget")


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
    """Runs epochs ``start_epoch .. epochs``; returns the summary (also ``summary.json``).

    ``best`` is ``{"epoch", "value", "valid", "test"}`` (epoch 0 and value -1
    before any evaluation); ``init_competes``: the starting model was
    evaluated as epoch 0, so patience counts from it. ``summary_extra`` is
    merged into every summary (data description, world size).
    """
    main = dist.is_main()
    bar = Progress(progress if main else False, total=epochs, initial=start_epoch - 1, desc=desc, unit="epoch")
    budget = TimeBudget(time_budget, t_start, elapsed_before)
    epoch = start_epoch - 1
    stop_reason = "epochs"
    train_times: List[float] = []
    eval_times: List[float] = []
    notes: List[str] = []

    def summary_now(status: str) -> Dict[str, Any]:
        return {
            "status": status,
            "best_epoch": best["epoch"],
            "selection": f"valid {selection}",
            "valid": best["valid"],
            "test": best["test"],
            "epochs_run": epoch,
            "stop_reason": stop_reason if status != "running" else None,
            "stopped_early": status != "running" and stop_reason != "epochs",
            "warnings": list(notes),
            "seconds": round(budget.elapsed(), 2),
            "train_s_per_epoch": round(sum(train_times) / len(train_times), 4) if train_times else None,
            "eval_s_per_pass": round(sum(eval_times) / len(eval_times), 4) if eval_times else None,
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "checkpoint": run.file("best.pt") if best["valid"] is not None else None,
            **summary_extra,
        }

    for epoch in range(start_epoch, epochs + 1):
        if epoch - best["epoch"] >= patience and (best["epoch"] > 0 or init_competes):
            stop_reason = "patience"
            epoch -= 1
            break
        t0 = time.perf_counter()
        loss = task.train_epoch(epoch)
        train_s = time.perf_counter() - t0
        train_times.append(train_s)
        budget.record(train_s)
        # The last epoch is evaluated whatever eval_every says, so a run always ends with its
        # model selected and saved.
        last = epoch == epochs
        if not last and stops.requested():
            stop_reason, last = stops.signal_name, True
        if not last:
            next_evaluates = (epoch + 1) % eval_every == 0 or epoch + 1 == epochs
            eval_cost = [sorted(eval_times)[len(eval_times) // 2]] if eval_times else []
            # The next epoch must fit with its evaluation, or with the final one it would force.
            if not budget.next_fits(eval_cost if (next_evaluates or eval_times) else []):
                stop_reason, last = "time_budget", True
        record: Dict[str, Any] = {"epoch": epoch, "loss": loss, "train_s": round(train_s, 4)}
        if epoch % eval_every == 0 or last:
            t1 = time.perf_counter()
            metrics = task.evaluate()
            eval_s = time.perf_counter() - t1
            eval_times.append(eval_s)
            record.update({"valid": metrics["valid"], "test": metrics["test"], "eval_s": round(eval_s, 4)})
            if metrics["valid"][selection] > best["value"]:
                best.update(epoch=epoch, value=metrics["valid"][selection], valid=metrics["valid"],
                            test=metrics["test"])
                if main:
                    save_checkpoint(run.file("best.pt"), task.checkpoint(epoch, best))
        if main:
            run.log(record)
            save_checkpoint(run.file("last.pt"), {**task.checkpoint(epoch, best), **task.resume_state(),
                                                  "elapsed": budget.elapsed()})
            if "valid" in record:  # summary.json stays current while the run goes on
                run.write_json("summary.json", summary_now("running"))
        bar.update(1, loss=f"{loss:.4f}", best=f"{best['value']:.4f}@{best['epoch']}" if best["epoch"] else "-")
        if last:
            break
    bar.close()

    if stop_reason == "time_budget" and epoch < patience:
        notes.append(f"the time budget stopped the run after {epoch} epoch(s), before the first patience "
                     f"window ({patience} epochs) could tell whether it had converged")
    if stop_reason not in FINISHED:
        notes.append(f"stopped by {stop_reason} after epoch {epoch}: continue with --resume")
    for note in notes:
        log.warning("%s: %s", desc, note)
    summary = summary_now("finished" if stop_reason in FINISHED else "stopped")
    if main:
        run.write_json("summary.json", summary)
    dist.barrier()  # the run folder is complete before any rank returns
    return summary


__all__ = ["EpochTask", "run_epochs", "peak_memory_mb", "FINISHED"]
