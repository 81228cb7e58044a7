"""DreamRec and PreferDiff: denoisers of the next item's embedding given the history
(:mod:`refit.sequential`); both record ``"dreamrec"`` as their checkpoints' model name, and its loader
rebuilds either network."""

from __future__ import annotations

from ..runtime.cudagraph import GraphedSeqRecommender
from ..sequential import DreamRecConfig, PreferDiffConfig, SeqRecommender, load_seq_recommender, pretrain_dreamrec
from .registry import Family, register

register(Family(name="dreamrec", config=DreamRecConfig, pretrain=pretrain_dreamrec, load=load_seq_recommender,
                data_kind="sequences", policy_type=SeqRecommender, graphed=GraphedSeqRecommender,
                help="DreamRec: guided denoising of the next item's embedding"))
register(Family(name="preferdiff", config=PreferDiffConfig, pretrain=pretrain_dreamrec, load=load_seq_recommender,
                data_kind="sequences", checkpoint_name="dreamrec", help="PreferDiff: DreamRec with a preference loss"))
