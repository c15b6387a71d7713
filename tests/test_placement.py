"""Placement: every stage's Ray requests come from one resource plan (tasks/resources.py),
proven on CPU machines with logical GPUs (Ray offers the GPUs a node is started with, CUDA or
not) while ``compute.device: cpu`` keeps torch on the CPU.

- The plan itself, without Ray: 1 GPU, 8 GPUs, 2 nodes x 4 GPUs, and every plan that cannot
  be placed, with its one-line message naming the field to change.
- Real runs at tiny sizes, one Ray start each: the reproduce flow on one node with 1 GPU
  (sampling and scoring share it; the paper flow's tests run on the suite's Ray session, which
  offers 1 GPU, with ``compute.use_gpu=true``), one node with 8 GPUs (8 sampling actors on 8 GPUs, training over its workers), and a
  2-node cluster of 4 GPUs each (8 training workers across both nodes, sampling, scoring);
  where every worker and actor ran (node id, the GPU ids Ray gave it) comes from Ray itself.
- The CLI's errors for an over-asking plan, a missing GPU, a missing CUDA device and a stale
  RAY_ADDRESS: one line, rc 2, in seconds (before this, each was a wait without end or a
  traceback).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from admflow.config import load_config
from tasks.resources import (
    Cluster,
    Node,
    PlacementError,
    capacity,
    probe_address,
    resource_plan,
)

REPO = Path(__file__).resolve().parent.parent


def plan_of(preset: str, cluster: Cluster, *overrides: str):
    return resource_plan(load_config(preset, list(overrides)), cluster)


def one_node(cpus: float, gpus: float, cuda: int = 0) -> Cluster:
    return Cluster((Node(cpus, gpus),), local=True, cuda_devices=cuda)


def two_nodes(cpus: float, gpus: float) -> Cluster:
    return Cluster((Node(cpus, gpus), Node(cpus, gpus)), local=False, address="10.0.0.1:6379")


def placed(plan) -> dict[str, tuple[int, float, float, int]]:
    return {p.stage: (p.workers, p.cpus, p.gpus, p.batch) for p in plan.stages}


# ----------------------------------------------------------------------------- the plan


def test_one_gpu_is_shared_by_the_actors_and_the_reference_goes_first():
    plan = plan_of("imagenet64", one_node(16, 1, cuda=1), "compute.num_workers=1")
    plan.check()
    got = placed(plan)
    assert got["train-diffusion"] == (1, 8.0, 1.0, 2048)  # the paper's global batch, one GPU
    assert got["reference"] == (4, 4.0, 0.25, 50)
    assert got["sample"] == (8, 2.0, 0.125, 64)
    assert got["score"] == (8, 2.0, 0.125, 50)
    assert got["judge"][0] == 0  # in the driver's process
    assert got["shard"] == (1, 1.0, 0.0, 0)  # compute.num_workers Ray tasks in flight
    assert plan.stage("score").ray_options() == {"num_cpus": 2.0, "num_gpus": 0.125}
    assert plan.stage("train-diffusion").backend == "nccl"
    # the training holds the only GPU for its whole length: the reference cannot go beside
    assert plan.reference_first


def test_eight_gpus_give_each_worker_and_actor_a_whole_gpu():
    plan = plan_of("imagenet64", one_node(128, 8, cuda=8))
    plan.check()
    got = placed(plan)
    assert got["train-diffusion"] == (8, 8.0, 1.0, 256)
    assert got["sample"] == (8, 8.0, 1.0, 64)
    assert got["score"] == (8, 8.0, 1.0, 50)
    assert plan.stage("train-diffusion").resources_per_worker() == {"CPU": 8.0, "GPU": 1.0}
    assert plan.reference_first  # 8 training workers hold all 8 GPUs


def test_two_nodes_of_four_gpus():
    plan = plan_of("imagenet64", two_nodes(32, 4))
    plan.check()
    assert placed(plan)["train-diffusion"] == (8, 8.0, 1.0, 256)
    assert capacity(plan.cluster.nodes, 8.0, 1.0) == 8
    # 12 actors on 8 GPUs: two to a GPU (a third of a GPU would leave 4 unplaced... no:
    # 1/ceil(12/8) = 0.5, so every GPU holds two and all 12 are placed at once)
    twelve = plan_of("imagenet64", two_nodes(32, 4), "sampling.workers=12").stage("sample")
    assert (twelve.gpus, twelve.cpus) == (0.5, 5.3333)
    assert capacity(plan.cluster.nodes, twelve.cpus, twelve.gpus) >= 12
    # CPUs are capped so the pool fits node by node, not only in total
    odd = Cluster((Node(3, 0), Node(3, 0)), local=True, cuda_devices=0)
    four = plan_of("tiny", odd, "compute.cpus_per_worker=2", "sampling.workers=4").stage("sample")
    assert four.cpus == 1.5 and capacity(odd.nodes, four.cpus, 0) == 4


def test_device_cpu_keeps_training_on_gloo_and_auto_without_cuda_is_cpu():
    logical = one_node(2, 8, cuda=0)
    over = ["compute.use_gpu=true", "compute.num_workers=8", "compute.cpus_per_worker=0.25"]
    for device in ("cpu", "auto"):
        plan = plan_of("tiny", logical, *over, f"compute.device={device}")
        plan.check()
        train = plan.stage("train-diffusion")
        assert (train.gpus, train.backend, train.device) == (1.0, "gloo", "cpu")


OVER_ASKING = [
    (
        one_node(16, 1, cuda=1),
        ["compute.use_gpu=true", "compute.num_workers=8"],
        "compute.num_workers=8 asks for 8 GPUs (one per Ray Train worker with "
        "compute.use_gpu=true), the local Ray has 1: set compute.num_workers=1",
    ),
    (
        one_node(16, 1, cuda=1),
        ["compute.use_gpu=true", "compute.num_workers=1", "compute.gpus_per_actor=1"],
        "sampling.workers=8 asks for 8 GPUs (compute.gpus_per_actor=1), the local Ray has 1: "
        "set sampling.workers=1 (or compute.gpus_per_actor=0.125)",
    ),
    (
        two_nodes(32, 4),
        ["compute.cpus_per_worker=16"],
        "compute.num_workers=8 x compute.cpus_per_worker=16 asks for 128 CPUs, the cluster at "
        "10.0.0.1:6379 has 64 (2 node(s), at most 32 each): set compute.cpus_per_worker=8",
    ),
    (
        one_node(16, 0),
        [],
        "compute.use_gpu=true but the local Ray has no GPU: set compute.use_gpu=false, or "
        "compute.local_gpus=N to reserve logical GPUs",
    ),
    (
        two_nodes(32, 0),
        [],
        "compute.use_gpu=true but the cluster at 10.0.0.1:6379 has no GPU: set "
        "compute.use_gpu=false",
    ),
    (
        one_node(16, 0),
        ["compute.use_gpu=false", "compute.device=cuda"],
        "compute.device=cuda but this machine has no CUDA device: set compute.device=cpu (or auto)",
    ),
]


@pytest.mark.parametrize(("cluster", "overrides", "message"), OVER_ASKING)
def test_a_plan_that_cannot_be_placed_is_one_line_naming_the_field(cluster, overrides, message):
    plan = plan_of("imagenet64", cluster, *overrides)
    with pytest.raises(PlacementError) as err:
        plan.check()
    assert str(err.value) == message
    field = message.split(": set ")[1].split()[0].rstrip(",")
    fixed = [*overrides, field]  # the field the message names, set as it says, places the plan
    if "=N" not in field and "use_gpu" not in field and "device" not in field:
        stage = "sample" if field.startswith("sampling") else "train-diffusion"
        plan_of("imagenet64", cluster, *fixed).check((stage,))


def test_each_stage_names_its_own_field():
    cluster = one_node(16, 1, cuda=1)
    plan = plan_of("imagenet64", cluster, "compute.num_workers=1", "compute.gpus_per_actor=1")
    with pytest.raises(PlacementError) as err:
        plan.check(("score",))
    assert str(err.value) == (
        "evaluation.workers=8 asks for 8 GPUs (compute.gpus_per_actor=1), the local Ray has 1: "
        "set evaluation.workers=1 (or compute.gpus_per_actor=0.125)"
    )
    with pytest.raises(PlacementError, match=r"^the reference's 4 actors ask for 4 GPUs .* set "
                       r"evaluation.workers=2 \(or compute.gpus_per_actor=0.25\)$"):  # fmt: skip
        plan.check(("reference",))
    plan.check(("train-diffusion", "judge"))  # the stages that fit pass alone


def test_a_dead_ray_address_is_one_line_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening
        start = time.perf_counter()
        with pytest.raises(PlacementError, match=rf"nothing answers at 127.0.0.1:{port}"):
            probe_address(f"127.0.0.1:{port}")
        assert time.perf_counter() - start < 5
    probe_address("auto")  # no port: left to Ray


def test_lines_show_every_stage():
    lines = plan_of("imagenet64", one_node(16, 1, cuda=1), "compute.num_workers=1").lines()
    assert lines[0] == "the local Ray: 1 node(s), 16 CPUs, 1 GPUs; torch device auto"
    stages = [line.split()[0] for line in lines[1:-1]]
    assert stages == ["shard", "train-diffusion", "train-classifier", "reference", "judge",
                      "sample", "score"]  # fmt: skip
    assert "0.125 GPU" in lines[6] and lines[-1].startswith("reference features run before")


def test_inception_device_is_resolved_where_it_runs_with_tf32_off(monkeypatch):
    """The driver hands the actors compute.device as asked ("auto"); each actor resolves it on
    its own node (a CPU-only head must not decide for GPU workers), and features are taken with
    TF32 off, then the process's switches are as they were."""
    import numpy as np
    import torch

    import tasks.scoring.features as fe

    made, flags = [], []

    class Probe:
        def features(self, images):
            flags.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return {"pool": np.zeros((len(images), 2048), np.float32)}

    class Recorded(fe.FeatureWorker):  # the real run(), an Inception stand-in that records
        def __init__(self, inception, batch_size, device, threads=0):
            made.append(device)
            self.model, self.batch_size = Probe(), batch_size

    monkeypatch.setattr(fe, "FeatureWorker", Recorded)
    monkeypatch.setattr(fe, "read_unit", lambda unit: np.zeros((3, 8, 8, 3), np.uint8))
    monkeypatch.setattr(fe, "read_unit_labels", lambda unit: None)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        cfg = load_config("tiny", ["compute.device=auto"])
        [(index, feats)] = list(fe.stream_features(cfg, [("npz", "x", 0, 3)], 0, None))
        after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert made == ["auto"] and feats["pool"].shape == (3, 2048)
    assert flags == [(False, False)] and after == (True, True)  # off while Inception ran only
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fe.resolve_device("auto") == "cuda" and fe.resolve_device("cpu") == "cpu"


# ------------------------------------------------------------------- real runs, logical GPUs

DRIVER = r"""
import json, logging, os, sys, time
from pathlib import Path

from tasks.training.callbacks import Callback


class Where(Callback):
    # each training worker records where Ray placed it and what it trains on (pickled by
    # value: this class lives in the driver's __main__)
    def __init__(self, out):
        self.out = out

    def on_step_start(self, trainer):
        import torch.distributed as dist
        from tasks.runtime.ray_session import placement

        rec = {"rank": trainer.session.rank, "device": str(trainer.device),
               "backend": dist.get_backend() if dist.is_initialized() else None, **placement()}
        Path(self.out, f"rank-{rec['rank']}.json").write_text(json.dumps(rec))


class Actors(logging.Handler):
    # the sampling pool and the Inception actors log where each actor runs
    def __init__(self):
        super().__init__(logging.INFO)
        self.seen = {}

    def emit(self, record):
        if record.msg == "sampling actors %s":
            self.seen.setdefault("sample", []).extend(record.args[0])
        elif record.msg == "%s: Inception actors %s":
            self.seen.setdefault(record.args[0], []).extend(record.args[1])


def main(args):
    import ray
    import torch

    from admflow.config import load_config
    from models.build import build_unet
    from tasks.runtime.ray_session import ensure_ray
    from tasks.sampling.build import build_spec
    from tasks.sampling.sample_set import sample_set
    from tasks.sampling.spec import ExecutionOptions
    from tasks.scoring.evaluate import evaluate_sets
    from tests.test_sample import save_checkpoint
    from tests.test_train import SMALL, build_shards

    root = Path(args["root"])
    overrides = [*SMALL, f"storage.root={root}", *args["overrides"]]
    cfg = load_config("tiny", overrides)
    handler = Actors()
    for name in ("tasks.sampling.pool", "tasks.scoring.features"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    ray = ensure_ray(cfg)
    if args.get("flow") == "reproduce":  # the whole pipeline, as `admflow reproduce` runs it
        from flows.reproduce import reproduce

        result = reproduce(preset="tiny", overrides=overrides)
        out = {"rows": [[r["stage"], r["classifier_scale"]] for r in result["rows"]]}
        out["resources"] = {k: v for k, v in ray.cluster_resources().items() if "node:" not in k}
        out["nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        out.update(handler.seen)
        print("PLACEMENT " + json.dumps(out), flush=True)
        return
    deadline = time.time() + 90
    while sum(n["Alive"] for n in ray.nodes()) < args["nodes"] and time.time() < deadline:
        time.sleep(1)
    out = {"nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]), "stages": []}
    out["resources"] = {k: v for k, v in ray.cluster_resources().items() if "node:" not in k}
    data = build_shards(str(root / "shards"), per_class=4, size=16)
    checkpoint = save_checkpoint(root / "random", "diffusion", cfg, build_unet(cfg.model))
    if args["train"]:
        from tasks.training.launch import train

        where = root / "where"
        where.mkdir()
        run = train("diffusion", cfg, data, "placement", callbacks=[Where(str(where))])
        out["train"] = [json.loads(p.read_text()) for p in sorted(where.glob("rank-*.json"))]
        out["stages"].append(f"train-diffusion step {run['step']}")
    spec = build_spec(cfg, checkpoint, scale=0.0)
    options = ExecutionOptions.from_config(cfg, progress=False)
    drawn = sample_set(cfg, spec, str(root / "samples"), options)
    out["stages"].append(f"sample {drawn['num_samples']} complete={drawn['complete']}")
    if args["score"]:
        metrics = evaluate_sets(cfg, data, str(root / "samples"), log_mlflow=False)
        out["stages"].append(f"score fid={metrics['fid']:.3f}")
    out.update(handler.seen)
    print("PLACEMENT " + json.dumps(out), flush=True)


main(json.loads(sys.argv[1]))
"""

# tiny sizes: 16 px, two DDIM steps, two images a shard, a few dozen real images
RUN = [
    "compute.device=cpu",
    "compute.use_gpu=true",
    "training.steps=2",
    "training.log_every=1",
    "training.checkpoint_every=2",
    "sampling.sampler=ddim",
    "sampling.timestep_respacing=ddim2",
    "sampling.shard_size=2",
    "sampling.batch_size=2",
    "evaluation.reference_images=40",
    "evaluation.batch_size=20",
]


def run_driver(tmp_path: Path, overrides: list[str], *, train: bool, score=True, nodes=1, env=None,
               flow=None):  # fmt: skip
    args = {"root": str(tmp_path), "overrides": [*RUN, *overrides], "train": train,
            "score": score, "nodes": nodes, "flow": flow}  # fmt: skip
    # as the CLI sets them: a flow called directly starts Prefect's ephemeral server too
    prefect = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": "", **prefect, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PLACEMENT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("PLACEMENT "))


# the whole reproduce pipeline at its smallest: every stage runs, on one logical GPU
PIPELINE = [
    "data.demo_images_per_class=4", "training.steps=2", "training.classifier_steps=2",
    "training.upsampler_steps=2", "training.checkpoint_steps=[]", "sampling.num_samples=4",
    "sampling.classifier_scales=[0.0, 4.0]", "sampling.upsample_respacing=ddim2",
    "evaluation.checkpoint_samples=0", "evaluation.reference_images=40",
]  # fmt: skip


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_gpu_node_runs_the_reproduce_flow_with_sampling_and_scoring_sharing_the_gpu(
    tmp_path,
):
    from tests.test_paper import _reference_batch

    ref = tmp_path / "reference.npz"  # a reference batch given: no judge to train (minutes)
    _reference_batch(ref, size=16)
    over = ["compute.local_gpus=1", "sampling.workers=2", "evaluation.workers=2", *PIPELINE,
            f"evaluation.reference={ref}"]  # fmt: skip
    got = run_driver(tmp_path, over, train=True, flow="reproduce")
    # the local Ray as the plan describes it: compute.local_gpus, the machine's CPUs, and an
    # object store with room for large weights (tasks.resources.local_object_store_bytes)
    from tasks.resources import local_object_store_bytes

    cfg = load_config("tiny", over)
    assert got["resources"]["GPU"] == 1.0
    assert got["resources"]["CPU"] == max(2, os.cpu_count() or 1)
    assert got["resources"]["object_store_memory"] == pytest.approx(
        local_object_store_bytes(cfg), rel=0.01
    )
    # every stage ended: both scales scored, the guided set also upsampled (8 -> 16 px here,
    # the base model's size, so there is no bilinear pair to score beside it)
    assert sorted(map(tuple, got["rows"])) == [("base", 0.0), ("base", 4.0), ("upsampler", 4.0)]
    # every actor on GPU 0 with torch on the CPU: sampling (both scales and the upsampling) and
    # scoring; a pool's actors all start before it takes work, so a pool of two shares the GPU
    assert len(got["sample"]) >= 2 and len(got["sample"]) % 2 == 0, got  # two per set
    assert len(got["score"]) >= 2, got
    for stage in ("sample", "score", "reference"):
        assert {(tuple(a["gpu_ids"]), a["device"]) for a in got.get(stage, [])} <= {(("0",), "cpu")}
    assert {a["node_id"] for a in got["sample"] + got["score"]} == set(got["nodes"])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eight_gpu_node_spreads_sampling_over_eight_actors_and_training_over_its_workers(
    tmp_path,
):
    over = ["compute.local_gpus=8", "compute.local_cpus=4", "compute.num_workers=2",
            "compute.cpus_per_worker=0.5", "sampling.workers=8", "sampling.num_samples=16"]  # fmt: skip
    got = run_driver(tmp_path, over, train=True, score=False)  # scoring: the other two runs
    assert got["stages"] == ["train-diffusion step 2", "sample 16 complete=True"]
    train = got["train"]
    assert [w["rank"] for w in train] == [0, 1]
    assert all((w["device"], w["backend"]) == ("cpu", "gloo") for w in train), train
    gpus = [g for w in train for g in w["gpu_ids"]]
    assert len(gpus) == 2 and len(set(gpus)) == 2  # one whole GPU each, not the same one
    sample_gpus = sorted(g for a in got["sample"] for g in a["gpu_ids"])
    assert sample_gpus == [str(i) for i in range(8)], got["sample"]  # one GPU per actor
    assert got["resources"]["GPU"] == 8.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """End a `ray start --block` and the Ray processes it started (its process group)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def two_node_cluster():
    """A Ray head and a second node on 127.0.0.1, 2 CPUs and 4 logical GPUs each, with their
    own temp dir (Ray's socket paths must stay short); stopped by PID."""
    import shutil
    import tempfile

    ray_bin = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="adm-pl-")
    port = _free_port()
    common = ["--num-cpus", "2", "--num-gpus", "4", "--node-ip-address", "127.0.0.1",
              "--temp-dir", temp, "--block", "--disable-usage-stats"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ""}
    procs: list[subprocess.Popen] = []

    def start(*argv: str) -> None:
        procs.append(subprocess.Popen(
            [ray_bin, "start", *argv, "--dashboard-agent-listen-port", str(_free_port()),
             *common], env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip

    try:
        start("--head", "--port", str(port), "--include-dashboard", "false",
              "--dashboard-port", str(_free_port()))  # fmt: skip
        deadline = time.time() + 90
        while True:
            try:
                probe_address(f"127.0.0.1:{port}", timeout=1)
                break
            except PlacementError:
                assert time.time() < deadline, "the Ray head did not open its port"
                time.sleep(1)
        start("--address", f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}"
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_nodes_of_four_gpus_train_sample_and_score(tmp_path, two_node_cluster):
    over = [f"compute.ray_address={two_node_cluster}", "compute.num_workers=8",
            "compute.cpus_per_worker=0.25", "sampling.workers=8", "sampling.num_samples=16",
            "evaluation.workers=2"]  # fmt: skip
    got = run_driver(tmp_path, over, train=True, nodes=2)
    assert len(got["nodes"]) == 2
    assert got["stages"][:2] == ["train-diffusion step 2", "sample 16 complete=True"]
    assert got["stages"][2].startswith("score fid=")
    train = got["train"]
    assert [w["rank"] for w in train] == list(range(8))
    assert all((w["device"], w["backend"]) == ("cpu", "gloo") for w in train), train
    for stage in (train, got["sample"]):
        # four on each node, each with a GPU of its own: 4 per node x 2 nodes, no GPU twice
        slots = sorted((w["node_id"], g) for w in stage for g in w["gpu_ids"])
        assert len(slots) == 8 and len(set(slots)) == 8, stage
        assert {n: sum(s[0] == n for s in slots) for n in got["nodes"]} == dict.fromkeys(
            got["nodes"], 4
        )
    assert {a["node_id"] for a in got["score"]} <= set(got["nodes"])


# ------------------------------------------------------------------- errors before a start

CLI_ERRORS = [
    (
        ["train", "diffusion", "--set", "compute.use_gpu=true", "--set", "compute.local_gpus=0"],
        {},
        "admflow train: compute.use_gpu=true but the local Ray has no GPU",
    ),
    (
        ["train", "diffusion", "--set", "compute.use_gpu=true", "--set", "compute.local_gpus=1",
         "--set", "compute.device=cpu", "--set", "compute.num_workers=2"],
        {},
        "admflow train: compute.num_workers=2 asks for 2 GPUs",
    ),
    (
        ["train", "diffusion", "--set", "compute.cpus_per_worker=64", "--set",
         "compute.local_cpus=4"],
        {},
        "admflow train: compute.num_workers=1 x compute.cpus_per_worker=64 asks for 64 CPUs",
    ),
    (
        ["reproduce", "--set", "compute.use_gpu=true", "--set", "compute.local_gpus=1",
         "--set", "compute.device=cpu", "--set", "compute.gpus_per_actor=1",
         "--set", "sampling.workers=1", "--set", "evaluation.workers=8"],
        {},
        "admflow reproduce: evaluation.workers=8 asks for 8 GPUs (compute.gpus_per_actor=1), the "
        "local Ray has 1: set evaluation.workers=1 (or compute.gpus_per_actor=0.125)",
    ),
    (
        ["train", "diffusion", "--set", "compute.device=cuda"],
        {},
        "admflow train: compute.device=cuda but this machine has no CUDA device",
    ),
    (
        ["train", "diffusion"],
        {"RAY_ADDRESS": "127.0.0.1:{port}"},
        "admflow train: compute.ray_address=127.0.0.1:{port} (default $RAY_ADDRESS): nothing "
        "answers at 127.0.0.1:{port}",
    ),
]  # fmt: skip


@pytest.mark.ray  # were the check gone, these would start Ray (in the test's namespace)
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("argv", "env", "message"), CLI_ERRORS)
def test_cli_refuses_an_impossible_placement_in_one_line(tmp_path, argv, env, message):
    port = _free_port()  # nothing listens there
    argv = [*argv, "--set", f"storage.root={tmp_path / 'store'}"]
    if argv[0] == "train":
        argv += ["--data", str(tmp_path / "data")]
    env = {**os.environ, "RAY_ADDRESS": "", **{k: v.format(port=port) for k, v in env.items()}}
    start = time.perf_counter()
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "admflow"), *argv],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(message.format(port=port)), lines[0]
    assert elapsed < 15, f"{elapsed:.1f} s to refuse: {lines[0]}"
