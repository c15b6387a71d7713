"""What every worker of a data-parallel run needs to agree on: per-step seeds, and the two
collectives the loop uses (a no-op in a single process)."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A 63-bit seed that is a pure function of its inputs."""
    return (
        int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(2, np.uint64)[0]) >> 1
    )


def reseed_globals(seed: int) -> None:
    """Dropout and anything else drawing from global generators follows the step."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
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


def training_device(requested: str) -> torch.device:
    """The device of a Ray Train worker, from ``compute.device``: ``cpu`` keeps torch on the
    CPU even where Ray gave the worker GPUs (logical GPUs on a host without CUDA, as the
    placement tests reserve them); otherwise the GPU Ray gave it, or the CPU where there is
    no CUDA (Ray would name a CUDA device for any GPU it hands out)."""
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()
