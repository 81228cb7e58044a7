"""PreferDiff's data format (train_data.txt, valid_data.txt, test_data.txt: one user per line) and its
evaluation protocol (Recall / NDCG at 5 and 10, every item ranked, nothing masked): small folders written
here, the published Beauty split when it is present, malformed files, and ``refit evaluate --protocol
preferdiff``."""

import json
import math
import os

import numpy as np
import pytest
import torch

from _testing import shared_dataset
import refit.data.sequences as seqdata
from refit import cli
from refit.data import DataFormatError, DataOptionsError, load_dataset
from refit.baselines.sequences import SequenceMostPopular, most_popular_metrics
from refit.data.sequences import SequenceData, is_sequence_source, load_sequences
from refit.evaluate import evaluate_sequences


def write_folder(folder, train, valid, test):
    """A PreferDiff folder; each split is the text of its file, written as bytes (str: UTF-8)."""
    os.makedirs(folder, exist_ok=True)
    for text, name in ((train, "train_data.txt"), (valid, "valid_data.txt"), (test, "test_data.txt")):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
    return str(folder)


def sequences_of(d: SequenceData):
    items, offsets = d.items.tolist(), d.offsets.tolist()
    return [items[offsets[s]:offsets[s + 1]] for s in range(d.n_sequences)]


def targets_of(d: SequenceData, split):
    t = d.targets[split]
    return list(zip(t.seq.tolist(), t.pos.tolist()))


# 1-based ids 1..9, the id 8 never occurs; a blank line ends train_data.txt, test_data.txt has no final newline.
TRAIN = "3 5 7\n5 2\n9 3 5 2 1\n\n"
VALID = "2 4 6\n1 3\n"
TEST = "6 4 9"


@pytest.fixture
def tiny(tmp_path):
    return write_folder(tmp_path / "tiny", TRAIN, VALID, TEST)


def test_tiny_folder_exactly(tiny):
    assert is_sequence_source(tiny)
    d = load_dataset(tiny, train_targets="last")
    assert isinstance(d, SequenceData)
    # Ids are 1-based: item i is the id i + 1, and the id space runs to the largest id (8 stays an item).
    assert d.n_items == 9 and d.item_ids.tolist() == list(range(1, 10))
    assert d.summary["id_base"] == 1 and d.summary["source"] == "preferdiff"
    assert sequences_of(d) == [[2, 4, 6], [4, 1], [8, 2, 4, 1, 0],   # train_data.txt
                               [1, 3, 5], [0, 2],                     # valid_data.txt
                               [5, 3, 8]]                             # test_data.txt
    # One training example per line of train_data.txt, its last id (PreferDiff's SequenceDataset).
    assert targets_of(d, "train") == [(0, 2), (1, 1), (2, 4)]
    assert d.target_items(d.targets["train"]).tolist() == [6, 1, 0]
    assert targets_of(d, "valid") == [(3, 2), (4, 1)]
    assert targets_of(d, "test") == [(5, 2)]
    assert d.item_ids[d.target_items(d.targets["test"]).numpy()].tolist() == [9]
    history, lengths = d.windows(d.targets["valid"].seq, d.targets["valid"].pos)
    assert d.max_len == 10 and lengths.tolist() == [2, 1]
    assert history.tolist() == [[1, 3] + [9] * 8, [0] + [9] * 9]
    # The training matrix holds the training lines only; valid and test histories are not training data.
    assert d.train.toarray().astype(int).tolist() == [
        [0, 0, 1, 0, 1, 0, 1, 0, 0], [0, 1, 0, 0, 1, 0, 0, 0, 0], [1, 1, 1, 0, 1, 0, 0, 0, 1],
        [0] * 9, [0] * 9, [0] * 9]
    assert d.sequence_ids.tolist() == [1, 2, 3, 1, 2, 1]
    assert not d.repeats
    assert {k: d.summary[k] for k in ("lines_train", "lines_valid", "lines_test", "targets_train",
                                      "history_max", "train_targets")} == {
        "lines_train": 3, "lines_valid": 2, "lines_test": 1, "targets_train": 3, "history_max": 4,
        "train_targets": "last"}
    # Most-popular counts the training targets: ids 7, 2 and 1 once each.
    assert SequenceMostPopular(d).counts.tolist() == [1, 1, 0, 0, 0, 0, 1, 0, 0]


def test_every_prefix_and_window_options(tiny):
    d = load_sequences(tiny, train_targets="all", max_len=2)
    assert targets_of(d, "train") == [(0, 1), (0, 2), (1, 1), (2, 1), (2, 2), (2, 3), (2, 4)]
    default = load_sequences(tiny)  # every prefix, as leave-one-out data trains
    assert targets_of(default, "train") == targets_of(d, "train") and default.summary["train_targets"] == "all"
    assert targets_of(d, "valid") == [(3, 2), (4, 1)] and targets_of(d, "test") == [(5, 2)]
    history, lengths = d.windows(torch.tensor([2]), torch.tensor([4]))
    assert history.tolist() == [[4, 1]] and lengths.tolist() == [2]  # the last max_len items of the history
    with pytest.raises(ValueError, match="train_targets must be one of 'last', 'all'"):
        load_sequences(tiny, train_targets="prefixes")
    with pytest.raises(DataOptionsError, match="min_rating"):
        load_dataset(tiny, min_rating=4)
    # One of the three files names its folder.
    assert sequences_of(load_sequences(os.path.join(tiny, "valid_data.txt"))) == sequences_of(load_sequences(tiny))


def test_zero_based_ids_and_lenient_layout(tmp_path):
    # Id 0 occurs: the file is 0-based and item i is the id i. CRLF, a BOM, tabs and runs of spaces,
    # and several blank lines at the end are accepted.
    folder = write_folder(tmp_path / "z", "\ufeff0  1\t2\r\n3 0\r\n\r\n  \n", "2 3\n", "1 3\n\n\n")
    d = load_sequences(folder)
    assert d.summary["id_base"] == 0 and d.n_items == 4 and d.item_ids.tolist() == [0, 1, 2, 3]
    assert sequences_of(d) == [[0, 1, 2], [3, 0], [2, 3], [1, 3]]
    assert targets_of(d, "train") == [(0, 1), (0, 2), (1, 1)]  # every prefix (the default)
    assert d.target_items(d.targets["test"]).tolist() == [3]


BAD = [
    # (split written badly, its text, line named, message)
    ("train", "1 2 3\n4 x 5\n", 2, "item id 'x' is not an integer"),
    ("valid", "1 2\n3 4.0\n", 2, "item id '4.0' is not an integer"),
    ("test", "1 -2 3\n", 1, "negative item id -2"),
    ("train", "1 2\n\n3 4\n", 2, "empty line"),
    ("valid", "1 2\n   \n3 4\n", 2, "empty line"),
    ("train", "1 2\n7\n3 4\n", 2, "one id only \\(7\\): a target without history"),
    ("test", "1 2\n3 99999999999999999999\n", 2, "does not fit in a 64-bit integer"),
    ("valid", b"1 2\n\xff 3\n", 2, "not UTF-8"),
    ("test", "1 2\n3 5000000\n", 2, "far above the 4 distinct ids"),
]


@pytest.mark.parametrize("split,text,line,message", BAD, ids=[m.split()[0] + str(i) for i, (*_, m) in enumerate(BAD)])
def test_malformed_lines_name_file_and_line(tmp_path, split, text, line, message):
    files = {"train": "1 2 3\n", "valid": "2 3\n", "test": "3 4\n", split: text}
    folder = write_folder(tmp_path / "bad", files["train"], files["valid"], files["test"])
    path = os.path.join(folder, seqdata.PREFERDIFF_FILES[split])
    with pytest.raises(DataFormatError, match=message) as info:
        load_dataset(folder)
    assert info.value.path == path and info.value.line == line
    assert str(info.value).startswith(f"{path}, line {line}: ")


@pytest.mark.parametrize("text", ["", "\n\n  \n"], ids=["empty", "blank"])
def test_a_file_without_sequences(tmp_path, text):
    folder = write_folder(tmp_path / "e", "1 2\n", text, "2 1\n")
    with pytest.raises(DataFormatError, match="holds no sequence") as info:
        load_sequences(folder)
    assert info.value.path == os.path.join(folder, "valid_data.txt") and info.value.line is None


@pytest.mark.parametrize("missing", ["train_data.txt", "valid_data.txt", "test_data.txt"])
def test_a_missing_file_is_named(tmp_path, missing):
    folder = write_folder(tmp_path / "m", "1 2\n", "2 3\n", "3 1\n")
    os.remove(os.path.join(folder, missing))
    assert is_sequence_source(folder)
    with pytest.raises(DataFormatError, match="no such file") as info:
        load_dataset(folder)
    assert info.value.path == os.path.join(folder, missing) and info.value.line is None


def test_published_beauty_split():
    folder = shared_dataset("preferdiff_beauty")
    if folder is None:
        pytest.skip("../shared/data/preferdiff_beauty is absent")
    d = load_dataset(folder, train_targets="last")
    # Line counts of the data README: one sequence and one target per line (PreferDiff's training set).
    assert [d.summary[f"lines_{s}"] for s in ("train", "valid", "test")] == [17890, 2236, 2237]
    assert [len(d.targets[s]) for s in ("train", "valid", "test")] == [17890, 2236, 2237]
    with open(os.path.join(folder, "train_data.txt")) as f:
        prefixes = sum(len(line.split()) - 1 for line in f if line.strip())
    assert len(load_dataset(folder).targets["train"]) == prefixes > 17890  # the default: every prefix
    assert d.n_sequences == 22363 and d.n_items == 12101 and d.summary["id_base"] == 1
    assert d.item_ids[0] == 1 and d.item_ids[-1] == 12101 and not d.repeats
    # The first and last lines, read here by hand.
    with open(os.path.join(folder, "train_data.txt")) as f:
        first = [int(x) for x in f.readline().split()]
    with open(os.path.join(folder, "test_data.txt")) as f:
        last = [int(x) for x in f.read().split("\n")[-2].split()]
    seqs = sequences_of(d)
    assert d.item_ids[seqs[0]].tolist() == first and d.item_ids[seqs[-1]].tolist() == last
    t = d.targets["test"][len(d.targets["test"]) - 1:]
    history, n = d.windows(t.seq, t.pos)
    assert d.item_ids[d.target_items(t).numpy()].tolist() == [last[-1]]
    assert d.item_ids[history[0, :int(n[0])].numpy()].tolist() == last[:-1][-10:]
    # Most-popular under PreferDiff's protocol, against a ranking computed here (count, then lower id).
    got = most_popular_metrics(d, ("test",), ks=(5, 10), protocol="preferdiff")["test"]
    counts = np.bincount(d.target_items(d.targets["train"]).numpy(), minlength=d.n_items)
    target = d.target_items(d.targets["test"]).numpy()
    c = counts[target]
    rank = np.array([(counts > ci).sum() + (counts[:ti] == ci).sum() for ti, ci in zip(target, c)])
    for k in (5, 10):
        assert got[f"recall@{k}"] == pytest.approx(np.mean(rank < k), abs=1e-12)
        assert got[f"ndcg@{k}"] == pytest.approx(np.mean(np.where(rank < k, 1 / np.log2(rank + 2), 0)), abs=1e-12)
    assert got["recall@10"] > 0.005 and got["n"] == 2237


# --- the protocol ---------------------------------------------------------------------------------------------

# Ids 1..12; the score function ranks item 0 (id 1) first, then item 1, ... Test lines, as (history, target)
# in dense indices, with the 0-based rank of the target with the history ranked (PreferDiff) and excluded:
#   "1 2 7"        history [0, 1]          target 6   rank 6, excluded 4
#   "3 1"          history [2]             target 0   rank 0, excluded 0
#   "2 9 12"       history [1, 8]          target 11  rank 11, excluded 9
#   "4 7 4"        history [3, 6]          target 3   rank 3, excluded: the target is history, a miss
#   "1 2 3 4 5 6"  history [0, 1, 2, 3, 4] target 5   rank 5, excluded 0
PROTOCOL_TEST = "1 2 7\n3 1\n2 9 12\n4 7 4\n1 2 3 4 5 6\n"


def _ndcg(*ranks):
    return sum(1 / math.log2(r + 2) for r in ranks)


def test_preferdiff_protocol_by_hand(tmp_path):
    folder = write_folder(tmp_path / "p", "1 2 3\n4 5 6\n7 8 9\n10 11 12\n", "5 6\n", PROTOCOL_TEST)
    d = load_sequences(folder)
    assert d.n_items == 12 and d.repeats  # "4 7 4" repeats an item
    calls = []

    def score_fn(history, lengths, seq):
        calls.append(history.clone())
        return torch.arange(d.n_items, 0, -1, dtype=torch.float32).expand(history.shape[0], -1)

    got = evaluate_sequences(score_fn, d, ("test",), protocol="preferdiff", batch_size=2)["test"]
    assert sorted(got) == ["hr@10", "hr@5", "mrr@10", "mrr@5", "n", "ndcg@10", "ndcg@5", "recall@10", "recall@5"]
    assert got["n"] == 5
    assert got["recall@5"] == pytest.approx(2 / 5) and got["recall@10"] == pytest.approx(4 / 5)
    assert got["ndcg@5"] == pytest.approx(_ndcg(0, 3) / 5)
    assert got["ndcg@10"] == pytest.approx(_ndcg(6, 0, 3, 5) / 5)
    assert got["mrr@10"] == pytest.approx((1 / 7 + 1 + 1 / 4 + 1 / 6) / 5)
    assert all(got[f"recall@{k}"] == got[f"hr@{k}"] for k in (5, 10))
    assert torch.equal(torch.cat(calls), d.windows(d.targets["test"].seq, d.targets["test"].pos)[0])
    # The full protocol excluding the history ranks differently: the target in its history is a miss.
    full = evaluate_sequences(score_fn, d, ("test",), ks=(5, 10), exclude_history=True)["test"]
    assert full["hr@5"] == pytest.approx(3 / 5) and full["hr@10"] == pytest.approx(4 / 5)
    assert full["ndcg@5"] == pytest.approx(_ndcg(4, 0, 0) / 5)
    assert full["ndcg@10"] == pytest.approx(_ndcg(4, 0, 9, 0) / 5)
    assert "recall@5" not in full
    # ks given are used; PreferDiff's protocol never excludes the history and ranks n_items columns.
    assert sorted(k for k in evaluate_sequences(score_fn, d, "test", ks=(3,), protocol="preferdiff")["test"]
                  if "@" in k) == ["hr@3", "mrr@3", "ndcg@3", "recall@3"]
    with pytest.raises(ValueError, match="never excludes the history"):
        evaluate_sequences(score_fn, d, ("test",), protocol="preferdiff", exclude_history=True)
    with pytest.raises(ValueError, match=r"score_fn must return \(5, 12\) scores"):
        evaluate_sequences(lambda h, n, s: torch.zeros(h.shape[0], 13), d, ("test",), protocol="preferdiff")
    with pytest.raises(ValueError, match="'full', 'dreamrec', 'preferdiff'"):
        evaluate_sequences(score_fn, d, ("test",), protocol="preferdif")


def test_preferdiff_protocol_differs_from_the_full_default_without_repeats(tmp_path):
    # Without repeats the full protocol excludes the history by default; PreferDiff's never does.
    folder = write_folder(tmp_path / "q", "1 2 3\n4 5 6\n7 8 9\n10 11 12\n", "5 6\n", "1 2 7\n3 1\n2 9 12\n")
    d = load_sequences(folder)
    assert not d.repeats

    def score_fn(history, lengths, seq):
        return torch.arange(d.n_items, 0, -1, dtype=torch.float32).expand(history.shape[0], -1)

    pd_ = evaluate_sequences(score_fn, d, ("test",), protocol="preferdiff")["test"]
    full = evaluate_sequences(score_fn, d, ("test",), ks=(5, 10))["test"]
    assert pd_["recall@5"] == pytest.approx(1 / 3) and pd_["recall@10"] == pytest.approx(2 / 3)
    assert pd_["ndcg@10"] == pytest.approx(_ndcg(6, 0) / 3)
    assert full["hr@5"] == pytest.approx(2 / 3) and full["hr@10"] == pytest.approx(1.0)
    assert full["ndcg@10"] == pytest.approx(_ndcg(4, 0, 9) / 3)
    # The full protocol's defaults are unchanged: ks 10, 20, 50.
    assert sorted(k for k in evaluate_sequences(score_fn, d, "test")["test"] if k.startswith("hr@")) == \
        ["hr@10", "hr@20", "hr@50"]


# --- the command line -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dreamrec_checkpoint(tmp_path_factory):
    from refit.families.dreamrec.pretrain import DreamRecConfig, pretrain_dreamrec

    root = tmp_path_factory.mktemp("pdcli")
    rng = np.random.default_rng(0)
    lines = {s: "\n".join(" ".join(str(int(i)) for i in rng.permutation(np.arange(1, 61))[:int(rng.integers(2, 8))])
                          for _ in range(n)) + "\n" for s, n in (("train", 60), ("valid", 12), ("test", 13))}
    folder = write_folder(root / "data", lines["train"], lines["valid"], lines["test"])
    cfg = DreamRecConfig(data=folder, hidden=8, steps=5, epochs=1, batch_size=32, eval_every=1, eval_batch_size=64,
                         progress=False, out=str(root / "run"))
    pretrain_dreamrec(cfg, load_dataset(folder))
    return folder, str(root / "run" / "best.pt")


def test_cli_evaluate_with_the_preferdiff_protocol(dreamrec_checkpoint, capsys):
    from refit.families.dreamrec.recommender import evaluate_dreamrec
    from refit.families.dreamrec.pretrain import load_seq_recommender

    folder, checkpoint = dreamrec_checkpoint
    assert cli.main(["-q", "evaluate", "--checkpoint", checkpoint, "--protocol", "preferdiff", "--split", "both",
                     "--json", "--no-baselines"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(out) == ["test", "valid"]
    assert sorted(out["test"]) == ["hr@10", "hr@5", "mrr@10", "mrr@5", "n", "ndcg@10", "ndcg@5", "recall@10",
                                   "recall@5"]
    assert out["valid"]["n"] == 12 and out["test"]["n"] == 13
    # The same numbers as the library under that protocol (the CLI's seed 0 and batch size 1024).
    data = load_dataset(folder)
    rec, data, _ = load_seq_recommender(checkpoint, data)
    lib = evaluate_dreamrec(rec, data, ("valid", "test"), ks=(5, 10), batch_size=1024, seed=0, protocol="preferdiff")
    assert out == json.loads(json.dumps(lib))
    # The table prints Recall and NDCG at 5 and 10, with most-popular under the same protocol.
    assert cli.main(["-q", "evaluate", "--checkpoint", checkpoint, "--protocol", "preferdiff"]) == 0
    text = capsys.readouterr().out
    assert "preferdiff protocol" in text
    header = next(line for line in text.splitlines() if "recall@5" in line).split()
    assert header == ["recall@5", "ndcg@5", "recall@10", "ndcg@10"]
    mp = most_popular_metrics(data, ("test",), ks=(5, 10), protocol="preferdiff")["test"]
    row = next(line for line in text.splitlines() if line.startswith("most-popular")).split()[1:]
    assert [float(v) for v in row] == [round(mp[m], 4) for m in ("recall@5", "ndcg@5", "recall@10", "ndcg@10")]
    # --ks overrides the default; the history cannot be excluded under this protocol.
    assert cli.main(["-q", "evaluate", "--checkpoint", checkpoint, "--protocol", "preferdiff", "--ks", "1,3",
                     "--json", "--no-baselines"]) == 0
    assert sorted(k for k in json.loads(capsys.readouterr().out)["test"] if k.startswith("recall")) == \
        ["recall@1", "recall@3"]
    assert cli.main(["-q", "evaluate", "--checkpoint", checkpoint, "--protocol", "preferdiff",
                     "--exclude-history"]) == 2
    assert "never excludes the history" in capsys.readouterr().err
