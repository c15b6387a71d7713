"""`admflow nll`'s sharded bound: it equals calc_bpd_loop on the same images with the same
noise, a rerun computes only the missing shards, and on Ray (and through the Prefect flow) it
gives the same numbers as in one process, logged to MLflow as nll_bpd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from admflow import storage
from admflow.config import load_config
from models.build import build_unet
from models.diffusion_factory import create_diffusion
from models.likelihood import calc_bpd_loop
from tasks.data.read import to_model_input
from tasks.likelihood.run import compute_bound, read_shard
from tasks.likelihood.spec import NOISE_STREAM, NllOptions, build_nll_spec
from tasks.likelihood.testset import load_test_set
from tasks.sampling.spec import batch_seed

STEPS = 5
IMAGES, SHARD, BATCH = 7, 3, 2  # shards of 3, 3, 1; micro-batches of 2, 1


def tiny(root) -> object:
    return load_config(
        "tiny",
        [
            f"diffusion.steps={STEPS}",
            f"sampling.timestep_respacing='{STEPS}'",
            f"storage.root={root}",
            "compute.device=cpu",
            "compute.torch_threads=1",
        ],
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny class-conditional network with random weights everywhere (the zero-initialised
    output layers too, so the bound depends on it) and 7 random test images with labels."""
    root = tmp_path_factory.mktemp("nll")
    cfg = tiny(root / "store")
    torch.manual_seed(0)
    net = build_unet(cfg.model)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn_like(p) * 0.02)
    torch.save(net.state_dict(), root / "tiny.pt")
    rng = np.random.default_rng(0)
    size = cfg.model.image_size
    images = rng.integers(0, 256, (IMAGES, size, size, 3), dtype=np.uint8)
    np.savez(root / "test.npz", images, rng.integers(0, 10, IMAGES))
    return cfg, str(root / "tiny.pt"), str(root / "test.npz"), net.eval()


def run(cfg, ckpt, data, out, workers=0, seed=0, max_shards=None, limit=None) -> dict:
    test = load_test_set(data, limit)
    spec = build_nll_spec(cfg, ckpt, test, shard_size=SHARD, batch_size=BATCH, seed=seed)
    options = NllOptions(workers=workers, device="cpu", max_shards=max_shards, progress=False)
    return compute_bound(cfg, spec, test, str(out), options)


def per_image(out) -> np.ndarray:
    manifest = storage.read_json(f"{out}/manifest.json")
    entries = sorted(manifest["shards"], key=lambda e: e["index"])
    return np.concatenate([read_shard(str(out), e)["total_bpd"] for e in entries])


def test_the_sharded_bound_equals_calc_bpd_loop_on_the_same_images(inputs, tmp_path):
    cfg, ckpt, data, net = inputs
    result = run(cfg, ckpt, data, tmp_path / "out")
    assert result["complete"] and result["num_images"] == IMAGES
    assert result["num_timesteps"] == STEPS  # the model's own timesteps, all of them
    with np.load(data) as z:
        x = torch.from_numpy(to_model_input(z["arr_0"]))
        y = torch.from_numpy(z["arr_1"])
    diffusion = create_diffusion(cfg.diffusion)
    want = []
    for shard, lo in enumerate(range(0, IMAGES, SHARD)):
        for b, start in enumerate(range(lo, min(lo + SHARD, IMAGES), BATCH)):
            stop = min(start + BATCH, lo + SHARD, IMAGES)
            gen = torch.Generator().manual_seed(batch_seed(0, shard, b, NOISE_STREAM))
            out = calc_bpd_loop(
                diffusion, net, x[start:stop], model_kwargs={"y": y[start:stop]}, generator=gen
            )
            want.append(out["total_bpd"])
    want_images = torch.cat(want).numpy()
    np.testing.assert_allclose(per_image(tmp_path / "out"), want_images, rtol=1e-6)
    assert result["nll_bpd"] == pytest.approx(float(want_images.mean()), rel=1e-6)
    assert 1.0 < result["nll_bpd"] < 30.0  # random images under a random network: bits, not noise
    saved = storage.read_json(str(tmp_path / "out" / "result.json"))
    assert len(saved["vb_bpd_per_timestep"]) == STEPS
    terms = sum(saved["vb_bpd_per_timestep"]) + saved["prior_bpd"]
    assert terms == pytest.approx(saved["nll_bpd"], rel=1e-6)  # the breakdown adds up


def test_a_rerun_computes_only_the_missing_shards(inputs, tmp_path):
    cfg, ckpt, data, _ = inputs
    first = run(cfg, ckpt, data, tmp_path / "out", max_shards=1)
    assert not first["complete"] and first["shards_computed"] == 1
    assert not (tmp_path / "out" / "result.json").exists()
    # a shard whose file no longer matches its checksum is computed again
    second = run(cfg, ckpt, data, tmp_path / "out", max_shards=1)
    assert (second["shards_skipped"], second["shards_computed"]) == (1, 1)
    (tmp_path / "out" / "shards" / "bound_000000.npz").write_bytes(b"damaged")
    third = run(cfg, ckpt, data, tmp_path / "out")
    assert (third["shards_skipped"], third["shards_computed"]) == (1, 2) and third["complete"]
    whole = run(cfg, ckpt, data, tmp_path / "whole")
    np.testing.assert_array_equal(per_image(tmp_path / "out"), per_image(tmp_path / "whole"))
    assert third["nll_bpd"] == whole["nll_bpd"]
    again = run(cfg, ckpt, data, tmp_path / "out")
    assert again["shards_computed"] == 0 and again["nll_bpd"] == whole["nll_bpd"]


def test_another_evaluation_never_mixes_into_a_result(inputs, tmp_path):
    cfg, ckpt, data, _ = inputs
    run(cfg, ckpt, data, tmp_path / "out", max_shards=1)
    with pytest.raises(storage.StorageError, match="already holds another result"):
        run(cfg, ckpt, data, tmp_path / "out", seed=1)


def test_a_test_set_the_network_cannot_read_is_refused(inputs, tmp_path):
    from admflow.config import ConfigError

    cfg, ckpt, _, _ = inputs
    np.savez(tmp_path / "nolabels.npz", np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ConfigError, match="class-conditional; test set .* has no labels"):
        build_nll_spec(
            cfg, ckpt, load_test_set(str(tmp_path / "nolabels.npz")), shard_size=1, batch_size=1
        )
    np.savez(tmp_path / "big.npz", np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, np.int64))
    with pytest.raises(ConfigError, match="32px images; the network takes 16px"):
        build_nll_spec(
            cfg, ckpt, load_test_set(str(tmp_path / "big.npz")), shard_size=1, batch_size=1
        )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_on_ray_the_bound_is_the_in_process_one_and_is_logged(inputs, tmp_path, ray_session):
    import mlflow

    from tasks.likelihood.run import log_bound

    cfg, ckpt, data, _ = inputs
    local = run(cfg, ckpt, data, tmp_path / "local")
    on_ray = run(cfg, ckpt, data, tmp_path / "ray", workers=2)
    assert on_ray["complete"] and on_ray["shards_computed"] == 3
    np.testing.assert_allclose(
        per_image(tmp_path / "ray"), per_image(tmp_path / "local"), rtol=1e-6
    )
    assert on_ray["nll_bpd"] == pytest.approx(local["nll_bpd"], rel=1e-6)
    run_id = log_bound(cfg, str(tmp_path / "ray"))
    logged = mlflow.MlflowClient().get_run(run_id).data
    assert logged.metrics["nll_bpd"] == pytest.approx(on_ray["nll_bpd"])
    assert logged.params["nll.timesteps"] == str(STEPS)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_prefect_flow_gives_the_same_bound(inputs, tmp_path, ray_session):
    from flows.nll import nll

    cfg, ckpt, data, _ = inputs
    overrides = [
        f"diffusion.steps={STEPS}", f"sampling.timestep_respacing='{STEPS}'",
        f"storage.root={tmp_path / 'store'}", "compute.device=cpu", "compute.torch_threads=1",
    ]  # fmt: skip
    result = nll(
        "tiny", ckpt, data, out=str(tmp_path / "flow"), overrides=overrides,
        batch_size=BATCH, shard_size=SHARD, workers=2,
    )  # fmt: skip
    local = run(cfg, ckpt, data, tmp_path / "local")
    assert result["complete"] and result["mlflow_run_id"]
    assert result["nll_bpd"] == pytest.approx(local["nll_bpd"], rel=1e-6)


def test_the_command_prints_bits_per_dim_and_wall_time(inputs, tmp_path, capsys):
    from admflow.cli import main

    cfg, ckpt, data, _ = inputs
    argv = [
        "nll", "--config", "tiny", "--checkpoint", ckpt, "--data", data, "--workers", "0",
        "--shard-size", str(SHARD), "--batch-size", str(BATCH), "--no-mlflow", "--no-progress",
        "--out", str(tmp_path / "out"),
        "--set", f"diffusion.steps={STEPS}", "--set", f"sampling.timestep_respacing='{STEPS}'",
        "--set", f"storage.root={tmp_path / 'store'}", "--set", "compute.device=cpu",
    ]  # fmt: skip
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    want = storage.read_json(str(tmp_path / "out" / "result.json"))["nll_bpd"]
    assert (
        line.startswith(f"NLL {want:.4f} ± ") and f"over {IMAGES} images, {STEPS} timesteps" in line
    )
    assert "wall time" in line


@pytest.mark.parametrize(
    "data, message",
    [
        ("missing.npz", "test set .*missing.npz not found"),
        ("bad.npz", "arr_0 is float64 .*expected uint8"),
    ],
)
def test_bad_test_sets_are_one_line_errors(inputs, tmp_path, capsys, data, message):
    import re

    from admflow.cli import main

    _, ckpt, _, _ = inputs
    np.savez(tmp_path / "bad.npz", np.zeros((2, 16, 16, 3)))
    argv = ["nll", "--config", "tiny", "--checkpoint", ckpt, "--data", str(tmp_path / data)]
    argv += ["--no-mlflow", "--set", f"storage.root={tmp_path / 'store'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and re.search(message, err), err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_shard_set_gives_the_bound_of_the_same_images_as_an_npz(inputs, tmp_path, ray_session):
    from tasks.data.shard import shard_dataset

    cfg, ckpt, _, _ = inputs
    shard_dataset(cfg, "demo", str(tmp_path / "demo"), progress=False)
    test = load_test_set(str(tmp_path / "demo"), limit=5)
    assert test.images.shape == (5, 16, 16, 3) and test.labels is not None
    np.savez(tmp_path / "same.npz", test.images, test.labels)
    from_shards = run(cfg, ckpt, str(tmp_path / "demo"), tmp_path / "a", limit=5)
    from_npz = run(cfg, ckpt, str(tmp_path / "same.npz"), tmp_path / "b")
    assert from_shards["num_images"] == 5 == from_npz["num_images"]
    np.testing.assert_array_equal(per_image(tmp_path / "a"), per_image(tmp_path / "b"))
