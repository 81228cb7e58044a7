"""The registry of model families: what a family is, and the table of them (see :mod:`refit.families`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

#: The kinds of data a family ranks: rows of interactions (Recall@k, NDCG@k, ...) or next-item
#: sequences (HR@k, NDCG@k, MRR@k).
DATA_KINDS = ("interactions", "sequences")
#: The metrics a table of each data kind shows.
METRICS = {"interactions": ("recall", "ndcg", "precision", "mrr"), "sequences": ("hr", "ndcg", "mrr")}


@dataclass(frozen=True)
class Family:
    """A model family.

    Attributes:
        name: what ``refit pretrain --model`` takes.
        config: the pretraining configuration (a dataclass with ``data``, ``data_options``, ``model``,
            ``out``, ``progress``, ``ks`` and ``epochs`` fields; its :func:`refit.settings.setting` fields
            are the command's flags, ``model`` is set to ``name``).
        pretrain: ``pretrain(config, *, resume, overwrite, device) -> summary`` (the summary of
            :func:`refit.runtime.loop.run_epochs`).
        load: ``load(path, data=None, *, device, precision, allow_other_data) -> (policy, data, state)``:
            a checkpoint as a policy of :mod:`refit.policy`'s protocol, with its data and the checkpoint.
        data_kind: one of :data:`DATA_KINDS`.
        checkpoint_name: the model name its checkpoints record (``state["recommender"]["model"]["name"]``);
            default ``name``. Families may share one (PreferDiff's checkpoints are DreamRec's kind).
        policy_type: the class of its policies, for :func:`graphed`.
        graphed: ``graphed(policy, *, batch_size, eval_batch_size, use_graph)``: the policy with its
            reverse-sampling loops in CUDA graphs (see :mod:`refit.runtime.cudagraph`).
        evaluate: for a sequence family, ``evaluate(policy, data, splits, *, ks, batch_size, exclude_history,
            seed, progress, protocol) -> {split: metrics}``: what ``refit evaluate`` runs on its
            checkpoints, with the evaluation protocols of :func:`refit.evaluate.evaluate_sequences`
            (``protocol``: "full", "dreamrec" or "preferdiff"). Default: the policy's own
            ``evaluate(data, ks=, batch_size=)`` (the full protocol only).
        help: one line for ``refit pretrain --help``.
    """

    name: str
    config: type
    pretrain: Callable[..., Dict[str, Any]]
    load: Callable[..., Tuple[Any, Any, Dict[str, Any]]]
    data_kind: str = "interactions"
    checkpoint_name: Optional[str] = None
    policy_type: Optional[type] = None
    graphed: Optional[Callable[..., Any]] = None
    evaluate: Optional[Callable[..., Dict[str, Dict[str, float]]]] = None
    help: str = field(default="", compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name.startswith("-"):
            raise ValueError(f"a family's name must be a non-empty string, got {self.name!r}")
        if self.data_kind not in DATA_KINDS:
            raise ValueError(f"data_kind must be one of {DATA_KINDS}, got {self.data_kind!r}")
        if not isinstance(self.config, type) or not hasattr(self.config, "__dataclass_fields__"):
            raise TypeError(f"family {self.name!r}: config must be a dataclass, got {self.config!r}")
        missing = [f for f in ("data", "data_options", "model", "out", "progress", "ks", "epochs")
                   if f not in self.config.__dataclass_fields__]
        if missing:
            raise TypeError(f"family {self.name!r}: its config {self.config.__name__} lacks the fields "
                            f"{', '.join(missing)}")
        for what in ("pretrain", "load"):
            if not callable(getattr(self, what)):
                raise TypeError(f"family {self.name!r}: {what} must be callable")
        for what in ("graphed", "evaluate"):
            if getattr(self, what) is not None and not callable(getattr(self, what)):
                raise TypeError(f"family {self.name!r}: {what} must be callable or None")

    @property
    def stored_name(self) -> str:
        """The model name its checkpoints record."""
        return self.checkpoint_name or self.name

    @property
    def metrics(self) -> Tuple[str, ...]:
        """The metrics its tables show."""
        return METRICS[self.data_kind]


_FAMILIES: Dict[str, Family] = {}


def register(family: Family, *, replace: bool = False) -> Family:
    """Adds ``family`` under its name; a name taken already is refused unless ``replace``."""
    if not isinstance(family, Family):
        raise TypeError(f"register takes a Family, got {type(family).__name__}")
    if family.name in _FAMILIES and not replace and _FAMILIES[family.name] != family:
        raise ValueError(f"a model family named {family.name!r} is registered already (replace=True replaces it)")
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Removes the family ``name`` (a no-op when there is none)."""
    _FAMILIES.pop(name, None)


def names() -> List[str]:
    """The registered families' names, in the order they registered."""
    return list(_FAMILIES)


def get(name: str) -> Family:
    """The family ``name``; ValueError naming the registered ones otherwise."""
    try:
        return _FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model family {name!r}; registered: {', '.join(_FAMILIES)}") from None


def of_checkpoint(model_name: str) -> Optional[Family]:
    """The first family whose checkpoints record ``model_name``, or None."""
    for family in _FAMILIES.values():
        if family.stored_name == model_name:
            return family
    return None


def of_policy(policy: Any) -> Optional[Family]:
    """The family whose ``policy_type`` ``policy`` is an instance of (the most derived one), or None."""
    found = [f for f in _FAMILIES.values() if f.policy_type is not None and isinstance(policy, f.policy_type)]
    for f in found:
        if all(issubclass(f.policy_type, g.policy_type) for g in found):
            return f
    return found[0] if found else None


def graphed(policy, *, batch_size: Optional[int] = None, eval_batch_size: Optional[int] = None,
            use_graph: Optional[bool] = None):
    """``policy`` with its reverse-sampling loops in CUDA graphs, by its family's wrapper (see
    :mod:`refit.runtime.cudagraph`); a policy that is wrapped already comes back as it is.

    ``batch_size``: ReFiT's batch (trajectories per iteration); ``eval_batch_size``: evaluation's.
    Smaller batches are padded to them; a bigger one builds (and captures) a bigger sampler.
    ``use_graph=False`` runs the capture-safe loop eagerly (on any device). TypeError for a policy
    whose family has no wrapper.
    """
    from ..runtime.cudagraph import is_graphed

    if is_graphed(policy):
        return policy
    family = of_policy(policy)
    if family is None or family.graphed is None:
        kinds = [f.policy_type.__name__ for f in _FAMILIES.values() if f.graphed is not None and f.policy_type]
        raise TypeError(f"no graphed sampler for {type(policy).__name__}: wrap one of "
                        f"{', '.join(dict.fromkeys(kinds))}")
    return family.graphed(policy, batch_size=batch_size, eval_batch_size=eval_batch_size, use_graph=use_graph)


__all__ = ["Family", "DATA_KINDS", "METRICS", "register", "unregister", "names", "get", "of_checkpoint", "of_policy",
           "graphed"]
