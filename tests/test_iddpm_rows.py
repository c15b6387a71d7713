"""The Improved DDPM rows of the paper registry (configs/paper/ancestors.yaml): one per model of
the improved-diffusion README, with its download address, the preset that loads it strictly,
and the paper's published figures — each transcribed once here from the paper's full text with
its table and page. The project's copy of the paper is an abridged summary without the tables,
so TRANSCRIBED is empty and every row must say its figures are not transcribed; a figure added
to the registry without a transcription here fails."""

from __future__ import annotations

import json

import pytest

from admflow.config import ConfigError
from admflow.paper import AncestorRegistry, load_ancestor_rows
from tests.test_iddpm_layouts import README_MODELS

# row id: (table, page, NLL bits/dim, FID); None where the table prints nothing
TRANSCRIBED: dict[str, tuple[str, int, float | None, float | None]] = {}

README = "https://openaipublic.blob.core.windows.net/diffusion/march-2021/"


def test_one_row_per_released_model_with_its_preset_and_address():
    reg = load_ancestor_rows()
    rows = {r.id: r for r in reg.rows}
    assert set(rows) == {f"iddpm-{name}" for name in README_MODELS}
    for name, (_, _, file) in README_MODELS.items():
        row = rows[f"iddpm-{name}"]
        assert (row.paper, row.preset, row.file) == ("improved-ddpm", f"iddpm-{name}", file)
        assert reg.files[file] == README + file  # the README's own link


def test_published_figures_are_the_transcribed_ones():
    for row in load_ancestor_rows().rows:
        p = row.published
        if row.id in TRANSCRIBED:
            assert (p.table, p.page, p.nll_bpd, p.fid) == TRANSCRIBED[row.id]
        else:
            assert (p.nll_bpd, p.fid, p.table, p.page) == (None, None, None, None), row.id
            assert "not transcribed" in row.note


def test_a_figure_without_its_table_and_page_is_refused():
    base = {
        "files": {"a.pt": README + "a.pt"},
        "rows": [
            {
                "id": "x", "paper": "improved-ddpm", "description": "d", "preset": "tiny",
                "file": "a.pt", "metrics": ["nll_bpd"], "published": {"nll_bpd": 3.0},
            }
        ],
    }  # fmt: skip
    with pytest.raises(ValueError, match="needs the table and page"):
        AncestorRegistry.model_validate(base)
    base["rows"][0]["published"] = {}
    with pytest.raises(ValueError, match="needs a note"):
        AncestorRegistry.model_validate(base)
    base["rows"][0]["note"] = "n"
    base["files"] = {"a.pt": "https://example.com/a.pt"}
    with pytest.raises(ValueError, match="not a released download address"):
        AncestorRegistry.model_validate(base)


def test_a_row_whose_preset_is_missing_fails_at_load(tmp_path):
    text = (
        "files: {a.pt: " + README + "a.pt}\n"
        "rows: [{id: x, paper: improved-ddpm, description: d, preset: no-such-preset, "
        "file: a.pt, metrics: [fid], published: {}, note: n}]\n"
    )
    (tmp_path / "ancestors.yaml").write_text(text)
    with pytest.raises(ConfigError):
        load_ancestor_rows(tmp_path / "ancestors.yaml")


def test_paper_list_shows_the_ancestors_rows(capsys):
    from admflow.cli import main

    assert main(["paper", "list"]) == 0
    out = capsys.readouterr().out
    assert "imagenet256-adm-g-adm-u" in out  # the ADM rows are still there
    assert "iddpm-cifar10-vlb" in out and "[improved-ddpm]" in out
    assert README + "cifar10_uncond_vlb_50M_500K.pt" in out
    assert main(["paper", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rows"][0]["published"]["fid"] > 0
    assert len(data["ancestors"]["rows"]) == len(README_MODELS)
