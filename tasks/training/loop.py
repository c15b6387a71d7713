"""The training loop run by every worker (a Ray Train worker, or one local process).

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
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from admflow import storage
from admflow.config import config_from_dict
from models.ema import EMA
from models.precision import DynamicLossScaler, autocast
from models.resample import LossSecondMomentResampler
from tasks.training import checkpoint as ckpt
from tasks.training.jobs import Job, make_job
from tasks.training.progress import write_progress
from tasks.training.stream import ShardStream, augment, batch_positions, to_model_input

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
    fail_at_step: int | None = None  # fault injection for tests: rank 1 raises once here


# ----------------------------------------------------------------------------- sessions


class LocalSession:
    """One process, no Ray: for unit tests and the benchmark."""

    rank = 0
    world_size = 1

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.reports: list[dict[str, Any]] = []

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    @contextlib.contextmanager
    def restored(self) -> Iterator[str | None]:
        yield None

    def report(self, metrics: dict[str, Any], pending: ckpt.Pending | None, step: int) -> None:
        if pending is not None:  # written once, in place
            pending.write(pending.uri)
            pending.durable()
        self.reports.append(dict(metrics))


class RaySession:
    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    @contextlib.contextmanager
    def restored(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d

    def report(self, metrics: dict[str, Any], pending: ckpt.Pending | None, step: int) -> None:
        """Report; with a checkpoint, write it once: in place when the run directory is a
        local (or shared) path, Ray only recording it; else to local disk, from where Ray
        uploads it in the background (meta.json last) and then deletes the local copy."""
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        if pending is None:
            ray.train.report(metrics)
            return
        run = ray.train.get_context().get_storage()  # Ray's run directory is our run_uri
        name = f"checkpoints/{ckpt.step_dirname(step)}"

        def recorded() -> Checkpoint:
            return Checkpoint(f"{run.experiment_fs_path}/{name}", run.storage_filesystem)

        if not storage.is_remote(pending.uri):
            pending.write(pending.uri)
            pending.durable()
            ray.train.report(
                metrics,
                checkpoint=recorded(),
                checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
            )
            return

        def upload(local: Checkpoint, _name: str) -> Checkpoint:
            ckpt.copy_checkpoint(local.path, pending.uri)
            pending.durable()
            return recorded()

        local = tempfile.mkdtemp(prefix="admflow-ckpt-")
        pending.write(local)
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(local),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
            checkpoint_upload_fn=upload,
        )


# ----------------------------------------------------------------------------- helpers


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A 63-bit seed that is a pure function of its inputs."""
    return (
        int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(2, np.uint64)[0]) >> 1
    )


def reseed_globals(seed: int) -> None:
    """Dropout and anything else drawing from global generators follows the step."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    import random

    random.seed(seed)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps the network
    assert isinstance(inner, torch.nn.Module)
    return inner


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def quartile(t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    return (t * 4 // num_timesteps).clamp(max=3)


def resolve_precision(mode: str, device: torch.device) -> str:
    if mode == "fp16" and device.type != "cuda":
        log.warning("fp16 mixed precision needs CUDA; using bf16 autocast on %s", device.type)
        return "bf16"
    return mode


# ----------------------------------------------------------------------------- metrics


class Meter:
    """Sums of per-example terms, overall and per quartile of t, summed over workers."""

    def __init__(self, terms: tuple[str, ...], num_timesteps: int):
        self.terms = terms
        self.num_timesteps = num_timesteps
        self.width = len(terms) * 5 + 5  # per term: total + 4 quartiles; counts: total + 4

    def vector(self, values: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        q = quartile(t, self.num_timesteps)
        out = torch.zeros(self.width, dtype=torch.float64)
        for i, name in enumerate(self.terms):
            v = values[name].detach().double().cpu()
            out[i * 5] = v.sum()
            out[i * 5 + 1 : i * 5 + 5] = torch.zeros(4, dtype=torch.float64).index_add_(0, q, v)
        base = len(self.terms) * 5
        out[base] = len(t)
        out[base + 1 : base + 5] = torch.bincount(q, minlength=4).double()
        return out

    def summarise(self, total: torch.Tensor, prefix: str = "") -> dict[str, float]:
        base = len(self.terms) * 5
        out: dict[str, float] = {}
        for i, name in enumerate(self.terms):
            if total[base] > 0:
                out[f"{prefix}{name}"] = float(total[i * 5] / total[base])
            for q in range(4):
                n = total[base + 1 + q]
                if n > 0:
                    out[f"{prefix}{name}_q{q}"] = float(total[i * 5 + 1 + q] / n)
        return out


# ----------------------------------------------------------------------------- the loop


class Trainer:
    def __init__(self, spec: LoopSpec, session: Any):
        self.spec = spec
        self.session = session
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
        self.tracker = _Tracker(spec) if session.rank == 0 and spec.mlflow_run_id else None

        torch.manual_seed(self.seed)  # identical initial weights on every worker
        module = self.job.build_model()
        self.ema = EMA(module, self.job.ema_rates)
        self.sampler = self.job.schedule_sampler()
        self.scaler = DynamicLossScaler(enabled=self.precision == "fp16")
        self.step = 0
        state = None
        with session.restored() as directory:
            source = directory or ckpt.latest_checkpoint(spec.run_uri)
            if source:
                state = self._load(module, source)
        if self.cfg.training.channels_last:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = session.prepare(module)
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
            if self.tracker:
                self.tracker.checkpoint(step, stable)
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
        for group in self.opt.param_groups:
            group["lr"] = self.job.lr_at(step)
        self.opt.zero_grad(set_to_none=True)
        collected: dict[str, list[torch.Tensor]] = {k: [] for k in self.job.terms}
        chunks = list(range(0, len(x), self.microbatch))
        for i, lo in enumerate(chunks):
            hi = lo + self.microbatch
            last = i == len(chunks) - 1
            sync = (
                contextlib.nullcontext()
                if last or not hasattr(self.model, "no_sync")
                else self.model.no_sync()
            )
            with sync:
                with autocast(self.precision, self.device):
                    terms = self.job.losses(self.model, x[lo:hi], y[lo:hi], t[lo:hi], gen)
                terms = {k: v.float() for k, v in terms.items()}
                loss = (terms["loss"] * weights[lo:hi]).sum() / len(x)
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
        """Classifier top-1/top-5 on the held-out rows, per quartile of t (fixed t per row)."""
        if self.job.kind != "classifier":
            return {}
        holdout = ShardStream(
            self.spec.data_uri, self.seed, holdout_every=self.job.holdout_every, split="holdout"
        )
        rows = holdout.holdout_rows()[self.session.rank :: self.session.world_size]
        meter = Meter(("loss", "top1", "top5"), self.job.num_timesteps)
        total = torch.zeros(meter.width, dtype=torch.float64)
        self.module.eval()
        gen = torch.Generator().manual_seed(step_seed(self.seed, 0, self.session.rank, 4))
        for lo in range(0, len(rows), 64):
            images, labels = holdout.read_rows(rows[lo : lo + 64])
            x = torch.from_numpy(to_model_input(images)).to(self.device)
            y = torch.from_numpy(labels).to(self.device)
            t, _ = self.sampler.sample(len(x), self.device, generator=gen)
            with autocast(self.precision, self.device):
                terms = self.job.losses(self.module, x, y, t, gen)
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
            self._maybe_fail()
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
                if save:
                    metrics.update(self.evaluate_holdout())
                if self.tracker:
                    self.tracker.metrics(metrics, self.step)
                self._progress(metrics)
                if save:
                    self.checkpoint_and_report({**metrics, "done": done})
                else:
                    self.session.report(metrics, None, self.step)
        if self.start_step >= self.job.steps:  # nothing left: report so the run has a result
            self.session.report(
                {"step": self.step, "done": True, "resumed_finished": True}, None, self.step
            )
        return metrics

    def _progress(self, metrics: dict[str, Any]) -> None:
        """Rank 0 leaves a progress record for the driver's terminal (tasks.training.progress)."""
        if self.session.rank != 0:
            return
        rate = metrics.get("images_per_s") or 0.0
        left = (self.job.steps - self.step) * self.global_batch / rate if rate else None
        record = {
            "kind": self.job.kind,
            "step": self.step,
            "steps": self.job.steps,
            "loss": metrics.get("loss"),
            "images_per_s": rate,
            "eta_s": left,
            "time": time.time(),
        }
        write_progress(self.spec.run_uri, record)

    def _stop_nonfinite(self) -> dict[str, Any]:
        msg = (
            f"non-finite loss at step {self.step} of the {self.job.kind} run {self.spec.run_name}; "
            f"the last good checkpoint is kept under {ckpt.checkpoints_uri(self.spec.run_uri)}"
        )
        log.error(msg)
        metrics = {"step": self.step, "error": msg, "done": False}
        if self.tracker:
            self.tracker.error(msg)
        self.session.report(metrics, None, self.step)
        return metrics

    def _maybe_fail(self) -> None:
        at = self.spec.fail_at_step
        if (
            at is None
            or self.step != at
            or self.session.rank != min(1, self.session.world_size - 1)
        ):
            return
        marker = storage.join(self.spec.run_uri, f"_fault-injected-{at}")
        if storage.exists(marker):
            return
        storage.write_bytes(marker, b"")
        raise RuntimeError(f"injected fault at step {at} (LoopSpec.fail_at_step)")


class _Tracker:
    """MLflow logging from rank 0, by run id, tolerant of a tracking-server hiccup."""

    def __init__(self, spec: LoopSpec):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=spec.tracking_uri)
        self.run_id = spec.mlflow_run_id

    def _safe(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # keep training; the checkpoint is the source of truth
            log.warning("MLflow logging failed: %s", e)

    def metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        self._safe(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def checkpoint(self, step: int, uri: str) -> None:
        self._safe(self.client.set_tag, self.run_id, f"checkpoint.{ckpt.step_dirname(step)}", uri)
        self._safe(self.client.set_tag, self.run_id, "checkpoint.latest", uri)

    def error(self, msg: str) -> None:
        self._safe(self.client.set_tag, self.run_id, "admflow.error", msg[:5000])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config = {"spec": asdict(LoopSpec)}``."""
    torch.set_num_threads(int(config.get("torch_threads", 1)))
    os.environ.setdefault("OMP_NUM_THREADS", str(config.get("torch_threads", 1)))
    Trainer(LoopSpec(**config["spec"]), RaySession()).run()
