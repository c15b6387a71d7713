"""Sharding into local directories and a real S3 endpoint; reading shards back."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from admflow import storage
from admflow.config import load_config
from tasks.data import read as D
from tasks.data.shard import ShardError, center_crop, shard_dataset

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _cfg(**data):
    # 32px shards whatever the demo preset's base size (these tests pin 32px shapes)
    base = {"demo_images_per_class": 12, "shard_rows": 25, "image_size": 32}
    overrides = [f"data.{k}={v}" for k, v in {**base, **data}.items()]
    return load_config("tiny", overrides)


def _checksums(dest):
    return [s["sha256"] for s in storage.read_json(storage.join(dest, "manifest.json"))["shards"]]


def test_demo_shards_are_deterministic_and_resumable(tmp_path, ray_session):
    cfg = _cfg()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    m = shard_dataset(cfg, "demo", a)
    assert m["num_images"] == 120 and len(m["shards"]) == 5 and m["num_classes"] == 10
    assert m["counts_per_class"] == {str(i): 12 for i in range(10)}
    shard_dataset(cfg, "demo", b)
    assert _checksums(a) == _checksums(b)  # same source and settings -> identical bytes
    # resume: delete one shard, rerun, only it is rewritten
    victim = os.path.join(a, "shards", "shard-00003.parquet")
    mtimes = {
        f: os.stat(os.path.join(a, "shards", f)).st_mtime_ns
        for f in os.listdir(os.path.join(a, "shards"))
    }
    os.remove(victim)
    again = shard_dataset(cfg, "demo", a)
    assert again["written"] == ["shard-00003.parquet"]
    assert _checksums(a) == _checksums(b)
    for f, t in mtimes.items():
        if f.startswith("shard-0000") and "00003" not in f:
            assert os.stat(os.path.join(a, "shards", f)).st_mtime_ns == t
    # a damaged shard (checksum mismatch) is rebuilt too
    with open(os.path.join(a, "shards", "shard-00001.parquet"), "r+b") as f:
        f.write(b"garbage")
    assert shard_dataset(cfg, "demo", a)["written"] == ["shard-00001.parquet"]
    # other settings into the same directory: nothing stale is reused or left behind
    m16 = shard_dataset(_cfg(image_size=16, shard_rows=40), "demo", a)
    assert len(m16["written"]) == 3 and D.decode_image(_first_png(a)).shape == (16, 16, 3)
    assert sorted(f for f in os.listdir(os.path.join(a, "shards")) if f.endswith(".parquet")) == [
        f"shard-{i:05d}.parquet" for i in range(3)
    ]


def _first_png(dest):
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(dest, "shards", "shard-00000.parquet"))
    return table.column("image")[0].as_py()


def test_demo_shards_mix_classes(tmp_path, ray_session):
    import pyarrow.parquet as pq

    shard_dataset(_cfg(), "demo", str(tmp_path / "d"))
    for i in range(5):
        labels = pq.read_table(tmp_path / "d" / "shards" / f"shard-{i:05d}.parquet")["label"]
        assert len(set(labels.to_pylist())) >= 5  # not one class per shard


def test_shards_on_s3_match_local(tmp_path, s3_bucket, ray_session):
    cfg = _cfg()
    local = str(tmp_path / "local")
    remote = f"{s3_bucket}/data/demo"
    shard_dataset(cfg, "demo", local)
    m = shard_dataset(cfg, "demo", remote)
    assert _checksums(remote) == _checksums(local)
    assert (
        storage.exists(f"{remote}/manifest.json")
        and len(storage.ls(f"{remote}/shards", ".parquet")) == 5
    )
    x, y = next(D.iter_batches(remote, 16))
    assert x.shape == (16, 3, 32, 32) and y.dtype == np.int64
    ds = D.ray_dataset(remote)
    assert ds.count() == m["num_images"]


def _write_jpeg(path, colour, size=(80, 60)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")


def test_imagenet_folder_mapping_and_corrupt_files(tmp_path, ray_session):
    src = tmp_path / "imgs"
    for cls, colour in (("n02_zebra", (250, 250, 250)), ("n01_ant", (200, 10, 10))):
        for i in range(3):
            _write_jpeg(str(src / cls / f"{i}.jpg"), colour)
    good = (src / "n01_ant" / "0.jpg").read_bytes()
    (src / "n01_ant" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "n02_zebra" / "notes.png").write_text("this is not an image")
    (src / "n02_zebra" / "labels.txt").write_text("zebra")
    (src / "README").write_text("stray file outside the class folders")
    m = shard_dataset(_cfg(image_size=16), str(src), str(tmp_path / "out"))
    assert m["class_names"] == ["n01_ant", "n02_zebra"]  # sorted class-name order
    assert m["num_images"] == 6 and m["counts_per_class"] == {"0": 3, "1": 3}
    skipped = {s["key"]: s["reason"] for s in m["skipped"]}
    assert sorted(skipped) == [
        "README",
        "n01_ant/truncated.jpg",
        "n02_zebra/labels.txt",
        "n02_zebra/notes.png",
    ]
    assert "truncated" in skipped["n01_ant/truncated.jpg"].lower()
    assert skipped["README"] == "not inside a class folder"
    x, y = next(D.iter_batches(str(tmp_path / "out"), 6))
    red = x[y == 0][:, 0].mean()  # class 0 is the red ant folder
    assert red > 0.5 and x[y == 1].mean() > 0.9


def test_flat_folder_is_unconditional_and_empty_or_all_bad_sources_fail(tmp_path, ray_session):
    flat = tmp_path / "flat"
    for i in range(4):
        _write_jpeg(str(flat / f"{i}.jpg"), (i * 50, 0, 0))
    m = shard_dataset(_cfg(image_size=16), str(flat), str(tmp_path / "o1"))
    assert m["num_classes"] is None and m["counts_per_class"] == {"-1": 4}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no images"):
        shard_dataset(_cfg(), str(tmp_path / "empty"), str(tmp_path / "o2"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("nope")
    with pytest.raises(ShardError, match="failed to decode"):
        shard_dataset(_cfg(), str(bad), str(tmp_path / "o3"))
    assert not (tmp_path / "o3" / "manifest.json").exists()


def test_npz_source_and_its_errors(tmp_path, ray_session):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(30, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(30) % 3
    np.savez(tmp_path / "batch.npz", imgs, labels)
    m = shard_dataset(_cfg(), str(tmp_path / "batch.npz"), str(tmp_path / "o"))
    assert m["num_images"] == 30 and m["counts_per_class"] == {"0": 10, "1": 10, "2": 10}
    assert m["num_classes"] == 10 and m["class_names"][:3] == ["0", "1", "2"]  # tiny: 10
    x, y = next(D.iter_batches(str(tmp_path / "o"), 30))
    back = np.round((x.transpose(0, 2, 3, 1) + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(back, imgs)  # 32 -> 32 is lossless
    np.testing.assert_array_equal(y, labels)
    np.savez(tmp_path / "float.npz", imgs.astype(np.float32))
    with pytest.raises(ShardError, match="uint8"):
        shard_dataset(_cfg(), str(tmp_path / "float.npz"), str(tmp_path / "o4"))
    np.savez(tmp_path / "keys.npz", images=imgs)
    with pytest.raises(ShardError, match="arr_0"):
        shard_dataset(_cfg(), str(tmp_path / "keys.npz"), str(tmp_path / "o5"))
    np.savez(tmp_path / "labels.npz", imgs, labels[:5])
    with pytest.raises(ShardError, match="arr_1"):
        shard_dataset(_cfg(), str(tmp_path / "labels.npz"), str(tmp_path / "o6"))


def test_center_crop_follows_the_papers_preprocessing():
    im = Image.new("RGB", (300, 200), (0, 0, 0))
    im.paste((255, 255, 255), (140, 0, 160, 200))  # a white vertical bar in the middle
    out = center_crop(im, 64)
    assert out.shape == (64, 64, 3)
    assert out[:, 32].mean() > 200 and out[:, 2].mean() < 10


@pytest.mark.parametrize("size", [64, 32])
def test_center_crop_is_box_halving_then_bicubic_then_centre(size):
    """Pinned on a fixed noise image, written out step by step: 300x200 is BOX-halved while
    its short side is at least twice ``size``, BICUBIC-resized so the short side is ``size``,
    and the centre cut out. Other resamplers or orders give other bytes on this image."""
    pixels = np.random.default_rng(7).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    im = Image.fromarray(pixels)
    halved = im.resize((150, 100), Image.Resampling.BOX)
    if size == 32:
        halved = halved.resize((75, 50), Image.Resampling.BOX)
    w, h = halved.size
    wide = np.asarray(halved.resize((round(w * size / h), size), Image.Resampling.BICUBIC))
    left = (wide.shape[1] - size) // 2
    expected = wide[:, left : left + size]
    out = center_crop(im, size)
    np.testing.assert_array_equal(out, expected)
    direct = np.asarray(im.resize((size * 3 // 2, size), Image.Resampling.BICUBIC))
    assert not np.array_equal(out, direct[:, left : left + size])  # no halving: different


def test_iter_batches_augmentations_are_seeded(tmp_path, ray_session):
    shard_dataset(_cfg(), "demo", str(tmp_path / "d"))
    a = [
        x
        for x, _ in D.iter_batches(
            str(tmp_path / "d"), 16, shuffle=True, seed=1, flip=True, random_crop=True
        )
    ]
    b = [
        x
        for x, _ in D.iter_batches(
            str(tmp_path / "d"), 16, shuffle=True, seed=1, flip=True, random_crop=True
        )
    ]
    plain = np.concatenate([x for x, _ in D.iter_batches(str(tmp_path / "d"), 16)])
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    aug = np.concatenate(a)
    assert aug.shape == plain.shape and aug.min() >= -1 and aug.max() <= 1
    assert not np.allclose(np.sort(aug.ravel()), np.sort(plain.ravel()))


def _upload(local_dir, uri):
    for dirpath, _dirs, files in os.walk(local_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), local_dir)
            with open(os.path.join(dirpath, f), "rb") as fh:
                storage.write_bytes(f"{uri}/{rel}", fh.read())


def test_folder_and_npz_on_s3_shard_like_their_local_copies(tmp_path, s3_bucket, ray_session):
    from tasks.data.sources import RemoteRows, open_npz

    src = tmp_path / "src" / "imgs"
    for cls, colour in (("n02_zebra", (250, 250, 250)), ("n01_ant", (200, 10, 10))):
        for i in range(3):
            _write_jpeg(str(src / cls / f"{i}.jpg"), colour)
    good = (src / "n01_ant" / "0.jpg").read_bytes()
    (src / "n01_ant" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "README").write_text("stray file outside the class folders")
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(30, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "src" / "batch.npz", imgs, np.arange(30) % 3)
    np.savez_compressed(tmp_path / "src" / "packed.npz", imgs)
    _upload(tmp_path / "src", f"{s3_bucket}/src")
    cfg = _cfg(image_size=16, shard_rows=4)
    for name in ("imgs", "batch.npz"):
        local = shard_dataset(cfg, str(tmp_path / "src" / name), str(tmp_path / "out" / name))
        remote = shard_dataset(cfg, f"{s3_bucket}/src/{name}", f"{s3_bucket}/out/{name}")
        assert remote["shards"] == local["shards"] and len(local["shards"]) > 1  # same bytes
        assert remote["skipped"] == local["skipped"]
        assert remote["class_names"] == local["class_names"]
    folder = storage.read_json(f"{s3_bucket}/out/imgs/manifest.json")
    assert folder["num_images"] == 6 and folder["class_names"] == ["n01_ant", "n02_zebra"]
    assert [s["key"] for s in folder["skipped"]] == ["README", "n01_ant/truncated.jpg"]
    # the driver only reads the batch's headers: rows are fetched by range where indexed
    rows, labels = open_npz(f"{s3_bucket}/src/batch.npz")
    assert isinstance(rows, RemoteRows) and rows.shape == imgs.shape
    np.testing.assert_array_equal(rows[17], imgs[17])
    np.testing.assert_array_equal(labels, np.arange(30) % 3)
    with pytest.raises(ShardError, match="compressed"):
        shard_dataset(cfg, f"{s3_bucket}/src/packed.npz", f"{s3_bucket}/out/packed")
    with pytest.raises(ShardError, match="no images"):
        shard_dataset(cfg, f"{s3_bucket}/src/nothing-here", f"{s3_bucket}/out/none")
