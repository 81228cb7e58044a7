"""CUDA graphs for the reverse-sampling loop: evaluation and ReFiT sampling.

A reverse pass is T steps of small kernels (DiffRec's ML-1M denoiser at
B = 64 is a handful of GEMMs of at most 64 x 2820 x 600 per step; DreamRec's
is a few (B, 64) products per step over hundreds of steps). On a GPU such a
pass costs launch latency and host work more than arithmetic. A CUDA graph
records the T steps once and replays them with a single launch.

What a capture needs, and how the loop here provides it:

- fixed shapes: a batch is padded to the sampler's capacity (the padded rows
  repeat the last real row, so every row is a valid input) and the outputs
  are trimmed back to the real rows;
- fixed addresses: the start state, the conditioning, the noise, the step
  tables and the outputs live in static buffers refilled in place before
  each replay; the denoiser's parameters are read where they live, so an
  optimiser step between two replays is seen by the next one;
- no host synchronisation and no host-dependent control flow inside the
  loop: every per-step quantity (timesteps, mean coefficients, noise
  standard deviations) is a precomputed device tensor or a Python constant,
  and the noise of every step is drawn before the loop, from the caller's
  generator and in the order :meth:`refit.diffusion.GaussianDiffusion.sample`
  draws it, so both give the same trajectories;
- the loop's own arithmetic writes into preallocated buffers (``out=`` and
  in-place ops): it allocates nothing per step; the denoiser's temporaries
  come from the graph's private memory pool;
- mixed precision through ``torch.autocast(..., cache_enabled=False)``: a
  weight cache filled during the capture would freeze the bf16 copies of
  the weights for every later replay.

On the CPU, or with ``use_graph=False``, the very same loop runs eagerly on
the same static buffers; that is what the CPU tests check (same results as
the eager sampler, no host sync and no allocation inside the loop, padding).

Use: wrap a policy and pass the wrapper wherever the policy went::

    from refit.families import graphed     # each model family names its wrapper class of this module
    fast = graphed(rec, batch_size=64, eval_batch_size=1024)   # a RowRecommender or a SeqRecommender
    trainer = ReFiT(fast, data, config)     # ReFiT's sampling replays a graph
    fast.evaluate(data)                     # so does evaluation's reverse pass

Everything but sampling, scoring and evaluation is the wrapped policy's own.
What runs eagerly instead: a trajectory that must keep its autograd graph
(``reuse_sampling_graph``), a module left in training mode (dropout), and a
diffusion without a noise schedule.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch

from ..diffusion import GaussianDiffusion, Trajectory, _normal

#: ``forward(x (C, D) float32, t (C,) int64, cond) -> (C, D) float32``: the denoiser with the
#: batch's conditioning ``cond``, a tuple of (C, ...) tensors (empty when there is none).
Forward = Callable[[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, ...]], torch.Tensor]


def graph_autocast(precision: str, device: torch.device):
    """The autocast context of a precision, capture-safe: bf16 without the weight cache ("fp32": none)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)
    if precision != "fp32":
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return contextlib.nullcontext()


class StepTable(NamedTuple):
    """Per-step quantities of the reverse loop, in loop order (step s is timestep T - 1 - s).

    Attributes:
        t: (T, C) int64 the model's timestep of each loop step, one per row.
        coef_pred, coef_x: (T,) float32: step s's mean is ``coef_pred[s] * out + coef_x[s] * x``.
        std: (T,) float32 standard deviation of step s's noise, temperature included (the last,
            noise-free step's entry is unused).
        log_var: (T,) float32 log-variances the std came from (by timestep order, as the sampler's).
    """

    t: torch.Tensor
    coef_pred: torch.Tensor
    coef_x: torch.Tensor
    std: torch.Tensor
    log_var: torch.Tensor


def step_table(diffusion: GaussianDiffusion, capacity: int, device, temperature: float = 1.0) -> StepTable:
    """The :class:`StepTable` of a diffusion for ``capacity`` rows, computed exactly as the eager sampler does."""
    if diffusion.betas is None:
        raise ValueError("the capture-safe loop needs a diffusion with a noise schedule")
    device = torch.device(device)
    T = diffusion.steps
    cp, cx, lv = diffusion.step_constants(device)
    order = torch.arange(T - 1, -1, -1, device=device)
    step_t = diffusion.model_timesteps(torch.arange(T, device=device))
    t = step_t[order][:, None].expand(T, capacity).contiguous()
    table = StepTable(t, cp[order].contiguous(), cx[order].contiguous(), torch.empty(T, device=device), lv.clone())
    set_temperature(table, diffusion, temperature)
    return table


def set_temperature(table: StepTable, diffusion: GaussianDiffusion, temperature: float) -> None:
    """Refills the noise scales of ``table`` in place for a sampling temperature (no recapture needed)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _, _, lv = diffusion.step_constants(table.std.device)
    if temperature != 1.0:  # the eager sampler's arithmetic, so both draw with the same scales
        lv = lv + 2.0 * math.log(temperature)
    T = lv.shape[0]
    # exp of each 0-d element, as the eager sampler takes it step by step (a vectorised exp may
    # round differently in the last place).
    table.std.copy_(torch.stack([torch.exp(0.5 * lv[i]) for i in range(T - 1, -1, -1)]))
    table.log_var.copy_(lv)


def reverse_loop(forward: Forward, x_start: torch.Tensor, table: StepTable, final: torch.Tensor,
                 scratch: torch.Tensor, *, cond: Tuple[torch.Tensor, ...] = (), noise: Optional[torch.Tensor] = None,
                 states: Optional[torch.Tensor] = None, preds: Optional[torch.Tensor] = None) -> None:
    """The reverse process of :meth:`GaussianDiffusion.sample`, capture-safe, on preallocated buffers.

    Args:
        forward: the denoiser (see :data:`Forward`).
        x_start: (C, D) float32 start state.
        table: the :class:`StepTable` (T steps, C rows).
        final: (C, D) float32, receives the last, noise-free step's output (the scores).
        scratch: (3, C, D) float32 work space (one temporary, two alternating states).
        cond: the conditioning handed to ``forward``.
        noise: (T - 1, C, D) float32 noise of the stochastic steps, or None for a noise-free pass.
        states: (T, C, D) float32 or None: receives ``x_start`` and every stochastic step's state.
        preds: (T - 1, C, D) float32 or None: receives the denoiser's output at each stochastic step.

    Every step is the eager sampler's arithmetic, operation for operation
    (``mean = coef_pred * out + coef_x * x``, then ``x = mean + std * eps``),
    written into the buffers; the loop reads no tensor value on the host.
    """
    T = table.coef_pred.shape[0]
    tmp, ping = scratch[0], (scratch[1], scratch[2])
    x = x_start
    if states is not None:
        states[0].copy_(x_start)
        x = states[0]
    for s in range(T):
        out = forward(x, table.t[s], cond)
        stochastic = noise is not None and s < T - 1
        if s == T - 1:
            dst = final
        elif states is not None and stochastic:
            dst = states[s + 1]
        else:
            dst = ping[s % 2]
        torch.mul(out, table.coef_pred[s], out=dst)
        torch.mul(x, table.coef_x[s], out=tmp)
        dst.add_(tmp)
        if stochastic:
            torch.mul(noise[s], table.std[s], out=tmp)
            dst.add_(tmp)
            if preds is not None:
                preds[s].copy_(out)
        x = dst


class CapturedLoop:
    """A body of work on static buffers, run eagerly or recorded once in a CUDA graph and replayed.

    ``use_graph`` (default: on CUDA devices) records the body on the first :meth:`replay`,
    after ``warmup`` eager runs on a side stream (cuBLAS handles, autotuning and the
    allocator's pool settle there, as capture requires).
    """

    def __init__(self, body: Callable[[], None], device, use_graph: Optional[bool] = None, warmup: int = 2):
        self.body, self.device, self.warmup = body, torch.device(device), warmup
        self.use_graph = self.device.type == "cuda" if use_graph is None else bool(use_graph)
        if self.use_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        self.graph = None

    def capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.body()
        self.graph = graph

    def replay(self) -> None:
        if not self.use_graph:
            self.body()
            return
        if self.graph is None:
            self.capture()
        self.graph.replay()


def _pad_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[:B] = src; the rows past B repeat src's last row (valid inputs for any row-wise model)."""
    B = src.shape[0]
    dst[:B].copy_(src)
    if B < dst.shape[0]:
        dst[B:].copy_(src[B - 1:B].expand((dst.shape[0] - B,) + tuple(src.shape[1:])))


class ReverseSampler:
    """:meth:`GaussianDiffusion.sample` for batches of up to ``capacity`` rows of width ``dim``, capturable.

    Args:
        diffusion: the diffusion (with a noise schedule).
        forward: the denoiser (see :data:`Forward`); it must be row-wise (row b of the output
            depends on row b of the inputs only), as every denoiser here is in eval mode.
        capacity: C, the padded batch size.
        dim: D, the width of a state (items, or DreamRec's embedding width).
        cond_like: example conditioning: a tuple of (b, ...) tensors whose shapes past the first
            dimension and dtypes the static buffers take.
        noise: a stochastic pass (noise on every step but the last) or a noise-free one.
        trajectory: keep the states and denoiser outputs (for ReFiT).
        use_graph: record a CUDA graph (default: on CUDA devices).

    :meth:`__call__` fills the static buffers (start state, conditioning, noise drawn from
    the caller's generator in the eager sampler's order), replays, and returns copies of the
    real rows: the (B, D) final states, or a :class:`~refit.diffusion.Trajectory`.
    """

    def __init__(self, diffusion: GaussianDiffusion, forward: Forward, capacity: int, dim: int, *,
                 device, cond_like: Sequence[torch.Tensor] = (), noise: bool = True, trajectory: bool = False,
                 use_graph: Optional[bool] = None, dtype: torch.dtype = torch.float32):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if trajectory and not noise:
            raise ValueError("a trajectory has stochastic steps only with noise=True")
        device = torch.device(device)
        T = diffusion.steps
        S = T - 1 if noise else 0
        self.diffusion, self.forward, self.capacity, self.dim = diffusion, forward, capacity, dim
        self.device, self.dtype, self.noisy, self.trajectory = device, dtype, noise, trajectory
        f = dict(dtype=dtype, device=device)
        self.x_start = torch.zeros(capacity, dim, **f)
        self.device = device = self.x_start.device  # with its index ("cuda:0"), as a generator names it
        self.cond = tuple(torch.zeros((capacity,) + tuple(c.shape[1:]), dtype=c.dtype, device=device)
                          for c in cond_like)
        self.noise = torch.zeros(S, capacity, dim, **f) if noise else None
        self.states = torch.zeros(S + 1, capacity, dim, **f) if trajectory else None
        self.preds = torch.zeros(S, capacity, dim, **f) if trajectory else None
        self.final = torch.zeros(capacity, dim, **f)
        self.scratch = torch.zeros(3, capacity, dim, **f)
        self.table = step_table(diffusion, capacity, device)
        self.temperature = 1.0
        self.n = 0
        self.loop = CapturedLoop(self.run_loop, device, use_graph)

    def run_loop(self) -> None:
        """The loop on the static buffers (what a graph records)."""
        with torch.no_grad():
            reverse_loop(self.forward, self.x_start, self.table, self.final, self.scratch, cond=self.cond,
                         noise=self.noise, states=self.states, preds=self.preds)

    def set_temperature(self, temperature: float) -> None:
        if temperature != self.temperature:
            set_temperature(self.table, self.diffusion, temperature)
            self.temperature = temperature

    def load(self, x_start: torch.Tensor, cond: Sequence[torch.Tensor] = (), *,
             generator: Optional[torch.Generator] = None, rows=None, sampling_steps: int = 0) -> None:
        """Fills the static buffers for a batch of B <= C rows; draws happen here, none in the loop.

        ``sampling_steps``, ``generator`` and ``rows`` mean what they mean to
        :meth:`GaussianDiffusion.sample`; the draws are made in its order and shapes (for the B
        real rows), so a generator leaves both in the same state.
        """
        B = x_start.shape[0]
        if B > self.capacity:
            raise ValueError(f"a batch of {B} rows does not fit a sampler of capacity {self.capacity}")
        if tuple(x_start.shape[1:]) != (self.dim,):
            raise ValueError(f"x_start must be (B, {self.dim}), got {tuple(x_start.shape)}")
        if len(cond) != len(self.cond):
            raise ValueError(f"expected {len(self.cond)} conditioning tensors, got {len(cond)}")
        self.n = B
        if B == 0:
            return
        x = x_start
        if sampling_steps > 0:
            t = torch.full((B,), sampling_steps - 1, dtype=torch.long, device=x_start.device)
            x = self.diffusion.q_sample(x_start, t, generator=generator, rows=rows)
        _pad_into(self.x_start, x.to(self.dtype))
        for static, c in zip(self.cond, cond):
            _pad_into(static, c)
        if self.noisy:
            gen_dev = generator.device if generator is not None else self.device
            for s in range(self.noise.shape[0]):
                if rows is None and gen_dev == self.device:  # straight into the buffer: the same numbers
                    torch.randn((B, self.dim), generator=generator, dtype=self.dtype, device=self.device,
                                out=self.noise[s, :B])
                else:
                    self.noise[s, :B].copy_(_normal((B, self.dim), self.dtype, self.device, generator, rows))

    def replay(self) -> None:
        if self.n:
            self.loop.replay()

    def result(self):
        """Copies of the real rows' outputs: (B, D) final states, or a Trajectory."""
        B = self.n
        keep = lambda t: t[..., :B, :].clone(memory_format=torch.contiguous_format)  # noqa: E731
        final = keep(self.final)
        if not self.trajectory:
            return final
        T = self.diffusion.steps
        ts = torch.arange(T - 1, 0, -1, device=self.device)
        cp, cx, _ = self.diffusion.step_constants(self.device)
        return Trajectory(keep(self.states), keep(self.preds), cp[ts], cx[ts], self.table.log_var[ts].clone(),
                          self.diffusion.model_timesteps(ts), final)

    def __call__(self, x_start: torch.Tensor, cond: Sequence[torch.Tensor] = (), *,
                 generator: Optional[torch.Generator] = None, rows=None, sampling_steps: int = 0,
                 temperature: float = 1.0):
        self.set_temperature(temperature)
        self.load(x_start, cond, generator=generator, rows=rows, sampling_steps=sampling_steps)
        self.replay()
        return self.result()


class LatentSampler:
    """:func:`refit.diffusion.reverse_in_latent` (DiffRec's noise-free evaluation pass in the hidden
    space) for batches of up to ``capacity`` rows, capturable. ``model`` has ``latent_parts()`` and
    ``hidden_from_projection(v, t, cond)`` (and optionally ``project_condition``)."""

    def __init__(self, diffusion: GaussianDiffusion, model: torch.nn.Module, capacity: int, n_items: int, *,
                 device, precision: str = "fp32", cond_like: Sequence[torch.Tensor] = (), cond_type=None,
                 use_graph: Optional[bool] = None):
        if diffusion.betas is None:
            raise ValueError("the hidden-space pass needs a noise schedule (noise_scale > 0)")
        device = torch.device(device)
        self.diffusion, self.model, self.capacity, self.precision = diffusion, model, capacity, precision
        self.device, self.cond_type = device, cond_type
        self.x_start = torch.zeros(capacity, n_items, device=device)
        self.cond = tuple(torch.zeros((capacity,) + tuple(c.shape[1:]), dtype=c.dtype, device=device)
                          for c in cond_like)
        self.final = torch.zeros(capacity, n_items, device=device)
        T = diffusion.steps
        self.t = step_table(diffusion, capacity, device).t
        # Python constants, read once here: a graph bakes them into its kernels.
        cp, cx, _ = diffusion.step_constants(device)
        self.cps, self.cxs = cp.tolist(), cx.tolist()
        a, beta = 1.0, 0.0
        for i in reversed(range(T)):
            a, beta = self.cxs[i] * a, self.cps[i] + self.cxs[i] * beta
        self.a, self.beta = a, beta
        self.n = 0
        self.loop = CapturedLoop(self.run_loop, device, use_graph)

    def run_loop(self) -> None:
        """The hidden-space pass on the static buffers, in reverse_in_latent's arithmetic."""
        model, T = self.model, self.diffusion.steps
        ctx = lambda: graph_autocast(self.precision, self.device)  # noqa: E731
        with torch.no_grad():
            W_x, W_out, b_out = (p.float() for p in model.latent_parts())
            M = W_x @ W_out
            c = W_x @ b_out
            with ctx():
                v = torch.nn.functional.linear(self.x_start, W_x).float()
            cond = self.cond_type(*self.cond) if self.cond else None
            if cond is not None and hasattr(model, "project_condition"):
                with ctx():
                    cond = model.project_condition(cond)
            s = torch.zeros(self.capacity, W_out.shape[1], device=self.device)
            v_next, s_next, tmp = torch.empty_like(v), torch.empty_like(s), torch.empty_like(s)
            tmp_v = torch.empty_like(v)
            for k in range(T):
                i = T - 1 - k
                with ctx():
                    h = model.hidden_from_projection(v, self.t[k], cond)
                    mh = torch.nn.functional.linear(h, M.to(h.dtype), c.to(h.dtype))
                h, mh = h.float(), mh.float()
                torch.mul(mh, self.cps[i], out=v_next)
                torch.mul(v, self.cxs[i], out=tmp_v)
                v_next.add_(tmp_v)
                torch.mul(h, self.cps[i], out=s_next)
                torch.mul(s, self.cxs[i], out=tmp)
                s_next.add_(tmp)
                v, v_next, s, s_next = v_next, v, s_next, s
            with ctx():
                out = torch.nn.functional.linear(s, W_out.to(s.dtype))
            torch.mul(self.x_start, self.a, out=self.final)
            self.final.add_(out.float())
            self.final.add_(self.beta * b_out)

    def __call__(self, x_start: torch.Tensor, cond: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        B = x_start.shape[0]
        if B > self.capacity:
            raise ValueError(f"a batch of {B} rows does not fit a sampler of capacity {self.capacity}")
        self.n = B
        if B == 0:
            return self.final[:0].clone()
        _pad_into(self.x_start, x_start.float())
        for static, cv in zip(self.cond, cond):
            _pad_into(static, cv)
        self.loop.replay()
        return self.final[:B].clone(memory_format=torch.contiguous_format)


# --- wrappers that give a policy graphed sampling and evaluation -------------------------------------

class GraphedPolicy:
    """A wrapper of a policy that delegates everything to it but what a subclass defines: each model
    family's graphed wrapper (:attr:`refit.families.Family.graphed`) subclasses it."""

    def __init__(self, policy, *, batch_size: Optional[int] = None, eval_batch_size: Optional[int] = None,
                 use_graph: Optional[bool] = None):
        self.policy, self.batch_size, self.eval_batch_size, self.use_graph = policy, batch_size, eval_batch_size, use_graph
        self.samplers: Dict[Any, Any] = {}

    def __getattr__(self, name):
        # Only reached for attributes this wrapper does not have itself.
        if name == "policy":
            raise AttributeError(name)
        return getattr(self.policy, name)

    def __deepcopy__(self, memo):
        """A deep copy (ReFiT's frozen reference for the KL anchor) is a plain copy of the policy."""
        import copy

        return copy.deepcopy(self.policy, memo)

    def _sampler(self, key, wanted: int, make: Callable[[int], Any]):
        """The sampler for ``key``, of at least ``wanted`` rows (a bigger batch than before recaptures)."""
        have = self.samplers.get(key)
        if have is None or have.capacity < wanted:
            have = self.samplers[key] = make(wanted)
        return have


def is_graphed(policy) -> bool:
    """Whether ``policy`` is a wrapper of this module already."""
    return isinstance(policy, GraphedPolicy)


__all__ = ["graph_autocast", "StepTable", "step_table", "set_temperature", "reverse_loop", "CapturedLoop",
           "ReverseSampler", "LatentSampler", "GraphedPolicy", "is_graphed"]
