"""Latent datasets: load any source as one Arrow `datasets.Dataset` (column `latents`: Array3D (C, H, W)
float32; optional `labels`: int64), check it, and convert big `.npy`/`.npz`/`.safetensors` in bounded memory.
docs/data.md.

    python -m latent_ddpm.data convert latents.npz latents_arrow/

The public entry points live here; `.npy`/`.npz` reading is in `npyio`, `.safetensors` in `safetensorsio`, the
shared checks in `validation`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet  # noqa: F401 - pa.parquet
from datasets.exceptions import DatasetGenerationError

from .errors import ArgumentParser, first_line, run_cli
from .npyio import (
    CACHE_VERSION,
    DEFAULT_CACHE_DIR,
    IN_MEMORY_MAX_BYTES,
    cached_numpy,
    dataset_from_arrays,
    file_stamps,
    in_memory,
    latent_nbytes,
    npz_keys,
    source_key,
    write_numpy,
)
from .paths import check_replaceable, replace_with
from .safetensorsio import SAFETENSORS_SUFFIXES, safetensors_keys
from .shards import SPLIT_CHOICE, SUBSET_CHOICE, load_parquet_shards
from .sources import is_hub_id, quiet_hub_retries, quiet_parquet_reads
from .validation import (
    CHUNK_BYTES,
    LABEL_COLUMNS,
    LATENT_COLUMNS,
    DataError,
    LabelsError,
    NaNCounter,
    check_label_max,
    check_latent_meta,
    chunk_rows,
    column_candidates,
    latent_features,
    pick_column,
)

# Re-exported for `from latent_ddpm.data import ...`. CHUNK_BYTES is read from `latent_ddpm.validation`:
# patch it there (rebinding `data.CHUNK_BYTES` changes nothing).
__all__ = ["ARROW_SUFFIXES", "CACHE_VERSION", "CHUNK_BYTES", "DEFAULT_CACHE_DIR", "DataError", "IN_MEMORY_MAX_BYTES",
           "LABEL_COLUMNS", "LATENT_COLUMNS", "NUMPY_SUFFIXES", "PARQUET_SUFFIXES", "SAFETENSORS_SUFFIXES",
           "TENSOR_SUFFIXES", "check_compatible", "convert", "dataset_from_arrays", "iter_chunks", "latent_features",
           "load_latents", "main", "source_names"]

#: File suffixes read as numpy, Parquet and Arrow (`.safetensors`: SAFETENSORS_SUFFIXES, from `safetensorsio`).
NUMPY_SUFFIXES, PARQUET_SUFFIXES, ARROW_SUFFIXES = (".npz", ".npy"), (".parquet",), (".arrow",)
#: Files of whole (N, C, H, W) arrays: small ones are loaded in memory, big ones converted once to the Arrow cache.
TENSOR_SUFFIXES = NUMPY_SUFFIXES + SAFETENSORS_SUFFIXES
#: Pickled tensors (torch.save, pickle): refused with the one-line way to re-save them as safetensors.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
#: The formats, as error messages and help texts list them.
FORMATS = ".npz, .npy, .safetensors, .parquet, .arrow, a saved dataset folder or a folder of .parquet shards"


# ----------------------------------------------------------------------------- Arrow sources

def _innermost_dtype(feature) -> str | None:
    while hasattr(feature, "feature"):
        feature = feature.feature
    return "int64" if isinstance(feature, datasets.ClassLabel) else getattr(feature, "dtype", None)


def _standardize(ds: datasets.Dataset, where: str, latent_key: str, label_key: str, verify: bool = True,
                 cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """Rename the latent/label columns to `latents`/`labels`, cast to the project schema (`_cast`) and check it."""
    names = ds.column_names
    lat = pick_column(names, latent_key, LATENT_COLUMNS)
    if lat is None:
        looked = ", ".join(f"'{k}'" for k in column_candidates(latent_key, LATENT_COLUMNS))
        raise DataError(f"{where}: no latents column (looked for {looked}); the columns are "
                        f"{names}; pass the right one with --latent_key / latent_key=")
    lab = None if label_key is None else pick_column(names, label_key, LABEL_COLUMNS)
    ds = ds.select_columns([c for c in (lat, lab) if c is not None])
    ds = ds.rename_columns({k: v for k, v in ((lat, "latents"), (lab, "labels")) if k is not None and k != v})
    if len(ds) == 0:
        raise DataError(f"{where}: the dataset is empty (0 samples); check the split and the files")
    feat = ds.features["latents"]
    dtype = _numpy_dtype(getattr(feat, "dtype", None) or _innermost_dtype(feat))
    if dtype is None or dtype.kind != "f":
        raise DataError(f"{where}: latents column '{lat}' must hold floating-point arrays, got {feat}; store "
                        "float32 (C, H, W) arrays")
    latent_column = ds.data.column("latents")
    if nulls := latent_column.null_count:  # whole missing samples, told apart from NaN values
        first_null = pc.index(pc.is_null(latent_column), True).as_py()
        raise DataError(f"{where}: latents column '{lat}' has {nulls} missing samples (null rows, the first at "
                        f"index {first_null}); drop those rows or fill them in")
    try:
        first = np.asarray(ds.with_format("numpy")[0]["latents"], dtype=np.float32)
    except (ValueError, TypeError, pa.ArrowException) as err:
        raise DataError(f"{where}: the first sample's latents are not one (C, H, W) array ({first_line(err)}); "
                        "all samples must have the same shape") from err
    check_latent_meta(where, (len(ds), *first.shape), dtype)
    if lab is not None:
        ldtype, lfeat = _numpy_dtype(_innermost_dtype(ds.features["labels"])), ds.features["labels"]
        if ldtype is None or ldtype.kind not in "iu" or not isinstance(lfeat, (datasets.Value, datasets.ClassLabel)):
            raise DataError(f"{where}: labels column '{lab}' must hold one integer class id per sample, got {lfeat}; "
                            "map class names to ids 0..K-1 (or drop the column)")
        column = ds.data.column("labels")  # one int per sample: checked whole, before the cast to int64
        if column.null_count:
            raise DataError(f"{where}: labels column '{lab}' has {column.null_count} missing values; give every "
                            "sample a class id")
        low, high = (pc.min_max(column)[k].as_py() for k in ("min", "max"))
        if low < 0:
            raise DataError(f"{where}: labels must be >= 0, found {low} at index {pc.index(column, low).as_py()}; "
                            "use ids 0..K-1")
        check_label_max(where, high, pc.index(column, high).as_py())
    want = latent_features(first.shape, lab is not None)
    bad_shape = f"{where}: latents cannot be read as one (C, H, W) float32 array per sample"
    if ds.features != want:
        try:
            ds = _cast(ds, want, Path(cache_dir or DEFAULT_CACHE_DIR), (where, lat, lab))
        except (ValueError, TypeError, pa.ArrowException) as err:
            raise DataError(f"{bad_shape} ({first_line(err)}); all samples must have the same shape") from err
    nan = NaNCounter(where)
    try:
        for start, chunk, _ in iter_chunks(ds) if verify else ():
            nan.update(chunk, start)
    except (ValueError, TypeError, pa.ArrowException) as err:  # a lazy cast meets a ragged or null sample
        raise DataError(f"{bad_shape} ({first_line(err)}); all samples must have the same shape and no missing "
                        "values") from err
    nan.check()
    return ds


def _cast(ds: datasets.Dataset, want: datasets.Features, cache_dir: Path, what: tuple) -> datasets.Dataset:
    """`ds.cast(want)`. For a dataset backed by files (a saved folder, Parquet, Arrow), datasets writes the cast
    copy beside those files: into the user's data folder, which may be read-only or shared. It goes under
    `cache_dir`/casts instead, named by the files' paths, sizes and modification times and `what` was read."""
    files = [Path(f["filename"]) for f in ds.cache_files]
    if not files:  # in memory: nothing is written
        return ds.cast(want)
    key = json.dumps([file_stamps(files), list(what), str(want), CACHE_VERSION])
    target = cache_dir / "casts" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.arrow"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return ds.cast(want, cache_file_name=str(target))
    except OSError as err:
        raise DataError(f"{what[0]}: cannot write its float32 copy under {target.parent} ({err.strerror or err}); "
                        "free space there or set LATENT_DDPM_CACHE to a writable folder") from None


def _numpy_dtype(name: str | None) -> np.dtype | None:
    """A numpy dtype from an Arrow/datasets dtype name, or None where numpy has none (string, timestamp, ...)."""
    try:
        return np.dtype(name) if name else None
    except TypeError:
        return None


def iter_chunks(ds: datasets.Dataset, rows: int | None = None, with_labels: bool = False
                ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Yield (start index, latents (n, C, H, W) float32, labels or None) over `ds` in bounded chunks."""
    rows = rows or chunk_rows((0, *ds.features["latents"].shape))
    cols = ["latents", "labels"] if with_labels and "labels" in ds.column_names else ["latents"]
    view = ds.with_format("numpy", columns=cols)
    for start in range(0, len(ds), rows):
        batch = view[start:start + rows]
        yield start, batch["latents"], batch.get("labels")


def load_latents(source: str | os.PathLike, *, latent_key: str = "X", label_key: str = "y", split: str = "train",
                 subset: str | None = None, labels_file: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, in_memory_max_bytes: int = IN_MEMORY_MAX_BYTES,
                 verify: bool = True, **hub_kwargs) -> datasets.Dataset:
    """Load latents from `.npz`, `.npy`, `.safetensors`, a `save_to_disk` folder, Parquet/Arrow files, a folder of
    Parquet shards (`split` picks `train-*`, `test-*`, ...; `subset` one its README.md declares) or a hub dataset id
    (`subset` is its config name).

    Returns an Arrow `Dataset` with `latents` (C, H, W) float32 and, if present, `labels` int64, after
    checking it (shape, dtype, NaN/Inf, labels). `.npy`/`.npz`/`.safetensors` files bigger than
    `in_memory_max_bytes` are converted once, in bounded memory, to an Arrow file under `cache_dir` (default
    ~/.cache/latent_ddpm or $LATENT_DDPM_CACHE) keyed by path, size and mtime, and memory-mapped; Parquet's Arrow
    copies go under `cache_dir`/parquet.
    `labels_file` gives labels for a `.npy`. `verify=False` skips the full NaN/Inf scan of Arrow/Parquet/hub
    sources (shape, dtype and labels are still checked). Hub ids (owner/name) go to
    `datasets.load_dataset(source, split=split, **hub_kwargs)`. Raises `DataError` (one line) on bad input.
    """
    path = Path(source)
    shard_folder = path.is_dir() and not ((path / "state.json").exists() or (path / "dataset_dict.json").exists())
    if split != "train" and path.is_file():  # else silently the whole file
        raise DataError(f"{source}: a file has no splits (only a saved DatasetDict, a folder of .parquet shards or a "
                        f"hub dataset has), so no split '{split}'; drop {SPLIT_CHOICE}")
    if subset is not None and path.exists() and not shard_folder:
        raise DataError(f"{source}: no subsets (only a hub dataset or a folder of .parquet shards whose README.md "
                        f"declares configs: has them), so no subset '{subset}'; drop "
                        f"{SUBSET_CHOICE}")
    if path.is_dir():
        if shard_folder:
            ds = load_parquet_shards(path, split, Path(cache_dir or DEFAULT_CACHE_DIR), subset)
            return _standardize(ds, str(path), latent_key, label_key, verify, cache_dir)
        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError, FileNotFoundError) as err:
            raise DataError(f"{path}: cannot read the saved dataset ({err}); re-create it") from err
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split '{split}'; the splits are {list(ds)}; choose one "
                                f"with {SPLIT_CHOICE}")
            ds = ds[split]
        elif split != "train":  # else the whole dataset, silently
            raise DataError(f"{path}: a saved dataset without splits (not a DatasetDict), so no split '{split}'; read "
                            f"it whole: drop {SPLIT_CHOICE}")
        return _standardize(ds, str(path), latent_key, label_key, verify, cache_dir)
    suffix = path.suffix.lower()
    known = TENSOR_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
    if not path.exists():
        if suffix in known + PICKLE_SUFFIXES or not is_hub_id(str(source)):
            raise DataError(f"{source}: no such file or folder; check the path")
        return _load_hub(str(source), split, latent_key, label_key, verify, {"name": subset, **hub_kwargs}, cache_dir)
    if suffix in PICKLE_SUFFIXES:  # torch.save / pickle files: loading one can run code from it
        raise DataError(f"{path}: a pickle ('{suffix}', e.g. from torch.save) is never loaded, as it can run code; "
                        "save the latents as safetensors where they were made: safetensors.torch.save_file({'X': "
                        "latents.contiguous(), 'y': labels}, 'latents.safetensors')")
    if suffix not in known:
        raise DataError(f"{path}: unknown format '{suffix}'; use {FORMATS}")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: the file is not readable (permissions); check them")
    if suffix in TENSOR_SUFFIXES:
        if latent_nbytes(path, latent_key) <= in_memory_max_bytes:
            return in_memory(lambda kw: write_numpy(path, kw, latent_key, label_key, labels_file),
                             fingerprint=source_key(path, latent_key, label_key, labels_file))
        return cached_numpy(path, Path(cache_dir or DEFAULT_CACHE_DIR), latent_key, label_key, labels_file)
    try:
        if suffix in PARQUET_SUFFIXES:
            with quiet_parquet_reads():
                # its Arrow copy beside the shard folders' (`shards.load_parquet_shards`), not in datasets' cache
                ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(Path(cache_dir or DEFAULT_CACHE_DIR)
                                                                            / "parquet"))
        else:
            ds = _read_arrow(path)
    except (OSError, ValueError, pa.ArrowException, DatasetGenerationError) as err:
        raise DataError(f"{path}: not a readable {suffix} file, or one with no rows ({first_line(err)}); re-export "
                        "it") from err
    return _standardize(ds, str(path), latent_key, label_key, verify, cache_dir)


def source_names(source: str | os.PathLike) -> list[str] | None:
    """The array or column names of a local `.npz`, `.safetensors`, `.parquet` or saved-dataset folder, read from
    its header or schema (for messages that name what is there); None for other sources or an unreadable one."""
    path = Path(source)
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            return list(ds.column_names if isinstance(ds, datasets.Dataset) else next(iter(ds.values())).column_names)
        suffix = path.suffix.lower()
        if suffix in SAFETENSORS_SUFFIXES:
            return safetensors_keys(path)
        if suffix in PARQUET_SUFFIXES:
            return pa.parquet.read_schema(str(path)).names
        return npz_keys(path) if suffix == ".npz" else None
    except Exception:  # noqa: BLE001 - only a hint in a message: without it the message still stands
        return None


def _read_arrow(path: Path) -> datasets.Dataset:
    """An Arrow stream file (as `datasets` writes) or an Arrow IPC/feather file, memory-mapped."""
    try:
        return datasets.Dataset.from_file(str(path))
    except (OSError, ValueError, pa.ArrowException):
        return datasets.Dataset(pa.ipc.open_file(pa.memory_map(str(path))).read_all())


def _load_hub(repo_id: str, split: str, latent_key: str, label_key: str, verify: bool, kwargs: dict,
              cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """A hub dataset via `datasets.load_dataset` (network; not exercised by the tests)."""
    try:
        with quiet_hub_retries():
            ds = datasets.load_dataset(repo_id, split=split, **kwargs)
    except Exception as err:  # the hub raises many types; all mean "cannot get it"
        said = " ".join(str(err).split())  # one line: datasets lists a repo's configs on a line of its own
        words = re.sub("|".join(re.escape(n) for n in (repo_id, split, kwargs.get("name")) if n), "", said).lower()
        fix = (f"choose one with {SUBSET_CHOICE}" if "config" in words else  # not from the id's or names' words
               f"choose one with {SPLIT_CHOICE}" if "split" in words else "check the path or the dataset id")
        raise DataError(f"{repo_id}: not a local file and cannot be loaded from the hub ({said}); {fix}") from err
    return _standardize(ds, f"hub:{repo_id}", latent_key, label_key, verify, cache_dir)


def check_compatible(ds: datasets.Dataset, in_channels: int | None = None, downsample_factor: int | None = None,
                     source: str = "dataset",
                     fix: str = "crop/pad the latents or use fewer downsampling levels") -> None:
    """Raise `DataError` if the latents' channels differ from the model's or H, W are not divisible by its factor
    (`fix`: what the message advises for the size)."""
    c, h, w = ds.features["latents"].shape
    if in_channels is not None and c != in_channels:
        raise DataError(f"{source}: latents have {c} channels but the model expects {in_channels}; "
                        f"build the model with in_channels={c} or use matching latents")
    if downsample_factor and (h % downsample_factor or w % downsample_factor):
        raise DataError(f"{source}: latent size {h}x{w} is not divisible by the model's downsampling factor "
                        f"{downsample_factor}; {fix}")


# ----------------------------------------------------------------------------- conversion

def convert(src: str | os.PathLike, out: str | os.PathLike, *, latent_key: str = "X", label_key: str | None = "y",
            labels_file: str | os.PathLike | None = None, overwrite: bool = False) -> datasets.Dataset:
    """Convert a `.npz`/`.npy`/`.safetensors` file to a `save_to_disk` Arrow folder, streaming chunk by chunk.

    Memory stays around a few `CHUNK_BYTES` chunks whatever the file size; the disk needs twice the
    output size while it runs. Everything is written to a temporary folder beside `out` and renamed at
    the end, so a failure leaves nothing behind. Returns the new dataset.
    """
    src = Path(src)
    if not src.is_file():
        raise DataError(f"{src}: no such file; check the path")
    if src.suffix.lower() not in TENSOR_SUFFIXES:
        raise DataError(f"{src}: unknown format '{src.suffix}'; convert takes .npz, .npy or .safetensors files")
    out = check_replaceable(out, "output", (src, labels_file))
    if os.path.lexists(out) and not overwrite:
        raise DataError(f"{out}: already exists; pass --overwrite or choose another output path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else err.strerror or str(err)
        raise DataError(f"{out}: cannot create it ({why}); choose a writable output path") from None
    try:
        write_numpy(src, dict(path=str(tmp / "raw.arrow")), latent_key, label_key, labels_file)
        ds = datasets.Dataset.from_file(str(tmp / "raw.arrow"))
        ds.save_to_disk(str(tmp / "dataset"))
        del ds
        replace_with(tmp / "dataset", out)
    except OSError as err:  # a full disk (the old output, if any, is still in place)
        raise DataError(f"{out}: cannot write it ({err.strerror or first_line(err)}); free space or choose another "
                        "output path") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(out))


def main(argv: list[str] | None = None) -> int:
    """`python -m latent_ddpm.data convert IN OUT`: see `convert`."""
    parser = ArgumentParser(prog="python -m latent_ddpm.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help=".npz/.npy/.safetensors -> Arrow dataset folder (save_to_disk layout), "
                          "bounded memory")
    conv.add_argument("input", help="a .npz (arrays X, y), .npy (N, C, H, W) or .safetensors (tensors X, y) file")
    conv.add_argument("output", help="folder to create (load it with load_latents or datasets.load_from_disk)")
    conv.add_argument("--latent_key", default="X", help="array name of the latents in a .npz or .safetensors "
                      "(default X; a .safetensors may also name them latents)")
    conv.add_argument("--label_key", default=None, help="array name of the labels in a .npz or .safetensors "
                      "(default: y, else labels or label, when the file has one)")
    conv.add_argument("--labels_file", default=None, help="a .npy of int labels for a .npy input")
    conv.add_argument("--no_labels", action="store_true", help="leave the labels out (an original project's y "
                      "that is not class ids, which its training never used)")
    conv.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    src = Path(args.input)
    if args.no_labels and (args.label_key is not None or args.labels_file is not None):
        raise DataError("--no_labels: it leaves the labels out; drop it, or drop --label_key/--labels_file")
    if args.label_key is not None and src.suffix.lower() == ".npy":
        raise DataError(f"--label_key {args.label_key}: it names an array in a .npz or .safetensors input; for a "
                        ".npy, give the labels with --labels_file")
    if args.label_key is not None and src.is_file():  # a typo had converted without labels, with exit status 0
        keys = safetensors_keys(src) if src.suffix.lower() in SAFETENSORS_SUFFIXES else npz_keys(src)
        if args.label_key not in keys:
            raise DataError(f"--label_key {args.label_key}: {src} has no such array (it has {keys}); name one of "
                            "those, or leave --label_key out")
    datasets.disable_progress_bars()
    try:
        ds = convert(args.input, args.output, latent_key=args.latent_key,
                     label_key=None if args.no_labels else args.label_key or "y",
                     labels_file=args.labels_file, overwrite=args.overwrite)
    except LabelsError as err:
        if args.label_key is not None or args.labels_file is not None:
            raise
        raise LabelsError(f"{err}; or pass --no_labels to convert the latents without them") from None
    print(f"wrote {args.output}: {len(ds)} samples of shape {tuple(ds.features['latents'].shape)}"
          + (", with labels" if "labels" in ds.column_names else ", no labels"))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
