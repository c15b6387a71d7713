"""Flow state hooks: a flow that fails, crashes, is cancelled or is interrupted (SIGINT,
SIGTERM) ends its MLflow parent run, and every stage run under it still RUNNING, as FAILED
or KILLED; a stage task retries only transient faults (:mod:`admflow.faults`)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def flow_config(params: dict[str, Any]):
    """The config a flow run was started with, from its parameters (the paper flow's row
    names its preset and settings; the other flows take ``preset`` and ``overrides``)."""
    from admflow.config import load_config

    if params.get("row"):
        from admflow.paper import find_row

        entry = find_row(params["row"])[1]
        settings = entry.overrides(params.get("num_samples")) + list(params.get("overrides") or [])
        return load_config(entry.preset, settings)
    return load_config(params.get("preset") or "tiny", params.get("overrides") or [])


def _close(flow_run: Any, status: str) -> None:
    from tasks.reporting.lineage import close_parent_runs

    try:
        close_parent_runs(flow_config(flow_run.parameters or {}), str(flow_run.id), status)
    except Exception as e:  # a bad config or an unreachable store: nothing to close
        log.warning("could not mark the MLflow parent run %s: %s", status, e)


def _closer(status: str):
    def close_parent(flow: Any, flow_run: Any, state: Any) -> None:
        _close(flow_run, status)

    return close_parent


def close_on_interrupt(flow: Any, flow_run: Any, state: Any) -> None:
    """While the flow runs, a SIGINT or SIGTERM closes its MLflow runs as KILLED and its
    Prefect flow run as crashed at once: the process ends without unwinding the stages'
    threads (see admflow.interrupt)."""
    from admflow import interrupt

    interrupt.on_stop(("flow", str(flow_run.id)), lambda: _interrupted(flow_run))


def _interrupted(flow_run: Any) -> None:
    _close(flow_run, "KILLED")
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            message = "interrupted by SIGINT or SIGTERM; rerun to resume"
            client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
    except Exception as e:  # the API went down with the same Ctrl-C: nothing to tell
        log.debug("could not mark the flow run crashed: %s", e)


PARENT_RUN_HOOKS: dict[str, Any] = {
    "on_running": [close_on_interrupt],
    "on_failure": [_closer("FAILED")],
    "on_crashed": [_closer("KILLED")],
    "on_cancellation": [_closer("KILLED")],
}


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: only a transient fault (a lost connection, a timeout, HTTP 5xx,
    throttling, a lost Ray node) gets the retries; bad input and bugs fail at once, and
    nothing is retried once the process was asked to stop."""
    from admflow import interrupt
    from admflow.faults import is_transient

    if interrupt.stopping():
        return False
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as e:
            exc = e
    return is_transient(exc if isinstance(exc, BaseException) else None)
