"""Reading `.npy`/`.npz` latents in bounded memory: headers without unpickling, chunked members, Arrow writing
with streaming checks, `dataset_from_arrays`, and the Arrow cache for big files. Entry points: `latent_ddpm.data`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter

from .validation import DataError, NaNCounter, check_labels, check_latent_meta, chunk_rows, latent_features

#: `.npy`/`.npz` files up to this size load straight into memory; bigger ones go to the Arrow cache.
IN_MEMORY_MAX_BYTES = 256 * 2**20
#: Where `load_latents` caches big `.npy`/`.npz` files as Arrow (override with $LATENT_DDPM_CACHE).
DEFAULT_CACHE_DIR = Path(os.environ.get("LATENT_DDPM_CACHE", Path.home() / ".cache" / "latent_ddpm"))
#: Bump when the cached Arrow layout changes, so that old cache files are not reused.
CACHE_VERSION = 1


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


def _numpy_chunks(path: Path, member: str | None, where: str) -> tuple[tuple[int, ...], Iterator[np.ndarray]]:
    """Shape and a chunk iterator of a `.npy` (memory-mapped) or a `.npz` member (read sequentially).

    Only the header is read here; chunks of about CHUNK_BYTES come later, so RAM use stays bounded.
    """
    with (open(path, "rb") if member is None else zipfile.ZipFile(path).open(member)) as fp:
        shape, fortran, dtype = _read_npy_header(fp, where)
    check_latent_meta(where, shape, dtype)
    step, row_bytes = chunk_rows(shape), dtype.itemsize * math.prod(shape[1:])
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
    return check_labels(where, labels, n)


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
    nan, start = NaNCounter(where), 0
    for chunk in chunks:
        chunk = chunk.astype(np.float32, copy=False)
        nan.update(chunk, start)
        batch = {"latents": chunk} if labels is None else {"latents": chunk, "labels": labels[start:start + len(chunk)]}
        writer.write_batch(batch)
        start += len(chunk)
    writer.finalize()
    nan.check()


def write_numpy(path: Path, writer_kwargs: dict, latent_key: str, label_key: str, labels_file) -> None:
    """Check and write a `.npy`/`.npz` file to an ArrowWriter made with `writer_kwargs` (path= or stream=)."""
    shape, chunks, labels = _open_numpy(path, latent_key, label_key, labels_file)
    where = f"{path}[{latent_key}]" if path.suffix.lower() == ".npz" else str(path)
    _write(writer_kwargs, shape, chunks, labels, where)


def in_memory(write) -> datasets.Dataset:
    """Run `write(writer_kwargs)` into an in-memory Arrow stream and wrap the result as a Dataset."""
    buf = pa.BufferOutputStream()
    write(dict(stream=buf))
    return datasets.Dataset(pa.ipc.open_stream(buf.getvalue()).read_all())


def dataset_from_arrays(latents: np.ndarray, labels: np.ndarray | None = None, source: str = "<arrays>"
                        ) -> datasets.Dataset:
    """An in-memory `Dataset` from arrays (N, C, H, W) and optional labels (N,), with the same checks."""
    latents = np.asarray(latents)
    check_latent_meta(source, latents.shape, latents.dtype)
    labels = None if labels is None else check_labels(source, np.asarray(labels), len(latents))
    step = chunk_rows(latents.shape)
    chunks = (latents[i:i + step] for i in range(0, len(latents), step))
    return in_memory(lambda kw: _write(kw, latents.shape, chunks, labels, source))


def cached_numpy(path: Path, cache_dir: Path, latent_key: str, label_key: str, labels_file) -> datasets.Dataset:
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
            write_numpy(path, dict(path=tmp), latent_key, label_key, labels_file)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return datasets.Dataset.from_file(str(target))
