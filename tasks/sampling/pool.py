"""The sampling actors: a pool of Ray actors (one model replica each) whose dead members are
replaced (tasks.runtime.actor_pool), with resources capped so the pool can always be
scheduled. Inside :func:`tasks.runtime.warm.keep_warm` a pool of the same stage, size and
resources is handed from set to set, each loading its own spec and weights."""

from __future__ import annotations

import logging
from typing import Any

from admflow import storage
from admflow.config import AdmConfig
from tasks.runtime import warm
from tasks.runtime.actor_pool import ActorSlots
from tasks.sampling.spec import SamplerSpec

log = logging.getLogger(__name__)

ACTOR_PREFIX = "admflow-sample"


def actor_options(cfg: AdmConfig, workers: int, stage: str = "sample") -> dict[str, Any]:
    """Resources per actor, as :mod:`tasks.resources` places ``workers`` actors of ``stage``
    (``sample`` or ``upsample``): CPUs capped so the whole pool fits at once, GPUs shared."""
    import ray

    from tasks.resources import Cluster, actors

    placed = actors(cfg, Cluster.from_ray(ray, cfg), stage, workers)
    return {**placed.ray_options(), "max_restarts": 0}


class _PlacedSampler:
    """A sampling actor that also says where Ray placed it (node, GPU ids)."""

    def __init__(self, *args: Any):
        from tasks.sampling.worker import ShardSampler

        self.sampler = ShardSampler(*args)

    def info(self) -> dict[str, Any]:
        from tasks.runtime.ray_session import placement

        return {**self.sampler.info(), **placement()}

    def load(self, *args: Any) -> dict[str, Any]:
        """Another set's spec and weights, in place of the ones it started with."""
        from tasks.sampling.worker import ShardSampler

        self.sampler = None  # the old networks go before the new ones are built
        self.sampler = ShardSampler(*args)
        return self.info()

    def sample(self, *args: Any) -> Any:
        return self.sampler.sample(*args)


def sampling_pool(
    spec: SamplerSpec, weights: dict[str, str | None], cfg: AdmConfig, workers: int, stage: str
) -> warm.Lease[ActorSlots]:
    """``workers`` sampling actors of ``stage``, placed by the resource plan, holding ``spec``
    and ``weights``: started, or handed on inside :func:`tasks.runtime.warm.keep_warm`. Each
    dead actor is replaced, at most 2 x workers + 2 times. The weights are read once by the
    driver and shared with every (replacement) actor through the object store. The caller
    releases the lease."""
    import ray

    refs = {k: ray.put(storage.read_bytes(v)) if v else None for k, v in weights.items()}
    args = (spec, refs["model"], refs.get("classifier"))
    options = actor_options(cfg, workers, stage)
    key = ("sampling", stage, workers, repr(sorted(options.items())))

    def start() -> ActorSlots:
        pool = ActorSlots(
            _PlacedSampler,
            args,
            options,
            workers,
            max_restarts=2 * workers + 2,
            what="sampling",
            name=ACTOR_PREFIX,
        )
        log.info("sampling actors %s", pool.info)  # device, node and GPU ids of each
        return pool

    held = warm.lease(key, start, ActorSlots.shutdown)
    if not held.fresh:
        try:
            held.pool.reload(args)
        except Exception:  # an actor lost while it was kept: start the pool afresh
            held.release(ok=False)
            held = warm.lease(key, start, ActorSlots.shutdown)
    return held
