"""DreamRec's and PreferDiff's policies with their reverse passes replayed from CUDA graphs
(:mod:`refit.runtime.cudagraph`): ReFiT sampling and evaluation."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ...runtime.cudagraph import Forward, GraphedPolicy, ReverseSampler, graph_autocast
from .recommender import SEQ_KS, evaluate_dreamrec


class GraphedSeqRecommender(GraphedPolicy):
    """A :class:`refit.families.dreamrec.recommender.SeqRecommender` (DreamRec) whose ReFiT sampling (:meth:`sample`) and
    evaluation sampler (:meth:`generate`, :meth:`scores`, :meth:`evaluate`) replay CUDA graphs.

    :meth:`generate` runs the step-by-step guided sampler (``fast=False`` of
    :meth:`SeqRecommender.generate`, whose embeddings it equals); the eager default folds the
    mlp1 denoiser's linear algebra instead, which agrees up to float32 rounding.
    """

    def _forward(self) -> Forward:
        model, w, precision = self.policy.model, self.policy.w, self.policy.precision

        def forward(x, t, cond):
            with graph_autocast(precision, x.device):
                out = model.guided(x, cond[0], t, w)
            return out.float()

        return forward

    def _run(self, key, diffusion, h, x_T, capacity, generator, rows, temperature, trajectory):
        B, D = x_T.shape
        sampler = self._sampler((key,), max(B, capacity or 0), lambda n: ReverseSampler(
            diffusion, self._forward(), n, D, device=x_T.device, cond_like=(h,), noise=True, trajectory=trajectory,
            use_graph=self.use_graph))
        return sampler(x_T, (h,), generator=generator, rows=rows, temperature=temperature)

    def sample(self, users: torch.Tensor, inputs, *, generator: Optional[torch.Generator] = None,
               temperature: float = 1.0, rows=None, keep_graph: bool = False):
        """As :meth:`SeqRecommender.sample` (same trajectories for the same generator), from a graph."""
        rec = self.policy
        if keep_graph or rec.model.training:
            return rec.sample(users, inputs, generator=generator, temperature=temperature, rows=rows,
                              keep_graph=keep_graph)
        history, lengths = inputs
        with torch.no_grad():
            h = rec.guidance(history, lengths)
        x_T = rec.start_noise(h.shape[0], generator, rows)  # the first draw, as sample_from makes it
        return self._run("sample", rec.diffusion, h, x_T, self.batch_size, generator, rows, temperature, True)

    @torch.no_grad()
    def generate(self, history: torch.Tensor, lengths: torch.Tensor, generator: Optional[torch.Generator] = None,
                 fast: Optional[bool] = None) -> torch.Tensor:
        """(B, D) generated embeddings, as ``SeqRecommender.generate(..., fast=False)``, from a graph."""
        rec = self.policy
        was = rec.model.training
        rec.model.eval()
        try:
            h = rec.guidance(history, lengths)
            x_T = rec.start_noise(h.shape[0], generator)
            return self._run("generate", rec._eval_diffusion, h, x_T, self.eval_batch_size, generator, None, 1.0,
                             False)
        finally:
            rec.model.train(was)

    @torch.no_grad()
    def scores(self, history: torch.Tensor, lengths: torch.Tensor, generator: Optional[torch.Generator] = None,
               include_padding: bool = False) -> torch.Tensor:
        x = self.generate(history, lengths, generator)
        return self.policy.model.item_scores(x, include_padding=include_padding).float()

    def evaluate(self, data, *, ks=None, batch_size: int = 2048, seed: int = 0) -> Dict[str, Dict[str, float]]:
        return evaluate_dreamrec(self, data, ks=ks or SEQ_KS, batch_size=batch_size, seed=seed)


__all__ = ["GraphedSeqRecommender"]
