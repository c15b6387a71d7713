"""Driving a running `admflow stack` from a test: Ray Jobs through the head's Jobs API, the
Prefect CLI and client in the stack's environment, and pages in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


# The Jobs API needs the head's dashboard agent; infra.stack gives it its own port, since a
# local Ray of an earlier test holding the default one made every submission fail.
def ray_job(stack: dict, argv: list[str], timeout: int = 1500) -> dict:
    """`ray job submit --working-dir . -- ARGV` through the head's Jobs API, as the README
    shows; returns the job's status, logs and the submission's output."""
    from ray.job_submission import JobSubmissionClient

    api = f"http://127.0.0.1:{stack['stack'].ports['ray-dashboard']}"
    client = JobSubmissionClient(api)
    for attempt in range(6):
        if attempt:  # "No available agent to submit job, please try again later"
            time.sleep(10)
        job_id = f"admflow-job-{os.getpid()}-{attempt}"
        out = subprocess.run(
            [bin_path("ray"), "job", "submit", "--address", api, "--submission-id", job_id,
             "--working-dir", ".", "--", *argv],
            env=stack["env"], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if any(j.submission_id == job_id for j in client.list_jobs()):
            break
        # the head refused the submission itself (no job agent yet): say why, then ask again
        print(f"submission {job_id} was not accepted:\n{out.stdout}\n{out.stderr}")
    else:
        pytest.fail(f"the Jobs API accepted no submission:\n{out.stdout}\n{out.stderr}")
    return {
        "status": client.get_job_status(job_id),
        "logs": client.get_job_logs(job_id),
        "output": out.stdout + out.stderr,
        "returncode": out.returncode,
    }


def prefect(env, *args, timeout=300) -> str:
    out = subprocess.run(
        [bin_path("prefect"), "--no-prompt", *args], env=env, cwd=REPO, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _python_json(env, code: str, arg: str, timeout: int = 300):
    """Run ``code`` (it prints one JSON line last) in a fresh interpreter with the stack's
    environment, so the Prefect client talks to the stack's server, not the test's."""
    out = subprocess.run(
        [sys.executable, "-c", code, arg], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_deployment(env, name: str, params: dict, timeout: int = 1500) -> dict:
    code = (
        "import json,sys;from prefect.deployments import run_deployment;"
        f"fr=run_deployment({name!r},parameters=json.loads(sys.argv[1]),timeout={timeout});"
        "print(json.dumps({'id':str(fr.id),'state':fr.state.name}))"
    )
    return _python_json(env, code, json.dumps(params), timeout + 60)


def flow_run_state(env, flow_run_id: str) -> str:
    code = (
        "import sys,json;from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "  print(json.dumps(c.read_flow_run(sys.argv[1]).state.name))"
    )
    return _python_json(env, code, flow_run_id)


def task_runs(env, flow_run_id: str) -> list[list[str]]:
    code = (
        "import sys,json;from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId\n"
        "with get_client(sync_client=True) as c:\n"
        "  trs=c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[sys.argv[1]])))\n"
        "  print(json.dumps([[t.name,t.state.name] for t in trs]))"
    )
    return _python_json(env, code, flow_run_id)


def dump_dom(url: str, out_png: Path | None = None) -> str:
    """The page's DOM after its scripts ran (and a screenshot to ``out_png``)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        msg = "Debian chromium is not installed (scripts/test.sh installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{msg}: in CI the browser test must run")
        pytest.skip(msg)
    with tempfile.TemporaryDirectory(prefix="admflow-chromium-") as profile:
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
            f"--user-data-dir={profile}", "--window-size=1600,1400", "--virtual-time-budget=25000",
        ]  # fmt: skip
        if out_png:
            subprocess.run(
                [exe, *flags, f"--screenshot={out_png}", url], capture_output=True, timeout=120
            )
        dom = subprocess.run(
            [exe, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
        )
    return dom.stdout
