"""A planted S3 secret never reaches Ray's session directory, MLflow or any output.

One process shards, trains, samples and evaluates against the S3 server (moto) with its own
local Ray (``RAY_TMPDIR`` under the test's directory) and its own MLflow store; afterwards
every file Ray and MLflow wrote, every object in the bucket and everything the process
printed is searched for the secret.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.services, pytest.mark.timeout(900)]

SECRET = "PLANTEDsecret0f1e2d3c4b5a"

STAGES = textwrap.dedent(
    """
    import sys
    from admflow import storage
    from admflow.config import load_config
    from tasks.scoring.evaluate import evaluate_sets
    from tasks.sampling.build import build_spec
    from tasks.sampling.sample_set import sample_set
    from tasks.data.shard import shard_dataset
    from tasks.training.launch import train

    root = sys.argv[1]
    storage.ensure_bucket(root, create=True)
    cfg = load_config("tiny", [
        f"storage.root={root}",
        "data.image_size=16", "data.demo_images_per_class=2", "data.shard_rows=10",
        "model.image_size=16", "model.channel_mult=[1,2]", "model.attention_resolutions=[8]",
        "training.steps=2", "training.batch_size=4", "training.checkpoint_every=2",
        "training.log_every=1", "compute.num_workers=1",
        "sampling.num_samples=4", "sampling.batch_size=4", "sampling.shard_size=4",
        "sampling.timestep_respacing=ddim2", "sampling.workers=1",
        "evaluation.workers=1", "evaluation.reference_images=20",
    ])
    data = f"{root}/data"
    shard_dataset(cfg, "demo", data)
    run = train("diffusion", cfg, data, "secret-check")
    print("trained", run["checkpoint"])
    samples = f"{root}/samples"
    spec = build_spec(cfg, run["checkpoint"])
    print("sampled", sample_set(cfg, spec, samples, parent_run_id=run["mlflow_run_id"]))
    print("metrics", evaluate_sets(cfg, data, samples))
    """
)


def _hits(directory: Path, secret: bytes) -> list[str]:
    found = []
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if secret in path.read_bytes():
                    found.append(str(path))
            except OSError:  # sockets, files removed while we look
                continue
    return found


@pytest.fixture
def ray_tmp():
    # Short: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="adm-secret-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_planted_secret_is_nowhere(s3_server, tmp_path, ray_tmp):
    import s3fs

    work = tmp_path / "work"  # MLflow's default store (.admflow/mlflow.db) goes here
    work.mkdir()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "plantedkeyid",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "RAY_TMPDIR": str(ray_tmp),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    bucket = f"secret-check-{os.getpid()}"
    proc = subprocess.run(
        [sys.executable, "-c", STAGES, f"s3://{bucket}/store"],
        cwd=work,
        env=env,
        capture_output=True,
        timeout=840,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output.decode(errors="replace")[-4000:]
    assert b"metrics" in proc.stdout  # every stage ran
    assert SECRET.encode() not in output
    assert list(ray_tmp.rglob("runtime_env*.log")) or list(ray_tmp.rglob("*.log"))
    assert _hits(ray_tmp, SECRET.encode()) == []
    assert (work / ".admflow" / "mlflow.db").exists()
    assert _hits(work, SECRET.encode()) == []
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key="plantedkeyid", secret=SECRET)
    objects = fs.find(bucket)
    assert any("mlflow-artifacts" in o for o in objects)
    assert [o for o in objects if SECRET.encode() in fs.cat_file(o)] == []
