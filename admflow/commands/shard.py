"""``admflow shard SRC DEST``."""

from __future__ import annotations

import argparse
import os
import sys

from admflow.commands.common import add_config_args, check_outputs, config_from_args, local_abs
from admflow.storage import StorageError

SHARD_FLAGS = {
    "image_size": "data.image_size",
    "shard_rows": "data.shard_rows",
    "workers": "compute.num_workers",
    "create_bucket": "storage.create_bucket",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shard",
        help="turn images into Parquet shards + manifest.json (local dir or s3://)",
        description=(
            "SRC: 'demo' (built-in 10-class shapes set; 'demo-heldout': 10 more images per "
            "class that no model trained on 'demo' has seen, e.g. for `admflow nll`), an "
            "ImageNet-style folder (one "
            "sub-folder per class; labels in sorted class-name order), a flat folder "
            "(unconditional, LSUN-style), an ADM .npz batch (arr_0 uint8 NHWC, optional "
            "arr_1 labels), or your copy of CIFAR-10's python batches (the cifar-10-batches-py "
            "folder for the 50,000 training images, or one batch file such as test_batch; read "
            "by an unpickler that builds only arrays). Images get the paper's preprocessing (BOX "
            "halving, BICUBIC, centre crop). Runs on Ray; deterministic; a rerun writes only missing shards. Corrupt "
            "files are skipped and listed in the manifest."
        ),
    )
    p.add_argument(
        "src",
        help="'demo', 'demo-heldout', an image folder, an .npz batch, or CIFAR-10's "
        "cifar-10-batches-py",
    )
    p.add_argument("dest", help="output directory: a path, file:// or s3://bucket/prefix")
    add_config_args(p)
    p.add_argument("--image-size", type=int, help="target size (default: data.image_size)")
    p.add_argument("--shard-rows", type=int, help="images per shard (default: data.shard_rows)")
    p.add_argument(
        "--workers", type=int, help="parallel shard tasks (default: compute.num_workers)"
    )
    p.add_argument(
        "--create-bucket",
        action="store_true",
        default=None,
        help="create DEST's S3 bucket if it does not exist (default: error naming the bucket)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: on when stderr is a terminal)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tasks.data.shard import ShardError, shard_dataset

    cfg = config_from_args(args, SHARD_FLAGS)
    src = args.src if args.src in ("demo", "demo-heldout") else local_abs(args.src)
    dest = local_abs(args.dest)
    if os.path.isfile(dest):
        raise StorageError(f"shard destination {dest} is a file; pass a directory")
    check_outputs(cfg, dest)
    try:
        m = shard_dataset(cfg, src, dest, progress=args.progress)
    except ShardError as e:
        print(f"admflow shard: {e}", file=sys.stderr)
        return 2
    print(
        f"{m['num_images']} images ({m['num_classes'] or 'no'} classes, {m['image_size']}px) in "
        f"{len(m['shards'])} shards; {len(m['written'])} written, {len(m['skipped'])} skipped"
    )
    print(f"manifest: {dest.rstrip('/')}/manifest.json")
    return 0
