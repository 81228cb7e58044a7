"""DreamRec and PreferDiff: denoisers of the next item's embedding given the history.

- :mod:`~refit.families.dreamrec.network` (DreamRec's network) and
  :mod:`~refit.families.dreamrec.preferdiff` (PreferDiff's: DreamRec's interface, its own encoder block
  and loss settings);
- :mod:`~refit.families.dreamrec.recommender`: :class:`SeqRecommender`, a network with its diffusion over
  item embeddings and guidance, its sampler and evaluation (the policy that ReFiT fine-tunes);
- :mod:`~refit.families.dreamrec.losses`: the training losses;
- :mod:`~refit.families.dreamrec.pretrain`: :class:`DreamRecConfig` and :class:`PreferDiffConfig`
  (``refit pretrain``'s flags), the pretraining run, the guidance choice and the checkpoint loader;
- :mod:`~refit.families.dreamrec.graphed`: the policy with its reverse passes in CUDA graphs.

Both register here as families (:mod:`refit.families`). Both record ``"dreamrec"`` as their checkpoints'
model name; the loader rebuilds either network.
"""

from __future__ import annotations

from ..registry import Family, register
from .graphed import GraphedSeqRecommender
from .network import DreamRec
from .preferdiff import PreferDiff
from .pretrain import DreamRecConfig, PreferDiffConfig, load_seq_recommender, pretrain_dreamrec
from .recommender import SEQ_KS, SEQ_SELECTION, SeqRecommender, evaluate_dreamrec, select_guidance

register(Family(name="dreamrec", config=DreamRecConfig, pretrain=pretrain_dreamrec, load=load_seq_recommender,
                data_kind="sequences", policy_type=SeqRecommender, graphed=GraphedSeqRecommender,
                evaluate=evaluate_dreamrec, help="DreamRec: guided denoising of the next item's embedding"))
register(Family(name="preferdiff", config=PreferDiffConfig, pretrain=pretrain_dreamrec, load=load_seq_recommender,
                data_kind="sequences", checkpoint_name="dreamrec", evaluate=evaluate_dreamrec,
                help="PreferDiff: DreamRec with a preference loss"))

__all__ = ["SeqRecommender", "DreamRecConfig", "PreferDiffConfig", "pretrain_dreamrec", "load_seq_recommender",
           "evaluate_dreamrec", "select_guidance", "GraphedSeqRecommender", "DreamRec", "PreferDiff", "SEQ_KS",
           "SEQ_SELECTION"]
