"""Real services end to end: `admflow stack`, the reproduce deployment run by a Prefect
worker on the 2-node Ray cluster, artifacts in S3, runs in the MLflow server, the MLflow UI
in headless Chromium. Everything binds 127.0.0.1."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

from tests import stack_client

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
    "sampling.upsample_respacing=10",
    "evaluation.reference_images=40",
    "evaluation.checkpoint_samples=0",  # FID over training: test_flows (it costs ~45 s here)
    "evaluation.judge=false",  # class accuracy: test_flows (a minute here)
]


# A hang guard, by thread as in tests/test_flows.py: a stuck wait prints every thread's stack.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.services,
    pytest.mark.ray,
    pytest.mark.timeout(2400, method="thread"),
]
REPO = Path(__file__).resolve().parent.parent


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
        head = f"{stk.HOST}:{s.ports['ray']}"
        # each node keeps its own temp dir (a Ray Job's files unpacked once per node)
        for node in ("ray-head", "ray-node"):
            assert (s.node_temp_dir(node) / "ray_current_cluster").read_text().strip() == head
        stk.down(state)
        for _name, pid in pids.items():  # nothing left behind: every process group is gone
            with pytest.raises(ProcessLookupError):
                os.killpg(pid, 0)
        # ...no pointer to the dead head in Ray's default temp dir, where the state API of
        # every later local Ray session would look for its cluster (12 s lost per fit),
        # and the stack's own Ray temp dir is gone with it
        default = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        assert not (default.exists() and default.read_text().strip() == head)
        assert not s.ray_temp_dir.exists()


@pytest.fixture(scope="module")
def deployed(stack):
    out = stack_client.prefect(stack["env"], "deploy", "--all")
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


def test_tracking_server_runs_without_mlflows_job_runner(stack):
    """admflow logs runs, metrics and artifacts only: the stack's MLflow server starts none
    of the huey consumers of MLflow's job runner (infra.stack.MLFLOW_SERVER_ENV)."""
    import psutil

    server = psutil.Process(stack["stack"].pids["mlflow"])
    cmdlines = [" ".join(p.cmdline()) for p in (server, *server.children(recursive=True))]
    assert any("uvicorn" in c for c in cmdlines), cmdlines  # the tracking server itself
    assert not [c for c in cmdlines if "huey" in c], cmdlines


OVERRIDES = [*FAST, "sampling.classifier_scales=[2.0]"]


def _report_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("admflow-report-*")}


@pytest.fixture(scope="module")
def reproduced(deployed):
    """One reduced pipeline, upsampler included (the lineage walk needs its three trainings),
    run as a Ray Job through the head's Jobs API; then the same through the deployment on the
    worker, all cache hits. Every later test reads these two runs."""
    from ray.job_submission import JobStatus

    before = _report_dirs()
    argv = ["admflow", "reproduce", "--config", "tiny"]
    for o in OVERRIDES:
        argv += ["--set", o]
    t0 = time.time()
    job = stack_client.ray_job(deployed, argv)
    first_s = time.time() - t0
    print(f"reproduce as a Ray Job: {first_s:.1f} s")
    assert job["status"] == JobStatus.SUCCEEDED, job["output"][-5000:] + job["logs"][-5000:]
    assert job["returncode"] == 0, job["output"][-5000:]
    found = re.findall(r"runs/flow-run/([0-9a-f-]{36})", job["logs"])
    assert found, job["logs"][-3000:]
    first = {"id": found[0], "state": stack_client.flow_run_state(deployed["env"], found[0])}
    new_report_dirs = _report_dirs() - before
    t0 = time.time()
    params = {"preset": "tiny", "overrides": OVERRIDES}
    second = stack_client.run_deployment(deployed["env"], "reproduce/reproduce", params)
    return {
        **deployed,
        "job": job,
        "first": first,
        "second": second,
        "first_s": first_s,
        "second_s": time.time() - t0,
        "new_report_dirs": new_report_dirs,
    }


def test_reproduce_as_a_ray_job_then_cached_through_the_deployment(reproduced):
    """The README's `ray job submit --working-dir . -- admflow reproduce ...` on the stack
    runs to the end (the two nodes no longer share a temp dir, where the second unpacked the
    job's files over the driver's working directory); the deployment's run on the worker then
    finds every stage in the stack's shared result store."""
    assert reproduced["first"]["state"] == "Completed"
    logs = reproduced["job"]["logs"]
    assert re.search(r"\| tiny \+U \| upsampler \| 32 \|", logs), logs[-3000:]
    # each worker line once (the nodes' log monitors no longer tail one shared log dir), and
    # no Ray Train report dicts: the progress lines say the same
    assert "TrainingReport(" not in logs, logs[-3000:]
    assert reproduced["second"]["state"] == "Completed"
    # the job's driver left no report temp dir behind
    assert not reproduced["new_report_dirs"], reproduced["new_report_dirs"]
    states = stack_client.task_runs(reproduced["env"], reproduced["second"]["id"])
    stage_states = [
        s for n, s in states if n.split(" ")[0] in {"shard", "train", "sample", "evaluate"}
    ]
    # every stage a cache hit is what "cached" means; the wall times are printed, not compared:
    # beside the demo's pipeline a cached run has taken 175 s against the first run's 246 s
    assert stage_states and set(stage_states) == {"Cached"}, states
    print(f"first run {reproduced['first_s']:.1f} s, cached run {reproduced['second_s']:.1f} s")


def test_flow_run_log_shows_stages_and_training_progress(reproduced):
    """What `prefect flow-run logs ID` and the Prefect UI show: each stage starting and
    ending, the trainings' progress lines; not Ray Train's report dicts, not a "Finished in
    state Completed()" per task."""
    code = (
        "import sys,json;from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId\n"
        "with get_client(sync_client=True) as c:\n"
        "  logs=c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[sys.argv[1]])))\n"
        "  print(json.dumps([l.message for l in logs]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, reproduced["first"]["id"]], env=reproduced["env"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = json.loads(out.stdout.strip().splitlines()[-1])
    text = "\n".join(lines)
    for stage in ("shard 16px", "train diffusion", "train upsampler", "sample s=2",
                  "upsample s=2", "evaluate upsampler s=2 32px"):  # fmt: skip
        assert f"{stage}: started" in text and f"{stage}: done in" in text, (stage, text)
    # the training's progress lines (a short run may end before its first step line is due)
    assert re.search(r"\[train diffusion\] (step \d+/15|starting Ray Train workers)", text), text
    assert "TrainingReport(" not in text and "metrics={" not in text, text
    assert sum("Finished in state Completed()" in m for m in lines) <= 1, text  # the flow's


def test_work_ran_on_both_ray_nodes(reproduced):
    code = (
        "import ray,json;from ray.util.state import list_tasks, list_actors\n"
        "ray.init(logging_level='ERROR')\n"
        "nodes={n['NodeID'] for n in ray.nodes() if n['Alive']}\n"
        # the reproduce job's work (the deployment's run after it is all cache hits)
        "used={a.node_id for a in list_actors(limit=10000) if a.node_id}\n"
        "used|={t.node_id for t in list_tasks(limit=10000) if t.node_id}\n"
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
    # each registered version says what it was trained on, from where, under which overrides
    for kind in ("diffusion", "classifier", "upsampler"):
        (version,) = client.search_model_versions(f"name = 'admflow-tiny-{kind}'")
        train = client.get_run(version.run_id)
        assert version.tags["admflow.train_run_id"] == version.run_id
        assert version.tags["admflow.data_manifest"] == train.data.tags[
            "admflow.upstream.data_manifest"]  # fmt: skip
        assert version.tags["admflow.checkpoint"] == train.data.tags["checkpoint.final"]
        assert "sampling.classifier_scales=[2.0]" in version.tags["admflow.overrides"]
        assert version.tags["admflow.data_manifest"] in version.description


_LINK = re.compile(r'<a[^>]*href="#/experiments/(\d+)/runs/([0-9a-f]{32})"[^>]*>([^<]+)</a>')


def _links(dom: str) -> dict[str, str]:
    """The run links in a page's description: run id -> the link's text."""
    return {rid: html.unescape(label) for _eid, rid, label in _LINK.findall(dom)}


def _lineage(client, exp_id: str) -> dict:
    """The first reproduce run's stage runs by name, and the FID run of the upsampled set
    with every run it names as upstream (from the tags, for the browser to check against)."""
    parent = client.search_runs(
        [exp_id], filter_string="tags.`admflow.flow` = 'reproduce'",
        order_by=["attributes.start_time ASC"],
    )[0]  # fmt: skip
    children = client.search_runs(
        [exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {c.info.run_name: c for c in children}
    assert len(by_name) == len(children), sorted(c.info.run_name for c in children)
    fid = by_name["evaluate upsampler s=2 32px"]
    tags = {k.removeprefix("admflow.upstream."): v for k, v in fid.data.tags.items()}
    return {"parent": parent, "children": children, "by_name": by_name, "fid": fid, "tags": tags}


@pytest.mark.browser
def test_mlflow_ui_walk_from_the_parent_run_to_an_fids_samples_checkpoints_and_shards(
    reproduced, output_dir
):
    """Click by click in the MLflow UI: the parent run links each stage run (distinct names
    that say what each is); the upsampled set's FID run links its samples, the base samples,
    the three training runs with their checkpoints and the shards of both sizes; each link
    leads to the run it names, and those pages show the samples' grid and one data set name
    for each shard set (on the shard run and the training run alike)."""
    import mlflow

    base = reproduced["env"]["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=base)
    eid = client.get_experiment_by_name("admflow").experiment_id
    walk = _lineage(client, eid)
    by_name, tags = walk["by_name"], walk["tags"]
    expected = {"shard 16px", "shard 32px", "train diffusion 16px", "train classifier 16px",
                "train upsampler 16->32px", "sample s=2 ddpm-10 16px",
                "upsample s=2 ddim-10 32px", "evaluate base s=2 16px",
                "evaluate bilinear s=2 32px", "evaluate upsampler s=2 32px"}  # fmt: skip
    assert expected <= set(by_name), sorted(by_name)
    page = lambda rid: f"{base}/#/experiments/{eid}/runs/{rid}"  # noqa: E731

    shot = output_dir / "mlflow-ui-parent-run.png"
    dom = stack_client.dump_dom(page(walk["parent"].info.run_id), shot)
    assert shot.exists() and shot.stat().st_size > 10_000
    links = _links(dom)  # the parent's description: every stage run, by its name
    assert {by_name[n].info.run_id: n for n in expected}.items() <= links.items(), links

    fid = walk["fid"]
    dom = stack_client.dump_dom(page(fid.info.run_id))
    # the metrics table: a cell naming "fid" (not just sfid or a tag) and the logged value as
    # the UI renders it (JavaScript's Number.toString: shortest repr, no trailing ".0")
    shown = repr(fid.data.metrics["fid"]).removesuffix(".0")
    assert re.search(rf">fid<.{{0,2000}}?>{re.escape(shown)}<", dom, re.S), (shown, dom[:2000])
    links = _links(dom)
    train = {k: client.get_run(tags[f"{p}train_run_id"])
             for k, p in (("diffusion", ""), ("classifier", "classifier_"),
                          ("upsampler", "upsampler_"))}  # fmt: skip
    want = {
        tags["sample_run_id"]: "upsample s=2 ddim-10 32px",
        tags["base_sample_run_id"]: "sample s=2 ddpm-10 16px",
        train["diffusion"].info.run_id: "train diffusion 16px",
        train["classifier"].info.run_id: "train classifier 16px",
        train["upsampler"].info.run_id: "train upsampler 16->32px",
        by_name["shard 16px"].info.run_id: "shard 16px",
        by_name["shard 32px"].info.run_id: "shard 32px",
    }
    assert want.items() <= links.items(), (want, links)
    assert tags["samples"] in dom and tags["base_samples"] in dom
    for rid, label in links.items():  # every link's target is the run it names
        assert client.get_run(rid).info.run_name == label
    # the checkpoints the FID came from, beside their training runs' links
    for k, run in train.items():
        assert run.data.tags["checkpoint.final"] in dom, k
    assert tags["upsampler_checkpoint"] == train["upsampler"].data.tags["checkpoint.final"]
    # the upsampler trained on its own (32px) shards, and says so
    up_manifest = train["upsampler"].data.tags["admflow.upstream.data_manifest"]
    assert up_manifest == tags["reference_data_manifest"] != tags["data_manifest"]
    assert train["upsampler"].data.tags["admflow.upstream.shard_run_id"] == (
        by_name["shard 32px"].info.run_id)  # fmt: skip

    # follow the links: the samples' run shows their grid, the upsampler's training run and
    # the 32px shard run show the one data set name of those shards
    path = urllib.parse.quote("grid.png")
    dom = stack_client.dump_dom(f"{page(tags['sample_run_id'])}/artifacts/{path}")
    assert "grid.png" in dom
    (ds,) = {i.dataset.name for i in train["upsampler"].inputs.dataset_inputs}
    assert {i.dataset.name for i in by_name["shard 32px"].inputs.dataset_inputs} == {ds}
    dom = stack_client.dump_dom(page(train["upsampler"].info.run_id))
    assert ds in dom and by_name["shard 32px"].info.run_id in _links(dom)
    dom = stack_client.dump_dom(page(by_name["shard 32px"].info.run_id))
    assert ds in dom


@pytest.mark.browser
def test_prefect_ui_shows_the_flow_run_with_its_task_runs(reproduced, output_dir):
    """The stack's Prefect server serves its UI (the links Prefect prints lead somewhere): the
    reproduce flow run's page lists its task runs by name."""
    ui = reproduced["env"]["PREFECT_API_URL"].removesuffix("/api")
    flow_run = reproduced["first"]["id"]
    names = [n for n, _state in stack_client.task_runs(reproduced["env"], flow_run)]
    assert "train upsampler" in names, names
    shot = output_dir / "prefect-ui-flow-run.png"
    dom = stack_client.dump_dom(f"{ui}/runs/flow-run/{flow_run}?tab=Task+Runs", shot)
    assert shot.exists() and shot.stat().st_size > 10_000
    shown = [n for n in names if n in dom]
    assert {"train diffusion", "train classifier", "train upsampler"} <= set(shown), (
        names, dom[:3000])  # fmt: skip
