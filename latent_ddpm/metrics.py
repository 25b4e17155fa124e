"""Sample-quality metrics for latents of any shape (C, H, W), in a fixed feature space (docs/sampling.md);
`evaluate.py` applies them to samples against a reference (the `Evaluator`, `evaluate`, the command).

Feature space phi(x), fixed for a given reference set and latent shape:
1. standardise: z = (x - m_c) / s_c with the reference's per-channel mean m_c and std s_c;
2. `NUM_PROJECTIONS` random projections of the flattened z (D = C*H*W values): z @ P, with
   P ~ N(0, 1/D) drawn from numpy's PCG64 seeded with `PROJECTION_SEED` (a unit-variance z gives
   unit-variance projections);
3. z average-pooled to a coarse `POOL_GRID` x `POOL_GRID` grid per channel (fewer cells if H or W is smaller);
4. the spatial mean and std of each channel of z.
phi(x) = concat(2, 3, 4); metrics use float64.

Metrics: Fréchet distance FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between
Gaussians fit to the features (matrix square roots by symmetric eigendecomposition, no scipy);
precision and recall with k-NN manifolds (Kynkäänniemi et al. 2019); per-channel mean/std errors in
the data's scale; per-class FD when both sides have labels; and a reference-vs-reference baseline
(FD between two random halves of the reference) to read FD against.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserInputError

# Width of the random projection of the flattened standardised latent.
NUM_PROJECTIONS = 256
#: The widest projection accepted: its (D, width) matrix and the width^2 covariances stay in memory.
MAX_PROJECTIONS = 4096
# Seed of the projection matrix: part of the feature space's definition, never change it.
PROJECTION_SEED = 0
# Side of the coarse average-pooling grid per channel.
POOL_GRID = 4
# k of the k-NN manifold radii in precision/recall (the paper's default).
K_NEIGHBOURS = 3
# Precision/recall use at most this many points per side (k-NN distances are O(n^2) work).
MAX_PR_SAMPLES = 5000
# The reference set is subsampled to at most this many latents (memory and time).
MAX_REFERENCE = 10_000
# Rows per chunk when computing features and distances (bounds memory).
CHUNK_ROWS = 512
# A reference channel with a std at or below this is constant: the features take it in its own units (std 1), as
# dividing by this floor would blow any deviation of the samples up to ~1e16 in the Frechet distance; the channel
# errors are still in units of max(std, STD_FLOOR).
STD_FLOOR = 1e-8
# Seed of every subsampling and of the baseline's split.
SPLIT_SEED = 0


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over (N, H, W), float64, computed in chunks."""
    total, total_sq, count = 0.0, 0.0, 0
    for i in range(0, len(x), CHUNK_ROWS):
        chunk = np.asarray(x[i:i + CHUNK_ROWS], dtype=np.float64)
        total = total + chunk.sum(axis=(0, 2, 3))
        total_sq = total_sq + (chunk**2).sum(axis=(0, 2, 3))
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    mean = total / count
    return mean, np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))


class FeatureSpace:
    """The fixed map phi: (N, C, H, W) latents -> (N, F) float64 features (see the module docstring)."""

    def __init__(self, reference: np.ndarray, num_projections: int = NUM_PROJECTIONS, pool_grid: int = POOL_GRID):
        self.shape = tuple(reference.shape[1:])
        c, h, w = self.shape
        self.mean, std = channel_stats(reference)
        self.std = np.maximum(std, STD_FLOOR)  # reported, and the unit of the channel errors
        self.scale = np.where(std > STD_FLOOR, std, 1.0)  # what z divides by (see STD_FLOOR)
        d = c * h * w
        rng = np.random.Generator(np.random.PCG64(PROJECTION_SEED))
        projection = rng.standard_normal((d, num_projections)) / math.sqrt(d)
        self.projection, self.num_projections = torch.from_numpy(projection.astype(np.float32)), num_projections
        self.grid = (min(pool_grid, h), min(pool_grid, w))
        self.dim = num_projections + c * (self.grid[0] * self.grid[1] + 2)

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        if tuple(latents.shape[1:]) != self.shape:
            raise UserInputError(f"latents of shape {tuple(latents.shape[1:])} do not match the reference's "
                                 f"{self.shape}")
        mean, std = (torch.from_numpy(v).view(1, -1, 1, 1) for v in (self.mean, self.scale))
        out = []
        for i in range(0, len(latents), CHUNK_ROWS):
            z = (torch.from_numpy(np.asarray(latents[i:i + CHUNK_ROWS], dtype=np.float64)) - mean) / std
            proj = (z.float().flatten(1) @ self.projection).double()
            pooled = F.adaptive_avg_pool2d(z, self.grid).flatten(1)
            out.append(torch.cat([proj, pooled, z.mean((2, 3)), z.std((2, 3), correction=0)], dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, rows are samples) of (N, F) features, float64."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise UserInputError(f"need at least 2 latents for a covariance, got {len(f)}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped to 0)."""
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), the squared 2-Wasserstein distance of two Gaussians."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(v, dtype=np.float64) for v in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * cross), 0.0)


def fd_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fit to two (N, F) feature sets."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d, 0.0)


def knn_radii(x: np.ndarray, k: int = K_NEIGHBOURS) -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point of `x`."""
    if len(x) <= k:
        raise UserInputError(f"need more than k={k} points for k-NN radii, got {len(x)}")
    return np.concatenate([np.partition(_sq_dists(x[i:i + CHUNK_ROWS], x), k, axis=1)[:, k]
                           for i in range(0, len(x), CHUNK_ROWS)])


def _covered(queries: np.ndarray, points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Whether each query lies in at least one ball (point, radius)."""
    return np.concatenate([(_sq_dists(queries[i:i + CHUNK_ROWS], points) <= radii[None, :]).any(axis=1)
                           for i in range(0, len(queries), CHUNK_ROWS)])


def _subsample(n: int, limit: int, seed: int = SPLIT_SEED) -> np.ndarray:
    return np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K_NEIGHBOURS, max_samples: int = MAX_PR_SAMPLES,
                     real_radii: np.ndarray | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of (N, F) features.

    precision: the share of fake points inside the real manifold (the union of balls around each real
    point reaching its k-th nearest real neighbour); recall: the share of real points inside the fake
    manifold. Each side is subsampled (seeded) to `max_samples` points; `real_radii` (squared k-NN
    radii of the subsampled `real`, from `knn_radii`) skips recomputing them.
    """
    real = np.asarray(real, dtype=np.float64)[_subsample(len(real), max_samples)]
    fake = np.asarray(fake, dtype=np.float64)[_subsample(len(fake), max_samples)]
    precision = _covered(fake, real, knn_radii(real, k) if real_radii is None else real_radii).mean()
    recall = _covered(real, fake, knn_radii(fake, k)).mean()
    return float(precision), float(recall)
