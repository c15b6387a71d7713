"""Sharded, resumable sampling on Ray: exact counts, byte-identical sets however they were
scheduled (1 or 2 actors, a killed actor, a stopped and rerun job), classifier guidance, the
two-stage upsampler, the merged .npz and S3 output.

The diffusion model and the upsampler are tiny networks with randomised weights (a fresh ADM
UNet outputs exactly zero, so labels, low-res inputs and weights would change no byte), their
EMA weights different from the raw ones; two DDIM steps keep the file fast (the bytes, not the
image quality, are under test).
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from admflow import storage
from admflow.config import load_config
from tasks.sampling import files as sample_io
from tasks.sampling.build import build_spec, build_upsample_spec
from tasks.sampling.pool import ACTOR_PREFIX
from tasks.sampling.sample_set import sample_set, upsample_set
from tasks.sampling.spec import ExecutionOptions
from tests.test_unet import randomize

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

STEPS = "ddim2"
N = 200
OVERRIDES = [
    # 32px base and classifier (the demo preset's base model is 16px under a 16->32 upsampler)
    "data.image_size=32",
    "model.image_size=32",
    "model.attention_resolutions=[16, 8]",
    "classifier.image_size=32",
    "classifier.attention_resolutions=[16, 8]",
    "sampling.sampler=ddim",  # STEPS is a DDIM respacing (the demo preset samples with DDPM)
    "sampling.shard_size=32",
    "sampling.batch_size=32",
    "sampling.use_ema=true",  # the released default (tiny samples raw weights)
    "compute.torch_threads=1",
]


def tiny(*extra: str):
    return load_config("tiny", OVERRIDES + list(extra))


def draw(
    cfg,
    checkpoint,
    out,
    *,
    classifier=None,
    classifier_scale=0.0,
    num_samples=None,
    steps=None,
    workers=None,
    max_shards=None,
    merge=False,
    progress=True,
    **sampling,
):
    """A base set: its spec from the config with ``sampling`` overrides (``steps`` is the
    respacing), drawn with the execution options given."""
    if steps is not None:
        sampling["timestep_respacing"] = steps
    spec = build_spec(
        cfg,
        checkpoint,
        classifier=classifier,
        scale=classifier_scale,
        num_samples=num_samples,
        sampling=sampling,
    )
    options = ExecutionOptions.from_config(
        cfg, workers=workers, max_shards=max_shards, progress=progress
    )
    return sample_set(cfg, spec, out, options, merge=merge)


def upsample(cfg, base, checkpoint, out, *, steps=None, workers=None, merge=False, progress=True):
    """The upsampler's set of ``base``, ``steps`` its respacing."""
    spec = build_upsample_spec(cfg, base, checkpoint, sampling={"upsample_respacing": steps})
    options = ExecutionOptions.from_config(cfg, workers=workers, progress=progress)
    return upsample_set(cfg, spec, base, out, options, merge=merge)  # fmt: skip


def randomized(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Small random weights everywhere; class embeddings N(0, 1) as nn.Embedding starts."""
    randomize(net, seed)
    if getattr(net, "label_emb", None) is not None:
        with torch.no_grad():
            net.label_emb.weight.normal_(generator=torch.Generator().manual_seed(seed))
    return net


def save_checkpoint(directory: Path, kind: str, cfg, net: torch.nn.Module, seed=None) -> str:
    """A checkpoint dir in the layout tasks/training/launch.py writes (model.pt, ema_<rate>.pt, meta.json).

    With ``seed``, model.pt and the EMA files hold different randomised weights."""
    directory.mkdir(parents=True)
    ema = net.state_dict()
    if seed is not None:
        ema = {k: v.clone() for k, v in randomized(net, seed + 1).state_dict().items()}
        randomized(net, seed)
    torch.save(net.state_dict(), directory / "model.pt")
    for rate in cfg.training.ema_rate:
        torch.save(ema, directory / f"ema_{rate}.pt")
    # a checkpoint past its EMA's horizon (tasks.sampling.weights samples younger ones raw)
    meta = {"step": 1000, "kind": kind, "config": cfg.model_dump(mode="json")}
    (directory / "meta.json").write_text(json.dumps(meta))
    return str(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from models.build import build_classifier, build_unet, build_upsampler

    root = tmp_path_factory.mktemp("ckpt")
    cfg = tiny()
    torch.manual_seed(0)
    out = {
        "diffusion": save_checkpoint(
            root / "diffusion", "diffusion", cfg, build_unet(cfg.model), seed=1
        ),
        "classifier": save_checkpoint(
            root / "classifier", "classifier", cfg, build_classifier(cfg.classifier)
        ),
        "upsampler": save_checkpoint(
            root / "upsampler", "upsampler", cfg, build_upsampler(cfg.upsampler), seed=3
        ),
    }
    cfg16 = tiny("model.image_size=16")
    out["diffusion16"] = save_checkpoint(
        root / "diffusion16", "diffusion", cfg16, build_unet(cfg16.model), seed=5
    )
    return out


def shard_hashes(out: str) -> list[tuple[int, int, str]]:
    manifest = sample_io.read_manifest(out)
    return [(s["index"], s["rows"], s["sha256"]) for s in manifest["shards"]]


@pytest.fixture(scope="module")
def reference(ray_session, checkpoints, tmp_path_factory):
    """N=200 images in shards of 32 sampled by a single actor."""
    out = str(tmp_path_factory.mktemp("samples") / "ref")
    result = draw(
        tiny(), checkpoints["diffusion"], out, num_samples=N, steps=STEPS, workers=1,
        merge=True, progress=False,
    )  # fmt: skip
    return out, result


def test_exact_count_labels_manifest_grid_and_merge(reference):
    out, result = reference
    assert result["complete"] and result["shards_sampled"] == 7 and result["shards_skipped"] == 0
    manifest = sample_io.read_manifest(out)
    assert manifest["format"] == "admflow-samples/1"
    assert manifest["num_samples"] == N and manifest["image_size"] == 32
    assert [s["index"] for s in manifest["shards"]] == list(range(7))
    assert [s["rows"] for s in manifest["shards"]] == [32] * 6 + [8]
    images = [sample_io.read_shard(out, i) for i in range(7)]
    all_images = np.concatenate([im for im, _ in images])
    all_labels = np.concatenate([lab for _, lab in images])
    assert all_images.shape == (N, 32, 32, 3) and all_images.dtype == np.uint8
    assert all_labels.shape == (N,) and all_labels.dtype == np.int64
    assert all_labels.min() >= 0 and all_labels.max() <= 9
    assert len(np.unique(all_labels)) == 10  # uniform labels over the 10 classes
    assert all_images.std() > 1.0  # real samples, not a constant image
    meta = storage.read_json(storage.join(out, "metadata.json"))
    assert meta["N"] == N and meta["sampler"] == "ddim" and meta["steps"] == STEPS
    assert meta["eta"] == 0.0 and meta["classifier_scale"] == 0.0 and meta["seed"] == 0
    ema_file = f"ema_{tiny().training.ema_rate[0]}.pt"
    assert meta["checkpoint"].endswith("diffusion") and meta["weights"].endswith(ema_file)
    from PIL import Image

    grid = Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "grid.png"))))
    assert grid.size == (8 * 96, 8 * 96)
    with np.load(result["merged"]) as z:
        assert z["arr_0"].shape == (N, 32, 32, 3)
        np.testing.assert_array_equal(z["arr_0"], all_images)
        np.testing.assert_array_equal(z["arr_1"], all_labels)


def test_two_actors_give_the_same_bytes(reference, checkpoints, tmp_path):
    out = str(tmp_path / "two")
    result = draw(
        tiny(), checkpoints["diffusion"], out, num_samples=N, steps=STEPS, workers=2,
        progress=False,
    )  # fmt: skip
    assert result["complete"] and result["workers"] == 2
    assert shard_hashes(out) == shard_hashes(reference[0])


def test_labels_and_the_ema_choice_change_the_bytes(ray_session, checkpoints, tmp_path):
    cfg = tiny("sampling.shard_size=8", "sampling.batch_size=8")
    kw = dict(num_samples=8, steps=STEPS, workers=1, progress=False)

    def images(name: str, **extra) -> np.ndarray:
        return _images(
            draw(cfg, checkpoints["diffusion"], str(tmp_path / name), **kw, **extra)["uri"]
        )

    ema3 = images("ema3", classes=[3], use_ema=True)
    np.testing.assert_array_equal(images("ema3-again", classes=[3], use_ema=True), ema3)
    # labels are drawn apart from the noise: only the class embedding differs here
    assert (images("ema5", classes=[5], use_ema=True) != ema3).mean() > 0.05
    raw3 = images("raw3", classes=[3], use_ema=False)
    assert (raw3 != ema3).mean() > 0.05
    meta = storage.read_json(storage.join(str(tmp_path / "raw3"), "metadata.json"))
    assert meta["weights"].endswith("model.pt")


def _kill_one_actor_when_running(ray, out: str, done: threading.Event) -> str | None:
    """Wait until some shard is finished while actors are busy, then kill one actor."""
    deadline = time.time() + 300
    while time.time() < deadline and not done.is_set():
        manifest = sample_io.read_manifest(out) if Path(out, "manifest.json").exists() else None
        ours = sorted(n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX))
        if manifest and manifest["shards"] and ours:
            ray.kill(ray.get_actor(ours[0]))
            return ours[0]
        time.sleep(0.05)
    return None


def test_killed_actor_shard_is_redone_with_same_bytes(reference, checkpoints, tmp_path):
    import ray

    out = str(tmp_path / "killed")
    result: dict = {}
    done = threading.Event()

    def run():
        try:
            result.update(
                draw(
                    tiny(),
                    checkpoints["diffusion"],
                    out,
                    num_samples=N,
                    steps=STEPS,
                    workers=2,
                    progress=False,
                )  # fmt: skip
            )
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    killed = _kill_one_actor_when_running(ray, out, done)
    thread.join(timeout=400)
    assert killed is not None, "the run ended before an actor could be killed"
    assert result["complete"] and result["actor_restarts"] >= 1
    assert shard_hashes(out) == shard_hashes(reference[0])


def test_stopped_and_rerun_job_resumes_with_same_bytes(reference, checkpoints, tmp_path):
    out = str(tmp_path / "resumed")
    cfg = tiny()
    first = draw(
        cfg, checkpoints["diffusion"], out, num_samples=N, steps=STEPS, workers=2, max_shards=3,
        progress=False,
    )  # fmt: skip
    assert not first["complete"] and first["shards"] == 3
    # A finished shard lost after the stop, another one corrupted: both are sampled again.
    Path(out, "shards", "samples-00001.npz").unlink()
    Path(out, "shards", "samples-00002.npz").write_bytes(b"garbage")
    second = draw(
        cfg, checkpoints["diffusion"], out, num_samples=N, steps=STEPS, workers=2, progress=False
    )
    assert second["complete"] and second["shards_skipped"] == 1 and second["shards_sampled"] == 6
    assert shard_hashes(out) == shard_hashes(reference[0])
    third = draw(
        cfg, checkpoints["diffusion"], out, num_samples=N, steps=STEPS, workers=2, progress=False
    )
    assert third["shards_sampled"] == 0 and third["shards_skipped"] == 7
    with pytest.raises(storage.StorageError, match="different sample set"):
        draw(cfg, checkpoints["diffusion"], out, num_samples=N, steps=STEPS, seed=1)


def _images(out: str) -> np.ndarray:
    manifest = sample_io.read_manifest(out)
    return np.concatenate([im for im, _ in sample_io.iter_shards(out, manifest)])


def _classifier_logp(ckpt: str, images: np.ndarray, result: dict) -> float:
    """Mean log p_phi(y | x_0) of the target labels under the (noisy) classifier at t = 0."""
    from models.build import build_classifier

    clf = build_classifier(tiny().classifier)
    ema_file = f"ema_{tiny().training.ema_rate[0]}.pt"
    clf.load_state_dict(torch.load(Path(ckpt, ema_file), weights_only=True))
    manifest = sample_io.read_manifest(result["uri"])
    labels = np.concatenate([lab for _, lab in sample_io.iter_shards(result["uri"], manifest)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        logp = torch.log_softmax(clf(x, torch.zeros(len(x), dtype=torch.long)), dim=-1)
    return float(logp[torch.arange(len(x)), torch.from_numpy(labels)].mean())


@pytest.mark.parametrize("sampler,steps", [("ddim", "ddim2"), ("ddpm", "2")])
def test_classifier_guidance(ray_session, checkpoints, tmp_path, sampler, steps):
    cfg = tiny("sampling.shard_size=8", "sampling.batch_size=8")
    kw = dict(num_samples=8, sampler=sampler, steps=steps, workers=1, progress=False)
    plain = draw(cfg, checkpoints["diffusion"], str(tmp_path / "plain"), **kw)
    zero = draw(
        cfg, checkpoints["diffusion"], str(tmp_path / "zero"),
        classifier=checkpoints["classifier"], classifier_scale=0.0, **kw,
    )  # fmt: skip
    guided = draw(
        cfg, checkpoints["diffusion"], str(tmp_path / "guided"),
        classifier=checkpoints["classifier"], classifier_scale=50.0, **kw,
    )  # fmt: skip
    a, b, c = (_images(r["uri"]) for r in (plain, zero, guided))
    np.testing.assert_array_equal(a, b)  # scale 0 through the guided path: exactly unguided
    changed = (a != c).mean()
    gain = _classifier_logp(checkpoints["classifier"], c, guided) - _classifier_logp(
        checkpoints["classifier"], a, plain
    )
    assert changed > 0.01  # guidance moved the samples
    assert gain > 0  # ... towards higher classifier log-likelihood of the target labels
    meta = storage.read_json(storage.join(guided["uri"], "metadata.json"))
    assert meta["classifier_scale"] == 50.0 and meta["classifier"] == checkpoints["classifier"]


def test_two_stage_upsampler(ray_session, checkpoints, tmp_path):
    cfg = tiny("model.image_size=16", "sampling.shard_size=16", "sampling.batch_size=16")
    base = draw(
        cfg, checkpoints["diffusion16"], str(tmp_path / "base"), num_samples=40, steps=STEPS,
        workers=2, progress=False,
    )  # fmt: skip
    assert sample_io.read_manifest(base["uri"])["image_size"] == 16
    up = upsample(
        cfg, base["uri"], checkpoints["upsampler"], str(tmp_path / "up"), steps=STEPS, workers=2,
        merge=True, progress=False,
    )  # fmt: skip
    assert up["complete"]
    manifest = sample_io.read_manifest(up["uri"])
    assert manifest["num_samples"] == 40 and manifest["image_size"] == 32
    assert [s["rows"] for s in manifest["shards"]] == [16, 16, 8]
    with np.load(up["merged"]) as z:
        assert z["arr_0"].shape == (40, 32, 32, 3)
        base_labels = np.concatenate(
            [
                lab
                for _, lab in sample_io.iter_shards(
                    base["uri"], sample_io.read_manifest(base["uri"])
                )
            ]
        )
        np.testing.assert_array_equal(z["arr_1"], base_labels)
    meta = storage.read_json(storage.join(up["uri"], "metadata.json"))
    assert meta["kind"] == "upsample" and meta["base"] == base["uri"] and meta["low_res_size"] == 16

    # Another base set with the same labels and seeds (raw weights instead of EMA): only the
    # low-res images differ, and so must the upsampled ones; the same base gives the same bytes.
    other = draw(
        cfg, checkpoints["diffusion16"], str(tmp_path / "other"), num_samples=16, steps=STEPS,
        workers=1, use_ema=False, progress=False,
    )  # fmt: skip
    assert (_images(other["uri"]) != _images(base["uri"])[:16]).mean() > 0.05
    kw = dict(steps=STEPS, workers=1, progress=False)
    a = _images(
        upsample(cfg, other["uri"], checkpoints["upsampler"], str(tmp_path / "a"), **kw)["uri"]
    )
    b = _images(
        upsample(cfg, other["uri"], checkpoints["upsampler"], str(tmp_path / "b"), **kw)["uri"]
    )
    np.testing.assert_array_equal(a, b)
    assert (a != _images(up["uri"])[:16]).mean() > 0.01  # ~3.5% of the bytes; 0 if ignored


def test_cli_sample_to_s3(reference, checkpoints, s3_bucket, capsys):
    from admflow.cli import main

    out = f"{s3_bucket}/samples/cli"
    argv = ["sample", "--config", "tiny", "--checkpoint", checkpoints["diffusion"], "--out", out]
    argv += ["--num-samples", "70", "--steps", STEPS, "--workers", "2", "--merge", "--no-progress"]
    for o in OVERRIDES:
        argv += ["--set", o]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["complete"] and printed["merged"].startswith("s3://")
    manifest = sample_io.read_manifest(out)
    assert [s["rows"] for s in manifest["shards"]] == [32, 32, 6]
    # Full shards do not depend on N: the same bytes as the local N=200 reference set.
    assert shard_hashes(out)[:2] == shard_hashes(reference[0])[:2]
    assert storage.exists(f"{out}/grid.png") and storage.exists(f"{out}/metadata.json")
    with np.load(io.BytesIO(storage.read_bytes(printed["merged"]))) as z:
        assert z["arr_0"].shape == (70, 32, 32, 3)
        np.testing.assert_array_equal(z["arr_0"][:64], _images(reference[0])[:64])


def test_mlflow_child_run_gets_metadata_and_grid(reference, tmp_path):
    import mlflow

    from admflow.tracking import setup_mlflow
    from tasks.sampling.finish import log_mlflow

    out = reference[0]
    cfg = tiny(f"storage.root={tmp_path}")
    setup_mlflow(cfg)
    parent = mlflow.MlflowClient().create_run(
        mlflow.get_experiment_by_name("admflow").experiment_id
    )
    meta = storage.read_json(storage.join(out, "metadata.json"))
    run_id = log_mlflow(cfg, out, meta, parent.info.run_id, "sample")
    run = mlflow.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params["set.N"] == str(N) and run.data.params["set.steps"] == STEPS
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id)]
    assert "grid.png" in artifacts
