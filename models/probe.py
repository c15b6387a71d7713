"""An independent judge of class fidelity: a linear probe on Inception pool features.

Guidance pushes samples towards what the *noisy guidance classifier* believes; measuring class
fidelity with that same classifier would grade the method by its own yardstick. The judge here
never meets the guidance classifier: a multinomial logistic regression on the evaluator's
2048-d pool features, fitted on labelled real images. Its accuracy on held-out real images says
how far the judge itself can be trusted; its accuracy on a sample set (each sample's label being
the class it was drawn for) is the "class accuracy" column of the demo's report.

Features are standardised with the training split's mean and standard deviation; the weights
are fitted with L-BFGS on the L2-regularised cross-entropy, in float64, deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class LinearProbe:
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    weight: np.ndarray  # (D, K)
    bias: np.ndarray  # (K,)

    @property
    def num_classes(self) -> int:
        return int(self.bias.shape[0])

    def logits(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float64) - self.mean) / self.scale
        return z @ self.weight + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(features), axis=1)

    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        labels = np.asarray(labels)
        if len(labels) == 0:
            raise ValueError("accuracy of an empty set")
        return float(np.mean(self.predict(features) == labels))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, "weight": self.weight, "bias": self.bias}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> LinearProbe:
        return cls(
            **{k: np.asarray(arrays[k], np.float64) for k in ("mean", "scale", "weight", "bias")}
        )


def fit_linear_probe(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    l2: float = 1e-2,
    max_iter: int = 200,
) -> LinearProbe:
    """Multinomial logistic regression of ``labels`` on ``features`` [N, D]."""
    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.int64)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need features [N, D] and N labels, got {x.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    z = torch.from_numpy((x - mean) / scale)
    target = torch.from_numpy(y)
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, target) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe(mean, scale, w.detach().numpy(), b.detach().numpy())


def holdout_split(
    n: int, holdout_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out) of a fixed random split of ``n`` items."""
    order = np.random.default_rng(seed).permutation(n)
    cut = max(1, int(round(n * holdout_fraction)))
    return np.sort(order[cut:]), np.sort(order[:cut])
