"""Where encode's images come from: an image folder, a saved dataset, Parquet files or a hub dataset, as a
`datasets.Dataset`; which column holds the images, and the labels as integer ids with their names."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np

from .data import DataError
from .errors import first_line
from .sources import is_hub_id

#: Column names tried for the images when --image_column is not given and no column has the Image feature.
IMAGE_COLUMNS = ("image", "img", "images", "png", "jpg")


def open_image_dataset(data: str, split: str = "train", cache_dir: str | None = None) -> datasets.Dataset:
    """An image folder (imagefolder: class subfolders give labels), a save_to_disk folder, Parquet file(s)
    (a glob is fine) or a hub dataset id, as a `datasets.Dataset`."""
    path = Path(data)
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        elif path.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split, cache_dir=cache_dir)
        elif data.endswith(".parquet"):
            ds = datasets.load_dataset("parquet", data_files=data, split="train", cache_dir=cache_dir)
        elif not is_hub_id(data):
            raise DataError(f"--data {data}: not an image folder, saved dataset, .parquet file or hub id")
        else:
            ds = datasets.load_dataset(data, split=split, cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets/hub raise many types; all mean "cannot read it"
        raise DataError(f"--data {data}: cannot load the images ({type(err).__name__}: {first_line(err)})") from err
    if len(ds) == 0:
        raise DataError(f"--data {data}: no images found (split {split!r})")
    return ds


def pick_columns(ds: datasets.Dataset, image_column: str | None, label_column: str | None, where: str
                 ) -> tuple[datasets.Dataset, str, np.ndarray | None, list[str] | None]:
    """The image column (undecoded) and labels as int64 ids with their names: from `label_column`, or
    the ClassLabel `label` column that imagefolder makes from class subfolders."""
    cols, feats = ds.column_names, ds.features
    if image_column is None:
        image_column = next((c for c in cols if isinstance(feats[c], datasets.Image)),
                            next((c for c in IMAGE_COLUMNS if c in cols), None))
    if image_column not in cols:
        raise DataError(f"{where}: no image column {image_column or ''} (columns: {cols}); pass --image_column")
    if isinstance(feats[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # decoded here, with checks
    if label_column is None and isinstance(feats.get("label"), datasets.ClassLabel):
        label_column = "label"
    if label_column is None:
        return ds, image_column, None, None
    if label_column not in cols:
        raise DataError(f"{where}: no label column {label_column!r} (columns: {cols})")
    values, feat = ds[label_column], feats[label_column]
    if isinstance(feat, datasets.ClassLabel):
        return ds, image_column, np.asarray(values, np.int64), list(feat.names)
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        ids = {n: i for i, n in enumerate(names)}
        return ds, image_column, np.asarray([ids[v] for v in values], np.int64), names
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in values):
        raise DataError(f"{where}: labels in {label_column!r} must be class names or integer ids >= 0")
    return ds, image_column, np.asarray(values, np.int64), None
