"""Folders of Parquet shards, the layout of a downloaded hub dataset (`train-00000-of-00003.parquet`, ...,
`data/test-*`): split as `datasets` splits a hub dataset's files, read with `datasets.load_dataset("parquet")`.
`data.load_latents` then checks them like any other source."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import pyarrow as pa
from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns, sanitize_patterns
from datasets.exceptions import DatasetGenerationError

from .errors import first_line
from .sources import quiet_parquet_reads
from .validation import DataError

#: How each caller picks a source's split and subset, as the messages that refuse one name it.
SPLIT_CHOICE = "split= (train.py --train_split, evaluate --split)"
SUBSET_CHOICE = "subset= (train.py --dataset_config_name, evaluate --subset)"


def card_configs(path: Path) -> list[dict]:
    """The subsets (`configs:`) a hub dataset's README.md declares in its YAML header; [] when there is none."""
    from huggingface_hub.repocard import metadata_load

    try:
        configs = (metadata_load(path / "README.md") or {}).get("configs") if (path / "README.md").is_file() else []
    except Exception:  # noqa: BLE001 - an unreadable card declares nothing: the files' names decide, as datasets does
        return []
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


def chosen_config(path: Path, name: str | None = None) -> dict | None:
    """The subset of a folder's README.md to read, as `datasets` chooses it: the one called `name`; else the only
    one, or among several the one marked `default: true` (or named "default"); None when none is declared. Several
    without a default are refused: merging them would mix, e.g., latents of two autoencoders."""
    configs = card_configs(path)
    names = ", ".join(str(c.get("config_name")) for c in configs)
    if name is not None:
        named = [c for c in configs if c.get("config_name") == name]
        if not named:
            fix = (f"its README.md declares {names}; name one of them with" if configs else
                   "it declares none (no configs: in a README.md); drop")
            raise DataError(f"{path}: no subset '{name}'; {fix} {SUBSET_CHOICE}")
        return named[0]
    if len(configs) > 1:
        defaults = [c for c in configs if c.get("default") is True] or [
            c for c in configs if c.get("config_name") == "default"]
        if len(defaults) != 1:
            raise DataError(f"{path}: its README.md declares {len(configs)} subsets ({names}) and no default; choose "
                            f"one with {SUBSET_CHOICE}, or pass the folder of one subset's shards")
        configs = defaults
    return configs[0] if configs else None


def parquet_splits(path: Path, subset: str | None = None) -> dict[str, list[str]]:
    """The Parquet files of a folder per split, as `datasets` resolves a hub dataset's files: those of the subset
    its README.md declares (`chosen_config`, or the one called `subset`: its `data_files`, under its `data_dir`),
    else by name (`train-*`, `test-*`, `data/train-*`, ...; one `train` split when no file names one). Empty when
    the folder holds no Parquet file; a subset whose `data_files` match none is refused."""
    config = chosen_config(path, subset) or {}
    base = str((path / config["data_dir"]).resolve() if isinstance(config.get("data_dir"), str) else path.resolve())
    declared = config.get("data_files")
    try:
        patterns = sanitize_patterns(declared) if declared else get_data_patterns(base)
        files = DataFilesDict.from_patterns(patterns, base_path=base, allowed_extensions=[".parquet"])
        splits = {str(split): list(names) for split, names in files.items() if names}
    except (EmptyDatasetError, FileNotFoundError):  # no file at all, or none of the split's files is Parquet
        splits = {}
    if not splits and config:
        raise DataError(f"{path}: the subset its README.md declares ({config.get('config_name')}: data_dir "
                        f"{config.get('data_dir')}, data_files {declared}) matches no .parquet file; fix the card "
                        "or pass the shards' folder")
    return splits


def load_parquet_shards(path: Path, split: str, cache_dir: Path, subset: str | None = None) -> datasets.Dataset:
    """A folder of Parquet shards (a downloaded hub dataset's layout) read with `datasets.load_dataset("parquet")`,
    only `split`'s files (of the README's `subset`, when given); its Arrow copy goes under `cache_dir`/parquet (keyed
    by `datasets` on the files' paths and modification times), never into the data folder."""
    splits = parquet_splits(path, subset)
    if not splits:
        raise DataError(f"{path}: a folder but not a saved dataset (no state.json) and no .parquet files in it; "
                        "pass a folder written by Dataset.save_to_disk or `python -m latent_ddpm.data convert`, "
                        "or a folder of .parquet shards")
    if split not in splits:
        raise DataError(f"{path}: no split '{split}' among its .parquet files; the splits are {list(splits)}; choose "
                        f"one with {SPLIT_CHOICE}, or name the shards "
                        f"{split}-00000-of-00001.parquet, ...")
    if unreadable := [name for name in splits[split] if not os.access(name, os.R_OK)]:
        raise DataError(f"{unreadable[0]}: the file is not readable (permissions); check them")
    try:
        with quiet_parquet_reads():
            return datasets.load_dataset("parquet", data_files={split: splits[split]}, split=split,
                                         cache_dir=str(cache_dir / "parquet"))
    except OSError as err:  # the shards are readable: writing the Arrow copy failed
        raise DataError(f"{path}: cannot write its Arrow copy under {cache_dir / 'parquet'} ({err.strerror or err}); "
                        "free space there or set LATENT_DDPM_CACHE to a writable folder") from None
    except (ValueError, pa.ArrowException, DatasetGenerationError) as err:  # the cause says which and why
        detail = first_line(err.__cause__ if isinstance(err, DatasetGenerationError) and err.__cause__ else err)
        raise DataError(f"{path}: the '{split}' .parquet shards cannot be read as one table ({detail}); "
                        "check that every shard is a readable Parquet file with the same columns") from err
