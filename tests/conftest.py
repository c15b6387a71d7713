"""Shared fixtures: real services on 127.0.0.1, started and stopped by PID."""

from __future__ import annotations

import atexit
import faulthandler
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.priority import threads_per_worker

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "test-output"

# Before torch is imported: each worker's share of the cores, for it and every process it
# starts (tests/priority.py says why).
_THREADS = threads_per_worker()
if _THREADS:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_THREADS))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's ephemeral API server needs longer than its 20 s default on a busy 2-core box.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# Keep Prefect's ephemeral database and result cache out of the user's ~/.prefect.
if "PREFECT_HOME" not in os.environ:
    _prefect_home = tempfile.mkdtemp(prefix="admflow-prefect-")
    os.environ["PREFECT_HOME"] = _prefect_home
    atexit.register(shutil.rmtree, _prefect_home, ignore_errors=True)
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

# SIGUSR1 dumps every thread's stack of this pytest process (master or xdist worker) to
# test-output/stacks/PID.txt: scripts/watchdog.sh asks for it when a run hangs. faulthandler
# writes from the signal handler itself, so it answers even when no Python thread can run.
if hasattr(signal, "SIGUSR1"):
    (OUTPUT / "stacks").mkdir(parents=True, exist_ok=True)
    _STACKS = open(OUTPUT / "stacks" / f"{os.getpid()}.txt", "w")  # noqa: SIM115
    faulthandler.register(signal.SIGUSR1, file=_STACKS, all_threads=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} not ready after {timeout}s")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT.mkdir(exist_ok=True)
    return OUTPUT


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto_server) on 127.0.0.1; yields its URL and sets AWS_* env."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_VARS}
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        wait_for_port(port, proc)
        yield url
    finally:
        stop_process(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the moto server; yields ``s3://name``."""
    import s3fs

    name = f"t-{request.node.name.lower().replace('_', '-')[:40]}-{os.getpid()}"
    name = "".join(c for c in name if c.isalnum() or c == "-")[:60]
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    fs.mkdir(name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray session shared by every Ray test (each TorchTrainer.fit costs ~13 s).
    It starts after the S3 endpoint so its workers inherit the endpoint and credentials, as
    the nodes of a real cluster have them in their environment."""
    ray = pytest.importorskip("ray")
    # Prefect binds its console handler to the sys.stderr of the moment it first sets up
    # logging; were that a test's capsys stream, closed after that test, every later flow run
    # would log into a closed file. Set it up here, on the session's stream.
    from prefect.logging.configuration import setup_logging

    setup_logging()
    if not ray.is_initialized():
        from tasks.runtime.ray_session import LOCAL_ONLY_ENV

        os.environ.setdefault(*LOCAL_ONLY_ENV)  # as admflow's own local sessions set it
        ray.init(
            address="local",  # never attach to another Ray cluster found on the machine
            num_cpus=4,
            num_gpus=1,  # logical: the paper flow's tests place on it with torch on the CPU
            include_dashboard=False,
            object_store_memory=400 * 1024 * 1024,
            log_to_driver=False,  # no runtime env: the workers inherit this environment
        )
    yield ray
    ray.shutdown()


# A test is marked by what it starts, whatever its author wrote: one that uses the S3 server
# is `services`, one on the shared Ray session is `ray` (that session also starts the S3
# server, as a cluster's nodes have their object store). The fast tier (scripts/fast.sh)
# deselects both.
_MARK_BY_FIXTURE = {
    "s3_server": ("services",),
    "s3_bucket": ("services",),
    "ray_session": ("ray",),
}


# The longest files first (measured on 2 cores): with pytest-xdist workers taking whole files
# the short files fill in at the end (scripts/test.sh runs the demo's pipeline, the first,
# alone before the rest).
_LONGEST_FIRST = (
    "test_flows.py",
    "test_services.py",
    "test_placement.py",
    "test_interrupt.py",
    "test_train.py",
    "test_evaluate.py",
    "test_secrets.py",
)


def _order(item) -> int:
    name = item.path.name
    return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_order)  # stable: within a file, the written order
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            for mark in _MARK_BY_FIXTURE.get(fixture, ()):
                if mark not in item.keywords:
                    item.add_marker(getattr(pytest.mark, mark))


def pytest_unconfigure(config):
    """A stack file nobody asked for is removed.

    At exit Prefect stops its ephemeral API server and says so through its console handler,
    which is bound to a stream pytest has closed by then (a "Logging error" traceback per
    worker). The tests are over: drop those handlers first."""
    import logging

    if "_STACKS" in globals() and os.fstat(_STACKS.fileno()).st_size == 0:
        faulthandler.unregister(signal.SIGUSR1)
        _STACKS.close()
        Path(_STACKS.name).unlink(missing_ok=True)
    names = ["", *logging.root.manager.loggerDict]
    for logger in (logging.getLogger(n) for n in names):
        for handler in list(getattr(logger, "handlers", [])):
            if type(handler).__name__ == "PrefectConsoleHandler":
                logger.removeHandler(handler)
