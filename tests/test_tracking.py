"""MLflow tracking failures: an unreachable store fails at once naming it (never after the
work, never silently elsewhere); a flow that fails closes its parent run as FAILED."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent


def test_evaluate_against_an_unreachable_store_fails_naming_it(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("ref", "smp"):
        np.savez(tmp_path / f"{name}.npz", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    uri = f"http://alice:hunter2@127.0.0.1:{free_port()}"  # nothing listens there
    store = tmp_path / "store"
    out = subprocess.run(
        [str(Path(sys.executable).parent / "admflow"), "evaluate", "ref.npz", "smp.npz",
         "--set", f"tracking.tracking_uri={uri}", "--set", f"storage.root={store}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    shown = uri.replace("hunter2", "***")
    assert f"admflow evaluate: MLflow tracking store {shown} is unreachable" in out.stderr
    assert "hunter2" not in out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert not (store / "eval-cache").exists()  # failed before any feature was computed
    assert not (tmp_path / "mlruns").exists()  # and fell back to no other store


@pytest.mark.slow  # a Prefect flow run (~20 s idle, more on a loaded machine)
def test_a_failing_flow_marks_its_parent_run_failed(tmp_path):
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.reproduce import reproduce

    empty = tmp_path / "no-images"
    empty.mkdir()
    root = tmp_path / "store"
    overrides = [f"storage.root={root}", f"data.source={empty}"]
    state = reproduce(preset="tiny", overrides=overrides, return_state=True)
    assert state.is_failed() and "no images" in state.message
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("admflow")
    parents = client.search_runs([exp.experiment_id], "tags.`admflow.flow` = 'reproduce'")
    assert [r.info.status for r in parents] == ["FAILED"]
    flow_run_id = parents[0].data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as pc:
        tasks = pc.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    shard = [t for t in tasks if t.name.startswith("shard")]
    assert [(t.state.name, t.run_count) for t in shard] == [("Failed", 1)]  # bad input: no retry


def test_each_flow_tracks_to_its_own_store_in_one_process(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a second configuration in the same
    process (a Prefect worker runs many flows) must still resolve to its own store."""
    import mlflow

    from admflow.config import load_config
    from admflow.tracking import resolve_tracking_uri, setup_mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = (load_config("tiny", [f"storage.root={tmp_path / n}"]) for n in "ab")
    setup_mlflow(first)
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    assert resolve_tracking_uri(second) == f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    # a variable the user set is left as it was, and still honoured
    user = f"sqlite:///{tmp_path / 'user.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", user)
    setup_mlflow(second)
    assert mlflow.get_tracking_uri() == user == resolve_tracking_uri(first)
