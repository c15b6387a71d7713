"""An independent judge of class fidelity: a small CNN trained on labelled real images.

Guidance pushes samples towards what the *noisy guidance classifier* believes; grading class
fidelity with that same classifier would grade the method by its own yardstick. The judge is
a different network (plain convolutions, no timestep input), trained apart from the guidance
classifier on real images, never on samples: half of each batch clean, half degraded
(:mod:`models.degrade`: blur, lower contrast, noise), so that a soft sample is read by its
class and not taken for another class. Its accuracy on held-out real images, clean and
softened as much as a sample set (:func:`softening_ladder`, :func:`match_softness`), says how
far it can be trusted; its accuracy on a sample set (each sample's label being the class it
was drawn for) is the "class accuracy" column of the demo's report.

The judge works at the base model's resolution; larger images (an upsampler's output) are
area-reduced to it first. It is an ensemble (:class:`JudgeEnsemble`) of a few such networks
trained from different seeds, their class probabilities averaged: a single network's reading
of samples a little off the data distribution hinges on its seed. Why a CNN rather than a
linear probe on Inception features, and the measurements: docs/trade-offs.md.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.degrade import Degradation, mean_gradient_magnitude, random_degradation, soften
from models.resize import downsample_area, upsample_bilinear


class JudgeCNN(nn.Module):
    """Five 3x3 conv blocks (GroupNorm, SiLU), two 2x average pools, global pool, linear."""

    def __init__(self, num_classes: int, image_size: int, width: int = 32):
        super().__init__()
        self.image_size = image_size

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()
            )

        w = width
        self.net = nn.Sequential(
            block(3, w), block(w, w), nn.AvgPool2d(2),
            block(w, 2 * w), block(2 * w, 2 * w), nn.AvgPool2d(2),
            block(2 * w, 2 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * w, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def to_judge_input(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] at ``image_size`` (area-reduced when larger)."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] > image_size:
        return downsample_area(x, image_size)
    if x.shape[-1] < image_size:
        return upsample_bilinear(x, image_size)
    return x


class JudgeEnsemble(nn.Module):
    """``members`` judges whose softmax outputs are averaged; ``forward`` returns the log of
    that average (so ``argmax`` is the ensemble's class)."""

    def __init__(self, members: list[JudgeCNN]):
        super().__init__()
        self.image_size = members[0].image_size
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([F.softmax(m(x), dim=1) for m in self.members]).mean(0)
        return probs.clamp_min(1e-12).log()


def fit_judge(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    members: int = 4,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    degradation: Degradation | None = Degradation(),
) -> JudgeEnsemble:
    """Train ``members`` judges (seeds ``seed``, ``seed + 1``, ...) on uint8 NHWC ``images``
    with random horizontal flips and (unless ``degradation`` is None) degraded copies,
    deterministically."""
    labels = np.asarray(labels, np.int64)
    if images.ndim != 4 or len(images) != len(labels) or len(images) < 2:
        raise ValueError(
            f"need images [N, H, W, 3] and N labels, got {images.shape}, {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    x_all = to_judge_input(images, images.shape[1])
    y_all = torch.from_numpy(labels)
    trained = []
    for i in range(members):
        torch.manual_seed(seed + i)  # each member's initialisation and batches from its seed
        member = JudgeCNN(num_classes, images.shape[1])
        _fit_member(member, x_all, y_all, steps, batch_size, lr, seed + i, degradation)
        trained.append(member)
    return JudgeEnsemble(trained).eval()


def _fit_member(
    model: JudgeCNN,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    degradation: Degradation | None,
) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (batch_size,), generator=gen)
        x = x_all[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if degradation is not None:
            x = random_degradation(x, gen, degradation)
        loss = F.cross_entropy(model(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def judge_predict(
    model: JudgeCNN | JudgeEnsemble, images: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Predicted class of each uint8 NHWC image."""
    model.eval()
    out = []
    for lo in range(0, len(images), batch_size):
        x = to_judge_input(images[lo : lo + batch_size], model.image_size)
        out.append(model(x).argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def judge_accuracy(
    model: JudgeCNN | JudgeEnsemble, images: np.ndarray, labels: np.ndarray
) -> float:
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set")
    return float(np.mean(judge_predict(model, images) == labels))


def image_sharpness(images: np.ndarray, image_size: int) -> np.ndarray:
    """Each uint8 NHWC image's mean gradient magnitude as the judge sees it (at its size)."""
    return mean_gradient_magnitude(to_judge_input(images, image_size)).numpy()


@torch.no_grad()
def softening_ladder(
    model: JudgeCNN | JudgeEnsemble,
    images: np.ndarray,
    labels: np.ndarray,
    levels: int = 21,
    spec: Degradation = Degradation(),
) -> list[dict[str, float]]:
    """The judge's accuracy on ``images`` softened (:func:`models.degrade.soften`) at
    ``levels`` strengths from 0 (clean) to 1, each with the images' mean sharpness there."""
    model.eval()
    x = to_judge_input(images, model.image_size)
    y = torch.from_numpy(np.asarray(labels, np.int64))
    ladder = []
    for strength in np.linspace(0.0, 1.0, levels):
        xs = soften(x, float(strength), spec)
        ladder.append(
            {
                "strength": float(strength),
                "sharpness": float(mean_gradient_magnitude(xs).mean()),
                "accuracy": float((model(xs).argmax(1) == y).float().mean()),
            }
        )
    return ladder


def match_softness(
    ladder: list[dict[str, float]], sharpness: float, spec: Degradation = Degradation()
) -> dict[str, float | str]:
    """The ladder read where the softened real images are as sharp as ``sharpness`` (a
    sample set's mean gradient magnitude): strength and accuracy interpolated linearly between
    the two rungs around it, with the blur and contrast that strength means; ``clipped`` says
    when the set lies outside the ladder (sharper than the clean images, or softer than the
    last rung)."""
    out: dict[str, float | str] = {
        "sharpness": float(sharpness),
        "real_sharpness": ladder[0]["sharpness"],
        "clipped": "",
    }
    first, last = ladder[0], ladder[-1]
    if sharpness >= first["sharpness"] or sharpness <= last["sharpness"]:
        rung = first if sharpness >= first["sharpness"] else last
        strength, accuracy = rung["strength"], rung["accuracy"]
        out["clipped"] = (
            "sharper than the real images" if rung is first else "softer than the ladder"
        )
    else:
        for hi, lo in zip(ladder, ladder[1:], strict=False):
            if hi["sharpness"] >= sharpness >= lo["sharpness"]:
                t = (hi["sharpness"] - sharpness) / max(hi["sharpness"] - lo["sharpness"], 1e-12)
                strength = hi["strength"] + t * (lo["strength"] - hi["strength"])
                accuracy = hi["accuracy"] + t * (lo["accuracy"] - hi["accuracy"])
                break
        else:
            raise ValueError("the ladder's sharpness must fall with its strength")
    out.update(
        strength=strength,
        accuracy=accuracy,
        blur=strength * spec.max_blur,
        contrast=1.0 - strength * (1.0 - spec.min_contrast),
    )
    return out


def holdout_split(
    n: int, holdout_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out) of a fixed random split of ``n`` items."""
    order = np.random.default_rng(seed).permutation(n)
    cut = max(1, int(round(n * holdout_fraction)))
    return np.sort(order[cut:]), np.sort(order[:cut])
