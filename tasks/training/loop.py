"""The training loop run by every worker (a Ray Train worker, or one local process).

Three phases: set-up (network, EMA, optimiser, restored from the newest checkpoint), steps,
and checkpoints. What differs between jobs comes in as data (:class:`tasks.training.jobs.Job`:
network, loss object, sampler, optimiser settings); where the loop runs is a session
(:mod:`tasks.training.sessions`); tracking and progress are callbacks
(:mod:`tasks.training.callbacks`).

Exact resumption: everything random in step ``s`` on worker ``r`` (the batch, flips and
crops, timesteps, noise, dropout) is drawn from generators seeded by ``(seed, s, r)``, and a
checkpoint holds every piece of state that carries over between steps (parameters, EMAs,
AdamW moments, loss scale, schedule-sampler history). A run restored at step ``s`` therefore
computes bit-for-bit what the uninterrupted run computed on CPU.

Per step every worker all-reduces one small vector of loss sums (exact global metrics, and a
shared verdict on non-finite losses) and, for the importance sampler, all-gathers (t, loss)
so every worker's sampler history stays identical.
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
from tasks.training.jobs import Job, make_job
from tasks.training.meter import Meter
from tasks.training.stream import ShardStream, augment, batch_positions, to_model_input

__all__ = ["LoopSpec", "NonFiniteLossError", "Trainer", "step_seed"]

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became inf/nan; the message names the step."""


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
    def __init__(self, spec: LoopSpec, session: Any, callbacks: Sequence[Callback] = ()):
        self.spec = spec
        self.session = session
        self.callbacks = list(callbacks)
        self.cfg = config_from_dict(spec.config, source="train_loop_config")
        self.job: Job = make_job(spec.kind, self.cfg)
        self.seed = self.cfg.training.seed
        self.global_batch = self.cfg.training.batch_size
        self.local_batch = len(
            batch_positions(0, self.global_batch, session.rank, session.world_size)
        )
        micro = self.cfg.training.microbatch
        self.microbatch = micro if 0 < micro < self.local_batch else self.local_batch
        self.device = session.device
        self.precision = resolve_precision(self.cfg.training.mixed_precision, self.device)
        self.stream = ShardStream(
            spec.data_uri, self.seed, holdout_every=self.job.holdout_every, split="train"
        )
        self.meter = Meter(self.job.terms, self.job.num_timesteps)
        self._set_up()

    # ------------------------------------------------------------------ set-up

    def _set_up(self) -> None:
        """Network, EMA, sampler, scaler and optimiser, continued from the newest checkpoint."""
        torch.manual_seed(self.seed)  # identical initial weights on every worker
        module = self.job.build_model()
        self.ema = EMA(module, self.job.ema_rates)
        self.sampler = self.job.schedule_sampler()
        self.scaler = DynamicLossScaler(enabled=self.precision == "fp16")
        self.step = 0
        state = None
        with self.session.restored() as directory:
            source = directory or ckpt.latest_checkpoint(self.spec.run_uri)
            if source:
                state = self._load(module, source)
        if self.cfg.training.channels_last:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = self.session.prepare(module)
        self.module = unwrap(self.model)
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

    def _load(self, module: torch.nn.Module, uri: str) -> dict[str, Any]:
        meta = ckpt.read_meta(uri)
        if meta.get("kind") != self.job.kind:
            raise ValueError(
                f"checkpoint {uri} is a {meta.get('kind')} checkpoint, not {self.job.kind}"
            )
        module.load_state_dict(ckpt.load_tensors(storage.join(uri, ckpt.MODEL)))
        for rate in self.job.ema_rates:
            sd = ckpt.load_tensors(storage.join(uri, ckpt.ema_filename(rate)))
            self.ema.load_model_state_dict(rate, sd)
        state = ckpt.load_tensors(storage.join(uri, ckpt.STATE))
        self.step = int(state["step"])
        log.info(
            "rank %d resumed %s from %s at step %d",
            self.session.rank,
            self.job.kind,
            uri,
            self.step,
        )
        return state

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

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = batch_positions(
            step, self.global_batch, self.session.rank, self.session.world_size
        )
        images, labels = self.stream.read(positions)
        rng = np.random.default_rng(step_seed(self.seed, step, self.session.rank, 1))
        x = augment(
            to_model_input(images), rng, flip=self.job.flip, random_crop=self.job.random_crop
        )
        xt = torch.from_numpy(x).to(self.device)
        if self.cfg.training.channels_last:
            xt = xt.contiguous(memory_format=torch.channels_last)
        return xt, torch.from_numpy(labels).to(self.device)

    def train_step(self) -> torch.Tensor:
        """One optimiser step; returns the all-reduced metric vector (last entry: non-finite count)."""
        step, rank = self.step, self.session.rank
        reseed_globals(step_seed(self.seed, step, rank, 2))
        gen = torch.Generator().manual_seed(step_seed(self.seed, step, rank, 3))
        x, y = self._batch(step)
        t, weights = self.sampler.sample(len(x), self.device, generator=gen)
        batch = Batch(x, y, t)
        for group in self.opt.param_groups:
            group["lr"] = self.job.lr_at(step)
        self.opt.zero_grad(set_to_none=True)
        collected: dict[str, list[torch.Tensor]] = {k: [] for k in self.job.terms}
        chunks = list(range(0, len(x), self.microbatch))
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
                loss = (terms["loss"] * weights[rows]).sum() / len(x)
                self.scaler.scale_loss(loss).backward()
            for k in self.job.terms:
                collected[k].append(terms[k].detach())
        values = {k: torch.cat(v) for k, v in collected.items()}
        nonfinite = torch.tensor(
            [float((~torch.isfinite(values["loss"])).sum())], dtype=torch.float64
        )
        vec = all_reduce_sum(torch.cat([self.meter.vector(values, t.cpu()), nonfinite]))
        if vec[-1] > 0:
            return vec  # caller stops before the optimiser touches the parameters
        if isinstance(self.sampler, LossSecondMomentResampler):
            self.sampler.update_with_all_losses(
                all_gather_cat(t.detach()).cpu(), all_gather_cat(values["loss"].double()).cpu()
            )
        self.last_grad_norm = self._grad_norm()
        self.scaler.step(self.opt, self.cfg.training.grad_clip)
        self.ema.update(self.module)
        self.step += 1
        return vec

    def _grad_norm(self) -> float:
        norms = [
            p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None
        ]
        return float(torch.stack(norms).norm()) / self.scaler.scale if norms else 0.0

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate_holdout(self) -> dict[str, float]:
        """The job's terms on its held-out rows (the classifier's top-1/top-5), per quartile
        of t; nothing for a job without a held-out split."""
        if not self.job.holdout_every:
            return {}
        holdout = ShardStream(
            self.spec.data_uri, self.seed, holdout_every=self.job.holdout_every, split="holdout"
        )
        rows = holdout.holdout_rows()[self.session.rank :: self.session.world_size]
        meter = Meter(self.job.terms, self.job.num_timesteps)
        total = torch.zeros(meter.width, dtype=torch.float64)
        self.module.eval()
        gen = torch.Generator().manual_seed(step_seed(self.seed, 0, self.session.rank, 4))
        for lo in range(0, len(rows), 64):
            images, labels = holdout.read_rows(rows[lo : lo + 64])
            x = torch.from_numpy(to_model_input(images)).to(self.device)
            y = torch.from_numpy(labels).to(self.device)
            t, _ = self.sampler.sample(len(x), self.device, generator=gen)
            with autocast(self.precision, self.device):
                terms = self.job.loss(self.module, Batch(x, y, t), gen)
            total += meter.vector(terms, t.cpu())
        self.module.train()
        return meter.summarise(all_reduce_sum(total), prefix="holdout_")

    # ------------------------------------------------------------------ driver

    def run(self) -> dict[str, Any]:
        cfg = self.cfg.training
        window = torch.zeros(self.meter.width + 1, dtype=torch.float64)
        # images/s counts time inside optimiser steps (DDP communication included); logging,
        # reporting and checkpoint writes are excluded so the figure compares across setups.
        step_time, step0 = 0.0, self.step
        metrics: dict[str, Any] = {}
        while self.step < self.job.steps:
            for callback in self.callbacks:
                callback.on_step_start(self)
            t0 = time.perf_counter()
            vec = self.train_step()
            step_time += time.perf_counter() - t0
            if vec[-1] > 0:
                return self._stop_nonfinite()
            window += vec
            done = self.step == self.job.steps
            save = self.step % cfg.checkpoint_every == 0 or self.step in cfg.checkpoint_steps
            save = save or done
            if self.step % cfg.log_every == 0 or save:
                elapsed = max(step_time, 1e-9)
                metrics = {
                    **self.meter.summarise(window[:-1]),
                    "lr": self.job.lr_at(self.step - 1),
                    "grad_norm": self.last_grad_norm,
                    "images_per_s": (self.step - step0) * self.global_batch / elapsed,
                    "step": self.step,
                }
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
            metrics.update(self.evaluate_holdout())
        for callback in self.callbacks:
            callback.on_log(self, metrics)
        if save:
            self.checkpoint_and_report({**metrics, "done": done})
        else:
            self.session.report(metrics, None, self.step)

    def _stop_nonfinite(self) -> dict[str, Any]:
        msg = (
            f"non-finite loss at step {self.step} of the {self.job.kind} run {self.spec.run_name}; "
            f"the last good checkpoint is kept under {ckpt.checkpoints_uri(self.spec.run_uri)}"
        )
        log.error(msg)
        metrics = {"step": self.step, "error": msg, "done": False}
        for callback in self.callbacks:
            callback.on_error(self, msg)
        self.session.report(metrics, None, self.step)
        return metrics
