"""Runs under ``torchrun --nproc_per_node 2`` for tests/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_worker.py OUT PRETRAINED DREAMREC

Every rank runs the same scenarios (the collectives need all of them); rank 0
saves what the test compares with a single process into OUT/results.pt.
The scenarios' settings come from tests/_dist_cases.py, which the test
uses for its single-process side too.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _dist_cases as cases  # noqa: E402

from refit.runtime import distributed as dist  # noqa: E402


def threads() -> int:
    """OS threads of this process (Linux), -1 where /proc is not there."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def main() -> int:
    out, pretrained, dreamrec = sys.argv[1], sys.argv[2], sys.argv[3]
    start = {"diffrec": pretrained, "dreamrec": dreamrec}
    before = threads()
    info = dist.init()
    assert info.distributed and info.world_size == 2 and info.backend == "gloo", info
    results = {"world": (info.rank, info.world_size, info.backend)}
    results["evaluate"] = cases.evaluation(pretrained)
    results["similar"] = cases.similar_users()
    results["batches"] = cases.sharded_batches(info.rank, info.world_size)
    results["finetune"] = {name: cases.finetune_step(start[cases.family(name)], name) for name in cases.FINETUNE_CASES}
    results["pretrain"] = cases.pretrain_run(os.path.join(out, "pretrain"))
    results["dreamrec_pretrain"] = cases.dreamrec_pretrain_run(os.path.join(out, "dreamrec"))
    results["average"] = cases.average_gradients_case(info.rank)
    gathered = dist.all_gather_rows(torch.tensor([[info.rank, info.rank * 10]]))
    results["gather"] = gathered
    during = threads()
    dist.shutdown()
    # Leaving the group joined its worker threads: none is left to run during interpreter exit.
    results["threads"] = {"before_init": before, "while_joined": during, "after_shutdown": threads()}
    if info.rank == 0:
        torch.save(results, os.path.join(out, "results.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
