"""Training: data order, checkpoints, resume equivalence, Ray Train jobs, MLflow.

Ray jobs run the tiny preset shrunk to 16x16 images (a step costs ~0.25 s per worker on one
core) on a small shard set built here from the demo renderer.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from admflow import storage
from admflow.config import load_config
from tasks.data.demo import CLASS_NAMES, render
from tasks.training import checkpoint as ckpt
from tasks.training.loop import LoopSpec, Trainer
from tasks.training.sessions import LocalSession
from tasks.training.stream import ShardStream, batch_positions
from tests.faults import FailOnce

SMALL = [
    "data.image_size=16",
    "model.image_size=16",
    "model.channel_mult=[1,2]",
    "model.attention_resolutions=[8]",
    "classifier.image_size=16",
    "classifier.channel_mult=[1,2]",
    "classifier.attention_resolutions=[8]",
    "upsampler.small_size=8",
    "upsampler.unet.image_size=16",
    "upsampler.unet.attention_resolutions=[8]",
    "training.batch_size=16",
    # the short runs these tests make, independent of the demo preset's long one
    "training.lr=0.0005",
    "training.ema_rate=[0.999]",
    "training.log_every=10",
    "training.checkpoint_every=100",
    "training.checkpoint_steps=[]",
    "training.classifier_random_crop=true",  # the paper's augmentation (tiny turns it off)
    "compute.diffusion_threads=null",
]

PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [128, 128, 128],
        [250, 250, 250],
    ]
)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def build_shards(dest: str, per_class: int, size: int = 16, shard_rows: int = 100, easy=False):
    """A shard set in the format of docs/ARCHITECTURE.md: demo shapes, or (easy) class-coloured fields."""
    rng = np.random.default_rng(0)
    rows = []
    for c in range(10):
        for i in range(per_class):
            if easy:
                base = PALETTE[c] * rng.uniform(0.7, 1.0)
                img = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            else:
                img = render(c, i, size)
            rows.append((_png(img), c, f"{CLASS_NAMES[c]}/{i:05d}"))
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    shards = []
    for k, lo in enumerate(range(0, len(rows), shard_rows)):
        chunk = rows[lo : lo + shard_rows]
        table = pa.table(
            {
                "image": pa.array([r[0] for r in chunk], pa.binary()),
                "label": pa.array([r[1] for r in chunk], pa.int64()),
                "key": [r[2] for r in chunk],
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        name = f"shard-{k:05d}.parquet"
        storage.write_bytes(storage.join(dest, "shards", name), buf.getvalue())
        shards.append(
            {"name": name, "rows": len(chunk), "sha256": storage.sha256_bytes(buf.getvalue())}
        )
    storage.write_json(
        storage.join(dest, "manifest.json"),
        {
            "format": "admflow-shards/1",
            "image_size": size,
            "num_images": len(rows),
            "num_classes": 10,
            "class_names": list(CLASS_NAMES),
            "counts_per_class": {n: per_class for n in CLASS_NAMES},
            "preprocessing": {},
            "source": {"uri": "test", "kind": "demo", "fingerprint": "test"},
            "shards": shards,
            "skipped": [],
        },
    )
    return dest


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process loops use one thread: on a shared 2-core box, 2 OpenMP threads per process
    oversubscribe and spin (10x slower); Ray workers use compute.torch_threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return build_shards(str(tmp_path_factory.mktemp("shards")), per_class=40)


def small_cfg(root, *overrides):
    return load_config("tiny", [*SMALL, f"storage.root={root}", *overrides])


def local_run(cfg, kind, data, run_name, before_run=None, fail_at_step=None):
    """One in-process run; ``fail_at_step``: a worker fault there (tests.faults.FailOnce)."""
    spec = LoopSpec(
        kind=kind,
        config=cfg.model_dump(mode="json"),
        data_uri=data,
        run_uri=storage.join(cfg.storage.root, "runs", run_name),
        run_name=run_name,
    )
    session = LocalSession()
    trainer = Trainer(spec, session, [] if fail_at_step is None else [FailOnce(fail_at_step)])
    if before_run is not None:
        before_run(trainer)
    trainer.run()
    return trainer, session.reports


def assert_same_params(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- no Ray


def test_data_order_is_a_function_of_seed_and_step(shards):
    s1 = ShardStream(shards, seed=3, window_shards=2)
    s2 = ShardStream(shards, seed=3, window_shards=2)
    n = s1.num_rows
    # one epoch visits every row once; the next epoch is another permutation
    first = [row for _, row in s1.rows_at(np.arange(n))]
    second = [row for _, row in s1.rows_at(np.arange(n, 2 * n))]
    assert sorted(first) == list(range(n)) == sorted(second) and first != second
    # a fresh reader seeking straight to step 7 (rank 1 of 2) sees the same images
    pos = batch_positions(7, 16, rank=1, world_size=2)
    assert pos.tolist() == list(range(7 * 16 + 8, 8 * 16))
    x1, y1 = s1.read(pos)
    x2, y2 = s2.read(pos)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(ShardStream(shards, seed=4).read(pos)[1], y1)
    # the held-out split is disjoint from what training reads
    train = ShardStream(shards, seed=3, holdout_every=10)
    held = set(ShardStream(shards, seed=3, holdout_every=10, split="holdout").holdout_rows())
    assert len(held) == n // 10
    assert held.isdisjoint(row for _, row in train.rows_at(np.arange(train.num_rows)))


def test_checkpoint_listing_ignores_incomplete(tmp_path):
    run = str(tmp_path / "run")
    sd = {"w": torch.arange(3.0)}
    for step in (10, 20):
        ckpt.write_checkpoint(
            storage.join(ckpt.checkpoints_uri(run), ckpt.step_dirname(step)),
            model=sd,
            emas={0.9: sd},
            state={"step": step},
            meta={"step": step, "kind": "diffusion", "ema_rates": [0.9]},
        )
    partial = Path(ckpt.checkpoints_uri(run), ckpt.step_dirname(30))
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"half")  # a writer died before meta.json
    assert [c["step"] for c in ckpt.list_checkpoints(run)] == [10, 20]
    assert ckpt.latest_checkpoint(run).endswith("step-000020")
    assert torch.equal(ckpt.load_ema(ckpt.latest_checkpoint(run))["w"], sd["w"])


def test_resume_is_bit_identical_locally(shards, tmp_path):
    """Importance sampling, microbatches and EMA on: fail at step 3, resume from step 2,
    end at step 4 exactly where an uninterrupted run ends."""
    over = [
        "training.steps=4",
        "training.checkpoint_every=2",
        "training.log_every=2",
        "training.batch_size=8",
        "training.microbatch=4",
        "diffusion.schedule_sampler=loss-second-moment",
    ]
    cfg = small_cfg(tmp_path, *over)
    whole, _ = local_run(cfg, "diffusion", shards, "whole")
    with pytest.raises(RuntimeError, match="injected fault at step 3"):
        local_run(cfg, "diffusion", shards, "cut", fail_at_step=3)
    resumed, _ = local_run(cfg, "diffusion", shards, "cut")
    assert resumed.start_step == 2 and resumed.step == 4
    assert_same_params(whole.module.state_dict(), resumed.module.state_dict())
    assert_same_params(
        whole.ema.state_dict()["shadow"]["0.999"], resumed.ema.state_dict()["shadow"]["0.999"]
    )
    np.testing.assert_array_equal(whole.sampler._loss_history, resumed.sampler._loss_history)


def test_keeps_the_last_k_checkpoints_and_every_scored_one(shards, tmp_path):
    """training.keep_checkpoints=2: older checkpoints go unless the periodic evaluation has
    scored them; each is written once, straight into checkpoints/ (no temporary copies)."""
    over = ["training.checkpoint_every=1", "training.log_every=1", "training.keep_checkpoints=2"]
    first, _ = local_run(small_cfg(tmp_path, *over, "training.steps=3"), "diffusion", shards, "k")
    run = first.spec.run_uri
    assert [c["step"] for c in ckpt.list_checkpoints(run)] == [2, 3]
    storage.write_json(storage.join(ckpt.evaluations_uri(run), "step-000002.json"), {"fid": 1.0})
    local_run(small_cfg(tmp_path, *over, "training.steps=6"), "diffusion", shards, "k")
    assert [c["step"] for c in ckpt.list_checkpoints(run)] == [2, 5, 6]  # 2 was scored
    assert sorted(os.listdir(ckpt.checkpoints_uri(run))) == [
        "step-000002",
        "step-000005",
        "step-000006",
    ]
    files = sorted(os.listdir(storage.join(ckpt.checkpoints_uri(run), "step-000006")))
    emas = [ckpt.ema_filename(r) for r in first.job.ema_rates]
    assert files == sorted([*emas, "meta.json", "model.pt", "state.pt"])


def test_nonfinite_loss_stops_with_the_step_and_keeps_last_checkpoint(
    shards, tmp_path, monkeypatch
):
    cfg = small_cfg(
        tmp_path, "training.steps=6", "training.checkpoint_every=2", "training.log_every=2"
    )
    from models.training_losses import HybridDiffusionLoss

    real = HybridDiffusionLoss.__call__

    def poisoned(self, net, batch, generator):
        out = real(self, net, batch, generator)
        if trainer_ref and trainer_ref[0].step == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    trainer_ref: list = []
    monkeypatch.setattr(HybridDiffusionLoss, "__call__", poisoned)
    spec = LoopSpec(
        "diffusion", cfg.model_dump(mode="json"), shards, str(tmp_path / "runs/nan"), "nan"
    )
    session = LocalSession()
    trainer = Trainer(spec, session)
    trainer_ref.append(trainer)
    metrics = trainer.run()
    assert "non-finite loss at step 3" in metrics["error"]
    assert trainer.step == 3
    found = ckpt.list_checkpoints(spec.run_uri)
    assert [c["step"] for c in found] == [2]
    saved = ckpt.load_tensors(storage.join(found[-1]["uri"], ckpt.MODEL))
    assert all(torch.isfinite(v).all() for v in saved.values())


# ----------------------------------------------------------------------------- Ray Train

RAY_FAST = ["training.log_every=10", "compute.num_workers=2", "compute.cpus_per_worker=1"]


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    hist = mlflow.MlflowClient().get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)


def final_model(out: dict) -> dict:
    return ckpt.load_tensors(storage.join(out["checkpoint"], ckpt.MODEL))


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_diffusion_loss_falls_then_resume_continues(ray_session, shards, tmp_path):
    from tasks.training.launch import train_diffusion

    cfg = small_cfg(tmp_path, *RAY_FAST, "training.steps=120", "training.checkpoint_every=60")
    out = train_diffusion(cfg, shards, "diff")
    assert out["step"] == 120
    assert [c.rsplit("/", 1)[-1] for c in out["checkpoints"]] == ["step-000060", "step-000120"]
    # written once, where the other stages read it: Ray keeps no copies of its own
    assert not [n for n in os.listdir(out["run_uri"]) if n.startswith("checkpoint-")]
    loss = metric_history(out["mlflow_run_id"], "loss")
    assert loss[0][0] == 10 and loss[-1][0] == 120
    first, last = loss[0][1], np.mean([v for _, v in loss[-3:]])
    assert first > 0.8 and last < 0.6 * first, loss
    for q in range(4):
        assert metric_history(out["mlflow_run_id"], f"mse_q{q}")
    meta = ckpt.read_meta(out["checkpoint"])
    assert meta["kind"] == "diffusion" and meta["step"] == 120
    assert storage.exists(storage.join(out["checkpoint"], "ema_0.999.pt"))

    # the same run name continues from step 120 when asked for more steps
    more = train_diffusion(
        load_config(
            "tiny",
            [
                *SMALL,
                f"storage.root={tmp_path}",
                *RAY_FAST,
                "training.steps=140",
                "training.checkpoint_every=60",
            ],
        ),
        shards,
        "diff",
    )
    assert more["step"] == 140
    assert metric_history(more["mlflow_run_id"], "loss")[0][0] == 130
    assert more["checkpoints"][-1].endswith("step-000140")


@pytest.fixture(scope="module")
def easy_shards(tmp_path_factory) -> str:
    return build_shards(str(tmp_path_factory.mktemp("easy")), per_class=40, easy=True)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_classifier_beats_chance_on_lightly_noised_holdout(ray_session, easy_shards, tmp_path):
    from tasks.training.launch import train_classifier

    cfg = small_cfg(
        tmp_path,
        *RAY_FAST,
        "training.classifier_steps=80",
        "training.checkpoint_every=80",
        "training.batch_size=32",
        "training.classifier_lr=0.002",
    )
    out = train_classifier(cfg, easy_shards, "clf")
    m = out["metrics"]
    assert out["step"] == 80
    # 10 classes: chance is 0.1 top-1 and 0.5 top-5; quartile 0 is t < T/4
    assert m["holdout_top1_q0"] > 0.6, m
    assert m["holdout_top5"] >= m["holdout_top1"]
    lr = metric_history(out["mlflow_run_id"], "lr")
    assert lr[0][1] > lr[-1][1]  # linear annealing


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_upsampler_trains(ray_session, shards, tmp_path):
    from tasks.training.launch import train_upsampler

    cfg = small_cfg(
        tmp_path, *RAY_FAST, "training.upsampler_steps=40", "training.checkpoint_every=40"
    )
    out = train_upsampler(cfg, shards, "up")
    loss = metric_history(out["mlflow_run_id"], "loss")
    assert loss[-1][1] < 0.8 * loss[0][1], loss
    sd = final_model(out)
    assert sd["input_blocks.0.0.weight"].shape[1] == 6  # x_t and the upsampled low-res image


EQUIV = [
    *RAY_FAST,
    "training.steps=24",
    "training.checkpoint_every=8",
    "training.log_every=4",
    "training.microbatch=4",
    "diffusion.schedule_sampler=loss-second-moment",
]


@pytest.fixture(scope="module")
def reference_run(ray_session, shards, tmp_path_factory):
    """An uninterrupted 2-worker run that the interrupted runs must reproduce exactly."""
    from tasks.training.launch import train_diffusion

    cfg = small_cfg(tmp_path_factory.mktemp("ref"), *EQUIV)
    return train_diffusion(cfg, shards, "reference")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _train_workers() -> list[int]:
    """PIDs of this session's Ray Train workers (descendants of this process only)."""
    found = []
    for pid in _descendants(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::RayTrainWorker"):
            found.append(pid)
    return found


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_failed_and_a_killed_worker_resume_to_the_uninterrupted_result(
    reference_run, shards, tmp_path
):
    """Both faults Ray Train recovers from, in one run: rank 1 raises at step 13, and a worker
    is SIGKILLed once the step-8 checkpoint is written. Each time Ray restarts the group from
    the last checkpoint, and the run ends where the uninterrupted one did, bit for bit."""
    from tasks.training.launch import train_diffusion

    cfg = small_cfg(tmp_path, *EQUIV)
    result: dict = {}

    def run():
        try:
            result["out"] = train_diffusion(
                cfg, shards, "faults", callbacks=[FailOnce(13)], max_failures=3
            )
        except BaseException as e:  # surfaced by the assertion below
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    run_uri = storage.join(str(tmp_path), "runs", "faults")
    deadline = time.time() + 300
    while not ckpt.list_checkpoints(run_uri) and time.time() < deadline and thread.is_alive():
        time.sleep(0.2)
    workers = set(_train_workers())
    assert workers, "no Ray Train worker found to kill"
    os.kill(max(workers), signal.SIGKILL)
    started = set()  # Ray Train workers that appear after the kill: a restarted group
    deadline = time.time() + 400
    while thread.is_alive() and not started and time.time() < deadline:
        started = set(_train_workers()) - workers
        time.sleep(0.05)
    thread.join(timeout=400)
    assert not thread.is_alive()
    assert started, "the run ended without restarting a worker"
    assert "error" not in result, result.get("error")
    out = result["out"]
    assert storage.exists(storage.join(out["run_uri"], "_fault-injected-13"))
    assert out["step"] == 24
    # the restored runs recomputed the lost steps exactly
    assert_same_params(final_model(reference_run), final_model(out))
    ema = "ema_0.999.pt"
    assert_same_params(
        ckpt.load_tensors(storage.join(reference_run["checkpoint"], ema)),
        ckpt.load_tensors(storage.join(out["checkpoint"], ema)),
    )
    a = ckpt.load_tensors(storage.join(reference_run["checkpoint"], ckpt.STATE))
    b = ckpt.load_tensors(storage.join(out["checkpoint"], ckpt.STATE))
    assert torch.equal(a["sampler"]["loss_history"], b["sampler"]["loss_history"])


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.services
@pytest.mark.timeout(600)
def test_mlflow_server_and_s3_storage(ray_session, s3_server, tmp_path):
    """Shards, checkpoints and MLflow artifacts all in S3 (moto); tracking via `mlflow server`."""
    import mlflow
    import s3fs

    from infra.stack import MLFLOW_SERVER_ENV, mlflow_server_argv
    from tasks.training.launch import train_classifier
    from tests.conftest import free_port, stop_process, wait_for_port

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    for bucket in ("train-store", "train-mlflow"):
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    data = build_shards("s3://train-store/data", per_class=10, easy=True)
    port = free_port()
    argv = mlflow_server_argv(
        port, f"sqlite:///{tmp_path}/mlflow.db", "s3://train-mlflow/artifacts"
    )
    server = subprocess.Popen(
        argv,
        env={**os.environ, **MLFLOW_SERVER_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_server},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, server, timeout=120)
        uri = f"http://127.0.0.1:{port}"
        cfg = small_cfg(
            "s3://train-store/root",
            *RAY_FAST,
            f"tracking.tracking_uri={uri}",
            "training.classifier_steps=10",
            "training.checkpoint_every=5",
            "training.log_every=5",
            "training.keep_checkpoints=1",
        )
        local_copies = set(Path(tempfile.gettempdir()).glob("admflow-ckpt-*"))
        out = train_classifier(cfg, data, "clf-s3")
        client = mlflow.MlflowClient(uri)
        run = client.get_run(out["mlflow_run_id"])
        assert run.data.params["training.classifier_steps"] == "10"
        assert run.data.params["classifier.width"] == "32"
        for key in (
            "loss",
            "loss_q0",
            "top1",
            "holdout_top1_q0",
            "lr",
            "grad_norm",
            "images_per_s",
        ):
            assert key in run.data.metrics, key
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [5, 10]
        (inp,) = run.inputs.dataset_inputs
        assert "s3://train-store/data" in inp.dataset.source
        assert [t.value for t in inp.tags if t.key == "mlflow.data.context"] == ["training"]
        assert out["checkpoint"] == "s3://train-store/root/runs/clf-s3/checkpoints/step-000010"
        assert run.data.tags["checkpoint.final"] == out["checkpoint"]
        assert run.data.tags["checkpoint.step-000005"].endswith("step-000005")
        assert fs.exists("train-store/root/runs/clf-s3/checkpoints/step-000010/meta.json")
        # written once: no Ray copies beside it, the local copy gone after the background
        # upload, and step 5 pruned (keep_checkpoints=1, never scored)
        run_dir = fs.ls("train-store/root/runs/clf-s3")
        assert not [p for p in run_dir if p.rsplit("/", 1)[-1].startswith("checkpoint-")]
        assert set(Path(tempfile.gettempdir()).glob("admflow-ckpt-*")) == local_copies
        assert fs.ls("train-store/root/runs/clf-s3/checkpoints") == [
            "train-store/root/runs/clf-s3/checkpoints/step-000010"
        ]
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
        assert arts == {"checkpoint/model.pt"}
        model = mlflow.pytorch.load_model(out["model_uri"])
        assert sum(p.numel() for p in model.parameters()) > 0
        assert fs.ls("train-mlflow/artifacts")  # artifacts went through the server to S3
    finally:
        stop_process(server)


@pytest.mark.slow
def test_bf16_loss_curve_tracks_fp32(shards, tmp_path):
    """Same data, timesteps and noise (seeded by step): bf16 autocast + channels_last only
    adds rounding noise to the first 60 steps' loss curve."""
    curves = {}
    seen: dict[str, set] = {"no": set(), "bf16": set()}

    def record(mode):
        def hook(module, inputs, output):
            cl = output.is_contiguous(memory_format=torch.channels_last) and output.shape[1] > 1
            seen[mode].add((output.dtype, cl))

        # the first conv and a residual block's conv of the UNet under training
        return lambda trainer: [
            m.register_forward_hook(hook)
            for m in (
                trainer.module.input_blocks[0][0],
                trainer.module.input_blocks[1][0].in_layers[2],
            )
        ]

    for mode in ("no", "bf16"):
        cfg = small_cfg(
            tmp_path / mode,
            "training.steps=60",
            "training.batch_size=8",
            "training.log_every=20",
            "training.checkpoint_every=60",
            f"training.mixed_precision='{mode}'",
            f"training.channels_last={mode == 'bf16'}",
        )
        _, reports = local_run(cfg, "diffusion", shards, mode, before_run=record(mode))
        curves[mode] = np.array([r["loss"] for r in reports])
    # the bf16 run really computed in bfloat16, channels_last; the reference in fp32, NCHW
    assert seen == {"no": {(torch.float32, False)}, "bf16": {(torch.bfloat16, True)}}, seen
    fp32, bf16 = curves["no"], curves["bf16"]
    assert len(fp32) == 3 and fp32[-1] < 0.75 * fp32[0]  # it learned
    np.testing.assert_allclose(bf16, fp32, rtol=0.1)  # 20-step means agree within 10%
