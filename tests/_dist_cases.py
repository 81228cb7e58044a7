"""Scenarios run once in a single process (by the test) and once by each of 2 ranks (by
tests/_dist_worker.py under torchrun); the test compares the two results."""

import numpy as np
import torch

from refit.runtime import distributed as dist
from refit.data import UserBatches, load_dataset
from refit.evaluate import evaluate, evaluate_recommender
from refit.families.diffrec.pretrain import PretrainConfig, load_recommender, pretrain
from refit.runtime.runs import load_checkpoint
from refit.similarity import shared_similar_users
from refit.families.dreamrec.pretrain import DreamRecConfig, pretrain_dreamrec
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT
from refit.posttrain.run import load_policy

DATA = {"n_users": 200, "n_items": 150}
SEQ_DATA = {"n_users": 90, "n_items": 60, "mean_length": 10, "seed": 4}

#: ReFiT settings whose steps must not depend on the number of processes. A large
#: lr makes the update visible and no clipping keeps a wrongly scaled gradient visible.
FINETUNE_CASES = {
    "mean-std": dict(batch_size=16),
    "group-kl": dict(batch_size=16, group_size=2, baseline="group", anchor="kl", anchor_weight=0.5),
    "ema-elbo-ppo": dict(batch_size=12, baseline="ema", anchor="elbo", anchor_weight=0.1, ppo_epochs=2,
                         target="observed"),
    # A gradient through every sampling step: many forward passes per backward.
    "reuse-graph": dict(batch_size=16, reuse_sampling_graph=True),
    # DreamRec through the same trainer: sequence episodes, guided means, the encoder's gradient.
    "dreamrec-mean-std": dict(batch_size=16),
    # Groups of 4: with 2 trajectories per user every group of the first step tied (no gradient to compare).
    "dreamrec-group-kl": dict(batch_size=16, group_size=4, baseline="group", anchor="kl", anchor_weight=0.5),
    # Reward-weighted fine-tuning: group weights from the all-gathered rewards, each rank its users' losses.
    "dreamrec-reward-weighted": dict(batch_size=16, group_size=4, method="reward-weighted", rw_lambda=0.02),
    # GRPO with the dense reward and one exploring window: groups share their start across the ranks' split.
    "dreamrec-grpo-explore": dict(batch_size=16, group_size=4, method="grpo", reward="ndcg", rl_steps=6,
                                  explore_steps=2, probe_size=0),
    # Offline reward-weighted: no sampling, the logged rows' rating-weighted loss, each rank its users.
    "offline-reward-weighted": dict(batch_size=16, method="offline-reward-weighted", rw_lambda=0.5),
    # Reward backpropagation: the last steps' graph, the targets' log-softmax, on each backbone.
    "reward-backprop": dict(batch_size=16, method="reward-backprop", backprop_steps=2, probe_size=0),
    "reward-backprop-ndcg": dict(batch_size=16, method="reward-backprop", rb_reward="ndcg", rb_temperature=0.5,
                                 probe_size=0),
    "dreamrec-reward-backprop": dict(batch_size=16, method="reward-backprop", backprop_steps=2, rl_steps=6,
                                     probe_size=0),
    # NFT: the old policy samples, group weights from the all-gathered rewards, noise of the global batch,
    # and the old policy's moving average after each update (the second step samples with it).
    "nft": dict(batch_size=16, group_size=4, method="nft", nft_timesteps=3, probe_size=0),
    "dreamrec-nft": dict(batch_size=16, group_size=4, method="nft", nft_timesteps=3, nft_beta=0.5, rl_steps=6,
                         reward="ndcg", probe_size=0),
}


def family(name: str) -> str:
    """Which pretrained model a fine-tuning case starts from."""
    return "dreamrec" if name.startswith("dreamrec") else "diffrec"


def seq_data():
    return load_dataset("synthetic-seq", **SEQ_DATA)


def dreamrec_config(out: str, **kw) -> DreamRecConfig:
    base = dict(data="synthetic-seq", data_options=SEQ_DATA, hidden=16, steps=10, epochs=2, eval_every=1,
                batch_size=64, eval_batch_size=64, lr=5e-3, progress=False, out=out)
    base.update(kw)
    return DreamRecConfig(**base)


def data():
    return load_dataset("synthetic", **DATA)


def seeded_ratings(train):
    """Ratings 1-5 on train's pattern (the synthetic data carry none), the same in every process."""
    r = train.copy().astype(np.float32)
    r.data = np.random.default_rng(11).integers(1, 6, r.nnz).astype(np.float32)
    return r


def pretrain_config(out: str, **kw) -> PretrainConfig:
    base = dict(data="synthetic", data_options=DATA, steps=8, epochs=4, eval_every=2, batch_size=100,
                dims=(32, 64), progress=False, out=out)
    base.update(kw)
    return PretrainConfig(**base)


def evaluation(pretrained: str):
    """Metrics of a model (odd batch size: uneven shares) and of a fixed score table."""
    rec, d, _ = load_recommender(pretrained, data())
    model = evaluate_recommender(rec, d, batch_size=37)
    table = torch.from_numpy(np.random.default_rng(0).standard_normal((d.n_users, d.n_items)).astype(np.float32))
    users = np.arange(3, d.n_users, 2)
    subset = evaluate(lambda u: table[u], d.test, [d.train, d.valid], ks=(5, 20), batch_size=9, users=users,
                      exclude_users_without_positives=True)
    return {"model": model, "table": subset}


def similar_users():
    train = data().train
    ids, sims = shared_similar_users(train, m=7, return_similarity=True)
    approx, approx_sims = shared_similar_users(train, m=7, method="approximate", width=12, return_similarity=True)
    return {"ids": ids, "sims": sims, "plain": shared_similar_users(train, m=10),
            "approx": approx, "approx_sims": approx_sims}


def sharded_batches(rank: int, world: int):
    """The global batches of epoch 2, rebuilt from the ranks' shares (users and rows)."""
    batches = UserBatches(data().train, 64, seed=3, shard=(rank, world) if world > 1 else None)
    batches.set_epoch(2)
    out = []
    for users, rows in batches:
        out.append((dist.all_gather_rows(users), dist.all_gather_rows(rows)))
    return out


def finetune_step(pretrained: str, name: str):
    """Two ReFiT steps: the gradients each optimiser step consumed, stats of both, parameters and
    generator after, and the optimiser's settings (to replay the steps from the recorded gradients)."""
    cfg = FinetuneConfig(checkpoint=pretrained, lr=1e-3, grad_clip=1e9, seed=5, progress=False, plot=False,
                         **FINETUNE_CASES[name])
    rec, d, _ = load_policy(pretrained, seq_data() if family(name) == "dreamrec" else data())
    if cfg.method == "offline-reward-weighted":
        d.train_ratings = seeded_ratings(d.train)
    torch.manual_seed(cfg.seed)
    trainer = ReFiT(rec, d, cfg)
    return two_recorded_steps(trainer)


def two_recorded_steps(trainer) -> dict:
    """Two steps of ``trainer``: the gradients each optimiser step consumed (one {name: gradient} per
    step, as the optimiser saw it), both steps' stats, the parameters and generator after, and the
    optimiser's settings (to replay the steps from the recorded gradients)."""
    rec = trainer.policy
    grads = []
    names = {id(p): n for n, p in rec.module.named_parameters()}

    def record(optimizer, args, kwargs):
        grads.append({names[id(p)]: p.grad.detach().clone() for group in optimizer.param_groups
                      for p in group["params"] if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(record)
    first = trainer.step()
    second = trainer.step()
    return {"stats": [first, second], "grads": grads,
            "params": {k: v.detach().clone() for k, v in rec.module.state_dict().items()},
            "generator": trainer.generator.get_state(), "ema": trainer.baseline.ema,
            "optimizer": {k: v for k, v in trainer.optimizer.defaults.items() if k in ("lr", "weight_decay")}}


def replay_adamw(start: dict, grads: list, settings: dict) -> dict:
    """The parameters AdamW reaches from ``start`` when fed the recorded gradients step by step."""
    params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    opt = torch.optim.AdamW(list(params.values()), **settings)
    for step in grads:
        for k, p in params.items():
            p.grad = step[k].clone() if k in step else None
        opt.step()
    return {k: p.detach() for k, p in params.items()}


def pretrain_run(out: str):
    """Two epochs of pretraining without dropout (the only per-rank randomness); uneven last batch."""
    summary = pretrain(pretrain_config(out, epochs=2, eval_every=1, batch_size=60, dropout=0.0))
    if not dist.is_main():
        return None
    state = load_checkpoint(out + "/last.pt")
    return {"summary": summary, "params": state["recommender"]["model"]["state_dict"],
            "loss_history": state["loss_history"], "loss_count": state["loss_count"],
            "generator": state["rng"]["generator"]}


def average_gradients_case(rank: int):
    """Gradients averaged over ranks: present everywhere, on one rank only, and on none."""
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2)),
              torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.full((3,), float(rank + 1))
    if rank == 1:
        params[1].grad = torch.full((2, 2), 4.0)
    # Buckets of 5 floats: the parameters go in separate buckets.
    dist.average_gradients(params, bucket_bytes=20)
    return [None if p.grad is None else p.grad.clone() for p in params]


def dreamrec_pretrain_run(out: str):
    """Two DreamRec epochs without dropout: the same whatever the number of processes."""
    summary = pretrain_dreamrec(dreamrec_config(out, dropout=0.0))
    if not dist.is_main():
        return None
    state = load_checkpoint(out + "/last.pt")
    return {"summary": summary, "params": state["recommender"]["model"]["state_dict"],
            "generator": state["rng"]["generator"]}



# --- an outside latent model (LatentScheduleDenoiser) under torchrun -------------------------------------

#: Fine-tuning cases of an outside DreamRec-style model (tests/test_latent_adapter.py's Tenc, wrapped by
#: refit.latent_adapter.LatentScheduleDenoiser), started from a checkpoint of it and rebuilt by the factory
#: below, as ``refit finetune --policy _dist_cases:latent_policy`` would. Run by this file's ``__main__``
#: under torchrun, and by the test in one process.
LATENT_CASES = {
    # GRPO, groups of 4: the groups' advantages from the all-gathered rewards, each rank its users' rows.
    "latent-grpo": dict(batch_size=16, group_size=4, method="grpo"),
}
LATENT_FACTORY = "_dist_cases:latent_policy"


def latent_policy(data):
    """The outside latent policy over ``data``: a Tenc (hidden 16, windows of 6) and a 10-step schedule in
    DreamRec's published style, seeded (the same weights in every process)."""
    from refit.latent_adapter import LatentScheduleDenoiser
    from test_latent_adapter import Tenc, diffusion, parts

    torch.manual_seed(0)
    model = Tenc(16, data.n_items, 6)
    diff = diffusion(10, 1e-4, 0.2, 2.0)
    return LatentScheduleDenoiser(model, diff.betas, n_items=data.n_items, max_len=6, w=diff.w, **parts())


def latent_checkpoint(path: str) -> str:
    """A checkpoint of :func:`latent_policy` on :func:`seq_data` (what a run of it would start from)."""
    from refit.runtime.runs import data_fingerprint, save_checkpoint

    d = seq_data()
    save_checkpoint(path, {"kind": "model", "recommender": latent_policy(d).state(),
                           "data": {"source": "synthetic-seq", "options": dict(SEQ_DATA),
                                    "fingerprint": data_fingerprint(d)}})
    return path


def latent_finetune_step(checkpoint: str, name: str):
    """:func:`finetune_step` of a :data:`LATENT_CASES` case: the outside policy rebuilt by its factory with
    the checkpoint's weights (refit.posttrain.run.load_policy), then two ReFiT steps, recorded alike."""
    cfg = FinetuneConfig(checkpoint=checkpoint, policy_factory=LATENT_FACTORY, lr=1e-3, grad_clip=1e9, seed=5,
                         progress=False, plot=False, **LATENT_CASES[name])
    rec, d, _ = load_policy(checkpoint, seq_data(), factory=cfg.policy_factory)
    torch.manual_seed(cfg.seed)
    trainer = ReFiT(rec, d, cfg)
    result = two_recorded_steps(trainer)
    # The guided x0 predictions of the trained policy along fixed trajectories: the function its
    # parameters compute, compared across process counts where single parameters are ill-posed.
    episode = trainer.episodes.sample(8, torch.Generator().manual_seed(17))
    traj = rec.sample(episode.users, episode.inputs, generator=torch.Generator().manual_seed(18))
    with torch.no_grad():
        outputs = rec.outputs(episode.users, episode.inputs, traj)
    return {**result, "outputs": outputs, "final": traj.final}


if __name__ == "__main__":
    # python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_dist_cases.py OUT CHECKPOINT
    # runs LATENT_CASES on every rank; rank 0 saves {"world": ..., "finetune": {name: result}} to OUT/results.pt.
    import os
    import sys

    out, checkpoint = sys.argv[1], sys.argv[2]
    info = dist.init()
    assert info.distributed and info.world_size == 2 and info.backend == "gloo", info
    results = {"world": (info.rank, info.world_size, info.backend),
               "finetune": {name: latent_finetune_step(checkpoint, name) for name in LATENT_CASES}}
    dist.shutdown()
    if info.rank == 0:
        torch.save(results, os.path.join(out, "results.pt"))
