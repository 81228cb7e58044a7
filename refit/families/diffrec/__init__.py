"""DiffRec and CF-Diff: denoisers of a user's whole interaction row.

- :mod:`~refit.families.diffrec.mlp` (DiffRec's MLP) and :mod:`~refit.families.diffrec.cfdiff` (CF-Diff's
  cross-attention to the 1- to 3-hop neighbourhood), named in :mod:`~refit.families.diffrec.denoisers`;
- :mod:`~refit.families.diffrec.recommender`: :class:`RowRecommender`, a denoiser with its diffusion and
  DiffRec's inference (the policy that ReFiT fine-tunes);
- :mod:`~refit.families.diffrec.pretrain`: :class:`PretrainConfig` (``refit pretrain``'s flags), the ELBO
  pretraining run and the checkpoint loader;
- :mod:`~refit.families.diffrec.graphed`: the policy with its reverse passes in CUDA graphs.

Both register here as families (:mod:`refit.families`).
"""

from __future__ import annotations

from ..registry import Family, register
from .denoisers import MODELS, CFDiff, DiffRecMLP, build_model
from .graphed import GraphedRowRecommender
from . import pretrain as _pretraining  # the module keeps its name: the package does not re-export pretrain()
from .pretrain import SELECTION_METRIC, PretrainConfig, load_recommender
from .recommender import RowRecommender

for _name, _help in (("diffrec", "DiffRec's MLP denoiser of the interaction row"),
                     ("cfdiff", "CF-Diff: DiffRec with cross-attention to the 1- to 3-hop neighbourhood")):
    register(Family(name=_name, config=PretrainConfig, pretrain=_pretraining.pretrain, load=load_recommender,
                    data_kind="interactions", policy_type=RowRecommender, graphed=GraphedRowRecommender, help=_help))

__all__ = ["RowRecommender", "PretrainConfig", "load_recommender", "GraphedRowRecommender", "MODELS",
           "build_model", "DiffRecMLP", "CFDiff", "SELECTION_METRIC"]
