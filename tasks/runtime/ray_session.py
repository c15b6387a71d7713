"""One way to get a Ray session for every stage.

``compute.ray_address`` (default ``$RAY_ADDRESS``) connects to a cluster; without it a local
Ray starts with ``num_cpus = max(2, compute.num_workers)`` logical CPUs. ``address="local"``
is passed explicitly so a stray cluster on the same machine is never picked up by accident.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from admflow.config import AdmConfig

# Ray Train reports block until the controller polls; the default 2 s makes short runs crawl.
_WORKER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "PYTHONWARNINGS": "ignore"}
# Flow stages run in threads (e.g. three trainings at once): only one may call ray.init.
_INIT_LOCK = threading.Lock()


def ensure_ray(cfg: AdmConfig) -> Any:
    import ray

    with _INIT_LOCK:
        if not ray.is_initialized():
            _init(ray, cfg)
    return ray


def _init(ray: Any, cfg: AdmConfig) -> None:
    os.environ.setdefault(
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", _WORKER_ENV["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
    )
    env_vars = {k: os.environ.get(k, v) for k, v in _WORKER_ENV.items()}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "ADMFLOW_STORAGE_ROOT"):
        if os.environ.get(key):
            env_vars[key] = os.environ[key]
    runtime_env = {"env_vars": env_vars}
    if cfg.compute.ray_address:
        ray.init(
            address=cfg.compute.ray_address, runtime_env=runtime_env, logging_level=logging.ERROR
        )
    else:
        ray.init(
            address="local",
            num_cpus=max(2, cfg.compute.num_workers),
            include_dashboard=False,
            object_store_memory=512 * 1024 * 1024,
            runtime_env=runtime_env,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
        _end_with_driver(ray)


def _end_with_driver(ray: Any) -> None:
    """A local session ends with this process even when it is SIGKILLed: Ray's agents
    would otherwise outlive it (see tasks.runtime.ray_reaper)."""
    from tasks.runtime import ray_reaper

    node = getattr(ray._private.worker, "_global_node", None)  # the local node's processes
    if node is None:
        return
    ray_reaper.start([proc.pid for _kind, proc in node.live_processes()])
