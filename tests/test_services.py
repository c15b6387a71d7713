"""Real services end to end: `admflow stack`, the reproduce deployment run by a Prefect
worker on the 2-node Ray cluster, artifacts in S3, runs in the MLflow server, the MLflow UI
in headless Chromium. Everything binds 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

# The plumbing on real services, not the learning (tests/test_flows.py shows that).
FAST = [
    "data.demo_images_per_class=20",
    "training.steps=15",
    "training.checkpoint_every=5",
    "training.classifier_steps=15",
    "training.upsampler_steps=10",
    "training.batch_size=16",
    "sampling.num_samples=20",
    "sampling.shard_size=10",
    "sampling.batch_size=10",
    "sampling.timestep_respacing=10",
    "evaluation.reference_images=100",
    "evaluation.checkpoint_samples=0",  # FID over training: test_flows (it costs ~45 s here)
]


pytestmark = [pytest.mark.slow, pytest.mark.services, pytest.mark.ray, pytest.mark.timeout(2400)]
REPO = Path(__file__).resolve().parent.parent


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from infra import stack as stk

    state = tmp_path_factory.mktemp("stack")
    s = stk.up(state)
    env = {**os.environ, **s.env(), "ADMFLOW_REPO": str(REPO)}
    env.pop("PREFECT_HOME", None)
    env["PREFECT_HOME"] = str(state / "client-home")
    try:
        yield {"stack": s, "env": env, "state": state}
    finally:
        pids = dict(s.pids)
        stk.down(state)
        for _name, pid in pids.items():  # nothing left behind: every process group is gone
            with pytest.raises(ProcessLookupError):
                os.killpg(pid, 0)
        # ...and no pointer to the dead head in Ray's default temp dir, where the state API
        # of every later local Ray session would look for its cluster (12 s lost per fit)
        head = f"{stk.HOST}:{s.ports['ray']}"
        default = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        assert not (default.exists() and default.read_text().strip() == head)
        assert (s.ray_temp_dir / "ray_current_cluster").read_text().strip() == head


# The Jobs API needs the head's dashboard agent; infra.stack gives it its own port, since a
# local Ray of an earlier test holding the default one made every submission fail.
def test_a_ray_job_runs_admflow_on_the_two_node_cluster(stack):
    """`ray job submit --working-dir . -- admflow ...` through the Jobs API of the head node:
    the job shards a small demo set into the stack's S3 with Ray tasks on the cluster."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from admflow import storage

    env = stack["env"]
    api = f"http://127.0.0.1:{stack['stack'].ports['ray-dashboard']}"
    dest = "s3://admflow/store/ray-job/demo"
    client = JobSubmissionClient(api)
    for attempt in range(6):
        if attempt:  # "No available agent to submit job, please try again later"
            time.sleep(10)
        job_id = f"admflow-job-{os.getpid()}-{attempt}"
        out = subprocess.run(
            [_bin("ray"), "job", "submit", "--address", api, "--submission-id", job_id,
             "--working-dir", ".", "--", "admflow", "shard", "demo", dest,
             "--set", "data.demo_images_per_class=3", "--set", "data.shard_rows=10"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if any(j.submission_id == job_id for j in client.list_jobs()):
            break
        # the head refused the submission itself (no job agent yet): say why, then ask again
        print(f"submission {job_id} was not accepted:\n{out.stdout}\n{out.stderr}")
    else:
        pytest.fail(f"the Jobs API accepted no submission:\n{out.stdout}\n{out.stderr}")
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, out.stdout + out.stderr + logs
    assert out.returncode == 0, out.stdout + out.stderr
    assert "30 images (10 classes, 16px) in 3 shards; 3 written" in logs, logs
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")}
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                          "AWS_SECRET_ACCESS_KEY")})  # fmt: skip
    try:
        manifest = storage.read_json(f"{dest}/manifest.json")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert manifest["num_images"] == 30 and len(manifest["shards"]) == 3


def _prefect(env, *args, timeout=300) -> str:
    out = subprocess.run(
        [_bin("prefect"), "--no-prompt", *args], env=env, cwd=REPO, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _run_deployment(env, name: str, params: dict, timeout: int = 1500) -> dict:
    code = (
        "import json,sys;from prefect.deployments import run_deployment;"
        f"fr=run_deployment({name!r},parameters=json.loads(sys.argv[1]),timeout={timeout});"
        "print(json.dumps({'id':str(fr.id),'state':fr.state.name}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(params)], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=timeout + 60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def deployed(stack):
    out = _prefect(stack["env"], "deploy", "--all")
    assert "reproduce" in out
    return stack


def test_periodic_deployment_has_its_cron_schedule(deployed):
    code = (
        "import asyncio;from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "  async with get_client() as c:\n"
        "    d=await c.read_deployment_by_name('evaluate-periodic/evaluate-periodic')\n"
        "    print([s.schedule.cron for s in d.schedules])\n"
        "asyncio.run(main())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=deployed["env"], capture_output=True, text=True
    )
    assert "0 */6 * * *" in out.stdout, out.stderr


@pytest.fixture(scope="module")
def reproduced(deployed):
    # One guided set and no upsampler: every service is exercised; the full pipeline's
    # semantics are checked on embedded defaults in test_flows.
    overrides = [*FAST, "sampling.classifier_scales=[2.0]", "upsampler.enabled=false"]
    params = {"preset": "tiny", "overrides": overrides}
    t0 = time.time()
    first = _run_deployment(deployed["env"], "reproduce/reproduce", params)
    first_s = time.time() - t0
    t0 = time.time()
    second = _run_deployment(deployed["env"], "reproduce/reproduce", params)
    return {
        **deployed,
        "first": first,
        "second": second,
        "first_s": first_s,
        "second_s": time.time() - t0,
    }


def test_reproduce_runs_on_worker_and_second_trigger_is_cached(reproduced):
    assert reproduced["first"]["state"] == "Completed"
    assert reproduced["second"]["state"] == "Completed"
    code = (
        "import sys,json;from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId\n"
        "with get_client(sync_client=True) as c:\n"
        "  trs=c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[sys.argv[1]])))\n"
        "  print(json.dumps([[t.name,t.state.name] for t in trs]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, reproduced["second"]["id"]], env=reproduced["env"],
        capture_output=True, text=True,
    )  # fmt: skip
    states = json.loads(out.stdout.strip().splitlines()[-1])
    stage_states = [
        s for n, s in states if n.split("-")[0] in {"shard", "train", "sample", "evaluate"}
    ]
    assert stage_states and set(stage_states) == {"Cached"}, states
    assert reproduced["second_s"] < 0.5 * reproduced["first_s"]


def test_work_ran_on_both_ray_nodes(reproduced):
    code = (
        "import ray,json;from ray.util.state import list_tasks, list_actors, list_jobs\n"
        "ray.init(logging_level='ERROR')\n"
        "nodes={n['NodeID'] for n in ray.nodes() if n['Alive']}\n"
        # only the flow's work: not the Jobs API test's, which runs first on this cluster
        "jobs={j.job_id for j in list_jobs() if j.submission_id}\n"
        "used={a.node_id for a in list_actors(limit=10000) if a.node_id and a.job_id not in jobs}\n"
        "used|={t.node_id for t in list_tasks(limit=10000) if t.node_id and t.job_id not in jobs}\n"
        "print(json.dumps({'nodes':sorted(nodes),'used':sorted(used)}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=reproduced["env"], capture_output=True, text=True
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(info["nodes"]) == 2 and set(info["nodes"]) <= set(info["used"]), info


def test_artifacts_in_s3_and_runs_in_mlflow_server(reproduced):
    import mlflow
    import s3fs

    env = reproduced["env"]
    fs = s3fs.S3FileSystem(
        endpoint_url=env["AWS_ENDPOINT_URL"],
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
    )
    assert fs.glob("admflow/store/data/*/manifest.json")
    assert fs.glob("admflow/store/samples/*/grid.png")
    assert fs.glob("admflow/store/runs/*/checkpoints/step-*/meta.json")
    assert fs.glob("admflow/mlflow-artifacts/**")
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("admflow")
    runs = client.search_runs([exp.experiment_id])
    assert any("fid" in r.data.metrics for r in runs)
    reproduced["mlflow"] = {"client": client, "exp": exp, "runs": runs}


def _dump_dom(url: str, out_png: Path | None = None) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        msg = "Debian chromium is not installed (scripts/test.sh installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{msg}: in CI the browser test must run")
        pytest.skip(msg)
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
        f"--user-data-dir={tempfile.mkdtemp()}", "--window-size=1600,1400", "--virtual-time-budget=25000",
    ]  # fmt: skip
    if out_png:
        subprocess.run(
            [exe, *flags, f"--screenshot={out_png}", url], capture_output=True, timeout=120
        )
    dom = subprocess.run(
        [exe, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    return dom.stdout


@pytest.mark.browser
def test_mlflow_ui_shows_children_dataset_fid_and_grid(reproduced, output_dir):
    import mlflow

    env = reproduced["env"]
    base = env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=base)
    exp = client.get_experiment_by_name("admflow")
    parents = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.`admflow.flow` = 'reproduce'",
        order_by=["attributes.start_time ASC"],
    )
    parent = parents[0]
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    fid_run = next(c for c in children if "fid" in c.data.metrics)
    train_run = next(c for c in children if c.inputs and c.inputs.dataset_inputs)
    sample_run = next(c for c in children if c.data.tags.get("admflow.stage") == "sample")
    eid = exp.experiment_id
    shot = output_dir / "mlflow-ui-parent-run.png"
    dom = _dump_dom(f"{base}/#/experiments/{eid}/runs/{parent.info.run_id}", shot)
    assert shot.exists() and shot.stat().st_size > 10_000
    assert any(c.info.run_name in dom for c in children), "child runs not shown on the parent page"
    dom = _dump_dom(f"{base}/#/experiments/{eid}/runs/{fid_run.info.run_id}")
    # the metrics table: a cell naming "fid" (not just sfid or a tag) and the logged value as
    # the UI renders it (JavaScript's Number.toString: shortest repr, no trailing ".0")
    shown = repr(fid_run.data.metrics["fid"]).removesuffix(".0")
    assert re.search(rf">fid<.{{0,2000}}?>{re.escape(shown)}<", dom, re.S), (shown, dom[:2000])
    dom = _dump_dom(f"{base}/#/experiments/{eid}/runs/{train_run.info.run_id}")
    ds_name = train_run.inputs.dataset_inputs[0].dataset.name
    assert ds_name in dom
    path = urllib.parse.quote("grid.png")
    dom = _dump_dom(f"{base}/#/experiments/{eid}/runs/{sample_run.info.run_id}/artifacts/{path}")
    assert "grid.png" in dom
