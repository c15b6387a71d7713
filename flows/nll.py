"""Likelihood as Improved DDPM reports it: the variational bound in bits/dim of a test set,
over the model's own timesteps, sharded on Ray (:mod:`tasks.likelihood`). A retried or rerun
flow with the same ``out`` computes only the shards still missing."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from admflow.config import load_config
from flows import stages


@task(name="nll-bound", **stages.RETRY)  # type: ignore[arg-type]
def bound(cfg, checkpoint: str, data: str, out: str | None, settings: dict) -> dict:
    from admflow import storage
    from tasks.likelihood.run import compute_bound
    from tasks.likelihood.spec import NllOptions, build_nll_spec
    from tasks.likelihood.testset import load_test_set

    test = load_test_set(data, settings["num_images"])
    spec = build_nll_spec(
        cfg,
        checkpoint,
        test,
        shard_size=settings["shard_size"],
        batch_size=settings["batch_size"],
        seed=settings["seed"],
        clip_denoised=settings["clip_denoised"],
    )
    options = NllOptions(
        workers=settings["workers"],
        device=cfg.compute.device,
        torch_threads=cfg.compute.torch_threads,
        progress=False,
    )
    out = out or storage.join(cfg.storage.root, "nll", spec.fingerprint())
    return compute_bound(cfg, spec, test, out, options)


@task(name="nll-log")
def log(cfg, out: str) -> str:
    from tasks.likelihood.run import log_bound

    return log_bound(cfg, out)


@flow(name="nll", log_prints=True)
def nll(
    preset: str,
    checkpoint: str,
    data: str,
    out: str | None = None,
    overrides: list[str] | None = None,
    num_images: int | None = None,
    batch_size: int = 8,
    shard_size: int = 100,
    workers: int | None = None,
    seed: int = 0,
    clip_denoised: bool = True,
    log_mlflow: bool = True,
) -> dict:
    """E.g. preset=iddpm-cifar10-vlb, checkpoint=cifar10_uncond_vlb_50M_500K.pt,
    data=<the CIFAR-10 test set as an .npz or shard set>: Improved DDPM's CIFAR-10 NLL."""
    cfg = load_config(preset, overrides or [])
    settings = {
        "num_images": num_images,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "workers": cfg.sampling.workers if workers is None else workers,
        "seed": seed,
        "clip_denoised": clip_denoised,
    }
    result = bound(cfg, checkpoint, data, out, settings)
    if result["complete"] and log_mlflow:
        result["mlflow_run_id"] = log(cfg, result["uri"])
    if result["complete"]:
        get_run_logger().info(
            "NLL %.4f bits/dim over %d images (%d timesteps)",
            result["nll_bpd"],
            result["num_images"],
            result["num_timesteps"],
        )
    return result
