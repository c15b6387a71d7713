"""The deployment files parse and say what a real cluster needs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _load(rel: str):
    return yaml.safe_load((REPO / rel).read_text())


def test_ray_launcher_config_has_gpu_workers_and_valid_head():
    cfg = _load("infra/ray/cluster.yaml")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] >= t["min_workers"] for t in gpu)
    assert cfg["max_workers"] >= max(t.get("max_workers", 0) for t in types.values())
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("--address" in c for c in cfg["worker_start_ray_commands"])


def test_kuberay_manifest_is_a_raycluster_with_gpu_group():
    m = _load("infra/k8s/raycluster.yaml")
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayCluster"
    head = m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}  # GCS, Jobs API
    groups = m["spec"]["workerGroupSpecs"]
    limits = groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_cluster_configs_run_the_admflow_image_built_on_the_tested_ray():
    """KubeRay and the cluster launcher run one image: infra/docker/Dockerfile, built on the
    Ray release the tests run, with admflow (this version) installed as a package."""
    import importlib.metadata
    import re

    import ray

    dockerfile = (REPO / "infra/docker/Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", dockerfile, re.M)
    assert base and base.group(1).startswith(f"{ray.__version__}-") and "gpu" in base.group(1)
    # not editable, and with the versions the tests passed with
    assert re.search(r'pip install --no-cache-dir -c constraints\.txt "\.\[fid\]"', dockerfile)
    assert "torch==" in dockerfile and "admflow config show tiny" in dockerfile
    m = _load("infra/k8s/raycluster.yaml")
    assert m["spec"]["rayVersion"] == ray.__version__
    pods = [m["spec"]["headGroupSpec"]] + m["spec"]["workerGroupSpecs"]
    images = {c["image"] for p in pods for c in p["template"]["spec"]["containers"]}
    launcher = _load("infra/ray/cluster.yaml")["docker"]["image"]
    assert images == {launcher}
    assert launcher.endswith(f"/admflow:{importlib.metadata.version('admflow')}")
    assert "ray://" not in (REPO / "infra/k8s/raycluster.yaml").read_text()


def test_compose_runs_mlflow_on_postgres_with_s3_and_prefect():
    c = _load("infra/compose/docker-compose.yaml")
    services = c["services"]
    assert {"postgres", "mlflow", "prefect"} <= set(services)
    mlflow_cmd = services["mlflow"]["command"]
    assert "postgresql://" in mlflow_cmd and "--artifacts-destination" in mlflow_cmd
    assert (
        "postgresql+asyncpg://"
        in services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    )
    for name in ("mlflow", "prefect"):  # services bind loopback on the host by default
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"])
    assert (REPO / "infra/compose/init-db.sh").exists()


def test_prefect_yaml_deployments_entrypoints_and_cron():
    from prefect.client.schemas.schedules import CronSchedule

    p = _load("prefect.yaml")
    deps = {d["name"]: d for d in p["deployments"]}
    assert set(deps) == {"reproduce", "evaluate-periodic", "sample", "paper", "nll"}
    for d in deps.values():
        path, func = d["entrypoint"].split(":")
        assert (REPO / path).exists()
        assert f"def {func}(" in (REPO / path).read_text()
        assert d["work_pool"]["name"] == "admflow-process"
    cron = deps["evaluate-periodic"]["schedules"][0]["cron"]
    CronSchedule(cron=cron, timezone="UTC")  # raises on an invalid expression


def test_stack_ports_are_held_until_their_service_starts():
    """While reserved, the OS hands a stack's port to no one (Ray's processes take ports of
    their own as they start); released, the service binds it."""
    import socket

    from infra.readiness import HOST, Reserved

    held = Reserved(("prefect", "ray"))
    port = held.ports()["prefect"]
    try:
        with socket.socket() as other, pytest.raises(OSError):
            other.bind((HOST, port))
        held.release("prefect")
        with socket.socket() as server:
            server.bind((HOST, port))
    finally:
        held.close()
    assert not held.sockets


def test_a_stack_service_that_exits_while_starting_fails_at_once(tmp_path):
    """No five-minute poll of a dead port: the wait ends when the process is gone and names
    its log and the error in it."""
    import sys
    import time

    from infra.readiness import wait_until
    from infra.stack import Stack

    stack = Stack(tmp_path)
    code = "print('starting'); print('ERROR: [Errno 98] address already in use'); print('bye')"
    stack._spawn("prefect", [sys.executable, "-c", code], {})
    start = time.time()
    with pytest.raises(RuntimeError, match="Prefect server exited while starting") as err:
        wait_until(lambda: False, "Prefect server", 120, *stack.watch("prefect"))
    assert time.time() - start < 30
    assert str(tmp_path / "prefect.log") in str(err.value)
    assert "address already in use" in str(err.value)


@pytest.mark.services  # starts moto_server and the MLflow server
def test_a_stack_that_cannot_come_up_leaves_nothing_running(tmp_path, monkeypatch):
    """`up` stops what it started when a later service fails (a taken port, Ctrl-C)."""
    import os
    import sys

    from infra import stack as stk

    started: dict[str, int] = {}
    spawn = stk.Stack._spawn

    def recording(self, name, argv, env):
        spawn(self, name, argv, env)
        started[name] = self.pids[name]

    def dies(stack, env):
        stack._spawn("prefect", [sys.executable, "-c", "print('ERROR: port taken')"], {})

    monkeypatch.setattr(stk.Stack, "_spawn", recording)
    monkeypatch.setattr(stk, "_spawn_prefect", dies)
    with pytest.raises(RuntimeError, match="Prefect server exited while starting"):
        stk.up(tmp_path, timeout=120)
    assert {"s3", "mlflow", "prefect"} <= set(started) and "ray-head" not in started
    assert stk.Stack.load(tmp_path).pids == {}  # down ran
    for pid in started.values():  # every process group it had started is gone
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
