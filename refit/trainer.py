"""Former home of the post-training run, kept so that code importing from here keeps working:
every name is :mod:`refit.posttrain`'s (config, trainer, run, report and the methods' shared helpers).
New code imports from :mod:`refit.posttrain`."""

from .posttrain import FinetuneConfig, ReFiT, finetune, load_policy  # noqa: F401
from .posttrain.common import (Baseline, group_weights, rating_weights, reinforce_loss,  # noqa: F401
                               trajectory_logprob)
from .posttrain.config import (ANCHORS, BASELINES, GROUP_SIZE, LR_SCHEDULES, METHODS,  # noqa: F401
                               RW_LAMBDA)

__all__ = ["FinetuneConfig", "ReFiT", "finetune", "load_policy", "Baseline", "group_weights", "rating_weights",
           "reinforce_loss", "trajectory_logprob", "ANCHORS", "BASELINES", "GROUP_SIZE", "LR_SCHEDULES", "METHODS",
           "RW_LAMBDA"]
