"""The Ray cluster the stages run on, as the resource plan (:mod:`tasks.resources`) sees it:
its nodes' CPUs and GPUs, read from a live Ray or from what a local Ray will be started with,
and a fast answer when nothing listens at a cluster's address."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

from admflow.config import AdmConfig, ConfigError

GIB = 1024**3


class PlacementError(ConfigError):
    """A plan the cluster cannot place, or a device it does not have."""


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float


@dataclass(frozen=True)
class Cluster:
    """The Ray cluster's nodes; ``cuda_devices`` is what the driver's machine sees (known for
    a local Ray only, where the workers run on this machine)."""

    nodes: tuple[Node, ...]
    local: bool = True
    cuda_devices: int | None = None
    address: str | None = None

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    @classmethod
    def from_ray(cls, ray: Any, cfg: AdmConfig) -> Cluster:
        """The live cluster of an initialised Ray."""
        nodes = tuple(
            Node(float(n["Resources"].get("CPU", 0.0)), float(n["Resources"].get("GPU", 0.0)))
            for n in ray.nodes()
            if n.get("Alive")
        )
        address = cfg.compute.ray_address
        return cls(nodes, not address, None if address else cuda_devices(), address)

    @classmethod
    def local_for(cls, cfg: AdmConfig) -> Cluster:
        """What the local Ray (tasks.runtime.ray_session) is started with, before it starts."""
        cuda = cuda_devices()
        gpus = cuda if cfg.compute.local_gpus is None else cfg.compute.local_gpus
        cpus = cfg.compute.local_cpus or max(2, os.cpu_count() or 1)
        return cls((Node(float(cpus), float(gpus)),), True, cuda, None)


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def local_object_store_bytes(cfg: AdmConfig) -> int:
    """``compute.object_store_gib``, by default a fifth of the memory within 1 to 8 GiB: the
    ImageNet 256 network's weights (2.2 GB) and its classifier are put once per sampling pool
    and each actor returns shards of up to ~200 MB; Ray's old 512 MiB made those spill. Kept
    within /dev/shm where that holds at least 1 GiB (beyond it Ray falls back to disk)."""
    if cfg.compute.object_store_gib:
        return int(cfg.compute.object_store_gib * GIB)
    import psutil

    size = min(8 * GIB, max(1 * GIB, psutil.virtual_memory().total // 5))
    try:
        shm = os.statvfs("/dev/shm")
        size = min(size, max(1 * GIB, int(shm.f_bavail * shm.f_frsize * 0.9)))
    except OSError:  # no /dev/shm (not Linux)
        pass
    return int(size)


def probe_address(address: str, timeout: float = 3.0) -> None:
    """A one-line error, in seconds, when nothing listens at a Ray address (Ray itself
    retries for minutes). ``auto`` and addresses without a port are left to Ray."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise PlacementError(
            f"compute.ray_address={address} (default $RAY_ADDRESS): nothing answers at "
            f"{host}:{port} ({e.strerror or type(e).__name__}); start the cluster, or unset "
            "RAY_ADDRESS / set compute.ray_address=null to start a local Ray"
        ) from None


def cluster_for(cfg: AdmConfig) -> Cluster:
    """The cluster the stages will run on. A local Ray is described without starting it; a
    cluster address is probed, then asked (a short connection, closed again)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return Cluster.from_ray(ray, cfg)
    address = cfg.compute.ray_address
    if not address:
        return Cluster.local_for(cfg)
    probe_address(address)
    import logging

    import ray

    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        return Cluster.from_ray(ray, cfg)
    finally:
        ray.shutdown()
