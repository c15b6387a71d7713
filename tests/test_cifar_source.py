"""CIFAR-10's own format as a sharding source: the python-pickle batches of
cifar-10-batches-py, written here in that format from made-up images (nothing is downloaded),
read by an unpickler that builds only arrays, lists and numbers."""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from admflow.config import load_config
from tasks.data import cifar
from tasks.data.shard import build_shard
from tasks.data.sources import ShardError, list_source

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the CIFAR-10 files: every string (text or bytes) a
    BINSTRING, which Python 3 reads back as bytes with encoding='bytes'."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_string
    dispatch[str] = save_py2_string


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1 (which wrote the files) named its module numpy.core
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def batch_bytes(images: np.ndarray, labels: list[int], label: str = "training batch 1 of 5"):
    """A batch as the CIFAR-10 python files hold it: a dict with bytes keys, ``data`` uint8
    N x 3072 (R, G, B planes of 32x32, row-major), ``labels`` a list of ints, written as
    Python 2 pickled it."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    obj = {
        b"batch_label": label.encode(),
        b"labels": list(labels),
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    return py2_pickle(obj)


def fake_images(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return images, [int(v) for v in rng.integers(0, 10, n)]


def write_cifar(root, per_batch: int = 4, meta: bool = True) -> dict[str, tuple]:
    """A cifar-10-batches-py folder: five training batches, the test batch, batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for seed, name in enumerate([*cifar.TRAIN_BATCHES, cifar.TEST_BATCH]):
        images, labels = fake_images(per_batch, seed)
        (folder / name).write_bytes(batch_bytes(images, labels))
        written[name] = (images, labels)
    if meta:
        names = {b"label_names": [n.encode() for n in NAMES], b"num_cases_per_batch": 10000}
        (folder / cifar.META).write_bytes(py2_pickle(names))
    return written


def test_a_batch_reads_back_as_the_images_written(tmp_path):
    images, labels = fake_images(6, 0)
    path = tmp_path / "data_batch_1"
    path.write_bytes(batch_bytes(images, labels))
    got, got_labels = cifar.read_batch(str(path))
    assert got.shape == (6, 32, 32, 3) and got.dtype == np.uint8
    assert np.array_equal(got, images) and got_labels == labels
    # the red plane comes first in each row: pixel (0, 0)'s red is the row's first byte
    row = images.transpose(0, 3, 1, 2).reshape(6, -1)
    assert got[2, 0, 0, 0] == row[2, 0] and got[2, 0, 0, 1] == row[2, 1024]
    # str keys (a copy re-pickled by Python 3) read the same
    plain = {"data": row, "labels": labels}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(plain))
    assert np.array_equal(cifar.read_batch(str(tmp_path / "test_batch"))[0], images)


def test_the_folder_is_the_training_set_and_a_batch_file_itself(tmp_path):
    written = write_cifar(tmp_path)
    cfg = load_config("ddpm-cifar10")
    folder = str(tmp_path / "cifar-10-batches-py")
    src = list_source(cfg, folder)
    assert src.kind == "cifar10" and len(src.keys) == 20
    assert src.keys[:2] == ["data_batch_1/00000", "data_batch_1/00001"]
    assert src.keys[-1] == "data_batch_5/00003"  # file and row order, no test rows
    assert src.labels == [v for b in cifar.TRAIN_BATCHES for v in written[b][1]]
    assert src.class_names == NAMES
    test = list_source(cfg, os.path.join(folder, "test_batch"))
    assert test.keys == [f"test_batch/{i:05d}" for i in range(4)]
    assert test.labels == written["test_batch"][1] and test.class_names == NAMES
    # a changed batch is another source
    images, labels = fake_images(4, 99)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(batch_bytes(images, labels))
    assert list_source(cfg, folder).fingerprint != src.fingerprint
    # without batches.meta the classes are their ids
    os.remove(tmp_path / "cifar-10-batches-py" / cifar.META)
    assert list_source(cfg, folder).class_names == [str(i) for i in range(10)]


def test_a_shard_holds_the_batches_images_exactly(tmp_path):
    written = write_cifar(tmp_path)
    cfg = load_config("ddpm-cifar10")
    src = list_source(cfg, str(tmp_path / "cifar-10-batches-py"))
    data, record = build_shard(src, list(range(3, 9)), 32)  # rows of batches 1, 2 and 3
    assert record["rows"] == 6 and record["skipped"] == []
    table = pq.read_table(io.BytesIO(data)).to_pylist()
    parts = [
        written["data_batch_1"][0][3:],
        written["data_batch_2"][0],
        written["data_batch_3"][0][:1],
    ]
    expected = np.concatenate(parts)
    for row, want in zip(table, expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["image"]))), want)
    assert [r["key"] for r in table][:2] == ["data_batch_1/00003", "data_batch_2/00000"]


class _Payload:
    """What a hostile 'batch' could carry: a call run when it is unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize(
    "content, why",
    [
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a CIFAR-10 python batch"),
        (b"", "not a CIFAR-10 python batch"),
        (pickle.dumps([1, 2, 3]), "holds a list, not a batch dict"),
        (pickle.dumps({b"labels": [0]}), "holds 'data' (an array) and 'labels'"),
        (
            pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
            "'data' must be uint8 N x 3072",
        ),
        (
            pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}),
            "one class 0..9 per row",
        ),
    ],
)
def test_a_wrong_file_is_one_line_naming_it(tmp_path, content, why):
    path = tmp_path / "data_batch_1"
    path.write_bytes(content)
    with pytest.raises(ShardError) as e:
        list_source(load_config("ddpm-cifar10"), str(path))
    msg = str(e.value)
    assert why in msg and str(path) in msg and "\n" not in msg


def test_a_pickle_that_asks_for_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "test_batch"
    path.write_bytes(py2_pickle({b"data": _Payload(str(marker)), b"labels": []}))
    with pytest.raises(ShardError, match=r"asks for posix\.mkdir, which is not allowed"):
        list_source(load_config("ddpm-cifar10"), str(path))
    assert not marker.exists()


def test_a_folder_missing_a_training_batch_names_it(tmp_path):
    write_cifar(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_4")
    with pytest.raises(ShardError, match="no data_batch_4"):
        list_source(load_config("ddpm-cifar10"), str(tmp_path / "cifar-10-batches-py"))


def test_shard_cli_refuses_a_wrong_batch_before_ray(tmp_path, capsys):
    from admflow.cli import main

    write_cifar(tmp_path)
    bad = tmp_path / "cifar-10-batches-py"
    (bad / "data_batch_1").write_text("not a pickle\n")
    code = main(["shard", str(bad), str(tmp_path / "out"), "--config", "ddpm-cifar10"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "data_batch_1: not a CIFAR-10 python batch" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
