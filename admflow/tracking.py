"""MLflow wiring shared by every stage.

Default (embedded) tracking: a sqlite store and an artifact directory beside the local
object store, so `admflow demo` needs no server. ``tracking.tracking_uri`` (or the
``MLFLOW_TRACKING_URI`` environment variable) points at a real ``mlflow server``.
Secrets never reach MLflow: params come from the config, which holds no credentials.
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from admflow.config import AdmConfig
from admflow.storage import is_remote, local_path

_HEALTH_TIMEOUT_S = 5.0
_SECRET_WORDS = ("secret", "password", "token", "access_key", "credential")


def resolve_tracking_uri(cfg: AdmConfig) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    base = Path(".admflow") if is_remote(cfg.storage.root) else Path(local_path(cfg.storage.root))
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


class TrackingError(RuntimeError):
    """An MLflow tracking store that cannot be used; the message names it and the fix."""


def shown_uri(uri: str) -> str:
    """``uri`` without a password, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_tracking(cfg: AdmConfig) -> str:
    """The tracking URI, once it is known to answer: a few seconds at most, instead of
    MLflow's minutes of retries after the expensive work is done. Returns the URI."""
    uri = resolve_tracking_uri(cfg)
    fix = "start it, or set tracking.tracking_uri / MLFLOW_TRACKING_URI to a running store"
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=_HEALTH_TIMEOUT_S):
                pass
        except urllib.error.HTTPError:
            pass  # it answered: reachable (e.g. a proxy without /health)
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"MLflow tracking store {shown_uri(uri)} is unreachable ({reason}); {fix}"
            ) from None
    elif uri.startswith("sqlite:///"):
        directory = os.path.dirname(uri[len("sqlite:///") :]) or "."
        if not os.access(directory, os.W_OK):
            raise TrackingError(f"MLflow tracking store {uri}: cannot write in {directory}; {fix}")
    return uri


def _artifact_location(cfg: AdmConfig, tracking_uri: str) -> str | None:
    if tracking_uri.startswith(("http://", "https://")):
        return None  # the server decides (e.g. --artifacts-destination s3://...)
    if is_remote(cfg.storage.root):
        return f"{cfg.storage.root.rstrip('/')}/mlflow-artifacts"
    return Path(local_path(cfg.storage.root), "mlflow-artifacts").resolve().as_uri()


def _point_mlflow_at(uri: str) -> None:
    """mlflow.set_tracking_uri, without its side effect of exporting MLFLOW_TRACKING_URI:
    in a long-lived process (a Prefect worker, a notebook, the test suite) the next flow,
    configured for another store, would otherwise read that variable and log there."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def setup_mlflow(cfg: AdmConfig) -> str:
    """Point mlflow at the configured store and experiment; returns the experiment id."""
    import mlflow

    uri = check_tracking(cfg)
    _point_mlflow_at(uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        try:
            return mlflow.create_experiment(
                cfg.tracking.experiment, artifact_location=_artifact_location(cfg, uri)
            )
        except Exception:  # created concurrently by another process
            exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
            if exp is None:
                raise
    mlflow.set_experiment(experiment_id=exp.experiment_id)
    return exp.experiment_id


def flat_params(cfg: AdmConfig, sections: tuple[str, ...] | None = None) -> dict[str, str]:
    """The resolved config as flat ``section.field`` params, without anything secret-looking."""
    data = cfg.model_dump(mode="json")
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif not any(w in prefix.lower() for w in _SECRET_WORDS):
            out[prefix] = str(node)[:500]

    for key, value in data.items():
        if sections is None or key in sections:
            walk(key, value)
    return out


@contextlib.contextmanager
def stage_run(
    cfg: AdmConfig,
    name: str,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    sections: tuple[str, ...] | None = None,
) -> Iterator[Any]:
    """An MLflow run for one stage; a child of ``parent_run_id`` when given."""
    import mlflow

    experiment_id = setup_mlflow(cfg)
    all_tags = {"admflow.stage": name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id, run_name=name, tags=all_tags)
    with mlflow.start_run(run_id=run.info.run_id) as active:
        mlflow.log_params(flat_params(cfg, sections))
        yield active
