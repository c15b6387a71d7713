"""An ancestor's row through `admflow paper run` on the same path as ADM's rows (sample flow, Ray
actors, the evaluator, MLflow, Prefect): Improved DDPM's CIFAR-10 L_hybrid model at 50 DDIM
steps, from a released-layout checkpoint of its network at reduced width, scored against the
training set as the paper scores it: CIFAR-10 batches written in their own format and sharded
by `admflow shard`'s Ray tasks."""

from __future__ import annotations

import json
import math

import pytest

from admflow.config import load_config
from admflow.paper import find_row
from tasks.data.shard import shard_dataset
from tests.test_cifar_source import write_cifar
from tests.test_paper import _released_checkpoint

ROW = "iddpm-cifar10-hybrid-ddim50"
SMALL = [  # the row's network at 32 channels and two levels; its sampler and 50 steps as they are
    "model.model_channels=32",
    "model.num_res_blocks=1",
    "model.channel_mult=[1,2]",
    "model.attention_resolutions=[16]",
    "sampling.batch_size=4",
    "sampling.shard_size=4",
    "sampling.workers=1",
    "compute.torch_threads=1",
    "compute.num_workers=1",
    "evaluation.workers=0",
    "evaluation.fid_method=eigh",
    "evaluation.reference_images=30",
    "compute.use_gpu=false",  # the preset asks for GPUs; none here
]
N = 8


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_few_step_row_runs_against_the_training_sets_shards(ray_session, tmp_path, capsys):
    import mlflow

    from admflow.cli import main
    from admflow.tracking import setup_mlflow

    overrides = [*SMALL, f"storage.root={tmp_path / 'store'}"]
    _, row = find_row(ROW)
    cfg = load_config(row.preset, row.overrides(N) + overrides)
    write_cifar(tmp_path, per_batch=6)
    train = str(tmp_path / "cifar10-train")
    manifest = shard_dataset(cfg, str(tmp_path / "cifar-10-batches-py"), train)
    assert manifest["num_images"] == 30 and manifest["source"]["kind"] == "cifar10"

    released = tmp_path / "released"
    released.mkdir()
    ckpt = _released_checkpoint(released, cfg, "cifar10_uncond_50M_500K.pt")

    args = ["paper", "run", ROW, "--checkpoints", str(released), "--reference", train]
    assert main(args + ["--num-samples", str(N)] + [f"--set={o}" for o in overrides]) == 0
    out = capsys.readouterr().out
    assert "ddim, 50 steps, classifier scale 0, 8 samples; published: no published figure" in out
    lines = {ln.split("|")[1].strip(): ln.split("|")[2:5] for ln in out.splitlines() if "| " in ln}
    ours, published, diff = (c.strip() for c in lines["FID"])
    assert math.isfinite(float(ours)) and float(ours) > 0
    assert (published, diff) == ("n/a", "n/a")  # the paper's plot is not transcribed

    samples = next(ln.split()[-1] for ln in out.splitlines() if ln.startswith("samples:"))
    meta = json.loads((tmp_path / samples / "metadata.json").read_text())
    assert meta["sampler"] == "ddim" and meta["steps"] == "ddim50" and meta["image_size"] == 32
    setup_mlflow(cfg)
    parents = mlflow.search_runs(filter_string=f"tags.`admflow.paper_row` = '{ROW}'")
    assert len(parents) == 1
    parent = parents.iloc[0]
    assert parent["tags.admflow.upstream.diffusion"] == str(ckpt)
    assert parent["tags.admflow.upstream.reference"] == train
    assert parent["metrics.ours/fid"] == pytest.approx(float(ours), abs=1e-3)
