"""Size limits of the loaders: crafted files that would take far more memory, time or stack than their
size suggests (shared references, deep nesting, huge declared sizes, devices) get a DataFormatError or
ValueError naming the file and the limit, before anything large is allocated."""

import collections
import os
import pickle
import pickletools

import numpy as np
import pytest

from _testing import shared_dataset
import refit.data.formats as formats_module
import refit.data.safe_pickle as safe_pickle
import refit.data.sequences as seqdata
from refit.data import DataFormatError, load_dataset
from refit.data.sequences import load_sequences

try:
    import pandas as pd
except ImportError:  # only the DreamRec .df tests need it
    pd = None

needs_pandas = pytest.mark.skipif(pd is None, reason="writing DreamRec .df files needs pandas")

SMALL = {"train": {1: [1, 2, 3], 2: [2, 3]}, "val": {1: [4], 2: [1]}, "test": {1: [5], 2: [4]}}


def write_pkl(folder, obj=None, raw=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "dataset.pkl"), "wb") as f:
        f.write(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if raw is None else raw)
    return str(folder)


def U(s):
    """A SHORT_BINUNICODE opcode."""
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def deep_list(n):
    """Opcodes leaving one list nested n deep on the stack: n empty lists, each appended to the one below."""
    return b"]" * n + b"a" * (n - 1)


def pkl_with_train(value_opcodes):
    """A protocol-4 dataset.pkl whose train[1] is what value_opcodes push (val and test as in SMALL)."""
    return (b"\x80\x04}(" + U("train") + b"}K\x01" + value_opcodes + b"s"
            + U("val") + b"}K\x01]K\x04as" + U("test") + b"}K\x01]K\x05asu.")


# --- dataset.pkl ----------------------------------------------------------------------------------------

def test_a_list_shared_by_every_user_is_counted_at_each_reference(tmp_path):
    shared = list(range(1, 1001))  # pickled once, then referenced by memo for every other user
    obj = {"train": {u: shared for u in range(2000)}, "val": {u: [1] for u in range(2000)},
           "test": {u: [2] for u in range(2000)}}
    folder = write_pkl(tmp_path / "d", obj)
    size = os.path.getsize(os.path.join(folder, "dataset.pkl"))
    assert size < 50_000  # 2 million ids from 44 KB
    with pytest.raises(DataFormatError, match=rf"dataset\.pkl: refused to unpickle: it builds more than 1000000 "
                                              rf"elements .* a file of {size} bytes"):
        load_sequences(folder)


def test_a_list_filled_after_it_is_referenced_is_counted(tmp_path):
    """References to an empty list cost nothing when made; the list is filled afterwards."""
    shared = b"]\x940"  # an empty list, memo 0, popped
    refs = b"(" + b"h\x00" * 3000 + b"l"  # train[1]: a list of 3000 references to it
    fill = b"h\x00(" + b"K\x07" * 1000 + b"e0"  # then 1000 items appended to it
    raw = pkl_with_train(shared + refs + fill)
    with pytest.raises(DataFormatError, match=r"dataset\.pkl: refused to unpickle: it builds more than \d+ elements"):
        load_sequences(write_pkl(tmp_path / "d", raw=raw))


def test_copies_made_by_calling_list_are_counted_while_unpickling(tmp_path):
    """list(shared) 3000 times, every copy discarded: the result is small, the unpickling was not."""
    shared = b"]q\x00(" + b"K\x07" * 1000 + b"e0"  # memo 0, popped
    copy = b"c__builtin__\nlist\nh\x00\x85R0"  # __builtin__.list(memo 0), popped
    raw = b"\x80\x02" + shared + copy * 3000 + pickle.dumps(SMALL, protocol=2)[2:]
    with pytest.raises(DataFormatError, match=r"dataset\.pkl: refused to unpickle: it builds more than \d+ elements"):
        load_sequences(write_pkl(tmp_path / "d", raw=raw))


def test_deep_nesting_is_refused_without_recursion(tmp_path):
    raw = pkl_with_train(deep_list(200_000))
    with pytest.raises(DataFormatError, match=r"dataset\.pkl: refused to unpickle: containers are nested more "
                                              r"than 100 deep"):
        load_sequences(write_pkl(tmp_path / "d", raw=raw))


@pytest.mark.parametrize("change,msg", [
    (dict(train={2 ** 63: [1, 2], 2: [2, 3]}, val={2 ** 63: [4], 2: [1]}, test={2 ** 63: [5], 2: [4]}),
     r"train: user id 9223372036854775808 does not fit in a 64-bit integer"),
    (dict(train={-2 ** 64: [1, 2], 2: [2, 3]}), r"train: user id -18446744073709551616 does not fit"),
    (dict(smap={10: 1, 20: 2, 30: 3, 40: 4, 50: 5, 60: 2 ** 70}),
     r"'smap' maps 60 to the item id 1180591620717411303424, which does not fit in a 64-bit integer"),
    (dict(smap={10: 1, 20: 2, 30: 3, 40: 4, 50: 5, 60: -6}), r"'smap' maps 60 to the item id -6, which is negative"),
])
def test_ids_out_of_range_name_the_file(tmp_path, change, msg):
    obj = {**SMALL, **change}
    with pytest.raises(DataFormatError, match=r"dataset\.pkl: " + msg):
        load_sequences(write_pkl(tmp_path / "d", obj))


def test_real_data_loads_with_a_tenth_of_the_bound(monkeypatch):
    """The bound keeps a wide margin: the published files load with 1.6 elements per byte instead of 16."""
    paths = [shared_dataset("ml-1m_seq")] + ([shared_dataset("zhihu")] if pd is not None else [])
    paths = [p for p in paths if p is not None]
    if not paths:
        pytest.skip("ml-1m_seq and zhihu are not in ../shared/data (or $REFIT_DATA), or pandas is missing")
    monkeypatch.setattr(safe_pickle, "PICKLE_ELEMENTS_PER_BYTE", 1.6)
    monkeypatch.setattr(safe_pickle, "PICKLE_MIN_ELEMENTS", 0)
    for path in paths:
        assert load_sequences(path).n_sequences > 6000


# --- DreamRec .df ------------------------------------------------------------------------------------------

def write_dreamrec(folder, item_num=5, seq_size=2, train=None):
    """A small DreamRec folder: one session per split (items 0..3, padding item_num)."""
    os.makedirs(folder, exist_ok=True)
    pd.DataFrame({"seq_size": [seq_size], "item_num": [item_num]}).to_pickle(os.path.join(folder, "data_statis.df"))
    pad = item_num
    rows = {"train": [([pad, pad], 1, 0), ([0, pad], 1, 1), ([0, 1], 2, 2)],
            "valid": [([pad, pad], 1, 1), ([1, pad], 1, 3)], "test": [([pad, pad], 1, 2), ([2, pad], 1, 0)]}
    for split, fname in seqdata.DREAMREC_FILES.items():
        df = pd.DataFrame({"seq": [list(r[0]) for r in rows[split]], "seq_len": [r[1] for r in rows[split]],
                           "tgt": [r[2] for r in rows[split]]})
        if split == "train" and train is not None:
            df = train
        df.to_pickle(os.path.join(folder, fname))
    return str(folder)


@needs_pandas
def test_small_dreamrec_folder_loads(tmp_path):
    d = load_sequences(write_dreamrec(tmp_path / "d"))
    assert (d.n_items, d.n_sequences, len(d.targets["train"])) == (5, 3, 3)


@needs_pandas
@pytest.mark.parametrize("item_num,msg", [
    (2 ** 40, r"data_statis\.df, row 0: item_num = 1099511627776 would take 8\.0 TiB \(8796093022208 bytes\) for "
              r"its item ids alone"),
    (5_000_000, r"data_statis\.df, row 0: item_num = 5000000 is far above the largest item id of the splits, 3: "
                r".* at most max\(2 x \(largest id \+ 1\), 1048576\) = 1048576; 5000000 items would take 38\.1 MiB"),
])
def test_declared_item_num_is_checked(tmp_path, item_num, msg):
    with pytest.raises(DataFormatError, match=msg):
        load_sequences(write_dreamrec(tmp_path / "d", item_num=item_num))


@needs_pandas
def test_declared_seq_size_is_checked(tmp_path):
    with pytest.raises(DataFormatError, match=r"data_statis\.df, row 0: seq_size = 68719476736 would take 512\.0 GiB "
                                              r"\(549755813888 bytes\) for one window alone"):
        load_sequences(write_dreamrec(tmp_path / "d", seq_size=2 ** 36))


@needs_pandas
@pytest.mark.parametrize("column", ["seq", "seq_len", "tgt"])
def test_duplicated_columns_are_refused(tmp_path, column):
    rows = 3
    cols = {"seq": [[5, 5], [0, 5], [0, 1]], "seq_len": [1, 1, 2], "tgt": [0, 1, 2]}
    df = pd.DataFrame({k: v for k, v in cols.items()})
    df = pd.concat([df, df[[column]]], axis=1)
    assert list(df.columns).count(column) == 2 and len(df) == rows
    with pytest.raises(DataFormatError, match=rf"train_data\.df: the column '{column}' appears more than once"):
        load_sequences(write_dreamrec(tmp_path / "d", train=df))


@needs_pandas
def test_windows_sharing_one_list_are_counted(tmp_path):
    shared = list(range(1000))
    df = pd.DataFrame({"seq": [shared] * 5000, "seq_len": [2] * 5000, "tgt": [0] * 5000})
    folder = write_dreamrec(tmp_path / "d", train=df)
    assert os.path.getsize(os.path.join(folder, "train_data.df")) < 200_000  # 5 million ids
    with pytest.raises(DataFormatError, match=r"train_data\.df: refused to unpickle: it builds more than \d+ elements"):
        load_sequences(folder)


def _fill_after_build(raw, payload):
    """raw (protocol 2, unframed) with payload appended to its most referenced memo entry right after the
    first BUILD that follows the last reference: a list filled after the array holding it was checked."""
    ops = list(pickletools.genops(raw))
    gets = collections.Counter(arg for op, arg, _ in ops if op.name == "BINGET")
    idx = gets.most_common(1)[0][0]
    last = max(pos for op, arg, pos in ops if op.name == "BINGET" and arg == idx)
    build = min(pos for op, _, pos in ops if op.name == "BUILD" and pos > last)
    return raw[:build + 1] + b"h" + bytes([idx]) + payload + b"a0" + raw[build + 1:]


@needs_pandas
def test_a_window_filled_after_its_check_stays_as_checked(tmp_path):
    """Every row's window is one empty list, filled with a list nested 200,000 deep once its array is built."""
    shared = []
    df = pd.DataFrame({"seq": [shared] * 4, "seq_len": [1] * 4, "tgt": [0, 1, 2, 3]})
    folder = write_dreamrec(tmp_path / "d", seq_size=1)
    path = os.path.join(folder, "train_data.df")
    with open(path, "wb") as f:
        f.write(_fill_after_build(pickle.dumps(df, protocol=2), deep_list(200_000)))
    with pytest.raises(DataFormatError, match=r"train_data\.df, row 0: the window holds 0 items, shorter than "
                                              r"seq_size = 1"):
        load_sequences(folder)


@needs_pandas
def test_a_dataframe_without_its_state_is_refused(tmp_path):
    path = tmp_path / "train_data.df"
    path.write_bytes(b"\x80\x02ccopy_reg\n_reconstructor\n(cpandas.core.frame\nDataFrame\nc__builtin__\nobject\nNtR.")
    with pytest.raises(DataFormatError, match=r"train_data\.df: the pickle holds an incomplete DataFrame"):
        seqdata.read_dataframe(str(path))


# --- window lengths -------------------------------------------------------------------------------------------

def test_max_len_is_checked_against_the_targets(tmp_path):
    folder = write_pkl(tmp_path / "d", SMALL)
    assert sum(len(t) for t in load_sequences(folder, max_len=100).targets.values()) == 7
    with pytest.raises(ValueError, match=r"d: max_len=1000000000 would take 52\.2 GiB \(56000000000 bytes\) for "
                                         r"the history windows \(7 windows x 1000000000 items x 8 bytes\)"):
        load_sequences(folder, max_len=10 ** 9)  # 8 GB for one window: only the 7 targets make it too much
    with pytest.raises(ValueError, match=r"dataset\.pkl: max_len=100000000000 would take 745\.1 GiB .* \(1 windows"):
        load_sequences(folder, max_len=10 ** 11)  # one window alone: refused before the file is read


def test_windows_refuse_a_length_that_cannot_be_held(tmp_path):
    d = load_sequences(write_pkl(tmp_path / "d", SMALL))
    t = d.targets["test"]
    with pytest.raises(ValueError, match=r"max_len=1000000000000 would take 14\.6 TiB .* \(2 windows x "
                                         r"1000000000000 items x 8 bytes\)"):
        d.windows(t.seq, t.pos, max_len=10 ** 12)
    assert d.windows(t.seq, t.pos, max_len=3)[0].shape == (2, 3)


# --- files that are not regular, or too large -------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_device_is_refused_unread():
    with pytest.raises(DataFormatError, match=r"/dev/zero: not a regular file \(a character device\)"):
        load_dataset("/dev/zero")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("name", ["ratings.dat", "dataset.pkl"])
def test_a_fifo_is_refused_unopened(tmp_path, name):
    """Opening a FIFO for reading would block until something writes to it."""
    os.mkfifo(tmp_path / name)
    with pytest.raises(DataFormatError, match=rf"{name}: not a regular file \(a FIFO"):
        load_dataset(str(tmp_path))


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "ratings.dat"
    path.write_text("1::10::5::100\n" * 20)
    monkeypatch.setattr(formats_module, "MAX_FILE_BYTES", 100)
    with pytest.raises(DataFormatError, match=r"ratings\.dat: the file holds 280 bytes, more than the 100 bytes a "
                                              r"data file may have \(refit\.data\.formats\.MAX_FILE_BYTES\)"):
        load_dataset(str(path))


# --- interaction files ----------------------------------------------------------------------------------------

def test_huge_original_ids_are_reindexed_not_allocated(tmp_path):
    """Raw ratings keep their ids only as labels: an id of 10**15 makes no array of that size."""
    path = tmp_path / "ratings.dat"
    path.write_text("".join(f"{u}::{i}::5::{t}\n" for t, (u, i) in enumerate(
        [(10 ** 15, 7), (10 ** 15, 8), (10 ** 15, 9), (3, 10 ** 15), (3, 7), (3, 8)])))
    d = load_dataset(str(path), split=(1, 1, 1))
    assert (d.n_users, d.n_items) == (2, 4)
    assert d.user_ids.tolist() == [3, 10 ** 15] and d.item_ids.tolist() == [7, 8, 9, 10 ** 15]


@pytest.mark.parametrize("option,value,msg", [
    ("n_users", 10 ** 15, r"n_users=1000000000000000 would take 28\.4 PiB .* for the user id space alone"),
    ("n_items", 10 ** 15, r"n_items=1000000000000000 would take 7\.1 PiB .* for the item id space alone"),
    ("n_users", 0, r"n_users must be a positive int, got 0"),
    ("n_items", "5", r"n_items must be a positive int, got '5'"),
])
def test_declared_diffrec_sizes_are_checked(tmp_path, option, value, msg):
    folder = tmp_path / "d"
    folder.mkdir()
    for name, a in (("train", [[0, 0], [1, 1]]), ("valid", [[0, 1]]), ("test", [[1, 0]])):
        np.save(folder / f"{name}_list.npy", np.asarray(a, dtype=np.int64))
    with pytest.raises(ValueError, match=r"d: " + msg):
        load_dataset(str(folder), **{option: value})
