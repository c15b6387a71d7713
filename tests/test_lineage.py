"""Lineage descriptions in MLflow that need no pipeline: what a run's description links."""

from __future__ import annotations


def test_a_checkpoint_evaluation_links_its_samples_training_run_and_shards(tmp_path, monkeypatch):
    """The FID-over-training and periodic evaluations (children of the training run) describe
    what they scored as the sweep's evaluations do: the samples, the checkpoint with its
    training run, and the shards that run trained on, each run a link the UI follows."""
    import mlflow

    from admflow.config import load_config
    from admflow.tracking import setup_mlflow
    from tasks.reporting.lineage import NOTE, UPSTREAM
    from tasks.scoring.periodic import checkpoint_eval_tags

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("tiny", [f"storage.root={tmp_path}"])
    eid = setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    manifest = f"{tmp_path}/data/e973f80d/manifest.json"
    shard = client.create_run(eid, run_name="shard 16px").info.run_id
    trained_on = {UPSTREAM + "data_manifest": manifest, UPSTREAM + "shard_run_id": shard}
    train = client.create_run(eid, run_name="train diffusion 16px", tags=trained_on).info.run_id
    ckpt = f"{tmp_path}/runs/diffusion-c4cd/checkpoints/step-000100"
    samples = f"{tmp_path}/runs/diffusion-c4cd/evaluations/step-000100-samples"

    tags = checkpoint_eval_tags(cfg, ckpt, samples, train, 100, 50)

    note = tags[NOTE].splitlines()
    assert (
        note[0] == "Scores of 50 unguided samples of the step-100 checkpoint against the reference."
    )
    assert note[2:] == [
        f"- samples: `{samples}`",
        f"- diffusion checkpoint: [train diffusion 16px](#/experiments/{eid}/runs/{train}) `{ckpt}`",
        f"- shards: [shard 16px](#/experiments/{eid}/runs/{shard}) `{manifest}`",
    ]
    assert tags[UPSTREAM + "train_run_id"] == train
    assert tags[UPSTREAM + "checkpoint"] == ckpt and tags[UPSTREAM + "samples"] == samples
