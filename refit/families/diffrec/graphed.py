"""DiffRec's and CF-Diff's policies with their reverse passes replayed from CUDA graphs
(:mod:`refit.runtime.cudagraph`): ReFiT sampling and evaluation."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ...runtime.cudagraph import Forward, GraphedPolicy, LatentSampler, ReverseSampler, graph_autocast


def _plain_cond(cond) -> Tuple[Tuple[torch.Tensor, ...], Any]:
    """A model's conditioning as (tuple of tensors, the type that rebuilds it)."""
    if cond is None:
        return (), None
    if isinstance(cond, torch.Tensor):
        return (cond,), None
    return tuple(cond), type(cond)


class GraphedRowRecommender(GraphedPolicy):
    """A :class:`refit.families.diffrec.recommender.RowRecommender` (DiffRec, CF-Diff, outside models) whose ReFiT sampling
    (:meth:`sample`) and evaluation pass (:meth:`scores`, :meth:`evaluate`) replay CUDA graphs.

    ``batch_size`` / ``eval_batch_size``: the padded batch sizes (default: the first batch's).
    """

    def _forward(self, cond_type) -> Forward:
        module, precision = self.policy.model, self.policy.precision

        def forward(x, t, cond):
            c = None if not cond else (cond_type(*cond) if cond_type is not None else cond[0])
            with graph_autocast(precision, x.device):
                out = module(x, t, c)
            return out.float()

        return forward

    def sample(self, users: torch.Tensor, inputs: torch.Tensor, *, generator: Optional[torch.Generator] = None,
               temperature: float = 1.0, rows=None, keep_graph: bool = False):
        """As :meth:`RowRecommender.sample` (same trajectories for the same generator), from a graph."""
        rec = self.policy
        if keep_graph or rec.model.training or rec.diffusion.betas is None:
            return rec.sample(users, inputs, generator=generator, temperature=temperature, rows=rows,
                              keep_graph=keep_graph)
        with torch.no_grad():
            cond, cond_type = _plain_cond(rec.model.condition(users, inputs))
        B, D = inputs.shape
        sampler = self._sampler(
            ("sample", tuple(c.shape[1:] for c in cond)), max(B, self.batch_size or 0),
            lambda n: ReverseSampler(rec.diffusion, self._forward(cond_type), n, D, device=inputs.device,
                                     cond_like=cond, noise=True, trajectory=True, use_graph=self.use_graph))
        return sampler(inputs, cond, generator=generator, rows=rows, temperature=temperature)

    @torch.no_grad()
    def scores(self, users: torch.Tensor, rows: torch.Tensor, generator: Optional[torch.Generator] = None,
               latent: Optional[bool] = None) -> torch.Tensor:
        """As :meth:`RowRecommender.scores`, (B, I) float32, from a graph."""
        rec = self.policy
        was = rec.model.training
        rec.model.eval()
        try:
            use_latent = rec.latent_inference() if latent is None else latent
            cond, cond_type = _plain_cond(rec.model.condition(users, rows))
            B, D = rows.shape
            wanted = max(B, self.eval_batch_size or 0)
            shapes = tuple(c.shape[1:] for c in cond)
            if use_latent:
                sampler = self._sampler(("latent", shapes), wanted, lambda n: LatentSampler(
                    rec.diffusion, rec.model, n, D, device=rows.device, precision=rec.precision, cond_like=cond,
                    cond_type=cond_type, use_graph=self.use_graph))
                x = rows
                if rec.sampling_steps > 0:
                    t = torch.full((B,), rec.sampling_steps - 1, dtype=torch.long, device=rows.device)
                    x = rec.diffusion.q_sample(rows, t, generator=generator)
                return sampler(x, cond)
            if rec.diffusion.betas is None:
                return rec.scores(users, rows, generator=generator, latent=False)
            sampler = self._sampler(("scores", shapes, rec.sampling_noise), wanted, lambda n: ReverseSampler(
                rec.diffusion, self._forward(cond_type), n, D, device=rows.device, cond_like=cond,
                noise=rec.sampling_noise, trajectory=False, use_graph=self.use_graph))
            return sampler(rows, cond, generator=generator, sampling_steps=rec.sampling_steps)
        finally:
            rec.model.train(was)

    def evaluate(self, data, *, ks=(10, 20, 50, 100), batch_size: int = 1024) -> Dict[str, Dict[str, float]]:
        """As :meth:`RowRecommender.evaluate` (valid and test metrics), each batch scored by :meth:`scores`.

        The training rows are gathered where the model is (``gather_rows``' CUDA kernel on a GPU),
        from a copy of the training matrix placed there once.
        """
        import refit_kernels as rk

        from ...evaluate import evaluate_many
        from ...evaluate import evaluation_targets

        device = self.policy.device
        train = rk.as_csr(data.train, "train", index_dtype=None).to(device)

        def score_fn(users: torch.Tensor) -> torch.Tensor:
            users = users.to(device)
            return self.scores(users, rk.gather_rows(train, users))

        return evaluate_many(score_fn, evaluation_targets(data, ("valid", "test")), ks=ks, batch_size=batch_size,
                             desc="evaluate")


__all__ = ["GraphedRowRecommender"]
