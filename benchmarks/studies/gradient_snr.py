"""How much of a policy-gradient estimate is signal? The cosine between independent estimates.

    python -m benchmarks.studies.gradient_snr --checkpoint runs/dr-ml1m-s1/best.pt \\
        [--finetune "--method grpo --group-size 16 --reward ndcg --alpha 1 --rl-steps 20"] \\
        [--targets 64] [--draws 3] [--explore 0 5 10 18]

For one fixed set of training episodes (``--targets`` of them, each sampled ``--group-size``
times), the GRPO gradient of the policy's parameters is estimated ``--draws`` times with
independent sampling noise and nothing else changed. If the estimates were pure signal their
cosine would be 1; if they were pure noise, about 0. Its mean over pairs estimates
|signal|^2 / (|signal|^2 + noise variance) of one estimate.

Samplers compared: every step draws noise (``all steps``), the same without the last stochastic
step's term (``all but the last``: its variance is the smallest and its weight the largest), and
one exploring step at each ``--explore`` position (0: the step from T-1), DDIM's deterministic steps
elsewhere and a start shared by the group (``--explore-steps 1`` of ``refit finetune``).
Prints one line per sampler: the mean cosine, its range over pairs, the gradient's norm and the
reward's mean within-group standard deviation.
"""

import argparse
import itertools
import os
import shlex
import sys

import torch



def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--finetune", default="--method grpo --group-size 16 --reward ndcg --alpha 1 --rl-steps 20",
                   help="refit finetune flags of the estimator (the batch is --targets x --group-size)")
    p.add_argument("--targets", type=int, default=64)
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--explore", type=int, nargs="*", default=[0, 5, 10, 18],
                   help="positions of a one-step exploring window (0: the first step)")
    p.add_argument("--seed", type=int, default=123)
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from refit.cli import _finetune_config, build_parser
    from refit.reward import repeat_episode
    from refit.posttrain.common import Rows
    from refit.posttrain.trainer import ReFiT
    from refit.posttrain.run import load_policy

    args = build_parser().parse_args(["finetune", "--checkpoint", a.checkpoint, *shlex.split(a.finetune)])
    cfg = _finetune_config(args, out=os.devnull)
    G = cfg.group_size
    cfg.batch_size, cfg.probe_size = a.targets * G, 0
    policy, data, _ = load_policy(a.checkpoint)
    params = [q for q in policy.module.parameters() if q.requires_grad]

    def estimate(trainer, episode, seed, drop_last=False):
        trainer.generator.manual_seed(seed)
        inputs, traj, reward = trainer.rollout(episode, 0, episode.users.numel())
        adv, _ = trainer.method._advantages(reward.reward)
        S = traj.preds.shape[0]
        steps = list(range(S - 1 if drop_last and S > 1 else S))
        logp = trainer.method._logprob(Rows(episode._replace(inputs=inputs), traj), steps).sum(0)
        grads = torch.autograd.grad(-(adv * logp).mean(), params, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(q)).flatten() for g, q in zip(grads, params)])
        within = float(reward.reward.view(-1, G).std(1, unbiased=False).mean())
        return flat, within

    def report(name, trainer, episode, **kw):
        draws = [estimate(trainer, episode, 1000 + d, **kw) for d in range(a.draws)]
        cos = [float(torch.nn.functional.cosine_similarity(x[0], y[0], dim=0))
               for x, y in itertools.combinations(draws, 2)]
        print(f"{name:<28} cosine {sum(cos) / len(cos):+.3f} (range {min(cos):+.3f} .. {max(cos):+.3f})  "
              f"|grad| {float(draws[0][0].norm()):.3g}  reward within groups {draws[0][1]:.4f}", flush=True)

    base = ReFiT(policy, data, cfg)
    episode = repeat_episode(base.episodes.sample(a.targets, torch.Generator().manual_seed(a.seed)), G)
    print(f"{a.checkpoint}: {a.targets} targets x {G} samples, {a.draws} independent estimates each")
    report("all steps", base, episode)
    report("all but the last", base, episode, drop_last=True)
    for first in a.explore:
        cfg.explore_steps = 1
        t = ReFiT(policy, data, cfg)
        if not 0 <= first < t._stochastic_steps:
            raise SystemExit(f"--explore {first}: positions run from 0 to {t._stochastic_steps - 1}")
        t._explore_window = lambda first=first: (first, 1)  # the window at `first` every time
        report(f"one exploring step at {first}", t, episode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
