"""Few-step solvers for ε-prediction diffusions: DPM-Solver++(2M), its SDE form, and UniPC.

DPM-Solver++(2M) and UniPC integrate the probability-flow ODE in its data-prediction form
(Lu et al. 2022, "DPM-Solver++"; Zhao et al. 2023, "UniPC"); SDE-DPM-Solver++(2M) (the same
paper) integrates the reverse SDE, drawing fresh noise at every step (see :func:`_sde_step`).
With α_t = √ᾱ_t, σ_t = √(1−ᾱ_t), λ_t = log(α_t/σ_t) and x̂_0 = D(x_t, t) the model's (clipped,
guided) data prediction, the exact solution of the ODE is

    x_t = (σ_t/σ_s) x_s + α_t ∫_0^h e^{−(h−u)} D(λ_s + u) du,      h = λ_t − λ_s,

and the solvers replace D by a polynomial through the values already computed.

* The step grid (models.grids.solver_grid) holds the diffusion's own (respaced) timesteps, so
  the network always sees a timestep it was trained on. Its length is the number of network
  evaluations (NFE): one per grid point; the last evaluation, at index 0, is returned as the
  sample (x̂_0), which is what DDIM's last step does too.
* D is the denoiser's data prediction ``denoiser(x, t)`` (models.denoiser): the guided ε̂ turned
  into x̂_0, then ADM's denoised_fn and the clip. Classifier and classifier-free guidance are
  the denoiser's.
* The last step, into t = 0, is first order in every solver (see :meth:`_Grid.order_at`).
* With ``order=1`` DPM-Solver++ is DDIM (η = 0) on the same grid (exactly so unless guidance
  and clipping are both on: DDIM clips before adding the guidance term); its SDE form is DDIM
  with η = 1.

UniPC here uses B(h) = e^{−h} − 1 (the bh2 form); its coefficients are solved from the order
conditions at every step, so UniP-p has order p and the corrector UniC, which reuses the
evaluation at the predicted point (no extra NFE), raises it to p + 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.denoiser import Denoiser
from models.noise import Generator, randn

SOLVERS = ("dpm++2m", "dpm++2m-sde", "unipc")
MAX_ORDER = {"dpm++2m": 2, "dpm++2m-sde": 2, "unipc": 3}
Callback = Callable[[dict[str, Any]], None]  # gets {"i", "t", "x", "pred_xstart"} per step
History = list[tuple[float, torch.Tensor]]  # (λ, D) of the latest evaluations, oldest first


def _phi_integrals(h: float, n: int) -> list[float]:
    """I_k = ∫_0^h e^{−(h−u)} u^k/k! du for k = 0..n, by I_k = h^k/k! − I_{k−1}."""
    out = [-math.expm1(-h)]
    for k in range(1, n + 1):
        out.append(h**k / math.factorial(k) - out[-1])
    return out


@dataclass(frozen=True)
class _Grid:
    """α, σ and λ at the grid's timesteps, and the solver's order."""

    timesteps: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    lam: np.ndarray
    order: int

    @classmethod
    def of(cls, denoiser: Denoiser, grid: np.ndarray, kind: str, order: int) -> _Grid:
        if not 1 <= order <= MAX_ORDER[kind]:
            raise ValueError(f"order {order} is not available for {kind}")
        abar = denoiser.diffusion.alphas_cumprod[grid]
        alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
        return cls(np.asarray(grid), alpha, sigma, np.log(alpha) - np.log(sigma), order)

    def t(self, k: int, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), int(self.timesteps[k]), device=x.device, dtype=torch.long)

    def order_at(self, s: int) -> int:
        """The order of step s -> s+1: first order for the last step (into t = 0).

        λ grows like −½ log t near t = 0, so on a time-uniform grid the last step is by far the
        longest in λ, and extrapolating D over it overshoots. Dropping to first order there at
        every step count keeps the log-SNR grid's orders (D is nearly constant at high λ, so
        the first-order step costs almost nothing there).
        """
        return 1 if s + 2 == len(self.timesteps) else self.order


def _first_step(denoiser: Denoiser, x_T: torch.Tensor, g: _Grid) -> tuple[torch.Tensor, History]:
    d = denoiser(x_T, g.t(0, x_T))
    return d, [(float(g.lam[0]), d)]


def _report(
    callback: Callback | None,
    g: _Grid,
    s: int,
    x: torch.Tensor,
    d: torch.Tensor,
) -> None:
    if callback is not None:
        callback({"i": s, "t": g.t(s + 1, x), "x": x, "pred_xstart": d})


# ---------------------------------------------------------------------------- DPM-Solver++(2M)


def _dpm_step(x: torch.Tensor, g: _Grid, s: int, hist: History) -> torch.Tensor:
    """DPM-Solver++(2M) step s -> s+1: D linear in λ through the last two evaluations."""
    t = s + 1
    h = g.lam[t] - g.lam[s]
    lam_s, d_s = hist[-1]
    if g.order_at(s) == 1 or len(hist) == 1:
        d = d_s
    else:
        lam_p, d_p = hist[-2]
        r = (lam_s - lam_p) / h
        d = (1.0 + 0.5 / r) * d_s - (0.5 / r) * d_p
    return float(g.sigma[t] / g.sigma[s]) * x - float(g.alpha[t] * math.expm1(-h)) * d


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    grid: np.ndarray,
    generator: Generator | None = None,
    *,
    callback: Callback | None = None,
    order: int = 2,
) -> torch.Tensor:
    """DPM-Solver++(2M) through ``grid``; returns the last evaluation x̂_0 (deterministic given
    x_T: ``generator`` is unused). ``order=1`` is DDIM (η = 0) on the same grid."""
    return _multistep_2m(denoiser, x_T, grid, "dpm++2m", order, _dpm_step, callback)


def _multistep_2m(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    grid: np.ndarray,
    kind: str,
    order: int,
    step: Callable[[torch.Tensor, _Grid, int, History], torch.Tensor],
    callback: Callback | None,
) -> torch.Tensor:
    """The loop both DPM-Solver++(2M) forms share: ``step`` moves x from grid point s to s+1
    with the last two evaluations; the last evaluation, x̂_0, is returned."""
    g = _Grid.of(denoiser, grid, kind, order)
    x = x_T
    d, hist = _first_step(denoiser, x, g)
    for s in range(len(grid) - 1):
        x = step(x, g, s, hist)
        d = denoiser(x, g.t(s + 1, x))
        hist = (hist + [(float(g.lam[s + 1]), d)])[-2:]
        _report(callback, g, s, x, d)
    return d


# ---------------------------------------------------------------------------- UniPC


def _unipc_update(
    x: torch.Tensor, g: _Grid, s: int, hist: History, d_new: torch.Tensor | None
) -> torch.Tensor:
    """UniP (``d_new`` None) or UniC (``d_new`` = D at the predicted x_t) from x_s."""
    t = s + 1
    h = float(g.lam[t] - g.lam[s])
    lam_s, d_s = hist[-1]
    order = g.order_at(s)
    past = hist[-order:-1] if order > 1 else []
    rs = [(lam_k - lam_s) / h for lam_k, _ in reversed(past)]
    diffs = [(d_k - d_s) / r for r, (_, d_k) in zip(rs, reversed(past), strict=True)]
    if d_new is not None:
        rs.append(1.0)
        diffs.append(d_new - d_s)
    h_phi_1 = math.expm1(-h)
    x_t = float(g.sigma[t] / g.sigma[s]) * x - float(g.alpha[t] * h_phi_1) * d_s
    if not rs:
        return x_t
    b_h = h_phi_1  # B(h) of bh2
    integrals = _phi_integrals(h, len(rs))
    rhs = [-integrals[k] * math.factorial(k) / (h**k * b_h) for k in range(1, len(rs) + 1)]
    vander = np.array([[r**k for r in rs] for k in range(len(rs))], dtype=np.float64)
    coef = np.linalg.solve(vander, np.array(rhs))
    correction = sum(float(c) * dk for c, dk in zip(coef, diffs, strict=True))
    return x_t - float(g.alpha[t] * b_h) * correction


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    grid: np.ndarray,
    generator: Generator | None = None,
    *,
    callback: Callback | None = None,
    order: int = 2,
) -> torch.Tensor:
    """UniPC (UniP-``order`` predictor, UniC corrector) through ``grid``; returns the last
    evaluation x̂_0 (deterministic given x_T: ``generator`` is unused)."""
    g = _Grid.of(denoiser, grid, "unipc", order)
    last = len(grid) - 1
    x = x_T
    d, hist = _first_step(denoiser, x, g)
    for s in range(last):
        x_pred = _unipc_update(x, g, s, hist, None)
        d = denoiser(x_pred, g.t(s + 1, x))
        # the corrector needs no new evaluation; after the last step the sample is D(x_pred)
        # itself, so correcting x would cost one more evaluation
        x = x_pred if s + 1 == last else _unipc_update(x, g, s, hist, d)
        hist = (hist + [(float(g.lam[s + 1]), d)])[-3:]
        _report(callback, g, s, x, d)
    return d


# ---------------------------------------------------------------------------- SDE-DPM-Solver++(2M)


def _sde_step(
    x: torch.Tensor, g: _Grid, s: int, hist: History, noise: torch.Tensor
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) step s -> s+1 with the standard normal ``noise``.

    The reverse SDE in data-prediction form has the exact solution
        x_t = (σ_t/σ_s) e^{−h} x_s + 2 α_t ∫_0^h e^{−2(h−u)} D(λ_s + u) du + σ_t √(1 − e^{−2h}) z;
    with D linear in λ through the last two evaluations (D_s + u·D'), the integral is
    (1 − e^{−2h}) D_s + (h − (1 − e^{−2h})/2) D'. The first-order step (D' = 0) is DDIM with
    η = 1 on the same grid.
    """
    t = s + 1
    h = float(g.lam[t] - g.lam[s])
    lam_s, d_s = hist[-1]
    one_minus = -math.expm1(-2.0 * h)  # 1 − e^{−2h}
    x_t = float(g.sigma[t] / g.sigma[s] * math.exp(-h)) * x + float(g.alpha[t] * one_minus) * d_s
    if g.order_at(s) == 2 and len(hist) > 1:
        lam_p, d_p = hist[-2]
        slope = (d_s - d_p) / (lam_s - lam_p)
        x_t = x_t + float(g.alpha[t] * (h - 0.5 * one_minus)) * slope
    return x_t + float(g.sigma[t] * math.sqrt(one_minus)) * noise


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    grid: np.ndarray,
    generator: Generator | None = None,
    *,
    callback: Callback | None = None,
    order: int = 2,
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) through ``grid``: each step draws its noise from ``generator``;
    returns the last evaluation x̂_0. ``order=1`` is DDIM (η = 1) on the same grid."""

    def step(x: torch.Tensor, g: _Grid, s: int, hist: History) -> torch.Tensor:
        noise = randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
        return _sde_step(x, g, s, hist, noise)

    return _multistep_2m(denoiser, x_T, grid, "dpm++2m-sde", order, step, callback)
