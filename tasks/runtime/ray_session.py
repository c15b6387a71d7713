"""One way to get a Ray session for every stage.

``compute.ray_address`` (default ``$RAY_ADDRESS``) connects to a cluster, after a short probe
that nothing-listening is a one-line error rather than minutes of retries. Without it a local
Ray starts with the resources :func:`tasks.resources.Cluster.local_for` describes (this
machine's CPUs, ``compute.local_gpus`` or the CUDA devices) and an object store of
:func:`tasks.resources.local_object_store_bytes`. ``address="local"`` is passed explicitly so
a stray cluster on the same machine is never picked up by accident. Every call checks the
resource plan of the stage it starts (:meth:`tasks.resources.ResourcePlan.check`), so a stage
that could never be placed fails at once, naming the field to change.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from admflow.config import AdmConfig
from tasks import resources

# A cluster's workers get these through the runtime env (a local session's inherit them).
# Ray Train reports block until the controller polls; the default 2 s makes short runs crawl.
_WORKER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "PYTHONWARNINGS": "ignore"}
# Set for a local session only; read by Ray Train's driver side when a training starts.
LOCAL_ONLY_ENV = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Flow stages run in threads (e.g. three trainings at once): only one may call ray.init.
_INIT_LOCK = threading.Lock()


def ensure_ray(cfg: AdmConfig, stage: str | None = None) -> Any:
    """Ray, started or connected if it is not yet; ``stage`` (a name of
    :data:`tasks.resources.STAGES`) is checked against the cluster first."""
    import ray

    stages = (stage,) if stage else ()
    with _INIT_LOCK:
        if not ray.is_initialized():
            if cfg.compute.ray_address:
                resources.probe_address(cfg.compute.ray_address)
            else:  # fail before a local Ray starts
                resources.resource_plan(cfg, resources.Cluster.local_for(cfg)).check(stages)
            _init(ray, cfg)
    resources.resource_plan(cfg, resources.Cluster.from_ray(ray, cfg)).check(stages)
    return ray


def placement() -> dict[str, Any]:
    """Where the calling Ray worker or actor runs: its node and the GPU ids Ray gave it."""
    import ray

    ctx = ray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
    }


def _init(ray: Any, cfg: AdmConfig) -> None:
    os.environ.setdefault(
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", _WORKER_ENV["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
    )
    stores = _store_locations(cfg)  # also moves MLflow's credentials out of its URI
    if cfg.compute.ray_address:
        env_vars = {k: os.environ.get(k, v) for k, v in _WORKER_ENV.items()}
        ray.init(
            address=cfg.compute.ray_address,
            runtime_env={"env_vars": {**env_vars, **stores}},
            logging_level=logging.ERROR,
        )
    else:
        # Ray Train's preemption watcher (an actor per training, polling for node drains)
        # guards cluster nodes; this machine is the whole local cluster.
        os.environ.setdefault(LOCAL_ONLY_ENV[0], LOCAL_ONLY_ENV[1])
        # No runtime env: the local workers inherit this process's environment (the stores,
        # the health-check interval) through the raylet. A runtime env, even of env_vars
        # only, starts every worker through Ray's setup_worker, a second Python start-up
        # (~0.5 CPU-s per actor, docs/ARCHITECTURE.md); worker output stays in Ray's logs.
        (node,) = resources.Cluster.local_for(cfg).nodes
        ray.init(
            address="local",
            num_cpus=int(node.cpus),
            num_gpus=int(node.gpus),
            include_dashboard=False,
            object_store_memory=resources.local_object_store_bytes(cfg),
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
        _end_with_driver(ray)


def _store_locations(cfg: AdmConfig) -> dict[str, str]:
    """Where the stores are, for the runtime env: never a credential, as Ray writes the
    runtime env into its logs in plain text. A URI with ``user:password@`` is not forwarded:
    the workers of a local session inherit it from this process's environment, a cluster's
    nodes hold their own. MLflow's credentials move into MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD first (admflow.uris), which local workers inherit the same way
    and which MLflow sends with the bare tracking URI the stages hand to the workers."""
    from admflow.uris import has_userinfo, tracking_uri_without_credentials

    out = {}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "ADMFLOW_STORAGE_ROOT"):
        value = os.environ.get(key)
        if not value:
            continue
        if has_userinfo(value):
            if key == "MLFLOW_TRACKING_URI" and not cfg.tracking.tracking_uri:
                tracking_uri_without_credentials(value)
            continue
        out[key] = value
    return out


def _end_with_driver(ray: Any) -> None:
    """A local session ends with this process even when it is SIGKILLed: Ray's agents
    would otherwise outlive it (see tasks.runtime.ray_reaper)."""
    from tasks.runtime import ray_reaper

    node = getattr(ray._private.worker, "_global_node", None)  # the local node's processes
    if node is None:
        return
    ray_reaper.start([proc.pid for _kind, proc in node.live_processes()])
