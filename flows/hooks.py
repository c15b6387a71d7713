"""Flow state hooks: a flow that fails, crashes or is cancelled ends its MLflow parent run
as FAILED or KILLED instead of leaving it RUNNING; a stage task retries only errors that
may pass on a second try."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def _closer(status: str):
    def close_parent(flow: Any, flow_run: Any, state: Any) -> None:
        from admflow.config import load_config
        from tasks.reporting.lineage import close_parent_runs

        params = flow_run.parameters or {}
        try:
            cfg = load_config(params.get("preset") or "tiny", params.get("overrides") or [])
            close_parent_runs(cfg, str(flow_run.id), status)
        except Exception as e:  # a bad config or an unreachable store: nothing to close
            log.warning("could not mark the MLflow parent run %s: %s", status, e)

    return close_parent


PARENT_RUN_HOOKS: dict[str, Any] = {
    "on_failure": [_closer("FAILED")],
    "on_crashed": [_closer("KILLED")],
    "on_cancellation": [_closer("KILLED")],
}


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: bad input (a ValueError such as ShardError or ConfigError) fails at
    once; storage, network and worker errors get their retries."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as e:
            exc = e
    return not isinstance(exc, ValueError)
