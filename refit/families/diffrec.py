"""DiffRec and CF-Diff: denoisers of a user's whole interaction row (:mod:`refit.models`), pretrained with
the ELBO (:func:`refit.pretrain.pretrain`) and ranked by :class:`refit.recommender.Recommender`."""

from __future__ import annotations

from ..runtime.cudagraph import GraphedRecommender
from ..pretrain import PretrainConfig, load_recommender, pretrain
from ..recommender import Recommender
from .registry import Family, register

for _name, _help in (("diffrec", "DiffRec's MLP denoiser of the interaction row"),
                     ("cfdiff", "CF-Diff: DiffRec with cross-attention to the 1- to 3-hop neighbourhood")):
    register(Family(name=_name, config=PretrainConfig, pretrain=pretrain, load=load_recommender,
                    data_kind="interactions", policy_type=Recommender, graphed=GraphedRecommender, help=_help))
