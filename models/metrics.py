"""FID, sFID, Inception Score and improved precision/recall, defined as in ADM's evaluator.

Definitions follow guided-diffusion ``evaluations/evaluator.py``:

- statistics: ``mu = mean(acts, axis=0)`` in the features' dtype (float32), ``sigma =
  np.cov(acts, rowvar=False)`` (float64);
- Frechet distance: ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2))``, retrying with
  1e-6 on both diagonals only if sqrtm is not finite, failing if the diagonal of sqrtm has an
  imaginary part above 1e-3;
- IS: ``exp(mean KL(p(y|x) || p(y)))`` per split of 5000 (a last partial split counts as one),
  averaged over splits;
- precision/recall (Kynkäänniemi et al. 2019): squared Euclidean distances computed from
  fp16-rounded features (recomputed in fp32 when any is not finite), radius of each point =
  distance to its 3rd nearest neighbour (itself excluded), a point is covered when its distance
  to some point of the other set is <= that point's radius. Precision = covered samples, recall
  = covered reference points.

The fp16 step is emulated on CPU: inputs, norms, the Gram product and the distances are rounded
to fp16 and computed in fp32 in between (the evaluator runs TF fp16 ops; only intermediate
rounding inside ``nu - 2 uv + nv`` differs, well below fp16 resolution of the result).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch


class MetricError(ValueError):
    """Features that a metric cannot be computed from; the message says why."""


# ------------------------------------------------------------------------ FID and sFID


def _check_features(acts: np.ndarray, minimum: int, what: str) -> np.ndarray:
    acts = np.asarray(acts)
    if acts.ndim != 2:
        raise MetricError(f"{what}: features must be a 2-D [N, D] array, got shape {acts.shape}")
    if len(acts) < minimum:
        raise MetricError(f"{what}: need at least {minimum} feature vectors, got {len(acts)}")
    if not np.isfinite(acts).all():
        raise MetricError(f"{what}: features contain NaN or inf")
    return acts


def feature_statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of ``acts`` [N, D], exactly as the evaluator computes them."""
    acts = _check_features(acts, 2, "FID statistics")
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


class RunningStatistics:
    """Mean and covariance accumulated batch by batch in float64 (for data sets too large to
    hold as features); equals ``np.cov`` up to float64 rounding."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, acts: np.ndarray) -> None:
        a = np.asarray(acts, np.float64)
        self.n += len(a)
        self.sum += a.sum(0)
        self.outer += a.T @ a

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise MetricError(f"FID statistics: need at least 2 images, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, sigma


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    method: str = "sqrtm",
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID when fed pool
    statistics, sFID with spatial ones).

    ``method="sqrtm"`` is the evaluator's computation. ``method="eigh"`` gets the same trace
    from the eigenvalues of sqrt(s1)·s2·sqrt(s1) (similar to s1·s2, so the same spectrum):
    two symmetric eigendecompositions instead of a Schur-based sqrtm, ~20x faster at 2048-d
    on CPU and well-defined for the rank-deficient covariances of small sample sets."""
    mu1, sigma1, mu2, sigma2 = _checked_pair(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    if method == "eigh":
        return _finite(
            diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt(sigma1, sigma2)
        )
    if method != "sqrtm":
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    with np.errstate(over="ignore", invalid="ignore"):
        product = sigma1.dot(sigma2)
    _finite(0.0, product, diff)  # scipy's sqrtm would raise a bare ValueError on inf entries
    covmean = scipy.linalg.sqrtm(product)  # same result as disp=False
    if not np.isfinite(covmean).all():
        warnings.warn(f"singular covariance product; adding {eps} to the diagonals", stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MetricError(f"sqrtm has an imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return _finite(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _checked_pair(mu1, sigma1, mu2, sigma2) -> tuple[np.ndarray, ...]:
    """The two statistics as arrays, once they are known to match and be finite."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricError(
            f"statistics of different dimension: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    _finite(0.0, mu1, sigma1, mu2, sigma2)  # LAPACK spins for minutes on inf, then fails
    return mu1, sigma1, mu2, sigma2


def _finite(*values: np.ndarray | float) -> float:
    """``float`` of the first value once every value is known to be finite (float64 overflow
    makes the distance meaningless: fail with a message instead of returning nan or inf)."""
    if not all(np.isfinite(v).all() for v in values):
        raise MetricError(
            "the Frechet distance does not converge: the feature statistics overflow float64 "
            "(features far outside Inception's range?); check the feature files"
        )
    return float(np.sum(values[0])) if np.ndim(values[0]) == 0 else 0.0


def frechet_distance_to_features(
    mu1: np.ndarray, sigma1: np.ndarray, acts2: np.ndarray, method: str = "sqrtm"
) -> float:
    """:func:`frechet_distance` from N(mu1, sigma1) to the statistics of ``acts2`` [N, D].

    With ``method="eigh"`` and N <= D (a few hundred samples against 2048 Inception features)
    sigma2 = Fᵀ F for the centred features F / sqrt(N - 1), and s1·s2 = s1·Fᵀ·F has the same
    non-zero eigenvalues as the N×N matrix F·s1·Fᵀ: the trace needs no D×D decomposition.
    Otherwise (and always for ``sqrtm``, the evaluator's computation) the statistics of
    ``acts2`` go through :func:`frechet_distance`."""
    mu2, sigma2 = feature_statistics(acts2)
    acts2 = np.asarray(acts2)
    if method != "eigh" or len(acts2) > acts2.shape[1]:
        return frechet_distance(mu1, sigma1, mu2, sigma2, method=method)
    mu1, sigma1, mu2, sigma2 = _checked_pair(mu1, sigma1, mu2, sigma2)
    factor = (acts2.astype(np.float64) - acts2.astype(np.float64).mean(0)) / np.sqrt(len(acts2) - 1)
    gram = factor @ ((sigma1 + sigma1.T) / 2) @ factor.T
    lam = np.linalg.eigvalsh((gram + gram.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(lam, 0, None)).sum())
    diff = mu1 - mu2
    return _finite(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _trace_sqrt(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(s1 s2)) for symmetric PSD s1, s2 via symmetric eigendecompositions."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    lam = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


# ---------------------------------------------------------------------- Inception Score


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float32)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """IS from class probabilities [N, C] (rows summing to 1), in float32 as the evaluator."""
    preds = _check_features(probs, 1, "Inception Score")
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


# ------------------------------------------------------------- improved precision/recall


def _round16(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest fp16 value, in place (inf on overflow)."""
    return x.copy_(x.half())


class _Points:
    """Features in float32 plus their fp16-rounded copy and squared norms, prepared once so
    that each block pair costs one matrix product."""

    def __init__(self, features: np.ndarray):
        self.fp32 = torch.from_numpy(features).float()
        self.fp16 = self.fp32.half().float()
        self.norm16 = _round16((self.fp16 * self.fp16).sum(1))
        self.norm32 = (self.fp32 * self.fp32).sum(1)

    def __len__(self) -> int:
        return len(self.fp32)


def _block_distances(a: _Points, ia: slice, b: _Points, ib: slice) -> torch.Tensor:
    """Squared distances between a[ia] and b[ib]: fp16 first, fp32 if fp16 overflows."""
    d = _round16(a.fp16[ia] @ b.fp16[ib].T)
    d.mul_(-2.0).add_(a.norm16[ia, None]).add_(b.norm16[None, ib]).clamp_(min=0.0)
    _round16(d)
    if bool(torch.isfinite(d).all()):
        return d
    d = a.fp32[ia] @ b.fp32[ib].T
    return d.mul_(-2.0).add_(a.norm32[ia, None]).add_(b.norm32[None, ib]).clamp_(min=0.0)


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared distances [len(u), len(v)] in float32: fp16 first, fp32 if fp16 overflows."""
    a, b = _Points(u.float().numpy()), _Points(v.float().numpy())
    return _block_distances(a, slice(None), b, slice(None))


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def manifold_radii(features: np.ndarray, k: int = 3, block: int = 2500) -> np.ndarray:
    """Distance (squared) from each point to its k-th nearest neighbour, itself excluded.

    Only blocks on and above the diagonal are computed; the rest are their transposes (with
    blocks of n/4 that is 10 of 16 products instead of 16).
    """
    x = _Points(_check_features(features, k + 1, "precision/recall"))
    blocks = _blocks(len(x), block)
    cands: list[list[torch.Tensor]] = [[] for _ in blocks]
    for i, bi in enumerate(blocks):
        for j in range(i, len(blocks)):
            d = _block_distances(x, bi, x, blocks[j])
            cands[i].append(d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values)
            if j != i:
                d = d.T.contiguous()  # row-wise top-k is much faster than down columns
                cands[j].append(d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values)
    radii = [torch.cat(c, 1).topk(k + 1, dim=1, largest=False).values[:, k] for c in cands]
    return torch.cat(radii).numpy()


def precision_recall(
    ref: np.ndarray, sample: np.ndarray, k: int = 3, block: int = 2500
) -> tuple[float, float]:
    """(precision, recall) of ``sample`` features against ``ref`` features."""
    ref = _check_features(ref, k + 1, "precision/recall reference")
    sample = _check_features(sample, k + 1, "precision/recall samples")
    if ref.shape[1] != sample.shape[1]:
        raise MetricError(f"feature sizes differ: {ref.shape[1]} vs {sample.shape[1]}")
    r_ref = torch.from_numpy(manifold_radii(ref, k, block))
    r_smp = torch.from_numpy(manifold_radii(sample, k, block))
    x, y = _Points(ref), _Points(sample)
    ref_in = torch.zeros(len(x), dtype=torch.bool)
    smp_in = torch.zeros(len(y), dtype=torch.bool)
    for bi in _blocks(len(x), block):
        for bj in _blocks(len(y), block):
            d = _block_distances(x, bi, y, bj)
            ref_in[bi] |= (d <= r_smp[None, bj]).any(1)
            smp_in[bj] |= (d <= r_ref[bi, None]).any(0)
    return float(smp_in.double().mean()), float(ref_in.double().mean())
