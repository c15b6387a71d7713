"""The ancestors' rows of the paper registry (configs/paper/ancestors.yaml): one per model of the
improved-diffusion README, with its download address and the preset that loads it strictly;
Improved DDPM's L_hybrid models at 50 and 100 respaced steps against DDIM at the same steps,
which `paper run` regenerates; and DDPM's CIFAR-10 recipe with its published figures.

Every figure is pinned here with where it comes from: TRANSCRIBED from a paper's full text
(table and page or section), or QUOTED by another source (the project's copy of Improved DDPM
is an abridged summary without its tables). A figure added to the registry without an entry
here fails, and so does a row without figures whose note does not say why."""

from __future__ import annotations

import json

import pytest

from admflow.config import ConfigError, load_config
from admflow.paper import AncestorRegistry, find_row, load_ancestor_rows
from tests.test_iddpm_layouts import README_MODELS

# row id: (table, page or section, NLL bits/dim, FID, IS); None where the table prints nothing
TRANSCRIBED: dict[str, tuple[str, int | str, float | None, float | None, float | None]] = {
    # "Denoising Diffusion Probabilistic Models", Table 1 (Section 4.1), "Ours (L_simple)":
    # IS 9.46 +- 0.11, FID 3.17, NLL Test (Train) <= 3.75 (3.72)
    "ddpm-cifar10": ("Table 1", "4.1", 3.75, 3.17, 9.46),
}
MMGEN = "github.com/open-mmlab/mmgeneration/blob/34a85691219432ae0d39e3f9f2a4b9fc4fa7c58a/"
# row id: (FID, the address quoting it); mmgeneration's Improved-DDPM README compares its own
# FIDs with the "Official" ones of the same configurations
QUOTED: dict[str, tuple[float, str]] = {
    "iddpm-cifar10-hybrid": (3.19, MMGEN + "configs/improved_ddpm/README.md"),
    "iddpm-imagenet64-hybrid": (19.2, MMGEN + "configs/improved_ddpm/README.md"),
}
FEW_STEPS = [
    (data, sampler, steps)
    for data in ("cifar10", "imagenet64")
    for sampler in ("ddpm", "ddim")
    for steps in (50, 100)
]

README = "https://openaipublic.blob.core.windows.net/diffusion/march-2021/"


def test_one_row_per_released_model_with_its_preset_and_address():
    reg = load_ancestor_rows()
    rows = {r.id: r for r in reg.rows}
    released = {r.file for r in reg.rows if r.paper == "improved-ddpm"}
    assert released == {file for _, _, file in README_MODELS.values()}
    for name, (_, _, file) in README_MODELS.items():
        row = rows[f"iddpm-{name}"]
        assert (row.paper, row.preset, row.file) == ("improved-ddpm", f"iddpm-{name}", file)
        assert reg.files[file] == README + file  # the README's own link


def test_published_figures_are_the_transcribed_or_quoted_ones():
    for row in load_ancestor_rows().rows:
        p = row.published
        if row.id in TRANSCRIBED:
            where = p.page if p.page is not None else p.section
            assert (p.table, where, p.nll_bpd, p.fid, p.inception_score) == TRANSCRIBED[row.id]
            assert p.source is None
        elif row.id in QUOTED:
            fid, address = QUOTED[row.id]
            assert (p.fid, p.nll_bpd, p.inception_score, p.table) == (fid, None, None, None)
            assert address in p.source and "quotes the paper" in row.note
            assert "NLL not transcribed" in row.note
        else:
            assert (p.nll_bpd, p.fid, p.inception_score, p.table, p.source) == (None,) * 5, row.id
            assert "not transcribed" in row.note or "none is given" in row.note


def test_few_step_rows_sample_the_hybrid_model_with_the_sampler_at_those_steps():
    reg = load_ancestor_rows()
    rows = {r.id: r for r in reg.rows}
    for data, sampler, steps in FEW_STEPS:
        spaced = f"ddim{steps}" if sampler == "ddim" else str(steps)
        row = rows[f"iddpm-{data}-hybrid-{spaced}"].paper_row()
        assert row.paper == "improved-ddpm" and row.reference is None and row.classifier is None
        assert (row.sampler, row.steps) == (sampler, spaced)
        assert row.diffusion.preset == row.preset == f"iddpm-{data}-hybrid"
        assert reg.files[row.diffusion.file] == README + row.diffusion.file
        full = rows[f"iddpm-{data}-hybrid"].paper_row()  # the same model at its 4000 steps
        assert row.diffusion == full.diffusion and full.steps == "4000"
        cfg = load_config(row.preset, row.overrides(1000))
        assert cfg.sampling.sampler == sampler and cfg.sampling.timestep_respacing == spaced
        assert cfg.sampling.classifier_scales == [0.0] and cfg.sampling.num_samples == 1000
        assert cfg.diffusion.steps == 4000 and cfg.model.learn_sigma
        assert row.files() == [row.diffusion.file]  # no released reference: the training set's
    urls, found = find_row("iddpm-imagenet64-hybrid-ddim100")  # what `paper run` looks up
    assert found == rows["iddpm-imagenet64-hybrid-ddim100"].paper_row() and urls == reg.files


def test_rows_paper_run_cannot_regenerate_say_so():
    with pytest.raises(ConfigError, match="ddpm-cifar10: no sampling settings or released"):
        find_row("ddpm-cifar10")
    with pytest.raises(ConfigError, match="iddpm-cifar10-vlb: no sampling settings"):
        find_row("iddpm-cifar10-vlb")
    with pytest.raises(ConfigError, match="no paper row 'nope'.*iddpm-cifar10-hybrid-ddim50"):
        find_row("nope")
    assert find_row("imagenet256-adm-g")[1].paper == "adm"  # ADM's rows come first


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
    base["rows"][0]["published"] = {"nll_bpd": 3.0, "table": "Table 2"}  # no page or section
    with pytest.raises(ValueError, match="needs the table and page"):
        AncestorRegistry.model_validate(base)
    base["rows"][0]["published"] = {"nll_bpd": 3.0, "source": "https://example.com/quote"}
    AncestorRegistry.model_validate(base)  # a quoting source will do
    base["rows"][0]["published"] = {}
    with pytest.raises(ValueError, match="needs a note"):
        AncestorRegistry.model_validate(base)
    base["rows"][0]["note"] = "n"
    base["rows"][0]["sampling"] = {"sampler": "ddim", "steps": "50"}
    with pytest.raises(ValueError, match="does not match steps"):
        AncestorRegistry.model_validate(base)
    base["rows"][0]["sampling"] = {"sampler": "ddim", "steps": "ddim50"}
    with pytest.raises(ValueError, match="needs its checkpoint and FID"):
        AncestorRegistry.model_validate(base)  # metrics has no fid
    del base["rows"][0]["sampling"]
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
    ddpm = next(ln for ln in out.splitlines() if ln.startswith("ddpm-cifar10 "))
    assert "[ddpm] NLL 3.75, FID 3.17, IS 9.46 (Table 1, Section 4.1)" in ddpm
    hybrid = next(ln for ln in out.splitlines() if ln.startswith("iddpm-cifar10-hybrid "))
    assert "FID 3.19 (quoted, see source)" in hybrid
    assert "paper run: ddim, 50 steps, classifier scale 0" in out
    assert main(["paper", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rows"][0]["published"]["fid"] > 0
    ancestors = data["ancestors"]["rows"]
    assert len(ancestors) == len(README_MODELS) + len(FEW_STEPS) + 1
    assert sum(r["sampling"] is not None for r in ancestors) == 2 + len(FEW_STEPS)


def test_paper_run_of_a_few_step_row_names_the_missing_checkpoint(tmp_path, capsys):
    from admflow.cli import main

    args = ["paper", "run", "iddpm-cifar10-hybrid-ddim50", "--checkpoints", str(tmp_path)]
    assert main([*args, "--reference", str(tmp_path / "cifar10-train")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cifar10_uncond_50M_500K.pt not found" in err
    assert README + "cifar10_uncond_50M_500K.pt" in err
