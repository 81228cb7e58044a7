"""How much learning signal ReFiT's policy gradient carries for a pretrained model.

    python -m benchmarks.studies.refit_signal --checkpoint runs/ml1m-fp32-s1/best.pt

For one batch of users (the default reward target: 20 % of each user's
training items hidden) it samples the reverse trajectory several times and
reports:

* the spread of the reward between users and, for the same user, between
  trajectories (REINFORCE learns only from the latter);
* how many of the top-K items two trajectories of the same user share;
* for each sampling temperature, the cosine similarity between the policy
  gradients of two independent batches (near 0 means the batch gradient is
  mostly noise at this batch size), with the batch-normalised baseline and
  with the per-user group baseline.
"""

import argparse
import statistics

import torch

import refit_kernels as rk
from refit.families.diffrec.pretrain import load_recommender
from refit.reward import collaborative_reward, make_episode, repeat_episode
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT
from refit.posttrain.common import trajectory_logprob


def reward_spread(rec, trainer, n_users, samples, k):
    users = trainer.sample_users()[:n_users]
    ep = make_episode(trainer.train_csr, users, "hidden", 0.2, trainer.generator)
    rewards, tops = [], []
    masked = ep.rows > 0
    with torch.no_grad():
        for _ in range(samples):
            traj = rec.diffusion.sample(rec.denoiser(users, ep.rows), ep.rows, noise=True,
                                        return_trajectory=True, generator=trainer.generator)
            rewards.append(collaborative_reward(traj.final, ep, trainer.neighbors[users], trainer.train_csr,
                                                k=k).reward)
            tops.append(torch.topk(traj.final.masked_fill(masked, float("-inf")), k).indices)
    R = torch.stack(rewards)  # (samples, B)
    overlap = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(tops[0], tops[1])]
    return float(R.mean(0).std()), float(R.std(0).mean()), statistics.mean(overlap)


def gradient_cosine(rec, data, path, baseline, group, temperature, batch_size, seed):
    cfg = FinetuneConfig(checkpoint=path, batch_size=batch_size, group_size=group, baseline=baseline,
                         temperature=temperature, seed=seed, progress=False, plot=False)
    t = ReFiT(rec, data, cfg)
    grads = []
    for _ in range(2):
        users = t.sample_users()
        ep = make_episode(t.train_csr, users, "hidden", 0.2, t.generator)
        if group > 1:
            ep = repeat_episode(ep, group)
            users = ep.users
        traj = rec.diffusion.sample(rec.denoiser(users, ep.rows), ep.rows, noise=True, return_trajectory=True,
                                    generator=t.generator, temperature=temperature)
        r = collaborative_reward(traj.final, ep, t.neighbors[users], t.train_csr)
        adv = t.baseline.advantage(r.reward)
        logp = trajectory_logprob(rec, users, ep.rows, traj)
        g = torch.autograd.grad(-(adv * logp).mean(), list(rec.model.parameters()))
        grads.append(torch.cat([x.flatten() for x in g]))
    return float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--samples", type=int, default=8, help="trajectories per user for the reward spread")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--temperatures", default="1,10,30")
    p.add_argument("--seeds", type=int, default=3, help="pairs of batches per gradient cosine")
    a = p.parse_args()
    torch.manual_seed(0)
    rec, data, _ = load_recommender(a.checkpoint)
    rec.model.eval()  # as ReFiT samples and scores: dropout off
    trainer = ReFiT(rec, data, FinetuneConfig(checkpoint=a.checkpoint, seed=0, progress=False, plot=False))
    between, within, overlap = reward_spread(rec, trainer, a.users, a.samples, a.k)
    print(f"reward std between users: {between:.4f}; between trajectories of one user: {within:.4f} "
          f"(mean over {a.users} users, {a.samples} trajectories each)")
    print(f"top-{a.k} items shared by two trajectories of the same user: {overlap:.2f} of {a.k}")
    print(f"cosine between the gradients of two independent batches of {a.batch_size} trajectories "
          f"(mean and range over {a.seeds} pairs):")
    for temp in (float(x) for x in a.temperatures.split(",")):
        for baseline, group in (("mean-std", 1), ("group", 8)):
            cos = [gradient_cosine(rec, data, a.checkpoint, baseline, group, temp, a.batch_size, s)
                   for s in range(1, a.seeds + 1)]
            print(f"  temperature {temp:>4g}, baseline {baseline:<8} (group {group}): "
                  f"{statistics.mean(cos):+.4f}  [{min(cos):+.4f}, {max(cos):+.4f}]", flush=True)


if __name__ == "__main__":
    main()
