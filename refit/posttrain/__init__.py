"""Post-training: fine-tuning a pretrained diffusion recommender with rewards.

- :mod:`~refit.posttrain.config`: :class:`FinetuneConfig`, whose fields are ``refit finetune``'s flags;
- :mod:`~refit.posttrain.trainer`: :class:`ReFiT`, one run's policy, episodes, optimiser and controls;
- :mod:`~refit.posttrain.run`: :func:`finetune` (the run folder, resume, evaluation, the summary) and
  :func:`load_policy` (any refit checkpoint as a policy);
- :mod:`~refit.posttrain.report`: the summary of the diagnostics, and the plot;
- the methods, each a strategy of the trainer (below).

A method decides what one iteration does: which episodes and samples it
draws, what loss it builds from them, and which diagnostics it logs. The
trainer (:class:`refit.posttrain.trainer.ReFiT`) owns everything the methods share: the
episodes and their generator, the optimiser and its update (gradient
averaging under torchrun, clipping), the anchors, the probe, checkpoints,
resume and the controls. A method registers itself under its ``name`` with
:func:`register`; ``FinetuneConfig(method=name)`` then selects it, and
``refit finetune --method NAME`` offers it.

The methods: ``reinforce`` and ``grpo`` (:mod:`refit.posttrain.policy_gradient`), ``reward-weighted``
and ``offline-reward-weighted`` (:mod:`refit.posttrain.reward_weighted`), ``reward-backprop``
(:mod:`refit.posttrain.reward_backprop`) and ``nft`` (:mod:`refit.posttrain.nft`). What they share
(rows of an iteration, the controls' shuffles, the baseline, their weights) is in
:mod:`refit.posttrain.common`. Adding a method is a module here with one registered class (and its
config fields on :class:`refit.posttrain.config.FinetuneConfig`).
"""

from .base import METHOD_CLASSES, PostTrainingMethod, register  # noqa: E402

# Registered in this order (refit finetune --method lists them so).
from . import policy_gradient, reward_weighted, reward_backprop, nft  # noqa: E402,F401,I001
# After the methods: the config's choices are the registered methods.
from .config import FinetuneConfig  # noqa: E402
from .trainer import ReFiT  # noqa: E402
from .run import finetune, load_policy  # noqa: E402

__all__ = ["PostTrainingMethod", "METHOD_CLASSES", "register", "FinetuneConfig", "ReFiT", "finetune", "load_policy"]
