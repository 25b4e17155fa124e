"""Latent datasets: load any source as one Arrow `datasets.Dataset` (column `latents`: Array3D (C, H, W)
float32; optional `labels`: int64), check it, and convert big `.npy`/`.npz` in bounded memory. docs/data.md.

    python -m latent_ddpm.data convert latents.npz latents_arrow/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter

from .errors import UserInputError, run_cli

#: Bytes of latents read per step when streaming (conversion, checks, statistics): bounds memory.
CHUNK_BYTES = 32 * 2**20
#: `.npy`/`.npz` files up to this size load straight into memory; bigger ones go to the Arrow cache.
IN_MEMORY_MAX_BYTES = 256 * 2**20
#: Where `load_latents` caches big `.npy`/`.npz` files as Arrow (override with $LATENT_DDPM_CACHE).
DEFAULT_CACHE_DIR = Path(os.environ.get("LATENT_DDPM_CACHE", Path.home() / ".cache" / "latent_ddpm"))
#: Bump when the cached Arrow layout changes, so that old cache files are not reused.
CACHE_VERSION = 1
#: Accepted column names for latents and labels in Arrow/Parquet/hub sources (besides the keys given).
LATENT_COLUMNS, LABEL_COLUMNS = ("latents", "X"), ("labels", "y")
#: File suffixes read as numpy, Parquet and Arrow.
NUMPY_SUFFIXES, PARQUET_SUFFIXES, ARROW_SUFFIXES = (".npz", ".npy"), (".parquet",), (".arrow",)


class DataError(UserInputError):
    """A data source is missing, unreadable or invalid; the message names the file, the problem and the fix."""


def latent_features(shape: tuple[int, int, int], labels: bool) -> datasets.Features:
    """The project's Arrow schema: `latents` Array3D float32 (C, H, W), optional `labels` int64."""
    feats = {"latents": datasets.Array3D(shape=tuple(int(s) for s in shape), dtype="float32")}
    if labels:
        feats["labels"] = datasets.Value("int64")
    return datasets.Features(feats)


# ----------------------------------------------------------------------------- numpy sources

def _read_npy_header(fp, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from a `.npy` header, without reading (or unpickling) the data."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fp)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(fp)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{where}: not a readable .npy array ({err}); re-save it with np.save/np.savez") from err
    raise DataError(f"{where}: unsupported .npy format version {version}; re-save it with np.save/np.savez")


def _check_latent_meta(where: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise DataError(f"{where}: holds Python objects (dtype object), which are never unpickled; "
                        "save a numeric array, e.g. np.stack(list_of_arrays).astype(np.float32)")
    if len(shape) != 4:
        hint = " (add a channel axis: X[:, None])" if len(shape) == 3 else ""
        raise DataError(f"{where}: latents must be 4-D (N, C, H, W), got shape {tuple(shape)}{hint}")
    if dtype.kind != "f":
        raise DataError(f"{where}: latents must be floating point, got dtype {dtype}; "
                        "convert them with X.astype(np.float32)")
    if shape[0] == 0:
        raise DataError(f"{where}: the dataset is empty (0 samples); check that the right array was saved")


def _check_labels(where: str, y: np.ndarray, n: int) -> np.ndarray:
    """Labels must be a 1-D non-negative integer array of length n; returns them as int64."""
    if y.dtype.hasobject or y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers (class ids 0..K-1), got dtype {y.dtype}; "
                        "map class names to ids, e.g. np.unique(y, return_inverse=True)[1]")
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{where}: labels must have shape ({n},) to match {n} latents, got {tuple(y.shape)}")
    if n and y.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, found {int(y.min())} at index {int(np.argmin(y))}; "
                        "use class ids 0..K-1")
    return y.astype(np.int64, copy=False)


class _NaNCounter:
    """Counts non-finite values over streamed chunks and remembers where the first one is."""

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


def _chunk_rows(shape: tuple[int, ...]) -> int:
    return max(1, CHUNK_BYTES // (4 * math.prod(shape[1:])))


def _numpy_chunks(path: Path, member: str | None, where: str) -> tuple[tuple[int, ...], Iterator[np.ndarray]]:
    """Shape and a chunk iterator of a `.npy` (memory-mapped) or a `.npz` member (read sequentially).

    Only the header is read here; chunks of about CHUNK_BYTES come later, so RAM use stays bounded.
    """
    with (open(path, "rb") if member is None else zipfile.ZipFile(path).open(member)) as fp:
        shape, fortran, dtype = _read_npy_header(fp, where)
    _check_latent_meta(where, shape, dtype)
    step, row_bytes = _chunk_rows(shape), dtype.itemsize * math.prod(shape[1:])
    if member is None or fortran:  # Fortran-order .npz members (rare) are read whole: rows are not contiguous
        try:
            arr = (np.load(path, mmap_mode="r", allow_pickle=False) if member is None
                   else np.load(path, allow_pickle=False)[member[:-4]])
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise DataError(f"{where}: cannot read the array ({err}); the file is probably truncated, "
                            "re-save it") from err
        return shape, (np.asarray(arr[i:i + step]) for i in range(0, shape[0], step))

    def chunks() -> Iterator[np.ndarray]:
        with zipfile.ZipFile(path) as zf, zf.open(member) as fp:
            _read_npy_header(fp, where)
            for i in range(0, shape[0], step):
                n = min(step, shape[0] - i)
                try:
                    buf = fp.read(n * row_bytes)
                except (zipfile.BadZipFile, OSError, EOFError) as err:
                    raise DataError(f"{where}: the archive is corrupt ({err}); re-save it with np.savez") from err
                if len(buf) != n * row_bytes:
                    raise DataError(f"{where}: truncated, the data ends in sample {i + len(buf) // row_bytes}; "
                                    "re-save the file")
                yield np.frombuffer(buf, dtype=dtype).reshape((n, *shape[1:]))

    return shape, chunks()


def _read_labels(where: str, read, n: int) -> np.ndarray:
    try:
        labels = read()
    except (ValueError, OSError, zipfile.BadZipFile) as err:  # object arrays raise here: never unpickled
        raise DataError(f"{where}: labels are not a numeric array ({err}); save int64 class ids") from err
    return _check_labels(where, labels, n)


def _open_numpy(path: Path, latent_key: str, label_key: str, labels_file: str | Path | None):
    """(shape, chunk iterator, labels or None) for a `.npy`/`.npz` file."""
    labels = None
    if path.suffix.lower() == ".npy":
        shape, chunks = _numpy_chunks(path, None, str(path))
    else:
        try:
            with zipfile.ZipFile(path) as zf:
                keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        except (zipfile.BadZipFile, OSError) as err:
            raise DataError(f"{path}: not a readable .npz archive ({err}); re-save it with np.savez") from err
        if latent_key not in keys:
            raise DataError(f"{path}: no array named '{latent_key}'; the file has {keys}; "
                            "pass the right one with --latent_key / latent_key=")
        shape, chunks = _numpy_chunks(path, latent_key + ".npy", f"{path}[{latent_key}]")
        if label_key in keys:
            read = lambda: np.load(path, allow_pickle=False)[label_key]
            labels = _read_labels(f"{path}[{label_key}]", read, shape[0])
    if labels_file is not None:
        if not Path(labels_file).is_file():
            raise DataError(f"{labels_file}: no such labels file; check the path")
        labels = _read_labels(str(labels_file), lambda: np.load(labels_file, allow_pickle=False), shape[0])
    return shape, chunks, labels


def _write(writer_kwargs: dict, shape: tuple[int, ...], chunks, labels: np.ndarray | None, where: str) -> None:
    """Write latent chunks (and labels) to an ArrowWriter, checking NaN/Inf as they stream by."""
    writer = ArrowWriter(features=latent_features(shape[1:], labels is not None), **writer_kwargs)
    nan, start = _NaNCounter(where), 0
    for chunk in chunks:
        chunk = chunk.astype(np.float32, copy=False)
        nan.update(chunk, start)
        batch = {"latents": chunk} if labels is None else {"latents": chunk, "labels": labels[start:start + len(chunk)]}
        writer.write_batch(batch)
        start += len(chunk)
    writer.finalize()
    nan.check()


def _write_numpy(path: Path, writer_kwargs: dict, latent_key: str, label_key: str, labels_file) -> None:
    shape, chunks, labels = _open_numpy(path, latent_key, label_key, labels_file)
    where = f"{path}[{latent_key}]" if path.suffix.lower() == ".npz" else str(path)
    _write(writer_kwargs, shape, chunks, labels, where)


def _in_memory(write) -> datasets.Dataset:
    """Run `write(writer_kwargs)` into an in-memory Arrow stream and wrap the result as a Dataset."""
    buf = pa.BufferOutputStream()
    write(dict(stream=buf))
    return datasets.Dataset(pa.ipc.open_stream(buf.getvalue()).read_all())


def dataset_from_arrays(latents: np.ndarray, labels: np.ndarray | None = None, source: str = "<arrays>"
                        ) -> datasets.Dataset:
    """An in-memory `Dataset` from arrays (N, C, H, W) and optional labels (N,), with the same checks."""
    latents = np.asarray(latents)
    _check_latent_meta(source, latents.shape, latents.dtype)
    labels = None if labels is None else _check_labels(source, np.asarray(labels), len(latents))
    step = _chunk_rows(latents.shape)
    chunks = (latents[i:i + step] for i in range(0, len(latents), step))
    return _in_memory(lambda kw: _write(kw, latents.shape, chunks, labels, source))


def _cached_numpy(path: Path, cache_dir: Path, latent_key: str, label_key: str, labels_file) -> datasets.Dataset:
    """Arrow copy of a big `.npy`/`.npz` under cache_dir, keyed by path, size, mtime and keys."""
    st = path.stat()
    key = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, latent_key, label_key,
                      str(labels_file), CACHE_VERSION])
    target = cache_dir / f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.arrow"
    if not target.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".arrow.tmp", dir=cache_dir)
        os.close(fd)
        try:
            _write_numpy(path, dict(path=tmp), latent_key, label_key, labels_file)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return datasets.Dataset.from_file(str(target))


# ----------------------------------------------------------------------------- Arrow sources

def _innermost_dtype(feature) -> str | None:
    while hasattr(feature, "feature"):
        feature = feature.feature
    return "int64" if isinstance(feature, datasets.ClassLabel) else getattr(feature, "dtype", None)


def _standardize(ds: datasets.Dataset, where: str, latent_key: str, label_key: str, verify: bool = True
                 ) -> datasets.Dataset:
    """Rename the latent/label columns to `latents`/`labels`, cast to the project schema and check it."""
    names = ds.column_names
    lat = next((c for c in (latent_key, *LATENT_COLUMNS) if c in names), None)
    if lat is None:
        raise DataError(f"{where}: no latents column (looked for '{latent_key}', 'latents', 'X'); the columns are "
                        f"{names}; pass the right one with --latent_key / latent_key=")
    lab = next((c for c in (label_key, *LABEL_COLUMNS) if c in names), None)
    ds = ds.select_columns([c for c in (lat, lab) if c is not None])
    ds = ds.rename_columns({k: v for k, v in ((lat, "latents"), (lab, "labels")) if k is not None and k != v})
    if len(ds) == 0:
        raise DataError(f"{where}: the dataset is empty (0 samples); check the split and the files")
    feat = ds.features["latents"]
    dtype = np.dtype(getattr(feat, "dtype", None) or _innermost_dtype(feat) or "O")
    first = np.asarray(ds.with_format("numpy")[0]["latents"])
    _check_latent_meta(where, (len(ds), *first.shape), dtype)
    if lab is not None:
        ldtype = _innermost_dtype(ds.features["labels"])
        if ldtype is None or np.dtype(ldtype).kind not in "iu":
            raise DataError(f"{where}: labels column '{lab}' must be integer class ids, got {ds.features['labels']}")
    want = latent_features(first.shape, lab is not None)
    if ds.features != want:
        try:
            ds = ds.cast(want)
        except (ValueError, TypeError, pa.ArrowInvalid) as err:
            raise DataError(f"{where}: latents cannot be read as one (C, H, W) float32 array per sample ({err}); "
                            "all samples must have the same shape") from err
    nan = _NaNCounter(where)
    for start, chunk, labels in iter_chunks(ds, with_labels=True) if verify else ():
        nan.update(chunk, start)
        if labels is not None and len(labels) and labels.min() < 0:
            i = start + int(np.argmin(labels))
            raise DataError(f"{where}: labels must be >= 0, found {int(labels.min())} at index {i}; use ids 0..K-1")
    nan.check()
    return ds


def iter_chunks(ds: datasets.Dataset, rows: int | None = None, with_labels: bool = False
                ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Yield (start index, latents (n, C, H, W) float32, labels or None) over `ds` in bounded chunks."""
    rows = rows or _chunk_rows((0, *ds.features["latents"].shape))
    cols = ["latents", "labels"] if with_labels and "labels" in ds.column_names else ["latents"]
    view = ds.with_format("numpy", columns=cols)
    for start in range(0, len(ds), rows):
        batch = view[start:start + rows]
        yield start, batch["latents"], batch.get("labels")


def load_latents(source: str | os.PathLike, *, latent_key: str = "X", label_key: str = "y", split: str = "train",
                 labels_file: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 in_memory_max_bytes: int = IN_MEMORY_MAX_BYTES, verify: bool = True, **hub_kwargs
                 ) -> datasets.Dataset:
    """Load latents from `.npz`, `.npy`, a `save_to_disk` folder, Parquet/Arrow files or a hub dataset id.

    Returns an Arrow `Dataset` with `latents` (C, H, W) float32 and, if present, `labels` int64, after
    checking it (shape, dtype, NaN/Inf, labels). `.npy`/`.npz` files bigger than `in_memory_max_bytes`
    are converted once, in bounded memory, to an Arrow file under `cache_dir` (default
    ~/.cache/latent_ddpm or $LATENT_DDPM_CACHE) keyed by path, size and mtime, and memory-mapped.
    `labels_file` gives labels for a `.npy`. `verify=False` skips the full NaN/Inf and label scan of
    Arrow/Parquet/hub sources (shape and dtype are still checked). Hub ids (owner/name) go to
    `datasets.load_dataset(source, split=split, **hub_kwargs)`. Raises `DataError` (one line) on bad input.
    """
    path = Path(source)
    if path.is_dir():
        if not ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            raise DataError(f"{path}: a folder but not a saved dataset (no state.json); pass a folder written by "
                            "Dataset.save_to_disk or `python -m latent_ddpm.data convert`")
        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError, FileNotFoundError) as err:
            raise DataError(f"{path}: cannot read the saved dataset ({err}); re-create it") from err
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split '{split}'; the splits are {list(ds)}; pass split=")
            ds = ds[split]
        return _standardize(ds, str(path), latent_key, label_key, verify)
    suffix = path.suffix.lower()
    known = NUMPY_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
    if not path.exists():
        if suffix in known or path.is_absolute() or str(source).startswith(".") or str(source).count("/") != 1:
            raise DataError(f"{source}: no such file or folder; check the path")
        return _load_hub(str(source), split, latent_key, label_key, verify, hub_kwargs)
    if suffix not in known:
        raise DataError(f"{path}: unknown format '{suffix}'; use .npz, .npy, .parquet, .arrow or a saved dataset "
                        "folder")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: the file is not readable (permissions); check them")
    if suffix in NUMPY_SUFFIXES:
        if path.stat().st_size <= in_memory_max_bytes:
            return _in_memory(lambda kw: _write_numpy(path, kw, latent_key, label_key, labels_file))
        return _cached_numpy(path, Path(cache_dir or DEFAULT_CACHE_DIR), latent_key, label_key, labels_file)
    try:
        if suffix in PARQUET_SUFFIXES:
            ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(cache_dir) if cache_dir else None)
        else:
            ds = _read_arrow(path)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise DataError(f"{path}: not a readable {suffix} file ({err}); re-export it") from err
    return _standardize(ds, str(path), latent_key, label_key, verify)


def _read_arrow(path: Path) -> datasets.Dataset:
    """An Arrow stream file (as `datasets` writes) or an Arrow IPC/feather file, memory-mapped."""
    try:
        return datasets.Dataset.from_file(str(path))
    except (OSError, ValueError, pa.ArrowException):
        return datasets.Dataset(pa.ipc.open_file(pa.memory_map(str(path))).read_all())


def _load_hub(repo_id: str, split: str, latent_key: str, label_key: str, verify: bool, kwargs: dict
              ) -> datasets.Dataset:
    """A hub dataset via `datasets.load_dataset` (network; not exercised by the tests)."""
    try:
        ds = datasets.load_dataset(repo_id, split=split, **kwargs)
    except Exception as err:  # the hub raises many types; all mean "cannot get it"
        raise DataError(f"{repo_id}: not a local file and cannot be loaded from the hub ({err}); "
                        "check the path or the dataset id") from err
    return _standardize(ds, f"hub:{repo_id}", latent_key, label_key, verify)


def check_compatible(ds: datasets.Dataset, in_channels: int | None = None, downsample_factor: int | None = None,
                     source: str = "dataset") -> None:
    """Raise `DataError` if the latents' channels differ from the model's or H, W are not divisible by its factor."""
    c, h, w = ds.features["latents"].shape
    if in_channels is not None and c != in_channels:
        raise DataError(f"{source}: latents have {c} channels but the model expects {in_channels}; "
                        f"build the model with in_channels={c} or use matching latents")
    if downsample_factor and (h % downsample_factor or w % downsample_factor):
        raise DataError(f"{source}: latent size {h}x{w} is not divisible by the model's downsampling factor "
                        f"{downsample_factor}; crop/pad the latents or use fewer downsampling levels")


# ----------------------------------------------------------------------------- conversion

def convert(src: str | os.PathLike, out: str | os.PathLike, *, latent_key: str = "X", label_key: str = "y",
            labels_file: str | os.PathLike | None = None, overwrite: bool = False) -> datasets.Dataset:
    """Convert a `.npz`/`.npy` file to a `save_to_disk` Arrow folder, streaming chunk by chunk.

    Memory stays around a few `CHUNK_BYTES` chunks whatever the file size; the disk needs twice the
    output size while it runs. Everything is written to a temporary folder beside `out` and renamed at
    the end, so a failure leaves nothing behind. Returns the new dataset.
    """
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise DataError(f"{src}: no such file; check the path")
    if src.suffix.lower() not in NUMPY_SUFFIXES:
        raise DataError(f"{src}: unknown format '{src.suffix}'; convert takes .npz or .npy files")
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists; pass --overwrite or choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_numpy(src, dict(path=str(tmp / "raw.arrow")), latent_key, label_key, labels_file)
        ds = datasets.Dataset.from_file(str(tmp / "raw.arrow"))
        ds.save_to_disk(str(tmp / "dataset"))
        del ds
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp / "dataset", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(out))


def main(argv: list[str] | None = None) -> int:
    """`python -m latent_ddpm.data convert IN OUT`: see `convert`."""
    parser = argparse.ArgumentParser(prog="python -m latent_ddpm.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help=".npz/.npy -> Arrow dataset folder (save_to_disk layout), bounded memory")
    conv.add_argument("input", help="a .npz (arrays X, y) or .npy (N, C, H, W) file")
    conv.add_argument("output", help="folder to create (load it with load_latents or datasets.load_from_disk)")
    conv.add_argument("--latent_key", default="X", help="array name of the latents in a .npz (default X)")
    conv.add_argument("--label_key", default="y", help="array name of the labels in a .npz (default y)")
    conv.add_argument("--labels_file", default=None, help="a .npy of int labels for a .npy input")
    conv.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    ds = convert(args.input, args.output, latent_key=args.latent_key, label_key=args.label_key,
                 labels_file=args.labels_file, overwrite=args.overwrite)
    print(f"wrote {args.output}: {len(ds)} samples of shape {tuple(ds.features['latents'].shape)}"
          + (", with labels" if "labels" in ds.column_names else ", no labels"))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
