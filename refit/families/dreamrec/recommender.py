"""DreamRec's and PreferDiff's recommender: a history's guidance, the reverse diffusion over item
embeddings, ranking, and evaluation.

A :class:`SeqRecommender` is a :class:`~refit.families.dreamrec.network.DreamRec`
network (or a :class:`~refit.families.dreamrec.preferdiff.PreferDiff` one: the same
interface, PreferDiff's encoder block and loss), a Gaussian diffusion over
D-dimensional item embeddings (x0 prediction, uniform timesteps, one of the
full-range schedules of :mod:`refit.diffusion`) and the guidance weight ``w``. Recommending for a
history means: encode it into the guidance h, start from x_T ~ N(0, I), take
the T reverse steps with the guided x0 prediction as the step's mean input
(posterior noise at every step but the last), and rank items by the inner
product of the result with every item embedding.

PreferDiff's checkpoints are written under the same model name, ``"dreamrec"``
(the family every loader dispatches on: :func:`refit.families.dreamrec.pretrain.load_seq_recommender`,
:func:`refit.posttrain.run.load_policy`, ``refit evaluate``), with ``"network":
"preferdiff"`` beside it; :data:`NETWORKS` maps that entry to the class. With
``eval_eta=0`` (PreferDiff's default) recommending takes DDIM's deterministic
steps over ``eval_steps`` respaced timesteps instead of the posterior's.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ...diffusion import PRECISIONS, DiffusionConfig, GaussianDiffusion, _normal, autocast, rl_diffusion
from ...runtime import distributed as dist
from .losses import dreamrec_loss, preferdiff_denoising_loss, preferdiff_loss
from .network import DreamRec
from .preferdiff import PreferDiff

SEQ_SELECTION = "hr@20"
SEQ_KS = (10, 20, 50)

#: The networks a sequential checkpoint can hold (its ``model.network`` entry; absent: DreamRec).
NETWORKS = {"dreamrec": DreamRec, "preferdiff": PreferDiff}


def _check_eta(eta) -> Optional[float]:
    if eta is None:
        return None
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eval_eta must be None (the posterior) or a finite number >= 0, got {eta!r}")
    return float(eta)


class SeqRecommender:
    """DreamRec (or PreferDiff) + its diffusion + guidance weight + evaluation sampler, saved and restored as one.

    Shapes: histories (B, L) int64 right-padded with ``n_items``, lengths
    (B,) int64; embeddings (B, D) float32; scores (B, n_items) float32.
    """

    model_name = "dreamrec"

    def __init__(self, model: DreamRec, diffusion: GaussianDiffusion, *, w: float = 2.0, precision: str = "fp32",
                 eval_steps: Optional[int] = None, eval_eta: Optional[float] = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if diffusion.betas is None or diffusion.config.mean_type != "x0":
            raise ValueError("DreamRec needs an x0-predicting diffusion with a noise schedule")
        if not w >= 0:
            raise ValueError(f"the guidance weight w must be >= 0, got {w}")
        self.model, self.diffusion, self.w, self.precision = model, diffusion, float(w), precision
        self.eval_steps = None
        self.set_eval_steps(eval_steps)
        self.eval_eta = _check_eta(eval_eta)

    def set_eval_eta(self, eta: Optional[float]) -> None:
        """Recommend with DDIM's reverse steps of noise level ``eta`` (0: deterministic, PreferDiff's
        sampler; None or 1: the posterior, DreamRec's; see
        :meth:`refit.diffusion.GaussianDiffusion.step_constants`). Trajectories for fine-tuning take the
        ``eta`` their caller passes, not this one."""
        self.eval_eta = _check_eta(eta)

    @property
    def network(self) -> str:
        """Which network this recommender holds: ``"dreamrec"`` or ``"preferdiff"`` (:data:`NETWORKS`), or
        an outside module's class name (:class:`refit.latent_adapter.OutsideSeqRecommender`)."""
        return getattr(self.model, "network_name", type(self.model).__name__)

    def set_eval_steps(self, steps: Optional[int]) -> None:
        """Recommend (:meth:`generate`, :meth:`scores`) with ``steps`` respaced reverse steps instead of all T
        (``None``: all; see :meth:`refit.diffusion.GaussianDiffusion.respaced`). Training, and the
        trajectories of :meth:`sample` and :meth:`sample_from`, use the full schedule unless given ``steps``."""
        if steps is not None and steps != self.diffusion.steps:
            self._eval_diffusion = self.diffusion.respaced(int(steps))
            self.eval_steps = int(steps)
        else:
            self._eval_diffusion, self.eval_steps = self.diffusion, None

    @property
    def device(self) -> torch.device:
        return self.model.none_embedding.device

    @property
    def n_items(self) -> int:
        return self.model.n_items

    def guidance(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, D) float32 guidance h of history windows (in the model's current train/eval mode)."""
        with autocast(self.precision, self.device):
            h = self.model.encode(history.to(self.device), lengths.to(self.device))
        return h.float()

    def denoiser(self, h: torch.Tensor):
        """``f(x_t, t)``: the guided x0 prediction for guidance h, float32 (the policy's mean input)."""
        model, w, ctx = self.model, self.w, self.precision

        def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast(ctx, x.device):
                out = model.guided(x, h, t, w)
            return out.float()

        return f

    def start_noise(self, batch: int, generator: Optional[torch.Generator] = None,
                    rows: Optional[Tuple[int, int]] = None, group_size: int = 1) -> torch.Tensor:
        """x_T ~ N(0, I), (B, D) float32 (``rows``: a slice of a global batch's draw); with ``group_size``
        G, one draw for each run of G consecutive rows of the global batch (a group's shared start)."""
        if group_size == 1:
            return _normal((batch, self.model.hidden), torch.float32, self.device, generator, rows)
        total = batch if rows is None else rows[1]
        if total % group_size:
            raise ValueError(f"a batch of {total} rows does not split into groups of {group_size}")
        x = _normal((total // group_size, self.model.hidden), torch.float32, self.device, generator)
        x = x.repeat_interleave(group_size, 0)
        return x if rows is None else x[rows[0]:rows[0] + batch]

    def sample_from(self, h: torch.Tensor, *, generator: Optional[torch.Generator] = None,
                    return_trajectory: bool = False, keep_graph: bool = False, temperature: float = 1.0,
                    rows: Optional[Tuple[int, int]] = None, steps: Optional[int] = None,
                    eta: Optional[float] = None, explore: Optional[Tuple[int, int]] = None, group_size: int = 1):
        """Ancestral sampling from pure noise: the final (B, D) embeddings, or a
        :class:`~refit.diffusion.Trajectory` of the stochastic steps (whose ``preds`` are the guided
        x0 predictions and whose ``final`` is the generated embedding). ``steps``: that many respaced
        reverse steps instead of all T (``steps - 1`` of them stochastic); ``eta``: DDIM's noise level
        (None: the posterior; see :meth:`refit.diffusion.GaussianDiffusion.step_constants`);
        ``explore``: only these steps draw noise (see :meth:`~refit.diffusion.GaussianDiffusion.sample`);
        ``group_size``: each run of that many rows starts from one shared x_T."""
        x_T = self.start_noise(h.shape[0], generator, rows, group_size)
        return rl_diffusion(self, steps).sample(self.denoiser(h), x_T, noise=True, return_trajectory=return_trajectory,
                                                keep_graph=keep_graph, generator=generator, temperature=temperature,
                                                rows=rows, eta=eta, explore=explore)

    @torch.no_grad()
    def generate(self, history: torch.Tensor, lengths: torch.Tensor,
                 generator: Optional[torch.Generator] = None, fast: Optional[bool] = None) -> torch.Tensor:
        """(B, D) generated embeddings for history windows, in eval mode.

        ``fast`` (default: when the denoiser is ``mlp1``): the same reverse
        process with its linear algebra folded: since the denoiser is linear
        in x, h and the step features, one step is
        ``x' = x A_t + cp_t (G + c_t) + sigma_t eps`` with
        ``A_t = cp_t W_x^T + cx_t I``, ``G = (1 + w) h W_h^T - w null W_h^T``
        and ``c_t`` the step's constant, all computed once per pass; the noise
        is drawn in the same order as :meth:`sample_from`, so both give the same
        embeddings up to float32 rounding. No tensor is allocated per step.
        With ``eval_eta`` set the steps are DDIM's of that noise level (eta 0:
        no noise is drawn after x_T).
        """
        was = self.model.training
        self.model.eval()
        try:
            h = self.guidance(history, lengths)
            parts = self.model.linear_parts()
            if fast is False or parts is None or self.precision != "fp32":
                x_T = self.start_noise(h.shape[0], generator)
                return self._eval_diffusion.sample(self.denoiser(h), x_T, noise=self.eval_eta != 0,
                                                   generator=generator, eta=self.eval_eta)
            return self._generate_linear(h, parts, generator)
        finally:
            self.model.train(was)

    def _generate_linear(self, h, parts, generator):
        W_x, W_h, W_t, b = (p.detach().float() for p in parts)
        d = self._eval_diffusion
        T, D, B = d.steps, self.model.hidden, h.shape[0]
        dev = h.device
        cp, cx, lv = d.step_constants(dev, self.eval_eta)
        noisy = self.eval_eta != 0
        steps = d.model_timesteps(torch.arange(T, device=dev))
        c = self.model.step_features(steps).float() @ W_t.t() + b  # (T, D)
        null = self.model.none_embedding.detach().float()
        G = (1.0 + self.w) * (h @ W_h.t()) - self.w * (null @ W_h.t())  # (B, D)
        eye = torch.eye(D, device=dev)
        A = cp[:, None, None] * W_x.t()[None] + cx[:, None, None] * eye[None]  # (T, D, D)
        cp_c = c * cp[:, None]  # (T, D): cp_t c_t
        cps, sigmas = cp.tolist(), torch.exp(0.5 * lv).tolist()
        x = self.start_noise(B, generator)
        nxt = torch.empty_like(x)
        eps = torch.empty_like(x)
        gen_dev = generator.device if generator is not None else dev
        for i in range(T - 1, -1, -1):
            torch.mm(x, A[i], out=nxt)
            nxt.add_(G, alpha=cps[i])
            nxt.add_(cp_c[i])
            if i > 0 and noisy:
                if gen_dev == dev:
                    torch.randn((B, D), generator=generator, out=eps)
                else:
                    eps.copy_(torch.randn((B, D), generator=generator, device=gen_dev))
                nxt.add_(eps, alpha=sigmas[i])
            x, nxt = nxt, x
        return x

    # --- the diffusion-policy protocol (refit.policy) -------------------------------------------

    selection_metric = "hr@20"
    data_kind = "sequences"

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def sample(self, users: torch.Tensor, inputs, *, generator: Optional[torch.Generator] = None,
               temperature: float = 1.0, rows: Optional[Tuple[int, int]] = None, keep_graph: bool = False,
               steps: Optional[int] = None, eta: Optional[float] = None, explore: Optional[Tuple[int, int]] = None,
               group_size: int = 1):
        """A trajectory from pure noise for the ``(history, lengths)`` windows ``inputs``: the guided
        predictions are the policy's step outputs (see :mod:`refit.policy`; ``steps``, ``eta``,
        ``explore``, ``group_size``: see :meth:`sample_from`)."""
        history, lengths = inputs
        with torch.set_grad_enabled(keep_graph):
            h = self.guidance(history, lengths)
        return self.sample_from(h, generator=generator, return_trajectory=True, keep_graph=keep_graph,
                                temperature=temperature, rows=rows, steps=steps, eta=eta, explore=explore,
                                group_size=group_size)

    def sample_final(self, users: torch.Tensor, inputs, *, generator: Optional[torch.Generator] = None,
                     temperature: float = 1.0, rows: Optional[Tuple[int, int]] = None, grad_steps: int = 1,
                     steps: Optional[int] = None, eta: Optional[float] = None) -> torch.Tensor:
        """(B, D) generated embeddings whose last ``grad_steps`` reverse steps keep their graph (reward
        backpropagation): differentiable in the denoiser's weights and, through the guidance, in the
        encoder's; the state those steps start from is a constant. The same noise as :meth:`sample_from`
        with the same generator (``steps``, ``eta``: as there)."""
        history, lengths = inputs
        with torch.enable_grad():
            h = self.guidance(history, lengths)
        x_T = self.start_noise(h.shape[0], generator, rows)
        return rl_diffusion(self, steps).sample(self.denoiser(h), x_T, noise=True, generator=generator,
                                                temperature=temperature, rows=rows, eta=eta, grad_steps=grad_steps)

    def differentiable_scores(self, users: torch.Tensor, inputs, final: torch.Tensor) -> torch.Tensor:
        """(B, n_items) inner products with every item embedding, with gradient (the item table's too)."""
        return self.model.item_scores(final).float()

    def outputs(self, users: torch.Tensor, inputs, traj) -> torch.Tensor:
        """(S, B, D) guided x0 predictions along ``traj``, with gradient (through the guidance too)."""
        from ...policy import batched_outputs

        history, lengths = inputs
        with torch.enable_grad():
            h = self.guidance(history, lengths).repeat(traj.preds.shape[0], 1)
        model, w, ctx = self.model, self.w, self.precision

        def forward(x, t):
            with autocast(ctx, x.device):
                return model.guided(x, h, t, w)

        return batched_outputs(forward, traj)

    def final_scores(self, users: torch.Tensor, inputs, final: torch.Tensor) -> torch.Tensor:
        """(B, n_items) inner products of generated embeddings with every item embedding."""
        with torch.no_grad():
            return self.model.item_scores(final).float()

    def pretraining_loss(self, episode, *, generator: Optional[torch.Generator] = None,
                         rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(B,) the network's own loss on the episode: DreamRec's denoising toward the target item's
        embedding, or PreferDiff's (:func:`preferdiff_loss`, the episode's targets its batch; under
        torchrun the global batch's, gathered)."""
        history, lengths = episode.inputs
        targets = episode.positives.indices.to(self.device)
        if isinstance(self.model, PreferDiff):
            batch = targets if rows is None or rows[1] == targets.shape[0] else dist.all_gather_rows(targets)
            return preferdiff_loss(self, history, lengths, targets, generator=generator, rows=rows,
                                   batch_targets=batch)
        return dreamrec_loss(self, history, lengths, targets=targets, generator=generator, rows=rows)

    def denoising_loss(self, users: torch.Tensor, inputs, x0: torch.Tensor, *,
                       generator: Optional[torch.Generator] = None,
                       rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(B,) the squared error of the guided prediction (the policy's mean input) toward given (B, D)
        embeddings ``x0`` (sampled ones, detached). Training the guided mean, not each branch, keeps
        training on the model's own samples from compounding the guidance: a branch trained toward
        guided samples would be extrapolated by the guidance again at the next sampling."""
        history, lengths = inputs
        if isinstance(self.model, PreferDiff):  # its own reconstruction error (cosine by default)
            return preferdiff_denoising_loss(self, history, lengths, x0.detach(), generator=generator, rows=rows)
        return dreamrec_loss(self, history, lengths, x0=x0.detach(), generator=generator, rows=rows, guided=True)

    def training_target(self, users: torch.Tensor, inputs, final: torch.Tensor, *, exclude=None,
                        k: int = 20) -> torch.Tensor:
        """(B, D) the sampled final states rescaled to the item embeddings' mean norm (detached).

        Items are ranked by inner product, so a final state's norm changes neither its ranking nor its
        reward. Guidance inflates it, though (on ml-1m_seq about 21 against 8 for an item embedding),
        and a model trained toward its own inflated samples samples larger ones still: the loss grew
        from about 2 to over 100 within 120 iterations of reward-weighted fine-tuning, and validation
        HR@20 fell from 0.199 to 0.06. At the items' scale the same runs stayed level."""
        final = final.detach().float()
        scale = self.model.item_embeddings.weight[: self.model.n_items].detach().float().norm(dim=1).mean()
        return final / final.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale

    def evaluate(self, data, *, ks=SEQ_KS, batch_size: int = 2048, seed: int = 0) -> Dict[str, Dict[str, float]]:
        return evaluate_dreamrec(self, data, ks=ks, batch_size=batch_size, seed=seed)

    @torch.no_grad()
    def scores(self, history: torch.Tensor, lengths: torch.Tensor, generator: Optional[torch.Generator] = None,
               include_padding: bool = False) -> torch.Tensor:
        """(B, n_items) float32 scores: inner products of generated embeddings with the item embeddings."""
        x = self.generate(history, lengths, generator)
        return self.model.item_scores(x, include_padding=include_padding).float()

    def state(self) -> Dict[str, Any]:
        return {
            "model": {"name": self.model_name, "config": self.model.config(),
                      "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                      # refit's own networks only: an outside module is rebuilt by its owner
                      **({"network": self.network} if self.network in NETWORKS else {})},
            "diffusion": self.diffusion.config.to_dict(),
            "inference": {"w": self.w, "precision": self.precision, "eval_steps": self.eval_steps,
                          "eval_eta": self.eval_eta},
        }

    @classmethod
    def from_state(cls, state: Dict[str, Any], device="cpu", precision: Optional[str] = None, *,
                   source: Optional[str] = None) -> "SeqRecommender":
        """Rebuilds a DreamRec (or the PreferDiff its ``network`` entry names) from :meth:`state`;
        ``source``, the checkpoint it was read from, is named in the errors. A state with a NaN or infinite
        weight is refused (ValueError naming the tensor)."""
        from ...runtime.runs import check_finite_weights

        what = f"checkpoint {source!r}" if source else "the checkpoint"
        try:
            m = state["model"]
            if m["name"] != cls.model_name:
                raise ValueError(f"{what} holds a {m['name']!r} model, not {cls.model_name!r}")
            network = m.get("network", "dreamrec")
            if network not in NETWORKS:
                raise ValueError(f"{what} holds a {network!r} network; refit knows {', '.join(NETWORKS)}")
            check_finite_weights(m["state_dict"], what)
            model = NETWORKS[network](**dict(m["config"]))
            model.load_state_dict(m["state_dict"], strict=True)
            diffusion = GaussianDiffusion(DiffusionConfig(**state["diffusion"]), device=device)
            inf = dict(state["inference"])
        except KeyError as exc:
            raise ValueError(f"{what} is missing its {exc.args[0]!r} entry") from exc
        except RuntimeError as exc:
            raise ValueError(f"{what}: its weights do not fit its model config: {exc}") from exc
        if precision is not None:
            inf["precision"] = precision
        return cls(model.to(device), diffusion, **inf)


def _batch_seed(seed: int, seq: torch.Tensor) -> int:
    """A generator seed for one evaluation batch, fixed by its first target's sequence and its size,
    so the sampled embeddings do not depend on how batches are shared between processes."""
    first = int(seq[0]) if seq.numel() else 0
    return (seed * 1_000_003 + 7919 * first + seq.numel()) % (2 ** 63)


def evaluate_dreamrec(rec: SeqRecommender, data, splits: Sequence[str] = ("valid", "test"), *,
                      ks: Sequence[int] = SEQ_KS, batch_size: int = 2048, exclude_history: Optional[bool] = None,
                      seed: int = 0, progress: Optional[bool] = False, fast: Optional[bool] = None,
                      protocol: str = "full", backend: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """HR@k / NDCG@k of ``rec`` on each split (full ranking; see :func:`refit.evaluate.evaluate_sequences`).

    Sampling is seeded per batch of targets (``seed`` and the batch's first
    target), so a call is repeatable; ``seed`` draws another set of samples.
    ``backend`` forces the ``topk_hits`` backend. ``protocol="dreamrec"`` evaluates as DreamRec's own code does, for
    comparison with its published numbers: dropout left on while sampling,
    the padding id ranked as an item, no history excluded, batches of 100
    with the last partial one dropped, samples from the global RNG.
    """
    from ...evaluate import evaluate_sequences

    if protocol == "dreamrec":
        def score_fn(history, lengths, seq):
            was = rec.model.training
            rec.model.train()  # DreamRec's evaluation never calls eval(): dropout stays on
            try:
                with torch.no_grad():
                    h = rec.guidance(history, lengths)
                    x = rec.sample_from(h) if rec.eval_steps is None and rec.eval_eta is None else \
                        rec._eval_diffusion.sample(rec.denoiser(h), rec.start_noise(h.shape[0]),
                                                   noise=rec.eval_eta != 0, eta=rec.eval_eta)
                    return rec.model.item_scores(x, include_padding=True).float()
            finally:
                rec.model.train(was)
    else:
        def score_fn(history, lengths, seq):
            g = torch.Generator(device="cpu").manual_seed(_batch_seed(seed, seq))
            return rec.model.item_scores(rec.generate(history, lengths, g, fast=fast)).float()

    return evaluate_sequences(score_fn, data, splits, ks=ks, batch_size=batch_size, exclude_history=exclude_history,
                              max_len=rec.model.max_len, progress=progress, protocol=protocol, backend=backend)


def select_guidance(rec: SeqRecommender, data, grid: Sequence[float], *, batch_size: int = 2048,
                    exclude_history: Optional[bool] = None, seed: int = 0) -> Tuple[float, Dict[float, float]]:
    """The guidance weight of ``grid`` whose recommendations score the best validation ``SEQ_SELECTION``,
    and that metric for each weight.

    Ties go to ``rec.w`` (the weight the network trained with), then to the
    smallest weight. ``rec.w`` is left as it was; the evaluation is
    :func:`evaluate_dreamrec`'s, with its seed.
    """
    trained, values = rec.w, {}
    try:
        for w in grid:
            rec.w = float(w)
            m = evaluate_dreamrec(rec, data, ("valid",), ks=(int(SEQ_SELECTION.split("@")[1]),),
                                  batch_size=batch_size, exclude_history=exclude_history, seed=seed)
            values[float(w)] = float(m["valid"][SEQ_SELECTION])
    finally:
        rec.w = trained
    order = sorted(values)
    return max(order, key=lambda w: (values[w], w == trained)), values


__all__ = ["SeqRecommender", "evaluate_dreamrec", "select_guidance", "NETWORKS", "SEQ_SELECTION", "SEQ_KS"]
