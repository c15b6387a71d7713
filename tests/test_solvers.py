"""The few-step solvers and guidance forms against closed forms (Gaussian data, no training).

For x_0 ~ N(m, s²) per pixel the probability-flow ODE maps x_t linearly: the standardised
z = (x_t − α_t m) / √(α_t² s² + σ_t²) is constant along a trajectory, so the exact solution
between any two times, and the exact x̂_0 = E[x_0 | x_t], are known in closed form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import grids
from models.diffusion_types import ModelVarType
from models.grids import solver_grid
from models.guidance import classifier_free, cond_fn_from_classifier, drop_labels
from models.samplers import make_sample_loop
from tests.test_diffusion import GaussianDataEps, bright_dark_classifier, make_diffusion, p_target
from tests.test_train import assert_same_params, local_run, one_torch_thread, shards, small_cfg  # noqa: F401

MEAN, STD = 0.2, 0.4
SCHEDULE = "linear"


def exact_solution(d, grid: np.ndarray, x_start: torch.Tensor) -> torch.Tensor:
    """The exact ODE flow from grid[0] to grid[-1], then the exact x̂_0 there (what the
    solvers return as their last evaluation)."""
    abar = d.alphas_cumprod
    a0, a1 = math.sqrt(abar[grid[0]]), math.sqrt(abar[grid[-1]])
    v0 = a0**2 * STD**2 + 1 - abar[grid[0]]
    v1 = a1**2 * STD**2 + 1 - abar[grid[-1]]
    z = (x_start - a0 * MEAN) / math.sqrt(v0)
    x1 = a1 * MEAN + math.sqrt(v1) * z
    return MEAN + a1 * STD**2 * (x1 - a1 * MEAN) / v1


def solver_error(kind: str, steps: int, schedule: str, order: int) -> float:
    d = make_diffusion(steps=1000, schedule=SCHEDULE, var_type=ModelVarType.LEARNED_RANGE)
    model = GaussianDataEps(d.alphas_cumprod, mean=MEAN, std=STD, learned_v=0.0)
    noise = torch.randn((64, 1, 2, 2), generator=torch.Generator().manual_seed(0)).double()
    loop = make_sample_loop(d, kind, steps=steps, schedule=schedule, order=order)
    x0 = loop(model, noise.shape, noise=noise, clip_denoised=False)
    assert len(model.seen_t) == steps  # one network evaluation per grid point
    return (x0 - exact_solution(d, solver_grid(d, steps, schedule), noise)).abs().max().item()


@pytest.mark.parametrize(
    "kind,order,expected",
    [("dpm++2m", 1, 1), ("dpm++2m", 2, 2), ("unipc", 1, 2), ("unipc", 2, 3)],
)
@pytest.mark.parametrize("schedule", ["time", "logsnr", "quadratic"])
def test_solvers_converge_with_their_order(kind, order, expected, schedule):
    """Error ratio between 20 and 40 solver steps (21 and 41 evaluations: the last one is x̂_0).

    The linear schedule spans λ from −5 to 4.6; at 10 steps (h ≈ 1) the error is not yet in its
    asymptotic regime (10 -> 20 gives orders 1.4 for DPM-Solver++(2M), 2.7 for UniPC-2).
    On the time-uniform grid h varies 30-fold along the path, so the measured ratio is not a
    clean power of two there (1.4 to 3.3); only convergence is required.
    """
    coarse, fine = solver_error(kind, 21, schedule, order), solver_error(kind, 41, schedule, order)
    measured = math.log2(coarse / fine)
    if schedule == "logsnr":
        assert abs(measured - expected) < 0.3, f"{kind} order {order}: measured {measured:.2f}"
    else:
        assert measured > 0.8, f"{kind} order {order}: measured {measured:.2f}"


@pytest.mark.parametrize("schedule", ["time", "logsnr", "quadratic"])
@pytest.mark.parametrize("nfe", [11, 21])
def test_higher_order_solvers_beat_ddim_at_few_steps(schedule, nfe):
    ddim = solver_error("dpm++2m", nfe, schedule, order=1)
    assert solver_error("dpm++2m", nfe, schedule, order=2) < 0.85 * ddim
    assert solver_error("unipc", nfe, schedule, order=2) < 0.85 * ddim


def test_solver_grids_are_trained_timesteps_and_respaced_models_see_original_ones():
    d = make_diffusion(steps=1000, schedule="cosine", respacing="100")
    for schedule in ("time", "logsnr", "quadratic"):
        for steps in (3, 5, 10, 50, 100):
            grid = solver_grid(d, steps, schedule)
            assert len(grid) == steps and grid[0] == 99 and grid[-1] == 0
            assert (np.diff(grid) < 0).all()
    lin = make_diffusion(steps=1000, schedule="linear", respacing="100")
    lam = 0.5 * np.log(lin.alphas_cumprod / (1 - lin.alphas_cumprod))
    gaps = np.diff(lam[solver_grid(lin, 10, "logsnr")])
    # uniform in log-SNR, but for the last steps, where 10 respaced indices are too coarse
    np.testing.assert_allclose(gaps[:-2], gaps[:-2].mean(), rtol=0.1)
    # evenly spaced in sqrt(index): the steps shrink linearly towards t = 0
    steps = -np.diff(solver_grid(make_diffusion(steps=1000, schedule="cosine"), 10, "quadratic"))
    assert (np.diff(steps) < 0).all() and steps[0] / steps[-1] > 10
    model = GaussianDataEps(make_diffusion(steps=1000, schedule="cosine").alphas_cumprod)
    make_sample_loop(d, "unipc", steps=5)(model, (2, 1, 2, 2))
    seen = sorted({int(t[0]) for t in model.seen_t})
    assert seen == sorted(int(d.timestep_map[i]) for i in solver_grid(d, 5, "time"))
    with pytest.raises(ValueError, match="steps"):
        solver_grid(d, 2)
    from admflow.config.sampling import STEP_SCHEDULES

    assert STEP_SCHEDULES == grids.STEP_SCHEDULES  # the config offers every grid, no other


def test_the_config_offers_every_sampler_for_both_stages():
    from typing import get_args

    from admflow.config import load_config
    from admflow.config.sampling import SOLVER_NAMES, SamplerName
    from models.samplers import SAMPLERS
    from models.solvers import SOLVERS

    assert set(get_args(SamplerName)) == set(SAMPLERS) and SOLVER_NAMES == SOLVERS
    cfg = load_config("tiny", ["sampling.upsample_sampler=dpm++2m-sde"])
    assert cfg.sampling.upsampler_steps() == ("dpm++2m-sde", "25")


@pytest.mark.parametrize("kind", ["dpm++2m", "unipc"])
@pytest.mark.parametrize("guided", [False, True])
def test_first_order_solvers_are_ddim(kind, guided):
    d = make_diffusion(steps=200, var_type=ModelVarType.LEARNED_RANGE, respacing="10")
    abar = np.cumprod(1 - make_diffusion(steps=200).betas)
    model = GaussianDataEps(abar, std=0.9, class_means=[0.5, -0.5], learned_v=0.3)
    kw = dict(
        model_kwargs={"y": torch.tensor([0, 1] * 8)},
        cond_fn=cond_fn_from_classifier(bright_dark_classifier, 2.0) if guided else None,
        clip_denoised=not guided,  # (DDIM clips before guidance, the solvers after)
        generator=torch.Generator().manual_seed(3),
    )
    ddim = make_sample_loop(d, "ddim")(model, (16, 3, 4, 4), **kw)
    assert (ddim.abs() == 1).any() or guided  # clipping did act
    kw["generator"] = torch.Generator().manual_seed(3)
    assert len(solver_grid(d, 10, "time")) == 10  # NFE
    x = make_sample_loop(d, kind, steps=10, schedule="time", order=1)(model, (16, 3, 4, 4), **kw)
    if kind == "dpm++2m":  # order 1 is DDIM exactly; UniC-1 adds its correction on top
        torch.testing.assert_close(x, ddim, rtol=1e-5, atol=1e-5)
    else:
        assert 0 < (x - ddim).abs().max() < 0.5


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "dpm++2m-sde", "unipc"])
def test_classifier_guidance_raises_target_probability_in_every_solver(sampler):
    d = make_diffusion(steps=100, var_type=ModelVarType.LEARNED_RANGE, respacing="25")
    base_abar = np.cumprod(1 - make_diffusion(steps=100).betas)
    model = GaussianDataEps(base_abar, std=0.4, class_means=[0.1, -0.1], learned_v=0.0)
    y = torch.zeros(64, dtype=torch.long)
    loop = make_sample_loop(d, sampler, steps=8)

    def run(scale):
        return loop(
            model,
            (64, 3, 4, 4),
            cond_fn=None
            if scale is None
            else cond_fn_from_classifier(bright_dark_classifier, scale),
            model_kwargs={"y": y},
            generator=torch.Generator().manual_seed(7),
        )

    assert torch.equal(run(None), run(0.0))  # the guided path at s = 0 adds exactly zero
    probs = [p_target(run(s), y) for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(probs, probs[1:], strict=False)), probs
    assert probs[-1] - probs[0] > 0.05


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "dpm++2m-sde", "unipc"])
def test_cfg_weight_zero_is_the_conditional_sampler_and_w_moves_to_the_class(sampler):
    d = make_diffusion(steps=100, var_type=ModelVarType.LEARNED_RANGE, respacing="20")
    base_abar = np.cumprod(1 - make_diffusion(steps=100).betas)
    # class 2 is the null class: its data mean is the average of the two real classes
    model = GaussianDataEps(base_abar, std=0.3, class_means=[0.3, -0.3, 0.0], learned_v=0.1)
    y = torch.zeros(32, dtype=torch.long)
    loop = make_sample_loop(d, sampler, steps=10)

    def run(fn):
        kw = dict(model_kwargs={"y": y}, generator=torch.Generator().manual_seed(5))
        return loop(fn, (32, 3, 2, 2), **kw)

    conditional = run(model)
    assert torch.equal(run(classifier_free(model, 0.0, null_class=2)), conditional)
    means = [run(classifier_free(model, w, null_class=2)).mean().item() for w in (0.0, 1.0, 3.0)]
    assert means[0] < means[1] < means[2]  # pushed further from ∅ toward class 0 (mean 0.3)


def test_label_dropout_is_a_function_of_the_step_seed():
    from tasks.training.loop import step_seed

    y = torch.arange(10).repeat(100)

    def dropped(step):
        gen = torch.Generator().manual_seed(step_seed(0, step, 0, 3))
        return drop_labels(y, 0.2, 10, gen)

    a, again, other = dropped(7), dropped(7), dropped(8)
    assert torch.equal(a, again)  # a resumed run redraws the same coins
    assert not torch.equal(a, other)
    is_null = a == 10
    assert 0.15 < is_null.float().mean().item() < 0.25
    assert torch.equal(a[~is_null], y[~is_null])
    assert torch.equal(drop_labels(y, 0.0, 10, torch.Generator()), y)


def test_cfg_training_has_a_null_class_and_resumes_bit_identically(shards, tmp_path):  # noqa: F811
    """Label dropout in the real loop: the null row ∅ is trained, and a run cut at step 3 and
    resumed from step 2 ends exactly where the uninterrupted run ends."""
    over = ["training.steps=4", "training.checkpoint_every=2", "training.batch_size=8"]
    cfg = small_cfg(tmp_path, *over, "model.null_class=true", "training.label_dropout=0.5")
    whole, _ = local_run(cfg, "diffusion", shards, "whole")
    with pytest.raises(RuntimeError, match="injected fault at step 3"):
        local_run(cfg, "diffusion", shards, "cut", fail_at_step=3)
    resumed, _ = local_run(cfg, "diffusion", shards, "cut")
    assert resumed.start_step == 2
    assert_same_params(whole.module.state_dict(), resumed.module.state_dict())
    keep = small_cfg(tmp_path, *over, "model.null_class=true")
    kept, _ = local_run(keep, "diffusion", shards, "kept")
    null_row = whole.module.label_emb.weight.shape[0] - 1
    assert null_row == 10  # num_classes real rows, then ∅
    # without dropout ∅ never occurs and its row keeps its initial value; with it, it learns
    assert not torch.equal(
        whole.module.label_emb.weight[null_row], kept.module.label_emb.weight[null_row]
    )


def test_sample_worker_runs_each_sampler_and_free_guidance(tmp_path):
    """The sample stage's worker (no Ray): every sampler name and CFG reach the network."""
    import io

    from admflow.config import load_config
    from models.build import build_unet
    from tasks.sampling.spec import SamplerSpec
    from tasks.sampling.worker import ShardSampler

    cfg = small_cfg(tmp_path, "model.null_class=true")
    torch.manual_seed(0)
    net = build_unet(cfg.model)
    with torch.no_grad():
        for p in net.out.parameters():  # the released zero-init head would make ε ≡ 0
            p.normal_(0, 0.05)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    base = dict(
        kind="base",
        network=cfg.model.model_dump(mode="json"),
        diffusion=cfg.diffusion.model_dump(mode="json"),
        respacing="10",
        batch_size=4,
        device="cpu",
    )
    labels = np.array([1, 2, 3, 4])
    for sampler, extra, calls in [
        ("ddim", {}, 10),
        ("dpm++2m", {"solver_steps": 5}, 5),
        ("unipc", {"solver_steps": 5, "step_schedule": "logsnr"}, 5),
        ("unipc", {"solver_steps": 5, "cfg_scale": 3.0}, 10),
    ]:
        worker = ShardSampler(SamplerSpec(sampler=sampler, **extra, **base), buf.getvalue(), None)
        seen: list[torch.Tensor] = []
        net_fn = worker.model

        def spy(x, t, y=None, _net=net_fn, _seen=seen):
            _seen.append(y.clone())
            return _net(x, t, y=y)

        worker.model = spy
        imgs, labs = worker.sample(0, labels)
        assert imgs.shape == (4, 16, 16, 3) and imgs.dtype == np.uint8
        np.testing.assert_array_equal(labs, labels)
        assert len(seen) == calls  # network evaluations: steps (x2 with classifier-free)
        nulls = sum(bool((y == 10).all()) for y in seen)
        assert nulls == (calls // 2 if "cfg_scale" in extra else 0)  # ∅ = num_classes
    assert load_config("tiny", ["sampling.sampler=dpm++2m"]).sampling.sampler == "dpm++2m"


# ------------------------------------------------------------------ SDE-DPM-Solver++(2M)


@pytest.mark.parametrize("guided", [False, True])
def test_first_order_sde_solver_is_ddim_with_eta_one(guided):
    """The same noise, drawn one per step from the same generator: the first-order step of
    the SDE form is DDIM's η = 1 step."""
    d = make_diffusion(steps=200, var_type=ModelVarType.LEARNED_RANGE, respacing="10")
    abar = np.cumprod(1 - make_diffusion(steps=200).betas)
    model = GaussianDataEps(abar, std=0.9, class_means=[0.5, -0.5], learned_v=0.3)

    def run(sampler, **options):
        kw = dict(
            model_kwargs={"y": torch.tensor([0, 1] * 8)},
            cond_fn=cond_fn_from_classifier(bright_dark_classifier, 2.0) if guided else None,
            clip_denoised=not guided,  # (DDIM clips before guidance, the solvers after)
            generator=torch.Generator().manual_seed(3),
        )
        return make_sample_loop(d, sampler, **options)(model, (16, 3, 4, 4), **kw)

    ddim = run("ddim", eta=1.0)
    sde = run("dpm++2m-sde", steps=10, schedule="time", order=1)
    torch.testing.assert_close(sde, ddim, rtol=1e-5, atol=1e-5)
    assert not torch.equal(run("ddim", eta=0.0), ddim)  # the noise did act


def test_sde_step_integrates_a_denoiser_linear_in_log_snr_exactly():
    """With D(λ) = a + bλ and no noise, the second-order step equals the integral
    x_t = (σ_t/σ_s) e^{−h} x_s + 2 α_t ∫_0^h e^{−2(h−u)} D(λ_s + u) du (by quadrature)."""
    from models.solvers import _Grid, _sde_step

    d = make_diffusion(steps=1000, schedule="cosine")
    denoiser = type("D", (), {"diffusion": d})()
    g = _Grid.of(denoiser, np.array([900, 600, 300, 0]), "dpm++2m-sde", 2)
    a, b = torch.tensor([0.3, -0.2]).double(), torch.tensor([0.05, 0.02]).double()
    hist = [(float(lam), a + b * float(lam)) for lam in g.lam[:2]]
    x = torch.tensor([0.7, -1.1]).double()
    got = _sde_step(x, g, 1, hist, torch.zeros(2).double())
    lam_s, lam_t = float(g.lam[1]), float(g.lam[2])
    h = lam_t - lam_s
    u = np.linspace(0.0, h, 200001)
    weights = 2 * np.exp(-2 * (h - u))
    integral = [
        np.trapezoid(weights * (a[i].item() + b[i].item() * (lam_s + u)), u) for i in (0, 1)
    ]
    want = g.sigma[2] / g.sigma[1] * math.exp(-h) * x.numpy() + g.alpha[2] * np.array(integral)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-7, atol=1e-9)


def test_sde_solver_converges_to_the_data_distribution():
    """Gaussian data N(m, s²) with the exact x̂_0: from x_T ~ N(0, 1) the reverse SDE ends in
    the data distribution. Both orders keep the mean; the spread, too small on a coarse grid,
    closes in with more steps, and the second order is much closer at 20 evaluations
    (8,192 values: the sampling noise of the std is ~0.003)."""
    d = make_diffusion(steps=1000, schedule=SCHEDULE, var_type=ModelVarType.LEARNED_RANGE)
    model = GaussianDataEps(d.alphas_cumprod, mean=MEAN, std=STD, learned_v=0.0)

    def spread_error(steps: int, order: int) -> float:
        loop = make_sample_loop(d, "dpm++2m-sde", steps=steps, order=order)
        gen = torch.Generator().manual_seed(1)
        x = loop(model, (2048, 1, 2, 2), clip_denoised=False, generator=gen)
        assert abs(x.mean().item() - MEAN) < 0.01
        return abs(x.std().item() - STD)

    first, second = spread_error(20, 1), spread_error(20, 2)
    assert second < 0.5 * first, (first, second)
    assert spread_error(200, 1) < 0.5 * first and spread_error(200, 2) < 0.5 * second
