"""ML-1M for the GPU check: DiffRec's published split when it is at hand, else a stand-in of its size.

The lent GPU machine receives the repository and nothing beside it, so
``../shared/data`` is not there. The timings of the kernels, the evaluation
and a ReFiT iteration depend on the shapes and the number of interactions,
not on who watched what, so a stand-in with the published sizes serves:
5,949 users x 2,810 items; 403,277 train, 110,722 valid and 57,532 test
pairs, drawn without repetition with a Zipf-like item popularity and
log-normal user activity (seeded).

    python -m benchmarks.gpu.gpu_data DIR [--standin]

prints the folder that holds ``ml-1m_clean`` (``$REFIT_DATA`` or
``../shared/data`` when the real split is there, else DIR, where the
stand-in is written as DiffRec's ``{train,valid,test}_list.npy``; always
with ``--standin``); the script exports it as ``REFIT_DATA``.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from benchmarks.paths import ROOT

N_USERS, N_ITEMS = 5949, 2810
SPLITS = {"train": 403_277, "valid": 110_722, "test": 57_532}


def real_data_root():
    """The folder holding the real ``ml-1m_clean``, or None."""
    for root in (os.environ.get("REFIT_DATA"), os.path.join(ROOT, "..", "shared", "data")):
        if root and os.path.exists(os.path.join(root, "ml-1m_clean", "test_list.npy")):
            return os.path.abspath(root)
    return None


def standin_pairs(seed: int = 0) -> dict:
    """{split: (n, 2) int64 (user, item) pairs} of the published sizes, no pair in two splits."""
    rng = np.random.default_rng(seed)
    total = sum(SPLITS.values())
    item_p = 1.0 / (np.arange(N_ITEMS) + 10.0) ** 0.9
    item_p = rng.permutation(item_p / item_p.sum())
    user_p = rng.lognormal(0.0, 1.0, N_USERS)
    user_p /= user_p.sum()
    keys = np.empty(0, dtype=np.int64)
    draw = int(total * 1.5)
    while keys.size < total:
        u = rng.choice(N_USERS, size=draw, p=user_p)
        i = rng.choice(N_ITEMS, size=draw, p=item_p)
        keys = np.concatenate([keys, u.astype(np.int64) * N_ITEMS + i])
        _, first = np.unique(keys, return_index=True)
        keys = keys[np.sort(first)]  # unique, in the order first drawn
        draw *= 2
    keys = rng.permutation(keys[:total])
    # The train split (the first keys) holds the last user and the last item, so every reader
    # sizes the matrices as 5,949 x 2,810.
    present = set(keys.tolist())
    for pos, hit, fallback in ((0, keys // N_ITEMS == N_USERS - 1, (N_USERS - 1) * N_ITEMS),
                               (1, keys % N_ITEMS == N_ITEMS - 1, N_ITEMS - 1)):
        found = np.flatnonzero(hit)
        if found.size:
            keys[[pos, found[0]]] = keys[[found[0], pos]]
        else:
            key = fallback
            while key in present:
                key += 1
            keys[pos] = key
            present.add(key)
    out, start = {}, 0
    for name, n in SPLITS.items():
        part = keys[start:start + n]
        start += n
        out[name] = np.stack([part // N_ITEMS, part % N_ITEMS], axis=1).astype(np.int64)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    standin = "--standin" in argv
    argv = [a for a in argv if a != "--standin"]
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: python -m benchmarks.gpu.gpu_data DIR [--standin]", file=sys.stderr)
        return 2
    real = None if standin else real_data_root()
    if real is not None:
        print(real)
        print(f"gpu_data: DiffRec's published ML-1M split from {real}", file=sys.stderr)
        return 0
    folder = os.path.join(argv[0], "ml-1m_clean")
    os.makedirs(folder, exist_ok=True)
    for name, pairs in standin_pairs().items():
        np.save(os.path.join(folder, f"{name}_list.npy"), pairs)
    print(os.path.abspath(argv[0]))
    print("gpu_data: the real ML-1M split is not here: a stand-in of its size "
          f"({N_USERS} users x {N_ITEMS} items; " + ", ".join(f"{k} {v}" for k, v in SPLITS.items()) + ")",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
