"""The diffusion-policy protocol: all the ReFiT trainer knows of a diffusion recommender.

A reverse denoising process is a policy: each of its stochastic steps draws
``x_{s+1} ~ N(coef_pred[s] * out_s + coef_x[s] * x_s, exp(log_var[s]))``
where ``out_s`` is the denoiser's output. Post-training needs only this of a
model (``inputs`` are an :class:`~refit.reward.Episode`'s policy inputs,
``users`` its ids; B rows, S stochastic steps, D the dimension of a state):

``sample(users, inputs, *, generator=None, temperature=1.0, rows=None, keep_graph=False) -> Trajectory``
    Runs the reverse process with noise and returns a
    :class:`~refit.diffusion.Trajectory`: ``states`` (S+1, B, D), ``preds``
    (S, B, D), per-step ``coef_pred``, ``coef_x``, ``log_var``, ``timesteps``
    (S,), and the ``final`` (B, D) state. No gradient unless ``keep_graph``.
    ``rows=(offset, total)``: the batch is a slice of a global batch; every
    random draw is the global batch's, sliced (see :mod:`refit.runtime.distributed`).
``outputs(users, inputs, traj) -> Tensor``
    The denoiser's (S, B, D) outputs along a given trajectory, re-evaluated
    with gradient (in one batched forward pass). With the trajectory's
    constants they give its log-likelihood through
    :func:`refit_kernels.gaussian_logprob`.
``final_scores(users, inputs, final) -> Tensor``
    (B, n_items) ranking scores of final states (for the reward).
``pretraining_loss(episode, *, generator=None, rows=None) -> Tensor``
    (B,) the model's own training loss on the episode's data (the ELBO
    anchor).
``denoising_loss(users, inputs, x0, *, generator=None, rows=None) -> Tensor``
    (B,) the model's denoising loss toward given clean states ``x0`` (B, D)
    (reward-weighted fine-tuning toward sampled final states).
``training_target(users, inputs, final, *, exclude=None, k=20) -> Tensor``
    (B, D) what a sampled final state stands for as a target of
    ``denoising_loss`` (reward-weighted fine-tuning): DreamRec's generated
    embedding itself; for DiffRec's score rows, the binary row of the start
    row's items and the top-k list the reward judged.
``evaluate(data, *, ks, batch_size) -> {"valid": metrics, "test": metrics}``
    Full-ranking metrics; ``selection_metric`` names the one that selects
    the best model ("recall@20", "hr@20").
``module``, ``precision``, ``device``, ``state()``
    The ``torch.nn.Module`` holding every trained parameter (optimised,
    switched between train and eval mode, deep-copied for the KL anchor), the
    autocast precision, the device, and everything a checkpoint holds.

refit's :class:`~refit.families.diffrec.recommender.RowRecommender` (DiffRec, CF-Diff) and
:class:`~refit.families.dreamrec.recommender.SeqRecommender` (DreamRec) implement it;
:class:`ScheduleDenoiser` adapts any ``denoiser(x_t, t)`` with a beta schedule
written the way DiffRec's paper code is, and
:func:`refit.latent_adapter.LatentScheduleDenoiser` a guided latent sequence
model written the way DreamRec's published code is. :class:`DiffusionPolicy`
states the protocol with its signatures; :func:`check_policy` checks a policy
against it (and, given data, the shapes it returns) before a run starts.

Where episodes come from depends on the data, not on the model:
:func:`episode_source` gives interaction data's (a user's training row with a
fraction of its items hidden: :func:`refit.reward.make_episode`) or sequence
data's (a training target and the window before it:
:func:`refit.reward.sequence_episode`).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Dict, Iterator, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np
import torch

import refit_kernels as rk

from .diffusion import MEAN_TYPES, GaussianDiffusion, Trajectory, batched_outputs  # noqa: F401  (importable from here)
from .reward import Episode, make_episode, map_inputs, sequence_episode

#: The protocol's method names (what :func:`check_policy` looks for).
PROTOCOL = ("sample", "outputs", "final_scores", "pretraining_loss", "denoising_loss", "training_target", "evaluate",
            "state", "module",
            "selection_metric", "precision", "device")

#: What each method must accept beyond its positional arguments (the trainer passes these by keyword).
_KEYWORDS = {
    "sample": (2, ("generator", "temperature", "rows", "keep_graph")),
    "outputs": (3, ()),
    "final_scores": (3, ()),
    "pretraining_loss": (1, ("generator", "rows")),
    "denoising_loss": (3, ("generator", "rows")),
    "training_target": (3, ("exclude", "k")),
    "evaluate": (1, ("ks", "batch_size")),
    "state": (0, ()),
}

#: The kinds of data a policy can be fine-tuned on (its optional ``data_kind`` attribute).
DATA_KINDS = ("interactions", "sequences")


@runtime_checkable
class DiffusionPolicy(Protocol):
    """What the trainer calls on a diffusion recommender (the module docstring has the details).

    Shapes: B rows, S stochastic steps, D the dimension of a state (the item
    count for row models, the embedding width for latent ones), I the item
    count. Every tensor the trainer gets back is float32 unless said.
    ``data_kind`` ("interactions" or "sequences") is optional: when given,
    data of the other kind are refused before anything runs.
    """

    selection_metric: str  # the validation metric that selects the best model ("recall@20", "hr@20")
    precision: str  # "fp32" or "bf16" (autocast)

    @property
    def module(self) -> torch.nn.Module:
        """Every trained parameter; switched between train and eval mode by the trainer."""

    @property
    def device(self) -> torch.device: ...

    def sample(self, users: torch.Tensor, inputs: Any, *, generator: Optional[torch.Generator] = None,
               temperature: float = 1.0, rows: Optional[Tuple[int, int]] = None, keep_graph: bool = False,
               **options: Any) -> Trajectory:
        """A noisy reverse trajectory: states (S+1, B, D), preds (S, B, D), final (B, D). ``options``:
        ``steps``, ``eta``, ``explore``, ``group_size`` when the run's settings use them."""

    def outputs(self, users: torch.Tensor, inputs: Any, traj: Trajectory) -> torch.Tensor:
        """(S, B, D) denoiser outputs along ``traj``, with gradient."""

    def final_scores(self, users: torch.Tensor, inputs: Any, final: torch.Tensor) -> torch.Tensor:
        """(B, I) ranking scores of the (B, D) final states."""

    def pretraining_loss(self, episode: Episode, *, generator: Optional[torch.Generator] = None,
                         rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(B,) the model's own training loss on the episode, one value per row."""

    def denoising_loss(self, users: torch.Tensor, inputs: Any, x0: torch.Tensor, *,
                       generator: Optional[torch.Generator] = None,
                       rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(B,) each row's own denoising loss toward its (B, D) clean state ``x0`` (never a batch mean)."""

    def training_target(self, users: torch.Tensor, inputs: Any, final: torch.Tensor, *, exclude: Any = None,
                        k: int = 20) -> torch.Tensor:
        """(B, D) the clean state a sampled final state stands for, as a target of ``denoising_loss``."""

    def evaluate(self, data: Any, *, ks: Sequence[int], batch_size: int) -> Dict[str, Dict[str, float]]:
        """``{"valid": metrics, "test": metrics}`` with ``selection_metric`` among the metrics."""

    def state(self) -> Dict[str, Any]:
        """Everything a checkpoint holds of the policy: ``{"model": {"name", "config", "state_dict"},
        "diffusion": ..., "inference": ...}`` as refit's own policies write it, or, for a policy of
        one's own, :func:`policy_state` (``model`` alone, named "external"). Resume loads
        ``["model"]["state_dict"]`` into ``module``."""


def data_kind(data: Any) -> str:
    """"sequences" for sequence data (windows before targets), else "interactions"."""
    return "sequences" if hasattr(data, "targets") and hasattr(data, "windows") else "interactions"


def _bindable(fn: Callable, n_positional: int, keywords: Sequence[str]) -> Optional[str]:
    """None when ``fn`` can be called with ``n_positional`` arguments and ``keywords``, else why not."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return None
    try:
        sig.bind(*([None] * n_positional), **{k: None for k in keywords})
    except TypeError as exc:
        return (f"{sig} cannot take {n_positional} positional argument(s) and the keywords "
                f"{', '.join(keywords) or '(none)'} ({exc})")
    return None


def check_policy(policy: Any, data: Any = None, *, sample_options: Optional[Dict[str, Any]] = None,
                 smoke_test: bool = True) -> None:
    """Checks a would-be policy before any training: first its attributes and signatures, then, given
    ``data``, that it is a policy over that kind of data and that it returns the protocol's shapes.

    The shape test samples 4 episodes of ``data`` (the trainer's ``sample_options`` passed to
    ``sample``) in eval mode, with its own generator and with the global RNG restored afterwards, so a
    run's draws are not changed by it; the module's train/eval mode is restored too.

    Raises:
        TypeError naming what a policy lacks, the method whose signature does not fit, or the method
        whose result has the wrong shape (and what it returned); ValueError when the data are of
        another kind than the policy's ``data_kind``.
    """
    name = type(policy).__name__
    missing = [m for m in PROTOCOL if not hasattr(policy, m)]
    if missing:
        raise TypeError(f"{name} is not a diffusion policy: it lacks {', '.join(missing)} "
                        "(see refit.policy.DiffusionPolicy)")
    for method, (n_pos, keywords) in _KEYWORDS.items():
        fn = getattr(policy, method)
        if not callable(fn):
            raise TypeError(f"{name}.{method} must be a method (see refit.policy.DiffusionPolicy), got "
                            f"{type(fn).__name__}")
        if method == "sample":
            keywords = tuple(keywords) + tuple(sample_options or ())
        why = _bindable(fn, n_pos, keywords)
        if why:
            raise TypeError(f"{name}.{method}: the signature {why}; see refit.policy.DiffusionPolicy")
    if not isinstance(policy.module, torch.nn.Module):
        raise TypeError(f"{name}.module must be the torch.nn.Module holding the trained parameters, got "
                        f"{type(policy.module).__name__}")
    if data is None:
        return
    kind, declared = data_kind(data), getattr(policy, "data_kind", None)
    if declared is not None and declared != kind:
        raise ValueError(f"{name} is a policy over {declared} data, and these data are {kind}"
                         + (": for sequence models use refit.latent_adapter.LatentScheduleDenoiser, not "
                            "ScheduleDenoiser (a row model)" if kind == "sequences" else ""))
    if smoke_test:
        _smoke_test(policy, data, dict(sample_options or {}))


def _smoke_test(policy: Any, data: Any, options: Dict[str, Any]) -> None:
    """Runs the protocol's methods on 4 episodes and checks the shapes they return (see check_policy)."""
    name = type(policy).__name__
    n_items = getattr(data, "n_items", None)
    episode = episode_source(data).sample(4, torch.Generator().manual_seed(0))
    B = int(episode.users.numel())
    if options.get("explore", 0) is None:  # the trainer places the window anew each iteration
        options["explore"] = (0, 1)
    if "group_size" in options:  # 4 episodes, not 4 groups
        options["group_size"] = 1
    module = policy.module
    device = policy.device
    devices = [] if torch.device(device).type == "cpu" else [torch.device(device)]

    def call(method, *args, **kwargs):
        try:
            return getattr(policy, method)(*args, **kwargs)
        except Exception as exc:  # say which call of the check failed, keep the cause
            raise TypeError(f"{name}.{method} failed on {B} {data_kind(data)} episodes: "
                            f"{type(exc).__name__}: {exc}") from exc

    def want(method, value, shape, what):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        if got != tuple(shape):
            raise TypeError(f"{name}.{method} must return {what} {tuple(shape)}, got {got}")

    with torch.random.fork_rng(devices=devices), torch.no_grad(), kept_modes(module, eval_mode=True):
        g = torch.Generator().manual_seed(0)
        inputs = map_inputs(episode.inputs, lambda x: x.to(device))
        traj = call("sample", episode.users, inputs, generator=g, **options)
        if not isinstance(getattr(traj, "states", None), torch.Tensor) or traj.states.dim() != 3:
            raise TypeError(f"{name}.sample must return a refit.diffusion.Trajectory whose states are "
                            f"(S+1, B, D), got {type(traj).__name__}")
        S1, B_, D = traj.states.shape
        want("sample", traj.states, (S1, B, D), "states")
        want("sample", traj.preds, (S1 - 1, B, D), "preds")
        want("sample", traj.final, (B, D), "final")
        if n_items is not None:
            want("final_scores", call("final_scores", episode.users, inputs, traj.final), (B, n_items),
                 "(B, n_items) scores")
        want("outputs", call("outputs", episode.users, inputs, traj), (S1 - 1, B, D), "(S, B, D) outputs")
        on_dev = None if episode.exclude is None else episode.exclude.to(device)
        target = call("training_target", episode.users, inputs, traj.final, exclude=on_dev,
                      k=min(20, n_items or 20))
        want("training_target", target, (B, D), "(B, D) targets")
        loss = call("denoising_loss", episode.users, inputs, target, generator=g)
        want("denoising_loss", loss, (B,), "(B,) per-row losses")
        _check_state(name, call("state"), module)
        if B >= 3 and bool((loss == loss[0]).all()) and not bool((target == target[0]).all()):
            raise TypeError(f"{name}.denoising_loss returned the same value for each of {B} rows with "
                            f"different targets ({float(loss[0].detach()):.6g}): it must be each row's own loss, not "
                            "a batch mean broadcast to (B,); with one value every weighting of the rows "
                            "(reward-weighted fine-tuning) would be ignored")


def _check_state(name: str, state: Any, module: torch.nn.Module) -> None:
    """TypeError unless ``state`` is a checkpoint entry refit can save and resume (see
    :meth:`DiffusionPolicy.state`)."""
    model = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("state_dict"), dict):
        raise TypeError(f"{name}.state() must return a dict whose 'model' entry holds the module's 'state_dict' "
                        "(use refit.policy.policy_state(module, name) for a policy of your own)")
    if model.get("name") not in OUTSIDE_MODELS and not all(k in state for k in ("diffusion", "inference")):
        raise TypeError(f"{name}.state() names its model {model.get('name')!r}, which refit would rebuild, but has "
                        "no 'diffusion' and 'inference' entries; a policy of your own returns "
                        "refit.policy.policy_state(module, name) instead")
    if set(model["state_dict"]) != set(module.state_dict()):
        raise TypeError(f"{name}.state()['model']['state_dict'] must be the module's own state_dict (resume loads it "
                        "into policy.module)")


@contextlib.contextmanager
def kept_modes(module: torch.nn.Module, eval_mode: bool = False) -> Iterator[None]:
    """Restores the train/eval flag of every submodule of ``module`` on exit, exactly as found.

    ``module.train(was)`` would overwrite a mixed state (a module in training mode with a part the
    user froze in eval mode); each flag is put back one by one instead. ``eval_mode``: switch the
    whole module to eval mode inside the block.
    """
    modes = [(m, m.training) for m in module.modules()]
    if eval_mode:
        module.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


# --- where episodes come from ------------------------------------------------------------------------

class InteractionEpisodes:
    """Episodes of interaction data: users with at least ``min_items`` training items, drawn
    uniformly; each episode hides a fraction of the user's items (``target="hidden"``) or
    shows them all (``"observed"``); see :func:`refit.reward.make_episode`."""

    selection_metric = "recall@20"

    def __init__(self, data, target: str = "hidden", hide_fraction: float = 0.2):
        self.train = rk.as_csr(data.train, "train")
        self.target, self.hide_fraction = target, hide_fraction
        counts = self.train.indptr.diff()
        min_items = 2 if target == "hidden" else 1
        self.candidates = torch.nonzero(counts >= min_items).flatten()
        if self.candidates.numel() == 0:
            raise ValueError(f"no user has {min_items} or more training items to fine-tune on")

    @property
    def neighbor_sets(self) -> rk.CSR:
        """The training interactions whose rows N_sim-K counts (n_users x n_items)."""
        return self.train

    def __len__(self) -> int:
        return int(self.candidates.numel())

    def sample(self, n: int, generator: torch.Generator) -> Episode:
        pick = torch.randperm(self.candidates.numel(), generator=generator)[:n]
        return make_episode(self.train, self.candidates[pick], self.target, self.hide_fraction, generator)


class SequenceEpisodes:
    """Episodes of sequence data: training targets drawn uniformly, each predicted from the window
    before it; N_K counts the target, N_sim-K the training items of the most similar sequences."""

    selection_metric = "hr@20"

    def __init__(self, data):
        self.data = data
        self.targets = data.targets["train"]
        if len(self.targets) == 0:
            raise ValueError("the sequence data has no training targets to fine-tune on")
        self.train = rk.as_csr(data.train, "train")

    @property
    def neighbor_sets(self) -> rk.CSR:
        return self.train

    def __len__(self) -> int:
        return len(self.targets)

    def sample(self, n: int, generator: torch.Generator) -> Episode:
        pick = torch.randperm(len(self.targets), generator=generator)[:n]
        return sequence_episode(self.data, self.targets[pick])


def episode_source(data, target: str = "hidden", hide_fraction: float = 0.2):
    """:class:`SequenceEpisodes` for sequence data, :class:`InteractionEpisodes` otherwise."""
    if hasattr(data, "targets") and hasattr(data, "windows"):
        return SequenceEpisodes(data)
    return InteractionEpisodes(data, target, hide_fraction)


# --- an adapter for outside models -------------------------------------------------------------------

class _Wrapped(torch.nn.Module):
    """An outside ``denoiser(x_t, t)`` behind refit's denoiser interface ``model(x_t, t, cond)``.

    Its train/eval mode is the outside module's own: refit saves a model's mode before scoring and
    restores it afterwards, and a wrapper with a mode of its own (a new Module starts in train mode)
    would put the user's module back into train mode, dropout on, after every score.
    """

    def __init__(self, denoiser: torch.nn.Module, n_items: int):
        super().__init__()
        self.denoiser, self.n_items = denoiser, n_items

    @property
    def training(self) -> bool:
        d = self.__dict__.get("_modules", {}).get("denoiser")
        return d.training if d is not None else self.__dict__.get("_own_training", True)

    @training.setter
    def training(self, mode: bool) -> None:
        d = self.__dict__.get("_modules", {}).get("denoiser")
        if d is not None:
            d.training = mode
        else:  # nn.Module.__init__ sets it before the outside module is attached
            self.__dict__["_own_training"] = mode

    def condition(self, users, rows):
        return None

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.denoiser(x, t)

    def config(self) -> Dict[str, Any]:
        return {"n_items": self.n_items, "external": type(self.denoiser).__qualname__}


def ScheduleDenoiser(denoiser: torch.nn.Module, betas: Sequence[float], *, n_items: int, mean_type: str = "x0",
                     sampling_steps: int = 0, sampling_noise: bool = False, precision: str = "fp32"):
    """A diffusion policy over interaction rows from any ``denoiser(x_t, t)`` and its betas.

    Written for models built the way DiffRec's paper code builds them: a
    module called as ``denoiser(x (B, I), timesteps (B,) int64)`` that
    predicts x0 (``mean_type="x0"``) or the noise (``"eps"``), and the (T,)
    betas of its schedule (e.g. ``GaussianDiffusion.betas`` of that code).
    The reverse process starts from the user's (partly hidden) training row,
    as DiffRec's does. Returns a :class:`refit.families.diffrec.recommender.RowRecommender`, which
    implements the protocol; its checkpoints hold the outside module's
    ``state_dict`` (load it back into that module with
    ``denoiser.load_state_dict(state["recommender"]["model"]["state_dict"])``
    after stripping the ``denoiser.`` prefix, or with :func:`outside_state_dict`).
    """
    from .families.diffrec.recommender import RowRecommender

    if mean_type not in MEAN_TYPES:
        raise ValueError(f"mean_type must be one of {MEAN_TYPES}, got {mean_type!r}")
    device = next(denoiser.parameters()).device
    diffusion = GaussianDiffusion.from_betas(np.asarray(betas, dtype=np.float64), mean_type=mean_type, device=device)
    return RowRecommender("external", _Wrapped(denoiser, n_items), diffusion, sampling_steps=sampling_steps,
                       sampling_noise=sampling_noise, precision=precision)


#: The model names of checkpoints written by outside policies: refit cannot rebuild their module.
OUTSIDE_MODELS = ("external", "external-latent")


def import_factory(spec: str) -> Callable[[Any], Any]:
    """The function ``spec`` names, as ``"package.module:function"`` (``--policy`` on the command line).

    The module is imported as Python imports it (this runs its code: name only your own modules),
    with the working directory first on the path, so a module beside the run is found. The function
    takes the loaded data and returns a policy (e.g. a :func:`ScheduleDenoiser`).

    Raises:
        ValueError naming ``spec`` when it is not ``module:function``, the module cannot be imported,
        or it has no such callable.
    """
    import importlib
    import os
    import sys

    mod_name, sep, fn_name = str(spec).partition(":")
    if not sep or not mod_name or not fn_name or not all(p.isidentifier() for p in mod_name.split(".")) \
            or not all(p.isidentifier() for p in fn_name.split(".")):
        raise ValueError(f"--policy must be MODULE:FUNCTION (e.g. mymodels:make_policy), got {spec!r}")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"--policy {spec}: cannot import {mod_name!r} ({exc}); run from the folder that holds "
                         "it, or put it on PYTHONPATH") from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    fn: Any = module
    for part in fn_name.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ValueError(f"--policy {spec}: {mod_name} has no function {fn_name!r}")
    return fn


def load_outside_policy(path: str, state: Dict[str, Any], data: Any, factory: Callable[[Any], Any]):
    """A policy from ``factory(data)`` with the weights of the outside-policy checkpoint ``state`` (read
    from ``path``, named in errors) loaded into its module, strictly and after a finiteness check."""
    from .runtime.runs import check_finite_weights

    policy = factory(data)
    check_policy(policy)
    sd = state["recommender"]["model"]["state_dict"]
    check_finite_weights(sd, f"checkpoint {path!r}")
    try:
        policy.module.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path!r}: its weights do not fit the module the factory built "
                         f"({type(policy.module).__name__}): {exc}") from exc
    return policy


def _check_plain(value: Any, where: str) -> None:
    """TypeError naming ``where`` unless ``value`` is made of None, bool, int, float, str, lists and
    str-keyed dicts (what a checkpoint may hold besides tensors, read back without running code)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} must be a plain value (None, bool, int, float, str, list, dict), got "
                    f"{type(value).__name__}")


def policy_state(module: torch.nn.Module, name: str, **meta: Any) -> Dict[str, Any]:
    """What an outside policy's ``state()`` returns, in the checkpoint layout refit reads
    (:mod:`refit.runtime.runs`): ``{"model": {"name": "external", "config": {"external": name, **meta},
    "state_dict": ...}}``.

    ``module`` is the policy's module (every trained parameter; its ``state_dict`` is copied to the
    CPU, detached); ``name`` labels the model in messages; ``meta`` are plain values (numbers,
    strings, lists, dicts) the policy wants kept. Resume restores the module from this state_dict;
    ``refit evaluate --policy MODULE:FUNCTION`` rebuilds the policy and loads it.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"policy_state: module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"policy_state: name must be a non-empty string, got {name!r}")
    _check_plain(meta, "policy_state meta")
    if "weights_prefix" in meta:
        raise TypeError("policy_state: 'weights_prefix' is refit's own key (where the module's weights sit in the "
                        "state_dict); choose another name")
    # weights_prefix "": the state_dict is the module's own (an adapter's sits under "denoiser.").
    return {"model": {"name": "external", "config": {"external": name, **meta, "weights_prefix": ""},
                      "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}}


def outside_state_dict(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The outside module's own ``state_dict`` from a checkpoint of an outside policy (a
    :func:`ScheduleDenoiser` run's ``best.pt`` / ``last.pt``, loaded with
    :func:`refit.runtime.runs.load_checkpoint`, or a policy's ``state()``).

    Raises:
        ValueError when the checkpoint holds no outside module's weights (a refit model's checkpoint,
        or an imported one), naming the model it does hold.
    """
    try:
        model = state["recommender"]["model"] if "recommender" in state else state["model"]
        sd = model["state_dict"]
    except (KeyError, TypeError) as exc:
        raise ValueError("outside_state_dict: not a refit checkpoint or policy state (it has no "
                         "['recommender']['model']['state_dict'] nor ['model']['state_dict'])") from exc
    prefix = str((model.get("config") or {}).get("weights_prefix", "denoiser."))
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if model.get("name") not in OUTSIDE_MODELS or not out:
        raise ValueError(f"outside_state_dict: the checkpoint holds a {model.get('name', 'refit')!r} model, not an "
                         "outside module's weights (only runs of a ScheduleDenoiser or LatentScheduleDenoiser "
                         "policy hold them); load it with refit.posttrain.run.load_policy instead")
    return out


__all__ = ["PROTOCOL", "DATA_KINDS", "DiffusionPolicy", "data_kind", "check_policy", "batched_outputs", "InteractionEpisodes", "SequenceEpisodes",
           "episode_source", "kept_modes", "ScheduleDenoiser", "outside_state_dict", "OUTSIDE_MODELS", "import_factory",
           "load_outside_policy", "policy_state"]
