"""Shared test setup.

Without a GPU, the Triton kernels run in Triton's interpreter: the variable
must be set before triton is first imported, hence here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests compare runs bit for bit (a resumed run against an uninterrupted one), and torch's reductions
# round differently on different thread counts: the thread governor of training loops, which follows
# the machine's load, stays off here (tests/test_threads.py tests it with measurements of its own).
os.environ.setdefault("REFIT_ADAPT_THREADS", "0")
