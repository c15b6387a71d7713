"""Ctrl-C and SIGTERM stop `admflow reproduce` while it trains: every stage within 10 s, no
process of the run left (its Ray session included), its MLflow runs KILLED or FAILED, one
line saying how to resume, rc 130 / 143; and the rerun resumes the training from its newest
checkpoint and finishes.

One store, three invocations: SIGINT to the whole process group (a terminal's Ctrl-C)
during training, SIGTERM to the driver alone (a scheduler's or container runtime's stop)
during the resumed training, then a rerun to the end. The pipeline is the tiny preset cut to
what still trains: one model, no classifier, no upsampler, 10 samples.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ADMFLOW = str(Path(sys.executable).parent / "admflow")
STOP_S = 10.0
RESUME_LINE = "admflow reproduce: interrupted; rerun to resume"
OVERRIDES = [
    "data.demo_images_per_class=10",
    "data.class_cond=false",  # no judge to train
    "classifier.enabled=false",
    "upsampler.enabled=false",
    "sampling.classifier_scales=[0.0]",
    "training.steps=40",
    "training.checkpoint_every=10",
    "training.checkpoint_steps=[]",
    "training.log_every=10",
    "training.batch_size=16",
    "sampling.num_samples=10",
    "sampling.shard_size=10",
    "sampling.batch_size=10",
    "sampling.timestep_respacing=10",
    "sampling.workers=1",
    "evaluation.reference_images=20",
    "evaluation.workers=0",  # Inception in the driver: no actors to start
    "evaluation.checkpoint_samples=0",
]


# A driver like the CLI's: a stage blocked in a worker thread (as Ray Train's fit is), a
# child process in the same session (as Ray's and Prefect's are), a stop action, and Prefect's
# way of taking SIGTERM over while a flow runs.
GUARDED = """
import signal, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from admflow import interrupt

def prefect_like(signum, frame):
    raise SystemExit(signum)

try:  # as admflow.cli.main
    with interrupt.guard("demo"):
        interrupt.on_stop("mark", lambda: open(sys.argv[1], "w").write("stopped"))
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        pool = ThreadPoolExecutor(1)
        pool.submit(time.sleep, 300)  # joined at exit unless the process ends at once
        signal.signal(signal.SIGTERM, prefect_like)
        print(child.pid, flush=True)
        time.sleep(300)
except BaseException:
    if interrupt.stopping():
        interrupt.finish()
    raise
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_threads_children_and_runs_the_stop_actions(tmp_path, sig):
    import psutil

    mark = tmp_path / "mark"
    proc = subprocess.Popen(
        [sys.executable, "-c", GUARDED, str(mark)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child = psutil.Process(int(proc.stdout.readline()))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    assert err.strip() == "admflow demo: interrupted; rerun to resume"
    assert mark.read_text() == "stopped"
    psutil.wait_procs([child], timeout=5)
    assert not child.is_running()


@pytest.mark.parametrize(
    "error, transient",
    [
        (ConnectionResetError("reset by peer"), True),
        (TimeoutError("read timed out"), True),
        (OSError(111, "Connection refused"), True),
        (FileNotFoundError("model.pt"), False),
        (ValueError("bad shard"), False),
        (RuntimeError("PytorchStreamReader failed reading zip archive"), False),
    ],
)
def test_only_transient_faults_are_retried(error, transient):
    from admflow.faults import is_transient
    from admflow.storage import StorageError

    assert is_transient(error) is transient
    try:  # the storage layer's one-line error keeps what caused it
        raise StorageError("s3://bucket/x: could not read") from error
    except StorageError as wrapped:
        assert is_transient(wrapped) is transient


def test_http_status_and_throttling_codes_decide_for_service_errors():
    from admflow.faults import is_transient

    class ClientError(Exception):  # botocore's shape: a parsed response dict
        def __init__(self, code: str, status: int):
            super().__init__(code)
            self.response = {
                "Error": {"Code": code},
                "ResponseMetadata": {"HTTPStatusCode": status},
            }

    assert is_transient(ClientError("SlowDown", 503))
    assert is_transient(ClientError("InternalError", 500))
    assert is_transient(ClientError("Throttling", 400))
    assert not is_transient(ClientError("NoSuchKey", 404))
    assert not is_transient(ClientError("AccessDenied", 403))

    from mlflow.exceptions import MlflowException, RestException

    assert not is_transient(MlflowException("no such run"))  # no server answered
    busy = RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"})
    assert is_transient(busy)
    gone = RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"})
    assert not is_transient(gone)


def _checkpoint_steps(store: Path) -> list[int]:
    metas = glob.glob(str(store / "runs" / "diffusion-*" / "checkpoints" / "step-*" / "meta.json"))
    return sorted(json.loads(Path(m).read_text())["step"] for m in metas)


def _start(tmp: Path, store: Path) -> subprocess.Popen:
    (tmp / "prefect").mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "prefect"),  # the run's own ephemeral Prefect database
        "RAY_ADDRESS": "",
    }
    args = [ADMFLOW, "reproduce", *(f"--set={o}" for o in [*OVERRIDES, f"storage.root={store}"])]
    return subprocess.Popen(
        args,
        cwd=tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a job
    )


def _wait_for_checkpoint_after(proc: subprocess.Popen, store: Path, step: int) -> int:
    """Block until the training writes a checkpoint past ``step``; returns its step."""
    deadline = time.time() + 600
    while time.time() < deadline:
        newer = [s for s in _checkpoint_steps(store) if s > step]
        if newer:
            return newer[0]
        assert proc.poll() is None, f"reproduce ended before training: {proc.stderr.read()}"
        time.sleep(0.2)
    raise AssertionError("no checkpoint within 600 s")


def _tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _interrupt(proc: subprocess.Popen, sig: int, to_group: bool) -> dict:
    """Send ``sig``; returns rc, stderr and the seconds until the process, and then every
    process it had started, were gone."""
    import psutil

    procs = _tree(proc.pid)
    names = " ".join(p.name() for p in procs)
    assert "raylet" in names and "gcs_server" in names, names
    sent = time.monotonic()
    if to_group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"still running 60 s after signal {sig}") from None
    exited = time.monotonic() - sent
    _gone, alive = psutil.wait_procs(procs, timeout=max(0.1, STOP_S - exited))
    left = [(p.pid, p.name()) for p in alive]
    for p in alive:
        p.kill()
    return {
        "rc": proc.returncode,
        "err": err,
        "exit_s": exited,
        "all_s": time.monotonic() - sent,
        "left": left,
    }


def _runs(store: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("admflow")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _first_logged_step(store: Path, run_id: str) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    return min(m.step for m in client.get_metric_history(run_id, "loss"))


def _assert_stopped(stop: dict, rc: int, store: Path, known: set[str]) -> list:
    """The stop's promises; returns this invocation's MLflow runs."""
    assert stop["rc"] == rc, stop["err"][-3000:]
    assert stop["exit_s"] < STOP_S and not stop["left"], stop
    assert stop["err"].count(RESUME_LINE) == 1, stop["err"][-3000:]
    assert "Traceback" not in stop["err"], stop["err"][-3000:]
    runs = [r for r in _runs(store) if r.info.run_id not in known]
    by_name = {r.info.run_name: r.info.status for r in runs}
    assert by_name.get("reproduce-tiny") in ("KILLED", "FAILED"), by_name
    assert by_name.get("train diffusion 16px") in ("KILLED", "FAILED"), by_name
    assert "RUNNING" not in by_name.values(), by_name
    return runs


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_sigint_and_sigterm_stop_everything_and_the_rerun_resumes(tmp_path):
    store = tmp_path / "store"
    timings = {}

    # 1. Ctrl-C in a terminal: SIGINT to the whole process group, Ray's processes included.
    proc = _start(tmp_path, store)
    first = _wait_for_checkpoint_after(proc, store, 0)
    stop = _interrupt(proc, signal.SIGINT, to_group=True)
    timings["sigint"] = (round(stop["exit_s"], 2), round(stop["all_s"], 2))
    runs = _assert_stopped(stop, 130, store, set())
    seen = {r.info.run_id for r in runs}
    assert _checkpoint_steps(store)[-1] < 40  # it stopped during training

    # 2. A scheduler's stop: SIGTERM to the driver alone, while the resumed training runs.
    proc = _start(tmp_path, store)
    second = _wait_for_checkpoint_after(proc, store, _checkpoint_steps(store)[-1])
    stop = _interrupt(proc, signal.SIGTERM, to_group=False)
    timings["sigterm"] = (round(stop["exit_s"], 2), round(stop["all_s"], 2))
    runs = _assert_stopped(stop, 143, store, seen)
    seen |= {r.info.run_id for r in runs}
    train = next(r for r in runs if r.info.run_name == "train diffusion 16px")
    assert _first_logged_step(store, train.info.run_id) > first  # resumed, not restarted
    last = _checkpoint_steps(store)[-1]
    assert second <= last < 40

    # 3. The rerun resumes from the newest checkpoint and finishes the pipeline.
    proc = _start(tmp_path, store)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    runs = [r for r in _runs(store) if r.info.run_id not in seen]
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["reproduce-tiny"].info.status == "FINISHED"
    train = by_name["train diffusion 16px"]
    assert train.info.status == "FINISHED"
    assert _first_logged_step(store, train.info.run_id) > last
    assert train.data.tags["admflow.final_step"] == "40"
    assert "shard 16px" not in by_name  # the finished shard set is a cache hit
    print(json.dumps({"stop_seconds (exit, all processes)": timings}))
