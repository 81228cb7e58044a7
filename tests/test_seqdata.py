"""refit.data.sequences: both sequence formats on small files written here (broken and malicious ones too),
windows, histories, batches, evaluation (ours and DreamRec's) and the most-popular baseline."""

import copyreg
import math
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from _testing import shared_dataset
import refit.data.safe_pickle as safe_pickle
import refit.data.sequences as seqdata
from refit.data import DataFormatError, load_dataset
from refit.baselines.sequences import SequenceMostPopular, most_popular_metrics
from refit.data.sequences import SequenceData, Targets, load_sequences
from refit.evaluate import evaluate_like_dreamrec, evaluate_sequences

try:
    import pandas as pd
except ImportError:  # only the DreamRec .df tests need it
    pd = None

needs_pandas = pytest.mark.skipif(pd is None, reason="pandas is not installed: reading and writing DreamRec .df "
                                                     "files needs it (pip install pandas)")


# --- writing small files in both formats -------------------------------------------------------------------

def write_pkl(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as f:
        f.write(pickle.dumps(obj, protocol=protocol))
    return str(path)


def dreamrec_rows(sessions, seq_size, pad):
    """DreamRec's rows of sessions: every prefix predicts the next item (its pad_history layout)."""
    rows = []
    for items in sessions:
        for p, target in enumerate(items):
            window = list(items[:p])[-seq_size:]
            rows.append((window + [pad] * (seq_size - len(window)), max(len(window), 1), target))
    return rows


def write_df(path, rows, columns=("seq", "seq_len", "tgt"), protocol=pickle.HIGHEST_PROTOCOL):
    df = pd.DataFrame({columns[0]: [list(r[0]) for r in rows], columns[1]: [r[1] for r in rows],
                       columns[2]: [r[2] for r in rows]})
    df.to_pickle(str(path), protocol=protocol)
    return str(path)


def write_dreamrec(folder, splits, item_num, seq_size=10, columns=("seq", "seq_len", "tgt"),
                   protocol=pickle.HIGHEST_PROTOCOL):
    """A DreamRec folder; splits: {"train"|"valid"|"test": list of sessions (lists of items)}."""
    os.makedirs(folder, exist_ok=True)
    pd.DataFrame({"seq_size": [seq_size], "item_num": [item_num]}).to_pickle(
        os.path.join(folder, "data_statis.df"), protocol=protocol)
    for split, fname in seqdata.DREAMREC_FILES.items():
        write_df(os.path.join(folder, fname), dreamrec_rows(splits[split], seq_size, item_num), columns, protocol)
    return str(folder)


PKL = {
    "train": {3: [17, 11, 19, 13], 1: [11, 15], 2: [23]},
    "val": {3: [21], 1: [13], 2: [11]},
    "test": {3: [15], 1: [21], 2: [17]},
    "umap": {103: 3, 101: 1, 102: 2},
    "smap": {1001: 11, 1002: 13, 1003: 15, 1004: 17, 1005: 19, 1006: 21, 1007: 23, 1008: 25},
}


def sequences_of(d: SequenceData):
    items, offsets = d.items.tolist(), d.offsets.tolist()
    return [items[offsets[s]:offsets[s + 1]] for s in range(d.n_sequences)]


def check_well_formed(d: SequenceData):
    """Invariants every loader guarantees."""
    assert d.items.dtype == torch.int64 and d.offsets.dtype == torch.int64
    assert int(d.offsets[0]) == 0 and int(d.offsets[-1]) == d.items.numel()
    assert bool((d.lengths > 0).all())
    assert int(d.items.min()) >= 0 and int(d.items.max()) < d.n_items
    assert isinstance(d.train, sp.csr_matrix) and d.train.dtype == np.float32
    assert d.train.shape == (d.n_sequences, d.n_items) and d.train.has_canonical_format
    assert np.all(d.train.data == 1)
    assert len(d.item_ids) == d.n_items and len(d.sequence_ids) == d.n_sequences
    for split in seqdata.SPLITS:
        t = d.targets[split]
        assert t.seq.dtype == torch.int64 and t.pos.dtype == torch.int64
        assert bool((t.pos < d.lengths[t.seq]).all()) and bool((t.pos >= 0).all())
    seqs = sequences_of(d)
    assert d.repeats == any(len(set(s)) < len(s) for s in seqs)


# --- dataset.pkl ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_pkl_round_trip(tmp_path, protocol):
    path = write_pkl(tmp_path / "dataset.pkl", PKL, protocol)
    d = load_sequences(path)
    check_well_formed(d)
    # Items re-indexed in id order over smap's ids (25 is in smap only); users sorted.
    assert d.item_ids.tolist() == [11, 13, 15, 17, 19, 21, 23, 25] and d.n_items == 8
    assert d.sequence_ids.tolist() == [1, 2, 3]
    raw = [[d.item_ids[i] for i in s] for s in sequences_of(d)]
    assert raw == [[11, 15, 13, 21], [23, 11, 17], [17, 11, 19, 13, 21, 15]]
    t = d.targets
    assert list(zip(t["train"].seq.tolist(), t["train"].pos.tolist())) == [(0, 1), (2, 1), (2, 2), (2, 3)]
    assert t["valid"].pos.tolist() == [2, 1, 4] and t["test"].pos.tolist() == [3, 2, 5]
    # train: each user's train list, up to its last training target (user 2's one training item
    # is only the history of its validation target).
    rows = [sorted(d.item_ids[d.train[s].indices].tolist()) for s in range(3)]
    assert rows == [[11, 15], [], [11, 13, 17, 19]]
    assert d.max_len == 10 and not d.repeats and d.name == tmp_path.name
    s = d.summary
    assert (s["sequences"], s["items"], s["targets_train"], s["targets_valid"], s["targets_test"]) == (3, 8, 4, 3, 3)
    assert (s["length_min"], s["length_max"], s["train_interactions"]) == (3, 6, 6)
    # the folder, load_dataset and max_len
    assert load_dataset(str(tmp_path)).item_ids.tolist() == d.item_ids.tolist()
    assert load_sequences(str(tmp_path), max_len=3).max_len == 3
    with pytest.raises(TypeError, match="unknown options.*n_items"):
        load_sequences(path, n_items=5)


def test_pkl_repeats_and_no_smap(tmp_path):
    obj = {"train": {0: [5, 6, 5], 1: [7]}, "val": {0: [6], 1: [5]}, "test": {0: [8], 1: [7]}}
    d = load_sequences(write_pkl(tmp_path / "any_name.pkl", obj))
    check_well_formed(d)
    assert d.repeats and d.summary["sequences_with_repeats"] == 2
    assert d.item_ids.tolist() == [5, 6, 7, 8]
    # Sequence 0's repeated 5 counts once; sequence 1 has no training target (its only training
    # item is the history of its validation target), so no training interaction.
    assert [d.train[s].indices.tolist() for s in range(2)] == [[0, 1], []]


# --- DreamRec folders ---------------------------------------------------------------------------------------

SESSIONS = {
    "train": [[3, 1, 4, 1, 5], [9, 2, 6], list(range(20, 34)), [7]],
    "valid": [[8, 9, 7, 9], [2]],
    "test": [[30, 31, 5, 6, 7, 8, 20, 21, 22, 23, 24, 25]],
}


@needs_pandas
@pytest.mark.parametrize("protocol,columns", [(5, ("seq", "seq_len", "tgt")), (4, ("seq", "len_seq", "next")),
                                              (2, ("seq", "seq_len", "tgt")), (0, ("seq", "len_seq", "next"))])
def test_dreamrec_round_trip(tmp_path, protocol, columns):
    folder = write_dreamrec(tmp_path / "zh", SESSIONS, item_num=40, seq_size=4, columns=columns, protocol=protocol)
    d = load_sequences(folder)
    check_well_formed(d)
    assert d.n_items == 40 and d.item_ids.tolist() == list(range(40)) and d.max_len == 4
    assert sequences_of(d) == SESSIONS["train"] + SESSIONS["valid"] + SESSIONS["test"]
    assert d.repeats  # item 1 in the first session, 9 in a validation one
    # Targets are the rows, in file order; windows and targets reproduce the files.
    for split, fname in seqdata.DREAMREC_FILES.items():
        rows = dreamrec_rows(SESSIONS[split], 4, 40)
        t = d.targets[split]
        history, lengths = d.windows(t.seq, t.pos)
        assert history.tolist() == [r[0] for r in rows]
        assert lengths.clamp(min=1).tolist() == [r[1] for r in rows]
        assert d.target_items(t).tolist() == [r[2] for r in rows]
        assert len(t) == d.summary[f"rows_{split}"]
    # Validation and test sessions have no training part.
    assert [sorted(d.train[s].indices.tolist()) for s in range(d.n_sequences)] == \
        [[1, 3, 4, 5], [2, 6, 9], list(range(20, 34)), [7], [], [], []]
    assert d.sequence_ids.tolist() == [0, 5, 8, 22, 0, 4, 0]
    # Longer windows than seq_size: the rebuilt sessions hold the whole history.
    h, n = d.windows(d.targets["train"].seq[-2:], d.targets["train"].pos[-2:], max_len=20)
    assert n.tolist() == [13, 0] and h[0, :13].tolist() == list(range(20, 33))
    # A .df file names its folder; load_dataset dispatches.
    assert sequences_of(load_sequences(os.path.join(folder, "val_data.df"))) == sequences_of(d)
    assert load_dataset(folder).n_sequences == d.n_sequences


@needs_pandas
def test_dreamrec_rows_that_do_not_continue_start_sequences(tmp_path):
    """Any file loads: a row whose window does not continue the previous row starts a sequence from it."""
    folder = write_dreamrec(tmp_path / "f", {"train": [[1, 2, 3]], "valid": [[4, 5]], "test": [[6, 7]]}, 10,
                            seq_size=3)
    pad = 10
    rows = [([1, 2, pad], 2, 3), ([1, 2, 3], 3, 4), ([2, 3, 4], 3, 5),  # a window with history, then sliding
            ([7, pad, pad], 1, 8), ([pad] * 3, 1, 9), ([9, pad, pad], 1, 1), ([9, 1, pad], 2, 1)]
    write_df(os.path.join(folder, "train_data.df"), rows)
    write_df(os.path.join(folder, "val_data.df"), [([6, 7, 8], 3, 9), ([7, 8, 9], 3, 0)], ("seq", "len_seq", "next"))
    d = load_sequences(folder)
    check_well_formed(d)
    seqs = sequences_of(d)
    assert seqs[:4] == [[1, 2, 3, 4, 5], [7, 8], [9, 1, 1], [6, 7, 8, 9, 0]]
    assert d.targets["train"].pos.tolist() == [2, 3, 4, 1, 0, 1, 2]
    assert d.targets["valid"].pos.tolist() == [3, 4]
    t = d.targets["train"]
    assert d.windows(t.seq, t.pos)[0].tolist() == [r[0] for r in rows]
    assert d.repeats and d.summary["sequences_with_repeats"] == 1


@needs_pandas
def test_dreamrec_float_ids_and_numpy_scalars(tmp_path):
    """DreamRec's own YooChoose / KuaiRec files hold float64 targets and NumPy scalars in the windows."""
    folder = write_dreamrec(tmp_path / "f", {"train": [[1, 2]], "valid": [[3]], "test": [[4]]}, 6, seq_size=2)
    df = pd.DataFrame({"seq": [[np.int64(6), np.int64(6)], [np.float64(1.0), 6]], "len_seq": [1, 1],
                       "next": np.array([1.0, 2.0])})
    df.to_pickle(os.path.join(folder, "train_data.df"))
    d = load_sequences(folder)
    assert sequences_of(d)[0] == [1, 2]
    df["next"] = [1.0, 2.5]
    df.to_pickle(os.path.join(folder, "train_data.df"))
    with pytest.raises(DataFormatError, match=r"train_data\.df, row 1: target 2\.5 is not an integer id"):
        load_sequences(folder)


# --- synthetic ----------------------------------------------------------------------------------------------

def test_synthetic_sequences_are_seeded_and_sequential():
    d = load_dataset("synthetic-seq", n_users=300, n_items=200, mean_length=15, seed=3)
    check_well_formed(d)
    assert not d.repeats and d.n_sequences == 300 and d.n_items == 200
    assert torch.equal(load_sequences("synthetic-seq", n_users=300, n_items=200, mean_length=15, seed=3).items,
                       d.items)
    assert not torch.equal(load_sequences("synthetic-seq", n_users=300, n_items=200, mean_length=15, seed=4).items[
        :100], d.items[:100])
    n = d.lengths
    assert d.targets["valid"].pos.tolist() == (n - 2).tolist() and d.targets["test"].pos.tolist() == (n - 1).tolist()
    assert d.summary["targets_train"] == int((n - 3).sum())
    # A first-order model (counts of item -> next item over training targets) beats most-popular by far.
    t = d.targets["train"]
    prev = d.windows(t.seq, t.pos, 1)[0][:, 0]
    trans = torch.zeros(d.n_items + 1, d.n_items)
    trans.index_put_((prev, d.target_items(t)), torch.ones(len(t)), accumulate=True)

    def markov(history, lengths, seq):
        last = history.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
        return trans[last]

    ours = evaluate_sequences(markov, d, ks=(10,))["test"]["hr@10"]
    pop = most_popular_metrics(d, ks=(10,))["test"]["hr@10"]
    assert ours > 2 * pop + 0.1, (ours, pop)


# --- the real data sets -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ml1m_seq():
    path = shared_dataset("ml-1m_seq")
    if path is None:
        pytest.skip("ml-1m_seq is not in ../shared/data (or $REFIT_DATA)")
    return load_sequences(path)


@pytest.fixture(scope="module")
def zhihu():
    path = shared_dataset("zhihu")
    if path is None:
        pytest.skip("zhihu is not in ../shared/data (or $REFIT_DATA)")
    return load_sequences(path)


def test_ml1m_seq_published_counts(ml1m_seq):
    d = ml1m_seq
    check_well_formed(d)
    assert (d.n_sequences, d.n_items, d.train.nnz) == (6040, 3706, 988129)
    assert d.item_ids.tolist() == list(range(1, 3707)) and not d.repeats
    assert (d.summary["length_min"] - 2, d.summary["length_max"] - 2) == (18, 2312)
    assert len(d.targets["valid"]) == len(d.targets["test"]) == 6040
    assert len(d.targets["train"]) == 988129 - 6040
    assert torch.equal(d.targets["test"].pos, d.lengths - 1)


@needs_pandas
def test_zhihu_published_counts(zhihu):
    d = zhihu
    check_well_formed(d)
    assert d.n_items == 4838 and d.max_len == 10
    assert [len(d.targets[s]) for s in seqdata.SPLITS] == [61641, 8160, 7911]
    folder = shared_dataset("zhihu")
    for split, fname in seqdata.DREAMREC_FILES.items():
        df = seqdata.read_dataframe(os.path.join(folder, fname))
        t = d.targets[split]
        history, lengths = d.windows(t.seq, t.pos)
        assert np.array_equal(history.numpy(), np.array(df["seq"].tolist()))
        assert np.array_equal(lengths.clamp(min=1).numpy(), df["seq_len"].to_numpy())
        assert np.array_equal(d.target_items(t).numpy(), df["tgt"].to_numpy())
    # Two training sessions repeat an item; every session starts at an all-padding row.
    assert d.repeats and d.summary["sequences_with_repeats"] == 2
    assert d.n_sequences == sum(d.summary[f"sequences_{s}"] for s in seqdata.SPLITS)
    assert d.items.numel() == 61641 + 8160 + 7911


# --- malformed files ----------------------------------------------------------------------------------------

def _pkl(**change):
    obj = {k: dict(v) for k, v in PKL.items()}
    for key, value in change.items():
        if value is None:
            del obj[key]
        else:
            obj[key] = value
    return obj


@pytest.mark.parametrize("obj,msg", [
    (_pkl(val=None), r"the dict has no 'val' key"),
    ({"train": PKL["train"], "valid": PKL["val"], "test": PKL["test"]}, r"no 'val' key \(keys: 'train', 'valid'"),
    ([1, 2, 3], r"expected a dict with the keys train, val, test"),
    (_pkl(train={3: [17, 11.5], 1: [11, 15], 2: [23]}), r"train\[3\]: item 11\.5 is not an integer id"),
    (_pkl(train={3: [17, "11"], 1: [11, 15], 2: [23]}), r"train\[3\]: item '11' is not an integer id"),
    (_pkl(train={3: [17, True], 1: [11, 15], 2: [23]}), r"train\[3\]: item True is not an integer id"),
    (_pkl(train={3: [17], 1: [], 2: [23]}), r"train\[1\] is an empty sequence"),
    (_pkl(val={3: [21, 22], 1: [13], 2: [11]}), r"val\[3\] holds 2 items"),
    (_pkl(test={3: [15], 1: [21]}), r"user 2 of 'train' has no 'test' entry"),
    (_pkl(train={"3": [17], 1: [11, 15], 2: [23]}), r"train: user id '3' is not an integer"),
    (_pkl(test={3: [15], 1: [-21], 2: [17]}), r"user 1: negative item id -21"),
    (_pkl(test={3: [15], 1: [2 ** 70], 2: [17]}), r"does not fit"),
    (_pkl(smap={1: 11}), r"item id 13 occurs in a sequence but not in 'smap'"),
    (_pkl(train={3: (17, 11), 1: [11, 15], 2: [23]}), r"train\[3\] must be a list of item ids, got a tuple"),
])
def test_pkl_malformed(tmp_path, obj, msg):
    path = write_pkl(tmp_path / "dataset.pkl", obj)
    with pytest.raises(DataFormatError, match=r"dataset\.pkl: .*" + msg):
        load_sequences(path)


@pytest.mark.parametrize("content,msg", [(b"", "the file is empty"), (pickle.dumps(PKL)[:-40], "not a readable pickle"),
                                         (b"hello world", "not a readable pickle")])
def test_pkl_damaged(tmp_path, content, msg):
    (tmp_path / "dataset.pkl").write_bytes(content)
    with pytest.raises(DataFormatError, match=r"dataset\.pkl: " + msg):
        load_sequences(str(tmp_path))


GOOD = {"train": [[1, 2, 3]], "valid": [[4, 5]], "test": [[6, 7]]}


def _edit_train(folder, edit):
    """Rewrites train_data.df of folder as edit(rows) (seq_size 3, pad 10)."""
    rows = [list(r) for r in dreamrec_rows(GOOD["train"], 3, 10)]
    edit(rows)
    write_df(os.path.join(folder, "train_data.df"), rows)


@needs_pandas
@pytest.mark.parametrize("edit,msg", [
    (lambda r: r[1].__setitem__(0, [1, 10, 10, 10]), r"row 1: the window holds 4 items, longer than seq_size = 3"),
    (lambda r: r[1].__setitem__(0, [1, 10]), r"row 1: the window holds 2 items, shorter than seq_size = 3"),
    (lambda r: r[2].__setitem__(2, 10), r"row 2: target 10 is out of range 0\.\.9"),
    (lambda r: r[2].__setitem__(2, -1), r"row 2: target -1 is out of range"),
    (lambda r: r[1].__setitem__(0, [11, 10, 10]), r"row 1: window item 11 is out of range"),
    (lambda r: r[2].__setitem__(1, 3), r"row 2: seq_len = 3 but the window holds 2 items"),
    (lambda r: r[1].__setitem__(0, [1.5, 10, 10]), r"row 1: window item 1\.5 is not an integer id"),
    (lambda r: r[1].__setitem__(0, [1, "2", 10]), r"row 1: window item '2' is not a number"),
    (lambda r: r[2].__setitem__(0, [10, 1, 10]), r"row 2: the window \[10, 1, 10\] is not right-padded"),
])
def test_dreamrec_malformed(tmp_path, edit, msg):
    folder = write_dreamrec(tmp_path / "f", GOOD, 10, seq_size=3)
    if "'2'" in msg:  # a string inside the lists is refused while unpickling already
        msg = r"refused to unpickle: .*holds a builtins\.str"
    _edit_train(folder, edit)
    with pytest.raises(DataFormatError, match=r"train_data\.df.*" + msg):
        load_sequences(folder)


@needs_pandas
def test_dreamrec_missing_parts(tmp_path):
    folder = write_dreamrec(tmp_path / "f", GOOD, 10, seq_size=3)
    pd.DataFrame({"seq": [[10, 10, 10]], "len": [1], "tgt": [1]}).to_pickle(os.path.join(folder, "val_data.df"))
    with pytest.raises(DataFormatError, match=r"val_data\.df: no column 'seq_len' or 'len_seq'"):
        load_sequences(folder)
    write_pkl(os.path.join(folder, "val_data.df"), {"seq": [[10, 10, 10]]})
    with pytest.raises(DataFormatError, match=r"val_data\.df: expected a pandas DataFrame, got a builtins\.dict"):
        load_sequences(folder)
    os.remove(os.path.join(folder, "data_statis.df"))
    with pytest.raises(FileNotFoundError, match="data_statis.df"):
        load_sequences(folder)


@needs_pandas
def test_dreamrec_without_pandas(tmp_path, monkeypatch):
    folder = write_dreamrec(tmp_path / "f", GOOD, 10, seq_size=3)
    monkeypatch.setattr(safe_pickle, "_RULES", None)
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now fails
    with pytest.raises(ImportError, match=r"data_statis\.df: reading DreamRec \.df files needs pandas.*pip install "
                                          r"pandas"):
        load_sequences(folder)


# --- malicious pickles: refused, and nothing in them runs ------------------------------------------------------

class _Exec:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class _System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


class _Reduce:
    """Pickles as func(*args), then BUILD with state when given: lets a test write a call of any global."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def G(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def U(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def getattr_chain(marker):
    """getattr(__import__('os'), 'system')('touch marker'), written opcode by opcode."""
    return (b"\x80\x02" + G("builtins", "getattr") + b"(" + G("builtins", "__import__") + b"(" + U("os") + b"tR"
            + U("system") + b"tR(" + U(f"touch {marker}") + b"tR.")


def dotted_global(marker):
    """A protocol-4 STACK_GLOBAL reaching os.system through a module attribute of an allowed module."""
    return (b"\x80\x04" + b"\x8c\x11pandas.core.frame" + b"\x8c\x09os.system" + b"\x93("
            + U(f"touch {marker}") + b"tR.")


@pytest.mark.parametrize("payload", ["exec", "system", "eval", "getattr", "dotted", "set", "builtin-call"])
def test_pkl_malicious(tmp_path, payload):
    marker = tmp_path / "ran"
    path = tmp_path / "dataset.pkl"
    good = _pkl()
    if payload in ("exec", "system", "eval"):
        cls = {"exec": _Exec, "system": _System, "eval": _Eval}[payload]
        good["train"][3] = [17, cls(marker)]
        write_pkl(path, good)
    elif payload == "getattr":
        path.write_bytes(getattr_chain(marker))
    elif payload == "dotted":
        path.write_bytes(dotted_global(marker))
    elif payload == "set":  # protocol opcodes build a set: no code, but not this format
        good["train"][3] = {17, 11}
        write_pkl(path, good)
    else:  # builtins.int is admitted: calling it is harmless, a wrong value is still refused
        good["val"][3] = [_Reduce(int, ("12" * 3000,))]
        write_pkl(path, good)
    msg = {"exec": r"refused to unpickle: the pickle asks for builtins\.exec",
           "system": r"refused to unpickle: the pickle asks for (posix|os|nt)\.system",
           "eval": r"refused to unpickle: the pickle asks for builtins\.eval",
           "getattr": r"refused to unpickle: the pickle asks for builtins\.getattr",
           "dotted": r"refused to unpickle: the pickle asks for pandas\.core\.frame\.os\.system",
           "set": r"train\[3\] must be a list of item ids, got a set",
           "builtin-call": r"not a readable pickle \(ValueError"}[payload]
    with pytest.raises(DataFormatError, match=r"dataset\.pkl: " + msg):
        load_sequences(str(tmp_path))
    assert not marker.exists()


def test_extension_codes_are_refused(tmp_path):
    """A registered copyreg extension code would bring its object onto the stack past find_class."""
    marker = tmp_path / "ran"
    payload = b"\x80\x02\x82\xf0" + U(f"touch {marker}") + b"\x85R."  # EXT1 240 -> os.system(...)
    copyreg.add_extension("os", "system", 240)
    try:
        for name in ("dataset.pkl", "train_data.df"):
            (tmp_path / name).write_bytes(payload)
        with pytest.raises(DataFormatError, match=r"dataset\.pkl: refused to unpickle: .*extension code"):
            seqdata.read_plain_pickle(str(tmp_path / "dataset.pkl"))
        if pd is not None:
            with pytest.raises(DataFormatError, match=r"train_data\.df: refused to unpickle: .*extension code"):
                seqdata.read_dataframe(str(tmp_path / "train_data.df"))
    finally:
        copyreg.remove_extension("os", "system", 240)
    assert not marker.exists()


def _df_payload(kind, marker):
    """Bytes of a .df file that tries to run code or to misuse the pandas / NumPy globals it may name."""
    from pandas.core.frame import DataFrame
    from pandas.core.indexes.base import Index, _new_Index

    if kind in ("exec", "system", "eval"):
        cls = {"exec": _Exec, "system": _System, "eval": _Eval}[kind]
        df = pd.DataFrame({"seq": [[10, 10, 10], [1, cls(marker), 10]], "seq_len": [1, 1], "tgt": [1, 2]})
        return pickle.dumps(df, protocol=5)
    if kind == "getattr":
        return getattr_chain(marker)
    if kind == "dotted":
        return dotted_global(marker)
    if kind == "read_pickle":  # a pandas function that would unpickle another file plainly
        return pickle.dumps(_Reduce(pd.read_pickle, (str(marker),)), protocol=4)
    if kind == "object-array":  # an object array may hold strings and lists of ids only
        return pickle.dumps(np.array([{"a": 1}], dtype=object), protocol=4)
    if kind == "object-in-list":
        return pickle.dumps(pd.DataFrame({"seq": [[1, Index([1])]], "seq_len": [1], "tgt": [1]}), protocol=5)
    if kind == "dtype-no-copy":  # would let BUILD change NumPy's shared int64 dtype
        return pickle.dumps(_Reduce(np.dtype, ("i8", False, False)), protocol=4)
    if kind == "dtype-flags":  # int64 flagged as holding objects: NumPy would read the ids as pointers
        return pickle.dumps(_Reduce(np.dtype, ("i8", False, True), (3, "<", None, None, None, -1, -1, 63)),
                            protocol=4)
    if kind == "new-index-class":
        return pickle.dumps(_Reduce(_new_Index, (DataFrame, {"data": np.zeros(1)})), protocol=4)
    if kind == "call-class":  # DataFrame(...) would run its constructor on the pickle's arguments
        return pickle.dumps(_Reduce(DataFrame, ({"a": [1]},)), protocol=4)
    if kind == "build-class":  # BUILD on the class itself: setattr(DataFrame, "refit_evil", 1)
        return b"\x80\x02" + G("pandas.core.frame", "DataFrame") + b"N}" + U("refit_evil") + b"K\x01s\x86b."
    if kind == "newobj-index":
        return b"\x80\x02" + G("pandas.core.indexes.base", "Index") + b")\x81."
    if kind == "setitems-dataframe":  # df["x"] = ... on a DataFrame runs pandas code
        return b"\x80\x02" + G("pandas.core.frame", "DataFrame") + b")\x81(" + U("x") + b"K\x01u."
    if kind == "frombuffer-object":
        return pickle.dumps(_Reduce(np.zeros(1).__reduce_ex__(5)[0], (b"x" * 8, np.dtype(object), (1,), "C")),
                            protocol=4)
    raise AssertionError(kind)


DF_PAYLOADS = {
    "exec": r"asks for builtins\.exec",
    "system": r"asks for (posix|os|nt)\.system",
    "eval": r"asks for builtins\.eval",
    "getattr": r"asks for builtins\.getattr",
    "dotted": r"asks for pandas\.core\.frame\.os\.system",
    "read_pickle": r"asks for pandas\.io\.pickle\.read_pickle",
    "object-array": r"an object array holds a builtins\.dict",
    "object-in-list": r"asks for pandas\.core\.indexes\.base\._new_Index|holds a pandas",
    "dtype-no-copy": r"numpy\.dtype called without copy=True",
    "dtype-flags": r"a dtype is given a state other than its own",
    "new-index-class": r"_new_Index asked to build the class pandas\.core\.frame\.DataFrame",
    "call-class": r"the pickle calls the class pandas\.core\.frame\.DataFrame",
    "build-class": r"sets the state of the class pandas\.core\.frame\.DataFrame",
    "newobj-index": r"creates the class pandas\.core\.indexes\.base\.Index",
    "setitems-dataframe": r"sets items of a pandas\.core\.frame\.DataFrame object",
    "frombuffer-object": r"_frombuffer called with unexpected arguments",
}


@needs_pandas
@pytest.mark.parametrize("kind", sorted(DF_PAYLOADS))
@pytest.mark.parametrize("fname", ["train_data.df", "data_statis.df"])
def test_dreamrec_malicious(tmp_path, kind, fname):
    from pandas.core.frame import DataFrame

    marker = tmp_path / "ran"
    folder = write_dreamrec(tmp_path / "f", GOOD, 10, seq_size=3)
    with open(os.path.join(folder, fname), "wb") as f:
        f.write(_df_payload(kind, marker))
    with pytest.raises(DataFormatError, match=fname.replace(".", r"\.") + r": refused to unpickle: .*"
                       + DF_PAYLOADS[kind] + r".*nothing in the file was run"):
        load_sequences(folder)
    assert not marker.exists()
    assert not hasattr(DataFrame, "refit_evil") and np.dtype("i8").byteorder == "="


# --- windows, histories, batches ------------------------------------------------------------------------------

def random_data(seed=0, n_seq=40, n_items=30, repeats=True):
    """A SequenceData with random sequences (repeats allowed) and a leave-one-out split."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_seq):
        n = int(rng.integers(3, 25))
        seqs.append(rng.integers(0, n_items, n) if repeats else rng.permutation(n_items)[:n])
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    targets = seqdata._leave_one_out(offsets, np.diff(offsets) - 2)
    return seqdata._assemble("random", np.concatenate(seqs), offsets, targets, n_items, np.arange(n_items), 5,
                             np.arange(n_seq)), seqs


def all_positions(seqs):
    seq = [s for s, x in enumerate(seqs) for _ in range(len(x) + 1)]
    pos = [p for x in seqs for p in range(len(x) + 1)]
    return torch.tensor(seq), torch.tensor(pos)


@pytest.mark.parametrize("L", [1, 3, 5, 30])
def test_windows_match_a_per_row_construction(L):
    d, seqs = random_data()
    seq, pos = all_positions(seqs)
    history, lengths = d.windows(seq, pos, L)
    assert history.shape == (len(seq), L) and history.dtype == torch.int64
    for s, p, h, n in zip(seq.tolist(), pos.tolist(), history.tolist(), lengths.tolist()):
        expect = list(seqs[s][max(0, p - L):p])
        assert n == len(expect) and h == expect + [d.n_items] * (L - len(expect))
    assert d.windows(seq[:0], pos[:0])[0].shape == (0, d.max_len)
    with pytest.raises(IndexError, match="pos.* out of range"):
        d.windows(torch.tensor([0]), torch.tensor([len(seqs[0]) + 1]))
    with pytest.raises(IndexError, match="seq.* out of range"):
        d.windows(torch.tensor([40]), torch.tensor([0]))


def test_history_csr_and_target_items_match_a_per_row_construction():
    d, seqs = random_data()
    seq, pos = all_positions(seqs)
    csr = d.history_csr(Targets(seq, pos))
    assert isinstance(csr, seqdata.CSR) and csr.n_cols == d.n_items and csr.n_rows == len(seq)
    for r, (s, p) in enumerate(zip(seq.tolist(), pos.tolist())):
        row = csr.indices[csr.indptr[r]:csr.indptr[r + 1]].tolist()
        assert row == sorted(set(seqs[s][:p].tolist()))
    inside = pos < d.lengths[seq]
    t = Targets(seq[inside], pos[inside])
    assert d.target_items(t).tolist() == [int(seqs[s][p]) for s, p in zip(t.seq.tolist(), t.pos.tolist())]


def test_batches_cover_every_target_once_per_epoch():
    d, seqs = random_data()
    n = len(d.targets["train"])
    b = d.batches("train", 64, seed=5)
    assert len(b) == math.ceil(n / 64) and n % 64  # a last partial batch, kept
    epochs = []
    for _ in range(2):
        seen = []
        for history, lengths, target, seq in b:
            assert history.shape[1] == d.max_len and history.shape[0] == target.shape[0] == seq.shape[0] <= 64
            seen.append(torch.stack([seq, lengths, target], 1))
        epochs.append(torch.cat(seen))
    t = d.targets["train"]
    h, n_ = d.windows(t.seq, t.pos)
    expect = sorted(map(tuple, torch.stack([t.seq, n_, d.target_items(t)], 1).tolist()))
    for e in epochs:
        assert sorted(map(tuple, e.tolist())) == expect
    assert not torch.equal(epochs[0], epochs[1])
    b.set_epoch(1)
    assert torch.equal(torch.cat([torch.stack([s, l, y], 1) for _, l, y, s in b]), epochs[1])
    plain = torch.cat([y for _, _, y, _ in d.batches("train", 64, shuffle=False)])
    assert torch.equal(plain, d.target_items(t))
    assert len(d.batches("train", 64, drop_last=True)) == n // 64


# --- evaluation -------------------------------------------------------------------------------------------------

def ranked_metrics(scores, target, excluded, ks):
    """One target's HR, NDCG and MRR at each k: rank by score, then lower item id; excluded never ranked."""
    order = sorted((j for j in range(len(scores)) if j not in excluded), key=lambda j: (-scores[j], j))
    r = order.index(target) if target in order else None
    return {m: [0.0 if r is None or r >= k else v for k in ks]
            for m, v in (("hr", 1.0), ("ndcg", 1.0 / math.log2((r or 0) + 2)), ("mrr", 1.0 / ((r or 0) + 1)))}


class TableScores:
    """score_fn returning precomputed rows in the order targets are scored (split order)."""

    def __init__(self, table):
        self.table, self.at, self.calls = table, 0, []

    def __call__(self, history, lengths, seq):
        B = history.shape[0]
        self.calls.append((history.clone(), lengths.clone(), seq.clone()))
        out = self.table[self.at:self.at + B]
        self.at += B
        return out


@pytest.mark.parametrize("exclude", [None, True, False])
def test_evaluate_sequences_matches_per_target_ranking(exclude):
    d, seqs = random_data(seed=1)
    assert d.repeats
    ks = (1, 3, 10)
    for split in ("valid", "test"):
        t = d.targets[split]
        gen = torch.Generator().manual_seed(7)
        table = torch.randint(0, 4, (len(t), d.n_items), generator=gen).float()  # many ties
        table[torch.rand(table.shape, generator=gen) < 0.2] = -math.inf
        fn = TableScores(table)
        got = evaluate_sequences(fn, d, split, ks=ks, batch_size=7, exclude_history=exclude)[split]
        use = bool(exclude)  # default: exclude only without repeats, and this data has repeats
        sums = {m: np.zeros(len(ks)) for m in ("hr", "ndcg", "mrr")}
        for i, (s, p) in enumerate(zip(t.seq.tolist(), t.pos.tolist())):
            ex = set(seqs[s][:p].tolist()) if use else set()
            for m, v in ranked_metrics(table[i].tolist(), int(seqs[s][p]), ex, ks).items():
                sums[m] += v
        assert got["n"] == len(t)
        for m in sums:
            for j, k in enumerate(ks):
                assert got[f"{m}@{k}"] == pytest.approx(sums[m][j] / len(t), abs=1e-6), (m, k)
        # score_fn saw the windows of the targets, in order
        history = torch.cat([c[0] for c in fn.calls])
        assert torch.equal(history, d.windows(t.seq, t.pos)[0])


def test_evaluate_sequences_checks_scores():
    d, _ = random_data()
    with pytest.raises(ValueError, match=r"score_fn must return \(7, 30\) scores"):
        evaluate_sequences(lambda h, n, s: torch.zeros(h.shape[0], 31), d, batch_size=7)
    with pytest.raises(ValueError, match="protocol"):
        evaluate_sequences(lambda h, n, s: None, d, protocol="recbole")


def calculate_hit(sorted_list, topk, true_items, hit_purchase, ndcg_purchase):
    """DreamRec's utility.calculate_hit, as published."""
    for i in range(len(topk)):
        rec_list = sorted_list[:, -topk[i]:]
        for j in range(len(true_items)):
            if true_items[j] in rec_list[j]:
                rank = topk[i] - np.argwhere(rec_list[j] == true_items[j])
                hit_purchase[i] += 1.0
                ndcg_purchase[i] += 1.0 / np.log2(rank + 1)


def dreamrec_evaluate(predict, eval_data, topk):
    """DreamRec.py's evaluate, line by line (model.predict replaced by predict(states, len_seq))."""
    batch_size = 100
    total_purchase = 0.0
    hit_purchase = [0, 0, 0, 0]
    ndcg_purchase = [0, 0, 0, 0]
    seq, len_seq, target = list(eval_data['seq'].values), list(eval_data['len_seq'].values), \
        list(eval_data['next'].values)
    num_total = len(seq)
    for i in range(num_total // batch_size):
        seq_b, len_seq_b, target_b = seq[i * batch_size: (i + 1) * batch_size], \
            len_seq[i * batch_size: (i + 1) * batch_size], target[i * batch_size: (i + 1) * batch_size]
        states = np.array(seq_b)
        states = torch.LongTensor(states)
        prediction = predict(states, np.array(len_seq_b))
        _, topK = prediction.topk(100, dim=1, largest=True, sorted=True)
        topK = topK.cpu().detach().numpy()
        sorted_list2 = np.flip(topK, axis=1)
        calculate_hit(sorted_list2, topk, target_b, hit_purchase, ndcg_purchase)
        total_purchase += batch_size
    hr_list, ndcg_list = [], []
    for i in range(len(topk)):
        hr_list.append(hit_purchase[i] / total_purchase)
        ng = ndcg_purchase[i] / total_purchase
        ndcg_list.append(ng[0, 0] if isinstance(ng, np.ndarray) else ng)
    return hr_list, ndcg_list, total_purchase


@needs_pandas
def test_dreamrec_protocol_matches_dreamrec_evaluate(tmp_path):
    rng = np.random.default_rng(0)
    item_num = 120
    sessions = {s: [list(rng.permutation(item_num)[:int(rng.integers(2, 16))]) for _ in range(n)]
                for s, n in (("train", 30), ("valid", 40), ("test", 35))}
    folder = write_dreamrec(tmp_path / "dr", sessions, item_num, seq_size=10, columns=("seq", "len_seq", "next"))
    d = load_sequences(folder)
    g = torch.Generator().manual_seed(1)
    emb, items = torch.randn(item_num + 1, 8, generator=g), torch.randn(item_num + 1, 8, generator=g)

    def predict(states, len_states):  # any model of the window: embeddings summed, inner products
        return (emb[states].sum(1) @ items.T).float()

    ks = [10, 20, 50]
    ours = evaluate_sequences(lambda h, n, s: predict(h, n), d, ("valid", "test"), ks=ks, protocol="dreamrec")
    assert ours == evaluate_like_dreamrec(lambda h, n, s: predict(h, n), d, ("valid", "test"), ks=ks)
    for split, fname in (("valid", "val_data.df"), ("test", "test_data.df")):
        hr, ndcg, total = dreamrec_evaluate(predict, pd.read_pickle(os.path.join(folder, fname)), ks)
        rows = d.summary[f"rows_{split}"]
        assert ours[split]["n"] == total == rows // 100 * 100 and rows % 100  # the partial batch is dropped
        for j, k in enumerate(ks):
            assert ours[split][f"hr@{k}"] == pytest.approx(hr[j], abs=1e-12)
            assert ours[split][f"ndcg@{k}"] == pytest.approx(ndcg[j], abs=1e-9)
    assert ours["valid"]["hr@50"] > 0
    with pytest.raises(ValueError, match="every k must be <= 100"):
        evaluate_sequences(lambda h, n, s: predict(h, n), d, ks=(10, 200), protocol="dreamrec")
    with pytest.raises(ValueError, match=r"score_fn must return \(100, 121\) scores"):
        evaluate_sequences(lambda h, n, s: predict(h, n)[:, :-1], d, protocol="dreamrec")


def test_most_popular():
    d, seqs = random_data(seed=2, repeats=False)
    mp = SequenceMostPopular(d)
    t = d.targets["train"]
    expect = np.bincount([int(seqs[s][p]) for s, p in zip(t.seq.tolist(), t.pos.tolist())], minlength=d.n_items)
    assert mp.counts.tolist() == expect.tolist()
    got = most_popular_metrics(d, ks=(5,))
    order = sorted(range(d.n_items), key=lambda j: (-expect[j], j))
    for split in ("valid", "test"):
        tt = d.targets[split]
        hr = np.mean([int(seqs[s][p]) in [j for j in order if j not in set(seqs[s][:p].tolist())][:5]
                      for s, p in zip(tt.seq.tolist(), tt.pos.tolist())])
        assert got[split]["hr@5"] == pytest.approx(hr) and got[split]["n"] == len(tt)
    assert SequenceMostPopular(d, pad_column=True).counts.shape == (d.n_items + 1,)
