"""The paper path: the registry of the paper's rows, `admflow paper list`, and `admflow paper
run` end to end on CPU through the production code path (sample flow, Ray actors, evaluator,
MLflow, Prefect) with a released-layout checkpoint of the 64x64 row's network at reduced size
(the row run with --set overrides) and a small reference batch in the evaluator's format."""

from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pytest
import torch

from admflow.config import load_config
from admflow.paper import load_rows

ROW = "imagenet64-adm-dropout"
SMALL = [  # the row's network at 16x16 with 32 channels: same code path, seconds on a CPU
    "data.image_size=16",
    "model.image_size=16",
    "model.model_channels=32",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[8]",
    "model.num_head_channels=32",
    "sampling.timestep_respacing='3'",
    "sampling.batch_size=4",
    "sampling.shard_size=4",
    "sampling.workers=1",
    "compute.torch_threads=1",
    "evaluation.workers=0",
    "evaluation.fid_method=eigh",
    # the paper presets ask for GPUs: the shared Ray session offers one logical GPU, torch
    # stays on the CPU
    "compute.use_gpu=true",
    "compute.device=cpu",
]
N = 8


def test_registry_holds_the_papers_rows():
    reg = load_rows()
    assert len(reg.rows) >= 12
    fid = {r.id: r.published.fid for r in reg.rows}
    assert fid[ROW] == 2.07 and fid["imagenet128-adm-g"] == 2.97
    assert fid["imagenet256-adm-g"] == 4.59 and fid["imagenet256-adm-g-adm-u"] == 3.94
    assert fid["imagenet512-adm-g"] == 7.72 and fid["imagenet512-adm-g-adm-u"] == 3.85
    assert (fid["lsun-bedroom"], fid["lsun-horse"], fid["lsun-cat"]) == (1.90, 2.57, 5.57)
    two_stage = reg.row("imagenet256-adm-g-adm-u")
    assert two_stage.upsampler and two_stage.upsampler.file == "64_256_upsampler.pt"
    assert reg.row("imagenet128-adm-g-ddim25").sampler == "ddim"
    for row in reg.rows:
        for name in row.files():
            assert reg.url(name).startswith("https://openaipublic.blob.core.windows.net/")
        cfg = load_config(row.preset, row.overrides())
        assert cfg.sampling.timestep_respacing == row.steps


def test_list_prints_rows_numbers_and_downloads(capsys):
    from admflow.cli import main

    assert main(["paper", "list"]) == 0
    out = capsys.readouterr().out
    assert "imagenet256-adm-g-adm-u" in out and "3.94" in out
    assert "jul-2021/ref_batches/imagenet/512/VIRTUAL_imagenet512.npz" in out
    assert main(["paper", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["rows"]) >= 12 and data["rows"][0]["published"]["fid"] > 0


def test_missing_checkpoint_names_it_and_its_download(tmp_path, capsys):
    from admflow.cli import main

    ref = tmp_path / "VIRTUAL_imagenet64_labeled.npz"
    np.savez(ref, arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    rc = main(["paper", "run", ROW, "--checkpoints", str(tmp_path), "--reference", str(ref)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "64x64_diffusion.pt not found" in err
    assert "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/64x64_diffusion.pt" in err
    assert "VIRTUAL_imagenet64" not in err  # the reference is there


def _released_checkpoint(directory, cfg, name: str = "64x64_diffusion.pt") -> str:
    """A plain state dict under the released file ``name`` (the layout OpenAI published)."""
    from models.build import build_unet

    torch.manual_seed(0)
    net = build_unet(cfg.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero output layers: images that are not all one colour
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    path = directory / name
    torch.save(net.state_dict(), path)
    return str(path)


def _reference_batch(path, size: int = 16) -> None:
    """Smooth random images, uint8 NHWC in arr_0, like the evaluator's batches."""
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (12, 4, 4, 3)).astype(np.float32)
    images = low.repeat(size // 4, axis=1).repeat(size // 4, axis=2)
    np.savez(path, arr_0=images.astype(np.uint8))


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_paper_run_tables_ours_beside_published_with_lineage(ray_session, tmp_path, capsys):
    import mlflow

    from admflow.cli import main
    from admflow.tracking import setup_mlflow

    released = tmp_path / "released"
    released.mkdir()
    root = tmp_path / "store"
    overrides = [*SMALL, f"storage.root={root}"]
    row = load_rows().row(ROW)
    cfg = load_config(row.preset, row.overrides(N) + overrides)
    ckpt = _released_checkpoint(released, cfg)
    ref = tmp_path / "VIRTUAL_imagenet64_labeled.npz"
    _reference_batch(ref)

    args = ["paper", "run", ROW, "--checkpoints", str(released), "--reference", str(ref)]
    args += ["--num-samples", str(N)] + [f"--set={o}" for o in overrides]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| metric | ours | published | ours - published |" in out
    lines = {ln.split("|")[1].strip(): ln.split("|")[2:5] for ln in out.splitlines() if "| " in ln}
    ours, published, diff = (float(c) for c in lines["FID"])
    assert published == pytest.approx(2.07) and math.isfinite(ours) and ours > 0
    assert diff == pytest.approx(ours - published, abs=1e-3)
    assert [float(c) for c in lines["sFID"][1:2] + lines["recall"][1:2]] == [4.29, 0.63]
    assert "not comparable with the paper" in out  # 8 samples, not 50K

    setup_mlflow(cfg)
    parents = mlflow.search_runs(filter_string=f"tags.`admflow.paper_row` = '{ROW}'")
    assert len(parents) == 1
    parent = parents.iloc[0]
    assert parent["tags.admflow.upstream.diffusion"] == ckpt
    assert parent["tags.admflow.upstream.reference"] == str(ref)
    samples = parent["tags.admflow.upstream.samples"]
    assert parent["metrics.published/fid"] == pytest.approx(2.07)
    assert parent["metrics.ours/fid"] == pytest.approx(ours, abs=1e-3)
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}'")
    evaluation = children[children["run_id"] == parent["tags.admflow.upstream.evaluate_run_id"]]
    assert len(evaluation) == 1
    assert evaluation.iloc[0]["tags.admflow.upstream.samples"] == samples
    assert evaluation.iloc[0]["tags.admflow.upstream.checkpoint"] == ckpt
    assert evaluation.iloc[0]["metrics.fid"] == pytest.approx(ours, abs=1e-3)
    assert len(children) >= 2  # the sample set's run and the evaluation

    report = json.loads((root / "reports" / parent["run_id"] / "paper.json").read_text())
    assert report["row"] == ROW and report["num_samples"] == N
    manifest = json.loads((tmp_path / samples / "manifest.json").read_text())
    assert manifest["num_samples"] == N and manifest["image_size"] == 16


TWO_STAGE = "imagenet256-adm-g-adm-u"
SMALL_STACK = [  # 16px guided base -> 32px upsampler: the two-stage row at a CPU's size
    *SMALL[:6],
    "classifier.image_size=16",
    "classifier.width=32",
    "classifier.depth=1",
    "classifier.attention_resolutions=[8]",
    "classifier.num_head_channels=32",
    "upsampler.small_size=16",
    "upsampler.unet.image_size=32",
    "upsampler.unet.model_channels=32",
    "upsampler.unet.num_res_blocks=1",
    "upsampler.unet.attention_resolutions=[8]",
    *SMALL[6:],
]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_two_stage_row_scores_the_upsampled_images(ray_session, tmp_path, capsys):
    from admflow.cli import main
    from models.build import build_classifier, build_upsampler

    released = tmp_path / "released"
    released.mkdir()
    row = load_rows().row(TWO_STAGE)
    overrides = [*SMALL_STACK, f"storage.root={tmp_path / 'store'}"]
    cfg = load_config(row.preset, row.overrides(4) + overrides)
    _released_checkpoint(released, cfg)
    torch.manual_seed(1)
    torch.save(build_classifier(cfg.classifier).state_dict(), released / "64x64_classifier.pt")
    torch.save(build_upsampler(cfg.upsampler).state_dict(), released / "64_256_upsampler.pt")
    ref = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    _reference_batch(ref, size=32)  # the upsampler's resolution: only the last stage is scored

    args = ["paper", "run", TWO_STAGE, "--checkpoints", str(released), "--reference", str(ref)]
    assert main(args + ["--num-samples", "4"] + [f"--set={o}" for o in overrides]) == 0
    out = capsys.readouterr().out
    assert "| FID |" in out and "| 3.940 |" in out  # Table 6's ADM-G + ADM-U
    samples = next(ln.split()[-1] for ln in out.splitlines() if ln.startswith("samples:"))
    meta = json.loads((tmp_path / samples / "metadata.json").read_text())
    assert meta["kind"] == "upsample" and meta["classifier_scale"] == 1.0  # guided base
    manifest = json.loads((tmp_path / samples / "manifest.json").read_text())
    assert manifest["image_size"] == 32 and manifest["num_samples"] == 4


def _task_runs_of(flow_run_id) -> list:
    """The task runs of a flow run and of its subflow runs."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        sub = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
            )
        )
        ids = [flow_run_id, *(r.id for r in sub)]
        return client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids))
        )


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_corrupt_checkpoint_fails_once_and_its_runs_end_failed(ray_session, tmp_path):
    """In the flow itself (the CLI refuses such a file before it starts the flow): bad input
    is not retried, only transient faults are, and the row's MLflow parent run, with every
    stage run under it, ends FAILED instead of staying RUNNING."""
    from mlflow import MlflowClient

    from admflow.tracking import setup_mlflow
    from flows.paper import paper

    released = tmp_path / "released"
    released.mkdir()
    # torch's zip layout holding a pickle that is not one: fails where the weights are loaded
    with zipfile.ZipFile(released / "64x64_diffusion.pt", "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle\n" * 64)
        z.writestr("archive/version", "3\n")
    ref = tmp_path / "VIRTUAL_imagenet64_labeled.npz"
    _reference_batch(ref)
    overrides = [
        *SMALL,
        f"storage.root={tmp_path / 'store'}",
        f"evaluation.reference={ref}",
        "compute.use_gpu=false",  # the 64x64 row's preset asks for a GPU
    ]
    state = paper(
        row=ROW,
        checkpoints=str(released),
        num_samples=N,
        overrides=overrides,
        return_state=True,
    )
    assert state.is_failed() and "Weights only load failed" in state.message, state
    failed = [t for t in _task_runs_of(state.state_details.flow_run_id) if t.state.is_failed()]
    # the sample stage, and the task run that stands for the sample subflow in the row's flow
    assert {t.name.split(" ")[0].split("-")[0] for t in failed} == {"sample"}, failed
    assert [t.run_count for t in failed] == [1] * len(failed)  # not retried

    experiment = setup_mlflow(load_config(load_rows().row(ROW).preset, overrides))
    runs = MlflowClient().search_runs([experiment])
    parents = [r for r in runs if r.data.tags.get("admflow.paper_row") == ROW]
    assert [r.info.status for r in parents] == ["FAILED"]
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
