"""Timestep samplers for training: which t each example is trained on.

With t ~ p(t) and weight w_t = 1 / (T p(t)), E_{t~p}[w_t L_t] = (1/T) Σ_t L_t = E_{t~U}[L_t]: the
weighted loss is an unbiased estimate of the uniform-t loss whatever p is.

LossSecondMomentResampler is Improved DDPM's importance sampling for L_vlb (§3.3, eq. 18):
p(t) ∝ √E[L_t²], estimated from the last 10 values of each term, sampling uniformly until every t
has 10 values, and mixed with a little uniform mass so no t is starved.

Distributed training: every worker must see the same history, so the training loop gathers
(ts, losses) from all workers and every worker calls ``update_with_all_losses`` with the same data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class ScheduleSampler:
    """Samples timesteps from ``weights()`` and returns importance weights that remove the bias."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = int(num_timesteps)

    def weights(self) -> np.ndarray:
        """Unnormalised, positive sampling weights, one per timestep."""
        raise NotImplementedError

    def sample(
        self,
        batch_size: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, weights): ``batch_size`` timesteps (long) and 1/(T p(t)) as float32, on ``device``.

        ``generator`` must be a CPU generator (sampling happens on the CPU, then moves).
        """
        w = self.weights()
        p = torch.as_tensor(w / w.sum(), dtype=torch.float64)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (len(p) * p[t])
        return _to_device(t, device), _to_device(weights.float(), device)

    def update_with_all_losses(
        self, ts: list[int] | torch.Tensor, losses: list[float] | torch.Tensor
    ) -> None:
        """Record per-example losses (ts, losses gathered from every worker). No-op by default."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy to ``device``; to a GPU from pinned memory, so the host does not wait for it."""
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class UniformSampler(ScheduleSampler):
    """t ~ U{0..T−1}, all weights 1 (Ho et al. 2020, Alg. 1)."""

    def weights(self) -> np.ndarray:
        return np.ones(self.num_timesteps, dtype=np.float64)


class LossSecondMomentResampler(ScheduleSampler):
    """p(t) ∝ √E[L_t²] over the last ``history_per_term`` losses, mixed with ``uniform_prob``."""

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros((num_timesteps, history_per_term), dtype=np.float64)
        self._loss_counts = np.zeros(num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        w /= w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update_with_all_losses(
        self, ts: list[int] | torch.Tensor, losses: list[float] | torch.Tensor
    ) -> None:
        ts_list = torch.as_tensor(ts).reshape(-1).tolist()
        loss_list = torch.as_tensor(losses, dtype=torch.float64).reshape(-1).tolist()
        for t, loss in zip(ts_list, loss_list, strict=True):
            if self._loss_counts[t] == self.history_per_term:
                # full: drop the oldest value
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def state_dict(self) -> dict[str, Any]:
        # tensors, so checkpoints load with torch.load(weights_only=True)
        return {
            "loss_history": torch.from_numpy(self._loss_history.copy()),
            "loss_counts": torch.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = torch.as_tensor(state["loss_history"], dtype=torch.float64).numpy()
        counts = torch.as_tensor(state["loss_counts"], dtype=torch.int64).numpy()
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(
                f"sampler state has shape {history.shape}, expected {self._loss_history.shape}"
            )
        self._loss_history = history.copy()
        self._loss_counts = counts.copy()


def create_named_schedule_sampler(name: str, num_timesteps: int) -> ScheduleSampler:
    """ "uniform" or "loss-second-moment" (the names used by DiffusionConfig.schedule_sampler)."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(num_timesteps)
    raise ValueError(f"unknown schedule sampler {name!r}; use 'uniform' or 'loss-second-moment'")
