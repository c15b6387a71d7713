"""A deterministic demo data set that needs no download.

Ten classes of bright shapes and textures on dark backgrounds: circle, square, triangle,
stripes, checker, ring, cross, gradient, dots, diamond. Each image has a random dark
background, a random saturated foreground hue, a small jitter of position and scale (and,
for the textures, period and angle) drawn from a NumPy RNG seeded by
``(seed, class index, image index)``, so image ``k`` of a class is the same whatever else is
rendered and in whatever order (Ray tasks may render any subset).

The sizes are chosen for the demo's 16px base model: objects span half the image and
texture periods are at least four pixels at 16px, so every class stays legible there (at
16px the first version's small shapes and fine textures were hard to tell apart even for a
classifier of real images, and a base model learned them far more slowly). Images are
rendered at ``2 * size`` and BOX-reduced to ``size`` (2x supersampling, which anti-aliases
the edges); the sharding preprocessing then leaves them unchanged.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable

import numpy as np
from PIL import Image

CLASS_NAMES = (
    "circle",
    "square",
    "triangle",
    "stripes",
    "checker",
    "ring",
    "cross",
    "gradient",
    "dots",
    "diamond",
)
DEMO_SEED = 0
# The held-out set ("demo-heldout"): this many images per class after the training set's
# demo_images_per_class, drawn like them, so no model trained on the demo has seen them.
HELDOUT_PER_CLASS = 10
VERSION = 2  # bump when rendering changes: it is part of the source fingerprint


def demo_keys(per_class: int, start: int = 0) -> list[tuple[str, int]]:
    """The ``(key, label)`` pairs of images ``start .. start + per_class - 1`` of every class,
    keys like ``circle/00012``."""
    return [
        (f"{name}/{i:05d}", c)
        for c, name in enumerate(CLASS_NAMES)
        for i in range(start, start + per_class)
    ]


def parse_key(key: str) -> tuple[int, int]:
    """``circle/00012`` -> (class index, image index)."""
    name, index = key.split("/")
    return CLASS_NAMES.index(name), int(index)


def render(label: int, index: int, size: int, seed: int = DEMO_SEED) -> np.ndarray:
    """Image ``index`` of class ``label`` as uint8 HWC at ``size x size``."""
    rng = np.random.default_rng([seed, label, index])
    n = 2 * size
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n  # coordinates in [0, 1)
    bg, fg = _colours(rng)
    cx, cy = rng.uniform(0.42, 0.58, size=2)
    r = rng.uniform(0.26, 0.36)
    mask = _SHAPES[CLASS_NAMES[label]](rng, x - cx, y - cy, r)
    if CLASS_NAMES[label] == "gradient":
        img = bg * (1 - mask[..., None]) + fg * mask[..., None]
    else:
        img = np.where(mask[..., None] > 0.5, fg, bg)
    big = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(big.resize((size, size), resample=Image.Resampling.BOX))  # 2x supersampling


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark background and a bright, saturated foreground of random hue."""
    bg = rng.uniform(0, 70, size=3)
    hue, saturation = rng.uniform(0, 1), rng.uniform(0.5, 1.0)
    fg = np.array(colorsys.hsv_to_rgb(hue, saturation, 1.0)) * 255
    return bg.astype(np.float32), fg.astype(np.float32)


def _rotated(rng: np.random.Generator, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    theta = rng.uniform(0, np.pi)
    return dx * np.cos(theta) + dy * np.sin(theta)


def _circle(rng, dx, dy, r):
    return (dx**2 + dy**2 < r**2).astype(np.float32)


def _square(rng, dx, dy, r):
    r = 0.9 * r  # the same area as the circle, roughly
    return ((np.abs(dx) < r) & (np.abs(dy) < r)).astype(np.float32)


def _triangle(rng, dx, dy, r):
    r = 1.1 * r
    inside_y = (dy > -r) & (dy < r)
    half_width = (dy + r) / 2  # apex on top, base of width 2r at the bottom
    return (inside_y & (np.abs(dx) < half_width)).astype(np.float32)


def _stripes(rng, dx, dy, r):
    period = rng.uniform(0.28, 0.4)
    return (np.sin(2 * np.pi * _rotated(rng, dx, dy) / period) > 0).astype(np.float32)


def _checker(rng, dx, dy, r):
    p = rng.uniform(0.2, 0.28)
    return ((np.floor(dx / p) + np.floor(dy / p)) % 2).astype(np.float32)


def _ring(rng, dx, dy, r):
    d = np.sqrt(dx**2 + dy**2)
    return ((d < 1.1 * r) & (d > 0.55 * r)).astype(np.float32)


def _cross(rng, dx, dy, r):
    w = r / 2.5
    bar = lambda a, b: (np.abs(a) < w) & (np.abs(b) < 1.1 * r)  # noqa: E731
    return (bar(dx, dy) | bar(dy, dx)).astype(np.float32)


def _gradient(rng, dx, dy, r):
    t = _rotated(rng, dx, dy)
    return np.clip(t - t.min(), 0, None) / max(float(t.max() - t.min()), 1e-6)


def _dots(rng, dx, dy, r):
    p = rng.uniform(0.3, 0.36)
    u, v = (dx / p) % 1 - 0.5, (dy / p) % 1 - 0.5
    return (u**2 + v**2 < 0.28**2).astype(np.float32)


def _diamond(rng, dx, dy, r):
    return (np.abs(dx) + np.abs(dy) < r * 1.2).astype(np.float32)


_SHAPES: dict[str, Callable[..., np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "stripes": _stripes,
    "checker": _checker,
    "ring": _ring,
    "cross": _cross,
    "gradient": _gradient,
    "dots": _dots,
    "diamond": _diamond,
}
