"""Image resizing of the two-stage pipeline (ADM §4, ADM-U), in one place.

* :func:`downsample_area` makes the upsampler's low-resolution input from a training image
  (box averaging, as the released upsamplers' data pipeline does).
* :func:`upsample_bilinear` is the operation :class:`models.unet.SuperResModel` applies to its
  low-resolution input before concatenating it with x_t, so "bilinear" is also the baseline a
  learned upsampler has to beat (the demo reports both).

Both take and return float images in [-1, 1], NCHW; :func:`upsample_bilinear_uint8` works on
uint8 NHWC sample arrays.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def downsample_area(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="area")


def upsample_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear")


def upsample_bilinear_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC images upscaled bilinearly to ``size`` (rounded to the nearest level)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).double() / 127.5 - 1
    y = upsample_bilinear(x, size)
    out = ((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous().numpy()
