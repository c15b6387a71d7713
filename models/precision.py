"""Mixed precision: autocast contexts and a dynamic loss scaler for fp16.

* "no":   float32 throughout.
* "bf16": torch.autocast with bfloat16 (CPU or GPU); bf16 has float32's exponent range, so no
          loss scaling is needed.
* "fp16": torch.autocast with float16, GPU only. Small gradients underflow in fp16, so the loss
          is multiplied by 2^k before backward and gradients divided by 2^k before the step. k
          drops by 1 whenever the loss or a gradient is inf/nan (that step is skipped: no
          optimiser step and no EMA update) and grows slowly otherwise (like the released code:
          +0.001 per good step from k = 20).

The training loop decides "finite or not" once per step on the device and reads that verdict
with its one host sync; :meth:`DynamicLossScaler.step` takes the verdict so that it adds none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Literal

import torch

PrecisionMode = Literal["no", "bf16", "fp16"]


def autocast(mode: str, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for ``mode`` on ``device`` (a no-op for "no")."""
    device_type = torch.device(device).type
    if mode == "no":
        return contextlib.nullcontext()
    if mode == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if mode == "fp16":
        if device_type != "cuda":
            raise ValueError("fp16 mixed precision needs a CUDA device; use 'bf16' on CPU")
        return torch.autocast(device_type=device_type, dtype=torch.float16)
    raise ValueError(f"unknown mixed_precision {mode!r}; use 'no', 'bf16' or 'fp16'")


def grads_are_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    finite = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return bool(torch.stack(finite).all()) if finite else True


class DynamicLossScaler:
    """Loss scale 2^log2_scale; ``enabled=False`` makes it a pass-through (modes "no", "bf16")."""

    def __init__(
        self, enabled: bool = True, initial_log2_scale: float = 20.0, growth_per_step: float = 1e-3
    ):
        self.enabled = enabled
        self.log2_scale = float(initial_log2_scale)
        self.growth_per_step = float(growth_per_step)
        self.skipped_steps = 0

    @property
    def scale(self) -> float:
        return 2.0**self.log2_scale if self.enabled else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if finite:
            self.log2_scale += self.growth_per_step
        else:
            self.log2_scale -= 1.0

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        grad_clip: float | None = None,
        finite: bool | None = None,
    ) -> bool:
        """Unscale, optionally clip, and step; skip the step (zeroing grads) on inf/nan.

        ``finite``: the caller's verdict on this step's loss and gradients (checked here, with
        a host sync, when None). Returns whether the optimiser stepped.
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if finite is None:
            finite = grads_are_finite(params)
        inv = 1.0 / self.scale  # the scale this step's loss was multiplied by
        self.update(finite)
        if not finite:
            self.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            return False
        if self.enabled:
            grads = [p.grad for p in params if p.grad is not None]
            torch._foreach_mul_(grads, inv)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "log2_scale": self.log2_scale,
            "growth_per_step": self.growth_per_step,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.enabled = bool(state["enabled"])
        self.log2_scale = float(state["log2_scale"])
        self.growth_per_step = float(state["growth_per_step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
