"""Scale-out on torch.distributed: 2 processes with gloo on tiny data against one process.

The multi-process tests launch ``python -m torch.distributed.run --standalone
--nproc_per_node 2`` (one CPU thread each); the scenarios are in
tests/_dist_cases.py and run in both settings.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import _dist_cases as cases
import refit_kernels as rk
from refit.runtime import distributed as dist
from refit.data import UserBatches
from refit.diffusion import DiffusionConfig, GaussianDiffusion
from refit.families.diffrec.pretrain import pretrain
from refit.runtime.runs import load_checkpoint
from refit.similarity import top_similar_users

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # The processes import this checkout's refit, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def torchrun(*args, cwd, nproc=2, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def refit_cli(*args, cwd):
    out = subprocess.run([sys.executable, "-m", "refit", "-q", *args], capture_output=True, text=True, cwd=cwd,
                         env=_env(), timeout=240)
    assert out.returncode == 0, out.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    pretrain(cases.pretrain_config(str(out)))
    return str(out / "best.pt")


@pytest.fixture(scope="module")
def dreamrec_pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("dreamrec") / "run"
    from refit.families.dreamrec.pretrain import pretrain_dreamrec

    # The start of the fine-tuning cases recommends with the weight it trained with (w 2): chosen on this
    # tiny validation split, the weight chosen left every reward group of the group-advantage case tied
    # (no gradient).
    pretrain_dreamrec(cases.dreamrec_config(str(out), w_grid=None))
    return str(out / "best.pt")


@pytest.fixture(scope="module")
def starts(pretrained, dreamrec_pretrained):
    return {"diffrec": pretrained, "dreamrec": dreamrec_pretrained}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, pretrained, dreamrec_pretrained):
    """The results of tests/_dist_worker.py run by 2 processes."""
    out = tmp_path_factory.mktemp("dist")
    torchrun(os.path.join(HERE, "_dist_worker.py"), str(out), pretrained, dreamrec_pretrained, cwd=str(out))
    return torch.load(out / "results.pt", weights_only=False)


# --- single-process helpers ------------------------------------------------------------------------

def test_shard_ranges_cover_in_order():
    for n in (0, 1, 5, 16, 17):
        for w in (1, 2, 3, 8):
            ranges = [dist.shard_range(n, r, w) for r in range(w)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert dist.shard(list(range(7)), 1, 3) == [3, 4]
    with pytest.raises(ValueError, match="rank must be in"):
        dist.shard_range(4, 2, 2)


def test_single_process_helpers_are_identities():
    assert not dist.is_distributed() and dist.is_main() and dist.world_size() == 1 and dist.rank() == 0
    x = torch.arange(6.0).view(3, 2)
    assert torch.equal(dist.all_reduce_sum(x), x) and torch.equal(dist.all_gather_rows(x), x)
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.any_rank(True) and not dist.any_rank(False)
    lin = torch.nn.Linear(2, 2)
    lin(torch.ones(1, 2)).sum().backward()
    before = [p.grad.clone() for p in lin.parameters()]
    dist.average_gradients(lin.parameters())
    assert all(torch.equal(p.grad, g) for p, g in zip(lin.parameters(), before))
    assert dist.init().initialized is False  # no WORLD_SIZE > 1 in the environment: nothing to join
    assert any("single process" in line for line in dist.describe())


def test_init_names_bad_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK must be in"):
        dist.init()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK must be an integer"):
        dist.init()


def test_similar_users_of_a_user_range_are_rows_of_the_full_table():
    train = cases.data().train
    full, sims = top_similar_users(train, m=6, return_similarity=True, block_size=17)
    for lo, hi in ((0, 0), (0, 55), (55, 200), (120, 121)):
        part, part_sims = top_similar_users(train, m=6, return_similarity=True, block_size=17, user_range=(lo, hi))
        assert torch.equal(part, full[lo:hi]) and torch.equal(part_sims, sims[lo:hi])
    with pytest.raises(ValueError, match="user_range"):
        top_similar_users(train, m=6, user_range=(10, 201))


def test_sharded_batches_concatenate_to_the_global_batches():
    train = cases.data().train
    whole = UserBatches(train, 64, seed=3)
    whole.set_epoch(2)
    pieces = []
    for r in range(3):
        b = UserBatches(train, 64, seed=3, shard=(r, 3))
        b.set_epoch(2)
        pieces.append([(u.clone(), x.clone(), b.current_slice) for u, x in b])
    for i, (users, rows) in enumerate(whole):
        assert torch.equal(torch.cat([p[i][0] for p in pieces]), users)
        assert torch.equal(torch.cat([p[i][1] for p in pieces]), rows)
        assert [p[i][2][0] for p in pieces] == [dist.shard_range(len(users), r, 3)[0] for r in range(3)]
    with pytest.raises(ValueError, match="shard"):
        UserBatches(train, 64, shard=(3, 3))


def test_noise_of_a_batch_slice_is_the_slice_of_the_global_noise():
    """Sampling rows [lo, hi) of a batch with rows=(lo, total) draws exactly their share of the noise."""
    diffusion = GaussianDiffusion(DiffusionConfig(steps=6))
    x = torch.rand(10, 30, generator=torch.Generator().manual_seed(0))
    model = lambda x_t, t: 0.5 * x_t  # noqa: E731 - row-wise, so rows do not interact
    full = diffusion.sample(model, x, noise=True, return_trajectory=True, generator=torch.Generator().manual_seed(1))
    for lo, hi in ((0, 4), (4, 10), (3, 3)):
        part = diffusion.sample(model, x[lo:hi], noise=True, return_trajectory=True, rows=(lo, 10),
                                generator=torch.Generator().manual_seed(1))
        assert torch.equal(part.states, full.states[:, lo:hi]) and torch.equal(part.final, full.final[lo:hi])
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    t_full, w_full = diffusion.sample_timesteps(10, generator=g1)
    t_part, w_part = diffusion.sample_timesteps(6, generator=g2, rows=(4, 10))
    assert torch.equal(t_part, t_full[4:]) and torch.equal(w_part, w_full[4:])
    assert torch.equal(g1.get_state(), g2.get_state())
    with pytest.raises(ValueError, match="slice"):
        diffusion.sample(model, x, noise=True, rows=(4, 10))


# --- two processes against one -----------------------------------------------------------------------

def test_two_ranks_ran_with_gloo(two_ranks):
    assert two_ranks["world"] == (0, 2, "gloo")
    assert two_ranks["gather"].tolist() == [[0, 0], [1, 10]]


def test_distributed_evaluation_equals_one_process(two_ranks, pretrained):
    single = cases.evaluation(pretrained)
    # Bit-identical: every user is scored in the same batch, and the per-batch sums are added in batch order.
    assert two_ranks["evaluate"] == single
    assert single["model"]["test"]["n_users"] == cases.DATA["n_users"]
    assert 0 < single["table"]["n_users"] < cases.DATA["n_users"] // 2


def test_shared_similar_users_equal_the_single_process_table(two_ranks):
    single = cases.similar_users()
    for key in ("ids", "sims", "plain", "approx", "approx_sims"):
        assert torch.equal(two_ranks["similar"][key], single[key]), key
    assert two_ranks["similar"]["plain"].shape == (cases.DATA["n_users"], 10)


def test_distributed_batches_are_the_single_process_batches(two_ranks):
    single = cases.sharded_batches(0, 1)
    assert len(two_ranks["batches"]) == len(single) == 4
    for (u2, r2), (u1, r1) in zip(two_ranks["batches"], single):
        assert torch.equal(u2, u1) and torch.equal(r2, r1)


@pytest.mark.parametrize("name", list(cases.FINETUNE_CASES))
def test_distributed_finetune_steps_equal_one_process(two_ranks, starts, name):
    """Same global batch and seed: the same gradients and statistics to float32 rounding, and
    parameters that are exactly what the optimiser makes of those gradients."""
    pretrained = starts[cases.family(name)]
    single = cases.finetune_step(pretrained, name)
    multi = two_ranks["finetune"][name]
    # The generator made the same draws on every rank as the single process did.
    assert torch.equal(multi["generator"], single["generator"])
    for a, b in zip(multi["stats"], single["stats"]):
        for key in ("reward", "n_k", "n_sim_k", "rating", "weighted_rating"):
            assert (key in a) == (key in b), key
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
        # The loss and its gradient sum adv[b] * L[b] with sum_b adv[b] = 0 and |L| in the hundreds:
        # float32 rounding of L (batches of 8 rows per rank against 16) is amplified by the cancellation.
        for key in ("loss", "anchor", "grad_norm", "ppo_clip_fraction", "effective_group_size"):
            assert (key in a) == (key in b), key
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), key
    assert multi["stats"][0]["grad_norm"] > 0
    # Every optimiser step consumed the averaged gradient of the global batch.
    assert len(multi["grads"]) == len(single["grads"]) == 2 * max(1, cases.FINETUNE_CASES[name].get("ppo_epochs", 0))
    for step, (gm, gs) in enumerate(zip(multi["grads"], single["grads"])):
        assert gm.keys() == gs.keys()
        # Rounding differences are relative to the gradient as a whole: a parameter whose gradient is zero
        # in exact arithmetic (attention's key bias: softmax ignores a shift shared by every key) holds
        # only rounding noise.
        scale = max(float(g.abs().max()) for g in gs.values())
        for n, g in gs.items():
            torch.testing.assert_close(gm[n], g, rtol=1e-3, atol=1e-3 * max(float(g.abs().max()), 1e-3 * scale),
                                       msg=(step, n))
    # The parameters are those gradients applied by AdamW. (Comparing the two runs' parameters
    # directly is ill-posed: Adam divides each gradient by its own magnitude, so an element whose
    # gradient is ~1e-7, or whose two steps' gradients nearly cancel, moves by up to lr whatever
    # its float32 rounding; the gradients themselves are compared above.)
    pre = load_checkpoint(pretrained)["recommender"]["model"]["state_dict"]
    for run in (single, multi):
        replayed = cases.replay_adamw(pre, run["grads"], run["optimizer"])
        for k, v in replayed.items():
            torch.testing.assert_close(run["params"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    moved = max(float((single["params"][k] - pre[k]).abs().max()) for k in pre)
    assert moved > 1e-4  # the two steps did change the parameters (lr 1e-3)
    if single["ema"] is not None:
        assert multi["ema"] == pytest.approx(single["ema"], rel=1e-6)


def test_distributed_pretraining_equals_one_process(two_ranks, tmp_path):
    single = cases.pretrain_run(str(tmp_path / "pre"))
    multi = two_ranks["pretrain"]
    assert multi["summary"]["world_size"] == 2 and single["summary"]["world_size"] == 1
    assert torch.equal(multi["generator"], single["generator"])
    np.testing.assert_array_equal(multi["loss_count"], single["loss_count"])
    np.testing.assert_allclose(multi["loss_history"], single["loss_history"], rtol=1e-4)
    for k, v in single["params"].items():
        torch.testing.assert_close(multi["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for split in ("valid", "test"):
        for key, value in single["summary"][split].items():
            assert multi["summary"][split][key] == pytest.approx(value, rel=1e-3, abs=1e-4), (split, key)


# --- the command line under torchrun -----------------------------------------------------------------

def test_finetune_checkpoint_of_two_processes_resumes_in_one(pretrained, tmp_path):
    args = ["finetune", "--checkpoint", pretrained, "--iterations", "6", "--batch-size", "16", "--eval-every", "3",
            "--checkpoint-every", "2", "--lr", "1e-3", "--no-plot"]
    torchrun("-m", "refit", "-q", *args, "--iterations", "4", "--out", "run", cwd=str(tmp_path))
    state = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert state["iteration"] == 4
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["iteration"] for r in records] == [0, 1, 2, 3, 4]  # rank 0 alone wrote the log
    refit_cli(*args, "--out", "run", "--resume", cwd=str(tmp_path))
    refit_cli(*args, "--out", "alone", cwd=str(tmp_path))
    resumed = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    alone = load_checkpoint(str(tmp_path / "alone" / "last.pt"))
    assert resumed["iteration"] == alone["iteration"] == 6
    for k, v in alone["recommender"]["model"]["state_dict"].items():
        torch.testing.assert_close(resumed["recommender"]["model"]["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert torch.equal(resumed["trainer"]["rng"]["generator"], alone["trainer"]["rng"]["generator"])
    iters = [json.loads(line)["iteration"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert iters == list(range(7))
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["world_size"] == 1 and summary["iterations"] == 6


def test_pretraining_checkpoint_of_two_processes_resumes_in_one(tmp_path):
    """Without dropout a pretraining run is the same whatever the number of processes, across a resume."""
    args = ["pretrain", "--data", "synthetic", "--steps", "5", "--epochs", "3", "--eval-every", "1",
            "--batch-size", "250", "--dims", "16,32", "--dropout", "0"]
    torchrun("-m", "refit", "-q", *args, "--epochs", "2", "--out", "run", cwd=str(tmp_path))
    assert load_checkpoint(str(tmp_path / "run" / "last.pt"))["epoch"] == 2
    refit_cli(*args, "--out", "run", "--resume", cwd=str(tmp_path))
    refit_cli(*args, "--out", "alone", cwd=str(tmp_path))
    resumed = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    alone = load_checkpoint(str(tmp_path / "alone" / "last.pt"))
    assert resumed["epoch"] == alone["epoch"] == 3
    np.testing.assert_array_equal(resumed["loss_count"], alone["loss_count"])
    assert torch.equal(resumed["rng"]["generator"], alone["rng"]["generator"])
    for k, v in alone["recommender"]["model"]["state_dict"].items():
        torch.testing.assert_close(resumed["recommender"]["model"]["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    epochs = [json.loads(line)["epoch"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert epochs == [1, 2, 3]


def test_cli_info_and_evaluate_under_torchrun(pretrained, tmp_path):
    info = torchrun("-m", "refit", "info", cwd=str(tmp_path))
    assert "world       2 processes" in info.stdout and "backend     gloo" in info.stdout
    assert "all_reduce  ok" in info.stdout
    assert info.stdout.count("distributed:") == 1 and info.stdout.count("backends:") == 1  # rank 0 alone prints
    multi = torchrun("-m", "refit", "-q", "evaluate", "--checkpoint", pretrained, "--split", "both", "--json",
                     cwd=str(tmp_path))
    single = refit_cli("evaluate", "--checkpoint", pretrained, "--split", "both", "--json", cwd=str(tmp_path))
    assert json.loads(multi.stdout) == json.loads(single.stdout)
    bad = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "refit", "-q", "finetune", "--checkpoint", pretrained, "--batch-size", "1", "--out", "x"],
                         capture_output=True, text=True, cwd=str(tmp_path), env=_env(), timeout=240)
    assert bad.returncode != 0 and "cannot be shared by 2 processes" in bad.stderr


def test_kernel_package_does_not_import_refit():
    code = ("import sys, refit_kernels; print(refit_kernels.__file__); "
            "print(sorted(m for m in sys.modules if m == 'refit' or m.startswith('refit.')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=_env())
    path, loaded = out.stdout.strip().splitlines()
    assert os.path.realpath(path) == os.path.realpath(rk.__file__)  # the package under test, not another copy
    assert loaded == "[]"


def test_gradient_average_over_two_ranks(two_ranks):
    grads = two_ranks["average"]
    assert torch.equal(grads[0], torch.full((3,), 1.5))  # (1 + 2) / 2
    assert torch.equal(grads[1], torch.full((2, 2), 2.0))  # (0 + 4) / 2: a missing gradient counts as zero
    assert grads[2] is None  # no rank has one: stays None, as in one process


def test_shutdown_joins_the_process_groups_threads(two_ranks):
    """The root of the aborts at exit: threads of the process group that outlive shutdown() may drop
    Python state while the interpreter is torn down. After shutdown none of them may be left."""
    counts = two_ranks["threads"]
    if counts["before_init"] < 0:
        pytest.skip("no /proc/self/task on this system")
    assert counts["while_joined"] > counts["before_init"]  # gloo's threads were there
    assert counts["after_shutdown"] == counts["before_init"], counts


def test_distributed_dreamrec_pretraining_equals_one_process(two_ranks, tmp_path):
    single = cases.dreamrec_pretrain_run(str(tmp_path / "dreamrec"))
    multi = two_ranks["dreamrec_pretrain"]
    assert multi["summary"]["world_size"] == 2 and single["summary"]["world_size"] == 1
    # The guidance weight was chosen after both runs (every rank evaluates; rank 0 writes). Which weight
    # is not compared: the weights agree to float32 rounding, which can flip a tie on this tiny split.
    for summary in (single["summary"], multi["summary"]):
        assert set(summary["guidance"]["valid_hr@20"]) == {"0", "0.5", "1", "2", "4"}
    assert torch.equal(multi["generator"], single["generator"])
    # Attention's key bias has no effect on anything (softmax ignores a shift shared by every key), so
    # its gradient is rounding noise, which Adam scales to steps of size lr: it is compared through the
    # function the networks compute instead.
    for k, v in single["params"].items():
        if k != "k.bias":
            torch.testing.assert_close(multi["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    from refit.families.dreamrec.network import DreamRec

    data = cases.seq_data()
    nets = []
    for params in (single["params"], multi["params"]):
        net = DreamRec(data.n_items, **cases.dreamrec_config("x", dropout=0.0)._net()).eval()
        net.load_state_dict(params)
        nets.append(net)
    t = data.targets["valid"]
    history, lengths = data.windows(t.seq, t.pos)
    with torch.no_grad():
        torch.testing.assert_close(nets[1].encode(history, lengths), nets[0].encode(history, lengths),
                                   rtol=1e-4, atol=1e-4)



# --- an outside latent model (LatentScheduleDenoiser) under torchrun -------------------------------------

@pytest.fixture(scope="module")
def latent_start(tmp_path_factory):
    """A checkpoint of the outside latent policy of tests/_dist_cases.py (its factory rebuilds it)."""
    return cases.latent_checkpoint(str(tmp_path_factory.mktemp("latent") / "start.pt"))


@pytest.fixture(scope="module")
def latent_two_ranks(tmp_path_factory, latent_start):
    """tests/_dist_cases.py's LATENT_CASES run by 2 processes."""
    out = tmp_path_factory.mktemp("dist-latent")
    torchrun(os.path.join(HERE, "_dist_cases.py"), str(out), latent_start, cwd=str(out))
    return torch.load(out / "results.pt", weights_only=False)


@pytest.fixture(scope="module")
def latent_one_process(latent_start):
    """The same LATENT_CASES in this process."""
    return {name: cases.latent_finetune_step(latent_start, name) for name in cases.LATENT_CASES}


@pytest.mark.parametrize("name", list(cases.LATENT_CASES))
def test_distributed_outside_latent_finetune_equals_one_process(latent_two_ranks, latent_one_process, latent_start,
                                                                name):
    """An outside DreamRec-style model through LatentScheduleDenoiser, rebuilt by its factory from a
    checkpoint: 2 ranks take the steps one process takes (the same checks as the refit models' cases)."""
    assert latent_two_ranks["world"] == (0, 2, "gloo")
    single = latent_one_process[name]
    multi = latent_two_ranks["finetune"][name]
    assert torch.equal(multi["generator"], single["generator"])
    for a, b in zip(multi["stats"], single["stats"]):
        for key in ("reward", "n_k", "n_sim_k", "kept_fraction", "zero_variance_groups"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
        for key in ("loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), key
    assert all(s["kept_fraction"] > 0 and s["grad_norm"] > 0 for s in single["stats"])  # GRPO had groups to compare
    assert min(s["kept_fraction"] for s in single["stats"]) < 1  # and dropped tied ones (each rank its own)
    assert len(multi["grads"]) == len(single["grads"]) == 2
    for step, (gm, gs) in enumerate(zip(multi["grads"], single["grads"])):
        assert gm.keys() == gs.keys()
        assert {"denoiser.q.weight", "denoiser.diffuser.0.weight", "denoiser.none_embedding.weight"} <= gs.keys()
        scale = max(float(g.abs().max()) for g in gs.values())
        for n, g in gs.items():
            torch.testing.assert_close(gm[n], g, rtol=1e-3, atol=1e-3 * max(float(g.abs().max()), 1e-3 * scale),
                                       msg=(step, n))
    pre = load_checkpoint(latent_start)["recommender"]["model"]["state_dict"]
    assert pre.keys() == single["params"].keys() == multi["params"].keys()
    for run in (single, multi):  # the parameters are exactly AdamW's steps on those gradients
        replayed = cases.replay_adamw(pre, run["grads"], run["optimizer"])
        for k, v in replayed.items():
            torch.testing.assert_close(run["params"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    moved = max(float((single["params"][k] - pre[k]).abs().max()) for k in pre)
    assert moved > 1e-4
    # The parameters themselves, to float32 rounding: all but the attention's key bias, whose gradient is
    # rounding noise alone (softmax ignores a shift shared by every key) that Adam scales to steps of lr;
    # and the function they compute, key bias included: the guided x0 predictions along fixed trajectories.
    for k, v in single["params"].items():
        if k != "denoiser.k.bias":
            torch.testing.assert_close(multi["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(multi["outputs"], single["outputs"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(multi["final"], single["final"], rtol=1e-4, atol=1e-4)


def test_distributed_grpo_kl_diagnostic_equals_one_process(latent_two_ranks, latent_one_process):
    # It was taken over the kept trajectories in one process but over all of a rank's trajectories
    # (dropped GRPO groups included) under torchrun.
    single, multi = latent_one_process["latent-grpo"], latent_two_ranks["finetune"]["latent-grpo"]
    assert single["stats"][1]["kept_fraction"] < 1  # a tied group was dropped at the second step
    for a, b in zip(multi["stats"], single["stats"]):
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-4)
