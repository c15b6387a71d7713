"""Periodic evaluation of training checkpoints: each checkpoint is scored once, and its FID
is logged against the training step on the training run itself.

A small ledger object per evaluated checkpoint (``<run>/evaluations/step-NNNNNN.json``) is
the record of "done"; it is written only after the metrics are logged, so a crash in the
middle re-evaluates that checkpoint next time instead of skipping it.
"""

from __future__ import annotations

from admflow import storage
from admflow.config import AdmConfig
from admflow.uris import mask_text
from tasks.training.checkpoint import list_checkpoints, read_meta


def training_runs(cfg: AdmConfig, kind: str = "diffusion") -> list[str]:
    """Run directories under ``<root>/runs`` whose checkpoints are of ``kind``."""
    out = []
    for run in storage.ls(storage.join(cfg.storage.root, "runs")):
        ckpts = list_checkpoints(run)
        if ckpts and ckpts[-1].get("kind") == kind:
            out.append(run)
    return out


def _ledger(ckpt_uri: str) -> str:
    run, _, step_dir = ckpt_uri.rstrip("/").rpartition("/checkpoints/")
    return storage.join(run, "evaluations", f"{step_dir}.json")


def unevaluated_checkpoints(cfg: AdmConfig, run_uri: str) -> list[dict]:
    return [c for c in list_checkpoints(run_uri) if not storage.exists(_ledger(c["uri"]))]


def evaluate_checkpoints(
    cfg: AdmConfig,
    ckpts: list[dict],
    reference_uri: str,
    num_samples: int,
    judge: str | None = None,
    scored: dict[str, dict] | None = None,
) -> list[dict]:
    """:func:`evaluate_checkpoint` for each of ``ckpts``, the sets all drawn first and scored
    after, so one sampling pool and one Inception pool serve every checkpoint
    (tasks.runtime.warm). ``scored``: checkpoint URI -> its set's metrics, as there."""
    from tasks.runtime.warm import keep_warm

    known = scored or {}
    todo = [c for c in ckpts if c["uri"] not in known and not storage.exists(_ledger(c["uri"]))]
    with keep_warm():
        drawn = {c["uri"]: _draw(cfg, c, num_samples) for c in todo}
    with keep_warm():
        return [
            evaluate_checkpoint(
                cfg,
                c,
                reference_uri,
                num_samples,
                judge,
                known.get(c["uri"]),
                drawn=drawn.get(c["uri"]),
            )  # fmt: skip
            for c in ckpts
        ]


def evaluate_checkpoint(
    cfg: AdmConfig,
    ckpt: dict,
    reference_uri: str,
    num_samples: int,
    judge: str | None = None,
    scored: dict | None = None,
    drawn: str | None = None,
) -> dict:
    """Sample ``num_samples`` images from one checkpoint, score them, log FID at its step.

    The reference is at the model's resolution (a two-stage pipeline's base model is scored
    at its own size, not upscaled). ``scored``: the metrics (with their
    ``samples`` URI) of this checkpoint's unguided set drawn and scored elsewhere with the
    same sampler and sample count (the reproduce flow's scale-0 set of the final
    checkpoint): recorded as this checkpoint's evaluation instead of drawing the set again.
    ``drawn``: where its set was already drawn (by :func:`evaluate_checkpoints`)."""
    ledger = _ledger(ckpt["uri"])
    if storage.exists(ledger):  # evaluated by an earlier or concurrent run
        return storage.read_json(ledger)
    meta = read_meta(ckpt["uri"])
    train_run = meta.get("mlflow_run_id") or _training_run_id(cfg, meta.get("run_name"))
    if scored is None:
        out = drawn or _draw(cfg, ckpt, num_samples)
        metrics = _score(cfg, ckpt, out, reference_uri, num_samples, judge, train_run)
    else:
        out, metrics = scored["samples"], scored
    if train_run:
        _log_against_step(cfg, train_run, metrics, ckpt["step"])
    record = {
        "step": ckpt["step"],
        "checkpoint": ckpt["uri"],
        "samples": out,
        "train_run_id": train_run,
        **_numbers(metrics),
    }
    storage.write_json(ledger, record)
    return record


def _draw(cfg: AdmConfig, ckpt: dict, num_samples: int) -> str:
    """The checkpoint's unguided set, beside its ledger; returns where."""
    from tasks.sampling.build import build_spec
    from tasks.sampling.sample_set import sample_set
    from tasks.sampling.spec import ExecutionOptions

    out = storage.join(_ledger(ckpt["uri"]).removesuffix(".json") + "-samples")
    spec = build_spec(cfg, ckpt["uri"], num_samples=num_samples)  # unguided
    sample_set(cfg, spec, out, ExecutionOptions.from_config(cfg))
    return out


def _score(
    cfg: AdmConfig,
    ckpt: dict,
    out: str,
    reference_uri: str,
    num_samples: int,
    judge: str | None,
    train_run: str | None,
) -> dict:
    from tasks.scoring.evaluate import evaluate_sets

    tags = checkpoint_eval_tags(cfg, ckpt["uri"], out, train_run, ckpt["step"], num_samples)
    size = cfg.model.image_size
    return evaluate_sets(
        cfg, reference_uri, out, parent_run_id=train_run, tags=tags, judge=judge,
        run_name=f"evaluate step {ckpt['step']} {size}px",
        params={"set.stage": "checkpoint", "set.step": str(ckpt["step"]),
                "set.classifier_scale": "0.0", "set.image_size": str(size)},
    )  # fmt: skip


def checkpoint_eval_tags(
    cfg: AdmConfig, checkpoint: str, samples: str, train_run: str | None, step: int, n: int
) -> dict[str, str]:
    """Tags (with a description) for the evaluation of ``n`` unguided samples of one
    checkpoint, as the sweep's evaluations have: links to the samples, the checkpoint's
    training run and, through that run's tags, the shards it trained on."""
    from tasks.reporting.lineage import NOTE, UPSTREAM, note

    tags = {UPSTREAM + "checkpoint": checkpoint, UPSTREAM + "samples": samples}
    items = [("samples", None, samples), ("diffusion checkpoint", train_run, checkpoint)]
    if train_run:
        import mlflow

        from admflow.tracking import setup_mlflow

        setup_mlflow(cfg)  # the note looks the training run up in the configured store
        trained = mlflow.MlflowClient().get_run(train_run).data.tags
        tags[UPSTREAM + "train_run_id"] = train_run
        if manifest := trained.get(UPSTREAM + "data_manifest"):
            items.append(("shards", trained.get(UPSTREAM + "shard_run_id") or None, manifest))
    title = f"Scores of {n} unguided samples of the step-{step} checkpoint against the reference."
    tags[NOTE] = note(title, items)
    return {k: mask_text(v) for k, v in tags.items()}


def _training_run_id(cfg: AdmConfig, run_name: str | None) -> str | None:
    """The MLflow run that trained ``run_name`` (tagged ``admflow.run_name`` by tasks.training.launch)."""
    if not run_name:
        return None
    import mlflow

    from admflow.tracking import setup_mlflow

    exp_id = setup_mlflow(cfg)
    runs = mlflow.MlflowClient().search_runs(
        [exp_id],
        filter_string=f"tags.`admflow.run_name` = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _numbers(metrics: dict) -> dict:
    keys = ("fid", "sfid", "inception_score", "precision", "recall", "class_accuracy")
    return {k: metrics.get(k) for k in keys}


def _log_against_step(cfg: AdmConfig, run_id: str, metrics: dict, step: int) -> None:
    import mlflow

    from admflow.tracking import setup_mlflow

    setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    for key, value in _numbers(metrics).items():
        if value is not None:
            client.log_metric(run_id, f"eval/{key}", float(value), step=int(step))
