"""From records to the split: ``refit.data._build`` against a plain per-user construction.

The builder codes ids without sorting, detects duplicates with one sort and
builds each split's CSR straight from the time order; the reference below does
each step the obvious way (dicts and per-user lists) on small inputs.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refit.data as data_module
from refit.data import _build, _Records


def _reference(users, items, ratings, times, *, min_rating, split, split_mode, seed):
    """(user_ids, item_ids, [dense train/valid/test], [dense ratings or None], summary counts)."""
    n = len(users)
    latest = {}
    for k in range(n):
        when = (times[k] if times is not None else 0, k)
        pair = (users[k], items[k])
        if pair not in latest or when > latest[pair][0]:
            latest[pair] = (when, k)
    kept = sorted(k for _, k in latest.values())
    n_dup = n - len(kept)
    n_low = 0
    if ratings is not None and min_rating is not None:
        n_low = sum(ratings[k] < min_rating for k in kept)
        kept = [k for k in kept if not ratings[k] < min_rating]
    user_ids = sorted({users[k] for k in kept})
    item_ids = sorted({items[k] for k in kept})
    u_of = {x: j for j, x in enumerate(user_ids)}
    i_of = {x: j for j, x in enumerate(item_ids)}
    if split_mode == "time":
        key = {k: ((times[k] if times is not None else 0), k) for k in kept}
    else:
        perm = np.random.default_rng(seed).permutation(len(kept))
        key = {k: (int(perm[j]), k) for j, k in enumerate(kept)}
    total = float(sum(split))
    f0, f1 = split[0] / total, split[1] / total
    dense = [np.zeros((len(user_ids), len(item_ids)), np.float32) for _ in range(3)]
    rated = [np.zeros((len(user_ids), len(item_ids)), np.float32) for _ in range(3)]
    by_user = {}
    for k in kept:
        by_user.setdefault(users[k], []).append(k)
    for user, ks in by_user.items():
        ks.sort(key=key.get)
        c1 = math.floor(f0 * len(ks) + 0.5 + 1e-9)
        c2 = math.floor((f0 + f1) * len(ks) + 0.5 + 1e-9)
        for rank, k in enumerate(ks):
            p = 0 if rank < c1 else 1 if rank < c2 else 2
            dense[p][u_of[user], i_of[items[k]]] = 1
            if ratings is not None:
                rated[p][u_of[user], i_of[items[k]]] = np.float32(ratings[k])
    counts = {"read": n, "duplicates": n_dup, "below_min_rating": n_low, "kept": len(kept),
              "users_dropped": len(set(users)) - len(user_ids), "items_dropped": len(set(items)) - len(item_ids)}
    return user_ids, item_ids, dense, (rated if ratings is not None else None), counts


def _check(users, items, ratings, times, **options):
    rec = _Records(np.asarray(users), np.asarray(items), None if ratings is None else np.asarray(ratings),
                   None if times is None else np.asarray(times), np.arange(1, len(users) + 1))
    expect_u, expect_i, dense, rated, counts = _reference(users, items, ratings, times, **options)
    if not counts["kept"]:
        with pytest.raises(ValueError, match="no interaction is left"):
            _build(rec, "t", "t", **options)
        return
    data = _build(rec, "t", "t", **options)
    assert data.user_ids.dtype == np.int64 and data.item_ids.dtype == np.int64
    assert data.user_ids.tolist() == expect_u and data.item_ids.tolist() == expect_i
    for name, value in counts.items():
        assert data.summary[name] == value, name
    for p, split in enumerate(("train", "valid", "test")):
        m = getattr(data, split)
        assert m.dtype == np.float32 and m.has_sorted_indices
        np.testing.assert_array_equal(m.toarray(), dense[p])
        r = getattr(data, f"{split}_ratings")
        if rated is None:
            assert r is None
        else:
            assert r.dtype == np.float32 and r.has_sorted_indices
            np.testing.assert_array_equal(r.indices, m.indices)
            np.testing.assert_array_equal(r.indptr, m.indptr)
            np.testing.assert_array_equal(r.toarray(), rated[p])


def _records(draw_ids, n, rng):
    return [int(x) for x in rng.choice(draw_ids, size=n)]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("ids", ["small", "sparse-int64", "negative"])
def test_build_matches_the_reference(seed, ids):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    pool = {"small": np.arange(1, 40), "sparse-int64": np.array([3, 2 ** 40, -(2 ** 62), 2 ** 62, 7, 2 ** 33]),
            "negative": np.arange(-20, 5)}[ids]
    users, items = _records(pool, n, rng), _records(pool[::-1], n, rng)
    ratings = [float(x) for x in rng.choice([1, 2, 3, 3.5, 4, 4.25, 5], size=n)] if seed % 3 else None
    times = ([int(x) for x in rng.integers(0, 6, size=n)] if seed % 2 else  # many ties
             [float(x) for x in rng.random(n)]) if seed % 4 != 3 else None
    _check(users, items, ratings, times, min_rating=3.5 if seed % 5 else None, split=(0.8, 0.1, 0.1),
           split_mode="time" if seed % 6 else "random", seed=seed)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6), st.sampled_from([1.0, 2.5, 4.0, 5.0]),
                          st.integers(0, 3)), min_size=1, max_size=40),
       st.sampled_from(["time", "random"]), st.sampled_from([None, 2.5, 4.0]),
       st.sampled_from([(0.8, 0.1, 0.1), (1, 0, 0), (0.5, 0.5, 0), (1, 1, 1)]))
def test_build_matches_the_reference_on_any_records(rows, split_mode, min_rating, split):
    users, items, ratings, times = (list(c) for c in zip(*rows))
    _check(users, items, ratings, times, min_rating=min_rating, split=split, split_mode=split_mode, seed=3)


def test_nothing_left_is_refused():
    rec = _Records(np.array([1, 2]), np.array([1, 1]), np.array([1.0, 2.0]), np.array([0, 1]), np.arange(1, 3))
    with pytest.raises(ValueError, match="no interaction is left"):
        _build(rec, "t", "path.data", min_rating=4)


def test_consume_drops_the_records_columns():
    rec = _Records(np.array([1, 2, 2]), np.array([1, 1, 3]), None, np.array([0, 1, 2]), np.arange(1, 4))
    data = _build(rec, "t", "t", min_rating=None, split=(1, 0, 0), consume=True)
    assert rec.users is None and rec.items is None and rec.times is None
    assert data.train.nnz == 3
    kept = _Records(np.array([1, 2, 2]), np.array([1, 1, 3]), None, np.array([0, 1, 2]), np.arange(1, 4))
    _build(kept, "t", "t", min_rating=None, split=(1, 0, 0))
    assert kept.users is not None


@pytest.mark.parametrize("values, dtype", [
    ([1, 2, -3], np.int32), ([2 ** 40, 1], np.int64), ([-(2 ** 31), 2 ** 31 - 1], np.int32),
    ([1.0, 4.0, 978300760.0], np.int32), ([3.5, 4.0], np.float32), ([0.1, 1.0], np.float64),
    ([2.0 ** 31, 1.0], np.float32), ([2.0 ** 31 + 1, 1.0], np.float64), ([-0.0, 1.0], np.int32),
])
def test_columns_are_narrowed_without_losing_a_value(values, dtype):
    wide = np.array(values, dtype=np.float64 if isinstance(values[0], float) else np.int64)
    narrow = data_module._narrow(wide)
    assert narrow.dtype == dtype
    assert np.array_equal(narrow.astype(wide.dtype), wide)


def test_line_runs_give_each_rows_line():
    runs = data_module._LineRuns(np.array([0, 3, 4]), np.array([2, 9, 20]), 6)
    assert [runs[r] for r in range(6)] == runs.tolist() == [2, 3, 4, 9, 20, 21]
    with pytest.raises(IndexError):
        runs[6]
