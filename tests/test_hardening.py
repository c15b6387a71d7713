"""Bad input fails early, with one line naming the input and the fix (issue 14).

Most cases run the real CLI in this process (``admflow.cli.main``) and assert on its exit
code and stderr; none of them may start Ray.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from admflow.cli import main
from admflow.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
ADMFLOW = str(Path(sys.executable).parent / "admflow")


# Generous: "before the expensive start-up", not a benchmark (a loaded 2-core machine takes
# seconds to import torch); the unguarded runs took 13 s to minutes.
LIMIT_S = 20.0


def tree_hash(*roots: Path) -> str:
    """Names and bytes of every file under ``roots``."""
    h = hashlib.sha256()
    for root in roots:
        for path in sorted(Path(root).rglob("*")) if Path(root).exists() else []:
            h.update(str(path).encode())
            if path.is_file():
                h.update(path.read_bytes())
    return h.hexdigest()


def run_cli(capsys, *argv: str, store: Path | None = None) -> tuple[int, str]:
    """The CLI in this process. A refusal (rc 2) must be one line without a traceback, come
    within LIMIT_S and leave ``store`` (hashed before and after) as it was."""
    before = tree_hash(store) if store else ""
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = main(list(argv))
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    if rc == 2:
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert elapsed < LIMIT_S, elapsed
        if store:
            assert tree_hash(store) == before, "the store changed"
    return rc, err.strip()


_RAY_REACHED: list[str] = []


@pytest.fixture(autouse=True)
def _refuse_ray(monkeypatch):
    """Every failure here must come before any Ray work. A Ray session that an earlier test
    of the suite left running would hide that from ``ray.is_initialized()``, so the one way
    in, ``ensure_ray``, refuses and records the call instead."""
    import tasks.runtime.ray_session
    import tasks.sampling.sample_set

    def refuse(*args, **kwargs):
        _RAY_REACHED.append("ensure_ray")
        raise AssertionError("the error came after Ray started")

    _RAY_REACHED.clear()
    monkeypatch.setattr(tasks.runtime.ray_session, "ensure_ray", refuse)
    monkeypatch.setattr(tasks.sampling.sample_set, "ensure_ray", refuse)


def assert_no_ray() -> None:
    assert not _RAY_REACHED, "the error came after Ray started"


# ------------------------------------------------------------- 6, 7: flags through the config


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--num-samples", "-5"], "sampling.num_samples: Input should be greater than 0"),
        (["--batch-size", "0"], "sampling.batch_size: Input should be greater than 0"),
        (["--workers", "0"], "sampling.workers: Input should be greater than 0"),
        (["--eta", "-1"], "sampling.eta: Input should be greater than or equal to 0"),
        (["--eta", "nan"], "sampling.eta: Input should be a finite number"),
        (["--classifier-scale", "nan"], "sampling.classifier_scales.0: Input should be a finite"),
        (["--classifier-scale", "inf"], "sampling.classifier_scales.0: Input should be a finite"),
        (["--classifier-scale", "-1"], "each scale must be >= 0"),
        (["--classifier-scale", "2"], "classifier scale 2 needs a noisy classifier"),
        (["--classes", "99"], "sampling.classes: class 99 is out of range; ids run 0..9"),
        (["--classes", "a,b"], "--classes: expected comma-separated integers"),
        (["--steps", "abc"], "sampling.timestep_respacing: 'abc' is not a respacing"),
        (["--steps", "ddim2000"], "cannot take exactly 2000 equally strided steps"),
        (["--set", "sampling.classifier_scales=[.nan]"], "Input should be a finite number"),
    ],
)
def test_sample_flags_are_validated_like_config_fields(tmp_path, capsys, flags, expected):
    out = tmp_path / "out"
    rc, err = run_cli(
        capsys, "sample", "--checkpoint", "nowhere", "--out", str(out), *flags, store=tmp_path
    )
    assert rc == 2
    assert expected in err and err.startswith("admflow sample: ")
    assert "\n" not in err  # one line
    assert not out.exists()  # nothing written, not even a manifest
    assert_no_ray()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.image_size=33", "image_size 33 cannot be halved"),
        ("model.channel_mult=[1,1,1,1,1,1,1]", "cannot be halved 6 times (channel_mult has 7"),
        ("classifier.image_size=33", "image_size 33 cannot be halved"),
        ("model.num_classes=0", "model.num_classes: Input should be greater than 0"),
        ("sampling.timestep_respacing=ddim2000", "cannot take exactly 2000 equally strided"),
        ("sampling.timestep_respacing=600,600", "600 steps exceed the 500 diffusion steps"),
        ("sampling.classifier_scales=[.inf]", "Input should be a finite number"),
        ("sampling.classifier_scales=[1.0,-0.5]", "each scale must be >= 0"),
        ("training.lr=.nan", "training.lr: Input should be a finite number"),
        ("classifier.enabled=false", "scales > 0 need classifier.enabled=true"),
    ],
)
def test_impossible_configs_fail_at_load(override, expected):
    with pytest.raises(ConfigError, match="invalid config") as e:
        load_config("tiny", [override])
    assert expected in str(e.value)


def test_respacing_given_as_a_yaml_number_is_the_same_setting():
    cfg = load_config("tiny", ["sampling.timestep_respacing=250"])
    assert cfg.sampling.timestep_respacing == "250"


def test_guidance_is_decided_by_one_rule():
    s = load_config("tiny").sampling
    assert s.guided(2.0, has_classifier=True)
    assert not s.guided(0.0, has_classifier=True)  # scale 0: the classifier is not used
    assert not s.guided(0.0, has_classifier=False)
    with pytest.raises(ConfigError, match="needs a noisy classifier"):
        s.guided(2.0, has_classifier=False)
    off = load_config("tiny", ["sampling.guidance=none"]).sampling
    assert not off.guided(2.0, has_classifier=True)


def test_data_and_model_size_must_agree_before_the_pipeline_starts(capsys):
    t0 = time.perf_counter()
    rc, err = run_cli(capsys, "reproduce", "--set", "data.image_size=64")
    assert rc == 2 and "data.image_size (64) must equal model.image_size (" in err
    assert time.perf_counter() - t0 < 30  # no Prefect, no Ray
    assert_no_ray()


def test_labels_beyond_the_models_classes_fail_before_training():
    from tasks.training.launch import check_data

    cfg = load_config("tiny")
    size = cfg.model.image_size
    manifest = {"image_size": size, "num_classes": 100}  # an npz whose labels reach 99
    with pytest.raises(ConfigError, match="labels 0..99 but model.num_classes is 10"):
        check_data("diffusion", cfg, manifest)
    clf = load_config("tiny", [f"classifier.image_size={size}"])
    with pytest.raises(ConfigError, match="labels 0..99 but classifier.num_classes is 10"):
        check_data("classifier", clf, manifest)
    check_data("diffusion", cfg, {"image_size": size, "num_classes": 10})


# ------------------------------------------------------------- 5: relative paths


def test_relative_paths_are_resolved_at_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "store" / "data").mkdir(parents=True)
    (tmp_path / "store" / "data" / "manifest.json").write_text('{"format": "other"}')
    rc, err = run_cli(capsys, "train", "diffusion", "--data", "store/data", store=tmp_path)
    # The manifest was found by its absolute path, the one the Ray workers would get.
    assert rc == 2 and f"{tmp_path}/store/data/manifest.json: not an admflow-shards/1" in err
    from admflow.commands.common import local_abs

    assert local_abs("a/b") == str(tmp_path / "a" / "b")
    assert local_abs("file://a/b") == str(tmp_path / "a" / "b")
    assert local_abs("s3://bucket/a") == "s3://bucket/a"


# ------------------------------------------------------------- 6: NaN samples never written


def test_a_diverged_model_fails_naming_the_shard():
    from admflow.config import UNetConfig
    from models.build import build_unet
    from tasks.sampling.spec import NonFiniteSampleError, SamplerSpec
    from tasks.sampling.worker import ShardSampler

    net = UNetConfig(
        image_size=8,
        model_channels=32,
        num_res_blocks=1,
        channel_mult=[1, 2],
        attention_resolutions=[],
        num_head_channels=32,
        num_classes=None,
    )
    model = build_unet(net)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    cfg = load_config("tiny")
    spec = SamplerSpec(
        kind="base",
        network=net.model_dump(mode="json"),
        diffusion=cfg.diffusion.model_dump(mode="json"),
        respacing="ddim2",
        batch_size=2,
        device="cpu",
    )
    sampler = ShardSampler(spec, buf.getvalue(), None)
    with pytest.raises(NonFiniteSampleError, match=r"shard 3, after 2 sampling"):
        sampler.sample(3, np.full(2, -1))


# ------------------------------------------------------------- 9: one-line errors


def test_yaml_syntax_errors_and_tabs_in_a_preset(tmp_path, capsys):
    tab = tmp_path / "tab.yaml"
    tab.write_text("base: tiny\nsampling:\n\tnum_samples: 4\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("base: tiny\nsampling: {num_samples: 4\n")
    for path, line in ((tab, "line 3"), (broken, "line 3")):
        rc, err = run_cli(capsys, "config", "show", str(path), store=tmp_path)
        assert rc == 2 and f"preset {path}: YAML syntax error at {line}" in err
        assert "tabs" in err and "\n" not in err


def _tiny_weights() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(1000.0)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["random", "truncated", "bad-meta", "empty-dir"])
def test_broken_checkpoints_fail_before_ray(tmp_path, capsys, case):
    ckpt = tmp_path / "ckpt"
    if case == "random":
        ckpt = tmp_path / "model.pt"
        ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
        expected = "is not a torch checkpoint (corrupt, truncated"
    elif case == "truncated":
        ckpt = tmp_path / "model.pt"
        ckpt.write_bytes(_tiny_weights()[:-700])
        expected = "is not a torch checkpoint (corrupt, truncated"
    elif case == "bad-meta":
        ckpt.mkdir()
        (ckpt / "model.pt").write_bytes(_tiny_weights())
        (ckpt / "meta.json").write_text('{"step": 10, "config": ')
        expected = "meta.json is not valid JSON"
    else:
        ckpt.mkdir()
        expected = "is a directory without meta.json"
    t0 = time.perf_counter()
    rc, err = run_cli(
        capsys, "sample", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), store=tmp_path
    )
    assert rc == 2 and expected in err and str(ckpt) in err and "\n" not in err
    assert time.perf_counter() - t0 < 20
    assert_no_ray()


def test_shard_destination_that_is_a_file(tmp_path, capsys):
    dest = tmp_path / "dest"
    dest.write_text("not a directory")
    rc, err = run_cli(capsys, "shard", "demo", str(dest), store=tmp_path)
    assert rc == 2 and f"shard destination {dest} is a file" in err
    assert_no_ray()


def test_frechet_distance_that_cannot_converge_is_an_error(tmp_path, capsys):
    rng = np.random.default_rng(0)

    def feature_file(name: str, scale: float) -> str:
        path = tmp_path / name
        pool = rng.standard_normal((8, 2048)) * scale
        spatial = rng.standard_normal((8, 2023))
        np.savez(path, pool=pool, spatial=spatial)
        return str(path)

    ref, samples = feature_file("ref.npz", 1.0), feature_file("samples.npz", 1e160)
    rc, err = run_cli(
        capsys, "evaluate", ref, samples, "--no-mlflow", "--workers", "0", store=tmp_path
    )
    assert rc == 2 and "the Frechet distance does not converge" in err
    assert_no_ray()


def _wait_until_blocked_on_fifo(pid: int, timeout: float) -> None:
    """Wait until ``pid`` sleeps in the FIFO's open (the kernel's wait channel says so), so the
    signal arrives where the test means it to, not during imports on a loaded machine (a SIGINT
    there can leave interpreter threads that keep the process alive)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/wchan") as f:
                if f.read().strip() in ("wait_for_partner", "fifo_open"):
                    return
        except OSError:
            return  # no /proc: fall back to signalling now
        time.sleep(0.2)
    raise AssertionError(f"process {pid} never blocked opening the checkpoint")


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_prints_one_line_and_no_traceback(tmp_path):
    fifo = tmp_path / "never-written.pt"
    os.mkfifo(fifo)  # reading the checkpoint blocks until the signal comes
    proc = subprocess.Popen(
        [ADMFLOW, "sample", "--checkpoint", str(fifo), "--out", str(tmp_path / "o")],
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        # as a terminal starts it: a shell's background job (how a test run may have been
        # started) ignores SIGINT, and a child inherits that, so the signal would never land
        preexec_fn=_sigint_default,
    )
    _wait_until_blocked_on_fifo(proc.pid, timeout=120)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip() == "admflow sample: interrupted; rerun to resume"


# ------------------------------------------------------------- 2: missing bucket


def test_missing_bucket_is_an_error_unless_asked_to_create(s3_server, capsys):
    import s3fs

    from admflow import storage

    bucket = f"no-such-bucket-{os.getpid()}"
    rc, err = run_cli(capsys, "shard", "demo", f"s3://{bucket}/data")
    assert rc == 2 and f"bucket '{bucket}' does not exist" in err and "--create-bucket" in err
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    assert not fs.exists(bucket)
    assert_no_ray()
    storage.ensure_bucket(f"s3://{bucket}/data", create=True)
    assert fs.exists(bucket)


def test_shard_flag_create_bucket_sets_the_config_field():
    import argparse

    from admflow.commands.common import config_from_args
    from admflow.commands.shard import SHARD_FLAGS

    args = argparse.Namespace(config="tiny", overrides=[], create_bucket=True, image_size=None)
    args.shard_rows = args.workers = None
    assert config_from_args(args, SHARD_FLAGS).storage.create_bucket is True


def test_json_flags_keep_their_type():
    cfg = load_config("tiny", ["sampling.timestep_respacing=" + json.dumps("10,15")])
    assert cfg.sampling.timestep_respacing == "10,15"


# ------------------------------------------------------------- 14: cache keys carry the code


def test_code_version_follows_the_math_under_models(tmp_path):
    import shutil

    from admflow.version import code_version, package_version, sources_hash

    copy = tmp_path / "models"
    shutil.copytree(REPO / "models", copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert sources_hash(copy) == sources_hash(REPO / "models")
    with open(copy / "respace.py", "a") as f:
        f.write("\n# a changed line of math\n")
    assert sources_hash(copy) != sources_hash(REPO / "models")
    assert code_version() == f"{package_version()}+models.{sources_hash(REPO / 'models')}"


def test_every_stage_key_changes_with_the_code(monkeypatch):
    from tasks import plan

    cfg = load_config("tiny")
    before = plan.chain_key("train", cfg, ("model",), "upstream")
    monkeypatch.setattr(plan, "code_version", lambda: "0.2.0+models.000000000000")
    assert plan.chain_key("train", cfg, ("model",), "upstream") != before


# ------------------------------------------------------------- 16: the classifier's crops


def test_classifier_augmentation_crops_80_to_100_percent_and_flips():
    from tasks.training.jobs import make_job
    from tasks.training.stream import augment

    # the paper's classifiers crop; the 16px demo turns it off (training.classifier_random_crop)
    assert make_job("classifier", load_config("imagenet64")).random_crop
    assert not make_job("classifier", load_config("tiny")).random_crop
    n = 32
    ramp = np.broadcast_to(np.linspace(-1, 1, n, dtype=np.float32), (400, 3, n, n)).copy()
    out = augment(ramp, np.random.default_rng(0), flip=True, random_crop=True)
    assert out.shape == ramp.shape
    row = out[:, 0, n // 2]
    flipped = row[:, 0] > row[:, -1]
    assert 0.4 < flipped.mean() < 0.6
    row = np.where(flipped[:, None], row[:, ::-1], row)
    # Each window is a zoom of the ramp: monotonic (no reflect padding) and spanning n/S of
    # it, with S uniform over 32..40: from 80% to all of the side.
    assert (np.diff(row[:, 1:-1], axis=1) > 0).all()
    span = (row[:, -2] - row[:, 1]) / (ramp[0, 0, 0, -2] - ramp[0, 0, 0, 1])
    assert span.min() > 0.78 and span.max() > 0.999
    assert 0.05 < (span > 0.999).mean() < 0.2  # S == n: the whole image, 1 draw in 9


# ------------------------------------------------------------- 1: no secret pickled into Ray


def test_filesystem_handed_to_ray_carries_no_credentials(monkeypatch):
    import pickle

    from admflow import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "plantedkeyid")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "PLANTEDsecretForPickle")
    fs, path = storage.pyarrow_filesystem("s3://bucket/runs")
    blob = pickle.dumps(fs)
    assert b"PLANTEDsecretForPickle" not in blob and b"plantedkeyid" not in blob
    assert b"http://127.0.0.1:9" in blob and path == "bucket/runs"


# ------------------------------------------------------------- 18: the docs


def test_docs_speak_of_the_project_only():
    assert not (REPO / "docs" / "HELPERS.md").exists()
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    for section in ("Layers and import rules", "Data formats", "Adding a preset", "Tests"):
        assert f"## {section}" in text
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        body = doc.read_text().lower()
        assert "/work/" not in body and " agent" not in body, doc


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--checkpoint", "c", "--out", "o", "--max-shards", "0"],
        ["train", "diffusion", "--data", "d", "--max-failures", "-1"],
    ],
)
def test_counts_that_are_not_config_fields_are_checked_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "must be >=" in capsys.readouterr().err
