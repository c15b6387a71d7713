"""Arguments shared by subcommands."""

from __future__ import annotations

import argparse
import json
import os

from admflow.config import AdmConfig, list_presets, load_config


def add_config_args(p: argparse.ArgumentParser, default: str = "tiny") -> None:
    p.add_argument(
        "--config",
        default=default,
        metavar="PRESET",
        help=f"preset name or YAML path (default {default}); presets: {', '.join(list_presets())}",
    )
    add_set_arg(p)


def add_set_arg(p: argparse.ArgumentParser) -> None:
    """``--set section.field=value``, repeatable: overrides validated like any config field."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set training.steps=500 (repeatable)",
    )


def config_from_args(args: argparse.Namespace, flags: dict[str, str] | None = None) -> AdmConfig:
    """The preset with --set overrides, then each given flag in ``flags`` (argument name ->
    dotted config field) as one more override, so a flag is validated like any field."""
    extra = [
        f"{field}={json.dumps(getattr(args, name))}"  # JSON is YAML: values keep their type
        for name, field in (flags or {}).items()
        if getattr(args, name, None) is not None
    ]
    return load_config(args.config, [*args.overrides, *extra])


def check_resources(cfg: AdmConfig, stages: tuple[str, ...] | None = None) -> None:
    """The run's resource plan checked before Prefect or Ray start (tasks.resources): a plan
    the cluster cannot place, a missing GPU or a dead Ray address is one line now, not a wait."""
    from tasks.resources import checked_plan

    checked_plan(cfg, stages)


def count(minimum: int):
    """An argparse type for flags that are not config fields: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def check_outputs(cfg: AdmConfig, *uris: str | None) -> None:
    """Before anything starts: every location the command writes (and the storage root, where
    MLflow keeps artifacts and stages their caches) is usable; see admflow.preflight."""
    from admflow.preflight import check_outputs as check

    check(*uris, cfg.storage.root, create_bucket=cfg.storage.create_bucket)


def local_abs(uri: str | None) -> str | None:
    """A local path made absolute here, at the CLI: Ray workers run in other directories.
    A URI in a form admflow cannot use (``S3://``, ``s3:/``, ``s3a://``, ``gs://`` without
    gcsfs) is a one-line error here, before anything starts."""
    from admflow.storage import StorageError
    from admflow.uris import UriError, check_uri_form

    try:
        check_uri_form(uri) if uri is not None else None
    except UriError as e:
        raise StorageError(str(e)) from None
    if uri is None or ("://" in uri and not uri.startswith("file://")):
        return uri
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
