"""A deterministic demo data set that needs no download.

Ten classes of coloured shapes and textures: circle, square, triangle, stripes, checker,
ring, cross, gradient, dots, diamond. Each image has a random background and foreground
colour, position, scale (and, for the textures, period and angle) drawn from a NumPy RNG
seeded by ``(seed, class index, image index)``, so image ``k`` of a class is the same
whatever else is rendered and in whatever order (Ray tasks may render any subset).

Images are rendered at ``2 * size`` and BOX-reduced to ``size`` (2x supersampling, which
anti-aliases the edges); the sharding preprocessing then leaves them unchanged. The
classes are easy for a small classifier and varied enough that a small diffusion model
has something to learn, which is all the CPU demo needs.
"""

from __future__ import annotations

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
VERSION = 1  # bump when rendering changes: it is part of the source fingerprint


def demo_keys(per_class: int) -> list[tuple[str, int]]:
    """All ``(key, label)`` pairs of the demo set, keys like ``circle/00012``."""
    return [(f"{name}/{i:05d}", c) for c, name in enumerate(CLASS_NAMES) for i in range(per_class)]


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
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    r = rng.uniform(0.15, 0.3)
    mask = _SHAPES[CLASS_NAMES[label]](rng, x - cx, y - cy, r)
    if CLASS_NAMES[label] == "gradient":
        img = bg * (1 - mask[..., None]) + fg * mask[..., None]
    else:
        img = np.where(mask[..., None] > 0.5, fg, bg)
    img = img + rng.normal(0.0, 6.0, size=img.shape)  # mild sensor-like noise
    big = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(big.resize((size, size), resample=Image.Resampling.BOX))  # 2x supersampling


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground colours far enough apart to keep shapes visible."""
    while True:
        bg, fg = rng.uniform(0, 255, size=(2, 3))
        if np.abs(bg - fg).sum() > 200:
            return bg.astype(np.float32), fg.astype(np.float32)


def _rotated(rng: np.random.Generator, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    theta = rng.uniform(0, np.pi)
    return dx * np.cos(theta) + dy * np.sin(theta)


def _circle(rng, dx, dy, r):
    return (dx**2 + dy**2 < r**2).astype(np.float32)


def _square(rng, dx, dy, r):
    return ((np.abs(dx) < r) & (np.abs(dy) < r)).astype(np.float32)


def _triangle(rng, dx, dy, r):
    inside_y = (dy > -r) & (dy < r)
    half_width = (dy + r) / 2  # apex on top, base of width 2r at the bottom
    return (inside_y & (np.abs(dx) < half_width)).astype(np.float32)


def _stripes(rng, dx, dy, r):
    period = rng.uniform(0.12, 0.3)
    return (np.sin(2 * np.pi * _rotated(rng, dx, dy) / period) > 0).astype(np.float32)


def _checker(rng, dx, dy, r):
    p = rng.uniform(0.1, 0.25)
    return ((np.floor(dx / p) + np.floor(dy / p)) % 2).astype(np.float32)


def _ring(rng, dx, dy, r):
    d = np.sqrt(dx**2 + dy**2)
    return ((d < r) & (d > 0.6 * r)).astype(np.float32)


def _cross(rng, dx, dy, r):
    w = r / 3
    bar = lambda a, b: (np.abs(a) < w) & (np.abs(b) < r)  # noqa: E731
    return (bar(dx, dy) | bar(dy, dx)).astype(np.float32)


def _gradient(rng, dx, dy, r):
    t = _rotated(rng, dx, dy)
    return np.clip(t - t.min(), 0, None) / max(float(t.max() - t.min()), 1e-6)


def _dots(rng, dx, dy, r):
    p = rng.uniform(0.15, 0.25)
    u, v = (dx / p) % 1 - 0.5, (dy / p) % 1 - 0.5
    return (u**2 + v**2 < 0.3**2).astype(np.float32)


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
