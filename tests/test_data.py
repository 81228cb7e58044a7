"""refit.data: every loader on small files written here (broken ones too), the split, the batches."""

import importlib.util
import logging
import os
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from _testing import shared_dataset
import refit.data as data_module
from refit.data import DataFormatError, DataOptionsError, InteractionData, UserBatches, load_dataset


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def check_well_formed(d: InteractionData):
    """The invariants every loader guarantees."""
    for name in ("train", "valid", "test"):
        m = getattr(d, name)
        assert isinstance(m, sp.csr_matrix) and m.dtype == np.float32, name
        assert m.shape == (d.n_users, d.n_items), name
        assert m.has_sorted_indices and m.has_canonical_format, name
        assert np.all(m.data == 1), name
    assert d.train.multiply(d.valid).nnz == 0 and d.train.multiply(d.test).nnz == 0
    assert d.valid.multiply(d.test).nnz == 0
    assert len(d.user_ids) == d.n_users and len(d.item_ids) == d.n_items


def pairs(m: sp.csr_matrix, d: InteractionData):
    """The matrix's (original user, original item) pairs."""
    coo = m.tocoo()
    return sorted(zip(d.user_ids[coo.row].tolist(), d.item_ids[coo.col].tolist()))


# --- raw MovieLens ratings -----------------------------------------------------------------

# User 10 rates 10 items at times 1..10 (all >= 4), listed out of order; user 20 has one
# low rating, one duplicate (re-rated later) and 4 good ones; user 30 only low ratings.
ML_ROWS = (
    [(10, 100 + t, 5, t) for t in (3, 1, 2, 10, 9, 8, 4, 5, 7, 6)]
    + [(20, 500, 2, 50), (20, 501, 4, 51), (20, 502, 4, 52), (20, 503, 5, 53), (20, 504, 4, 54),
       (20, 501, 5, 60), (30, 100, 1, 5), (30, 101, 3, 6)]
)


def test_ratings_dat_time_split_and_filtering(tmp_path, caplog):
    path = write(tmp_path / "ratings.dat", "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ML_ROWS))
    with caplog.at_level(logging.INFO, logger="refit.data"):
        d = load_dataset(path)
    check_well_formed(d)
    # Dense re-indexing; user 30 has nothing left, items 100 and 500 only had low ratings.
    assert d.user_ids.tolist() == [10, 20] and d.n_users == 2
    assert d.item_ids.tolist() == list(range(101, 111)) + [501, 502, 503, 504]
    assert d.user_index([20, 10]).tolist() == [1, 0]
    with pytest.raises(KeyError):
        d.user_index([30])
    # User 10: 10 interactions -> 7 train (times 1..7), 1 valid (8), 2 test (9, 10).
    assert [i for u, i in pairs(d.train, d) if u == 10] == [101, 102, 103, 104, 105, 106, 107]
    assert [i for u, i in pairs(d.valid, d) if u == 10] == [108]
    assert [i for u, i in pairs(d.test, d) if u == 10] == [109, 110]
    # User 20: 4 kept, 501 by its latest rating (time 60, so it is the last) ->
    # round(2.8) = 3 train, round(3.2) - 3 = 0 valid, 1 test.
    assert [i for u, i in pairs(d.train, d) if u == 20] == [502, 503, 504]
    assert [i for u, i in pairs(d.test, d) if u == 20] == [501]
    assert d.summary == {"read": 18, "duplicates": 1, "below_min_rating": 3, "users_dropped": 1,
                         "items_dropped": 2, "kept": 14, "train": 10, "valid": 1, "test": 3}
    text = caplog.text
    assert "read 18 interactions" in text and "1 duplicate" in text and "3 ratings below 4" in text
    assert "1 users and 2 items with nothing left" in text


def test_duplicate_keeps_the_latest_rating(tmp_path):
    # Re-rated from 5 to 2 later: the pair is dropped by the rating filter, not kept from the first.
    path = write(tmp_path / "ratings.dat", "1::7::5::10\n1::8::5::11\n1::7::2::20\n")
    d = load_dataset(path, split=(1, 0, 0))
    assert pairs(d.train, d) == [(1, 8)]
    assert d.summary["duplicates"] == 1 and d.summary["below_min_rating"] == 1


def test_min_rating_and_random_split_options(tmp_path):
    path = write(tmp_path / "ratings.dat", "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ML_ROWS))
    everything = load_dataset(path, min_rating=None)
    assert everything.summary["below_min_rating"] == 0 and everything.n_users == 3
    a = load_dataset(path, split_mode="random", seed=1)
    b = load_dataset(path, split_mode="random", seed=1)
    assert pairs(a.test, a) == pairs(b.test, b)
    check_well_formed(a)
    # Same sizes per user as the time split, other items.
    t = load_dataset(path)
    assert a.train.getnnz(axis=1).tolist() == t.train.getnnz(axis=1).tolist()
    seeds = {tuple(pairs(load_dataset(path, split_mode="random", seed=s).test, t)) for s in range(6)}
    assert len(seeds) > 1
    with pytest.raises(ValueError, match="split_mode"):
        load_dataset(path, split_mode="chrono")
    with pytest.raises(ValueError, match="split"):
        load_dataset(path, split=(0.7, 0.3))
    with pytest.raises(TypeError, match="unknown options.*n_items"):
        load_dataset(path, n_items=5)


def test_u_data_with_declared_ranges(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    write(folder / "u.data", "1\t1\t5\t100\n2\t3\t4\t101\n1\t2\t4\t102\n")
    write(folder / "u.info", "2 users\n3 items\n3 ratings\n")
    d = load_dataset(str(folder))
    assert d.n_users == 2 and d.n_items == 3
    write(folder / "u.data", "1\t1\t5\t100\n2\t3\t4\t101\n1\t4\t4\t102\n")
    with pytest.raises(DataFormatError, match=r"u\.data, line 3: item id 4 is outside the declared range 1\.\.3"):
        load_dataset(str(folder))


@pytest.mark.parametrize("name,text,line,msg", [
    ("wrong-column-count", "1::2::5::10\n1::3::5\n", 2, "expected 4 fields"),
    ("non-numeric-id", "1::2::5::10\n\n1::x3::5::11\n", 3, "item id must be an integer, got 'x3'"),
    ("float-id", "1.5::2::5::10\n", 1, "user id must be an integer"),
    ("bad-rating", "1::2::five::10\n", 1, "rating must be a number"),
    ("nan-time", "1::2::5::10\n1::3::5::nan\n", 2, "timestamp must be finite"),
    ("tab-in-dat", "1::2::5::10\n1\t3\t5\t10\n", 2, "expected 4 fields"),
])
def test_malformed_ratings_name_file_and_line(tmp_path, name, text, line, msg):
    path = write(tmp_path / "ratings.dat", text)
    with pytest.raises(DataFormatError, match=msg) as info:
        load_dataset(path)
    assert info.value.path == path and info.value.line == line
    assert f"ratings.dat, line {line}:" in str(info.value)


def test_empty_files(tmp_path):
    path = write(tmp_path / "ratings.dat", "")
    with pytest.raises(DataFormatError, match="ratings.dat.*empty"):
        load_dataset(path)
    path = write(tmp_path / "u.data", "\n\n")
    with pytest.raises(DataFormatError, match="u.data.*(empty|no data rows)"):
        load_dataset(path)
    path = write(tmp_path / "x.inter", "")
    with pytest.raises(DataFormatError, match="x.inter, line 1: the file is empty"):
        load_dataset(path)
    path = write(tmp_path / "y.inter", "user_id:token\titem_id:token\n")
    with pytest.raises(DataFormatError, match="no data rows"):
        load_dataset(path)


# --- RecBole atomic files ----------------------------------------------------------------------

INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
    f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ML_ROWS)


def test_recbole_inter_matches_ratings_dat(tmp_path):
    a = load_dataset(write(tmp_path / "d.inter", INTER))
    b = load_dataset(write(tmp_path / "ratings.dat", "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ML_ROWS)))
    for split in ("train", "valid", "test"):
        assert pairs(getattr(a, split), a) == pairs(getattr(b, split), b)
    # A folder named after its .inter file.
    folder = tmp_path / "shop"
    folder.mkdir()
    write(folder / "shop.inter", INTER)
    write(folder / "other.inter", "junk")
    assert load_dataset(str(folder)).summary == a.summary


def test_recbole_without_rating_and_time(tmp_path, caplog):
    path = write(tmp_path / "d.inter", "item_id:token\tuser_id:token\n5\t1\n6\t1\n7\t1\n8\t2\n")
    with caplog.at_level(logging.WARNING, logger="refit.data"):
        d = load_dataset(path, split=(2, 1, 1))
    assert "file order" in caplog.text
    assert pairs(d.train, d) == [(1, 5), (1, 6), (2, 8)]  # round(0.5 * 3) = 2 (halves up)
    assert pairs(d.valid, d) == [] and pairs(d.test, d) == [(1, 7)]


def test_recbole_with_other_columns(tmp_path):
    text = "user_id:token\titem_id:token\treview:token_seq\ttimestamp:float\n1\t2\tgood film\t5\n1\t3\tmeh\t4\n"
    d = load_dataset(write(tmp_path / "d.inter", text), split=(1, 0, 1))
    assert pairs(d.train, d) == [(1, 3)] and pairs(d.test, d) == [(1, 2)]
    with pytest.raises(DataFormatError, match=r"d2\.inter, line 4: item_id must be an integer"):
        load_dataset(write(tmp_path / "d2.inter", text + "1\tfour\tx\t6\n"))
    with pytest.raises(DataFormatError, match=r"line 2: expected 4 tab-separated fields"):
        load_dataset(write(tmp_path / "d3.inter", text.replace("good film\t", "")))


@pytest.mark.parametrize("text,line,msg", [
    ("user:token\titem_id:token\n1\t2\n", 1, "no user_id field"),
    ("user_id\titem_id:token\n1\t2\n", 1, "not name:type"),
    ("user_id:token\titem_id:token\n1\t2\n3\n", 3, "expected 2 fields"),
    ("user_id:token\titem_id:token\n1\t2\nu3\t4\n", 3, "user_id must be an integer"),
])
def test_malformed_inter(tmp_path, text, line, msg):
    path = write(tmp_path / "bad.inter", text)
    with pytest.raises(DataFormatError, match=msg) as info:
        load_dataset(path)
    assert info.value.line == line and info.value.path == path


# --- DiffRec splits ---------------------------------------------------------------------------

def write_diffrec(folder, train, valid, test):
    folder.mkdir(exist_ok=True)
    for name, a in (("train", train), ("valid", valid), ("test", test)):
        np.save(folder / f"{name}_list.npy", np.asarray(a))
    return str(folder)


def test_diffrec_folder(tmp_path, caplog):
    folder = write_diffrec(tmp_path / "d", [[0, 0], [0, 1], [2, 3], [2, 3]], [[0, 2]], [[1, 4]])
    with caplog.at_level(logging.INFO, logger="refit.data"):
        d = load_dataset(folder)
    check_well_formed(d)
    assert (d.n_users, d.n_items) == (3, 5)
    assert d.train.toarray().tolist() == [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0]]
    assert d.summary["duplicates"] == 1 and "1 duplicate" in caplog.text
    d = load_dataset(folder, n_users=10, n_items=6)
    assert (d.n_users, d.n_items) == (10, 6)


@pytest.mark.parametrize("case,arrays,options,msg", [
    ("item-outside-declared", ([[0, 0], [1, 7]], [[0, 1]], [[1, 2]]), dict(n_items=5),
     r"train_list\.npy, row 1: item id 7 is outside the declared range 0\.\.4"),
    ("negative", ([[0, 0]], [[0, -1]], [[1, 2]]), {}, r"valid_list\.npy, row 0: negative id"),
    ("shape", ([[0, 0, 1]], [[0, 1]], [[1, 2]]), {}, r"train_list\.npy: expected an \(n, 2\) array"),
    ("float", ([[0.0, 1.0]], [[0, 1]], [[1, 2]]), {}, r"train_list\.npy: expected integer ids"),
    ("empty", (np.zeros((0, 2), dtype=np.int64), [[0, 1]], [[1, 2]]), {}, r"train_list\.npy: the array has no pairs"),
])
def test_bad_diffrec_files(tmp_path, case, arrays, options, msg):
    folder = write_diffrec(tmp_path / case, *arrays)
    with pytest.raises(DataFormatError, match=msg):
        load_dataset(folder, **options)


def test_not_an_npy_file(tmp_path):
    folder = write_diffrec(tmp_path / "d", [[0, 0]], [[0, 1]], [[1, 2]])
    write(os.path.join(folder, "test_list.npy"), "user,item\n1,2\n")
    with pytest.raises(DataFormatError, match=r"test_list\.npy: not a NumPy \.npy array"):
        load_dataset(folder)
    with pytest.raises(TypeError, match="min_rating"):
        load_dataset(write_diffrec(tmp_path / "e", [[0, 0]], [[0, 1]], [[1, 2]]), min_rating=3)


@pytest.mark.skipif(shared_dataset() is None, reason="the ML-1M split is not in ../shared/data (or $REFIT_DATA)")
def test_ml1m_published_counts():
    d = load_dataset(shared_dataset())
    check_well_formed(d)
    assert (d.n_users, d.n_items) == (5949, 2810)
    assert (d.train.nnz, d.valid.nnz, d.test.nnz) == (403277, 110722, 57532)


# --- built-in data sets --------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("recbole") is None,
                    reason="recbole is not installed (pip install --no-deps recbole==1.2.1 provides ML-100K)")
def test_movielens_100k_from_recbole():
    d = load_dataset("movielens-100k")
    check_well_formed(d)
    assert d.summary["read"] == 100000
    # 55,375 ratings of 4 or 5 in ML-100K, by 942 of its 943 users on 1,447 of its 1,682 items.
    assert d.summary["kept"] == 55375 and (d.n_users, d.n_items) == (942, 1447)
    assert d.train.nnz + d.valid.nnz + d.test.nnz == 55375


def test_movielens_100k_says_how_to_get_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "recbole" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps recbole"):
        load_dataset("movielens-100k")


def test_unknown_name():
    with pytest.raises(FileNotFoundError, match="synthetic"):
        load_dataset("movielens-1t")


def test_synthetic_is_seeded_and_learnable():
    from refit.similarity import neighbor_profiles, top_similar_users

    a, b, c = load_dataset("synthetic"), load_dataset("synthetic"), load_dataset("synthetic", seed=1)
    check_well_formed(a)
    assert (a.train != b.train).nnz == 0 and (a.test != b.test).nnz == 0
    assert (a.train != c.train).nnz > 0
    small = load_dataset("synthetic", n_users=50, n_items=40, mean_interactions=8)
    assert small.n_users == 50 and small.n_items <= 40
    # Popularity skew: the top 10% of items hold well over 10% of the interactions.
    counts = np.sort(np.asarray(a.train.sum(0)).ravel())[::-1]
    assert counts[: len(counts) // 10].sum() > 0.2 * counts.sum()
    # Taste structure: neighbors' items predict the held-out items far better than popularity.
    def recall20(score):
        score = score.clone()
        score[torch.from_numpy(a.train.toarray()) > 0] = -np.inf
        top = torch.topk(score, 20).indices
        held = torch.from_numpy(a.test.toarray()) > 0
        n = held.sum(1)
        return (held.gather(1, top).sum(1)[n > 0] / n[n > 0]).mean().item()
    knn = recall20(neighbor_profiles(a.train, top_similar_users(a.train, 20)).double())
    pop = recall20(torch.from_numpy(np.asarray(a.train.sum(0))).double().expand(a.n_users, -1))
    rand = recall20(torch.rand(a.n_users, a.n_items, generator=torch.Generator().manual_seed(0)).double())
    assert knn > 1.5 * pop and pop > 2 * rand, (knn, pop, rand)


# --- batches ------------------------------------------------------------------------------------

def test_batches_cover_every_user_once_per_epoch():
    d = load_dataset("synthetic", n_users=103, n_items=50, mean_interactions=6)
    loader = d.batches(16, seed=3)
    assert len(loader) == 7
    dense = torch.from_numpy(d.train.toarray())
    orders = []
    for _ in range(2):
        seen = []
        for ids, rows in loader:
            assert rows.shape == (ids.shape[0], 50) and rows.dtype == torch.float32
            assert torch.equal(rows, dense[ids])
            seen.append(ids)
        seen = torch.cat(seen)
        assert sorted(seen.tolist()) == list(range(103))
        orders.append(seen)
    assert not torch.equal(orders[0], orders[1]), "each epoch has its own order"
    again = d.batches(16, seed=3)
    assert torch.equal(torch.cat([i for i, _ in again]), orders[0]), "the same seed repeats"
    again.set_epoch(1)
    assert torch.equal(torch.cat([i for i, _ in again]), orders[1])
    assert torch.equal(torch.cat([i for i, _ in d.batches(16, shuffle=False)]), torch.arange(103))


def test_batches_reuse_one_buffer():
    d = load_dataset("synthetic", n_users=40, n_items=30, mean_interactions=6)
    loader = d.batches(16, reuse_out=True, dtype=torch.bfloat16, split="test")
    dense = torch.from_numpy(d.test.toarray()).to(torch.bfloat16)
    ptrs = set()
    sizes = []
    for ids, rows in loader:
        ptrs.add(rows.data_ptr())
        sizes.append(ids.shape[0])
        assert rows.dtype == torch.bfloat16 and torch.equal(rows, dense[ids])
    assert len(ptrs) == 1 and sizes == [16, 16, 8]
    assert [i.shape[0] for i, _ in d.batches(16, drop_last=True)] == [16, 16]
    only = d.batches(4, users=[5, 1, 7], shuffle=False)
    assert [i.tolist() for i, _ in only] == [[5, 1, 7]]
    with pytest.raises(IndexError, match="users"):
        d.batches(4, users=[40])
    with pytest.raises(ValueError, match="batch_size"):
        d.batches(0)
    with pytest.raises(ValueError, match="split"):
        d.batches(4, split="dev")


def test_batches_of_a_valued_matrix():
    m = sp.csr_matrix(np.array([[0, 2.5, 0], [1, 0, 0], [0, 0, 0]], dtype=np.float32))
    rows = [r for _, r in UserBatches(m, 2, shuffle=False)]
    assert torch.equal(torch.cat(rows), torch.from_numpy(m.toarray()))


# --- broken files: every message names the file and the line (or row) ----------------------------------

class _Payload:
    """Unpickling this creates the marker file: a reader that unpickles would run it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _write_train(folder, write_train):
    """A DiffRec folder with good valid/test splits and a train_list.npy written by write_train(path)."""
    folder = write_diffrec(folder, [[0, 0]], [[0, 1]], [[1, 2]])
    write_train(os.path.join(folder, "train_list.npy"))
    return folder


def _npz(path):
    with open(path, "wb") as f:  # np.savez on a file object keeps the name: an .npz under .npy's name
        np.savez(f, pairs=np.array([[0, 1]]))


def _truncated(path):
    np.save(path, np.arange(2000).reshape(1000, 2))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])


@pytest.mark.parametrize("case,write_train,msg", [
    ("zero-bytes", lambda p: open(p, "wb").close(), r"train_list\.npy: the file is empty \(0 bytes\)"),
    ("npz", _npz, r"train_list\.npy: not a NumPy \.npy array: it is a zip archive, as np\.savez writes"),
    ("truncated", _truncated, r"train_list\.npy: the file is truncated: its header announces 1000 pairs"),
    ("header-only", lambda p: open(p, "wb").write(b"\x93NUMPY\x01\x00"), r"train_list\.npy: .*header"),
    ("huge-user-id", lambda p: np.save(p, np.array([[0, 1], [2 ** 40, 3]])),
     r"train_list\.npy, row 1: user id 1099511627776 is far above the 3 distinct user ids.*n_users="),
    ("huge-item-id", lambda p: np.save(p, np.array([[0, 1], [1, 5], [1, 2 ** 40]])),
     r"train_list\.npy, row 2: item id 1099511627776 is far above the 4 distinct item ids.*n_items="),
    ("uint64-above-int64", lambda p: np.save(p, np.array([[0, 1], [2 ** 63 + 5, 3]], dtype=np.uint64)),
     r"train_list\.npy, row 1: user id 9223372036854775813 is out of range"),
])
def test_broken_npy_files_name_file_and_row(tmp_path, case, write_train, msg):
    folder = _write_train(tmp_path / case, write_train)
    with pytest.raises(DataFormatError, match=msg) as info:
        load_dataset(folder)
    assert info.value.path == os.path.join(folder, "train_list.npy")


def test_ids_far_above_the_distinct_ids_load_when_declared(tmp_path):
    # Sparse ids below the floor are kept as they are; above it a declared size accepts them.
    d = load_dataset(write_diffrec(tmp_path / "small", [[0, 0], [1000, 1]], [[0, 1]], [[1, 2]]))
    assert d.n_users == 1001
    big = 1_100_000
    folder = write_diffrec(tmp_path / "big", [[0, 0], [big, 1]], [[0, 1]], [[1, 2]])
    with pytest.raises(DataFormatError, match=rf"row 1: user id {big}"):
        load_dataset(folder)
    assert load_dataset(folder, n_users=big + 1).n_users == big + 1


@pytest.mark.parametrize("case", ["object-array", "plain-pickle"])
def test_npy_pickles_are_never_unpickled(tmp_path, case):
    marker = tmp_path / "ran"
    if case == "object-array":
        write_train = lambda p: np.save(p, np.array([[0, _Payload(marker)]], dtype=object),  # noqa: E731
                                        allow_pickle=True)
        msg = r"train_list\.npy: holds Python objects \(dtype object\).*not unpickled"
    else:
        write_train = lambda p: open(p, "wb").write(pickle.dumps(_Payload(marker)))  # noqa: E731
        msg = r"train_list\.npy: not a NumPy \.npy array: it is a Python pickle, which is never unpickled"
    folder = _write_train(tmp_path / case, write_train)
    with pytest.raises(DataFormatError, match=msg):
        load_dataset(folder)
    assert not marker.exists()


@pytest.mark.parametrize("name,text,line,msg", [
    ("20-digit-user", "1::2::5::10\n12345678901234567890::3::5::11\n", 2,
     "user id 12345678901234567890 is out of range"),
    ("20-digit-item-after-blank", "1::2::5::10\n\n \n2::-12345678901234567890::5::11\n", 4,
     "item id -12345678901234567890 is out of range"),
    ("underscore-number", "1::2::5::10\n2::3::5::1_1\n", 2, "timestamp must be a number"),
    ("other-script-digit", "1::2::5::10\n2::\uff13::5::11\n", 2, "item id must be an integer"),
])
def test_ids_numpy_refuses_are_named_by_line(tmp_path, name, text, line, msg):
    path = write(tmp_path / "ratings.dat", text)
    with pytest.raises(DataFormatError, match=msg) as info:
        load_dataset(path)
    assert info.value.path == path and info.value.line == line
    assert f"ratings.dat, line {line}:" in str(info.value)


def test_whitespace_only_lines_and_a_byte_order_mark_are_accepted(tmp_path):
    rows = "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ML_ROWS)
    clean = load_dataset(write(tmp_path / "ratings.dat", rows))
    lines = rows.splitlines(keepends=True)
    spaced = "\ufeff" + lines[0] + "   \n\t\n" + "".join(lines[1:5]) + " \r\n" + "".join(lines[5:])
    (tmp_path / "spaced").mkdir()
    d = load_dataset(write(tmp_path / "spaced" / "ratings.dat", spaced))
    assert d.summary == clean.summary
    for split in ("train", "valid", "test"):
        assert pairs(getattr(d, split), d) == pairs(getattr(clean, split), clean)
    # The same in u.data (tab-separated), and a line after the blank ones keeps its own number.
    path = write(tmp_path / "u.data", "1\t1\t5\t100\n  \n\n2\tx\t4\t101\n")
    with pytest.raises(DataFormatError, match=r"u\.data, line 4: item id must be an integer"):
        load_dataset(path)


def test_inter_with_a_byte_order_mark(tmp_path):
    a = load_dataset(write(tmp_path / "d.inter", INTER))
    b = load_dataset(write(tmp_path / "bom.inter", "\ufeff" + INTER))
    assert b.summary == a.summary and pairs(b.test, b) == pairs(a.test, a)
    text = "\ufeffuser_id:token\titem_id:token\treview:token_seq\n1\t2\tgood\n1\t3\tok\n"
    assert load_dataset(write(tmp_path / "general.inter", text), split=(1, 0, 1)).n_items == 2


@pytest.mark.parametrize("text,line,msg", [
    ("user_id:token\titem_id:token\tuser_id:token\n1\t2\t3\n", 1,
     r"the header names the column 'user_id' twice \(fields 1 and 3\)"),
    ("user_id:token\titem_id:token\treview:token_seq\treview:token\n1\t2\tx\ty\n", 1,
     r"the header names the column 'review' twice \(fields 3 and 4\)"),
    ("user_id:token\titem_id:token\treview:token_seq\n1\t2\tx\n1\t12345678901234567890\ty\n", 3,
     "item_id 12345678901234567890 is out of range"),
    ("user_id:token\titem_id:token\n1\t2\n99999999999999999999\t3\n", 3,
     "user_id 99999999999999999999 is out of range"),
])
def test_malformed_inter_names_the_file(tmp_path, text, line, msg):
    path = write(tmp_path / "bad.inter", text)
    with pytest.raises(DataFormatError, match=msg) as info:
        load_dataset(path)
    assert info.value.line == line and info.value.path == path
    assert str(info.value).startswith(f"{path}, line {line}:")


def test_non_utf8_lines_are_named(tmp_path):
    path = tmp_path / "d.inter"
    path.write_bytes(b"user_id:token\titem_id:token\treview:token_seq\n1\t2\tok\n1\t3\t\xff\n")
    with pytest.raises(DataFormatError, match=r"d\.inter, line 3: not UTF-8 text"):
        load_dataset(str(path))


# --- the text reader works through the file in pieces ---------------------------------------

@pytest.fixture
def small_pieces(monkeypatch):
    """Makes the reader cut files into pieces of a few bytes, so every case crosses many cuts."""
    def use(n):
        monkeypatch.setattr(data_module, "_CHUNK_BYTES", n)
    return use


def _odd_ratings_file(rng, n_rows):
    """u.data text with a byte order mark, blank and whitespace-only lines, CRLF endings and
    no newline at the end, plus the (user, item, rating, time, line) of every row."""
    parts, rows, line = ["\ufeff"], [], 1
    for _ in range(n_rows):
        while rng.random() < 0.2:
            parts.append(rng.choice(["\n", "  \n", "\t\r\n"]))
            line += 1
        u, i, r, t = int(rng.integers(1, 50)), int(rng.integers(1, 10 ** int(rng.integers(1, 7)))), \
            int(rng.integers(1, 6)), int(rng.integers(0, 10 ** 9))
        parts.append(f"{u}\t{i}\t{r}\t{t}" + ("\r\n" if rng.random() < 0.3 else "\n"))
        rows.append((u, i, r, t, line))
        line += 1
    parts[-1] = parts[-1].rstrip("\r\n")
    return "".join(parts), rows


@pytest.mark.parametrize("piece", [1, 3, 17, 64, 1 << 24])
def test_reading_in_pieces_gives_every_row_and_its_line(tmp_path, small_pieces, piece):
    small_pieces(piece)
    text, rows = _odd_ratings_file(np.random.default_rng(piece), 300)
    table, lines = data_module._read_table(write(tmp_path / "u.data", text), "\t", data_module._RATING_FIELDS)
    assert table["user id"].tolist() == [r[0] for r in rows]
    assert table["item id"].tolist() == [r[1] for r in rows]
    assert table["rating"].tolist() == [r[2] for r in rows]
    assert table["timestamp"].tolist() == [r[3] for r in rows]
    assert lines.tolist() == [r[4] for r in rows]


@pytest.mark.parametrize("piece", [1, 5, 40])
def test_errors_after_the_first_piece_name_their_line(tmp_path, small_pieces, piece):
    small_pieces(piece)
    good = "".join(f"{u}::{u + 1}::4::{u}\n" for u in range(1, 30))
    path = write(tmp_path / "ratings.dat", good + "\n7::x::4::9\n")
    with pytest.raises(DataFormatError, match=r"ratings\.dat, line 31: item id must be an integer"):
        load_dataset(path)
    raw = tmp_path / "bytes" / "ratings.dat"
    raw.parent.mkdir()
    raw.write_bytes(good.encode() + b"7::8::4::\xff9\n")
    with pytest.raises(DataFormatError, match=r"ratings\.dat, line 30: not UTF-8 text"):
        load_dataset(str(raw))
    header = write(tmp_path / "h.inter", "user_id:token\titem_id:token\n" + "\n" * 5)
    with pytest.raises(DataFormatError, match=r"no data rows \(only a header\)"):
        load_dataset(header)


def test_a_multibyte_character_split_by_a_cut_still_decodes(tmp_path, small_pieces):
    """A piece ends only after a newline, so a cut never lands inside a character: the byte order
    mark and the ideographic spaces (3 bytes each in UTF-8) of the blank lines survive every cut."""
    small_pieces(2)
    path = write(tmp_path / "u.data", "\ufeff1\t2\t5\t10\n\u3000\u3000\n3\t4\t4\t11\n\u3000\n5\t6\t3\t12\n")
    table, lines = data_module._read_table(path, "\t", data_module._RATING_FIELDS)
    assert table["user id"].tolist() == [1, 3, 5] and lines.tolist() == [1, 3, 5]


def test_unknown_options_are_named_by_every_source(tmp_path):
    path = write(tmp_path / "ratings.dat", "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ML_ROWS))
    for source, options, accepted in [(path, {"max_len": 5}, "min_rating, seed, split, split_mode"),
                                      ("synthetic", {"min_rating": 3}, "mean_interactions"),
                                      ("synthetic-seq", {"min_rating": 3}, "max_len")]:
        with pytest.raises(DataOptionsError, match=r"unknown options: (max_len|min_rating) \(accepted: .*" + accepted):
            load_dataset(source, **options)
    assert issubclass(DataOptionsError, TypeError) and issubclass(DataOptionsError, ValueError)
