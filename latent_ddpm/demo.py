"""The built-in demo latent set and a judge for samples of it.

`make_demo_latents` draws procedural "latents" of 4 classes (a blob, vertical stripes, a square and
a ring, each with its own fixed channel pattern) with random positions, sizes, amplitudes and phases
plus a little noise, then puts each channel in its own non-unit scale and offset as real VAE latents.
`demo_quality` judges generated samples with a closed-form classifier fit on fresh demo data (see
docs/data.md for what it measures).
"""

from __future__ import annotations

import functools

import datasets
import numpy as np

from .data import dataset_from_arrays

#: Number of demo classes: 0 blob, 1 vertical stripes, 2 square, 3 ring.
NUM_CLASSES = 4
#: Per-channel offset and scale of the first 4 channels (VAE-like: not unit-normal, different per channel).
CHANNEL_OFFSET, CHANNEL_SCALE = (0.5, -1.0, 0.2, -0.4), (4.0, 12.0, 6.0, 8.0)
#: Standard deviation of the per-pixel noise, in unit (pre-scale) terms.
NOISE_STD = 0.1
#: Seed of the fixed class channel patterns and the extra channels' offsets/scales (not the data seed).
STRUCTURE_SEED = 1234
#: Fresh demo samples per class used to fit the judge, and the in-distribution quantile that counts as valid.
JUDGE_FIT_PER_CLASS, VALID_QUANTILE = 512, 0.995


@functools.cache
def _structure(channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed (class patterns (K, C), offsets (C,), scales (C,)) for a channel count."""
    rng = np.random.default_rng(STRUCTURE_SEED)
    patterns = rng.choice([-1.0, -0.5, 0.5, 1.0], size=(NUM_CLASSES, channels))
    patterns[:, 0] = 1.0  # every class shows in channel 0, with different patterns elsewhere
    extra = max(0, channels - len(CHANNEL_OFFSET))
    offset = np.concatenate([CHANNEL_OFFSET, rng.uniform(-1.0, 0.5, extra)])[:channels]
    scale = np.concatenate([CHANNEL_SCALE, rng.uniform(4.0, 12.0, extra)])[:channels]
    return patterns, offset, scale


def _blob(xx, yy, cx, cy, r, phase, freq, size):
    return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))


def _stripes(xx, yy, cx, cy, r, phase, freq, size):
    return np.cos(2 * np.pi * freq * xx + phase) + 0 * yy


def _square(xx, yy, cx, cy, r, phase, freq, size):
    return 1 / (1 + np.exp(-(r - np.maximum(abs(xx - cx), abs(yy - cy))) * size * 3))


def _ring(xx, yy, cx, cy, r, phase, freq, size):
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    return np.exp(-((dist - 1.6 * r) ** 2) / (2 * 0.05**2))


def make_demo_latents(num_samples: int = 2048, seed: int = 0, size: int = 16, channels: int = 4
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic demo latents X (N, C, size, size) float32 and balanced labels y (N,) int64 in 0..3."""
    rng = np.random.default_rng(seed)
    n = num_samples
    y = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)
    coords = (np.arange(size) + 0.5) / size
    xx, yy = coords[None, None, :], coords[None, :, None]
    cx, cy = rng.uniform(0.3, 0.7, (2, n, 1, 1))
    radius = rng.uniform(0.12, 0.2, (n, 1, 1))
    amp = rng.uniform(0.8, 1.2, (n, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    freq = rng.uniform(2.5, 3.5, (n, 1, 1))
    shapes = np.empty((n, size, size), dtype=np.float32)
    for k, draw in enumerate((_blob, _stripes, _square, _ring)):
        m = y == k
        shapes[m] = draw(xx, yy, cx[m], cy[m], radius[m], phase[m], freq[m], size)
    shapes *= amp
    patterns, offset, scale = _structure(channels)
    noise = rng.standard_normal((n, channels, size, size), dtype=np.float32)
    z = patterns[y][:, :, None, None].astype(np.float32) * shapes[:, None] + NOISE_STD * noise
    x = offset[None, :, None, None].astype(np.float32) + scale[None, :, None, None].astype(np.float32) * z
    return x, y


def demo_dataset(num_samples: int = 2048, seed: int = 0, size: int = 16, channels: int = 4) -> datasets.Dataset:
    """The demo set as a `datasets.Dataset` (columns `latents`, `labels`), built like every loaded source."""
    x, y = make_demo_latents(num_samples, seed=seed, size=size, channels=channels)
    return dataset_from_arrays(x, y, source=f"demo(seed={seed})")


def _features(x: np.ndarray) -> np.ndarray:
    """Shift-invariant features of demo-scale samples (N, C, H, W) -> (N, F)."""
    n, c, h, w = x.shape
    _, offset, scale = _structure(c)
    z = (x.astype(np.float64) - offset[None, :, None, None]) / scale[None, :, None, None]
    mean = z.mean(axis=(2, 3))
    zc = z - mean[:, :, None, None]
    std = np.sqrt((zc**2).mean(axis=(2, 3))) + 1e-8
    corr = np.einsum("nchw,ndhw->ncd", zc, zc) / (h * w) / (std[:, :, None] * std[:, None, :])
    iu = np.triu_indices(c, 1)
    power = (np.abs(np.fft.fft2(zc)) ** 2).sum(axis=1)  # (N, H, W), summed over channels
    power = power / power.sum(axis=(1, 2), keepdims=True)
    ky, kx = np.meshgrid(np.fft.fftfreq(h) * h, np.fft.fftfreq(w) * w, indexing="ij")
    rad = np.minimum(np.sqrt(kx**2 + ky**2).round().astype(int), 7)
    radial = np.stack([power[:, rad == r].sum(axis=1) for r in range(8)], axis=1)
    axis_x, axis_y = power[:, ky == 0].sum(axis=1), power[:, kx == 0].sum(axis=1)
    energy = (zc**2).sum(axis=1).reshape(n, -1)
    peak = energy.max(axis=1) / energy.mean(axis=1)
    feats = [mean, np.log(std), corr[:, iu[0], iu[1]], np.log(radial + 1e-6),
             np.log(axis_x + 1e-6)[:, None], np.log(axis_y + 1e-6)[:, None], np.log(peak)[:, None]]
    return np.concatenate(feats, axis=1)


@functools.lru_cache(maxsize=8)
def _judge(size: int, channels: int):
    """Class-conditional Gaussians over `_features`, fit on fresh demo data, and per-class valid thresholds."""
    fit_x, fit_y = make_demo_latents(JUDGE_FIT_PER_CLASS * NUM_CLASSES, seed=10_001, size=size, channels=channels)
    cal_x, cal_y = make_demo_latents(JUDGE_FIT_PER_CLASS * NUM_CLASSES, seed=10_002, size=size, channels=channels)
    f = _features(fit_x)
    means, precisions, logdets = [], [], []
    for k in range(NUM_CLASSES):
        fk = f[fit_y == k]
        cov = np.cov(fk, rowvar=False)
        cov += 1e-4 * np.trace(cov) / len(cov) * np.eye(len(cov))
        means.append(fk.mean(axis=0))
        precisions.append(np.linalg.inv(cov))
        logdets.append(np.linalg.slogdet(cov)[1])
    model = (np.stack(means), np.stack(precisions), np.array(logdets))
    d2 = _mahalanobis(model, _features(cal_x))
    thresholds = np.array([np.quantile(d2[cal_y == k, k], VALID_QUANTILE) for k in range(NUM_CLASSES)])
    return model, thresholds


def _mahalanobis(model, f: np.ndarray) -> np.ndarray:
    means, precisions, _ = model
    diff = f[:, None, :] - means[None]
    return np.einsum("nkf,kfg,nkg->nk", diff, precisions, diff)


def demo_quality(samples: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Judge samples (N, C, H, W) in the demo set's own scale; returns a dict of scores in [0, 1].

    - `mean_confidence`: mean posterior of the assigned class (clearly one class: near 1).
    - `valid_fraction`: share of samples whose features lie within the assigned class's 99.5% region of
      real demo data (on the data manifold).
    - `class_fractions`: share of valid samples per class; `coverage`: share of classes that get at
      least half of their fair share 1/K of all samples (mode collapse lowers it).
    - `label_accuracy` (with `labels`): share of samples assigned to the class they were asked for.
    - `score`: mean of valid * confidence; real demo data scores about 0.99, matched noise about 0.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"samples must be (N, C, H, W), got shape {x.shape}")
    model, thresholds = _judge(x.shape[2], x.shape[1])
    d2 = _mahalanobis(model, _features(x))
    loglik = -0.5 * (d2 + model[2][None])
    post = np.exp(loglik - loglik.max(axis=1, keepdims=True))
    post /= post.sum(axis=1, keepdims=True)
    assigned = post.argmax(axis=1)
    conf = post.max(axis=1)
    valid = d2[np.arange(len(x)), assigned] <= thresholds[assigned]
    fractions = np.array([(valid & (assigned == k)).mean() for k in range(NUM_CLASSES)])
    out = {
        "num_samples": len(x),
        "mean_confidence": float(conf.mean()),
        "valid_fraction": float(valid.mean()),
        "class_fractions": fractions.tolist(),
        "coverage": float((fractions >= 0.5 / NUM_CLASSES).mean()),
        "score": float((valid * conf).mean()),
    }
    if labels is not None:
        out["label_accuracy"] = float((assigned == np.asarray(labels)).mean())
    return out
