"""refit_kernels: fused kernels for RL fine-tuning of diffusion recommenders.

Every op has a PyTorch reference and, where built and usable, CPU (C++), CUDA
and Triton implementations of the same contract; a dispatcher picks one per
call (see :mod:`refit_kernels.dispatch`). Importing never fails because a
backend is missing: :func:`available_backends` says what is usable and why not.
"""

from . import _extension  # loads refit_kernels._C first: the ops below attach to it
from .dispatch import BACKENDS, BackendUnavailable, available_backends
from .sparse import CSR, as_csr
from .ops.gaussian_logprob import gaussian_logprob
from .ops.gather_rows import gather_rows
from .ops.topk_hits import TopKHits, topk_hits
from .ops.target_rank import target_rank
from .ops.policy_loss import PolicyLoss, policy_loss

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "CSR",
    "as_csr",
    "available_backends",
    "gaussian_logprob",
    "gather_rows",
    "TopKHits",
    "topk_hits",
    "target_rank",
    "PolicyLoss",
    "policy_loss",
    "__version__",
]
