"""DiffRec's Gaussian diffusion over interaction rows.

The forward process noises a user's row x0 over T steps with a schedule of
betas; the model learns to undo it. This module holds the schedule and its
derived constants (in float64, as DiffRec keeps them), forward noising, the
ELBO training loss with importance-sampled timesteps, and the reverse sampler
that ranks items (and, for ReFiT, returns the whole trajectory and the
per-step constants that :func:`refit_kernels.gaussian_logprob` scores it with).

Schedules follow DiffRec (Wang et al., SIGIR 2023): ``linear`` and
``linear-var`` betas from ``noise_scale * [noise_min, noise_max]``, ``cosine``
from the squared-cosine alpha-bar, the first beta fixed at 1e-5. The schedules
of diffusion over embeddings from pure noise (DreamRec, Yang et al., NeurIPS
2023) are ``ddpm-linear`` (betas evenly from ``beta_start`` to ``beta_end``,
Ho et al.), ``ddpm-cosine`` (Nichol & Dhariwal's cosine alpha-bar, betas
clipped to [1e-4, 0.9999]) and ``exp`` (betas ``1 - exp(-b_min / T - x (b_max
- b_min) / (2 T^2))`` on an odd grid x = 1, 3, .., 2T - 1 with b_min 0.1, b_max
10); their first beta is kept as it is.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Optional, Tuple

import numpy as np
import torch

from .limits import check_finite, check_memory

MEAN_TYPES = ("x0", "eps")
SCHEDULES = ("linear", "linear-var", "cosine", "ddpm-linear", "ddpm-cosine", "exp", "custom")
#: Schedules of the whole noise range (diffusion from pure noise): no noise_scale, no fixed first beta.
FULL_SCHEDULES = ("ddpm-linear", "ddpm-cosine", "exp", "custom")
TIMESTEP_SAMPLING = ("importance", "uniform")

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


#: The precisions a model runs its denoiser in (its ``precision`` setting).
PRECISIONS = ("fp32", "bf16")


def autocast(precision: str, device: torch.device):
    """The autocast context of a precision ("fp32": none)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class DiffusionConfig:
    """Hyper-parameters of the diffusion; DiffRec's names and ML-1M defaults."""

    mean_type: str = "x0"
    steps: int = 40
    noise_schedule: str = "linear-var"
    noise_scale: float = 0.005
    noise_min: float = 0.005
    noise_max: float = 0.01
    history_per_step: int = 10  # losses kept per step for importance sampling
    uniform_prob: float = 0.001  # uniform floor of the importance distribution
    beta_start: float = 1e-4  # ddpm-linear only
    beta_end: float = 0.02  # ddpm-linear only
    timestep_sampling: str = "importance"  # "uniform": t ~ U{0..T-1} always (DreamRec)
    custom_betas: Optional[Tuple[float, ...]] = None  # noise_schedule "custom": the (steps,) betas themselves

    def __post_init__(self):
        if self.mean_type not in MEAN_TYPES:
            raise ValueError(f"mean_type must be one of {MEAN_TYPES}, got {self.mean_type!r}")
        if self.noise_schedule not in SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {SCHEDULES}, got {self.noise_schedule!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        check_finite(self, ("noise_scale", "noise_min", "noise_max", "uniform_prob", "beta_start", "beta_end"))
        # about 16 float64 schedule arrays of (steps,), their temporaries while they are computed (150 bytes a
        # step measured at 1e6 steps, twice that at the peak) and DiffRec's (steps, history_per_step) loss history
        check_memory(f"steps {self.steps}", self.steps * (48 + self.history_per_step) * 8, "the diffusion schedule")
        if self.noise_scale < 0:
            raise ValueError(f"noise_scale must be >= 0, got {self.noise_scale}")
        if (self.noise_schedule not in FULL_SCHEDULES and self.noise_scale > 0
                and not (0 < self.noise_min <= self.noise_max < 1)):
            raise ValueError(f"need 0 < noise_min <= noise_max < 1, got {self.noise_min}, {self.noise_max}")
        if self.history_per_step < 1:
            raise ValueError(f"history_per_step must be >= 1, got {self.history_per_step}")
        if not 0 <= self.uniform_prob <= 1:
            raise ValueError(f"uniform_prob must be in [0, 1], got {self.uniform_prob}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {self.timestep_sampling!r}")
        if (self.noise_schedule == "custom") != (self.custom_betas is not None):
            raise ValueError("custom_betas go with noise_schedule='custom', and only with it")
        if self.custom_betas is not None:
            b = np.asarray(self.custom_betas, dtype=np.float64)
            if b.shape != (self.steps,) or not ((b > 0) & (b < 1)).all():
                raise ValueError(f"custom_betas must be {self.steps} values in (0, 1), got {len(b)} "
                                 f"in [{b.min() if b.size else 'nan'}, {b.max() if b.size else 'nan'}]")
            object.__setattr__(self, "custom_betas", tuple(float(v) for v in b))
        if self.noise_schedule == "ddpm-linear" and not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")

    def to_dict(self) -> dict:
        return asdict(self)


def betas_for(config: DiffusionConfig) -> np.ndarray:
    """(T,) float64 betas of the schedule (DiffRec's schedules: the first fixed at 1e-5)."""
    T = config.steps
    if config.noise_schedule in FULL_SCHEDULES:
        if config.noise_schedule == "custom":
            return np.asarray(config.custom_betas, dtype=np.float64)
        if config.noise_schedule == "ddpm-linear":
            betas = np.linspace(config.beta_start, config.beta_end, T, dtype=np.float64)
        elif config.noise_schedule == "ddpm-cosine":
            x = np.linspace(0, T, T + 1, dtype=np.float64)
            ac = np.cos(((x / T) + 0.008) / 1.008 * math.pi * 0.5) ** 2
            ac = ac / ac[0]
            betas = np.clip(1.0 - ac[1:] / ac[:-1], 1e-4, 0.9999)
        else:  # exp
            b_min, b_max = 0.1, 10.0
            x = np.linspace(1, 2 * T + 1, T, dtype=np.float64)
            betas = 1.0 - np.exp(-b_min / T - x * 0.5 * (b_max - b_min) / (T * T))
        if not ((betas > 0) & (betas < 1)).all():
            raise ValueError(f"the schedule gives betas outside (0, 1): {betas}")
        return betas
    if config.noise_schedule in ("linear", "linear-var"):
        start, end = config.noise_scale * config.noise_min, config.noise_scale * config.noise_max
        ramp = np.linspace(start, end, T, dtype=np.float64)
        if config.noise_schedule == "linear":
            betas = ramp
        else:
            # linear-var: the cumulative variance 1 - alpha_bar grows linearly.
            alpha_bar = 1.0 - ramp
            betas = np.empty(T, dtype=np.float64)
            betas[0] = 1.0 - alpha_bar[0]
            betas[1:] = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    else:  # cosine
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1.0 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=np.float64)
    betas = betas.copy()
    betas[0] = 1e-5  # a small fixed first variance keeps the first step from overfitting
    if not ((betas > 0) & (betas <= 1)).all():
        raise ValueError(f"the schedule gives betas outside (0, 1]: {betas}")
    return betas


class Trajectory(NamedTuple):
    """A reverse trajectory over the stochastic steps, ready for gaussian_logprob.

    Attributes:
        states: (S+1, B, I) ``states[0]`` the state the stochastic steps start
            from, ``states[s+1]`` the state sampled at step s. No gradient.
        preds: (S, B, I) the denoiser's outputs at each stochastic step (with
            gradient when sampled with ``keep_graph=True``).
        coef_pred, coef_x, log_var: (S,) float32 per-step constants: the step's
            mean is ``coef_pred * pred + coef_x * state`` and its variance
            ``exp(log_var)`` (exactly the values the sampler used).
        timesteps: (S,) int64 diffusion timestep of each stochastic step.
        final: (B, I) the output of the last, deterministic step (the scores).
    """

    states: torch.Tensor
    preds: torch.Tensor
    coef_pred: torch.Tensor
    coef_x: torch.Tensor
    log_var: torch.Tensor
    timesteps: torch.Tensor
    final: torch.Tensor


#: ``(offset, total)``: the rows a process holds of a global batch of ``total`` rows.
#: Random draws are then made for all ``total`` rows and the slice
#: ``[offset, offset + B)`` kept, so each row gets the numbers it would get in
#: one process running the whole batch (see :mod:`refit.runtime.distributed`).
BatchSlice = Tuple[int, int]


def _normal(shape, dtype, device, generator: Optional[torch.Generator], rows: Optional[BatchSlice] = None):
    """Standard normal draws of ``shape``; with ``rows``, the slice of a global batch's draws.

    A generator on another device than ``device`` draws there and the result is moved.
    """
    gen_dev = generator.device if generator is not None else torch.device(device)
    full = tuple(shape) if rows is None else (rows[1],) + tuple(shape[1:])
    if rows is not None and not (0 <= rows[0] and rows[0] + shape[0] <= rows[1]):
        raise ValueError(f"rows (offset, total) = {rows} does not hold a slice of {shape[0]} rows")
    eps = torch.randn(full, dtype=dtype, device=gen_dev, generator=generator)
    if rows is not None:
        eps = eps[rows[0]:rows[0] + shape[0]]
    return eps.to(device)


class GaussianDiffusion:
    """Schedule constants, forward noising, ELBO loss and reverse sampling.

    Constants are float64 on ``device``; per-step values used in float32
    arithmetic are rounded to float32 once, as DiffRec does.
    """

    def __init__(self, config: DiffusionConfig = DiffusionConfig(), device="cpu"):
        self.config = config
        self.device = torch.device(device)
        T = config.steps
        self.steps = T
        f64 = dict(dtype=torch.float64, device=self.device)
        self.loss_history = np.zeros((T, config.history_per_step), dtype=np.float64)
        self.loss_count = np.zeros(T, dtype=np.int64)
        #: The model's timestep of each step (None: step i is timestep i); set by :meth:`respaced`.
        self.timestep_map: Optional[torch.Tensor] = None
        if config.noise_scale == 0 and config.noise_schedule not in FULL_SCHEDULES:
            self.betas = None
            return
        self._setup(torch.tensor(betas_for(config), **f64))

    @classmethod
    def from_betas(cls, betas, mean_type: str = "x0", device="cpu", **options) -> "GaussianDiffusion":
        """A diffusion with the given (T,) betas (an outside model's schedule, taken as it is)."""
        betas = np.asarray(betas, dtype=np.float64).reshape(-1)
        return cls(DiffusionConfig(mean_type=mean_type, steps=int(betas.size), noise_schedule="custom",
                                   custom_betas=tuple(betas.tolist()), **options), device=device)

    def respaced(self, steps: int) -> "GaussianDiffusion":
        """The same diffusion sampled in ``steps`` evenly spaced steps (Nichol & Dhariwal's respacing).

        The kept timesteps tau_1 < .. < tau_K keep their cumulative alphas; the
        new betas are ``1 - alpha_bar[tau_k] / alpha_bar[tau_{k-1}]``, so each
        coarse step is the exact posterior of the skipped span, and the model
        is called with the original timestep ``tau_k`` (``timestep_map``). For
        sampling only: training uses the full schedule.
        """
        if self.betas is None:
            raise ValueError("only a diffusion with a noise schedule can be respaced")
        if not isinstance(steps, int) or not 1 <= steps <= self.steps:
            raise ValueError(f"steps must be an integer in [1, {self.steps}], got {steps!r}")
        use = np.unique(np.round(np.linspace(0, self.steps - 1, steps)).astype(np.int64))
        ac = self.alphas_cumprod[torch.from_numpy(use).to(self.device)]
        prev = torch.cat([torch.ones(1, dtype=ac.dtype, device=ac.device), ac[:-1]])
        out = GaussianDiffusion.__new__(GaussianDiffusion)
        out.config, out.device, out.steps = self.config, self.device, len(use)
        out.loss_history = np.zeros((len(use), self.config.history_per_step), dtype=np.float64)
        out.loss_count = np.zeros(len(use), dtype=np.int64)
        base = self.timestep_map if self.timestep_map is not None else torch.arange(self.steps, device=self.device)
        out.timestep_map = base[torch.from_numpy(use).to(self.device)]
        out._setup(1.0 - ac / prev)
        return out

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The model's timesteps of steps ``t`` (the identity unless respaced)."""
        return t if self.timestep_map is None else self.timestep_map.to(t.device)[t]

    def _setup(self, betas: torch.Tensor) -> None:
        """Every constant derived from the (T,) float64 betas."""
        f64 = dict(dtype=torch.float64, device=self.device)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1, **f64), ac[:-1]])
        self.betas = betas
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1.0).sqrt()
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # Step 0's posterior variance is 0 (log -inf): take step 1's instead.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac)

        # The reverse step's mean in terms of the model output:
        # mean = step_coef_pred[t] * output + step_coef_x[t] * x_t.
        if self.config.mean_type == "x0":
            self.step_coef_pred = self.posterior_mean_coef1
            self.step_coef_x = self.posterior_mean_coef2
        else:  # x0 = sqrt(1/ac) x_t - sqrt(1/ac - 1) eps
            self.step_coef_pred = -self.posterior_mean_coef1 * self.sqrt_recipm1_alphas_cumprod
            self.step_coef_x = self.posterior_mean_coef1 * self.sqrt_recip_alphas_cumprod + self.posterior_mean_coef2
        self._f32 = {name: getattr(self, name).float() for name in (
            "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "step_coef_pred", "step_coef_x",
            "posterior_log_variance_clipped", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")}

    # --- forward process and training -------------------------------------------

    def _at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """(B, 1) float32 column of a per-step constant at timesteps t."""
        return self._f32[name].to(t.device)[t].unsqueeze(1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, rows: Optional[BatchSlice] = None) -> torch.Tensor:
        """x_t ~ q(x_t | x0) for (B, I) x0 and (B,) int64 timesteps t (``rows``: see :data:`BatchSlice`)."""
        if self.betas is None:
            return x0
        if noise is None:
            noise = _normal(x0.shape, x0.dtype, x0.device, generator, rows)
        return self._at("sqrt_alphas_cumprod", t) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t) * noise

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at timesteps t (float64)."""
        ac = self.alphas_cumprod.to(t.device)[t]
        return ac / (1.0 - ac)

    def sample_timesteps(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None,
                         rows: Optional[BatchSlice] = None):
        """Timesteps and their importance weights, (B,) int64 and (B,) float32.

        Uniform until every step has a full history of recent losses; then
        p(t) proportional to the root mean square of t's recent losses, mixed
        with a small uniform floor, and weights 1 / (T p(t)). With ``rows``
        (see :data:`BatchSlice`) the draw is made for the global batch and
        this process's slice returned.
        """
        device = device or self.device
        T = self.steps
        n = batch_size if rows is None else rows[1]
        if self.config.timestep_sampling == "uniform" or (self.loss_count < self.config.history_per_step).any():
            t = torch.randint(0, T, (n,), device="cpu", generator=generator)
            weight = torch.ones(n)
        else:
            rms = np.sqrt(np.mean(self.loss_history ** 2, axis=1))
            p = rms / rms.sum() * (1.0 - self.config.uniform_prob) + self.config.uniform_prob / T
            p_t = torch.from_numpy(p)
            t = torch.multinomial(p_t, n, replacement=True, generator=generator)
            weight = (p_t[t] * T).float()
        if rows is not None:
            t, weight = t[rows[0]:rows[0] + batch_size], weight[rows[0]:rows[0] + batch_size]
        return t.to(device), weight.to(device)

    def record_losses(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Appends each sample's loss to its step's history (oldest dropped when full)."""
        H = self.config.history_per_step
        for step, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self.loss_count[step] == H:
                self.loss_history[step, :-1] = self.loss_history[step, 1:]
                self.loss_history[step, -1] = loss
            else:
                self.loss_history[step, self.loss_count[step]] = loss
                self.loss_count[step] += 1

    _record_losses = record_losses  # the former private name

    def training_loss(self, model: Denoiser, x0: torch.Tensor, reweight: bool = True,
                      generator: Optional[torch.Generator] = None, *, rows: Optional[BatchSlice] = None,
                      record: bool = True, return_parts: bool = False, weight: Optional[torch.Tensor] = None):
        """Per-user ELBO training loss, (B,), importance-weighted; take its mean.

        In x0 mode the mean squared error is weighted by SNR(t-1) - SNR(t)
        (1 at t = 0) when ``reweight``; in eps mode by the corresponding
        factor, with the x0 likelihood at t = 0.

        ``rows`` (see :data:`BatchSlice`): x0 is a slice of a global batch; the
        timesteps and noise are that slice of the global batch's draws.
        ``record=False`` leaves the loss history alone (the caller records
        the global batch's losses with :meth:`record_losses`), and
        ``return_parts`` returns ``(loss, t, unweighted_loss)``, the last two
        being what :meth:`record_losses` takes. ``weight``, (B, I) like x0,
        weighs each item's squared error inside a row's mean (None: all 1).
        """
        B = x0.shape[0]
        if weight is not None and weight.shape != x0.shape:
            raise ValueError(f"weight must have x0's shape {tuple(x0.shape)}, got {tuple(weight.shape)}")
        t, importance = self.sample_timesteps(B, x0.device, generator, rows=rows)
        noise = _normal(x0.shape, x0.dtype, x0.device, generator, rows)
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, t)
        target = x0 if self.config.mean_type == "x0" else noise
        sq = (target - output) ** 2
        mse = (sq if weight is None else weight * sq).mean(dim=1)
        loss = mse
        if reweight and self.betas is not None:
            # ``step_weight``: the ELBO's weight of each timestep (``weight`` stays the per-item one)
            if self.config.mean_type == "x0":
                step_weight = self.snr(t - 1) - self.snr(t)
            else:
                ac, ac_prev, b = (v.to(t.device)[t] for v in (self.alphas_cumprod, self.alphas_cumprod_prev, self.betas))
                step_weight = (1.0 - ac) / ((1.0 - ac_prev) ** 2 * (1.0 - b))
                x0_hat = self._at("sqrt_recip_alphas_cumprod", t) * x_t - self._at("sqrt_recipm1_alphas_cumprod", t) * output
                sq0 = (x0 - x0_hat) ** 2 / 2.0
                likelihood = (sq0 if weight is None else weight * sq0).mean(dim=1)
                loss = torch.where(t == 0, likelihood, mse)
            step_weight = torch.where(t == 0, torch.ones_like(step_weight), step_weight).to(loss.dtype)
            loss = step_weight * loss
        if record:
            self.record_losses(t, loss)
        if return_parts:
            return loss / importance, t, loss.detach()
        return loss / importance

    # --- reverse process -----------------------------------------------------------------

    def step_constants(self, device=None, eta: Optional[float] = None):
        """(T,) float32 coef_pred, coef_x, log_var of every reverse step, by timestep.

        ``eta=None`` (or 1): the posterior q(x_{t-1} | x_t, x0) of DDPM, the model's own sampler.
        ``eta > 0``: DDIM's family of reverse steps (Song et al., 2021), which keeps the marginals of
        x_t and sets the step's variance to ``eta**2`` times the posterior's,

            sigma_t^2 = eta^2 (1 - ab_{t-1}) / (1 - ab_t) (1 - ab_t / ab_{t-1}),
            mean      = sqrt(ab_{t-1}) x0 + sqrt(1 - ab_{t-1} - sigma_t^2) (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t),

        with x0 the model's prediction (taken from the noise prediction in eps mode). eta = 1 is the
        posterior exactly; eta > 1 explores with more noise while the marginals still match, up to
        ``sigma_t^2 = 1 - ab_{t-1}`` (the mean then forgets x_t), where larger eta is capped;
        eta = 0 is DDIM's deterministic step (log_var -inf: for steps that draw no noise).
        Step 0 is deterministic either way (the sampler adds no noise there).
        """
        device = device or self.device
        names = ("step_coef_pred", "step_coef_x", "posterior_log_variance_clipped")
        if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float))
                                or not math.isfinite(eta) or eta < 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        if eta is None or eta == 1.0:
            return tuple(self._f32[n].to(device) for n in names)
        if self.betas is None:
            raise ValueError("DDIM steps need a noise schedule (noise_scale > 0)")
        ab, abp = self.alphas_cumprod, self.alphas_cumprod_prev
        var = eta ** 2 * (1.0 - abp) / (1.0 - ab) * (1.0 - ab / abp)
        var = torch.minimum(var, 1.0 - abp)
        c_x = torch.sqrt((1.0 - abp - var).clamp_min(0.0)) / torch.sqrt(1.0 - ab)
        c_x0 = torch.sqrt(abp) - c_x * torch.sqrt(ab)
        if self.config.mean_type == "x0":
            cp, cx = c_x0, c_x
        else:  # x0 = sqrt(1/ab) x_t - sqrt(1/ab - 1) eps
            cp = -c_x0 * self.sqrt_recipm1_alphas_cumprod
            cx = c_x0 * self.sqrt_recip_alphas_cumprod + c_x
        # Step 0 has no noise; its variance is never used, so step 1's stands in (as for the posterior).
        lv = torch.log(torch.cat([var[1:2], var[1:]]))
        return tuple(v.float().to(device) for v in (cp, cx, lv))

    def sample(self, model: Denoiser, x_start: torch.Tensor, *, sampling_steps: int = 0, noise: bool = False,
               return_trajectory: bool = False, keep_graph: bool = False,
               generator: Optional[torch.Generator] = None, temperature: float = 1.0,
               rows: Optional[BatchSlice] = None, eta: Optional[float] = None,
               explore: Optional[Tuple[int, int]] = None, grad_steps: int = 0):
        """Runs the reverse process from a user's row; returns the final (B, I) scores.

        Args:
            x_start: (B, I) the clean row the reverse process starts from.
            sampling_steps: first noise x_start to this step (0: start clean,
                DiffRec's default for inference).
            noise: add Gaussian noise at every step but the last (t = 0).
            return_trajectory: return a :class:`Trajectory` of the stochastic
                steps (needs ``noise``), else the final scores.
            keep_graph: keep the model outputs' autograd graph in the
                trajectory (for a policy gradient taken from this very pass).
            temperature: scale of the added noise's standard deviation (an
                exploration knob for fine-tuning; the trajectory's ``log_var``
                is that of the noise actually added).
            rows: ``(offset, total)``: x_start holds rows ``[offset, offset + B)``
                of a global batch of ``total``; every noise draw is made for the
                global batch and sliced, so a row's trajectory does not depend
                on how the batch is split across processes.
            eta: DDIM's noise level for the stochastic steps (see
                :meth:`step_constants`; None: the posterior, eta = 1).
            explore: ``(first, count)``: only the ``count`` steps from the
                ``first``-th (0: the step from T-1) draw noise; every other
                step is DDIM's deterministic one (eta = 0), and the trajectory
                holds just the exploring steps (``states[0]`` the state they
                start from). A policy gradient then credits each reward
                difference to the few steps that caused it.
            grad_steps: the last ``grad_steps`` reverse steps keep their autograd graph: the
                returned final state is differentiable in the model's parameters through them
                (and only them: the state they start from is a constant), as reward
                backpropagation needs. Memory grows with ``grad_steps``, not with T. Not with
                ``return_trajectory``.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 <= sampling_steps <= self.steps:
            raise ValueError(f"sampling_steps must be in [0, {self.steps}], got {sampling_steps}")
        if return_trajectory and not noise:
            raise ValueError("a trajectory has stochastic steps only with noise=True")
        if grad_steps and (return_trajectory or keep_graph or explore is not None or not 0 < grad_steps <= self.steps):
            raise ValueError(f"grad_steps must be in [1, {self.steps}] and excludes return_trajectory, keep_graph "
                             f"and explore, got {grad_steps}")
        B = x_start.shape[0]
        dev = x_start.device
        x = x_start
        if sampling_steps > 0:
            x = self.q_sample(x_start, torch.full((B,), sampling_steps - 1, dtype=torch.long, device=dev),
                              generator=generator, rows=rows)
        if self.betas is None:  # no noise at all: the model maps x_t to x_{t-1} directly
            for i in reversed(range(self.steps)):
                x = model(x, torch.full((B,), i, dtype=torch.long, device=dev))
            return x
        cp, cx, lv = self.step_constants(dev, eta)
        if temperature != 1.0:
            lv = lv + 2.0 * math.log(temperature)
        T = self.steps
        S = T - 1 if noise else 0  # stochastic steps: t = T-1 .. 1
        first, count = 0, S  # the steps that explore (draw noise); the others are DDIM's deterministic ones
        if explore is not None:
            first, count = (int(v) for v in explore)
            if not noise or first < 0 or count < 0 or first + count > T - 1:
                raise ValueError(f"explore = (first, count) = {explore} must lie within the {T - 1} steps before "
                                 f"the last (and needs noise=True)")
            cp0, cx0, _ = self.step_constants(dev, 0.0)
        states = preds = None
        if return_trajectory:
            states = torch.empty((count + 1,) + tuple(x.shape), dtype=x.dtype, device=dev)
            preds = [] if keep_graph else torch.empty((count,) + tuple(x.shape), dtype=x.dtype, device=dev)
        with torch.enable_grad() if keep_graph else torch.no_grad():
            step_t = self.model_timesteps(torch.arange(T, device=dev))
            for s, i in enumerate(reversed(range(T))):
                if return_trajectory and s == first:
                    states[0] = x
                t = step_t[i].expand(B)
                if grad_steps and i < grad_steps:  # the last grad_steps steps: with graph, nothing detached
                    with torch.enable_grad():
                        out = model(x, t)
                        if noise and i > 0:
                            eps = _normal(x.shape, x.dtype, dev, generator, rows)
                            x = cp[i] * out + cx[i] * x + torch.exp(0.5 * lv[i]) * eps
                        else:
                            x = cp[i] * out + cx[i] * x
                    continue
                out = model(x, t)
                if noise and i > 0 and first <= s < first + count:
                    # States are sampled without gradient; only `preds` may keep it.
                    mean = cp[i] * out.detach() + cx[i] * x
                    eps = _normal(x.shape, x.dtype, dev, generator, rows)
                    x = mean + torch.exp(0.5 * lv[i]) * eps
                    if return_trajectory:
                        states[s - first + 1] = x
                        if keep_graph:
                            preds.append(out)
                        else:
                            preds[s - first] = out.detach()
                elif explore is not None and i > 0:
                    x = cp0[i] * out.detach() + cx0[i] * x
                else:
                    x = cp[i] * out.detach() + cx[i] * x
            if return_trajectory and count == 0:
                states[0] = x
        if not return_trajectory:
            return x
        if keep_graph:
            preds = torch.stack(preds) if preds else x.new_empty((0,) + tuple(x.shape))
        ts = torch.arange(T - 1 - first, T - 1 - first - count, -1, device=dev)
        return Trajectory(states, preds, cp[ts], cx[ts], lv[ts], self.model_timesteps(ts), x)


def batched_outputs(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], traj: Trajectory) -> torch.Tensor:
    """(S, B, D) outputs of ``forward(x (S*B, D), t (S*B,))`` along a trajectory, in one call.

    Every stochastic step is re-evaluated in one forward pass over S * B rows
    (larger matrix products than S passes of B rows); ``forward`` repeats any
    per-row conditioning S times itself.
    """
    S, B, D = traj.preds.shape
    if S == 0:
        return traj.preds.new_zeros((0, B, D))
    t = traj.timesteps.repeat_interleave(B)
    with torch.enable_grad():
        out = forward(traj.states[:-1].reshape(S * B, D), t)
    return out.float().view(S, B, D)


def rl_diffusion(policy, steps: Optional[int]) -> GaussianDiffusion:
    """``policy.diffusion`` respaced to ``steps`` reverse steps for sampling trajectories (None or T: the
    full schedule), built once per step count and kept on the policy."""
    full = policy.diffusion
    if steps is None or steps == full.steps:
        return full
    cache = policy.__dict__.setdefault("_rl_diffusions", {})
    if steps not in cache:
        cache[steps] = full.respaced(steps)
    return cache[steps]


def reverse_in_latent(diffusion: "GaussianDiffusion", model, x_start: torch.Tensor, cond=None, *,
                      autocast=None) -> torch.Tensor:
    """The noise-free reverse pass of ``diffusion.sample`` run in the model's hidden space.

    For a denoiser whose row enters only through a linear map ``W_x @ x`` and
    whose output is linear, ``out = W_out @ h + b_out`` (DiffRec's MLP and
    CF-Diff here, in eval mode), every reverse step's mean
    ``x' = c_pred * out + c_x * x`` gives

        W_x @ x' = c_pred * (M @ h + c) + c_x * (W_x @ x),   M = W_x W_out,  c = W_x b_out,

    so the pass carries the (B, H) projection instead of the (B, I) row, and
    the final row is ``a * x_start + W_out @ s + beta * b_out`` with the scalars
    a, beta and the (B, H) sum s updated alongside. The full-width layers run
    once (in and out) instead of once per step: the same function, evaluated
    with ~T times fewer operations on the item dimension (it differs from
    the step-by-step pass by float32 rounding).

    Args:
        model: a denoiser with ``latent_parts()`` and ``hidden_from_projection(v, t, cond)``
            (and optionally ``project_condition(cond)``, applied once before the steps).
        x_start: (B, I) start rows (already noised if ``sampling_steps`` asks for it).
        cond: the batch's conditioning (``model.condition(...)``).
        autocast: a context factory for mixed precision (None: float32).
    """
    import contextlib

    ctx = autocast or contextlib.nullcontext
    if diffusion.betas is None:
        raise ValueError("the hidden-space pass needs a noise schedule (noise_scale > 0)")
    acc = torch.float64 if x_start.dtype == torch.float64 else torch.float32
    cp, cx, _ = diffusion.step_constants(x_start.device)
    cp, cx = cp.tolist(), cx.tolist()
    with torch.no_grad():
        W_x, W_out, b_out = (p.to(acc) for p in model.latent_parts())
        M = W_x @ W_out  # (H_in, H_out)
        c = W_x @ b_out
        B = x_start.shape[0]
        with ctx():
            v = torch.nn.functional.linear(x_start.to(acc), W_x).to(acc)
        if cond is not None and hasattr(model, "project_condition"):  # step-independent inputs: project once
            with ctx():
                cond = model.project_condition(cond)
        s = torch.zeros(B, W_out.shape[1], dtype=acc, device=x_start.device)
        a, beta = 1.0, 0.0
        for i in reversed(range(diffusion.steps)):
            t = torch.full((B,), i, dtype=torch.long, device=x_start.device)
            with ctx():
                h = model.hidden_from_projection(v, t, cond)
                mh = torch.nn.functional.linear(h, M.to(h.dtype), c.to(h.dtype))
            h, mh = h.to(acc), mh.to(acc)
            v = cp[i] * mh + cx[i] * v
            s = cp[i] * h + cx[i] * s
            a, beta = cx[i] * a, cp[i] + cx[i] * beta
        with ctx():
            out = torch.nn.functional.linear(s, W_out.to(s.dtype))
        return a * x_start.to(acc) + out.to(acc) + beta * b_out
