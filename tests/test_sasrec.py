"""SASRec: weight-for-weight equality with RecBole's SASRec, the one-pass training objective, and training.

The RecBole tests build RecBole 1.2's own ``SASRec`` in a subprocess (RecBole
needs NumPy aliases that NumPy 2 removed; they are patched there only, as in
test_recbole.py), save its weights, scores and per-prefix losses, and compare
ours loaded from the same weights. They skip when RecBole cannot be imported.
The other tests build small ``SequenceData`` objects by hand and evaluate
with :func:`refit.evaluate.evaluate_sequences`.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from refit.baselines.sasrec_network import IGNORE, SASRec, left_pad
from refit.baselines.sasrec import (
    SASRecConfig,
    SASRecResult,
    evaluate_sasrec,
    expand_grid,
    fit_sasrec,
    load_sasrec,
    needs_start_token,
    save_sasrec,
    train_sasrec,
    training_windows,
    window_batch,
)
from refit.baselines.sequences import most_popular_metrics
from refit.data.sequences import SequenceData, Targets


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: on a shared machine, waking threads for each small op costs more than it saves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- RecBole's SASRec, in a subprocess ------------------------------------------------------------

_SHIM = """
import numpy as np
for _old, _new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_),
                   ("float", float), ("int", int), ("bool", bool), ("object", object), ("complex", complex),
                   ("str", str), ("long", int), ("unicode", str)):
    if _old not in np.__dict__:
        setattr(np, _old, _new)
"""

_SCRIPT = _SHIM + textwrap.dedent("""
import json, sys
import torch
try:
    from recbole.model.sequential_recommender.sasrec import SASRec
except Exception as exc:  # reported as the skip reason
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(3)

spec = json.load(open(sys.argv[1]))
L = spec["max_len"]


class Dataset:  # all SequentialRecommender reads from its dataset
    def num(self, field):
        return spec["n_items"] + 1  # RecBole counts its padding id 0 as an item


config = {"USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
          "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_", "MAX_ITEM_LIST_LENGTH": L,
          "device": "cpu", "n_layers": spec["n_layers"], "n_heads": spec["n_heads"],
          "hidden_size": spec["hidden"], "inner_size": spec["inner"], "hidden_dropout_prob": 0.3,
          "attn_dropout_prob": 0.3, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
          "initializer_range": 0.02, "loss_type": "CE"}
torch.manual_seed(spec["seed"])
model = SASRec(config, Dataset()).eval()
with torch.no_grad():  # far from the small initialisation, so that any difference of the maths shows
    for name, p in model.named_parameters():
        p.normal_(1.0 if name.endswith("LayerNorm.weight") else 0.0, 0.4)


def batch(windows):
    # RecBole's layout: right-padded with 0, lengths alongside
    seq = torch.zeros(len(windows), L, dtype=torch.long)
    for b, w in enumerate(windows):
        seq[b, :len(w)] = torch.tensor(w)
    return {"item_id_list": seq, "item_length": torch.tensor([len(w) for w in windows])}


def prefixes(sequence):
    # RecBole's training examples of a sequence: every prefix (its last L items) -> the next item
    return [sequence[max(0, k - L):k] for k in range(1, len(sequence))], sequence[1:]


out = {"state_dict": model.state_dict()}
with torch.no_grad():
    out["scores"] = model.full_sort_predict(batch(spec["windows"]))
    per_sequence, all_windows, all_targets = [], [], []
    for s in spec["sequences"]:
        w, t = prefixes(s)
        inter = {**batch(w), "item_id": torch.tensor(t)}
        per_sequence.append(model.calculate_loss(inter))
        per_prefix = [model.calculate_loss({**batch([wi]), "item_id": torch.tensor([ti])}) for wi, ti in zip(w, t)]
        out.setdefault("per_prefix", []).append(torch.stack(per_prefix))
        all_windows += w
        all_targets += t
    out["per_sequence"] = torch.stack(per_sequence)
    out["all_prefixes"] = model.calculate_loss({**batch(all_windows), "item_id": torch.tensor(all_targets)})
torch.save(out, spec["out"])
""")

SPEC = {"n_items": 17, "max_len": 8, "hidden": 16, "inner": 24, "n_layers": 2, "n_heads": 2, "seed": 7,
        # RecBole ids (1 .. n_items): windows to score, and training sequences that fit in max_len + 1
        "windows": [[3], [5, 1, 17], [2, 4, 6, 8, 10, 12, 14, 16], [17, 16, 15, 9]],
        "sequences": [[4, 9, 1, 13, 2, 7, 17, 5, 11], [6, 3, 3, 12], [8, 15]]}

@pytest.fixture(scope="module")
def recbole_run(tmp_path_factory):
    """RecBole's SASRec on SPEC: its state_dict, full_sort_predict scores and CE losses."""
    if importlib.util.find_spec("recbole") is None:
        pytest.skip("RecBole is not installed (see docs/drop-in.md: RecBole drop-in)")
    tmp = tmp_path_factory.mktemp("recbole_sasrec")
    spec = {**SPEC, "out": str(tmp / "out.pt")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    (tmp / "script.py").write_text(_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, str(tmp / "script.py"), str(tmp / "spec.json")], capture_output=True,
                         text=True, cwd=tmp, env=env, timeout=300)
    if run.returncode == 3:
        last = (run.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"RecBole is installed but its SASRec cannot be imported here: {last}")
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(spec["out"], weights_only=True)


def _ours(ids):
    """RecBole ids (1 .. n) -> ours (0 .. n - 1)."""
    return [i - 1 for i in ids]


def _left(windows, n_items, length):
    """Lists of our item ids -> (B, length) left-padded tokens."""
    out = torch.full((len(windows), length), n_items, dtype=torch.long)
    for b, w in enumerate(windows):
        if w:
            out[b, length - len(w):] = torch.tensor(w)
    return out


def _one_pass(sequences, n_items, length):
    """Tokens and labels of one causal pass per sequence: slot j's label is the item after it."""
    tokens = _left([s[:-1] for s in sequences], n_items, length)
    labels = torch.full_like(tokens, IGNORE)
    for b, s in enumerate(sequences):
        labels[b, length - len(s) + 1:] = torch.tensor(s[1:])
    return tokens, labels


def test_scores_equal_recbole_full_sort_predict(recbole_run):
    model = SASRec.from_recbole_state_dict(recbole_run["state_dict"], n_heads=SPEC["n_heads"]).eval()
    n = SPEC["n_items"]
    assert model.n_items == n and model.max_len == SPEC["max_len"] and model.inner == SPEC["inner"]
    with torch.no_grad():
        ours = model.scores(_left([_ours(w) for w in SPEC["windows"]], n, SPEC["max_len"]))
    theirs = recbole_run["scores"][:, 1:]  # RecBole's column 0 is its padding id
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # narrower windows (fewer padding slots) give the same scores
    with torch.no_grad():
        narrow = model.scores(_left([_ours(w) for w in SPEC["windows"][:2]], n, 3))
    torch.testing.assert_close(narrow, theirs[:2], atol=1e-5, rtol=1e-5)


def test_prefix_loss_equals_recbole(recbole_run):
    model = SASRec.from_recbole_state_dict(recbole_run["state_dict"], n_heads=SPEC["n_heads"]).eval()
    n, L = SPEC["n_items"], SPEC["max_len"]
    for s, per_prefix in zip(SPEC["sequences"], recbole_run["per_prefix"]):
        s = _ours(s)
        for k in range(1, len(s)):
            tokens = _left([s[max(0, k - L):k]], n, L)
            labels = torch.full_like(tokens, IGNORE)
            labels[0, -1] = s[k]
            with torch.no_grad():
                loss = model.loss(tokens, labels)
            torch.testing.assert_close(loss, per_prefix[k - 1], atol=1e-5, rtol=1e-5)


def test_one_pass_loss_equals_recbole_mean_over_prefixes(recbole_run):
    """One causal pass over each sequence = RecBole's per-prefix training batch (the objective is kept)."""
    model = SASRec.from_recbole_state_dict(recbole_run["state_dict"], n_heads=SPEC["n_heads"]).eval()
    n, L = SPEC["n_items"], SPEC["max_len"]
    seqs = [_ours(s) for s in SPEC["sequences"]]
    with torch.no_grad():
        for s, expected in zip(seqs, recbole_run["per_sequence"]):
            torch.testing.assert_close(model.loss(*_one_pass([s], n, L)), expected, atol=1e-5, rtol=1e-5)
        # a batch of sequences: the mean over all labelled slots is RecBole's mean over all prefixes
        torch.testing.assert_close(model.loss(*_one_pass(seqs, n, L)), recbole_run["all_prefixes"],
                                   atol=1e-5, rtol=1e-5)
        # without the padding class, the softmax runs over the items only
        model.padding_class = False
        tokens, labels = _one_pass(seqs, n, L)
        h = model(tokens)[labels != IGNORE]
        logits = h @ model.item_embedding.weight[:n].t()
        torch.testing.assert_close(model.loss(tokens, labels), F.cross_entropy(logits, labels[labels != IGNORE]))


# --- the model on its own ------------------------------------------------------------------------

def _model(**kw):
    torch.manual_seed(3)
    args = dict(n_items=23, max_len=10, hidden=16, n_blocks=2, n_heads=2, dropout=0.3)
    args.update(kw)
    return SASRec(**args).eval()


def test_one_pass_loss_equals_mean_of_own_prefix_losses():
    model = _model()
    seqs = [[1, 5, 7, 2, 9, 22, 0, 4, 13, 8, 3], [6, 6, 1], [12, 0]]
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            for k in range(1, len(s)):
                tokens = _left([s[:k]], 23, 10)
                labels = torch.full_like(tokens, IGNORE)
                labels[0, -1] = s[k]
                total += float(model.loss(tokens, labels, reduction="sum"))
                count += 1
        one = model.loss(*_one_pass(seqs, 23, 10))
    assert math.isclose(float(one), total / count, rel_tol=1e-5)


def test_causal_later_items_do_not_change_earlier_states():
    model = _model()
    tokens = torch.tensor([[23, 23, 4, 8, 15, 16, 2, 7, 1, 9]])
    with torch.no_grad():
        h = model(tokens)
        for j in range(2, 10):
            changed = tokens.clone()
            changed[0, j] = (changed[0, j] + 5) % 23
            h2 = model(changed)
            torch.testing.assert_close(h2[0, :j], h[0, :j], atol=0, rtol=0)
            assert not torch.allclose(h2[0, j], h[0, j])
        # scoring computes the last layer for the last slot only: the same state
        torch.testing.assert_close(model(tokens, last_only=True), h[:, -1], atol=1e-6, rtol=1e-5)


def test_padding_does_not_change_states():
    model = _model()
    items = [4, 8, 15, 16, 2]
    with torch.no_grad():
        alone = model(torch.tensor([items]))[0]
        left = model(_left([items, [1, 2, 3, 4, 5, 6, 7, 8]], 23, 10))[0, -5:]
        right = model(torch.tensor([items + [23] * 5]))[0, :5]
        # a different padding row changes nothing either
        model.item_embedding.weight.data[23].normal_()
        repadded = model(_left([items], 23, 9))[0, -5:]
    for other in (left, right, repadded):
        torch.testing.assert_close(other, alone, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(model(torch.full((1, 4), 23))).all()  # an all-padding window: no NaN


def test_dropout_only_in_training_mode():
    model = _model()
    tokens = _left([[1, 2, 3]], 23, 10)
    with torch.no_grad():
        a, b = model.scores(tokens), model.scores(tokens)
        model.train()
        c = model.scores(tokens)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)


def test_left_pad_converts_right_padded_windows():
    pad, start = 9, 10
    history = torch.tensor([[1, 2, 9, 9], [3, 4, 5, 6], [9, 9, 9, 9]])
    lengths = torch.tensor([2, 4, 0])
    assert left_pad(history, lengths, pad, 5).tolist() == [[9, 9, 9, 1, 2], [9, 3, 4, 5, 6], [9] * 5]
    assert left_pad(history, lengths, pad, 3).tolist() == [[9, 1, 2], [4, 5, 6], [9] * 3]
    # the start token precedes a whole history (a row that is not full), never a possibly truncated one
    assert left_pad(history, lengths, pad, 5, start).tolist() == [[9, 9, 10, 1, 2], [9, 3, 4, 5, 6],
                                                                  [9, 9, 9, 9, 10]]
    assert left_pad(history, lengths, pad, 3, start).tolist() == [[10, 1, 2], [4, 5, 6], [9, 9, 10]]


def test_recbole_round_trip_of_names():
    model = _model(padding_class=True)
    theirs = {"item_embedding.weight": torch.cat([model.item_embedding.weight[-1:], model.item_embedding.weight[:-1]]),
              "position_embedding.weight": model.position_embedding.weight,
              "LayerNorm.weight": model.input_norm.weight, "LayerNorm.bias": model.input_norm.bias}
    names = {"query": "multi_head_attention.query", "key": "multi_head_attention.key",
             "value": "multi_head_attention.value", "dense": "multi_head_attention.dense",
             "attn_norm": "multi_head_attention.LayerNorm", "ffn_in": "feed_forward.dense_1",
             "ffn_out": "feed_forward.dense_2", "ffn_norm": "feed_forward.LayerNorm"}
    for i in range(model.n_blocks):
        for mine, other in names.items():
            for p in ("weight", "bias"):
                theirs[f"trm_encoder.layer.{i}.{other}.{p}"] = getattr(model.blocks[i], mine).__getattr__(p)
    back = SASRec.from_recbole_state_dict(theirs, n_heads=2)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, atol=0, rtol=0)


# --- data, windows and evaluation ----------------------------------------------------------------

def _csr(rows, n_items):
    indptr = np.cumsum([0] + [len(r) for r in rows])
    indices = np.concatenate([np.asarray(sorted(r), dtype=np.int64) for r in rows]) if rows else []
    return sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(len(rows), n_items))


def _leave_one_out(seqs, n_items, repeats=False):
    """SequenceData like ml-1m_seq: the last item of each sequence is the test target, the one before
    the validation target, positions 1 .. n - 3 the training targets."""
    items = torch.tensor([i for s in seqs for i in s], dtype=torch.long)
    offsets = torch.tensor(np.cumsum([0] + [len(s) for s in seqs]), dtype=torch.long)
    tr = [(u, p) for u, s in enumerate(seqs) for p in range(1, len(s) - 2)]
    targets = {"train": Targets(torch.tensor([u for u, _ in tr]), torch.tensor([p for _, p in tr])),
               "valid": Targets(torch.arange(len(seqs)), torch.tensor([len(s) - 2 for s in seqs])),
               "test": Targets(torch.arange(len(seqs)), torch.tensor([len(s) - 1 for s in seqs]))}
    return SequenceData(n_items, items, offsets, targets, max_len=50,
                        train=_csr([set(s[:-2]) for s in seqs], n_items), name="test", repeats=repeats)


def _sessions(train, valid, test, n_items):
    """SequenceData like DreamRec's: one sequence per session, every position a target of its split."""
    seqs = train + valid + test
    items = torch.tensor([i for s in seqs for i in s], dtype=torch.long)
    offsets = torch.tensor(np.cumsum([0] + [len(s) for s in seqs]), dtype=torch.long)
    targets, first = {}, 0
    for name, group in (("train", train), ("valid", valid), ("test", test)):
        pairs = [(first + u, p) for u, s in enumerate(group) for p in range(len(s))]
        targets[name] = Targets(torch.tensor([u for u, _ in pairs], dtype=torch.long),
                                torch.tensor([p for _, p in pairs], dtype=torch.long))
        first += len(group)
    return SequenceData(n_items, items, offsets, targets, max_len=10,
                        train=_csr([set(s) for s in train] + [set()] * (len(valid) + len(test)), n_items),
                        name="sessions", repeats=True)


def test_training_windows_and_batches():
    data = _leave_one_out([[5, 1, 2, 3, 4, 0, 6], [7, 8, 9, 1, 2]], 10)
    # targets: seq 0 positions 1..4, seq 1 positions 1..2; valid / test after them
    w = training_windows(data, max_len=3, start_token=False, cover="last")
    assert w.seq.tolist() == [0, 1] and w.end.tolist() == [4, 2] and w.start.tolist() == [1, 0]
    assert (w.n_targets, w.n_used, w.n_dropped) == (6, 5, 0)
    tokens, labels = window_batch(data, w, torch.tensor([0, 1]))
    assert tokens.tolist() == [[1, 2, 3], [10, 7, 8]]
    assert labels.tolist() == [[2, 3, 4], [IGNORE, 8, 9]]
    w = training_windows(data, max_len=3, start_token=False, cover="all")  # every target once
    assert sorted(zip(w.seq.tolist(), w.start.tolist(), w.end.tolist())) == [(0, 0, 1), (0, 1, 4), (1, 0, 2)]
    assert w.n_used == 6
    tokens, labels = window_batch(data, w, torch.arange(len(w)))
    assert (labels != IGNORE).sum() == 6
    # a start token: token 0 is the start, item position p is token p + 1
    w = training_windows(data, max_len=3, start_token=True, cover="last")
    assert w.end.tolist() == [5, 3]
    tokens, labels = window_batch(data, w, torch.tensor([1]), start_id=11)
    assert tokens.tolist() == [[11, 7, 8]] and labels.tolist() == [[IGNORE, 8, 9]]  # position 0 is no target


def test_session_targets_use_the_start_token():
    data = _sessions([[0, 3, 4], [0, 5]], [[0, 3]], [[1]], 6)
    assert needs_start_token(data)
    w = training_windows(data, max_len=4, start_token=True)
    tokens, labels = window_batch(data, w, torch.arange(len(w)), start_id=7)
    assert tokens.tolist() == [[7, 0, 3], [6, 7, 0]] and labels.tolist() == [[0, 3, 4], [IGNORE, 0, 5]]
    # without it the first item of a session is untrainable, and said so
    w = training_windows(data, max_len=4, start_token=False)
    assert (w.n_dropped, w.n_used) == (2, 3)


def _markov(n_seq, n_items, length, seed, noise=0.1):
    """Sequences that mostly step item i -> i + 1 (mod n_items) from a random start; a few random jumps."""
    g = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_seq):
        s = [int(g.integers(n_items))]
        while len(s) < length:
            s.append(int(g.integers(n_items)) if g.random() < noise else (s[-1] + 1) % n_items)
        seqs.append(s)
    return seqs


def _most_popular_hr20(data):
    return most_popular_metrics(data, ("test",), ks=(20,))["test"]["hr@20"]


def test_training_beats_most_popular():
    data = _leave_one_out(_markov(160, 60, 14, seed=1), 60, repeats=True)
    pop = _most_popular_hr20(data)
    run = train_sasrec(data, SASRecConfig(hidden=32, n_blocks=1, n_heads=1, max_len=12, dropout=0.1, lr=5e-3,
                                          batch_size=32, max_epochs=25, patience=3, seed=0))
    test = evaluate_sasrec(run.model, data, ("test",), ks=(20,))["test"]["hr@20"]
    assert run.history and run.best_valid == max(r["valid hr@20"] for r in run.history)
    assert pop < 0.5 and test > pop + 0.3, (pop, test, run.history)


def test_sessions_learn_first_items():
    # every session starts with item 0 or 1: only a start token lets SASRec predict the first item
    g = np.random.default_rng(2)
    make = lambda n: [[int(g.integers(2))] + [int(x) for x in g.integers(2, 30, size=3)] for _ in range(n)]  # noqa
    data = _sessions(make(120), make(30), make(30), 30)
    run = train_sasrec(data, SASRecConfig(hidden=16, n_blocks=1, max_len=6, dropout=0.0, lr=1e-2, batch_size=32,
                                          max_epochs=8, patience=8, seed=0))
    assert run.model.start_token and run.windows["dropped"] == 0
    first = Targets(data.targets["test"].seq[data.targets["test"].pos == 0], torch.zeros(30, dtype=torch.long))
    only_first = SequenceData(data.n_items, data.items, data.offsets, {"test": first}, max_len=6, repeats=True)
    hr2 = evaluate_sasrec(run.model, only_first, ("test",), ks=(2,))["test"]["hr@2"]
    assert hr2 == 1.0
    # DreamRec's protocol scores the padding id too (SASRec gives it -inf) and drops the last partial batch
    full = evaluate_sasrec(run.model, data, ("test",), ks=(10,))["test"]
    dream = evaluate_sasrec(run.model, data, ("test",), ks=(10,), protocol="dreamrec")["test"]
    assert dream["n"] == 100 and full["n"] == 120 and 0 < dream["hr@10"] <= 1


def test_seeded_runs_repeat_and_seeds_differ():
    data = _leave_one_out(_markov(40, 20, 10, seed=3), 20)
    cfg = SASRecConfig(hidden=16, n_blocks=2, n_heads=2, max_len=8, dropout=0.3, batch_size=8, max_epochs=2,
                       patience=5, seed=11)
    state = torch.get_rng_state()
    a, b = train_sasrec(data, cfg), train_sasrec(data, cfg)
    c = train_sasrec(data, cfg, seed=12)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is left alone
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert a.history == [{**r, "elapsed_s": a.history[i]["elapsed_s"]} for i, r in enumerate(b.history)]
    assert not torch.equal(a.model.item_embedding.weight, c.model.item_embedding.weight)


def test_time_budget_and_max_steps_stop_the_run():
    data = _leave_one_out(_markov(64, 20, 10, seed=4), 20)
    run = train_sasrec(data, hidden=16, max_len=8, batch_size=4, max_epochs=50, max_steps=5)
    assert run.stopped == "max_steps" and run.steps == 5 and run.epochs == pytest.approx(5 / 16)
    assert len(run.history) == 1  # the partial epoch was validated once
    run = train_sasrec(data, hidden=16, max_len=8, batch_size=4, max_epochs=1000, patience=1000, time_budget=1.0)
    assert run.stopped == "time budget" and run.train_s < 3.0


def test_fit_sasrec_tunes_a_grid(tmp_path):
    data = _leave_one_out(_markov(60, 25, 10, seed=5), 25)
    grid = {"hidden": [16], "dropout": [0.0, 0.5], "max_len": [4, 8]}
    assert len(expand_grid(grid)) == 4
    with pytest.raises(ValueError, match="unknown SASRec settings"):
        expand_grid({"hidden_size": [8]})
    res = fit_sasrec(data, grid, ks=(10,), max_epochs=2, batch_size=16, lr=5e-3)
    assert isinstance(res, SASRecResult) and res.name == "sasrec" and len(res.grid) == 4
    best = max(res.grid, key=lambda r: r["valid hr@20"])
    assert res.params == {k: best[k] for k in grid}
    assert res.valid["hr@20"] == pytest.approx(best["valid hr@20"])
    assert {"hr@10", "hr@20", "ndcg@20"} <= set(res.test)
    assert res.tune_s >= res.fit_s > 0 and res.model is not None
    assert any("max_epochs" in n for n in res.notes)
    json.dumps(res.to_dict())
    save_sasrec(res.model, tmp_path / "m.pt")
    back = load_sasrec(tmp_path / "m.pt")
    tokens = _left([[1, 2, 3]], 25, 4)
    with torch.no_grad():
        torch.testing.assert_close(back.scores(tokens), res.model.scores(tokens), atol=0, rtol=0)


def test_refit_baselines_on_sequences_runs_most_popular_and_a_tuned_sasrec(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from refit.data import load_dataset
    from refit.baselines.sequences import most_popular_metrics

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "refit", "-q", "baselines", "--data", "synthetic-seq", "--sasrec-max-len", "10",
           "--sasrec-dropout", "0.2,0.5", "--sasrec-max-epochs", "2", "--out", str(tmp_path / "b")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "hr@20" in out.stdout and "sasrec (max_len=10, dropout=" in out.stdout
    with open(tmp_path / "b" / "baselines.json") as f:
        payload = json.load(f)
    pop, sasrec = payload["results"]
    assert pop["name"] == "most-popular" and sasrec["name"] == "sasrec"
    assert pop["test"] == most_popular_metrics(load_dataset("synthetic-seq"), ks=(10, 20, 50))["test"]
    assert len(sasrec["grid"]) == 2 and sasrec["params"]["max_len"] == 10
    assert payload["best"].startswith(max((pop, sasrec), key=lambda r: r["valid"]["hr@20"])["name"])
    bad = subprocess.run(cmd[:7] + ["--only", "itemknn", "--out", str(tmp_path / "x")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "sequence baselines are most-popular, sasrec" in bad.stderr


def test_refit_evaluate_prints_the_sequence_baselines_under_a_dreamrec_checkpoint(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from refit.families.dreamrec.pretrain import DreamRecConfig, pretrain_dreamrec

    opts = {"n_users": 60, "n_items": 40, "mean_length": 8, "seed": 5}
    pretrain_dreamrec(DreamRecConfig(data="synthetic-seq", data_options=opts, hidden=8, steps=8, epochs=1,
                                     eval_every=1, batch_size=64, eval_batch_size=64, progress=False, ks=(10, 20),
                                     out=str(tmp_path / "pre")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ckpt = str(tmp_path / "pre" / "best.pt")
    evaluate = [sys.executable, "-m", "refit", "-q", "evaluate", "--checkpoint", ckpt, "--split", "both",
                "--ks", "10,20"]
    out = subprocess.run(evaluate, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "most-popular: test" in out.stdout and "sasrec" not in out.stdout  # no SASRec fitted yet
    # Data other than the checkpoint's: its SASRec rows are not shown.
    subprocess.run([sys.executable, "-m", "refit", "-q", "baselines", "--data", "synthetic-seq", "--sasrec-max-len",
                    "8", "--sasrec-dropout", "0.2", "--sasrec-max-epochs", "1", "--out", str(tmp_path / "pre")],
                   check=True, capture_output=True, env=env, timeout=300)
    out = subprocess.run(evaluate, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0 and "sasrec" not in out.stdout, out.stdout
    with open(tmp_path / "pre" / "baselines.json") as f:
        payload = json.load(f)
    from refit.data import load_dataset
    from refit.runtime.runs import data_fingerprint

    payload["fingerprint"] = data_fingerprint(load_dataset("synthetic-seq", **opts))
    sasrec = next(r for r in payload["results"] if r["name"] == "sasrec")
    sasrec["test"]["hr@20"] = 0.987654
    with open(tmp_path / "pre" / "baselines.json", "w") as f:
        json.dump(payload, f)
    out = subprocess.run(evaluate + ["--json"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["baselines"]
    label = next(k for k in rows if k.startswith("sasrec ("))
    assert set(rows) == {"most-popular", label} and "max_len=8" in label and "dropout=0.2" in label
    assert rows[label]["test"]["hr@20"] == 0.987654
    assert 0 <= rows["most-popular"]["test"]["hr@20"] <= 1
