"""Training and sampling figures: a loss curve and a grid of latents, written as PNG files (no display).

`save_latent_grid` shows a latent (C, H, W) as an image:
- C >= 3: channels 0, 1, 2 as R, G, B;
- C < 3: channel 0 as grayscale.
Each shown channel is normalised over the whole batch with robust bounds (its 1st and 99th
percentiles map to 0 and 1, values outside are clipped), so one outlier does not wash out the grid
and the same value gets the same colour in every cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window; must precede the pyplot import
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Smoothing factor of the exponential moving average drawn over per-step losses (TensorBoard-like).
EMA_ALPHA = 0.98
# Use a log y-axis when the positive losses span more than this ratio (max / min).
LOG_SCALE_RATIO = 20.0
# Percentiles that map to black and white in `save_latent_grid` (robust to outliers).
ROBUST_PERCENTILES = (1.0, 99.0)
# Size of one grid cell in inches, and the figure's resolution.
CELL_INCHES, DPI = 1.2, 100
# Most cells a grid shows; larger batches are truncated to the first ones.
MAX_CELLS = 256


def ema(values: Sequence[float] | np.ndarray, alpha: float = EMA_ALPHA) -> np.ndarray:
    """Bias-corrected exponential moving average (like Adam's): early values are not pulled to 0."""
    values = np.asarray(values, dtype=np.float64)
    out, acc = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        acc = alpha * acc + (1 - alpha) * v
        out[i] = acc / (1 - alpha ** (i + 1))
    return out


def save_loss_curve(
    path: str | Path,
    steps: Sequence[int] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    epoch_ends: Sequence[int] | np.ndarray | None = None,
    epoch_means: Sequence[float] | np.ndarray | None = None,
) -> Path:
    """Plot per-step losses (light), their EMA, and per-epoch means (markers at each epoch's last step).

    `epoch_ends` are the global steps where epochs ended and `epoch_means` the mean loss of each epoch;
    either may be None. The y-axis is logarithmic when the losses are positive and span more than
    `LOG_SCALE_RATIO`. Returns the written path.
    """
    path = Path(path)
    steps, losses = np.asarray(steps, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if steps.shape != losses.shape:
        raise ValueError(f"steps and losses differ in length: {steps.shape} vs {losses.shape}")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=DPI)
    try:
        finite = np.isfinite(losses)
        if finite.any():
            ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="loss per step")
            ax.plot(steps[finite], ema(losses[finite]), color="tab:blue", lw=1.6, label=f"EMA ({EMA_ALPHA})")
        if epoch_means is not None and len(epoch_means):
            means = np.asarray(epoch_means, dtype=np.float64)
            ends = np.asarray(epoch_ends, dtype=np.float64) if epoch_ends is not None else np.arange(1, len(means) + 1)
            n = min(len(ends), len(means))
            ax.plot(ends[:n], means[:n], "o-", color="tab:orange", ms=4, lw=1, label="epoch mean")
            finite_all = np.concatenate([losses[finite], means[np.isfinite(means)]])
        else:
            finite_all = losses[finite]
        positive = finite_all[finite_all > 0]
        if len(positive) and len(positive) == len(finite_all) and positive.max() / positive.min() > LOG_SCALE_RATIO:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def latents_to_images(latents: np.ndarray) -> np.ndarray:
    """(N, C, H, W) latents -> (N, H, W, 3) floats in [0, 1] (see the module docstring for the mapping)."""
    x = np.asarray(latents, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"latents must be (N, C, H, W), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("need at least one latent")
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = np.percentile(x, ROBUST_PERCENTILES, axis=(0, 2, 3), keepdims=True)
    x = np.clip((x - lo) / np.maximum(hi - lo, 1e-8), 0.0, 1.0)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return x.transpose(0, 2, 3, 1)


def save_latent_grid(
    path: str | Path,
    latents,
    labels: Sequence[int] | np.ndarray | None = None,
    nrow: int | None = None,
    title: str | None = None,
) -> Path:
    """Save a grid of latents (N, C, H, W) (numpy or torch) as a PNG; `labels` become small captions.

    `nrow` is the number of cells per row (default: about sqrt(N)). At most `MAX_CELLS` are shown.
    Returns the written path.
    """
    if hasattr(latents, "detach"):  # a torch tensor, without importing torch here
        latents = latents.detach().float().cpu().numpy()
    images = latents_to_images(latents)[:MAX_CELLS]
    n = len(images)
    labels = None if labels is None else np.asarray(labels).reshape(-1)[:n]
    ncol = max(1, min(n, nrow or math.ceil(math.sqrt(n))))
    nrows = math.ceil(n / ncol)
    top = 0.4 if title else 0.0
    # constrained layout keeps the title and the captions clear of the cells (tight_layout ignored the title: a
    # 16-row grid's first row overlapped it)
    fig, axes = plt.subplots(nrows, ncol, figsize=(ncol * CELL_INCHES, nrows * CELL_INCHES + top), dpi=DPI,
                             squeeze=False, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.0, hspace=0.0)
    try:
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < n:
                ax.imshow(images[i], interpolation="nearest")
                if labels is not None:
                    ax.set_title(str(labels[i]), fontsize=7, pad=2)
        if title:
            fig.suptitle(title, fontsize=9)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
