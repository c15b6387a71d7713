"""The paper's preprocessing of a source image into a shard row, and its PNG encoding.

It stays beside the sharding rather than in ``models/``: it is defined by PIL's BOX and BICUBIC
resamplers (as guided-diffusion's ``center_crop_arr``), and ``models/`` works in torch only.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

PREPROCESSING = (
    "RGB; halve with PIL BOX while the short side >= 2x target; BICUBIC so the short side "
    "equals target; centre crop (as the paper's image_datasets.center_crop_arr); PNG"
)


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """The paper's preprocessing: BOX halving, BICUBIC to the target, centre crop."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        w, h = image.size
        image = image.resize((w // 2, h // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    w, h = image.size
    image = image.resize((round(w * scale), round(h * scale)), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
