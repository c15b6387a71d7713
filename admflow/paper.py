"""The papers' results as data: which released files, presets and sampling settings each row
of "Diffusion Models Beat GANs" used, and the numbers it published; and the same for its
ancestors (Improved DDPM's released models, DDPM's CIFAR-10 recipe).

The registries are ``configs/paper/rows.yaml`` and ``configs/paper/ancestors.yaml``;
:func:`load_rows` and :func:`load_ancestor_rows` validate them (every file a row names has a
download address, every preset exists and agrees with the row's run preset) so a broken entry
fails at load, not after an hour of sampling. :func:`find_row` finds a row that `paper run`
regenerates in either. Nothing here downloads anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from admflow.config import CONFIG_DIR, ConfigError, load_config

REGISTRY = CONFIG_DIR / "paper" / "rows.yaml"
DOWNLOAD_PREFIX = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
METRICS = ("fid", "sfid", "inception_score", "precision", "recall")
Setting = Literal["sampler", "steps", "classifier_scale"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Network(_Strict):
    """One released network of a row: the preset that builds it and its checkpoint file."""

    preset: str
    file: str


class Published(_Strict):
    """What the paper printed for the row (None: not in the table the row comes from, or not
    found). ADM's rows always have their FID and table (:class:`Registry` checks)."""

    fid: float | None = Field(None, gt=0)
    sfid: float | None = Field(None, gt=0)
    inception_score: float | None = Field(None, gt=0)
    precision: float | None = Field(None, ge=0, le=1)
    recall: float | None = Field(None, ge=0, le=1)
    table: str | None = Field(
        None, pattern=r"^Table \d+$", description="the paper's own table number"
    )
    source: str | None = Field(
        None, description="where the figures are quoted from, when not from the paper's text"
    )

    def cited(self) -> str:
        """Where the figures come from, for reports."""
        if self.table:
            return self.table
        return f"as quoted by {self.source}" if self.source else "no published figure"


class PaperRow(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    paper: Literal["adm", "improved-ddpm", "ddpm"] = "adm"
    description: str
    preset: str = Field(description="the config the run loads (the upsampler's for two stages)")
    diffusion: Network
    classifier: Network | None = None
    upsampler: Network | None = None
    sampler: Literal["ddpm", "ddim"]
    steps: str = Field(description="timestep respacing of every stage, e.g. '250' or 'ddim25'")
    classifier_scale: float = Field(ge=0)
    classifier_use_fp16: bool = Field(
        False,
        description="the classifier's precision while sampling: guided-diffusion's sampling "
        "commands leave --classifier_use_fp16 at its False, except the README's DDIM example",
    )
    unstated: list[Setting] = Field(
        [], description="settings the paper does not give for this row (the note says why)"
    )
    note: str = Field("", description="where a setting comes from when not from the table")
    reference: str | None = Field(
        description="the paper's reference batch (.npz); None: none was released, the run is "
        "given the data set's own (an .npz, a feature file or a shard folder)"
    )
    published: Published

    @model_validator(mode="after")
    def _guidance(self) -> PaperRow:
        if (self.classifier is None) != (self.classifier_scale == 0):
            raise ValueError(
                "a classifier needs classifier_scale > 0, and a scale > 0 a classifier"
            )
        if (self.sampler == "ddim") != self.steps.startswith("ddim"):
            raise ValueError(f"sampler {self.sampler} does not match steps {self.steps!r}")
        if self.unstated and not self.note:
            raise ValueError("a row with unstated settings needs a note saying what it uses")
        return self

    def settings(self) -> str:
        """Sampler, steps and scale in one line, e.g. 'ddim, 25 steps, classifier scale 2.5'."""
        steps = self.steps.removeprefix("ddim")
        text = f"{self.sampler}, {steps} steps, classifier scale {self.classifier_scale:g}"
        if self.unstated:
            text += f" (not stated in the paper: {', '.join(self.unstated)})"
        return text

    def networks(self) -> dict[str, Network]:
        named = {"diffusion": self.diffusion, "classifier": self.classifier}
        named["upsampler"] = self.upsampler
        return {k: v for k, v in named.items() if v is not None}

    def files(self) -> list[str]:
        """Every released file the row needs: checkpoints, then the reference batch."""
        return [n.file for n in self.networks().values()] + (
            [self.reference] if self.reference else []
        )

    def overrides(self, num_samples: int | None = None) -> list[str]:
        """The row's sampling settings as config overrides (user overrides go after these)."""
        out = [
            f"sampling.sampler={self.sampler}",
            f"sampling.timestep_respacing='{self.steps}'",
            f"sampling.classifier_scales=[{self.classifier_scale}]",
        ]
        if self.classifier is not None:  # the presets' True is the classifier's training setting
            out.append(f"classifier.use_fp16={str(self.classifier_use_fp16).lower()}")
        return out + ([f"sampling.num_samples={num_samples}"] if num_samples else [])


class Registry(_Strict):
    files: dict[str, str]
    rows: list[PaperRow] = Field(min_length=1)

    @model_validator(mode="after")
    def _links(self) -> Registry:
        for name, url in self.files.items():
            if not url.startswith(DOWNLOAD_PREFIX) or not url.endswith("/" + name):
                raise ValueError(f"files.{name}: {url} is not a released download address")
        ids = [r.id for r in self.rows]
        if len(set(ids)) != len(ids):
            raise ValueError(f"row ids are not unique: {ids}")
        for row in self.rows:
            if row.paper != "adm" or not row.reference:
                raise ValueError(f"row {row.id}: an ADM row names its reference batch")
            if row.published.fid is None or row.published.table is None:
                raise ValueError(f"row {row.id}: an ADM row has the FID of the table it cites")
            for name in row.files():
                if name not in self.files:
                    raise ValueError(f"row {row.id}: {name} has no entry under files")
        return self

    def row(self, row_id: str) -> PaperRow:
        for r in self.rows:
            if r.id == row_id:
                return r
        raise ConfigError(f"no paper row {row_id!r}; see `admflow paper list` ({self.ids()})")

    def ids(self) -> str:
        return ", ".join(r.id for r in self.rows)

    def url(self, name: str) -> str:
        return self.files[name]


def _check_presets(row: PaperRow) -> None:
    """The run preset must build exactly the networks the row names."""
    run = load_config(row.preset)
    sections = {"diffusion": "model", "classifier": "classifier", "upsampler": "upsampler"}
    for kind, net in row.networks().items():
        section = sections[kind]
        if getattr(load_config(net.preset), section) != getattr(run, section):
            raise ConfigError(
                f"paper row {row.id}: preset {row.preset!r} has another {section} section than "
                f"{kind} preset {net.preset!r}"
            )
    if row.upsampler is not None and not run.upsampler.enabled:
        raise ConfigError(f"paper row {row.id}: preset {row.preset!r} has no upsampler")


def load_rows(path: Path = REGISTRY) -> Registry:
    """The validated registry; a bad entry raises ConfigError naming it."""
    try:
        registry = Registry.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path.name}: {loc}: {first['msg']}") from None
    for row in registry.rows:
        _check_presets(row)
    return registry


def locate_files(
    urls: Mapping[str, str], row: PaperRow, checkpoints: str, reference: str
) -> dict[str, str]:
    """URIs of the row's files: checkpoints in the directory ``checkpoints``; the reference is
    ``reference`` itself when it names an .npz or the row has no released one, else the row's
    file inside that directory. ``urls``: the download address of each released file.

    Any missing released file fails here, before Ray or Prefect start, naming it and its
    download address (a reference of the user's own is checked by the scoring inputs' check).
    """
    from admflow import storage

    found = {kind: storage.join(checkpoints, n.file) for kind, n in row.networks().items()}
    own = row.reference is None or reference.endswith(".npz")
    found["reference"] = reference if own else storage.join(reference, str(row.reference))
    names = {kind: n.file for kind, n in row.networks().items()}
    if row.reference:
        names["reference"] = row.reference
    missing = [
        f"{names[kind]} not found at {uri}; download it from {urls[names[kind]]}"
        for kind, uri in found.items()
        if kind in names and not storage.exists(uri)
    ]
    if missing:
        raise storage.StorageError(f"paper row {row.id}: " + "; ".join(missing))
    return found


# ---------------------------------------------------------------------------- the ancestors

ANCESTORS = CONFIG_DIR / "paper" / "ancestors.yaml"
ANCESTOR_PREFIXES = {
    "improved-ddpm": "https://openaipublic.blob.core.windows.net/diffusion/march-2021/"
}
AncestorMetric = Literal["nll_bpd", "fid", "inception_score"]


class AncestorPublished(_Strict):
    """The paper's own figures for the model (None: not transcribed from its full text, nor
    found quoted elsewhere)."""

    nll_bpd: float | None = Field(None, gt=0, description="variational bound, bits/dim")
    fid: float | None = Field(None, gt=0)
    inception_score: float | None = Field(None, gt=0)
    table: str | None = Field(None, pattern=r"^Table \d+$")
    page: int | None = Field(None, gt=0)
    section: str | None = Field(None, description="the paper's section printing the table")
    source: str | None = Field(
        None,
        description="an address quoting the figures, when they are not transcribed from the "
        "paper's full text: what quotes them and where, so a reader can check",
    )

    @model_validator(mode="after")
    def _cited(self) -> AncestorPublished:
        has_figure = any(v is not None for v in (self.nll_bpd, self.fid, self.inception_score))
        from_paper = self.table is not None and (self.page is not None or self.section)
        if has_figure and not (from_paper or self.source):
            raise ValueError(
                "a published figure needs the table and page (or section) it comes from, or "
                "the source that quotes it"
            )
        return self

    def figures(self) -> str:
        shown = [
            f"{label} {value:g}"
            for label, value in (
                ("NLL", self.nll_bpd),
                ("FID", self.fid),
                ("IS", self.inception_score),
            )
            if value is not None
        ]
        if not shown:
            return "published figures not transcribed"
        if self.table is not None:
            where = f"p. {self.page}" if self.page else f"Section {self.section}"
            return ", ".join(shown) + f" ({self.table}, {where})"
        return ", ".join(shown) + " (quoted, see source)"


class Sampling(_Strict):
    """How `paper run` draws a row's samples: the sampler and the respaced steps."""

    sampler: Literal["ddpm", "ddim"]
    steps: str = Field(description="timestep respacing, e.g. '100' or 'ddim50'")

    @model_validator(mode="after")
    def _matched(self) -> Sampling:
        if (self.sampler == "ddim") != self.steps.startswith("ddim"):
            raise ValueError(f"sampler {self.sampler} does not match steps {self.steps!r}")
        return self


class AncestorRow(_Strict):
    """One model of an ancestor paper (a released checkpoint, or a recipe to train), the preset
    that loads it, its figures, and (``sampling``) how `paper run` samples it."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    paper: Literal["improved-ddpm", "ddpm"]
    description: str
    preset: str
    file: str | None = Field(description="the released checkpoint; None: none, train the preset")
    metrics: list[AncestorMetric] = Field(min_length=1)
    sampling: Sampling | None = None
    published: AncestorPublished
    note: str = ""

    @model_validator(mode="after")
    def _noted(self) -> AncestorRow:
        p = self.published
        if p.nll_bpd is None and p.fid is None and p.inception_score is None and not self.note:
            raise ValueError("a row without published figures needs a note saying why")
        if self.sampling is not None and (self.file is None or "fid" not in self.metrics):
            raise ValueError("a row sampled by `paper run` needs its checkpoint and FID")
        return self

    def paper_row(self) -> PaperRow:
        """The row as `paper run` regenerates it (only rows with ``sampling``): unguided, scored
        against the data set's own reference, which the paper's FIDs are computed against."""
        if self.sampling is None or self.file is None:
            raise ConfigError(
                f"paper row {self.id}: no sampling settings or released checkpoint, so "
                "`paper run` cannot regenerate it (see `admflow paper list`)"
            )
        p = self.published
        return PaperRow(
            id=self.id,
            paper=self.paper,
            description=self.description,
            preset=self.preset,
            diffusion=Network(preset=self.preset, file=self.file),
            sampler=self.sampling.sampler,
            steps=self.sampling.steps,
            classifier_scale=0.0,
            note=self.note,
            reference=None,
            published=Published(
                fid=p.fid, inception_score=p.inception_score, table=p.table, source=p.source
            ),
        )


class AncestorRegistry(_Strict):
    files: dict[str, str]
    rows: list[AncestorRow] = Field(min_length=1)

    @model_validator(mode="after")
    def _links(self) -> AncestorRegistry:
        ids = [r.id for r in self.rows]
        if len(set(ids)) != len(ids):
            raise ValueError(f"row ids are not unique: {ids}")
        for row in self.rows:
            if row.file is None:
                continue
            url = self.files.get(row.file)
            if url is None:
                raise ValueError(f"row {row.id}: {row.file} has no entry under files")
            prefix = ANCESTOR_PREFIXES.get(row.paper, "")
            if not prefix or not url.startswith(prefix) or not url.endswith("/" + row.file):
                raise ValueError(f"files.{row.file}: {url} is not a released download address")
        return self


def load_ancestor_rows(path: Path = ANCESTORS) -> AncestorRegistry:
    """The validated registry of the ancestors' models; every preset must load, with the
    sampling settings of the rows that `paper run` regenerates."""
    try:
        registry = AncestorRegistry.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path.name}: {loc}: {first['msg']}") from None
    for row in registry.rows:
        load_config(row.preset, row.paper_row().overrides() if row.sampling else [])
    return registry


def find_row(row_id: str) -> tuple[dict[str, str], PaperRow]:
    """A row `paper run` regenerates, ADM's or an ancestor's, with the download addresses of
    its registry's files."""
    registry = load_rows()
    if row_id in {r.id for r in registry.rows}:
        return registry.files, registry.row(row_id)
    ancestors = load_ancestor_rows()
    for row in ancestors.rows:
        if row.id == row_id:
            return ancestors.files, row.paper_row()
    runnable = [r.id for r in ancestors.rows if r.sampling]
    raise ConfigError(
        f"no paper row {row_id!r}; see `admflow paper list` ({registry.ids()}, "
        f"{', '.join(runnable)})"
    )
