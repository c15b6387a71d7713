"""The paper registry against the paper itself: every row's table and published figures equal
a transcription made once from "Diffusion Models Beat GANs on Image Synthesis" (arXiv v4), and
every row's sampling settings are the ones the paper (Table 14) or the guided-diffusion README
give, or the row says which are not stated."""

from __future__ import annotations

import json

import pytest

from admflow.config import load_config
from admflow.paper import load_rows

# row id: (table, page, FID, sFID, IS, precision, recall); None where the table prints nothing
TRANSCRIBED = {
    # Table 5, p. 10: state of the art (no Inception Score)
    "imagenet64-adm-dropout": ("Table 5", 10, 2.07, 4.29, None, 0.74, 0.63),
    "imagenet128-adm": ("Table 5", 10, 5.91, 5.09, None, 0.70, 0.65),
    "imagenet128-adm-g": ("Table 5", 10, 2.97, 5.09, None, 0.78, 0.59),
    "imagenet128-adm-g-ddim25": ("Table 5", 10, 5.98, 7.04, None, 0.78, 0.51),
    "imagenet256-adm-g-ddim25": ("Table 5", 10, 5.44, 5.32, None, 0.81, 0.49),
    "imagenet512-adm-g-ddim25": ("Table 5", 10, 8.41, 9.67, None, 0.83, 0.47),
    "lsun-bedroom": ("Table 5", 10, 1.90, 5.59, None, 0.66, 0.51),
    "lsun-cat": ("Table 5", 10, 5.57, 6.69, None, 0.63, 0.52),
    "lsun-horse": ("Table 5", 10, 2.57, 6.81, None, 0.71, 0.55),
    "lsun-horse-nodropout": ("Table 5", 10, 2.95, 5.94, None, 0.69, 0.55),
    # Table 4, p. 9: classifier guidance at ImageNet 256
    "imagenet256-uncond-adm": ("Table 4", 9, 26.21, 6.35, 39.70, 0.61, 0.63),
    "imagenet256-uncond-adm-g-scale1": ("Table 4", 9, 33.03, 6.99, 32.92, 0.56, 0.65),
    "imagenet256-uncond-adm-g": ("Table 4", 9, 12.00, 10.40, 95.41, 0.76, 0.44),
    "imagenet256-adm": ("Table 4", 9, 10.94, 6.02, 100.98, 0.69, 0.63),
    "imagenet256-adm-g": ("Table 4", 9, 4.59, 5.25, 186.70, 0.82, 0.52),
    "imagenet256-adm-g-scale10": ("Table 4", 9, 9.11, 10.93, 283.92, 0.88, 0.32),
    # Table 6, p. 11: single, upsampling and guided models
    "imagenet256-adm-u": ("Table 6", 11, 7.49, 5.13, 127.49, 0.72, 0.63),
    "imagenet256-adm-g-adm-u": ("Table 6", 11, 3.94, 6.14, 215.84, 0.83, 0.53),
    "imagenet512-adm": ("Table 6", 11, 23.24, 10.19, 58.06, 0.73, 0.60),
    "imagenet512-adm-g": ("Table 6", 11, 7.72, 6.57, 172.71, 0.87, 0.42),
    "imagenet512-adm-u": ("Table 6", 11, 9.96, 5.62, 121.78, 0.75, 0.64),
    "imagenet512-adm-g-adm-u": ("Table 6", 11, 3.85, 5.86, 221.72, 0.84, 0.53),
}

# row id: (sampler, steps, classifier scale), from Table 14 (p. 28) / Table 5's caption / README
SAMPLING = {
    "imagenet64-adm-dropout": ("ddpm", "250", 0.0),
    "imagenet128-adm": ("ddpm", "250", 0.0),
    "imagenet128-adm-g": ("ddpm", "250", 0.5),
    "imagenet128-adm-g-ddim25": ("ddim", "ddim25", 1.25),
    "imagenet256-adm-g-ddim25": ("ddim", "ddim25", 2.5),
    "imagenet512-adm-g-ddim25": ("ddim", "ddim25", 9.0),
    "imagenet256-adm-g": ("ddpm", "250", 1.0),
    "imagenet256-adm-g-adm-u": ("ddpm", "250", 1.0),
    "imagenet512-adm-g": ("ddpm", "250", 4.0),
    "lsun-horse-nodropout": ("ddpm", "1000", 0.0),
}
UNSTATED = {  # what the paper leaves open for the row
    "imagenet256-uncond-adm": {"sampler", "steps"},
    "imagenet256-uncond-adm-g-scale1": {"sampler", "steps"},
    "imagenet256-uncond-adm-g": {"sampler", "steps"},
    "imagenet256-adm-g-scale10": {"sampler", "steps"},
    "imagenet512-adm-g-adm-u": {"classifier_scale"},
}


def test_every_row_has_the_papers_table_and_figures():
    rows = {r.id: r for r in load_rows().rows}
    assert set(rows) == set(TRANSCRIBED)
    for row_id, (table, _page, *figures) in TRANSCRIBED.items():
        p = rows[row_id].published
        assert p.table == table, row_id
        assert [p.fid, p.sfid, p.inception_score, p.precision, p.recall] == figures, row_id


def test_sampling_settings_and_unstated_ones():
    rows = {r.id: r for r in load_rows().rows}
    for row_id, want in SAMPLING.items():
        r = rows[row_id]
        assert (r.sampler, r.steps, r.classifier_scale) == want, row_id
    for row in rows.values():
        assert set(row.unstated) == UNSTATED.get(row.id, set()), row.id
        assert not row.unstated or row.note
    assert rows["lsun-horse-nodropout"].diffusion.file == "lsun_horse_nodropout.pt"
    assert load_config("lsun-horse-nodropout").model.dropout == 0.0


def test_guided_rows_sample_the_classifier_as_guided_diffusion_does():
    """classifier_sample.py runs the classifier in fp32 unless --classifier_use_fp16 is given;
    of the README's commands only its 25-step DDIM example gives it. The classifier presets'
    use_fp16 is their training setting and must not decide the rows' sampling."""
    guided = [r for r in load_rows().rows if r.classifier is not None]
    assert len(guided) >= 9
    for row in guided:
        cfg = load_config(row.preset, row.overrides())
        released = load_config(row.classifier.preset).classifier
        assert released.use_fp16, row.classifier.preset  # else the override would be moot
        fp16 = row.id == "imagenet128-adm-g-ddim25"
        assert cfg.classifier == released.model_copy(update={"use_fp16": fp16}), row.id
    unguided = load_rows().row("imagenet256-adm")
    assert not any(o.startswith("classifier.") for o in unguided.overrides())


@pytest.mark.parametrize("row_id", ["imagenet256-adm-u", "imagenet512-adm-u"])
def test_upsampler_rows_without_guidance(row_id):
    row = load_rows().row(row_id)
    assert row.upsampler is not None and row.classifier is None and row.classifier_scale == 0
    cfg = load_config(row.preset, row.overrides())
    assert cfg.sampling.classifier_scales == [0.0] and cfg.upsampler.enabled


def test_list_shows_table_settings_and_notes(capsys):
    from admflow.cli import main

    assert main(["paper", "list"]) == 0
    out = capsys.readouterr().out
    assert "(Table 6)" in out and "(Table 3)" not in out
    assert "sampling: ddim, 25 steps, classifier scale 2.5" in out
    assert "not stated in the paper: sampler, steps" in out
    assert "lsun_horse_nodropout.pt" in out
    assert main(["paper", "list", "--json"]) == 0
    data = {r["id"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert data["imagenet512-adm-u"]["published"]["table"] == "Table 6"
    assert data["imagenet256-adm-g-scale10"]["unstated"] == ["sampler", "steps"]


def test_run_help_says_where_is_comes_from(capsys):
    from admflow.cli import main

    with pytest.raises(SystemExit):
        main(["paper", "run", "--help"])
    out = capsys.readouterr().out
    assert "1008" in out and "evaluation.inception_weights" in out


def test_report_says_why_is_is_missing():
    from tasks.reporting.paper_report import compare, to_markdown

    row = load_rows().row("imagenet256-adm-g")
    ours = {"fid": 5.0, "sfid": 6.0, "inception_score": None, "precision": 0.8, "recall": 0.5}
    table = to_markdown(row, compare(row, ours), 50_000)
    assert "| IS | n/a | 186.700 | n/a |" in table
    assert "1008-way logits" in table and "evaluation.inception_weights" in table
    assert "published: Table 4" in table
