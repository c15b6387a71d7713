"""The one place that decides what each stage asks Ray for.

:func:`resource_plan` turns the config and the cluster (:class:`Cluster`, from
``ray.nodes()`` or from what a local Ray will be started with) into a :class:`ResourcePlan`:
for every stage the Ray Train workers or actors, the CPUs and GPUs of each (a fraction where
several share one GPU) and the batch each one takes. The stages take their requests from it
(:meth:`StagePlacement.ray_options`); none asks Ray for resources on its own.
:meth:`ResourcePlan.check` turns a plan Ray could never place into a one-line error naming
the field to change, so nothing waits forever for resources that do not exist.

Ray's GPUs are logical: a node started with ``num_gpus=N`` offers N, CUDA or not, so
``compute.local_gpus`` with ``compute.device: cpu`` places stages as on GPUs, torch on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from admflow.config import AdmConfig
from tasks.runtime.cluster import (
    Cluster,
    Node,
    PlacementError,
    cluster_for,
    cuda_devices,
    local_object_store_bytes,
    probe_address,
)

STAGES = ("shard", "train-diffusion", "train-classifier", "train-upsampler", "reference",
          "judge", "sample", "upsample", "score")  # fmt: skip


__all__ = [
    "STAGES", "Cluster", "Node", "PlacementError", "ResourcePlan", "StagePlacement",
    "actors", "capacity", "checked_plan", "cluster_for", "cuda_devices",
    "local_object_store_bytes", "probe_address", "reference_actors", "resource_plan",
    "shard_tasks",
]  # fmt: skip


@dataclass(frozen=True)
class StagePlacement:
    """One stage: ``workers`` Ray Train workers or actors (0: in the driver's process), each
    with ``cpus`` CPUs and ``gpus`` GPUs, taking batches of ``batch`` images."""

    stage: str
    workers: int
    cpus: float
    gpus: float
    batch: int
    kind: str  # "train" (Ray Train workers), "actors", "tasks" (queued) or "driver"
    field: str  # the config field that sets ``workers``
    device: str = "auto"  # compute.device: where torch runs inside each worker

    @property
    def backend(self) -> str:
        """The process group of a training stage: NCCL needs CUDA tensors, so a run that holds
        GPUs in Ray but keeps torch on the CPU uses gloo."""
        return "nccl" if self.gpus > 0 and self.device != "cpu" else "gloo"

    def ray_options(self) -> dict[str, Any]:
        """Ray's resource options for one actor or task of this stage."""
        return {"num_cpus": self.cpus, **({"num_gpus": self.gpus} if self.gpus > 0 else {})}

    def resources_per_worker(self) -> dict[str, float]:
        """``ScalingConfig.resources_per_worker`` of a training stage."""
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus > 0 else {})}

    def line(self) -> str:
        where = {"train": "Ray Train workers", "actors": "actors", "tasks": "Ray tasks at once",
                 "driver": "in the driver"}  # fmt: skip
        count = "    " if self.kind == "driver" else f"{self.workers:3d} "
        return (
            f"{self.stage:17s} {count}{where[self.kind]:17s} {_num(self.cpus):>5s} CPU "
            f"{_num(self.gpus):>6s} GPU  batch {self.batch}"
        )


def _num(x: float) -> str:
    return f"{x:g}" if x == int(x) else f"{x:.4g}"


JUDGE_BATCH = 64  # the judge trains in the driver's process (tasks.scoring.judge)


def _whole(gpus: float) -> int:  # whole GPUs
    return math.floor(gpus + 1e-9)


def capacity(nodes: tuple[Node, ...], cpus: float, gpus: float) -> int:
    """How many workers of ``cpus`` CPUs and ``gpus`` GPUs the nodes hold at once. A share
    below one GPU must fit within one GPU, as Ray places fractional GPUs."""
    total = 0
    for n in nodes:
        by_cpu = math.floor(n.cpus / cpus + 1e-9) if cpus > 0 else 1 << 30
        if gpus <= 0:
            by_gpu = 1 << 30
        elif gpus < 1:
            by_gpu = _whole(n.gpus) * math.floor(1 / gpus + 1e-9)
        else:
            by_gpu = math.floor(n.gpus / gpus + 1e-9)
        total += min(by_cpu, by_gpu)
    return total


def _floor4(x: float) -> float:
    return math.floor(x * 1e4 + 1e-6) / 1e4


def actor_gpus(cfg: AdmConfig, cluster: Cluster, count: int) -> float:
    """GPUs of each of ``count`` actors: ``compute.gpus_per_actor``, else the cluster's GPUs
    spread evenly (1/k of a GPU when k actors must share each one)."""
    if not cfg.compute.use_gpu or cluster.gpus <= 0:
        return 0.0
    if cfg.compute.gpus_per_actor:
        return cfg.compute.gpus_per_actor
    whole = sum(_whole(n.gpus) for n in cluster.nodes)
    if whole == 0:  # only fractions of GPUs: one actor per node share
        return min(1.0, min(n.gpus for n in cluster.nodes if n.gpus > 0))
    return 1.0 / math.ceil(count / whole)


def actor_cpus(cluster: Cluster, count: int, want: float, gpus: float) -> float:
    """The most CPUs up to ``want`` that let all ``count`` actors be placed at once (so the
    pool, and e.g. Ray Data's read tasks beside it, can always be scheduled)."""
    candidates = {want} | {n.cpus / k for n in cluster.nodes for k in range(1, count + 1)}
    for c in sorted((_floor4(c) for c in candidates if c <= want), reverse=True):
        if c > 0 and capacity(cluster.nodes, c, gpus) >= count:
            return c
    return _floor4(min(want, max(cluster.cpus, 0.01) / max(count, 1)))


def actors(cfg: AdmConfig, cluster: Cluster, stage: str, count: int) -> StagePlacement:
    """``count`` actors of ``stage`` (0: the work runs in the driver's process)."""
    field, batch = {
        "reference": ("evaluation.workers", cfg.evaluation.batch_size),
        "score": ("evaluation.workers", cfg.evaluation.batch_size),
        "sample": ("sampling.workers", cfg.sampling.batch_size),
        "upsample": ("sampling.workers", cfg.sampling.batch_size),
    }[stage]
    device = torch_device(cfg, cluster)
    if count <= 0:
        return StagePlacement(stage, 0, 0.0, 0.0, batch, "driver", field, device)
    gpus = actor_gpus(cfg, cluster, count)
    cpus = actor_cpus(cluster, count, cfg.compute.cpus_per_worker, gpus)
    return StagePlacement(stage, count, cpus, gpus, batch, "actors", field, device)


def torch_device(cfg: AdmConfig, cluster: Cluster) -> str:
    """``compute.device`` as the workers resolve it, where the driver can tell: ``auto`` on a
    local Ray without CUDA is the CPU, whatever logical GPUs Ray offers."""
    if cfg.compute.device == "auto" and cluster.local and not cluster.cuda_devices:
        return "cpu"
    return cfg.compute.device


def training(cfg: AdmConfig, cluster: Cluster, stage: str) -> StagePlacement:
    """One Ray Train job: ``compute.num_workers`` workers, one whole GPU each with use_gpu
    (DDP puts one rank on each GPU), the global batch split across them."""
    c = cfg.compute
    batch = math.ceil(cfg.training.batches(stage.removeprefix("train-"))[0] / c.num_workers)
    gpus = 1.0 if c.use_gpu else 0.0
    device = torch_device(cfg, cluster)
    field = "compute.num_workers"
    return StagePlacement(
        stage, c.num_workers, c.cpus_per_worker, gpus, batch, "train", field, device
    )


def shard_tasks(cfg: AdmConfig, cluster: Cluster) -> StagePlacement:
    """Sharding: ``compute.num_workers`` Ray tasks in flight, one CPU each (decoding and
    resizing are single-threaded); more wait in Ray's queue, so one node's worth suffices."""
    cpus = min(1.0, max((n.cpus for n in cluster.nodes), default=1.0))
    field = "compute.num_workers"
    return StagePlacement("shard", cfg.compute.num_workers, cpus, 0.0, 0, "tasks", field, "cpu")


def reference_actors(cfg: AdmConfig) -> int:
    """The reference features take half the evaluation workers: the trainings run beside."""
    return max(1, cfg.evaluation.workers // 2)


def resource_plan(cfg: AdmConfig, cluster: Cluster) -> ResourcePlan:
    """Every stage's placement on ``cluster`` (see the module's docstring)."""
    stages = [shard_tasks(cfg, cluster)]
    kinds = ["train-diffusion"]
    kinds += ["train-classifier"] if cfg.classifier.enabled else []
    kinds += ["train-upsampler"] if cfg.upsampler.enabled else []
    stages += [training(cfg, cluster, k) for k in kinds]
    stages.append(actors(cfg, cluster, "reference", reference_actors(cfg)))
    judge = StagePlacement("judge", 0, 0.0, 0.0, JUDGE_BATCH, "driver", "", "cpu")
    stages.append(judge)
    stages.append(actors(cfg, cluster, "sample", cfg.sampling.workers))
    if cfg.upsampler.enabled:
        stages.append(actors(cfg, cluster, "upsample", cfg.sampling.workers))
    stages.append(actors(cfg, cluster, "score", cfg.evaluation.workers))
    return ResourcePlan(cfg, cluster, tuple(stages))


def _left_after(nodes: tuple[Node, ...], p: StagePlacement) -> tuple[Node, ...]:
    """The nodes' resources once ``p``'s workers are placed (first fit, as Ray packs)."""
    left = [Node(n.cpus, n.gpus) for n in nodes]
    for _ in range(p.workers):
        for i, n in enumerate(left):
            if n.cpus + 1e-9 >= p.cpus and n.gpus + 1e-9 >= p.gpus:
                left[i] = Node(n.cpus - p.cpus, n.gpus - p.gpus)
                break
    return tuple(left)


@dataclass(frozen=True)
class ResourcePlan:
    """Every stage's placement on one cluster; :meth:`check` before anything starts."""

    cfg: AdmConfig
    cluster: Cluster
    stages: tuple[StagePlacement, ...]

    def stage(self, name: str) -> StagePlacement:
        for p in self.stages:
            if p.stage == name:
                return p
        raise KeyError(f"no stage {name!r} in this plan (stages: {[p.stage for p in self.stages]})")

    @property
    def reference_first(self) -> bool:
        """The reference features run before the diffusion training when they could not run
        beside it (the training would hold the resources they need for its whole length)."""
        ref = self.stage("reference")
        if ref.kind == "driver":
            return False
        left = _left_after(self.cluster.nodes, self.stage("train-diffusion"))
        return capacity(left, ref.cpus, ref.gpus) < ref.workers

    def check(self, stages: tuple[str, ...] | None = None) -> None:
        """Raise :class:`PlacementError` (one line, naming the field to change) when the
        device asked for is missing or one of ``stages`` (default: all) cannot be placed."""
        self._check_devices()
        # scoring before the reference: it asks for twice the actors, under its own field
        for p in sorted(self.stages, key=lambda p: p.stage == "reference"):
            if stages is None or p.stage in stages:
                self._check_stage(p)

    def _where(self) -> str:
        c = self.cluster
        return "the local Ray" if c.local else f"the cluster at {c.address}"

    def _check_devices(self) -> None:
        c, compute = self.cluster, self.cfg.compute
        if compute.device == "cuda" and (c.cuda_devices == 0 if c.local else c.gpus <= 0):
            machine = (
                "this machine has no CUDA device" if c.local else f"{self._where()} has no GPU"
            )
            raise PlacementError(
                f"compute.device=cuda but {machine}: set compute.device=cpu (or auto)"
            )
        if compute.use_gpu and c.gpus <= 0:
            hint = ", or compute.local_gpus=N to reserve logical GPUs" if c.local else ""
            raise PlacementError(
                f"compute.use_gpu=true but {self._where()} has no GPU: set "
                f"compute.use_gpu=false{hint}"
            )

    def _check_stage(self, p: StagePlacement) -> None:
        need = 1 if p.kind == "tasks" else p.workers  # tasks queue; a pool must fit at once
        if p.kind == "driver" or capacity(self.cluster.nodes, p.cpus, p.gpus) >= need:
            return
        c = self.cluster
        whole = sum(_whole(n.gpus) for n in c.nodes)
        if p.kind == "train":
            self._check_training(p, whole)
        if p.gpus > 0 and capacity(c.nodes, 0.0, p.gpus) < p.workers:
            share = 1.0 / math.ceil(p.workers / max(whole, 1))
            fits = max(capacity(c.nodes, 0.0, p.gpus), 1)
            ref = p.stage == "reference"  # its actors are half of evaluation.workers
            what = f"the reference's {p.workers} actors" if ref else f"{p.field}={p.workers}"
            raise PlacementError(
                f"{what} ask{'' if ref else 's'} for {_num(p.workers * p.gpus)} GPUs "
                f"(compute.gpus_per_actor={_num(p.gpus)}), {self._where()} has {_num(c.gpus)}: "
                f"set {p.field}={2 * fits if ref else fits} (or compute.gpus_per_actor={share:.4g})"
            )
        raise PlacementError(
            f"{p.stage}: {p.workers} actors of {_num(p.cpus)} CPUs do not fit {self._where()} "
            f"({_num(c.cpus)} CPUs): set {p.field}={max(capacity(c.nodes, p.cpus, p.gpus), 1)}"
        )

    def _check_training(self, p: StagePlacement, whole: int) -> None:
        c = self.cluster
        if p.gpus > 0 and whole < p.workers:
            raise PlacementError(
                f"compute.num_workers={p.workers} asks for {p.workers} GPUs (one per Ray Train "
                f"worker with compute.use_gpu=true), {self._where()} has {_num(c.gpus)}: set "
                f"compute.num_workers={max(whole, 1)}"
            )
        fit = actor_cpus(c, p.workers, p.cpus, p.gpus)
        asked = f"compute.num_workers={p.workers} x compute.cpus_per_worker={_num(p.cpus)}"
        raise PlacementError(
            f"{asked} asks for {_num(p.workers * p.cpus)} CPUs, {self._where()} has "
            f"{_num(c.cpus)} ({len(c.nodes)} node(s), at most {_num(max(n.cpus for n in c.nodes))}"
            f" each): set compute.cpus_per_worker={_num(fit)}"
        )

    def lines(self) -> list[str]:
        """The plan as table rows for people."""
        c = self.cluster
        head = (
            f"{self._where()}: {len(c.nodes)} node(s), {_num(c.cpus)} CPUs, {_num(c.gpus)} GPUs; "
            f"torch device {self.cfg.compute.device}"
        )
        first = ["reference features run before the diffusion training (no room beside)"]
        return [head, *(p.line() for p in self.stages), *(first if self.reference_first else [])]


def checked_plan(cfg: AdmConfig, stages: tuple[str, ...] | None = None) -> ResourcePlan:
    """The plan on the cluster the stages will use, checked for ``stages`` (default all)."""
    plan = resource_plan(cfg, cluster_for(cfg))
    plan.check(stages)
    return plan
