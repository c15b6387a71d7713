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


def actor_options(cfg: AdmConfig, workers: int) -> dict[str, Any]:
    """Resources per actor. CPUs are capped at an even share of the cluster so that the pool
    (and anything else, e.g. Ray Data read tasks) can always be scheduled."""
    import ray

    total = ray.cluster_resources()
    cpus = min(cfg.compute.cpus_per_worker, max(total.get("CPU", 1.0), 0.01) / workers)
    opts: dict[str, Any] = {"num_cpus": round(cpus, 4), "max_restarts": 0}
    if cfg.compute.use_gpu and total.get("GPU", 0) > 0:
        opts["num_gpus"] = min(1.0, total["GPU"] / workers)
    return opts


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

        from tasks.sampling.worker import ShardSampler

        self.ray = ray
        self.cls = ray.remote(ShardSampler)
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
