"""refit.diffusion: schedules, posterior constants, sampler and loss against closed forms."""

import math

import numpy as np
import pytest
import torch

import refit_kernels as rk
from refit.diffusion import DiffusionConfig, GaussianDiffusion, betas_for
from refit.families.diffrec.denoisers import DiffRecMLP, timestep_embedding


def test_linear_schedule_is_a_ramp_with_fixed_first_beta():
    cfg = DiffusionConfig(noise_schedule="linear", steps=5, noise_scale=0.1, noise_min=0.01, noise_max=0.05)
    b = betas_for(cfg)
    np.testing.assert_allclose(b[1:], np.linspace(0.001, 0.005, 5)[1:], rtol=0, atol=1e-15)
    assert b[0] == 1e-5


def test_linear_var_schedule_has_linear_cumulative_variance():
    cfg = DiffusionConfig(noise_schedule="linear-var", steps=6, noise_scale=0.1, noise_min=0.01, noise_max=0.05)
    b = betas_for(cfg)
    ramp = np.linspace(0.001, 0.005, 6)
    # 1 - prod_{j<=t}(1 - beta_j) == ramp[t] for t >= 1, given beta_0 = ramp[0] ...
    unfixed = b.copy()
    unfixed[0] = ramp[0]
    np.testing.assert_allclose(1 - np.cumprod(1 - unfixed), ramp, rtol=1e-12)
    assert b[0] == 1e-5  # ... which DiffRec then overrides


def test_cosine_schedule_matches_alpha_bar():
    cfg = DiffusionConfig(noise_schedule="cosine", steps=8)
    b = betas_for(cfg)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in range(1, 8):
        assert b[i] == pytest.approx(min(1 - f((i + 1) / 8) / f(i / 8), 0.999), rel=1e-12)


def test_posterior_constants_match_closed_forms():
    d = GaussianDiffusion(DiffusionConfig(steps=7, noise_scale=0.1, noise_min=0.01, noise_max=0.1))
    b = d.betas.numpy()
    ac = np.cumprod(1 - b)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    var = b * (1 - ac_prev) / (1 - ac)
    np.testing.assert_allclose(d.posterior_variance.numpy(), var, rtol=1e-12)
    np.testing.assert_allclose(d.posterior_log_variance_clipped.numpy(), np.log(np.concatenate([[var[1]], var[1:]])), rtol=1e-12)
    np.testing.assert_allclose(d.posterior_mean_coef1.numpy(), b * np.sqrt(ac_prev) / (1 - ac), rtol=1e-12)
    np.testing.assert_allclose(d.posterior_mean_coef2.numpy(), (1 - ac_prev) * np.sqrt(1 - b) / (1 - ac), rtol=1e-12)


def test_posterior_mean_is_the_exact_gaussian_posterior():
    """q(x_{t-1} | x_t, x0) from Bayes' rule on the two Gaussians, numerically."""
    d = GaussianDiffusion(DiffusionConfig(steps=5, noise_scale=0.5, noise_min=0.05, noise_max=0.2))
    t = 3
    ac, ac_prev, beta = (d.alphas_cumprod[t].item(), d.alphas_cumprod_prev[t].item(), d.betas[t].item())
    x0, xt = 0.7, 0.4
    # prior x_{t-1} ~ N(sqrt(ac_prev) x0, 1 - ac_prev); likelihood x_t ~ N(sqrt(1-beta) x_{t-1}, beta)
    prec = 1 / (1 - ac_prev) + (1 - beta) / beta
    mean = (math.sqrt(ac_prev) * x0 / (1 - ac_prev) + math.sqrt(1 - beta) * xt / beta) / prec
    got = d.posterior_mean_coef1[t].item() * x0 + d.posterior_mean_coef2[t].item() * xt
    assert got == pytest.approx(mean, rel=1e-10)
    assert d.posterior_variance[t].item() == pytest.approx(1 / prec, rel=1e-10)


def test_eps_mode_step_coefficients_give_the_same_mean():
    cfg = dict(steps=6, noise_scale=0.3, noise_min=0.01, noise_max=0.1)
    dx, de = GaussianDiffusion(DiffusionConfig(mean_type="x0", **cfg)), GaussianDiffusion(DiffusionConfig(mean_type="eps", **cfg))
    t, x0, xt = 4, 0.9, 0.3
    eps = (xt - de.sqrt_alphas_cumprod[t].item() * x0) / de.sqrt_one_minus_alphas_cumprod[t].item()
    mean_x0 = dx.step_coef_pred[t].item() * x0 + dx.step_coef_x[t].item() * xt
    mean_eps = de.step_coef_pred[t].item() * eps + de.step_coef_x[t].item() * xt
    assert mean_eps == pytest.approx(mean_x0, rel=1e-9)


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 3]), 10)
    assert e.shape == (2, 10)
    freqs = torch.exp(-math.log(10000) * torch.arange(5) / 5)
    torch.testing.assert_close(e[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))
    assert timestep_embedding(torch.tensor([1]), 7).shape == (1, 7)


def test_mlp_shapes_follow_dims():
    m = DiffRecMLP(50, dims=(20, 30), emb_size=10)
    assert [l.in_features for l in m.in_layers] == [60, 30]
    assert [l.out_features for l in m.in_layers] == [30, 20]
    assert [(l.in_features, l.out_features) for l in m.out_layers] == [(20, 30), (30, 50)]
    assert m(torch.rand(3, 50), torch.tensor([0, 1, 2])).shape == (3, 50)


def _setup(mean_type="x0", T=6, B=3, I=40, seed=0):
    torch.manual_seed(seed)
    d = GaussianDiffusion(DiffusionConfig(mean_type=mean_type, steps=T))
    m = DiffRecMLP(I, dims=(8, 16)).eval()
    x = (torch.rand(B, I) < 0.2).float()
    return d, m, x


@pytest.mark.parametrize("mean_type", ["x0", "eps"])
def test_trajectory_shapes_and_logprob_match_an_independent_computation(mean_type):
    d, m, x = _setup(mean_type)
    tr = d.sample(m, x, noise=True, return_trajectory=True, generator=torch.Generator().manual_seed(1))
    T, (B, I) = d.steps, x.shape
    assert tr.states.shape == (T, B, I) and tr.preds.shape == (T - 1, B, I)
    assert tr.timesteps.tolist() == list(range(T - 1, 0, -1))
    assert torch.equal(tr.states[0], x)
    # Independent: replay each step with the model and the float64 schedule.
    want = torch.zeros(B, dtype=torch.float64)
    with torch.no_grad():
        for s, t in enumerate(tr.timesteps.tolist()):
            xt = tr.states[s].double()
            out = m(tr.states[s], torch.full((B,), t)).double()
            torch.testing.assert_close(out.float(), tr.preds[s])
            if mean_type == "x0":
                x0 = out
            else:
                x0 = d.sqrt_recip_alphas_cumprod[t] * xt - d.sqrt_recipm1_alphas_cumprod[t] * out
            mean = d.posterior_mean_coef1[t] * x0 + d.posterior_mean_coef2[t] * xt
            std = torch.exp(0.5 * d.posterior_log_variance_clipped[t])
            want += torch.distributions.Normal(mean, std).log_prob(tr.states[s + 1].double()).sum(-1)
    got = rk.gaussian_logprob(tr.preds, tr.states, tr.coef_pred, tr.coef_x, tr.log_var)
    # The sampler rounds its constants to float32 as DiffRec does; against the
    # float64 schedule that moves each mean by ~1e-8 of a state, small next to
    # the per-step standard deviation (~1e-3).
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_sampler_without_noise_is_deterministic_and_last_step_is_noise_free():
    d, m, x = _setup()
    a = d.sample(m, x)
    b = d.sample(m, x)
    assert torch.equal(a, b)
    tr = d.sample(m, x, noise=True, return_trajectory=True, generator=torch.Generator().manual_seed(3))
    cp, cx, _ = d.step_constants()
    with torch.no_grad():
        last = cp[0] * m(tr.states[-1], torch.zeros(3, dtype=torch.long)) + cx[0] * tr.states[-1]
    torch.testing.assert_close(tr.final, last)


def test_keep_graph_trajectory_carries_gradient_to_the_model():
    d, m, x = _setup()
    tr = d.sample(m, x, noise=True, return_trajectory=True, keep_graph=True)
    assert tr.preds.requires_grad and not tr.states.requires_grad
    rk.gaussian_logprob(tr.preds, tr.states, tr.coef_pred, tr.coef_x, tr.log_var).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_importance_sampling_starts_uniform_then_follows_losses():
    d = GaussianDiffusion(DiffusionConfig(steps=4, history_per_step=2))
    t, w = d.sample_timesteps(5)
    assert torch.equal(w, torch.ones(5))
    d._record_losses(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3]), torch.tensor([1., 1., 1., 1., 1., 1., 9., 9., 5.]))
    assert d.loss_count.tolist() == [2, 2, 2, 2] and d.loss_history[3].tolist() == [9.0, 5.0]
    t, w = d.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    rms = np.array([1, 1, 1, math.sqrt((81 + 25) / 2)])
    p = rms / rms.sum() * 0.999 + 0.001 / 4
    freq = np.bincount(t.numpy(), minlength=4) / 20000
    np.testing.assert_allclose(freq, p, atol=0.015)
    np.testing.assert_allclose(w.numpy(), (p * 4)[t.numpy()], rtol=1e-6)


def test_training_loss_reweights_by_snr_difference():
    d, m, x = _setup(T=5)
    m.eval()  # no dropout, so the replay below sees the same model
    loss = d.training_loss(m, x, reweight=True, generator=torch.Generator().manual_seed(0))
    # Replay the same draws: uniform timesteps first (histories are empty), then the noise.
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 5, (3,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    ac = d.alphas_cumprod
    xt = ac[t].sqrt().float()[:, None] * x + (1 - ac[t]).sqrt().float()[:, None] * noise
    with torch.no_grad():
        mse = ((x - m(xt, t)) ** 2).mean(1)
    snr = lambda k: ac[k] / (1 - ac[k])  # noqa: E731
    w = torch.where(t == 0, torch.ones(3, dtype=torch.float64), snr(t - 1) - snr(t))
    torch.testing.assert_close(loss.detach(), (w * mse).float(), rtol=1e-5, atol=0)
    assert d.loss_count.sum() == 3


def test_bad_configs():
    with pytest.raises(ValueError, match="mean_type"):
        DiffusionConfig(mean_type="v")
    with pytest.raises(ValueError, match="noise_schedule"):
        DiffusionConfig(noise_schedule="sigmoid")
    with pytest.raises(ValueError, match="steps"):
        DiffusionConfig(steps=0)
    d, m, x = _setup()
    with pytest.raises(ValueError, match="sampling_steps"):
        d.sample(m, x, sampling_steps=99)
    with pytest.raises(ValueError, match="noise=True"):
        d.sample(m, x, return_trajectory=True)


def test_eps_mode_elbo_loss_by_hand_with_more_items_than_rows():
    """The reweighted loss of an eps model: the MSE to the noise, times (1 - ac) / ((1 - ac_prev)^2 (1 - b)),
    and at t = 0 the x0 likelihood term (a batch of 3 rows over 5 items: the step weights are per row)."""
    d = GaussianDiffusion(DiffusionConfig(mean_type="eps", steps=4, noise_scale=0.3, noise_min=0.01, noise_max=0.1))
    x0 = torch.rand(3, 5, generator=torch.Generator().manual_seed(1))

    def model(x, t):
        return 0.5 * x

    loss = d.training_loss(model, x0, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t, importance = d.sample_timesteps(3, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    ac, ac_prev, b = d.alphas_cumprod[t], d.alphas_cumprod_prev[t], d.betas[t]
    x_t = ac.sqrt().float()[:, None] * x0 + (1 - ac).sqrt().float()[:, None] * noise
    out = model(x_t, t)
    mse = ((noise - out) ** 2).mean(1)
    x0_hat = (1 / ac).sqrt().float()[:, None] * x_t - (1 / ac - 1).sqrt().float()[:, None] * out
    likelihood = ((x0 - x0_hat) ** 2 / 2).mean(1)
    w = torch.where(t == 0, torch.ones_like(ac), (1 - ac) / ((1 - ac_prev) ** 2 * (1 - b))).float()
    want = w * torch.where(t == 0, likelihood, mse) / importance
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
