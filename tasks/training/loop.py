"""The training loop run by every worker (a Ray Train worker, or one local process).

Three phases: set-up (restored from the newest checkpoint), steps, and checkpoints. What
differs between jobs comes in as data (:class:`tasks.training.jobs.Job`); where the loop runs
is a session (:mod:`tasks.training.sessions`); tracking and progress are callbacks.

Exact resumption: everything random in step ``s`` on worker ``r`` (the batch, flips and
crops, timesteps, noise, dropout) is drawn from generators seeded by ``(seed, s, r)``, and a
checkpoint holds every piece of state that carries over between steps (parameters, EMAs,
AdamW moments, loss scale, schedule-sampler history). A run restored at step ``s`` therefore
computes bit-for-bit what the uninterrupted run computed on CPU.

Per step every worker all-reduces one small vector of loss sums (exact global metrics, and a
shared verdict on non-finite losses and gradients) and, for the importance sampler,
all-gathers (t, loss) so every worker's sampler history stays identical. Collectives get
tensors on the training device (NCCL has no CPU tensors); the host reads the device once per
step, for the verdict (and the gathered history); metrics stay there until a log step.

A non-finite loss or gradient skips the step (no optimiser step, no EMA update). With fp16
loss scaling that is routine, as in guided-diffusion: the loss scale halves and training goes
on with the next step, unless ``max_skipped_in_a_row`` steps in a row were skipped. Without
loss scaling a non-finite loss means the run diverged: it stops, naming the step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from admflow import storage
from admflow.config import config_from_dict
from models.ema import EMA
from models.precision import DynamicLossScaler, autocast
from models.resample import LossSecondMomentResampler
from models.training_losses import Batch
from tasks.training import checkpoint as ckpt
from tasks.training.callbacks import Callback
from tasks.training.distributed import (
    all_gather_cat,
    all_reduce_sum,
    reseed_globals,
    step_seed,
    unwrap,
)
from tasks.training.holdout import evaluate_holdout
from tasks.training.jobs import Job, make_job
from tasks.training.meter import Meter, step_sums
from tasks.training.prefetch import Prefetcher
from tasks.training.stream import ShardStream, augment, batch_positions, to_model_input

__all__ = ["LoopSpec", "NonFiniteLossError", "Trainer", "step_seed"]

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became inf/nan; the message names the step."""


@dataclass
class StepOutcome:
    """What one step did: its all-reduced metric sums (on the device) and the verdict."""

    sums: torch.Tensor
    finite_loss: bool
    stepped: bool


@dataclass
class LoopSpec:
    """Everything a worker needs, as plain data (it crosses into Ray workers)."""

    kind: str
    config: dict
    data_uri: str
    run_uri: str
    run_name: str
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None


def resolve_precision(mode: str, device: torch.device) -> str:
    if mode == "fp16" and device.type != "cuda":
        log.warning("fp16 mixed precision needs CUDA; using bf16 autocast on %s", device.type)
        return "bf16"
    return mode


class Trainer:
    # by then a loss scale that started at 2^20 is back to 1: the overflow is not the scale's
    max_skipped_in_a_row = 20

    def __init__(self, spec: LoopSpec, session: Any, callbacks: Sequence[Callback] = ()):
        self.spec = spec
        self.session = session
        self.callbacks = list(callbacks)
        self.cfg = config_from_dict(spec.config, source="train_loop_config")
        self.job: Job = make_job(spec.kind, self.cfg)
        self.seed = self.cfg.training.seed
        self.global_batch = self.job.batch_size
        self.local_batch = len(
            batch_positions(0, self.global_batch, session.rank, session.world_size)
        )
        micro = self.job.microbatch
        self.microbatch = micro if 0 < micro < self.local_batch else self.local_batch
        self.device = session.device
        self.precision = resolve_precision(self.cfg.training.mixed_precision, self.device)
        self.stream = ShardStream(
            spec.data_uri, self.seed, holdout_every=self.job.holdout_every, split="train"
        )
        self.meter = Meter(self.job.terms, self.job.num_timesteps)
        self.batches: Prefetcher[tuple[torch.Tensor, torch.Tensor]] = Prefetcher(self._host_batch)
        self.skipped_in_a_row = 0
        self._last_grad_norm: tuple[torch.Tensor, float] = (torch.zeros(()), 1.0)
        self._set_up()

    # ------------------------------------------------------------------ set-up

    def _set_up(self) -> None:
        """Network, EMA, sampler, scaler and optimiser, continued from the newest checkpoint."""
        torch.manual_seed(self.seed)  # identical initial weights on every worker
        module = self.job.build_model()
        self.sampler = self.job.schedule_sampler()
        self.scaler = DynamicLossScaler(enabled=self.precision == "fp16")
        self.step = 0
        state: dict[str, Any] | None = None
        emas: dict[float, dict[str, torch.Tensor]] = {}
        with self.session.restored() as directory:
            source = directory or ckpt.latest_checkpoint(self.spec.run_uri)
            if source:
                state, emas = self._load(module, source)
        if self.cfg.training.channels_last:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = self.session.prepare(module)
        self.module = unwrap(self.model)
        # built from the prepared network, so the averages live (and update) on its device
        self.ema = EMA(self.module, self.job.ema_rates)
        for rate, sd in emas.items():
            self.ema.load_model_state_dict(rate, sd)
        self.opt = torch.optim.AdamW(
            self.module.parameters(), lr=self.job.lr, weight_decay=self.job.weight_decay
        )
        if state is not None:
            self.opt.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.sampler.load_state_dict(state["sampler"])
            ckpt.set_rng_state(state["rng"])
        self.start_step = self.step

    # ------------------------------------------------------------------ checkpoints

    def _load(
        self, module: torch.nn.Module, uri: str
    ) -> tuple[dict[str, Any], dict[float, dict[str, torch.Tensor]]]:
        """Restore ``module``; returns the loop state and the EMA state dicts by rate."""
        meta = ckpt.read_meta(uri)
        if meta.get("kind") != self.job.kind:
            raise ValueError(
                f"checkpoint {uri} is a {meta.get('kind')} checkpoint, not {self.job.kind}"
            )
        module.load_state_dict(ckpt.load_tensors(storage.join(uri, ckpt.MODEL)))
        emas = {
            rate: ckpt.load_tensors(storage.join(uri, ckpt.ema_filename(rate)))
            for rate in self.job.ema_rates
        }
        state = ckpt.load_tensors(storage.join(uri, ckpt.STATE))
        self.step = int(state["step"])
        log.info(
            "rank %d resumed %s from %s at step %d",
            self.session.rank,
            self.job.kind,
            uri,
            self.step,
        )
        return state, emas

    def _write(self, directory: str) -> None:
        module = self.module
        ckpt.write_checkpoint(
            directory,
            model={k: v.detach().cpu() for k, v in module.state_dict().items()},
            emas={
                r: {k: v.cpu() for k, v in self.ema.model_state_dict(module, r).items()}
                for r in self.job.ema_rates
            },
            state={
                "step": self.step,
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "rng": ckpt.rng_state(),
                "data": {"seed": self.seed, "position": self.step * self.global_batch},
            },
            meta={
                "step": self.step,
                "kind": self.job.kind,
                "config": self.spec.config,
                "ema_rates": self.job.ema_rates,
                "run_name": self.spec.run_name,
                "data_uri": self.spec.data_uri,
                "world_size": self.session.world_size,
            },
        )

    def checkpoint_and_report(self, metrics: dict[str, Any]) -> None:
        if self.session.rank != 0:
            self.session.report(metrics, None, self.step)
            return
        step = self.step
        stable = storage.join(ckpt.checkpoints_uri(self.spec.run_uri), ckpt.step_dirname(step))

        def durable() -> None:  # may run on Ray's upload thread while training goes on
            for callback in self.callbacks:
                callback.on_checkpoint(step, stable)
            ckpt.prune_checkpoints(self.spec.run_uri, self.cfg.training.keep_checkpoints)

        pending = ckpt.Pending(stable, self._write, durable)
        self.session.report({**metrics, "checkpoint": stable}, pending, step)

    # ------------------------------------------------------------------ one step

    def _host_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s images and labels as CPU tensors, pinned when bound for a GPU so
        the copy does not wait for it (runs on the prefetch thread)."""
        positions = batch_positions(
            step, self.global_batch, self.session.rank, self.session.world_size
        )
        images, labels = self.stream.read(positions)
        rng = np.random.default_rng(step_seed(self.seed, step, self.session.rank, 1))
        job = self.job
        x = augment(to_model_input(images), rng, flip=job.flip, random_crop=job.random_crop,
                    crop=job.crop, crop_stride=job.crop_stride)  # fmt: skip
        xt, yt = torch.from_numpy(x), torch.from_numpy(labels)
        if self.device.type == "cuda":
            xt, yt = xt.pin_memory(), yt.pin_memory()
        return xt, yt

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches.get(step)
        x = x.to(self.device, non_blocking=True)
        if self.cfg.training.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def train_step(self) -> StepOutcome:
        """One optimiser step, or a skipped one; the host reads the device once, for the verdict."""
        step, rank = self.step, self.session.rank
        reseed_globals(step_seed(self.seed, step, rank, 2))
        gen = torch.Generator().manual_seed(step_seed(self.seed, step, rank, 3))
        x, y = self._batch(step)
        t, weights = self.sampler.sample(len(x), self.device, generator=gen)
        for group in self.opt.param_groups:
            group["lr"] = self.job.lr_at(step)
        self.opt.zero_grad(set_to_none=True)
        values = self._forward_backward(Batch(x, y, t), weights, gen)
        norm = self._grad_norm()
        self._last_grad_norm = (norm, self.scaler.scale)
        sums = all_reduce_sum(step_sums(self.meter, values, t, norm))
        read = [sums[-2:]]
        if isinstance(self.sampler, LossSecondMomentResampler):
            pairs = torch.stack([t.double(), values["loss"].detach().double()], dim=1)
            read.append(all_gather_cat(pairs).flatten())
        host = torch.cat(read).tolist()  # the step's one host sync
        finite_loss = host[0] == 0
        if not finite_loss and not self.scaler.enabled:
            return StepOutcome(sums[:-2], False, False)  # diverged: the caller stops the run
        if finite_loss and len(read) > 1:
            self.sampler.update_with_all_losses([int(v) for v in host[2::2]], host[3::2])
        stepped = self.scaler.step(
            self.opt, self.cfg.training.grad_clip, finite=finite_loss and host[1] == 0
        )
        if stepped:  # a skipped step leaves the averages alone, as in guided-diffusion
            self.ema.update(self.module)
        self.skipped_in_a_row = 0 if stepped else self.skipped_in_a_row + 1
        self.step += 1
        return StepOutcome(sums[:-2], finite_loss, stepped)

    def _forward_backward(
        self, batch: Batch, weights: torch.Tensor, gen: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Gradients of the weighted loss, micro-batch by micro-batch (DDP all-reduces them
        with the last one); returns the per-example terms."""
        collected: dict[str, list[torch.Tensor]] = {k: [] for k in self.job.terms}
        chunks = list(range(0, len(batch), self.microbatch))
        for i, lo in enumerate(chunks):
            rows = slice(lo, lo + self.microbatch)
            last = i == len(chunks) - 1
            sync = (
                contextlib.nullcontext()
                if last or not hasattr(self.model, "no_sync")
                else self.model.no_sync()
            )
            with sync:
                with autocast(self.precision, self.device):
                    terms = self.job.loss(self.model, batch[rows], gen)
                terms = {k: v.float() for k, v in terms.items()}
                loss = (terms["loss"] * weights[rows]).sum() / len(batch)
                self.scaler.scale_loss(loss).backward()
            for k in self.job.terms:
                collected[k].append(terms[k].detach())
        return {k: torch.cat(v) for k, v in collected.items()}

    def _grad_norm(self) -> torch.Tensor:
        """‖∇θ‖ (times the loss scale) on the device; inf/nan exactly when a gradient is, so
        it doubles as the overflow check (as guided-diffusion's check_overflow)."""
        grads = [p.grad.detach() for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.stack(torch._foreach_norm(grads)).norm()

    # ------------------------------------------------------------------ driver

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            self.batches.close()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg.training
        window = torch.zeros(self.meter.width, dtype=torch.float64, device=self.device)
        # images/s counts time inside optimiser steps (DDP communication included); logging,
        # reporting and checkpoint writes are excluded so the figure compares across setups.
        step_time, step0 = 0.0, self.step
        metrics: dict[str, Any] = {}
        while self.step < self.job.steps:
            for callback in self.callbacks:
                callback.on_step_start(self)
            t0 = time.perf_counter()
            outcome = self.train_step()
            step_time += time.perf_counter() - t0
            if not outcome.finite_loss and not self.scaler.enabled:
                return self._stop(f"non-finite loss at step {self.step}")
            if self.skipped_in_a_row >= self.max_skipped_in_a_row:
                return self._stop(
                    f"{self.skipped_in_a_row} steps in a row skipped for non-finite losses or "
                    f"gradients (the last at step {self.step - 1}, loss scale "
                    f"2^{self.scaler.log2_scale:g})"
                )
            if outcome.finite_loss:  # a skipped inf/nan loss would poison the window's means
                window += outcome.sums
            done = self.step == self.job.steps
            save = self.step % cfg.checkpoint_every == 0 or self.step in cfg.checkpoint_steps
            save = save or done
            if self.step % cfg.log_every == 0 or save:
                elapsed = max(step_time, 1e-9)
                norm, scale = self._last_grad_norm
                metrics = {
                    **self.meter.summarise(window),
                    "lr": self.job.lr_at(self.step - 1),
                    "grad_norm": float(norm) / scale,
                    "images_per_s": (self.step - step0) * self.global_batch / elapsed,
                    "step": self.step,
                }
                if self.scaler.enabled:
                    metrics["lg_loss_scale"] = self.scaler.log2_scale
                window.zero_()
                step_time, step0 = 0.0, self.step
                self._log(metrics, save, done)
        if self.start_step >= self.job.steps:  # nothing left: report so the run has a result
            self.session.report(
                {"step": self.step, "done": True, "resumed_finished": True}, None, self.step
            )
        return metrics

    def _log(self, metrics: dict[str, Any], save: bool, done: bool) -> None:
        """Hand a log step's metrics to the callbacks and the session (with a checkpoint when
        ``save``, after scoring the held-out split into them)."""
        if save:
            metrics.update(evaluate_holdout(self))
        for callback in self.callbacks:
            callback.on_log(self, metrics)
        if save:
            self.checkpoint_and_report({**metrics, "done": done})
        else:
            self.session.report(metrics, None, self.step)

    def _stop(self, what: str) -> dict[str, Any]:
        """End the run on a non-finite loss, with an error naming ``what`` happened where."""
        msg = (
            f"{what} of the {self.job.kind} run {self.spec.run_name}; "
            f"the last good checkpoint is kept under {ckpt.checkpoints_uri(self.spec.run_uri)}"
        )
        log.error(msg)
        metrics = {"step": self.step, "error": msg, "done": False}
        for callback in self.callbacks:
            callback.on_error(self, msg)
        self.session.report(metrics, None, self.step)
        return metrics
