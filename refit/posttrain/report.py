"""What a post-training run reports beside its metrics: the summary of its per-iteration diagnostics and
the probe, and the plot of a run folder's records."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import numpy as np

from ..runtime.runs import RunDir, atomic_write

log = logging.getLogger(__name__)

#: The per-iteration diagnostics summarised in summary.json (means over the run's iterations).
DIAGNOSTICS = ("zero_variance_groups", "reward_within", "reward_between", "adv_std", "kept_fraction", "grad_norm",
               "kl", "ppo_clip_fraction", "old_deviation", "r_std")


def _diagnostics_summary(records, probe_start: Dict[str, float], probe_episodes: int = 0) -> Dict[str, Any]:
    """summary.json's view of the run's diagnostics: the probe at the start and at the last evaluation
    (and the relative change of the probe reward), and the mean of each per-iteration diagnostic."""
    out: Dict[str, Any] = {}
    probes = [r for r in records if "probe_reward" in r]
    if probe_start or probes:
        end = {k: v for k, v in probes[-1].items() if k.startswith("probe_")} if probes else {}
        out["probe"] = {"episodes": probe_episodes, "start": probe_start, "end": end,
                        "end_iteration": probes[-1]["iteration"] if probes else 0}
        r0, r1 = probe_start.get("probe_reward"), end.get("probe_reward")
        if r0 and r1 is not None:
            out["probe"]["reward_change"] = (r1 - r0) / abs(r0)
    steps = [r for r in records if r.get("iteration", 0) > 0]
    means = {k: float(np.mean([r[k] for r in steps if k in r])) for k in DIAGNOSTICS if any(k in r for r in steps)}
    if means:
        out["diagnostics"] = means
    return out


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
    # The sampled reward; offline runs sample nothing, and show the rating their weights favour.
    key = "reward" if any("reward" in r for r in records) else "weighted_rating"
    it = [r["iteration"] for r in records if key in r]
    rw = [r[key] for r in records if key in r]
    ev = [r for r in records if "valid" in r]
    probes = [r for r in records if "probe_reward" in r]
    fig, ax = plt.subplots(1, 3 if probes else 2, figsize=(15 if probes else 10, 3.6))
    ax[0].plot(it, rw, lw=0.8, color="tab:blue", alpha=0.5, label="batch")
    if len(rw) >= 5:
        w = max(1, len(rw) // 20)
        smooth = np.convolve(rw, np.ones(w) / w, mode="valid")
        ax[0].plot(it[w - 1:], smooth, color="tab:blue", label=f"mean of {w}")
    ax[0].set(xlabel="iteration", ylabel=key.replace("_", " "),
              title="ReFiT reward" if key == "reward" else "rating under the weights")
    ax[0].legend()
    if ev:
        xs = [r["iteration"] for r in ev]
        first = "recall@20" if "recall@20" in ev[0]["valid"] else "hr@20"
        ax[1].plot(xs, [r["valid"][first] for r in ev], "o-", label=first.replace("recall", "Recall").replace(
            "hr", "HR"))
        ax[1].plot(xs, [r["valid"]["ndcg@20"] for r in ev], "s-", label="NDCG@20")
        ax[1].set(xlabel="iteration", title="validation")
        ax[1].legend()
    if probes:  # the optimiser's own objective on fixed episodes and noise: does it rise?
        xs = [r["iteration"] for r in probes]
        ax[2].plot(xs, [r["probe_reward"] for r in probes], "o-", label="reward")
        twin = ax[2].twinx()
        twin.plot(xs, [r["probe_ndcg"] for r in probes], "s--", color="tab:green", label="NDCG (full list)")
        twin.set_ylabel("NDCG")
        ax[2].set(xlabel="iteration", ylabel="reward", title="probe (fixed episodes and noise)")
        ax[2].legend(loc="upper left")
        twin.legend(loc="lower right")
    fig.tight_layout()
    path = run.file("plot.png")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path
