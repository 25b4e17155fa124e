"""Reading `.npy`/`.npz` latents in bounded memory: headers without unpickling, chunked members, Arrow writing
with streaming checks, `dataset_from_arrays`, and the Arrow cache for big files (`.safetensors` too, read by
`safetensorsio`). Entry points: `latent_ddpm.data`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import tokenize
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter

from .errors import first_line
from .safetensorsio import SAFETENSORS_SUFFIXES, open_safetensors, safetensors_keys
from .validation import (
    LABEL_COLUMNS,
    LATENT_COLUMNS,
    DataError,
    NaNCounter,
    check_float32_range,
    check_labels,
    check_labels_meta,
    check_latent_meta,
    chunk_rows,
    latent_features,
    others_looked_for,
    pick_column,
)

#: `.npy`/`.npz`/`.safetensors` files whose latents take up to this size as float32 load straight into memory;
#: bigger ones go to the Arrow cache.
IN_MEMORY_MAX_BYTES = 256 * 2**20
#: Where `load_latents` caches big `.npy`/`.npz`/`.safetensors` files as Arrow (override with $LATENT_DDPM_CACHE).
DEFAULT_CACHE_DIR = Path(os.environ.get("LATENT_DDPM_CACHE", Path.home() / ".cache" / "latent_ddpm"))
#: Bump when the cached Arrow layout, or what a call reads, changes, so that old cache files are not reused (2: a
#: .npz's 'latents'/'labels' and every format's 'label' became fallbacks; older copies of those files lack them).
CACHE_VERSION = 2
#: What reading a damaged file raises: a bad archive, a truncated or corrupt (compressed) member, a bad header.
READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


def _read_npy_header(fp, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from a `.npy` header, without reading (or unpickling) the data."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fp)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(fp)
    except (*READ_ERRORS, SyntaxError, tokenize.TokenError) as err:  # the last two: a damaged header dict
        raise DataError(f"{where}: not a readable .npy array ({first_line(err)}); re-save it with np.save/np.savez"
                        ) from err
    raise DataError(f"{where}: unsupported .npy format version {version}; re-save it with np.save/np.savez")


def _header(path: Path, member: str | None, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The header of a `.npy` file (member None) or of a `.npz` member."""
    try:
        with (open(path, "rb") if member is None else zipfile.ZipFile(path).open(member)) as fp:
            return _read_npy_header(fp, where)
    except DataError:
        raise
    except READ_ERRORS as err:
        raise DataError(f"{where}: not a readable .npy array ({first_line(err)}); re-save it with np.save/np.savez"
                        ) from err


def latent_nbytes(path: Path, latent_key: str) -> int:
    """Size of a `.npy`/`.npz`/`.safetensors` file's latents as float32, from the header alone (a compressed `.npz`
    can hold far more than its file size, a float16 `.safetensors` half)."""
    _, shape, _, _ = _open_numpy(path, latent_key, None, None)
    return 4 * math.prod(shape)


def _numpy_chunks(path: Path, member: str | None, where: str) -> tuple[tuple[int, ...], Iterator[np.ndarray]]:
    """Shape and a chunk iterator of a `.npy` (memory-mapped) or a `.npz` member (read sequentially).

    Only the header is read here; chunks of about CHUNK_BYTES come later, so RAM use stays bounded.
    """
    shape, fortran, dtype = _header(path, member, where)
    check_latent_meta(where, shape, dtype)
    step, row_bytes = chunk_rows(shape), dtype.itemsize * math.prod(shape[1:])

    def whole() -> Iterator[np.ndarray]:  # Fortran-order .npz members (rare) are read whole: rows not contiguous
        try:
            arr = (np.load(path, mmap_mode="r", allow_pickle=False) if member is None
                   else np.load(path, allow_pickle=False)[member[:-4]])
            yield from (np.asarray(arr[i:i + step]) for i in range(0, shape[0], step))
        except READ_ERRORS as err:
            raise DataError(f"{where}: cannot read the array ({first_line(err)}); the file is probably truncated "
                            "or corrupt, re-save it") from err

    if member is None or fortran:
        return shape, whole()

    def chunks() -> Iterator[np.ndarray]:
        with zipfile.ZipFile(path) as zf, zf.open(member) as fp:
            _read_npy_header(fp, where)
            for i in range(0, shape[0], step):
                n = min(step, shape[0] - i)
                try:
                    buf = fp.read(n * row_bytes)
                except READ_ERRORS as err:
                    raise DataError(f"{where}: the archive is corrupt ({first_line(err)}); re-save it with np.savez"
                                    ) from err
                if len(buf) != n * row_bytes:
                    raise DataError(f"{where}: truncated, the data ends in sample {i + len(buf) // row_bytes}; "
                                    "re-save the file")
                yield np.frombuffer(buf, dtype=dtype).reshape((n, *shape[1:]))

    return shape, chunks()


def _read_labels(where: str, read, n: int, header) -> np.ndarray:
    """Labels through `read()`, once `header()` (their .npy header) shows (n,) numbers: a damaged or crafted
    header must not make np.load allocate what it claims."""
    shape, _, dtype = header()
    check_labels_meta(where, shape, dtype, n)
    try:
        labels = read()
    except READ_ERRORS as err:  # object arrays raise here (never unpickled), and so do damaged members
        raise DataError(f"{where}: labels are not a readable numeric array ({first_line(err)}); save int64 class "
                        "ids") from err
    return check_labels(where, labels, n)


def npz_keys(path: str | Path) -> list[str]:
    """The array names in a `.npz` archive, read from its directory (no array is loaded)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except READ_ERRORS as err:
        raise DataError(f"{path}: not a readable .npz archive ({first_line(err)}); re-save it with np.savez") from err


def _open_numpy(path: Path, latent_key: str, label_key: str | None, labels_file: str | Path | None):
    """(where, shape, chunk iterator, labels or None) for a `.npy`/`.npz`/`.safetensors` file; `label_key` None
    reads no labels. `where` names the file (and the array read) in error messages."""
    labels = None
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        where, shape, chunks, labels = open_safetensors(path, latent_key, label_key)
    elif path.suffix.lower() == ".npy":
        where = str(path)
        shape, chunks = _numpy_chunks(path, None, where)
    else:
        keys = npz_keys(path)  # names as every format: validation.pick_column
        key = pick_column(keys, latent_key, LATENT_COLUMNS)
        if key is None:
            also = others_looked_for(latent_key, LATENT_COLUMNS)
            raise DataError(f"{path}: no array named '{latent_key}'{also}; the file has {keys}; "
                            "pass the right one with --latent_key / latent_key=")
        where = f"{path}[{key}]"
        shape, chunks = _numpy_chunks(path, key + ".npy", where)
        if (lkey := None if label_key is None else pick_column(keys, label_key, LABEL_COLUMNS)) is not None:
            read = lambda: np.load(path, allow_pickle=False)[lkey]
            lwhere = f"{path}[{lkey}]"
            labels = _read_labels(lwhere, read, shape[0], lambda: _header(path, lkey + ".npy", lwhere))
    if labels_file is not None:
        if labels is not None:  # silently preferring either would train on labels the user did not mean
            keys = safetensors_keys(path) if path.suffix.lower() in SAFETENSORS_SUFFIXES else npz_keys(path)
            held = pick_column(keys, label_key, LABEL_COLUMNS)  # label_key's fallback, maybe 'labels' or 'label'
            raise DataError(f"{path}: it holds its own labels '{held}' and a labels file "
                            f"{labels_file} was given too; use one: drop the labels file, or re-save the "
                            f"{path.suffix.lower()} without '{held}'")
        if not Path(labels_file).is_file():
            raise DataError(f"{labels_file}: no such labels file; check the path")
        labels = _read_labels(str(labels_file), lambda: np.load(labels_file, allow_pickle=False), shape[0],
                              lambda: _header(Path(labels_file), None, f"--labels_file {labels_file}"))
    return where, shape, chunks, labels


def _write(writer_kwargs: dict, shape: tuple[int, ...], chunks, labels: np.ndarray | None, where: str) -> None:
    """Write latent chunks (and labels) to an ArrowWriter, checking NaN/Inf as they stream by."""
    writer = ArrowWriter(features=latent_features(shape[1:], labels is not None), **writer_kwargs)
    nan, start = NaNCounter(where), 0
    for chunk in chunks:
        if chunk.dtype.itemsize > 4:  # float64/longdouble: a value beyond float32's range would become Inf
            check_float32_range(where, chunk, start)
        chunk = chunk.astype(np.float32, copy=False)
        nan.update(chunk, start)
        batch = {"latents": chunk} if labels is None else {"latents": chunk, "labels": labels[start:start + len(chunk)]}
        writer.write_batch(batch)
        start += len(chunk)
    writer.finalize()
    nan.check()


def write_numpy(path: Path, writer_kwargs: dict, latent_key: str, label_key: str, labels_file) -> None:
    """Check and write a `.npy`/`.npz`/`.safetensors` file to an ArrowWriter made with `writer_kwargs` (path= or
    stream=)."""
    where, shape, chunks, labels = _open_numpy(path, latent_key, label_key, labels_file)
    _write(writer_kwargs, shape, chunks, labels, where)


def in_memory(write, fingerprint: str | None = None) -> datasets.Dataset:
    """Run `write(writer_kwargs)` into an in-memory Arrow stream and wrap the result as a Dataset. Its
    `fingerprint` names it for `datasets`' caches (a random one by default): left to `datasets`, it would be a
    hash of the whole table, which serialises a second copy of it (+2.3x the data's size in peak memory)."""
    buf = pa.BufferOutputStream()
    write(dict(stream=buf))
    return datasets.Dataset(pa.ipc.open_stream(buf.getvalue()).read_all(), fingerprint=fingerprint or uuid.uuid4().hex)


def file_stamps(files: list[Path]) -> list[tuple[str, int, int]]:
    """(absolute path, size, modification time in ns) of each file: what names a cache of their contents."""
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def source_key(path: Path, latent_key: str, label_key: str | None, labels_file) -> str:
    """A hash naming what a `.npy`/`.npz`/`.safetensors` file holds: its path, size and modification time (and the
    labels file's), the keys read and `CACHE_VERSION`. Names the Arrow cache file and the in-memory fingerprint."""
    files = [path] if labels_file is None or not Path(labels_file).is_file() else [path, Path(labels_file)]
    key = json.dumps([file_stamps(files), latent_key, label_key, str(labels_file), CACHE_VERSION])
    return hashlib.sha1(key.encode()).hexdigest()[:16]


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
    """Arrow copy of a big `.npy`/`.npz`/`.safetensors` under cache_dir, keyed by path, size, mtime and keys."""
    target = cache_dir / f"{path.stem}-{source_key(path, latent_key, label_key, labels_file)}.arrow"
    if not target.exists():
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".arrow.tmp", dir=cache_dir)
            os.close(fd)
        except OSError as err:
            raise DataError(f"{path}: big files are converted once to an Arrow cache, but the cache folder "
                            f"{cache_dir} cannot be written ({err.strerror or err}); set $LATENT_DDPM_CACHE to a "
                            "writable folder, or convert the file first (python -m latent_ddpm.data convert)"
                            ) from None
        try:
            write_numpy(path, dict(path=tmp), latent_key, label_key, labels_file)
            os.replace(tmp, target)
        except OSError as err:  # a full disk, a quota
            raise DataError(f"{path}: writing its Arrow cache in {cache_dir} failed ({err.strerror or err}); free "
                            "space there or set $LATENT_DDPM_CACHE to another folder") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return datasets.Dataset.from_file(str(target))
