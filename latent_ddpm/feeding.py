"""Training data: loading and checking it, normalisation statistics, and the training loop's batch feeder.

`load_training_data` loads `--train_data` (or the demo set) and checks it against the flags that describe it.
`compute_stats` makes one streaming pass over a latent dataset (float64, Chan's parallel merge) and
returns `LatentStats`, which normalises batches and is saved with the run. `LatentFeeder` yields raw
(latents, labels) batches in an order fixed by (seed, epoch), sharded over ranks, resumable mid-epoch,
either from a copy of the whole set on the device or through a DataLoader over the Arrow dataset.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader

from .data import DataError, iter_chunks, load_latents, source_names
from .demo import demo_dataset
from .errors import UserInputError
from .validation import LABEL_COLUMNS, column_candidates

#: Default budget for keeping the whole dataset on the device (bytes of latents + labels).
DEFAULT_MEMORY_BUDGET = 2 * 2**30
#: Modes of `compute_stats`: per-channel mean/std, one mean/std for all channels, or identity.
STATS_MODES = ("channel", "global", "none")
#: Ids no label uses below the largest, above which a warning suggests mapping them to 0..K-1: the UNet embeds
#: every id up to the largest (time_emb_dim parameters each; 1,000,000 ids make a tiny UNet 250x larger).
UNUSED_IDS_WARNING = 10_000
#: Square latents whose last axis is this many times smaller than the other two look channels-last (NHWC): a
#: 4-channel 32x32 latent saved (N, 32, 32, 4) reads as 32 channels of 32x4 (real NCHW latents have C != H or
#: a wide last axis: 4x32x32, 16x16x16, 32x8x8).
CHANNELS_LAST_RATIO = 4


@dataclass
class TrainingData:
    """The training set as loaded: the dataset, the name a run folder takes from it, and its class count."""

    dataset: datasets.Dataset
    name: str  # the data file's stem ("demo" for the built-in set): the default run folder's prefix
    source: str  # what error messages call it: the path or hub id, or "demo"
    class_ids: list[int] | None  # a class-conditional model's distinct labels, sorted (need not be 0..K-1), else None

    @property
    def num_classes(self) -> int | None:
        """The class embeddings the UNet needs: the largest id + 1 (None: unconditional)."""
        return self.class_ids[-1] + 1 if self.class_ids else None


def load_training_data(train_data: str | None, latent_key: str = "X", label_key: str = "y",
                       class_conditional: bool = False, n_dim: int | None = None, split: str = "train",
                       subset: str | None = None) -> TrainingData:
    """Load `split` (of `subset`) of `train_data` (the demo set when None) and check it against `--n_dim` and
    `--class_conditional`."""
    if subset is not None and train_data is None:
        raise UserInputError(f"--dataset_config_name {subset}: the demo set has no subsets; drop it, or pass "
                             "--train_data")
    if split != "train" and train_data is None:  # a file's lack of splits: `load_latents` says so
        raise UserInputError(f"--train_split {split}: the demo set has no splits; drop it, or pass --train_data")
    if train_data is None:
        dataset, name = demo_dataset(), "demo"
    else:
        # Labels are read only for a class-conditional model: the original's files carry a `y` it never used,
        # which need not be class ids.
        dataset = load_latents(train_data, latent_key=latent_key, label_key=label_key if class_conditional else None,
                               split=split, subset=subset)
        # A subset or split other than train is part of the name (of the default run folder): runs on two subsets of
        # one folder would share a folder, where --overwrite_output_dir would delete the other's run.
        # The stem stays as it was (existing runs' folders, sample.py --latent's lookup); only the added names are
        # made safe for a folder name.
        added = [re.sub(r"[^\w.-]", "_", part) for part in (subset, None if split == "train" else split) if part]
        name = "_".join(part for part in [Path(train_data.rstrip("/")).stem, *added] if part)
    source = train_data or "demo"
    channels, height, width = dataset.features["latents"].shape
    if channels == height and width * CHANNELS_LAST_RATIO <= channels:  # (N, H, W, C) of square latents
        warnings.warn(f"{source}: latents of {channels}x{height}x{width} look channels-last (N, H, W, C), as TF/JAX "
                      f"save them: this trains {channels} channels of {height}x{width}. If so, save "
                      "X.transpose(0, 3, 1, 2) (N, C, H, W) instead", stacklevel=2)
    if n_dim is not None and n_dim != channels:
        raise UserInputError(f"--n_dim {n_dim} does not match the data: {source} has {channels} channels; "
                             f"drop --n_dim or pass --n_dim {channels}")
    if class_conditional and "labels" not in dataset.column_names:
        names = source_names(train_data) if train_data is not None else None
        holds = f" (it holds {', '.join(map(repr, names))})" if names else ""
        fix = ("a .npy holds no labels: join them with python -m latent_ddpm.data convert IN.npy OUT --labels_file "
               "LABELS.npy" if str(train_data).endswith(".npy") else "name the labels with --label_key")
        *first, last = (f"'{k}'" for k in column_candidates(label_key, LABEL_COLUMNS))
        looked = f"{', '.join(first)} or {last}" if first else last
        raise UserInputError(f"--class_conditional needs labels, but {train_data} has no {looked} labels{holds}; "
                             f"{fix}, or drop --class_conditional")
    if not class_conditional:
        return TrainingData(dataset, name, source, None)
    # Ids are kept as given (sample.py takes the user's own ids): the UNet embeds 0..max, the pipeline records
    # which of them the data has, so that sampling and the run's evaluation stay on trained classes.
    class_ids = sorted(pc.unique(dataset.data.column("labels")).to_pylist())
    if class_ids and class_ids[-1] + 1 - len(class_ids) > UNUSED_IDS_WARNING:
        warnings.warn(f"{source}: {len(class_ids)} classes with ids up to {class_ids[-1]}; the UNet embeds every id "
                      f"from 0 ({class_ids[-1] + 1} embeddings, {class_ids[-1] + 1 - len(class_ids)} unused), which "
                      "costs parameters and memory: map the labels to 0..K-1, e.g. np.unique(y, return_inverse=True)[1]"
                      ", to save them", stacklevel=2)
    return TrainingData(dataset, name, source, class_ids)


@dataclass
class LatentStats:
    """Normalisation of latents: `normalize(x) = (x - mean) / std` per channel; JSON-able via `to_dict`.

    `mode` is "channel", "global", "scale" (from a scaling factor: mean 0, std 1/s) or "none"
    (`mean`/`std` None, identity). `mean`/`std` have one entry per channel (repeated for "global").
    """

    mode: str
    mean: list[float] | None = None
    std: list[float] | None = None

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return mean, std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Data scale -> model scale, for (C, H, W) or (B, C, H, W) tensors."""
        if self.mean is None:
            return x
        mean, std = self._params(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model scale -> data scale (the inverse of `normalize`)."""
        if self.mean is None:
            return x
        mean, std = self._params(x)
        return x * std + mean

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> dict:
        """The statistics to 4 significant digits: equal for the same data summed in another order (a resume
        compares them), different for other data."""
        rounded = lambda v: None if v is None else [float(f"{x:.4g}") for x in v]  # noqa: E731
        return {"mode": self.mode, "mean": rounded(self.mean), "std": rounded(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> LatentStats:
        return cls(mode=d["mode"], mean=d.get("mean"), std=d.get("std"))


def compute_stats(ds: datasets.Dataset, mode: str = "channel", scaling_factor: float | None = None,
                  source: str = "dataset") -> LatentStats:
    """Per-channel (or global) mean and std of `ds["latents"]` in one streaming float64 pass.

    `scaling_factor=s` skips the pass and gives mean 0, std 1/s (Stable Diffusion VAE convention).
    A constant channel (std 0) keeps std 1, with a warning; a set whose every value is the same is a `DataError`.
    """
    channels = ds.features["latents"].shape[0]
    if scaling_factor is not None:
        if not scaling_factor > 0:
            raise DataError(f"scaling_factor must be > 0, got {scaling_factor}")
        return LatentStats("scale", [0.0] * channels, [1.0 / scaling_factor] * channels)
    if mode not in STATS_MODES:
        raise DataError(f"unknown normalisation mode '{mode}'; use one of {STATS_MODES} or a scaling factor")
    if mode == "none":
        return LatentStats("none")
    n, mean, m2 = 0.0, np.zeros(channels), np.zeros(channels)
    for _, chunk, _ in iter_chunks(ds, rows=max(1, 2**22 // int(np.prod(ds.features["latents"].shape)))):
        x = chunk.astype(np.float64).transpose(1, 0, 2, 3).reshape(channels, -1)
        nb, mb = x.shape[1], x.mean(axis=1)
        m2b = ((x - mb[:, None]) ** 2).sum(axis=1)
        n, mean, m2 = _chan_merge(n, mean, m2, nb, mb, m2b)
    if mode == "global":  # merge the channels, which all have the same count
        gn, gmean, gm2 = n, mean[:1], m2[:1]
        for c in range(1, channels):
            gn, gmean, gm2 = _chan_merge(gn, gmean, gm2, n, mean[c:c + 1], m2[c:c + 1])
        n, mean, m2 = gn, np.repeat(gmean, channels), np.repeat(gm2, channels)
    std = np.sqrt(m2 / n)
    if (std == 0).all():
        what = (f"every value of the latents is the same ({mean[0]:g})" if (mean == mean[0]).all() else
                f"every channel of the latents is constant (values {', '.join(f'{m:g}' for m in mean)})")
        raise DataError(f"{source}: {what}; there is nothing to learn: check the data (the right file, the right "
                        "--latent_key)")
    if constant := np.flatnonzero(std == 0).tolist():  # e.g. a padding channel: kept, centred, not scaled
        warnings.warn(f"{source}: channel(s) {constant} of the latents are constant (std 0): they are centred but "
                      "not scaled (std 1), and the model learns them as constant", stacklevel=2)
        std[constant] = 1.0
    return LatentStats(mode, mean.tolist(), std.tolist())


def _chan_merge(na, ma, m2a, nb, mb, m2b):
    """Chan et al.'s parallel merge of (count, mean, sum of squared deviations)."""
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta**2 * (na * nb / n)


class _ArrowBatches(torch.utils.data.Dataset):
    """Map-style view of an Arrow latent dataset that fetches a whole batch of indices at once."""

    def __init__(self, ds: datasets.Dataset):
        self.ds = ds.with_format("numpy", columns=[c for c in ("latents", "labels") if c in ds.column_names])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, indices: list[int]):
        rows = self.ds[indices]
        labels = torch.from_numpy(rows["labels"]) if "labels" in rows else None
        return torch.from_numpy(np.ascontiguousarray(rows["latents"])), labels


def _keep_batch(batch):
    return batch


class LatentFeeder:
    """Yields (latents, labels) batches for one rank, in an order fixed by (seed, epoch).

    Each epoch draws one global permutation with `torch.Generator().manual_seed(seed + epoch)`; global
    batch k is `perm[k*B*W:(k+1)*B*W]` and rank r takes its r-th slice of B. The tail that does not fill
    a global batch is dropped, so every rank gets `len(feeder)` batches. With `random_flip`, each
    sample's horizontal flip is drawn from the same generator (fixed per seed, epoch and sample index).
    If the data fits `memory_budget_bytes` (or `in_memory=True`) it is copied to `device` once and
    batches are gathered by indexing; otherwise a DataLoader reads them from the Arrow dataset.
    Batches are raw (not normalised): float32 latents and int64 labels (or None) on `device`.
    """

    def __init__(self, ds: datasets.Dataset, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", random_flip: bool = False, in_memory: bool | None = None,
                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, num_workers: int = 0, pin_memory: bool = False):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.ds, self.batch_size, self.seed = ds, batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.random_flip, self.num_workers, self.pin_memory = random_flip, num_workers, pin_memory
        self.num_samples = len(ds)
        self.has_labels = "labels" in ds.column_names
        if len(self) == 0:
            raise DataError(f"the data's {self.num_samples} samples are fewer than one global batch ({batch_size} x "
                            f"{world_size} process{'es' * (world_size > 1)}); lower --train_batch_size"
                            + (", or use fewer processes" if world_size > 1 else ""))
        shape = ds.features["latents"].shape
        nbytes = self.num_samples * (4 * int(np.prod(shape)) + 8 * self.has_labels)
        self.in_memory = nbytes <= memory_budget_bytes if in_memory is None else in_memory
        self.latents = self.labels = None
        if self.in_memory:
            self.latents = torch.empty((self.num_samples, *shape), dtype=torch.float32)
            self.labels = torch.empty(self.num_samples, dtype=torch.int64) if self.has_labels else None
            for start, chunk, labels in iter_chunks(ds, with_labels=True):
                self.latents[start:start + len(chunk)] = torch.from_numpy(chunk)
                if self.has_labels:
                    self.labels[start:start + len(chunk)] = torch.from_numpy(labels)
            self.latents = self.latents.to(self.device)
            self.labels = self.labels.to(self.device) if self.has_labels else None

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This epoch's global permutation and, with random_flip, per-sample flip flags (by sample index)."""
        gen = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.num_samples, generator=gen)
        flips = torch.rand(self.num_samples, generator=gen) < 0.5 if self.random_flip else None
        return perm, flips

    def rank_indices(self, epoch: int, start_batch: int = 0) -> list[torch.Tensor]:
        """The sample indices of this rank's batches in `epoch`, from `start_batch` on."""
        perm, _ = self.epoch_order(epoch)
        gb = self.batch_size * self.world_size
        lo = self.rank * self.batch_size
        return [perm[k * gb + lo:k * gb + lo + self.batch_size] for k in range(start_batch, len(self))]

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield this rank's batches of `epoch`, starting at batch `start_batch` (for resuming)."""
        _, flips = self.epoch_order(epoch)
        batches = self.rank_indices(epoch, start_batch)
        if self.in_memory:
            source = ((self.latents[idx.to(self.device)],
                       self.labels[idx.to(self.device)] if self.has_labels else None) for idx in batches)
        else:
            # Its own generator: a DataLoader draws its workers' base seed when it starts, from torch's global
            # generator by default, which dropout draws from too (a resume mid-epoch would start one more).
            loader = DataLoader(_ArrowBatches(self.ds), batch_sampler=[idx.tolist() for idx in batches],
                                collate_fn=_keep_batch, num_workers=self.num_workers,
                                pin_memory=self.pin_memory and self.device.type == "cuda",
                                generator=torch.Generator().manual_seed(self.seed + epoch))
            source = ((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True) if y is not None
                       else None) for x, y in loader)
        for idx, (x, y) in zip(batches, source, strict=True):
            if flips is not None:
                f = flips[idx].to(x.device).view(-1, 1, 1, 1)
                x = torch.where(f, x.flip(-1), x)
            yield x, y
