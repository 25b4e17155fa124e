"""Two input formats of `load_latents`: a folder of Parquet shards (a downloaded hub dataset's layout, split by file
name) and `.safetensors` latents (float16/bfloat16/float32/float64, optional labels). All data is tiny."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latent_ddpm import data, validation
from latent_ddpm.data import DataError, load_latents
from latent_ddpm.errors import UserInputError

N, C, H, W = 10, 3, 4, 6


def latents(n: int = N, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, C, H, W)) * 3 + 1).astype(np.float32)


def arrays(ds: datasets.Dataset) -> tuple[np.ndarray, np.ndarray | None]:
    view = ds.with_format("numpy")[:]
    return view["latents"], view.get("labels")


def listing(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def expect_error(source, match: str, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as info:
        load_latents(source, **kwargs)
    assert isinstance(info.value, UserInputError) and "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------- a folder of Parquet shards

def write_shard(path: Path, x: np.ndarray, y: np.ndarray | None = None) -> None:
    """One shard as a hub dataset stores it: nested float lists `X` (float64), int32 labels `y`, an extra column."""
    columns = {"X": x.astype(np.float64).tolist(), "id": list(range(len(x)))}
    if y is not None:
        columns["y"] = y.astype(np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns).to_parquet(str(path))


@pytest.fixture
def shards(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    """`hub/` with train (7 + 5 rows in two shards) and test (4 rows) Parquet shards, and a README."""
    x, y = latents(16, seed=1), np.arange(16) % 5
    folder = tmp_path / "hub"
    write_shard(folder / "train-00000-of-00002.parquet", x[:7], y[:7])
    write_shard(folder / "train-00001-of-00002.parquet", x[7:12], y[7:12])
    write_shard(folder / "test-00000-of-00001.parquet", x[12:], y[12:])
    (folder / "README.md").write_text("---\nlicense: mit\n---\n")
    return folder, x, y


def test_a_folder_of_parquet_shards_loads_each_split(shards, tmp_path):
    folder, x, y = shards
    before = listing(folder)
    for split, rows in (("train", slice(0, 12)), ("test", slice(12, 16))):
        ds = load_latents(folder, split=split, cache_dir=tmp_path / "cache")
        assert ds.features == validation.latent_features((C, H, W), True)  # through _standardize's cast
        got_x, got_y = arrays(ds)
        np.testing.assert_array_equal(got_x, x[rows])
        np.testing.assert_array_equal(got_y, y[rows])
    assert listing(folder) == before  # nothing written into the data folder, not even a lock file
    assert (tmp_path / "cache" / "parquet").is_dir()  # the Arrow copy went under the project's cache folder
    again = load_latents(folder, split="test", cache_dir=tmp_path / "cache")
    assert again.cache_files == ds.cache_files  # reused


def test_an_unknown_split_lists_the_splits_found(shards, tmp_path):
    folder, _, _ = shards
    message = expect_error(folder, r"no split 'validation' among its \.parquet files; the splits are "
                           r"\['train', 'test'\]", split="validation", cache_dir=tmp_path / "cache")
    assert str(folder) in message
    assert not (tmp_path / "cache").exists()


def test_shards_in_a_nested_data_folder(tmp_path):
    x, y = latents(9, seed=2), np.arange(9) % 3
    folder = tmp_path / "hub"
    write_shard(folder / "data" / "train-00000-of-00002.parquet", x[:3], y[:3])
    write_shard(folder / "data" / "train-00001-of-00002.parquet", x[3:6], y[3:6])
    write_shard(folder / "data" / "test-00000-of-00001.parquet", x[6:], y[6:])
    got_x, got_y = arrays(load_latents(folder, cache_dir=tmp_path / "cache"))
    np.testing.assert_array_equal(got_x, x[:6])
    np.testing.assert_array_equal(got_y, y[:6])
    got_x, _ = arrays(load_latents(folder, split="test", label_key=None, cache_dir=tmp_path / "cache"))
    np.testing.assert_array_equal(got_x, x[6:])


def test_the_subsets_a_dataset_card_declares(tmp_path):
    # Two subsets (say, latents of two autoencoders) in subfolders were merged into one set; datasets itself
    # refuses to choose. Several are refused; one declared subset's data_files are what it reads.
    x = latents(8, seed=4)
    folder = tmp_path / "hub"
    write_shard(folder / "vae_a" / "train-00000-of-00001.parquet", x[:4])
    write_shard(folder / "vae_b" / "train-00000-of-00001.parquet", x[4:])
    card = "---\nconfigs:\n- config_name: vae_a\n  data_files: vae_a/train-*\n{}---\n"
    (folder / "README.md").write_text(card.format("- config_name: vae_b\n  data_files: vae_b/train-*\n"))
    expect_error(folder, r"its README.md declares 2 subsets \(vae_a, vae_b\) and no default; choose one with subset= "
                         r"\(train.py --dataset_config_name, evaluate --subset\), or pass the folder of one",
                 cache_dir=tmp_path / "cache")
    for subset, rows in (("vae_a", x[:4]), ("vae_b", x[4:])):  # chosen by name, as datasets' name= does
        got_x, _ = arrays(load_latents(folder, subset=subset, label_key=None, cache_dir=tmp_path / "cache"))
        np.testing.assert_array_equal(got_x, rows)
    expect_error(folder, r"no subset 'vae_c'; its README.md declares vae_a, vae_b; name one of them with subset=",
                 subset="vae_c", cache_dir=tmp_path / "cache")
    expect_error(folder / "vae_b", r"no subset 'vae_a'; it declares none \(no configs: in a README.md\); drop subset=",
                 subset="vae_a", cache_dir=tmp_path / "cache")
    got_x, _ = arrays(load_latents(folder / "vae_b", label_key=None, cache_dir=tmp_path / "cache"))
    np.testing.assert_array_equal(got_x, x[4:])
    (folder / "README.md").write_text(card.format(""))
    got_x, _ = arrays(load_latents(folder, label_key=None, cache_dir=tmp_path / "cache"))
    np.testing.assert_array_equal(got_x, x[:4])


def test_a_subset_by_data_dir_a_default_subset_and_patterns_matching_nothing(tmp_path):
    # What datasets does with a card's subsets: `data_dir` scopes the files (they were all merged), a `default: true`
    # subset among several is the one read (it was refused), declared files matching nothing are named as such.
    x = latents(8, seed=6)
    folder = tmp_path / "hub"
    write_shard(folder / "a" / "train-00000-of-00001.parquet", x[:4])
    write_shard(folder / "b" / "train-00000-of-00001.parquet", x[4:])
    cache = tmp_path / "cache"
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: vae_a\n  data_dir: a\n---\n")
    np.testing.assert_array_equal(arrays(load_latents(folder, label_key=None, cache_dir=cache))[0], x[:4])
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: vae_a\n  data_files: a/*.parquet\n"
                                      "- config_name: vae_b\n  data_files: b/*.parquet\n  default: true\n---\n")
    np.testing.assert_array_equal(arrays(load_latents(folder, label_key=None, cache_dir=cache))[0], x[4:])
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: c\n  data_files:\n  - split: train\n"
                                      "    path: data/train-*\n---\n")
    expect_error(folder, r"the subset its README.md declares \(c: .*\) matches no .parquet file", cache_dir=cache)


def test_shards_that_name_no_split_are_the_train_split(tmp_path):
    x = latents(6, seed=3)
    write_shard(tmp_path / "d" / "part0.parquet", x[:4])
    write_shard(tmp_path / "d" / "part1.parquet", x[4:])
    ds = load_latents(tmp_path / "d", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(arrays(ds)[0], x)
    assert "labels" not in ds.column_names


def test_shards_get_the_same_checks_as_one_parquet_file(tmp_path):
    x = latents(8, seed=4)
    x[6, 2, 1, 0] = np.inf  # the second shard's second sample: index 6 of the split
    write_shard(tmp_path / "d" / "train-00000-of-00002.parquet", x[:5])
    write_shard(tmp_path / "d" / "train-00001-of-00002.parquet", x[5:])
    expect_error(tmp_path / "d", r"1 NaN/Inf values in the latents, the first in sample 6 at \(channel 2, row 1, "
                 r"col 0\)", cache_dir=tmp_path / "cache")
    write_shard(tmp_path / "e" / "train-00000-of-00001.parquet", latents(4), np.array([0, 1, -3, 1]))
    expect_error(tmp_path / "e", "labels must be >= 0, found -3 at index 2", cache_dir=tmp_path / "cache")


def test_a_damaged_shard_is_one_line(tmp_path):
    write_shard(tmp_path / "d" / "train-00000-of-00002.parquet", latents(4))
    (tmp_path / "d" / "train-00001-of-00002.parquet").write_bytes(b"PAR1" + bytes(300))
    expect_error(tmp_path / "d", r"the 'train' \.parquet shards cannot be read as one table \(.*\); check that every "
                 "shard", cache_dir=tmp_path / "cache")


def test_a_folder_with_neither_state_json_nor_parquet_keeps_its_message(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("not a dataset")
    expect_error(tmp_path / "d", r"a folder but not a saved dataset \(no state\.json\)", cache_dir=tmp_path / "c")
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", r"not a saved dataset \(no state\.json\)", cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- .safetensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def as_float32(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """What loading `x` stored as `dtype` must give: its float32 conversion."""
    return torch.from_numpy(x).to(dtype).to(torch.float32).numpy()


@pytest.mark.parametrize("big", [False, True], ids=["in_memory", "arrow_cache"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_safetensors_latents_and_labels(tmp_path, monkeypatch, dtype, big):
    x, y = latents(), np.arange(N) % 4
    save_file({"X": torch.from_numpy(x).to(dtype), "y": torch.from_numpy(y)}, tmp_path / "a.safetensors")
    monkeypatch.setattr(validation, "CHUNK_BYTES", 3 * C * H * W * 4)  # 3 samples per chunk: several slices
    limit = dict(in_memory_max_bytes=0) if big else {}
    ds = load_latents(tmp_path / "a.safetensors", cache_dir=tmp_path / "cache", **limit)
    assert ds.features == validation.latent_features((C, H, W), True)
    got_x, got_y = arrays(ds)
    np.testing.assert_array_equal(got_x, as_float32(x, dtype))
    np.testing.assert_array_equal(got_y, y)
    assert bool(ds.cache_files) == big and (tmp_path / "cache").exists() == big  # big: memory-mapped from the cache
    if big:
        again = load_latents(tmp_path / "a.safetensors", cache_dir=tmp_path / "cache", **limit)
        assert again.cache_files == ds.cache_files and len(list((tmp_path / "cache").iterdir())) == 1
    unlabelled = load_latents(tmp_path / "a.safetensors", label_key=None, cache_dir=tmp_path / "cache", **limit)
    assert unlabelled.column_names == ["latents"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_safetensors_without_labels_and_other_names(tmp_path, dtype):
    x = latents()
    save_file({"latents": torch.from_numpy(x).to(dtype)}, tmp_path / "a.safetensors")
    ds = load_latents(tmp_path / "a.safetensors")
    assert ds.column_names == ["latents"]
    np.testing.assert_array_equal(arrays(ds)[0], as_float32(x, dtype))
    save_file({"z": torch.from_numpy(x).to(dtype), "labels": torch.arange(N) % 2, "cls": torch.arange(N) % 3},
              tmp_path / "b.safetensors")
    np.testing.assert_array_equal(arrays(load_latents(tmp_path / "b.safetensors", latent_key="z"))[1], np.arange(N) % 2)
    np.testing.assert_array_equal(arrays(load_latents(tmp_path / "b.safetensors", latent_key="z", label_key="cls"))[1],
                                  np.arange(N) % 3)


def test_convert_takes_a_safetensors_file(tmp_path, capsys):
    x, y = latents(), np.arange(N) % 4
    save_file({"X": torch.from_numpy(x).to(torch.bfloat16), "labels": torch.from_numpy(y)}, tmp_path / "a.safetensors")
    assert data.main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "out")]) == 0
    assert "10 samples of shape (3, 4, 6), with labels" in capsys.readouterr().out
    got_x, got_y = arrays(load_latents(tmp_path / "out"))
    np.testing.assert_array_equal(got_x, as_float32(x, torch.bfloat16))
    np.testing.assert_array_equal(got_y, y)
    with pytest.raises(DataError, match=r"--label_key cls: .*a\.safetensors has no such array \(it has \['X', "
                       r"'labels'\]\)"):
        data.main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "out2"), "--label_key", "cls"])
    save_file({"X": torch.from_numpy(x), "y": torch.from_numpy(y).float()}, tmp_path / "b.safetensors")
    with pytest.raises(DataError, match=r"got dtype float32; .*; or pass --no_labels to convert the latents without"):
        data.main(["convert", str(tmp_path / "b.safetensors"), str(tmp_path / "out2")])  # as a .npz's y


def write_bad(path: Path, case: str) -> None:
    """One bad `.safetensors` file."""
    x = torch.from_numpy(latents())
    if case in ("truncated", "garbage", "empty"):
        save_file({"X": x}, path)
        raw = path.read_bytes()
        path.write_bytes({"truncated": raw[: len(raw) - 100], "garbage": bytes(range(256)) * 4, "empty": b""}[case])
        return
    nan = x.to(torch.bfloat16)
    nan[7, 1, 2, 3] = float("nan")
    tensors = {"other_key": {"Z": x, "cls": torch.arange(N)},
               "3d": {"X": x[:, 0].contiguous()},
               "int_latents": {"X": (x * 10).to(torch.int16)},
               "nan_bf16": {"X": nan},
               "float_labels": {"X": x, "y": torch.arange(N).float()},
               "short_labels": {"X": x, "y": torch.arange(N - 1)},
               "2d_labels": {"X": x, "y": torch.zeros(N, 1, dtype=torch.int64)},
               "one_hot_labels": {"X": x, "label": torch.eye(3)[torch.arange(N) % 3]},
               "negative_labels": {"X": x, "y": torch.arange(N) - 1},
               "empty_latents": {"X": x[:0], "y": torch.arange(0)}}[case]
    save_file(tensors, path)


@pytest.mark.parametrize("big", [False, True], ids=["in_memory", "arrow_cache"])
@pytest.mark.parametrize("case, match", [
    ("other_key", r"no tensor named 'X' \(nor 'latents'\); the file has \['Z', 'cls'\]"),
    ("truncated", r"not a readable \.safetensors file \(.*\); re-save it"),
    ("garbage", r"not a readable \.safetensors file"),
    ("empty", r"not a readable \.safetensors file"),
    ("3d", r"\[X\]: latents must be 4-D \(N, C, H, W\), got shape \(10, 4, 6\)"),
    ("int_latents", r"\[X\]: latents must be floating point \(float16, bfloat16, float32 or float64\), got dtype "
     "int16"),
    ("nan_bf16", r"\[X\]: 1 NaN/Inf values in the latents, the first in sample 7 at \(channel 1, row 2, col 3\)"),
    ("float_labels", r"\[y\]: labels must be integers \(class ids 0..K-1\), got dtype float32"),
    ("short_labels", r"\[y\]: labels must have shape \(10,\) to match 10 latents, got \(9,\)"),
    ("2d_labels", r"labels must have shape \(10,\) to match 10 latents, got \(10, 1\)"),
    ("one_hot_labels", r"\[label\]: labels must have shape \(10,\) to match 10 latents, got \(10, 3\); one-hot or "
     r"score rows\? save the class ids, y\.argmax\(1\)$"),
    ("negative_labels", r"labels must be >= 0, found -1 at index 0"),
    ("empty_latents", r"the dataset is empty"),
], ids=lambda v: v if "\\" not in v and " " not in v else "")
def test_bad_safetensors_is_one_line_naming_the_file(tmp_path, monkeypatch, case, match, big):
    monkeypatch.setattr(validation, "CHUNK_BYTES", 3 * C * H * W * 4)
    write_bad(tmp_path / "a.safetensors", case)
    message = expect_error(tmp_path / "a.safetensors", match, cache_dir=tmp_path / "cache",
                           **(dict(in_memory_max_bytes=0) if big else {}))
    assert message.startswith(str(tmp_path / "a.safetensors"))
    assert not (tmp_path / "cache").exists() or not [p for p in (tmp_path / "cache").iterdir()]  # no cache left


def test_an_unknown_format_lists_safetensors(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"\x89HDF")
    expect_error(tmp_path / "x.h5", r"unknown format '\.h5'; use \.npz, \.npy, \.safetensors, \.parquet, \.arrow, a "
                 r"saved dataset folder or a folder of \.parquet shards")
    (tmp_path / "x.pt").write_bytes(b"\x80\x02")  # a pickle: never loaded, re-saving it as safetensors is the fix
    expect_error("owner/latents.pt", r"owner/latents.pt: no such file or folder")  # not a hub id: it went to the hub
    expect_error(tmp_path / "x.pt", r"a pickle \('\.pt', e\.g\. from torch\.save\) is never loaded")
    with pytest.raises(DataError, match=r"convert takes \.npz, \.npy or \.safetensors files"):
        data.convert(tmp_path / "x.pt", tmp_path / "out")
