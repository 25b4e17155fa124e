"""Validation primitives shared by the numpy (`npyio`) and Arrow (`data`) readers: the schema, the error
type, shape/dtype/label checks, streaming NaN/Inf counting and the chunk size. docs/data.md, "Errors".
"""

from __future__ import annotations

import math

import datasets
import numpy as np

from .errors import UserInputError

#: The usual names of the latents and labels, looked for in every source when the key is one of them (`pick_column`).
LATENT_COLUMNS, LABEL_COLUMNS = ("latents", "X"), ("labels", "label", "y")  # "label": the hub's usual name


def column_candidates(wanted: str, usual: tuple[str, ...]) -> tuple[str, ...]:
    """The names looked for, in order: `wanted`, then the other `usual` names (`LATENT_COLUMNS` or
    `LABEL_COLUMNS`) when `wanted` is one of them (a default); a name the user chose alone, so that a typo is
    caught, not replaced by another column."""
    return (wanted, *(k for k in usual if k != wanted)) if wanted in usual else (wanted,)


def others_looked_for(wanted: str, usual: tuple[str, ...]) -> str:
    """For a message naming a missing `wanted`: " (nor 'latents')", the other names `pick_column` looked for ("" when
    it looked for `wanted` alone)."""
    others = column_candidates(wanted, usual)[1:]
    return f" (nor {' or '.join(repr(k) for k in others)})" if others else ""


def pick_column(names: list[str], wanted: str, usual: tuple[str, ...]) -> str | None:
    """The first of `column_candidates(wanted, usual)` that a source holds (None if none does): every format
    follows this one rule."""
    return next((k for k in column_candidates(wanted, usual) if k in names), None)


#: Bytes of latents read per step when streaming (conversion, checks, statistics): bounds memory.
CHUNK_BYTES = 32 * 2**20
#: The largest accepted class id. A class-conditional model has one embedding row per id up to the largest, so
#: ids far beyond any real class count (hashes, timestamps, uint64 values that do not fit int64) would ask for
#: an absurd table; 2**20 - 1 (about a million classes) leaves every real labelling room.
MAX_CLASS_ID = 2**20 - 1
#: The largest single latent accepted (C x H x W x itemsize): far above any autoencoder's latent, far below what
#: a crafted .npy header can claim (one read of it would overflow).
MAX_SAMPLE_BYTES = 2**30


class DataError(UserInputError):
    """A data source is missing, unreadable or invalid; the message names the file, the problem and the fix."""


class LabelsError(DataError):
    """Labels that are not class ids (not integers, not one per sample, negative, too large): a command that read
    them only because the file has them (`data convert`'s default y, or its fallbacks) adds how to leave them out."""


def latent_features(shape: tuple[int, int, int], labels: bool) -> datasets.Features:
    """The project's Arrow schema: `latents` Array3D float32 (C, H, W), optional `labels` int64."""
    feats = {"latents": datasets.Array3D(shape=tuple(int(s) for s in shape), dtype="float32")}
    if labels:
        feats["labels"] = datasets.Value("int64")
    return datasets.Features(feats)


def check_latent_meta(where: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Raise `DataError` unless latents of this shape and dtype are a non-empty 4-D (N, C, H, W) float array.

    Needs only the metadata (shape, dtype), so it runs before any data is read; objects are refused
    outright (never unpickled).
    """
    if dtype.hasobject:
        raise DataError(f"{where}: holds Python objects (dtype object), which are never unpickled; "
                        "save a numeric array, e.g. np.stack(list_of_arrays).astype(np.float32)")
    if len(shape) != 4:
        hint = {2: " (one flat vector per sample: reshape to (N, C, H, W), e.g. X.reshape(len(X), C, H, W), and save "
                   "it again)", 3: " (add a channel axis: X[:, None])",
                5: " (one axis too many: drop or merge it, e.g. X.squeeze(1) or X.reshape(-1, C, H, W))"}
        hint = hint.get(len(shape), "")
        raise DataError(f"{where}: latents must be 4-D (N, C, H, W), got shape {tuple(shape)}{hint}")
    if dtype.kind != "f":
        raise DataError(f"{where}: latents must be floating point, got dtype {dtype}; "
                        "convert them with X.astype(np.float32)")
    if shape[0] == 0:
        raise DataError(f"{where}: the dataset is empty (0 samples); check that the right array was saved")
    if min(shape) < 1:
        raise DataError(f"{where}: every dimension of (N, C, H, W) must be at least 1, got shape {tuple(shape)}; "
                        "check that the right array was saved")
    if math.prod(shape[1:]) * dtype.itemsize > MAX_SAMPLE_BYTES:  # a crafted header: no latent is this large
        raise DataError(f"{where}: one sample of shape {tuple(shape[1:])} would take more than "
                        f"{MAX_SAMPLE_BYTES // 2**30} GiB; the header is damaged or the wrong array was saved")


def check_labels_meta(where: str, shape: tuple[int, ...], dtype: np.dtype, n: int) -> None:
    """The checks of `check_labels` that need only the shape and dtype (a .npy header): run before reading. The
    shape of numbers first: one-hot rows are often float (keras' to_categorical), and np.unique is no fix for them."""
    if tuple(shape) != (n,) and not dtype.hasobject and dtype.kind in "biuf":
        hint = ("" if len(shape) != 2 or shape[0] != n else "; save them as y.reshape(-1)" if shape[1] == 1 else
                "; one-hot or score rows? save the class ids, y.argmax(1)")
        raise LabelsError(f"{where}: labels must have shape ({n},) to match {n} latents, got {tuple(shape)}{hint}")
    if dtype.hasobject or dtype.kind not in "iu":
        raise LabelsError(f"{where}: labels must be integers (class ids 0..K-1), got dtype {dtype}; "
                        "map class names to ids, e.g. np.unique(y, return_inverse=True)[1]")


def check_labels(where: str, y: np.ndarray, n: int) -> np.ndarray:
    """Labels must be a 1-D non-negative integer array of length n; returns them as int64."""
    check_labels_meta(where, y.shape, y.dtype, n)
    if n and y.min() < 0:
        raise LabelsError(f"{where}: labels must be >= 0, found {int(y.min())} at index {int(np.argmin(y))}; "
                        "use class ids 0..K-1")
    if n:
        check_label_max(where, int(y.max()), int(np.argmax(y)))
    return y.astype(np.int64, copy=False)


def check_label_max(where: str, largest: int, index: int) -> None:
    """Raise `DataError` if the largest class id is above MAX_CLASS_ID (the model would need that many + 1
    class embeddings)."""
    if largest > MAX_CLASS_ID:
        raise LabelsError(f"{where}: label {largest} at index {index} is not a class id (the largest allowed is "
                        f"{MAX_CLASS_ID}; the model needs one embedding per id up to it); map the labels to ids "
                        "0..K-1, e.g. np.unique(y, return_inverse=True)[1]")


def check_float32_range(where: str, chunk: np.ndarray, offset: int) -> None:
    """Raise `DataError` if a finite value of a wider float `chunk` (samples from `offset`) overflows float32."""
    with np.errstate(invalid="ignore"):
        big = np.isfinite(chunk) & (np.abs(chunk) > np.finfo(np.float32).max)
    if big.any():
        i, *_ = (int(v) for v in np.argwhere(big)[0])
        raise DataError(f"{where}: {int(big.sum())} values are beyond float32's range (about 3.4e38), the first in "
                        f"sample {i + offset}; latents are stored as float32, so rescale or fix them")


class NaNCounter:
    """Counts non-finite values over streamed chunks and remembers where the first one is.

    Call `update(chunk, offset)` for each chunk (offset: index of its first sample), then `check()`,
    which raises `DataError` with the count and the position of the first NaN/Inf.
    """

    def __init__(self, where: str):
        self.where, self.count, self.first = where, 0, None

    def update(self, chunk: np.ndarray, offset: int) -> None:
        bad = ~np.isfinite(chunk)
        if bad.any():
            self.count += int(bad.sum())
            i, *pos = (int(v) for v in np.argwhere(bad)[0])
            self.first = self.first or (i + offset, *pos)

    def check(self) -> None:
        if self.count:
            i, c, h, w = self.first
            raise DataError(f"{self.where}: {self.count} NaN/Inf values in the latents, the first in sample {i} "
                            f"at (channel {c}, row {h}, col {w}); remove or fix those samples before training")


def chunk_rows(shape: tuple[int, ...]) -> int:
    """Samples per streamed chunk for latents of `shape` (N, C, H, W): about CHUNK_BYTES of float32, at least 1."""
    return max(1, CHUNK_BYTES // (4 * math.prod(shape[1:])))
