"""Checks the evaluation makes on its inputs before Inception runs on either of them."""

from __future__ import annotations

import zipfile

import numpy as np

from admflow import storage
from tasks.scoring.inputs import EvaluationInputError, _manifest_dir, npz_header, npz_members


def image_size_of(uri: str) -> int | None:
    """The resolution of an evaluation input from its header alone (no pixel is read);
    None when it does not say (a feature file written without ``image_size``)."""
    base = _manifest_dir(uri)
    if base is not None:
        size = storage.read_json(storage.join(base, "manifest.json")).get("image_size")
        return int(size) if size else None
    if not uri.endswith(".npz") or not storage.exists(uri):
        return None  # features_for names what is wrong with it
    try:
        members = npz_members(uri)
    except zipfile.BadZipFile:
        return None
    if "pool" in members:
        if "image_size" not in members:
            return None
        with storage.open_read(uri) as f:
            return int(np.load(f)["image_size"])
    if "arr_0" in members:
        shape, _ = npz_header(uri, "arr_0")
        return int(shape[1]) if len(shape) == 4 else None
    return None


def check_same_resolution(ref: str, samples: str) -> None:
    r_size, s_size = image_size_of(ref), image_size_of(samples)
    if r_size is not None and s_size is not None and r_size != s_size:
        raise EvaluationInputError(
            f"reference {ref} holds {r_size}px images but samples {samples} are {s_size}px: "
            "compare sets of the same resolution (e.g. the paper's reference batch for it)"
        )
