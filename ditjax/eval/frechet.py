"""Fréchet distance between Gaussians fitted to feature sets (the FID formula, any feature space).

Everything runs in float64 NumPy: the distance is a small difference of large traces, so float32
(or JAX's default precision) loses most of its digits once features have a few hundred dimensions.
"""
from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of `features` [N, D], in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features of shape [N>=2, D], got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root; tiny negative eigenvalues from rounding are clipped to zero."""
    eigvals, eigvecs = np.linalg.eigh(cov)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance_from_stats(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray
) -> float:
    """||mu1-mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^1/2).

    tr((C1 C2)^1/2) is computed as the trace of the square root of the symmetric PSD matrix
    C1^1/2 C2 C1^1/2 (same eigenvalues as C1 C2), so it needs only `eigh` and stays real even
    when the covariances are singular (e.g. dead ReLU features), where `sqrtm(C1 @ C2)` can go
    complex or unstable.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched stats: {mu1.shape}, {cov1.shape} vs {mu2.shape}, {cov2.shape}")
    sqrt1 = _psd_sqrt(cov1)
    middle = sqrt1 @ cov2 @ sqrt1
    middle = (middle + middle.T) / 2  # remove rounding asymmetry before eigh
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean
    return float(max(fd, 0.0))  # a true distance is >= 0; clip rounding noise for identical sets


def frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N1, D] and [N2, D]."""
    return frechet_distance_from_stats(*gaussian_stats(features1), *gaussian_stats(features2))
