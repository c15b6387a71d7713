"""A sample set's identity is its spec's fingerprint: what changes a pixel makes a new set,
how the set is produced (workers, threads, device, compile) reuses it, and the reproduce,
sample and paper flows give the same set the same key. No Ray, no Prefect, no networks:
checkpoints here are small state dicts, hashed but never loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from admflow import storage
from admflow.config import load_config
from admflow.paper import load_rows
from tasks import plan
from tasks.sampling import build
from tasks.sampling import files as sample_io
from tasks.sampling.build import build_spec, build_upsample_spec
from tasks.sampling.manifest import open_manifest
from tasks.sampling.spec import ExecutionOptions, default_scale, sampler_spec


def _checkpoint(directory: Path, cfg, kind: str, value: float) -> str:
    """Our checkpoint layout (model.pt, ema_<rate>.pt, meta.json) with distinct raw and EMA
    bytes; ``value`` makes another checkpoint."""
    directory.mkdir(parents=True)
    torch.save({"w": torch.full((2,), value)}, directory / "model.pt")
    for rate in cfg.training.ema_rate:
        torch.save({"w": torch.full((2,), value + 0.5)}, directory / f"ema_{rate}.pt")
    meta = {"step": 10_000, "kind": kind, "config": cfg.model_dump(mode="json")}
    (directory / "meta.json").write_text(json.dumps(meta))
    return str(directory)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    cfg = load_config("tiny", ["sampling.use_ema=true"])
    free = load_config("tiny", ["model.null_class=true"])
    return {
        "diffusion": _checkpoint(root / "diffusion", cfg, "diffusion", 1.0),
        "other": _checkpoint(root / "other", cfg, "diffusion", 2.0),
        "classifier": _checkpoint(root / "classifier", cfg, "classifier", 3.0),
        "classifier2": _checkpoint(root / "classifier2", cfg, "classifier", 4.0),
        "free": _checkpoint(root / "free", free, "diffusion", 5.0),
        "upsampler": _checkpoint(root / "upsampler", cfg, "upsampler", 6.0),
    }


def _fp(ckpts, *overrides: str, checkpoint="diffusion", classifier=None, scale=0.0, **kw):
    cfg = load_config("tiny", ["sampling.use_ema=true", *overrides])
    clf = ckpts[classifier] if classifier else None
    return build_spec(cfg, ckpts[checkpoint], classifier=clf, scale=scale, **kw).fingerprint()


@pytest.mark.parametrize(
    "override",
    [
        "sampling.workers=7",
        "compute.torch_threads=3",
        "compute.device=cpu",
        "sampling.compile=true",
        "sampling.classifier_scales=[0.0, 2.0, 9.0]",  # the sweep, not this set
        "sampling.upsample_sets=all",
        "sampling.batch_size=64",  # a micro-batch larger than a shard is the whole shard
        "sampling.batch_size=8",  # the micro-batch bounds a network call, never the noise
        "evaluation.workers=5",
    ],
)
def test_execution_settings_reuse_the_set(ckpts, override):
    assert _fp(ckpts, override) == _fp(ckpts)


def test_execution_options_come_from_the_config_and_reach_only_the_actors(ckpts):
    cfg = load_config("tiny", ["sampling.workers=3", "compute.device=cpu"])
    options = ExecutionOptions.from_config(cfg, max_shards=2, progress=None)
    assert (options.workers, options.device, options.max_shards, options.progress) == (
        3, "cpu", 2, True,
    )  # fmt: skip
    spec = build_spec(cfg, ckpts["diffusion"])
    actor = sampler_spec(spec, options)
    assert actor.device == "cpu" and actor.batch_size == min(
        cfg.sampling.batch_size, spec.shard_size
    )


@pytest.mark.parametrize(
    "override",
    [
        "sampling.sampler=ddim",
        "sampling.timestep_respacing=ddim10",
        "sampling.eta=0.5",
        "sampling.seed=1",
        "sampling.classes=[3]",
        "sampling.num_samples=60",
        "sampling.shard_size=16",
        "sampling.use_ema=false",  # other weights
        "sampling.clip_denoised=false",
    ],
)
def test_each_pixel_setting_makes_a_new_set(ckpts, override):
    assert _fp(ckpts, override) != _fp(ckpts)


def test_solver_settings_make_new_sets(ckpts):
    unipc = ["sampling.sampler=unipc", "sampling.timestep_respacing=''"]
    base = _fp(ckpts, *unipc)
    assert _fp(ckpts, *unipc, "sampling.solver_steps=10") != base
    assert _fp(ckpts, *unipc, "sampling.step_schedule=logsnr") != base


def test_network_sections_of_a_released_checkpoint_are_identity(tmp_path):
    # A released .pt has no config of its own: the preset's sections build its network.
    pt = tmp_path / "released.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    fps = {
        o: build_spec(load_config("tiny", [o] if o else []), str(pt)).fingerprint()
        for o in ("", "model.model_channels=64", "diffusion.noise_schedule=linear")
    }
    assert len(set(fps.values())) == 3


def test_weights_guidance_and_code_make_new_sets(ckpts, monkeypatch):
    plain = _fp(ckpts)
    assert _fp(ckpts, checkpoint="other") != plain  # other weights bytes
    guided = _fp(ckpts, classifier="classifier", scale=1.0)
    assert guided != plain
    assert _fp(ckpts, classifier="classifier", scale=2.0) != guided  # the scale
    assert _fp(ckpts, classifier="classifier2", scale=1.0) != guided  # the classifier's bytes
    # scale 0 with a classifier draws exactly the unguided set: the same identity
    assert _fp(ckpts, classifier="classifier", scale=0.0) == plain
    free = ["model.null_class=true", "sampling.guidance=free"]
    w1 = _fp(ckpts, *free, "sampling.cfg_scale=1.0", checkpoint="free")
    assert w1 != _fp(ckpts, *free, "sampling.cfg_scale=2.0", checkpoint="free")
    monkeypatch.setattr(build, "code_version", lambda: "9.9.9+models.other")
    assert _fp(ckpts) != plain  # another version of the code: a new set


def test_where_the_weights_are_read_from_is_not_identity(ckpts, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ckpts["diffusion"], copy)
    cfg = load_config("tiny", ["sampling.use_ema=true"])
    assert build_spec(cfg, str(copy)).fingerprint() == _fp(ckpts)


def _base_set(out: Path, fingerprint: str, n: int = 8) -> str:
    manifest = sample_io.new_manifest(n, 16, 32, fingerprint)
    manifest["complete"] = True
    sample_io.write_manifest(str(out), manifest)
    return str(out)


def test_an_upsampled_set_is_named_by_its_base_and_its_own_settings(ckpts, tmp_path):
    cfg = load_config("tiny")
    a = _base_set(tmp_path / "a", "base-a")
    b = _base_set(tmp_path / "b", "base-b")
    fp = build_upsample_spec(cfg, a, ckpts["upsampler"]).fingerprint()
    assert build_upsample_spec(cfg, b, ckpts["upsampler"]).fingerprint() != fp
    other = {"upsample_respacing": "ddim7"}
    assert build_upsample_spec(cfg, a, ckpts["upsampler"], sampling=other).fingerprint() != fp
    workers = load_config("tiny", ["sampling.workers=9"])
    assert build_upsample_spec(workers, a, ckpts["upsampler"]).fingerprint() == fp


def test_a_set_with_another_fingerprint_is_refused(ckpts, tmp_path):
    spec = build_spec(load_config("tiny"), ckpts["diffusion"])
    out = str(tmp_path / "set")
    sample_io.write_manifest(out, sample_io.new_manifest(200, 16, 32, "an-older-set"))
    with pytest.raises(storage.StorageError, match="already holds a different sample set"):
        open_manifest(out, spec)
    out2 = str(tmp_path / "same")
    sample_io.write_manifest(out2, sample_io.new_manifest(200, 16, 32, spec.fingerprint()))
    assert open_manifest(out2, spec)["fingerprint"] == spec.fingerprint()


def test_the_default_scale_is_decided_once():
    assert default_scale([0.0, 1.0, 4.0], has_classifier=True) == 1.0
    assert default_scale([0.0, 1.0], has_classifier=False) == 0.0
    assert default_scale([0.0], has_classifier=True) == 0.0


def test_reproduce_sample_and_paper_flows_give_a_set_one_key(ckpts, tmp_path):
    root = f"storage.root={tmp_path / 'store'}"
    cfg = load_config("tiny", [root, "sampling.classifier_scales=[0.0, 8.0]"])
    runs = {
        "diffusion": {"checkpoint": ckpts["diffusion"]},
        "classifier": {"checkpoint": ckpts["classifier"]},
    }
    reproduce = [
        plan.set_key(plan.reproduce_set_spec(cfg, s, runs), cfg.storage.root)
        for s in plan.plan_reproduce(cfg).sets
    ]
    sample = [
        plan.set_key(
            plan.released_set_spec(cfg, ckpts["diffusion"], ckpts["classifier"], scale),
            cfg.storage.root,
        )
        for scale in (0.0, 8.0)
    ]
    assert reproduce == sample and len(set(reproduce)) == 2
    # the sample flow without a scale: the classifier guides at the first non-zero scale
    default = plan.released_set_spec(cfg, ckpts["diffusion"], ckpts["classifier"], None)
    assert plan.set_key(default, cfg.storage.root) == reproduce[1]
    # the sample flow run with other workers, threads or a batch past the shard: same key
    busy = load_config("tiny", [root, "sampling.workers=6", "compute.torch_threads=4"])
    busy_spec = plan.released_set_spec(busy, ckpts["diffusion"], ckpts["classifier"], 8.0)
    assert plan.set_key(busy_spec, busy.storage.root) == reproduce[1]


def test_the_paper_flow_keys_a_row_as_the_sample_flow_does(tmp_path):
    released = tmp_path / "released"
    released.mkdir()
    row = load_rows().row("imagenet128-adm-g")
    for name in ("diffusion", "classifier"):
        torch.save({name: torch.zeros(1)}, released / getattr(row, name).file)
    settings = [*row.overrides(100), f"storage.root={tmp_path / 'store'}"]
    cfg = load_config(row.preset, settings)
    diffusion = str(released / row.diffusion.file)
    classifier = str(released / row.classifier.file)
    # flows.paper: sample_released(classifier_scale=row.classifier_scale, overrides=settings)
    paper = plan.released_set_spec(cfg, diffusion, classifier, row.classifier_scale)
    # `admflow sample`-like use of the sample flow with the row's settings, default scale
    sample = plan.released_set_spec(cfg, diffusion, classifier, None)
    # reproduce with the same preset and settings over the same checkpoint files
    runs = {"diffusion": {"checkpoint": diffusion}, "classifier": {"checkpoint": classifier}}
    [only] = plan.plan_reproduce(cfg).sets
    reproduce = plan.reproduce_set_spec(cfg, only, runs)
    keys = {plan.set_key(s, cfg.storage.root) for s in (paper, sample, reproduce)}
    assert len(keys) == 1 and paper.scale == row.classifier_scale > 0
