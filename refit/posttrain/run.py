"""A post-training run: :func:`finetune` (a run folder, resume, the loop of :mod:`refit.runtime.loop`,
evaluation and the summary around :class:`refit.posttrain.trainer.ReFiT`) and :func:`load_policy`, which
loads any refit checkpoint as a policy through its model family."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from ..policy import check_policy, kept_modes
from ..runtime import distributed as dist
from ..runtime.control import StopRequests
from ..runtime.loop import LoopState, LoopTask, run_loop
from ..runtime.runs import RunDir, data_fingerprint, load_checkpoint, save_checkpoint
from .config import FinetuneConfig
from .report import _diagnostics_summary, _plot
from .trainer import ReFiT

def finetune(config: FinetuneConfig, data=None, *, resume: bool = False, overwrite: bool = False,
             device: Any = "cpu", max_iterations_this_run: Optional[int] = None, policy=None,
             reward_fn: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None, episodes=None) -> Dict[str, Any]:
    """Runs (or resumes) ReFiT from a pretrained checkpoint; returns the summary (also summary.json).

    ``config.checkpoint`` is any refit checkpoint (DiffRec, CF-Diff, DreamRec,
    or a model imported into refit's format); ``policy`` instead fine-tunes a
    policy built in this process (e.g. an outside model wrapped by
    :func:`refit.policy.ScheduleDenoiser`), with ``data`` given.

    ``reward_fn`` and ``episodes`` replace the collaborative reward and the data's episodes (see
    :class:`ReFiT`); neither is recorded, so a resumed run must be given them again.

    ``max_iterations_this_run`` stops early without finishing (as a killed run would). A ``policy``
    is checked first (:func:`refit.policy.check_policy`) and returned to the train/eval mode it had;
    ``config.precision`` sets its precision, as for a checkpoint's.

    SIGTERM or SIGINT stops the run at the end of the current iteration: it
    writes ``last.pt`` and a ``summary.json`` with ``status: "stopped"`` and
    the signal in ``stop_reason`` (``--resume`` continues it). The summary is
    also rewritten at every evaluation (``status: "running"``).

    Under torch.distributed every rank calls this; rank 0 alone writes the run
    folder. A run may be resumed with another number of processes: its
    checkpoint holds the global iteration, the optimiser and the generator
    state, which are the same on every rank.

    The run holds ``config.out`` from start to end (:meth:`refit.runtime.runs.RunDir.claim`): a second run in
    it is refused, and so is a new run in a folder that holds one, unless ``resume`` (continue it) or
    ``overwrite`` (remove its files first; never the checkpoint it starts from).
    """
    # A policy of the caller's goes back in the train/eval modes it came in, submodule by submodule
    # (the trainer samples and evaluates in eval mode).
    modes = (kept_modes(policy.module) if isinstance(getattr(policy, "module", None), torch.nn.Module)
             else contextlib.nullcontext())
    threads = torch.get_num_threads()
    try:
        with modes, StopRequests() as stops, RunDir(config.out).claim(resume=resume, overwrite=overwrite,
                                                                      inputs=[config.checkpoint]):
            return _finetune(config, data, resume, device, max_iterations_this_run, stops, policy, reward_fn,
                             episodes)
    finally:  # what the thread governor changed during the run ends with it
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def load_policy(path: str, data=None, *, device: Any = "cpu", precision: Optional[str] = None,
                allow_other_data: bool = False, factory: Optional[str] = None):
    """``(policy, data, state)`` of a saved refit checkpoint, whatever its model family.

    A checkpoint of an outside policy (:func:`refit.policy.ScheduleDenoiser`,
    :func:`refit.latent_adapter.LatentScheduleDenoiser`) holds the outside module's weights but not
    its code: ``factory``, ``"module:function"`` (see :func:`refit.policy.import_factory`), builds the
    policy from the data, and the checkpoint's weights are loaded into it. ValueError without one.
    """
    from ..policy import OUTSIDE_MODELS, import_factory, load_outside_policy
    from ..runtime.runs import checkpoint_data

    state = load_checkpoint(path)
    model = state.get("recommender", {}).get("model", {})
    if model.get("name") in OUTSIDE_MODELS:
        config = model.get("config", {})
        what = config.get("external") or config.get("outside") or "an outside module"
        if factory is None:
            raise ValueError(f"checkpoint {path!r} holds an outside policy's weights ({what}), not a model refit "
                             "can rebuild: name a function that builds the policy from the data with --policy "
                             "MODULE:FUNCTION (Python: factory=), or load "
                             "refit.policy.outside_state_dict(state) into your module")
        data = checkpoint_data(path, state, data, allow_other_data=allow_other_data)
        policy = load_outside_policy(path, state, data, import_factory(factory))
        if precision is not None and hasattr(policy, "precision"):
            policy.precision = precision
        return policy, data, state
    if factory is not None:
        raise ValueError(f"--policy is for checkpoints of outside policies; {path!r} holds refit's own "
                         f"{model.get('name')!r} model, which refit rebuilds itself")
    from .. import families

    family = families.of_checkpoint(model.get("name"))
    if family is None:
        raise ValueError(f"checkpoint {path!r} holds a {model.get('name')!r} model, which no registered model family "
                         f"loads (registered: {', '.join(families.names())})")
    return family.load(path, data, device=device, precision=precision, allow_other_data=allow_other_data)


def _finetune(config: FinetuneConfig, data, resume: bool, device: Any, max_iterations_this_run: Optional[int],
              stops: StopRequests, policy=None, reward_fn=None, episodes=None) -> Dict[str, Any]:
    t_start = time.perf_counter()
    dist.warn_if_not_joined("finetune")
    run = RunDir(config.out)
    main = dist.is_main()
    from ..data import load_dataset

    own_source = data is None and config.data is None and policy is None  # the checkpoint's own data
    if data is None and config.data is not None:
        data = load_dataset(config.data, **config.data_options)
    if policy is None:
        rec, data, pre_state = load_policy(config.checkpoint, data, device=device, precision=config.precision,
                                           allow_other_data=config.allow_other_data, factory=config.policy_factory)
    else:
        if data is None:
            raise ValueError("finetune(policy=...) needs the data (data=...)")
        check_policy(policy)  # before any attribute of it is read
        if hasattr(policy, "precision"):  # config.precision applies, as to a checkpoint's policy (load_policy)
            policy.precision = config.precision
        rec, pre_state = policy, {}
    fingerprint = data_fingerprint(data)
    selection = rec.selection_metric
    torch.manual_seed(config.seed)
    trainer = ReFiT(rec, data, config, reward_fn=reward_fn, episodes=episodes)

    start, best = 1, None
    elapsed_before = 0.0
    state = run.resume_state(config, fingerprint, resume=resume, position="iteration")
    if state is not None:
        rec.module.load_state_dict(state["recommender"]["model"]["state_dict"])
        trainer.load(state["trainer"])
        start, best, elapsed_before = state["iteration"] + 1, state["best"], state.get("elapsed", 0.0)
    if main:
        run.write_json("config.json", {**config.to_dict(), "data_fingerprint": fingerprint,
                                       "pretrained": os.path.abspath(config.checkpoint) if config.checkpoint else None})

    data_meta = dict(pre_state.get("data") or {})
    if data_meta.get("fingerprint") != fingerprint and not own_source:
        # Other data than the start checkpoint's (allow_other_data, or none recorded): its source would
        # name data this run was not trained on.
        # Given the data object itself (finetune(policy=..., data=...)), the source it was loaded from.
        source, options = ((config.data, dict(config.data_options)) if config.data else
                           (getattr(data, "source", None), dict(getattr(data, "source_options", {}))))
        data_meta.update(source=source, options=options,
                         **{k: getattr(data, k) for k in ("n_users", "n_items") if hasattr(data, k)})

    def ckpt(iteration: int) -> Dict[str, Any]:
        return {"kind": "finetune", "recommender": rec.state(), "config": config.to_dict(),
                "data": {**data_meta, "fingerprint": fingerprint},
                "iteration": iteration, "best": best,
                "pretrained": os.path.abspath(config.checkpoint) if config.checkpoint else None}

    def evaluate(iteration: int) -> Dict[str, Any]:
        t = time.perf_counter()
        # The default cut-offs that fit the item count (a small catalogue has no top 100).
        ks = config.ks or tuple(k for k in ((10, 20, 50) if hasattr(data, "targets") else (10, 20, 50, 100))
                                if k <= data.n_items)
        metrics = rec.evaluate(data, ks=ks, batch_size=config.eval_batch_size)
        probe = trainer.probe()
        return {"iteration": iteration, "valid": metrics["valid"], "test": metrics["test"], **probe,
                "eval_s": round(time.perf_counter() - t, 3)}

    if best is None:  # iteration 0: the pretrained model itself
        record = evaluate(0)
        best = {"iteration": 0, "value": record["valid"][selection], "valid": record["valid"],
                "test": record["test"], "before": {"valid": record["valid"], "test": record["test"]},
                "probe_start": {k: v for k, v in record.items() if k.startswith("probe_")}}
        if main:
            run.log(record)
            save_checkpoint(run.file("best.pt"), ckpt(0))

    step_times = []

    def train(iteration: int) -> Dict[str, Any]:
        trainer.set_iteration(iteration)
        stats = trainer.step()
        step_times.append(stats["step_s"])
        return stats

    def summary(loop: LoopState) -> Dict[str, Any]:
        return {
            **_diagnostics_summary(run.records() if main else [], best.get("probe_start", {}),
                                   0 if trainer._probe is None else int(trainer._probe.users.numel())),
            "before": best["before"],
            "iterations": loop.position,
            "iterations_planned": loop.planned,
            "s_per_iteration": round(float(np.median(step_times)), 4) if step_times else None,
        }

    def shown(record: Dict[str, Any]) -> Dict[str, str]:
        out = {"reward": f"{record.get('reward', record.get('weighted_rating', 0.0)):.3f}"}
        if "probe_reward" in record:
            out["probe"] = f"{record['probe_reward']:.4f}"
        return out

    def finish(summary: Dict[str, Any]) -> None:
        if config.plot:
            summary["plot"] = _plot(run)

    task = LoopTask(train=train, evaluate=evaluate, checkpoint=ckpt,
                    resume_state=lambda: {"trainer": trainer.state()}, summary=summary, shown=shown, finish=finish)
    return run_loop(run, task, unit="iteration", total=config.iterations, start=start, best=best,
                    selection=selection, stops=stops, t_start=t_start, elapsed_before=elapsed_before,
                    eval_every=config.eval_every, checkpoint_every=config.checkpoint_every, evaluate_on_stop=False,
                    train_key=None, progress=config.progress, desc="refit", max_this_run=max_iterations_this_run)
