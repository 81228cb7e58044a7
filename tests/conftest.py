"""Shared test setup.

Without a GPU, the Triton kernels run in Triton's interpreter: the variable
must be set before triton is first imported, hence here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
