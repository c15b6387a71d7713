"""Diffusion math checked against closed forms computed independently here.

The "model" in most tests is analytic: for data x_0 ~ N(m, s²) per pixel, the optimal noise
predictor is E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ m) / (ᾱ s² + 1 − ᾱ), so samplers can be checked
against the known data distribution without training anything.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from admflow.config import DiffusionConfig
from models.denoiser import Denoiser
from models.diffusion_factory import create_diffusion
from models.diffusion_types import LossType, ModelMeanType, ModelVarType
from models.ema import EMA
from models.gaussian_diffusion import GaussianDiffusion
from models.guidance import cond_fn_from_classifier, drop_class_labels
from models.likelihood import calc_bpd_loop
from models.losses import discretized_gaussian_log_likelihood, normal_kl
from models.precision import DynamicLossScaler, autocast
from models.resample import LossSecondMomentResampler, UniformSampler
from models.respace import SpacedDiffusion, space_timesteps
from models.samplers import ddim_reverse_step, ddim_step, ddpm_step, make_sample_loop
from models.schedules import get_named_beta_schedule

T = 50


def make_diffusion(
    steps: int = T,
    schedule: str = "linear",
    mean_type: ModelMeanType = ModelMeanType.EPSILON,
    var_type: ModelVarType = ModelVarType.FIXED_SMALL,
    loss_type: LossType = LossType.MSE,
    respacing: str | None = None,
    **kw,
) -> GaussianDiffusion:
    args = dict(
        betas=get_named_beta_schedule(schedule, steps),
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        **kw,
    )
    if respacing is None:
        return GaussianDiffusion(**args)
    return SpacedDiffusion(use_timesteps=space_timesteps(steps, respacing), **args)


class GaussianDataEps:
    """Optimal ε-predictor for x_0 ~ N(mean, std²); called with ORIGINAL timestep indices.

    ``class_means`` makes it class-conditional (mean = class_means[y]); ``learned_v`` appends a
    constant variance channel for LEARNED_RANGE diffusions.
    """

    def __init__(self, alphas_cumprod, mean=0.0, std=0.5, class_means=None, learned_v=None):
        self.abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.mean, self.std, self.class_means, self.learned_v = mean, std, class_means, learned_v
        self.seen_t: list[torch.Tensor] = []

    def __call__(self, x, t, y=None):
        if (y is not None) != (self.class_means is not None):
            raise TypeError("y given to an unconditional model, or missing for a conditional one")
        self.seen_t.append(t.clone())
        abar = self.abar[t.long().cpu()].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        m = self.mean if y is None else torch.tensor(self.class_means, dtype=x.dtype)[y]
        if y is not None:
            m = m.reshape(-1, *([1] * (x.ndim - 1)))
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * m) / (abar * self.std**2 + 1 - abar)
        if self.learned_v is None:
            return eps
        return torch.cat([eps, torch.full_like(eps, self.learned_v)], dim=1)


class TwoHeadNet(nn.Module):
    """Tiny trainable net with separate parameters for the mean and variance outputs."""

    def __init__(self, channels=3, learn_sigma=True):
        super().__init__()
        self.mean_head = nn.Conv2d(channels, channels, 3, padding=1)
        self.t_embed = nn.Embedding(1000, channels)
        self.var_head = nn.Conv2d(channels, channels, 3, padding=1) if learn_sigma else None

    def forward(self, x, t, y=None):
        h = self.mean_head(x) + self.t_embed(t.long())[:, :, None, None]
        if self.var_head is None:
            return h
        return torch.cat([h, torch.tanh(self.var_head(x))], dim=1)


# ----------------------------------------------------------------------------- schedules


def test_linear_schedule_endpoints_scale_with_T():
    b = get_named_beta_schedule("linear", 1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    b = get_named_beta_schedule("linear", 250)
    assert b[0] == pytest.approx(4e-4) and b[-1] == pytest.approx(0.08)
    assert np.all(np.diff(b) > 0)


def test_cosine_schedule_matches_closed_form_alpha_bar():
    steps = 100
    b = get_named_beta_schedule("cosine", steps)
    f = [math.cos((i / steps + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(steps + 1)]
    abar_closed = np.array(f[1:]) / f[0]
    abar = np.cumprod(1 - b)
    unclipped = b < 0.999
    assert b.max() == pytest.approx(0.999)  # the last step is clipped
    assert unclipped[:-1].all()
    np.testing.assert_allclose(abar[:-1], abar_closed[:-1], rtol=1e-10)


# ----------------------------------------------------------------------------- forward process


def test_alpha_bar_products_and_q_moments():
    d = make_diffusion(steps=T)
    betas = get_named_beta_schedule("linear", T)
    for t in (0, 1, 17, T - 1):
        prod = 1.0
        for s in range(t + 1):
            prod *= 1.0 - betas[s]
        assert d.alphas_cumprod[t] == pytest.approx(prod, rel=1e-12)

    # Composing T one-step kernels q(x_t|x_{t-1}) gives q(x_t|x_0) = N(√ᾱ x0, 1−ᾱ).
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    x = x0.clone()
    for s in range(30):
        x = math.sqrt(1 - betas[s]) * x + math.sqrt(betas[s]) * torch.randn(
            x.shape, generator=g, dtype=x.dtype
        )
    t = torch.full((x0.shape[0],), 29)
    mean, var, log_var = d.q_mean_variance(x0, t)
    assert x.mean().item() == pytest.approx(mean[0, 0].item(), abs=0.02)
    assert x.var().item() == pytest.approx(var[0, 0].item(), rel=0.03)
    assert torch.allclose(log_var, var.log())
    xt = d.q_sample(x0, t, generator=g)
    assert xt.mean().item() == pytest.approx(mean[0, 0].item(), abs=0.02)
    assert xt.var().item() == pytest.approx(var[0, 0].item(), rel=0.03)


def test_posterior_matches_bayes_rule():
    d = make_diffusion(steps=T, schedule="cosine")
    betas, abar = d.betas, np.cumprod(1 - d.betas)
    x0 = torch.tensor([[0.3], [-0.8]], dtype=torch.float64)
    xt = torch.tensor([[1.1], [0.2]], dtype=torch.float64)
    for t in (1, 5, 30, T - 1):
        # prior q(x_{t-1}|x0) = N(√ᾱ_{t-1} x0, 1−ᾱ_{t-1}); likelihood q(x_t|x_{t-1}) = N(√α_t x_{t-1}, β_t)
        prior_var, a_t = 1 - abar[t - 1], 1 - betas[t]
        post_var = 1.0 / (1.0 / prior_var + a_t / betas[t])
        post_mean = post_var * (
            math.sqrt(abar[t - 1]) * x0 / prior_var + math.sqrt(a_t) * xt / betas[t]
        )
        mean, var, log_var = d.q_posterior_mean_variance(x0, xt, torch.full((2,), t))
        torch.testing.assert_close(mean, post_mean, rtol=1e-9, atol=1e-12)
        assert var.flatten()[0].item() == pytest.approx(post_var, rel=1e-9)
        assert log_var.flatten()[0].item() == pytest.approx(math.log(post_var), rel=1e-9)
    # t = 0: the posterior is a point mass at x0; its log variance is clipped to that of t = 1.
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert var.abs().max().item() == 0.0
    assert log_var.flatten()[0].item() == pytest.approx(math.log(d.posterior_variance[1]))


# ----------------------------------------------------------------------------- likelihood pieces


def test_normal_kl_zero_for_equal_and_matches_torch_distributions():
    m = torch.tensor([0.0, 1.5, -2.0], dtype=torch.float64)
    lv = torch.tensor([0.0, -1.0, 2.0], dtype=torch.float64)
    assert normal_kl(m, lv, m, lv).abs().max().item() < 1e-12
    m2, lv2 = m + 0.3, lv - 0.5
    kl = normal_kl(m, lv, m2, lv2)
    assert (kl > 0).all()
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m, (0.5 * lv).exp()),
        torch.distributions.Normal(m2, (0.5 * lv2).exp()),
    )
    torch.testing.assert_close(kl, ref)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.37, -5.0), (-0.9, -1.0), (1.0, 0.5)])
def test_discretized_decoder_sums_to_one_over_256_bins(mean, log_scale):
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    means = torch.full_like(bins, mean)
    log_scales = torch.full_like(bins, log_scale)
    logp = discretized_gaussian_log_likelihood(bins, means=means, log_scales=log_scales)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # An interior bin's mass against the exact normal CDF (the tanh approximation is ~1e-4 close).
    k = 128
    sd = math.exp(log_scale)
    exact = torch.special.ndtr((bins[k] + 1 / 255 - mean) / sd) - torch.special.ndtr(
        (bins[k] - 1 / 255 - mean) / sd
    )
    assert logp[k].exp().item() == pytest.approx(exact.item(), abs=1e-3)


# ----------------------------------------------------------------------------- respacing


def test_space_timesteps_forms():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    kept = space_timesteps(100, "10")
    assert len(kept) == 10 and min(kept) == 0 and max(kept) == 99
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45
    assert sum(k < 100 for k in kept) == 10 and sum(100 <= k < 200 for k in kept) == 15
    assert {0, 99, 100, 199, 200, 299} <= kept
    # pinned: offsets accumulate 15/14 per step as the released code does (k·15/14 would keep 8, not 7)
    assert sorted(space_timesteps(16, "15")) == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15]
    with pytest.raises(ValueError):
        space_timesteps(100, "ddim60")  # strides 1 and 2 give 100 and 50 steps, none gives 60
    with pytest.raises(ValueError):
        space_timesteps(100, "60,60")  # a section of 50 steps cannot hold 60


@pytest.mark.parametrize("rescale", [False, True])
def test_respaced_alpha_bar_and_timestep_map(rescale):
    base = make_diffusion(steps=100, schedule="cosine")
    d = make_diffusion(steps=100, schedule="cosine", respacing="10,5", rescale_timesteps=rescale)
    kept = sorted(space_timesteps(100, "10,5"))
    assert d.num_timesteps == 15
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    seen_t = []

    def recorder(x, t):
        seen_t.append(t)
        return torch.zeros_like(x)

    d.p_mean_variance(recorder, torch.randn(15, 1, 2, 2), torch.arange(15))
    seen = seen_t[-1]
    expected = torch.tensor(kept, dtype=torch.float32)
    if rescale:
        expected = expected * 1000.0 / 100
    torch.testing.assert_close(seen.float(), expected)


# ----------------------------------------------------------------------------- samplers


def test_ddim_eta0_is_deterministic_and_reverse_ode_step_inverts():
    d = make_diffusion(steps=100)
    model = GaussianDataEps(d.alphas_cumprod, mean=0.1, std=0.5)
    noise = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    a = make_sample_loop(d, "ddim")(
        model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(2)
    )
    b = make_sample_loop(d, "ddim")(
        model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a, b)
    # one forward ODE step x_t -> x_{t+1}, then the DDIM step back, recovers x_t
    # (T = 1000 so one step is short and the discretisation error small)
    d = make_diffusion(steps=1000)
    model = GaussianDataEps(d.alphas_cumprod, mean=0.1, std=0.5)
    x0 = 0.1 + 0.5 * torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    for step in (100, 600):
        t = torch.full((8,), step)
        x_t = d.q_sample(x0, t, generator=torch.Generator().manual_seed(5))
        denoiser = Denoiser(d, model, clip_denoised=False)
        x_next = ddim_reverse_step(denoiser, x_t, t)
        back = ddim_step(denoiser, x_next, t + 1, t, eta=0.0)["sample"]
        moved = (x_next - x_t).norm()
        assert moved > 1e-3  # the step did move x
        # the way back is exact to first order: the error is O(step²), a few % of the O(step) move
        assert (back - x_t).norm() < 0.05 * moved


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_reproduce_gaussian_data_and_seed(sampler):
    d = make_diffusion(steps=100, var_type=ModelVarType.FIXED_LARGE)
    model = GaussianDataEps(d.alphas_cumprod, mean=0.2, std=0.3)
    loop = make_sample_loop(d, sampler)
    shape = (512, 1, 4, 4)
    x = loop(model, shape, clip_denoised=False, generator=torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(0.2, abs=0.02)
    assert x.std().item() == pytest.approx(0.3, rel=0.06)
    again = loop(model, shape, clip_denoised=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def test_ddim_eta1_equals_ddpm_with_posterior_variance():
    # η = 1 makes σ_t² = β̃_t and the DDIM mean equal μ̃(x_t, x̂_0): ancestral sampling with β̃.
    d = make_diffusion(steps=40, var_type=ModelVarType.FIXED_SMALL)
    model = GaussianDataEps(d.alphas_cumprod, mean=-0.1, std=0.4)
    kw = dict(clip_denoised=False, generator=torch.Generator().manual_seed(3))
    a = make_sample_loop(d, "ddim", eta=1.0)(model, (16, 2, 3, 3), **kw)
    kw["generator"] = torch.Generator().manual_seed(3)
    b = make_sample_loop(d, "ddpm")(model, (16, 2, 3, 3), **kw)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_learned_range_variance_lies_between_posterior_and_beta():
    d = make_diffusion(steps=T, schedule="cosine", var_type=ModelVarType.LEARNED_RANGE)
    x = torch.randn(T, 2, 3, 3, dtype=torch.float64)
    t = torch.arange(T)
    lower = torch.as_tensor(np.exp(d.posterior_log_variance_clipped))[:, None, None, None]
    upper = torch.as_tensor(d.betas)[:, None, None, None]
    for v in (-1.0, -0.4, 0.3, 1.0):
        out = d.p_mean_variance(GaussianDataEps(d.alphas_cumprod, learned_v=v), x, t)
        var = out["variance"]
        assert (var >= lower * (1 - 1e-9)).all() and (var <= upper * (1 + 1e-9)).all()
        frac = (v + 1) / 2
        torch.testing.assert_close(
            var, (frac * upper.log() + (1 - frac) * lower.log()).exp().expand_as(var)
        )
    # v = -1 gives β̃_t exactly at t >= 1
    out = d.p_mean_variance(GaussianDataEps(d.alphas_cumprod, learned_v=-1.0), x, t)
    torch.testing.assert_close(
        out["variance"][1:, 0, 0, 0], torch.as_tensor(d.posterior_variance[1:])
    )


# ----------------------------------------------------------------------------- importance sampling


def test_loss_second_moment_sampler_keeps_weighted_loss_unbiased():
    steps = 20
    toy_loss = torch.linspace(0.1, 3.0, steps, dtype=torch.float64) ** 2  # L_t, larger at large t
    sampler = LossSecondMomentResampler(steps)
    w0 = sampler.weights()
    assert np.allclose(w0, 1.0)  # uniform until warm
    for _ in range(10):
        sampler.update_with_all_losses(torch.arange(steps), toy_loss)
    assert sampler.warmed_up()
    p = sampler.weights() / sampler.weights().sum()
    expected = toy_loss.numpy() / toy_loss.sum().item() * (1 - 1e-3) + 1e-3 / steps  # √E[L²] = L
    np.testing.assert_allclose(p, expected, rtol=1e-9)

    g = torch.Generator().manual_seed(0)
    t, w = sampler.sample(200_000, "cpu", generator=g)
    weighted_mean = (w * toy_loss[t]).mean().item()
    assert weighted_mean == pytest.approx(toy_loss.mean().item(), rel=0.01)
    assert t.float().mean().item() > (steps - 1) / 2 + 2  # it does prefer high-loss steps
    t_u, w_u = UniformSampler(steps).sample(1000, "cpu", generator=g)
    assert torch.all(w_u == 1.0)

    # checkpoint round trip (weights_only) and identical state across "workers"
    buf = io.BytesIO()
    torch.save(sampler.state_dict(), buf)
    buf.seek(0)
    other = LossSecondMomentResampler(steps)
    other.load_state_dict(torch.load(buf, weights_only=True))
    np.testing.assert_array_equal(other.weights(), sampler.weights())
    ts, losses = torch.tensor([3, 3, 7]), torch.tensor([9.0, 8.0, 0.5])
    sampler.update_with_all_losses(ts, losses)
    other.update_with_all_losses(ts, losses)
    np.testing.assert_array_equal(other.weights(), sampler.weights())


# ----------------------------------------------------------------------------- guidance


def bright_dark_classifier(x, t):
    """p(y|x): class 0 prefers bright images, class 1 dark ones."""
    brightness = x.mean(dim=(1, 2, 3))
    return torch.stack([4.0 * brightness, -4.0 * brightness], dim=1)


def p_target(x0, y):
    return (
        torch.softmax(bright_dark_classifier(x0, None), dim=1).gather(1, y[:, None]).mean().item()
    )


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("conditional", [False, True])
def test_classifier_guidance_raises_target_probability(sampler, conditional):
    d = make_diffusion(steps=100, var_type=ModelVarType.LEARNED_RANGE, respacing="25")
    base_abar = get_named_beta_schedule("linear", 100)
    base_abar = np.cumprod(1 - base_abar)
    if conditional:
        model = GaussianDataEps(base_abar, std=0.4, class_means=[0.1, -0.1], learned_v=0.0)
    else:
        model = drop_class_labels(GaussianDataEps(base_abar, std=0.4, learned_v=0.0))
    y = torch.zeros(64, dtype=torch.long)  # target: bright
    shape = (64, 3, 4, 4)
    loop = make_sample_loop(d, sampler)

    def run(cond_fn):
        return loop(
            model,
            shape,
            cond_fn=cond_fn,
            model_kwargs={"y": y},
            generator=torch.Generator().manual_seed(7),
        )

    unguided = run(None)
    probs = []
    for s in (0.0, 1.0, 4.0):
        x0 = run(cond_fn_from_classifier(bright_dark_classifier, s))
        if s == 0.0:
            assert torch.equal(x0, unguided)
        probs.append(p_target(x0, y))
    assert probs[0] < probs[1] < probs[2]
    assert probs[2] - probs[0] > 0.05


def test_cond_fn_is_scaled_log_prob_gradient():
    x = torch.randn(5, 3, 4, 4)
    y = torch.tensor([0, 1, 0, 1, 1])
    grad = cond_fn_from_classifier(bright_dark_classifier, 2.5)(x, torch.zeros(5), y=y)
    # closed form: logits ±4·mean, so d/dx log p_y = ±(1 − p_y)·8/D per pixel (D = 48)
    sign = 1.0 - 2.0 * y.float()
    p = torch.softmax(bright_dark_classifier(x, None), 1).gather(1, y[:, None]).squeeze(1)
    expected = (2.5 * sign * 8.0 / 48 * (1 - p))[:, None, None, None].expand_as(x)
    torch.testing.assert_close(grad, expected)
    assert not x.requires_grad


def constant_gradient(shape, scale, seed=11):
    """A cond_fn whose s∇_x log p_φ(y | x_t) is the known constant s·c (c varies per pixel)."""
    c = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def cond_fn(x, t, y=None):
        return scale * c

    return cond_fn, c


def test_condition_mean_shifts_the_ddpm_mean_by_sigma_s_c():
    # Σ_t = β_t (FIXED_LARGE) written from the schedule here, not read back from the diffusion.
    d = make_diffusion(steps=T, var_type=ModelVarType.FIXED_LARGE)
    betas = get_named_beta_schedule("linear", T)
    model = GaussianDataEps(d.alphas_cumprod, mean=0.1, std=0.5)
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([1, 7, 30, T - 1])
    s = 3.0
    cond_fn, c = constant_gradient(x.shape, s)
    kw = dict(clip_denoised=False, model_kwargs={"y": torch.zeros(4, dtype=torch.long)})
    model = drop_class_labels(model)
    plain = ddpm_step(Denoiser(d, model, **kw), x, t, noise)["sample"]
    guided = ddpm_step(Denoiser(d, model, cond_fn=cond_fn, **kw), x, t, noise)["sample"]
    sigma = torch.as_tensor(betas[t.numpy()])[:, None, None, None]
    torch.testing.assert_close(guided - plain, sigma * s * c, rtol=1e-9, atol=1e-12)


def test_condition_score_shifts_ddim_eps_by_sqrt_one_minus_alpha_bar_s_c():
    d = make_diffusion(steps=T)
    abar = np.cumprod(1 - get_named_beta_schedule("linear", T))
    model = GaussianDataEps(d.alphas_cumprod, mean=0.1, std=0.5)
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([1, 7, 30, T - 1])
    s = 3.0
    cond_fn, c = constant_gradient(x.shape, s)
    a, a_prev = (torch.as_tensor(v)[:, None, None, None] for v in (abar[t], abar[t - 1]))
    eps = model(x, t)
    denoiser = Denoiser(d, model, clip_denoised=False, cond_fn=cond_fn)
    guided = denoiser.eps_and_xstart(x, t)
    eps_hat = eps - (1 - a).sqrt() * s * c
    torch.testing.assert_close(guided["eps"], eps_hat, rtol=1e-9, atol=1e-12)
    x0_hat = (x - (1 - a).sqrt() * eps_hat) / a.sqrt()
    torch.testing.assert_close(guided["pred_xstart"], x0_hat, rtol=1e-9, atol=1e-12)
    # the whole DDIM step (η = 0) with the guided ε̂: √ᾱ_{t−1} x̂_0 + √(1−ᾱ_{t−1}) ε̂
    step = ddim_step(denoiser, x, t, t - 1)["sample"]
    torch.testing.assert_close(step, a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps_hat)


# ----------------------------------------------------------------------------- training losses


@pytest.mark.parametrize(
    "mean_type,var_type,loss_type",
    [
        (ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, LossType.MSE),
        (ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, LossType.RESCALED_MSE),
        (ModelMeanType.START_X, ModelVarType.FIXED_LARGE, LossType.MSE),
        (ModelMeanType.PREVIOUS_X, ModelVarType.LEARNED, LossType.KL),
        (ModelMeanType.EPSILON, ModelVarType.FIXED_SMALL, LossType.RESCALED_KL),
    ],
)
def test_training_losses_finite(mean_type, var_type, loss_type):
    torch.manual_seed(0)
    d = make_diffusion(steps=T, mean_type=mean_type, var_type=var_type, loss_type=loss_type)
    learn = var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
    net = TwoHeadNet(learn_sigma=learn)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 1, 25, T - 1])
    terms = d.training_losses(net, x0, t)
    for k in ("loss", "mse", "vb"):
        assert terms[k].shape == (4,) and torch.isfinite(terms[k]).all()
    terms["loss"].mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def _posterior(x0, x_t, t, betas):
    """q(x_{t−1} | x_t, x_0) from the schedule (DDPM eq. 7): mean and variance, (B,1,1,1)."""
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    col = lambda v: torch.as_tensor(v[t.numpy()])[:, None, None, None]  # noqa: E731
    b, a, a_prev = col(betas), col(abar), col(abar_prev)
    mean = b * a_prev.sqrt() / (1 - a) * x0 + (1 - a_prev) * (1 - b).sqrt() / (1 - a) * x_t
    return mean, b * (1 - a_prev) / (1 - a)


def linear_two_head(x, t):
    """ε̂ = 0.5 x − 0.2 and v = 0.3: a fixed, known network output for LEARNED_RANGE."""
    return torch.cat([0.5 * x - 0.2, torch.full_like(x, 0.3)], dim=1)


def test_vb_terms_are_the_kl_in_bits_and_the_discretised_decoder_nll():
    betas = get_named_beta_schedule("linear", T)
    d = make_diffusion(steps=T, var_type=ModelVarType.LEARNED_RANGE, loss_type=LossType.KL)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (4, 3, 4, 4), generator=g).double() / 127.5 - 1  # 8-bit grid
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # both open-ended edge bins
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 20, T - 1])
    vb = d.training_losses(linear_two_head, x0, t, noise=noise)["vb"]

    abar = torch.as_tensor(np.cumprod(1 - betas))[t][:, None, None, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    x0_hat = (x_t - (1 - abar).sqrt() * (0.5 * x_t - 0.2)) / abar.sqrt()
    true_mean, true_var = _posterior(x0, x_t, t, betas)
    model_mean, _ = _posterior(x0_hat, x_t, t, betas)
    # IDDPM eq. 15 with v = 0.3; β̃ at t = 0 is clipped to β̃ of step 1
    abar_all = np.cumprod(1 - betas)
    post_var = betas * (1 - np.append(1.0, abar_all[:-1])) / (1 - abar_all)
    low = torch.as_tensor(np.log(np.append(post_var[1], post_var[1:]))[t.numpy()])
    high = torch.as_tensor(np.log(betas)[t.numpy()])
    model_sd = (0.5 * (0.65 * high + 0.35 * low)).exp()[:, None, None, None]

    kl = torch.distributions.kl_divergence(  # t > 0 only: at t = 0 q is a point mass
        torch.distributions.Normal(true_mean[1:], true_var[1:].sqrt()),
        torch.distributions.Normal(model_mean[1:], model_sd[1:]),
    )
    kl_bits = kl.mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(vb[1:], kl_bits, rtol=1e-9, atol=1e-12)

    # t = 0: −log2 of the Gaussian mass of x_0's bin (edges open), with the exact normal CDF
    cdf = torch.distributions.Normal(model_mean[:1], model_sd[:1]).cdf
    x = x0[:1]
    upper = torch.where(x > 0.999, torch.ones_like(x), cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, torch.zeros_like(x), cdf(x - 1 / 255))
    nll_bits = -(upper - lower).log().mean() / math.log(2)
    # the loss uses the tanh approximation of Φ (~1e-4 absolute): a relative 1e-3 here
    assert vb[0].item() == pytest.approx(nll_bits.item(), rel=1e-3)


@pytest.mark.parametrize("mean_type", [ModelMeanType.START_X, ModelMeanType.PREVIOUS_X])
def test_mse_targets_are_x0_and_the_posterior_mean(mean_type):
    betas = get_named_beta_schedule("linear", T)
    d = make_diffusion(steps=T, mean_type=mean_type, var_type=ModelVarType.FIXED_LARGE)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 5, 25, T - 1])

    def net(x, t):
        return 0.7 * x + 0.05

    mse = d.training_losses(net, x0, t, noise=noise)["mse"]
    abar = torch.as_tensor(np.cumprod(1 - betas))[t][:, None, None, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    target = x0 if mean_type == ModelMeanType.START_X else _posterior(x0, x_t, t, betas)[0]
    torch.testing.assert_close(mse, ((net(x_t, t) - target) ** 2).mean(dim=(1, 2, 3)))


def test_hybrid_loss_vb_term_does_not_backprop_into_mean():
    d = make_diffusion(
        steps=T, var_type=ModelVarType.LEARNED_RANGE, loss_type=LossType.RESCALED_MSE
    )
    net = TwoHeadNet()
    x0 = torch.rand(6, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 3, 10, 20, 30, 49])
    noise = torch.randn_like(x0)
    terms = d.training_losses(net, x0, t, noise=noise)
    mean_params = list(net.mean_head.parameters()) + list(net.t_embed.parameters())
    var_params = list(net.var_head.parameters())
    g_mean = torch.autograd.grad(
        terms["vb"].sum(), mean_params, retain_graph=True, allow_unused=True
    )
    assert all(g is None or g.abs().max() == 0 for g in g_mean)
    g_var = torch.autograd.grad(terms["vb"].sum(), var_params, retain_graph=True)
    assert any(g.abs().max() > 0 for g in g_var)
    g_var_mse = torch.autograd.grad(
        terms["mse"].sum(), var_params, retain_graph=True, allow_unused=True
    )
    assert all(g is None or g.abs().max() == 0 for g in g_var_mse)
    # L_hybrid = L_simple + λ·T·vb for RESCALED_MSE, and mse is the ε error
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.001 * T * terms["vb"])
    with torch.no_grad():
        eps_pred = net(d.q_sample(x0, t, noise=noise), t)[:, :3]
    torch.testing.assert_close(terms["mse"], ((eps_pred - noise) ** 2).mean(dim=(1, 2, 3)))


def test_calc_bpd_loop_finite_and_better_for_the_right_model():
    d = make_diffusion(steps=T, var_type=ModelVarType.FIXED_SMALL)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 1, 4, 4), generator=g)
    x0 = pixels.float() / 127.5 - 1.0
    good = GaussianDataEps(d.alphas_cumprod, mean=x0.mean().item(), std=x0.std().item())
    out = calc_bpd_loop(d, good, x0, generator=torch.Generator().manual_seed(1))
    assert out["vb"].shape == (4, T) and torch.isfinite(out["total_bpd"]).all()
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    assert (out["prior_bpd"] < 0.1).all() and (out["total_bpd"] > 0).all()

    def zero_eps(x, t):
        return torch.zeros_like(x)

    bad = calc_bpd_loop(d, zero_eps, x0, generator=torch.Generator().manual_seed(1))
    assert out["total_bpd"].mean() < bad["total_bpd"].mean()


# ----------------------------------------------------------------------------- factory, EMA, precision


def test_create_diffusion_mapping():
    d = create_diffusion(DiffusionConfig())
    assert d.num_timesteps == 1000 and d.model_var_type == ModelVarType.LEARNED_RANGE
    assert d.loss_type == LossType.MSE and d.model_mean_type == ModelMeanType.EPSILON
    assert d.vb_loss_weight() == pytest.approx(1.0)  # released guided-diffusion weight
    d = create_diffusion(
        DiffusionConfig(steps=4000, noise_schedule="cosine", rescale_learned_sigmas=True)
    )
    assert d.loss_type == LossType.RESCALED_MSE and d.vb_loss_weight() == pytest.approx(4.0)
    d = create_diffusion(
        DiffusionConfig(learn_sigma=False, sigma_small=True, use_kl=True), "ddim25"
    )
    assert d.num_timesteps == 25 and d.model_var_type == ModelVarType.FIXED_SMALL
    assert d.loss_type == LossType.RESCALED_KL


def test_ema_rates_and_state_roundtrip():
    net = nn.Linear(3, 2)
    ema = EMA(net, [0.9, 0.5])
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.shadow["0.9"]["weight"], start + 0.1)
    torch.testing.assert_close(ema.shadow["0.5"]["weight"], start + 0.5)
    other = EMA(nn.Linear(3, 2), [0.9, 0.5])
    other.load_state_dict(ema.state_dict())
    target = nn.Linear(3, 2)
    other.copy_to(target, 0.9)
    torch.testing.assert_close(target.weight, start + 0.1)
    assert set(ema.model_state_dict(net, 0.5)) == set(net.state_dict())


def test_loss_scaler_skips_nonfinite_and_unscales():
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler = DynamicLossScaler(initial_log2_scale=4.0)
    scaler.scale_loss((p * torch.tensor([1.0, float("inf")])).sum()).backward()
    assert not scaler.step(opt) and scaler.log2_scale == 3.0
    torch.testing.assert_close(p.detach(), torch.ones(2))
    scaler.scale_loss((p * 2.0).sum()).backward()
    assert scaler.step(opt)
    torch.testing.assert_close(p.detach(), torch.full((2,), -1.0))  # true grad 2, lr 1
    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.log2_scale == pytest.approx(3.001)
    with autocast("bf16", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        autocast("fp16", "cpu")
