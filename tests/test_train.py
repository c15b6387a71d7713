"""Training: data order, checkpoints, resume equivalence, Ray Train jobs, MLflow.

Ray jobs run the tiny preset shrunk to 16x16 images (a step costs ~0.25 s per worker on one
core) on a small shard set built here from the demo renderer.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from admflow import storage
from admflow.config import load_config
from tasks import train_checkpoint as ckpt
from tasks.demo_data import CLASS_NAMES, render
from tasks.train_data import ShardStream, batch_positions
from tasks.train_loop import LocalSession, LoopSpec, Trainer

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
    """A shard set in the HELPERS.md format: demo shapes, or (easy) class-coloured fields."""
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


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return build_shards(str(tmp_path_factory.mktemp("shards")), per_class=40)


def small_cfg(root, *overrides):
    return load_config("tiny", [*SMALL, f"storage.root={root}", *overrides])


def local_run(cfg, kind, data, run_name, **spec_kw):
    spec = LoopSpec(
        kind=kind,
        config=cfg.model_dump(mode="json"),
        data_uri=data,
        run_uri=storage.join(cfg.storage.root, "runs", run_name),
        run_name=run_name,
        **spec_kw,
    )
    session = LocalSession()
    trainer = Trainer(spec, session)
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
    """Importance sampling, microbatches and EMA on: 3 + 3 steps == 6 steps, exactly."""
    over = [
        "training.steps=6",
        "training.checkpoint_every=3",
        "training.log_every=3",
        "training.microbatch=4",
        "diffusion.schedule_sampler=loss-second-moment",
    ]
    cfg = small_cfg(tmp_path, *over)
    whole, _ = local_run(cfg, "diffusion", shards, "whole")
    with pytest.raises(RuntimeError, match="injected fault at step 5"):
        local_run(cfg, "diffusion", shards, "cut", fail_at_step=5)
    resumed, _ = local_run(cfg, "diffusion", shards, "cut")
    assert resumed.start_step == 3 and resumed.step == 6
    assert_same_params(whole.module.state_dict(), resumed.module.state_dict())
    assert_same_params(
        whole.ema.state_dict()["shadow"]["0.999"], resumed.ema.state_dict()["shadow"]["0.999"]
    )
    np.testing.assert_array_equal(whole.sampler._loss_history, resumed.sampler._loss_history)


def test_nonfinite_loss_stops_with_the_step_and_keeps_last_checkpoint(
    shards, tmp_path, monkeypatch
):
    cfg = small_cfg(
        tmp_path, "training.steps=6", "training.checkpoint_every=2", "training.log_every=2"
    )
    from tasks import train_jobs

    real = train_jobs.Job.losses

    def poisoned(self, model, x, y, t, gen):
        out = real(self, model, x, y, t, gen)
        if trainer_ref and trainer_ref[0].step == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    trainer_ref: list = []
    monkeypatch.setattr(train_jobs.Job, "losses", poisoned)
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
