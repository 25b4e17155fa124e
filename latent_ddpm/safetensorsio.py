"""Reading `.safetensors` latents in bounded memory with the `safetensors` library: the header (names, dtypes,
shapes) first, then the latents in row slices (`get_slice`) converted to float32, bfloat16 included (numpy has no
bfloat16). The format holds no code: nothing is ever unpickled. Entry points: `latent_ddpm.data` via `npyio`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .errors import first_line
from .validation import (
    LABEL_COLUMNS,
    LATENT_COLUMNS,
    DataError,
    LabelsError,
    check_labels,
    check_labels_meta,
    check_latent_meta,
    chunk_rows,
    others_looked_for,
    pick_column,
)

#: File suffixes read with the `safetensors` library.
SAFETENSORS_SUFFIXES = (".safetensors",)
#: Accepted latent dtypes (safetensors' names), each with a numpy dtype of the same item size for the shape checks.
FLOAT_DTYPES = {"F16": np.dtype("float16"), "BF16": np.dtype("float16"), "F32": np.dtype("float32"),
                "F64": np.dtype("float64")}
#: Accepted label dtypes (safetensors' names) and their numpy dtypes.
INT_DTYPES = {f"{k}{b}": np.dtype(f"{'int' if k == 'I' else 'uint'}{b}") for k in "IU" for b in (8, 16, 32, 64)}
#: What reading a damaged or foreign file raises (header parse, truncated data, an unreadable file).
READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)
RESAVE = "re-save it with safetensors.torch.save_file"
_READABLE = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "BOOL": "bool",
             **{k: str(v) for k, v in INT_DTYPES.items()}}


def _dtype_name(name: str) -> str:
    """A safetensors dtype name as torch/numpy spell it (I64 -> int64), or as is where there is none."""
    return _READABLE.get(name, name)


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a `.safetensors` file, from its header (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except READ_ERRORS as err:
        raise DataError(f"{path}: not a readable .safetensors file ({first_line(err)}); {RESAVE}") from err


def _latent_chunks(path: Path, key: str, shape: tuple[int, ...], where: str) -> Iterator[np.ndarray]:
    """Row slices of about CHUNK_BYTES (as float32) of tensor `key`; bfloat16 becomes float32 (exact), other
    floats keep their dtype (the writer checks float64's range before its own cast)."""
    step = chunk_rows(shape)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensor = f.get_slice(key)
            for start in range(0, shape[0], step):
                chunk = tensor[start:start + step]
                yield (chunk.to(torch.float32) if chunk.dtype == torch.bfloat16 else chunk).numpy()
    except READ_ERRORS as err:
        raise DataError(f"{where}: cannot read the tensor ({first_line(err)}); the file is probably truncated or "
                        f"corrupt, {RESAVE}") from err


def _read_labels(path: Path, key: str, n: int) -> np.ndarray:
    """Labels `key` of `path`, checked (1-D integers of length n, 0..MAX_CLASS_ID) before and after reading."""
    where = f"{path}[{key}]"
    with safe_open(str(path), framework="pt") as f:
        meta = f.get_slice(key)
        shape, name = tuple(meta.get_shape()), meta.get_dtype()
        if name not in INT_DTYPES:
            if name in FLOAT_DTYPES and shape != (n,):  # one-hot or score rows: y.argmax(1), not torch.unique
                check_labels_meta(where, shape, FLOAT_DTYPES[name], n)
            raise LabelsError(f"{where}: labels must be integers (class ids 0..K-1), got dtype {_dtype_name(name)}; "
                              "save them as an int64 tensor, e.g. torch.unique(y, return_inverse=True)[1]")
        check_labels_meta(where, shape, INT_DTYPES[name], n)
        try:
            labels = f.get_tensor(key).numpy()
        except READ_ERRORS as err:
            raise DataError(f"{where}: cannot read the labels ({first_line(err)}); {RESAVE}") from err
    return check_labels(where, labels, n)


def open_safetensors(path: Path, latent_key: str, label_key: str | None
                     ) -> tuple[str, tuple[int, ...], Iterator[np.ndarray], np.ndarray | None]:
    """(where, shape, latent chunk iterator, labels or None) for a `.safetensors` file. The latents are the tensor
    `latent_key` (else, for a default key, `latents` or `X`); the labels `label_key` (else, for a default key,
    `labels`, `label` or `y`; `label_key` None: none): `validation.pick_column`.
    Only the header and the labels are read here; the latents stream later, in chunks."""
    keys = safetensors_keys(path)
    key = pick_column(keys, latent_key, LATENT_COLUMNS)
    if key is None:
        also = others_looked_for(latent_key, LATENT_COLUMNS)
        raise DataError(f"{path}: no tensor named '{latent_key}'{also}; the file has {keys}; pass the right "
                        "one with --latent_key / latent_key=")
    where = f"{path}[{key}]"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.get_slice(key)
            shape, name = tuple(meta.get_shape()), meta.get_dtype()
    except READ_ERRORS as err:
        raise DataError(f"{path}: not a readable .safetensors file ({first_line(err)}); {RESAVE}") from err
    if name not in FLOAT_DTYPES:
        raise DataError(f"{where}: latents must be floating point (float16, bfloat16, float32 or float64), got "
                        f"dtype {_dtype_name(name)}; convert them with x.float()")
    check_latent_meta(where, shape, FLOAT_DTYPES[name])
    label = None if label_key is None else pick_column(keys, label_key, LABEL_COLUMNS)
    labels = None if label is None or label == key else _read_labels(path, label, shape[0])
    return where, shape, _latent_chunks(path, key, shape, where), labels
