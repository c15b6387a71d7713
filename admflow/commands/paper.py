"""``admflow paper``: the paper's rows (list) and one row regenerated beside its numbers (run)."""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

from admflow.commands.planning import RunInputs, add_plan_arg, preflight, show_plan
from admflow.config import AdmConfig, load_config

if TYPE_CHECKING:
    from admflow.paper import PaperRow

EPILOG = """\
example:
  admflow paper run imagenet256-adm-g --checkpoints s3://models/openai \\
      --reference s3://models/openai/VIRTUAL_imagenet256_labeled.npz

--checkpoints is a directory (local, file:// or s3://) holding the row's released .pt files
under their released names; --reference is the reference batch .npz or a directory holding it.
`admflow paper list` says which files each row needs and where to download them.

The ancestors' rows marked "paper run" in the list (Improved DDPM's L_hybrid models, at their
full 4000 steps and at 50 and 100 steps against DDIM) have no released reference batch: their
papers compute FID against the training set, so --reference is the training set's own (an .npz
batch, a feature file, or a shard folder from `admflow shard`).

Inception Score needs the 1008-way logits of the paper's Inception network, which the bundled
feature network lacks: bring the weights yourself (a state dict in the pt_inception-2015-12-05
layout with its 1008x2048 fc.weight) and pass --set evaluation.inception_weights=PATH. Without
them the table's IS line reads n/a; FID, sFID, precision and recall need no extra file.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("paper", help="the paper's result rows: list them, or regenerate one")
    psub = p.add_subparsers(dest="paper_command", metavar="ACTION", required=True)
    lst = psub.add_parser(
        "list",
        help="rows with published figures and the files each needs, ADM's then its ancestors'",
    )
    lst.add_argument("--json", action="store_true", help="the whole registry as JSON")
    lst.set_defaults(func=_list)
    run = psub.add_parser(
        "run",
        help="sample a row from the released checkpoints, score it, compare with the paper",
        description=(
            "Runs the `sample` flow with the row's presets and sampling settings (base, then "
            "upsampler where the row has one), evaluates the last stage against the reference "
            "batch and prints ours beside the published FID, sFID, IS, precision and recall. "
            "The table is kept in object storage, the MLflow parent run (tagged admflow."
            "paper_row) and as a Prefect markdown artifact."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("row", help="row id: ADM's, or an ancestor's marked 'paper run' in the list")
    run.add_argument(
        "--checkpoints", required=True, metavar="DIR_OR_URI", help="the released .pt files"
    )
    run.add_argument(
        "--reference", required=True, metavar="FILE_OR_URI", help="the reference batch .npz"
    )
    run.add_argument("--num-samples", type=int, metavar="N", help="default: the paper's 50000")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field after the row's settings (repeatable)",
    )
    add_plan_arg(run)
    run.set_defaults(func=_run)


def _list(args: argparse.Namespace) -> int:
    from admflow.paper import load_ancestor_rows, load_rows

    registry, ancestors = load_rows(), load_ancestor_rows()
    if args.json:
        dump = registry.model_dump(mode="json") | {"ancestors": ancestors.model_dump(mode="json")}
        print(json.dumps(dump, indent=2))
        return 0
    for row in registry.rows:
        p = row.published
        print(f"{row.id:31s} FID {p.fid:5.2f}  ({p.table})  {row.description}")
        print(f"    sampling: {row.settings()}")
        if row.note:
            print(f"    note: {row.note}")
        for name in row.files():
            print(f"    {name:32s} {registry.url(name)}")
    for arow in ancestors.rows:  # the ancestors' models (Improved DDPM, DDPM)
        print(f"{arow.id:31s} [{arow.paper}] {arow.published.figures()}  {arow.description}")
        print(f"    preset: {arow.preset}; metrics: {', '.join(arow.metrics)}")
        if arow.sampling:
            print(
                f"    paper run: {arow.paper_row().settings()}; --reference: the training "
                "set's (an .npz, a feature file or a shard folder)"
            )
        if arow.published.source:
            print(f"    quoted from: {arow.published.source}")
        if arow.note:
            print(f"    note: {arow.note}")
        if arow.file:
            print(f"    {arow.file:32s} {ancestors.files[arow.file]}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from admflow.paper import find_row, locate_files

    if args.num_samples is not None and args.num_samples <= 0:
        raise SystemExit("--num-samples: must be a positive number of images")
    urls, row = find_row(args.row)
    files = locate_files(urls, row, args.checkpoints, args.reference)
    cfg = load_config(row.preset, row.overrides(args.num_samples) + args.overrides)
    inputs = paper_inputs(cfg, row, files)
    if args.plan:
        return show_plan(cfg, inputs, paper_work(cfg, row))
    preflight(cfg, inputs)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's ephemeral API server needs longer than its 20 s default on a busy 2-core box.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from admflow.uris import prefect_ui_without_credentials, scrub_overrides

    prefect_ui_without_credentials()  # before Prefect reads its settings
    from flows.paper import paper

    result = paper(
        row=args.row,
        checkpoints=args.checkpoints,
        num_samples=args.num_samples,
        # Prefect records the parameters: no credentials in them (admflow.uris)
        overrides=scrub_overrides([f"evaluation.reference={args.reference}", *args.overrides]),
    )
    print("\n" + result["table"])
    for uri in result["report_uris"]:
        print(f"report:       {uri}")
    print(f"samples:      {result['samples']}")
    print(f"MLflow run:   {result['mlflow_parent_run_id']}")
    return 0


def paper_inputs(cfg: AdmConfig, row: PaperRow, files: dict[str, str]) -> RunInputs:
    """A row's released networks, its reference batch at the final stage's size, Inception."""
    stages = ("sample", "upsample", "score") if row.upsampler else ("sample", "score")
    size = cfg.upsampler.unet.image_size if row.upsampler else cfg.model.image_size
    nets = {kind: uri for kind, uri in files.items() if kind != "reference"}
    return RunInputs("paper run", stages, nets, files["reference"], size, scores=True)


def paper_work(cfg: AdmConfig, row: PaperRow) -> list:
    from tasks.estimate import sampling_work, scoring_work

    n = cfg.sampling.num_samples
    work = [sampling_work(cfg, "sample", n, guided=row.classifier is not None)]
    if row.upsampler:
        work.append(sampling_work(cfg, "upsample", n, guided=False, section="upsampler"))
    return work + [scoring_work("score", n)]
