"""The report of a two-stage run: base rows at the base model's size, the upsampled pair at the
upsampler's, each reference with its own floor, and the verdict said plainly."""

from __future__ import annotations

import os

from admflow.config import load_config
from tasks.reporting.report import discard_local_files, write_report


def _row(scale: float, stage: str, fid: float, precision: float, recall: float) -> dict:
    return {
        "classifier_scale": scale,
        "stage": stage,
        "fid": fid,
        "sfid": fid + 40.0,
        "inception_score": None,
        "class_accuracy": 0.7 + scale / 500,
        "precision": precision,
        "recall": recall,
    }


def _cells(table: list[str]) -> list[dict[str, str]]:
    """Each row of a markdown table as {column: cell}."""
    split = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]
    return [dict(zip(split[0], row, strict=True)) for row in split[2:]]


def test_two_stage_report_keeps_each_reference_with_its_floor(tmp_path):
    cfg = load_config("tiny", [f"storage.root={tmp_path / 'store'}"])
    softened = {"accuracy": 0.97, "strength": 0.55, "blur": 0.825, "contrast": 0.67,
                "sharpness": 0.108, "real_sharpness": 0.228, "clipped": ""}  # fmt: skip
    rows = [
        {**_row(0.0, "base", 156.7, 0.03, 0.82), "softened_real": softened},
        _row(128.0, "base", 184.8, 0.10, 0.32),
        _row(128.0, "bilinear", 243.0, 0.02, 0.10),
        _row(128.0, "upsampler", 367.87, 0.0, 0.0),
    ]
    judge = {"judge_heldout_accuracy": 1.0, "judge_heldout_images": 120, "fid_floor": 61.86,
             "fid_floor_images": 100}  # fmt: skip
    yardsticks = {"16px": judge, "32px": {"fid_floor": 70.5, "fid_floor_images": 100}}
    curve = [{"step": 100, "fid": 317.7}, {"step": 900, "fid": 156.7}]
    out = write_report(cfg, rows, None, curve=curve, yardsticks=yardsticks)

    table = out["table"].splitlines()
    assert "| tiny | base | 16 |" in table[2] and "| 156.70 |" in table[2]
    assert "| tiny +bilinear | bilinear | 32 |" in table[4]
    cells = _cells(table)
    assert [(c["stage"], c["precision"], c["recall"]) for c in cells] == [
        ("base", "0.03", "0.82"),
        ("base", "0.10", "0.32"),
        ("bilinear", "0.02", "0.10"),
        ("upsampler", "0.00", "0.00"),
    ]
    assert [c["class acc"] for c in cells] == ["0.70", "0.96", "0.96", "0.96"]
    # the upsampled set names the base model's sampler and steps and then the upsampler's
    assert [(c["sampler"], c["steps"]) for c in cells] == [("ddpm", "50")] * 3 + [
        ("ddpm + ddim", "50 + 25")
    ]
    text = out["report"]
    assert "| 16px | 1.00 (120 images) | 0.97 | 61.86 (100) |" in text
    assert "| 32px | - | - | 70.50 (100) |" in text  # no judge at 32px, its floor all the same
    # how the softened real images were matched to the unguided samples, said in numbers
    assert "blur of 0.82 px and contrast x0.67" in text and "(0.108; clean 0.228)" in text
    assert out["yardsticks"]["16px"]["judge_softened_real_accuracy"] == 0.97
    # the curve is read against the base model's floor, the first yardstick
    assert "Floor (real vs real at the same N): FID 61.86." in text
    assert "scale 128: the upsampler does not beat bilinear (FID 367.87 vs 243.00)" in text
    assert sorted(os.path.basename(p) for p in out["local_files"]) == [
        "guidance_sweep.png",
        "results.md",
        "training_curve.png",
    ]
    assert all(os.path.getsize(p) > 1000 for p in out["local_files"][1:])  # plots, not blanks
    discard_local_files(out)
    assert not any(os.path.exists(p) for p in out["local_files"])
