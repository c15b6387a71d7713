"""`--plan`: every input checked and the run's plan printed without starting Ray or Prefect,
in seconds; the same checks open every real run (a corrupt checkpoint, a reference of the
wrong size, missing Inception weights: one line, rc 2)."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch

from admflow.cli import main
from admflow.config import load_config
from admflow.paper import load_rows
from models.build import build_network

SECTIONS = {"diffusion": "model", "classifier": "classifier", "upsampler": "upsampler"}


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """`--plan` as a command sees it: no Ray in the process yet, so the plan describes the
    local Ray it would start (the suite's shared Ray session, when up, is not that)."""
    from tasks import resources
    from tasks.runtime.cluster import Cluster

    monkeypatch.setattr(resources, "cluster_for", Cluster.local_for)


def fabricate(path, section) -> None:
    """A state dict in the released layout (every name and shape) whose tensors are views of
    one number each, so that a 2 GB network costs a few kilobytes on disk."""
    net = build_network(section, device="meta")
    torch.save({k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in
                net.state_dict().items()}, path)  # fmt: skip


def fabricate_row(directory, row) -> None:
    for kind, network in row.networks().items():
        fabricate(directory / network.file, getattr(load_config(network.preset), SECTIONS[kind]))
    cfg = load_config(row.preset)
    size = cfg.upsampler.unet.image_size if row.upsampler else cfg.model.image_size
    np.savez(directory / row.reference, arr_0=np.zeros((4, size, size, 3), np.uint8))


def plan(capsys, *argv: str) -> tuple[int, str, str, float]:
    start = time.perf_counter()
    rc = main(list(argv))
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    return rc, out, err.strip(), elapsed


@pytest.mark.slow  # 22 rows, each a few seconds of checks
def test_plan_on_every_paper_row(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ADMFLOW_STORAGE_ROOT", str(tmp_path / "store"))
    rows = load_rows().rows
    assert len(rows) >= 20
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    for row in rows:
        files = tmp_path / row.id
        files.mkdir()
        fabricate_row(files, row)
        args = ["paper", "run", row.id, "--checkpoints", str(files), "--reference", str(files)]
        rc, out, err, elapsed = plan(capsys, *args, "--plan", "--set", "compute.use_gpu=false")
        assert rc == 0, (row.id, err)
        assert elapsed < 10, (row.id, elapsed)
        for network in row.networks().values():
            assert f"{network.file}: " in out and ", fits" in out
        assert "50,000 images x " in out and "placement:" in out, out
        steps = row.steps.removeprefix("ddim")
        assert f"x {steps} NFE" in out, (row.id, out)
    assert ray_was_up or "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


@pytest.fixture
def row64(tmp_path):
    row = load_rows().row("imagenet64-adm-dropout")
    fabricate_row(tmp_path, row)
    return tmp_path


def _paper(row64, *extra: str) -> list[str]:
    return ["paper", "run", "imagenet64-adm-dropout", "--checkpoints", str(row64),
            "--reference", str(row64), "--plan", "--set", "compute.use_gpu=false", *extra]  # fmt: skip


def test_a_corrupt_checkpoint_is_one_line(row64, capsys):
    ckpt = row64 / "64x64_diffusion.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # truncated
    rc, _, err, elapsed = plan(capsys, *_paper(row64))
    assert rc == 2 and "\n" not in err and "64x64_diffusion.pt" in err and elapsed < 10


def test_another_architecture_names_the_first_mismatch(row64, capsys):
    fabricate(row64 / "64x64_diffusion.pt", load_config("imagenet128").model)
    rc, _, err, _ = plan(capsys, *_paper(row64))
    assert rc == 2 and "\n" not in err
    assert "64x64_diffusion.pt does not fit" in err and "has shape" in err and "more)" in err


def test_a_reference_of_the_wrong_size_is_one_line(row64, capsys):
    np.savez(row64 / "VIRTUAL_imagenet64_labeled.npz", arr_0=np.zeros((2, 32, 32, 3), np.uint8))
    rc, _, err, elapsed = plan(capsys, *_paper(row64))
    assert rc == 2 and "\n" not in err and elapsed < 10
    assert "32px images, but this run's samples are 64px" in err


def test_missing_inception_weights_are_one_line(row64, capsys, tmp_path):
    gone = tmp_path / "pt_inception.pt"
    rc, _, err, elapsed = plan(
        capsys, *_paper(row64, "--set", f"evaluation.inception_weights={gone}")
    )
    assert rc == 2 and "\n" not in err and elapsed < 10
    assert "evaluation.inception_weights" in err and "not found" in err


def test_sample_plan_counts_guided_work_and_places_actors(tmp_path, capsys):
    cfg = load_config("tiny")
    fabricate(tmp_path / "d.pt", cfg.model)
    fabricate(tmp_path / "c.pt", cfg.classifier)
    args = ["sample", "--checkpoint", str(tmp_path / "d.pt"), "--classifier", str(tmp_path / "c.pt"),
            "--classifier-scale", "8", "--num-samples", "300", "--out", str(tmp_path / "s"),
            "--set", f"storage.root={tmp_path / 'store'}", "--workers", "2", "--plan"]  # fmt: skip
    rc, out, err, _ = plan(capsys, *args)
    assert rc == 0, err
    assert "300 images x 50 NFE (guided" in out
    assert "sample                 2 actors" in out or "sample              2 actors" in out
    assert not (tmp_path / "s").exists() and not (tmp_path / "store").exists()


def test_the_shipped_memory_counts_belong_to_this_code():
    """--plan reads the networks' activation counts from tasks/memory_profiles.json; after a
    change to the code that builds or counts the networks they must be counted again."""
    from tasks import memory

    assert memory._shipped(), (
        "tasks/memory_profiles.json is stale: run python benchmarks/memory_table.py "
        "--write-profiles"
    )
    for preset in ("imagenet64", "imagenet256", "upsampler128-512"):
        cfg = load_config(preset)
        batch = cfg.training.batches("diffusion")[1]
        key = memory._profile_key("unet", cfg.model.model_dump_json(), "train", True, batch)
        assert key in memory._shipped() or preset == "upsampler128-512"


def test_gpu_plan_prints_the_memory_estimate(row64, capsys):
    args = _paper(row64)[:-2] + ["--set", "compute.local_gpus=1", "--set", "compute.device=cpu"]
    rc, out, err, _ = plan(capsys, *args)
    assert rc == 0, err
    assert "memory per GPU" in out and "peak GiB" in out
    sample = next(
        ln
        for ln in out.splitlines()
        if ln.strip().startswith("sample ") and "GiB" not in ln and "fp" in ln
    )
    assert "yes" in sample


def test_actors_sharing_a_gpu_must_fit_it_together(tmp_path, capsys):
    """8 guided 64 px sampling actors on one GPU hold 8 replicas (about 8 x 13 GiB): refused
    before anything starts, naming the actor count that fits; 4 fit and the plan says so."""
    cfg = load_config("imagenet64")
    fabricate(tmp_path / "d.pt", cfg.model)
    fabricate(tmp_path / "c.pt", cfg.classifier)
    args = ["sample", "--config", "imagenet64", "--checkpoint", str(tmp_path / "d.pt"),
            "--classifier", str(tmp_path / "c.pt"), "--out", str(tmp_path / "s"), "--plan",
            "--set", "compute.local_gpus=1", "--set", "compute.device=cpu",
            "--set", f"storage.root={tmp_path / 'store'}"]  # fmt: skip
    rc, _, err, _ = plan(capsys, *args)
    assert rc == 2 and "\n" not in err
    assert "sampling.workers=8 puts 8 sample actors on each GPU" in err
    assert "set sampling.workers=4" in err
    rc, out, err, _ = plan(capsys, *args, "--workers", "4")
    assert rc == 0, err
    assert "sample: 4 actors share each GPU, 4 x 13." in out
