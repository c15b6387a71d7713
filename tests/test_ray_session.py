"""The local Ray session that admflow starts ends with its driver, even on SIGKILL; its
workers inherit the driver's environment, the session having no runtime env."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]
REPO = Path(__file__).resolve().parent.parent

DRIVER = """
import json, os, sys, time
import psutil
from admflow.config import load_config
from tasks.runtime.ray_session import ensure_ray

ray = ensure_ray(load_config("tiny", []))


def probe():
    env = ray.get_runtime_context().runtime_env
    return os.getpid(), dict(env), os.environ.get("ADMFLOW_TEST_INHERITED")


pid, runtime_env, inherited = ray.get(ray.remote(probe).remote())  # a worker has started too
time.sleep(3)  # the reaper has read the process tree at least once
me = psutil.Process()
procs = [p for p in me.children(recursive=True)]
print(json.dumps({"worker": pid, "runtime_env": runtime_env, "inherited": inherited,
                  "procs": [[p.pid, p.create_time(), p.name()] for p in procs]}))
sys.stdout.flush()
time.sleep(600)
"""


def _alive(pid: int, started: float) -> bool:
    import psutil

    try:
        return psutil.Process(pid).create_time() == started
    except psutil.Error:
        return False


def test_local_ray_session_ends_when_the_driver_is_sigkilled():
    import json

    env = {**os.environ, "RAY_ADDRESS": "", "ADMFLOW_TEST_INHERITED": "from the driver"}
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        info = json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    procs = info["procs"]
    names = " ".join(name for _pid, _t, name in procs)
    assert "raylet" in names and "gcs_server" in names and len(procs) >= 5, names
    assert any(pid == info["worker"] for pid, _t, _n in procs)
    # no runtime env, so no worker starts through Ray's setup_worker (a second Python
    # start-up each): the environment reaches the workers by inheritance
    assert info["runtime_env"] == {} and info["inherited"] == "from the driver", info
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(p, t) for p, t, _n in procs):
        time.sleep(0.5)
    left = [(p, n) for p, t, n in procs if _alive(p, t)]
    assert not left, f"Ray processes outlived the driver by 20 s: {left}"
