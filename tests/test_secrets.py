"""Planted secrets never reach Ray's session directory, MLflow or any output.

One process shards, trains, samples and evaluates against the S3 server (moto), an S3 secret
key in its environment, and against a tracking server behind basic auth, its password in the
tracking URI, with its own local Ray (``RAY_TMPDIR`` under the test's directory); afterwards
every file Ray and MLflow wrote, every object in the bucket and everything the process
printed is searched for both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

# The two end-to-end checks start Ray and servers (marked one by one); the checks of the
# masking rule at the end belong to the fast tier.

SECRET = "PLANTEDsecret0f1e2d3c4b5a"  # the S3 secret key, in the environment
PASSWORD = "PLANTEDpassw0rd9a8b7c"  # the tracking server's, in its URI

STAGES = textwrap.dedent(
    """
    import os, sys
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
        f"tracking.tracking_uri={os.environ['MLFLOW_TRACKING_URI']}",  # as a --set gives it
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


class _BasicAuthProxy:
    """A tracking server behind basic auth, as a real deployment puts it: every request must
    carry ``alice:PASSWORD``; the rest is forwarded to a plain ``mlflow server``. Counts the
    requests it answered and refused."""

    def __init__(self, upstream_port: int):
        import base64
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        expected = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        counts = self.counts = {"ok": 0, "refused": 0}

        class Handler(BaseHTTPRequestHandler):
            def _forward(self):
                if self.headers.get("Authorization") != expected:
                    counts["refused"] += 1
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                counts["ok"] += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def tracking_behind_auth(tmp_path):
    from infra.stack import MLFLOW_SERVER_ENV, mlflow_server_argv
    from tests.conftest import free_port, stop_process, wait_for_port

    store = tmp_path / "mlflow-server"
    store.mkdir()
    port = free_port()
    argv = mlflow_server_argv(port, f"sqlite:///{store / 'mlflow.db'}", str(store / "artifacts"))
    server = subprocess.Popen(
        argv, env={**os.environ, **MLFLOW_SERVER_ENV}, cwd=store,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    proxy = None
    try:
        wait_for_port(port, server, timeout=180)
        proxy = _BasicAuthProxy(port)
        yield proxy, store
    finally:
        if proxy:
            proxy.close()
        stop_process(server)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.services
@pytest.mark.timeout(900)
def test_planted_secrets_are_nowhere(s3_server, tmp_path, ray_tmp, tracking_behind_auth):
    """shard, train, sample and evaluate with the store on S3 (its secret key in the
    environment) and MLflow behind basic auth (the password in MLFLOW_TRACKING_URI and in the
    config's tracking_uri): every request authenticates, the Ray workers' too, and neither
    secret is in anything printed, in Ray's session, in the working directory, in the
    tracking server's store or in any object of the bucket."""
    import sqlite3

    import s3fs

    proxy, server_store = tracking_behind_auth
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "plantedkeyid",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "MLFLOW_TRACKING_URI": f"http://alice:{PASSWORD}@127.0.0.1:{proxy.port}",
        "RAY_TMPDIR": str(ray_tmp),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
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
    assert proxy.counts["refused"] == 0 and proxy.counts["ok"] > 10, proxy.counts
    assert list(ray_tmp.rglob("runtime_env*.log"))
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key="plantedkeyid", secret=SECRET)
    objects = fs.find(bucket)
    assert any("checkpoints" in o for o in objects) and any("samples" in o for o in objects)
    for secret in (SECRET.encode(), PASSWORD.encode()):
        assert secret not in output
        assert _hits(ray_tmp, secret) == []
        assert _hits(work, secret) == []
        assert _hits(server_store, secret) == []
        assert [o for o in objects if secret in fs.cat_file(o)] == []
    # the runs did log there: params, a checkpoint tag written by the Ray worker
    with sqlite3.connect(server_store / "mlflow.db") as db:
        tags = {k for (k,) in db.execute("select key from tags")}
        params = dict(db.execute("select key, value from params"))
    assert "checkpoint.latest" in tags
    assert params.get("tracking.tracking_uri") == f"http://127.0.0.1:{proxy.port}"


# ------------------------------------------------- the masking rule, piece by piece


def test_one_rule_masks_every_uri():
    from admflow.uris import mask_text, mask_uri, mask_values, split_userinfo

    assert mask_uri("http://alice:p@ss@host:5000/x") == "http://alice:***@host:5000/x"
    assert mask_uri("https://TOKEN123@host/x") == "https://***@host/x"  # a user may be a token
    assert mask_uri("s3://bucket/a@b") == "s3://bucket/a@b"  # an '@' in a path is no userinfo
    text = "tracking.tracking_uri=http://a:SECRETx@h:1 and ray://u:SECRETy@head:10001"
    assert "SECRET" not in mask_text(text) and "http://a:***@h:1" in mask_text(text)
    nested = {"tracking": {"tracking_uri": "http://a:SECRETz@h"}, "l": ["x://u:SECRETw@h/"]}
    assert "SECRET" not in json.dumps(mask_values(nested))
    assert split_userinfo("http://us%40er:p%3Aw@h:1/p") == ("http://h:1/p", "us@er", "p:w")


def test_tracking_credentials_leave_the_config(monkeypatch, tmp_path):
    """A password in --set tracking.tracking_uri: the config, its MLflow params and a
    checkpoint's meta.json hold the bare URI; MLflow's own variables hold the credentials,
    and a later configuration for another store withdraws them."""
    from admflow.config import load_config
    from admflow.tracking import flat_params
    from admflow.uris import scrub_overrides
    from tasks.training.checkpoint import read_meta, write_checkpoint

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    override = f"tracking.tracking_uri=http://alice:{PASSWORD}@127.0.0.1:5000"
    assert scrub_overrides([override]) == ["tracking.tracking_uri=http://alice:***@127.0.0.1:5000"]
    cfg = load_config("tiny", [override, "compute.ray_address=ray://bob:PLANTEDray@head:10001"])
    assert cfg.tracking.tracking_uri == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    params = json.dumps(flat_params(cfg))
    assert PASSWORD not in params and "PLANTEDray" not in params
    ckpt = tmp_path / "ckpt"
    meta = {"step": 1, "kind": "diffusion", "config": cfg.model_dump(mode="json")}
    write_checkpoint(str(ckpt), model={}, emas={}, state={}, meta=meta)
    text = (ckpt / "meta.json").read_text()
    assert PASSWORD not in text and "PLANTEDray" not in text and "ray://bob:***@head" in text
    assert read_meta(str(ckpt))["step"] == 1
    # the masked override (what Prefect records) loads as the same bare URI
    again = load_config("tiny", scrub_overrides([override]))
    assert again.tracking.tracking_uri == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
    load_config("tiny", ["tracking.tracking_uri=http://127.0.0.1:6000"])  # another server
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ


def test_the_ray_runtime_env_carries_no_credentials(monkeypatch):
    from admflow.config import load_config
    from tasks.runtime.ray_session import _store_locations

    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{PASSWORD}@127.0.0.1:5000")
    monkeypatch.setenv("PREFECT_API_URL", "http://u:PLANTEDprefect@127.0.0.1:4200/api")
    monkeypatch.setenv("ADMFLOW_STORAGE_ROOT", "s3://bucket/root")
    forwarded = _store_locations(load_config("tiny"))
    assert forwarded == {"ADMFLOW_STORAGE_ROOT": "s3://bucket/root"}
    # the driver's environment, which a local session's workers inherit, holds them instead
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD


def test_prefect_links_carry_no_credentials(tmp_path):
    """Prefect prints "View at <UI URL>" for each flow run, the URL derived from the API's."""
    code = (
        "from admflow.uris import prefect_ui_without_credentials\n"
        "prefect_ui_without_credentials()\n"
        "from prefect.settings import get_current_settings\n"
        "print(get_current_settings().ui_url)\n"
    )
    env = {**os.environ, "PREFECT_API_URL": "http://u:PLANTEDprefect@127.0.0.1:4200/api"}
    env.pop("PREFECT_UI_URL", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.stdout.strip() == "http://127.0.0.1:4200", out.stderr[-2000:]
