"""The demo's held-out images ('demo-heldout'): drawn like the training set, none of them in it."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from admflow.config import load_config
from tasks.data.demo import HELDOUT_PER_CLASS, parse_key, render
from tasks.data.shard import build_shard
from tasks.data.sources import list_source


def test_the_heldout_images_follow_the_training_set_in_every_class():
    cfg = load_config("tiny", ["data.demo_images_per_class=6"])
    train, held = list_source(cfg, "demo"), list_source(cfg, "demo-heldout")
    assert len(train.keys) == 60 and len(held.keys) == 10 * HELDOUT_PER_CLASS
    assert not set(train.keys) & set(held.keys)
    assert {parse_key(k)[1] for k in held.keys} == set(range(6, 6 + HELDOUT_PER_CLASS))
    assert np.bincount(held.labels).tolist() == [HELDOUT_PER_CLASS] * 10
    assert all(parse_key(k)[0] == lab for k, lab in zip(held.keys, held.labels, strict=True))
    assert held.fingerprint != train.fingerprint
    assert held.class_names == train.class_names
    # a larger training set moves its held-out images on with it
    more = list_source(load_config("tiny", ["data.demo_images_per_class=7"]), "demo-heldout")
    assert more.fingerprint != held.fingerprint and "circle/00006" not in more.keys


def test_a_heldout_shard_holds_new_renders_of_the_demo():
    cfg = load_config("tiny", ["data.demo_images_per_class=3"])
    held, train = list_source(cfg, "demo-heldout"), list_source(cfg, "demo")
    data, record = build_shard(held, list(range(12)), 16)
    assert record["rows"] == 12 and record["skipped"] == []
    seen = [render(*parse_key(k), 16).tobytes() for k in train.keys]
    for row in pq.read_table(io.BytesIO(data)).to_pylist():
        image = np.asarray(Image.open(io.BytesIO(row["image"])))
        assert np.array_equal(image, render(*parse_key(row["key"]), 16))
        assert image.tobytes() not in seen
