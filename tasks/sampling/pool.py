"""The sampling actors: a pool of Ray actors (one model replica each) whose dead members are
replaced, with resources capped so the pool can always be scheduled."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from admflow import storage
from admflow.config import AdmConfig
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

    def sample(self, *args: Any) -> Any:
        return self.sampler.sample(*args)


class ActorPool:
    """Actor slots that are refilled with a new actor when one dies."""

    def __init__(
        self,
        spec: SamplerSpec,
        weights: dict[str, str | None],
        options: dict[str, Any],
        workers: int,
        max_restarts: int,
    ):
        import ray

        self.ray = ray
        self.cls = ray.remote(_PlacedSampler)
        self.options = options
        # Read once by the driver, shared with every (replacement) actor via the object store.
        self.refs = {k: ray.put(storage.read_bytes(v)) if v else None for k, v in weights.items()}
        self.spec = spec
        self.token = uuid.uuid4().hex[:8]
        self.restarts = 0
        self.max_restarts = max_restarts
        self.actors = [self._new(slot) for slot in range(workers)]
        # Fail fast (and clearly) on a checkpoint that does not fit, before any shard runs.
        self.info = ray.get([a.info.remote() for a in self.actors])
        log.info("sampling actors %s", self.info)  # device, node and GPU ids of each

    def _new(self, slot: int) -> Any:
        name = f"{ACTOR_PREFIX}-{self.token}-{slot}-{self.restarts}"
        return self.cls.options(name=name, **self.options).remote(
            self.spec, self.refs["model"], self.refs.get("classifier")
        )

    def replace(self, slot: int, err: Exception) -> None:
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise RuntimeError(f"sampling actors died {self.restarts} times; last: {err}") from err
        log.warning("sampling actor %d died (%s); starting a replacement", slot, type(err).__name__)
        self.ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new(slot)

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
