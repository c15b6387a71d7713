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
from admflow.preflight import check_writable_dir
from admflow.storage import is_remote, local_path
from admflow.uris import (
    basic_auth_header,
    mask_text,
    mask_uri,
    mask_values,
    shown_tracking_uri,
    tracking_uri_without_credentials,
)

_HEALTH_TIMEOUT_S = 5.0
_SECRET_WORDS = ("secret", "password", "token", "access_key", "credential")


def resolve_tracking_uri(cfg: AdmConfig) -> str:
    """The tracking URI, without credentials: ``user:password@`` moves into MLflow's
    credential variables (admflow.uris), so the URI itself can be passed around and shown."""
    if cfg.tracking.tracking_uri:
        return tracking_uri_without_credentials(cfg.tracking.tracking_uri)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return tracking_uri_without_credentials(env)
    base = Path(".admflow") if is_remote(cfg.storage.root) else Path(local_path(cfg.storage.root))
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


class TrackingError(RuntimeError):
    """An MLflow tracking store that cannot be used; the message names it and the fix."""


shown_uri = shown_tracking_uri  # the one masking rule (admflow.uris), as callers know it


def check_tracking(cfg: AdmConfig) -> str:
    """The tracking URI, once it is known to answer: a few seconds at most, instead of
    MLflow's minutes of retries after the expensive work is done. Returns the URI."""
    uri = resolve_tracking_uri(cfg)
    fix = "start it, or set tracking.tracking_uri / MLFLOW_TRACKING_URI to a running store"
    if uri.startswith(("http://", "https://")):
        probe = urllib.request.Request(uri.rstrip("/") + "/health", headers=basic_auth_header())
        try:
            with urllib.request.urlopen(probe, timeout=_HEALTH_TIMEOUT_S):
                pass
        except urllib.error.HTTPError:
            pass  # it answered: reachable (e.g. a proxy without /health)
        except (OSError, ValueError) as e:
            reason = mask_text(str(getattr(e, "reason", e)))
            raise TrackingError(
                f"MLflow tracking store {shown_uri(uri)} is unreachable ({reason}); {fix}"
            ) from None
    elif uri.startswith("sqlite:///"):
        directory = os.path.dirname(uri[len("sqlite:///") :]) or "."
        check_writable_dir(directory, f"MLflow tracking store {uri}", fix)
        os.makedirs(directory, exist_ok=True)
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
    check_artifact_location(cfg, uri, exp)
    mlflow.set_experiment(experiment_id=exp.experiment_id)
    return exp.experiment_id


def check_experiment(cfg: AdmConfig) -> None:
    """Before a pipeline starts: the store answers and an existing experiment keeps its
    artifacts under this storage root (see :func:`check_artifact_location`). Creates no
    database: a local sqlite store not made yet holds no experiment."""
    import mlflow

    uri = check_tracking(cfg)
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///") :]):
        return
    exp = mlflow.MlflowClient(uri).get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        check_artifact_location(cfg, uri, exp)


def check_artifact_location(cfg: AdmConfig, tracking_uri: str, exp: Any) -> None:
    """An existing experiment keeps the artifact location it was created with: one made
    under another storage root (a typo'd bucket, say) would send every model there."""
    expected = _artifact_location(cfg, tracking_uri)
    found = (exp.artifact_location or "").rstrip("/")
    if expected is None or found == expected.rstrip("/"):
        return
    raise TrackingError(
        f"MLflow experiment {cfg.tracking.experiment!r} in {shown_uri(tracking_uri)} keeps its "
        f"artifacts at {mask_uri(found)}, not under storage.root {mask_uri(cfg.storage.root)}; "
        "use another experiment (--set tracking.experiment=NAME) or delete this one "
        f"(mlflow experiments delete --experiment-id {exp.experiment_id}, then mlflow gc)"
    )


def flat_params(cfg: AdmConfig, sections: tuple[str, ...] | None = None) -> dict[str, str]:
    """The resolved config as flat ``section.field`` params, without anything secret-looking
    and with every URI's credentials masked."""
    data = cfg.model_dump(mode="json")
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif not any(w in prefix.lower() for w in _SECRET_WORDS):
            out[prefix] = mask_text(str(node))[:500]

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
    run_name: str | None = None,
) -> Iterator[Any]:
    """An MLflow run for one stage (tagged ``admflow.stage``: ``name``), named ``run_name``
    (default ``name``); a child of ``parent_run_id`` when given."""
    import mlflow

    experiment_id = setup_mlflow(cfg)
    all_tags = {"admflow.stage": name, **mask_values(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id, run_name=run_name or name, tags=all_tags)
    with mlflow.start_run(run_id=run.info.run_id) as active:
        mlflow.log_params(flat_params(cfg, sections))
        yield active
