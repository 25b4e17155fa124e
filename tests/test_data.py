"""Loading, conversion and validation of latent sources (latent_ddpm/data.py). All data is tiny."""

from __future__ import annotations

import os
import zipfile

import datasets
import numpy as np
import pytest
import torch
from _helpers import read_back

from latent_ddpm import data, validation
from latent_ddpm.data import DataError, check_compatible, convert, dataset_from_arrays, load_latents
from latent_ddpm.errors import UserInputError, run_cli

#: Tiny test set: 10 samples, 3 channels, 4x6 latents.
N, C, H, W = 10, 3, 4, 6


@pytest.fixture
def xy():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((N, C, H, W)) * 3 + 1).astype(np.float32), rng.integers(0, 4, N)


def arrays(ds):
    view = ds.with_format("numpy")[:]
    return view["latents"], view.get("labels")


def assert_same(ds, x, y):
    got_x, got_y = arrays(ds)
    assert ds.features["latents"] == datasets.Array3D((C, H, W), "float32")
    assert got_x.dtype == np.float32 and np.array_equal(got_x, x)
    if y is None:
        assert "labels" not in ds.column_names
    else:
        assert ds.features["labels"] == datasets.Value("int64") and np.array_equal(got_y, y)


# ----------------------------------------------------------------------------- loaders

@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz(tmp_path, xy, save):
    save(tmp_path / "a.npz", X=xy[0], y=xy[1])
    assert_same(load_latents(tmp_path / "a.npz"), *xy)


def test_npz_other_keys_and_no_labels(tmp_path, xy):
    np.savez(tmp_path / "a.npz", lat=xy[0], cls=xy[1])
    assert_same(load_latents(tmp_path / "a.npz", latent_key="lat", label_key="cls"), *xy)
    assert_same(load_latents(tmp_path / "a.npz", latent_key="lat"), xy[0], None)


def test_npy_with_labels_file_and_float64(tmp_path, xy):
    np.save(tmp_path / "x.npy", xy[0].astype(np.float64))
    np.save(tmp_path / "y.npy", xy[1])
    assert_same(load_latents(tmp_path / "x.npy"), xy[0], None)
    assert_same(load_latents(tmp_path / "x.npy", labels_file=tmp_path / "y.npy"), *xy)


def test_big_file_goes_to_arrow_cache(tmp_path, xy, monkeypatch):
    np.savez(tmp_path / "a.npz", X=xy[0], y=xy[1])
    monkeypatch.setattr(validation, "CHUNK_BYTES", 3 * C * H * W * 4)  # 3 samples per chunk: several chunks
    ds = load_latents(tmp_path / "a.npz", cache_dir=tmp_path / "cache", in_memory_max_bytes=0)
    assert_same(ds, *xy)
    assert len(os.listdir(tmp_path / "cache")) == 1 and ds.cache_files  # memory-mapped, not in RAM
    again = load_latents(tmp_path / "a.npz", cache_dir=tmp_path / "cache", in_memory_max_bytes=0)
    assert again.cache_files[0]["filename"] == ds.cache_files[0]["filename"]


def test_a_cache_made_before_the_label_fallbacks_is_not_reused(tmp_path, xy, monkeypatch):
    # A .npz's 'labels' (or 'label') array was not read before they were fallbacks: its cache holds no labels,
    # under the name the same call gives now (path, size, mtime, keys asked for); reused, --class_conditional said
    # the data had no labels.
    from latent_ddpm import npyio

    np.savez(tmp_path / "a.npz", X=xy[0], labels=xy[1])
    cache = tmp_path / "cache"
    cache.mkdir()
    with monkeypatch.context() as old:
        old.setattr(npyio, "CACHE_VERSION", 1)
        stale = cache / f"a-{npyio.source_key(tmp_path / 'a.npz', 'X', 'y', None)}.arrow"
    npyio.write_numpy(tmp_path / "a.npz", dict(path=str(stale)), "X", None, None)  # as it was cached: no labels
    assert_same(load_latents(tmp_path / "a.npz", cache_dir=cache, in_memory_max_bytes=0), *xy)


def test_saved_folder_parquet_arrow_and_torch_format(tmp_path, xy):
    ds = dataset_from_arrays(*xy)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert_same(load_latents(tmp_path / "saved"), *xy)
    datasets.DatasetDict(train=ds).save_to_disk(str(tmp_path / "dict"))
    assert_same(load_latents(tmp_path / "dict", split="train"), *xy)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    assert_same(load_latents(tmp_path / "a.parquet", cache_dir=tmp_path / "pq"), *xy)
    assert list((tmp_path / "pq" / "parquet").rglob("*.arrow"))
    assert_same(load_latents(next((tmp_path / "saved").glob("*.arrow"))), *xy)
    import pyarrow as pa  # an Arrow IPC *file* (feather v2) written by plain pyarrow
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_file(sink, ds.data.table.schema) as w:
        w.write_table(ds.data.table)
    assert_same(load_latents(tmp_path / "f.arrow"), *xy)
    batch = load_latents(tmp_path / "saved").with_format("torch")[:4]
    assert batch["latents"].shape == (4, C, H, W) and batch["latents"].dtype == torch.float32


def test_a_parquet_file_is_cached_under_the_project_cache(tmp_path, xy, monkeypatch):
    # Its Arrow copy went to datasets' own cache (~/.cache/huggingface), while a folder of shards, big numpy files and
    # casts use the project's (LATENT_DDPM_CACHE): one place to find, move or clear.
    from latent_ddpm import data

    monkeypatch.setattr(data, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    dataset_from_arrays(*xy).to_parquet(str(tmp_path / "a.parquet"))
    assert_same(load_latents(tmp_path / "a.parquet"), *xy)
    assert [p.name for p in (tmp_path / "cache" / "parquet").rglob("*.arrow")] == ["parquet-train.arrow"]


def test_generic_columns_are_cast(tmp_path, xy):
    # A Parquet file from elsewhere: nested float64 lists in columns X / y, plus an extra column.
    plain = datasets.Dataset.from_dict({"X": xy[0].astype(np.float64).tolist(), "y": xy[1], "id": list(range(N))})
    plain.to_parquet(str(tmp_path / "p.parquet"))
    assert_same(load_latents(tmp_path / "p.parquet", cache_dir=tmp_path / "pq"), *xy)
    arrow = datasets.Dataset.from_dict({"z": xy[0].tolist()})
    arrow.save_to_disk(str(tmp_path / "z"))
    assert_same(load_latents(tmp_path / "z", latent_key="z"), xy[0], None)


def test_hub_id_goes_to_load_dataset(monkeypatch, xy):
    calls = []
    fake = datasets.Dataset.from_dict({"latents": xy[0].tolist(), "labels": xy[1]})
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, split, **kw: calls.append((repo, split)) or fake)
    assert_same(load_latents("someone/latents", split="train"), *xy)
    assert calls == [("someone/latents", "train")]


def test_an_unreachable_hub_id_is_one_error_without_retry_lines(monkeypatch):
    # Offline, huggingface_hub logged a warning per retry (11 lines over 28 s) before the one error line.
    import logging

    http_log = logging.getLogger("huggingface_hub.utils._http")

    retry_lines_shown = []

    def offline(repo, split, **kw):
        retry_lines_shown.append(http_log.isEnabledFor(logging.WARNING))
        raise ConnectionError("Couldn't reach 'someone/latents' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DataError, match="someone/latents: not a local file and cannot be loaded from the hub"):
        load_latents("someone/latents")
    assert retry_lines_shown == [False]
    assert http_log.isEnabledFor(logging.WARNING)  # restored


# ----------------------------------------------------------------------------- conversion

def test_convert_on_a_full_disk_is_one_error_and_keeps_the_old_output(tmp_path, xy, monkeypatch):
    np.savez(tmp_path / "a.npz", X=xy[0], y=xy[1])
    out = tmp_path / "out"
    convert(tmp_path / "a.npz", out)
    before = sorted(p.name for p in out.iterdir())

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", disk_full)
    with pytest.raises(DataError, match="out: cannot write it \\(No space left on device\\); free space"):
        convert(tmp_path / "a.npz", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "out"]  # no temporary folder left


def test_convert_round_trip(tmp_path, xy, monkeypatch):
    np.savez_compressed(tmp_path / "a.npz", X=xy[0], y=xy[1])
    monkeypatch.setattr(validation, "CHUNK_BYTES", 4 * C * H * W * 4)
    out = tmp_path / "out"
    assert data.main(["convert", str(tmp_path / "a.npz"), str(out)]) == 0
    assert_same(datasets.load_from_disk(str(out)), *xy)
    assert_same(load_latents(out), *xy)
    np.save(tmp_path / "b.npy", xy[0])
    with pytest.raises(DataError, match="already exists"):
        convert(tmp_path / "b.npy", out)
    assert_same(convert(tmp_path / "b.npy", out, overwrite=True), xy[0], None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npy", "out"]  # no temp folders left


def test_convert_cli_bad_input_exit_2_nothing_written(tmp_path, capsys):
    # In-process (a subprocess would pay ~10 s of `import latent_ddpm`); same path as `python -m`.
    np.savez(tmp_path / "bad.npz", X=np.zeros((2, 3, 4)))
    with pytest.raises(SystemExit) as info:
        run_cli(data.main, ["convert", str(tmp_path / "bad.npz"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "4-D" in err and "bad.npz" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


def test_convert_nan_fails_after_streaming_and_leaves_nothing(tmp_path, xy, monkeypatch):
    x = xy[0].copy()
    x[7, 2, 1, 3] = np.nan
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(validation, "CHUNK_BYTES", 2 * C * H * W * 4)
    with pytest.raises(DataError, match=r"1 NaN/Inf .* sample 7 at \(channel 2, row 1, col 3\)"):
        convert(tmp_path / "x.npy", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


# ----------------------------------------------------------------------------- errors, one per case

def expect_error(source, match, **kwargs):
    with pytest.raises(DataError, match=match) as info:
        load_latents(source, **kwargs)
    assert isinstance(info.value, UserInputError) and "\n" not in str(info.value)
    return str(info.value)


def test_error_missing_file(tmp_path):
    assert str(tmp_path) in expect_error(tmp_path / "nope.npz", "no such file")


def test_error_unreadable_file(tmp_path):
    (tmp_path / "x.npy").write_bytes(b"definitely not numpy")
    (tmp_path / "x.npz").write_bytes(b"definitely not a zip")
    expect_error(tmp_path / "x.npy", "x.npy: not a readable .npy")
    expect_error(tmp_path / "x.npz", "x.npz: not a readable .npz")


def test_error_truncated_files(tmp_path, xy):
    np.save(tmp_path / "x.npy", xy[0])
    raw = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(raw[:-100])
    expect_error(tmp_path / "x.npy", "truncated")
    with open(tmp_path / "x.npy", "rb") as f:
        header = f.read(128)
    with zipfile.ZipFile(tmp_path / "t.npz", "w") as zf:
        zf.writestr("X.npy", header + raw[128:-100])
    expect_error(tmp_path / "t.npz", "truncated")


def test_error_unknown_format(tmp_path):
    (tmp_path / "x.csv").write_text("1,2,3")
    expect_error(tmp_path / "x.csv", "unknown format '.csv'")
    (tmp_path / "folder").mkdir()
    expect_error(tmp_path / "folder", "not a saved dataset")


def test_error_missing_key_lists_keys(tmp_path, xy):
    np.savez(tmp_path / "a.npz", Z=xy[0], classes=xy[1])
    expect_error(tmp_path / "a.npz", r"no array named 'X' \(nor 'latents'\); the file has \['Z', 'classes'\]")


def test_npz_falls_back_to_the_names_other_formats_take(tmp_path, xy):
    # latents/labels were taken from .safetensors and Arrow sources but refused in a .npz.
    np.savez(tmp_path / "a.npz", latents=xy[0], labels=xy[1])
    x, y = read_back(load_latents(tmp_path / "a.npz"))
    np.testing.assert_array_equal(x, xy[0])
    np.testing.assert_array_equal(y, xy[1])
    np.savez(tmp_path / "b.npz", X=xy[0], latents=xy[0] + 1, y=xy[1], labels=xy[1] + 1)  # the asked-for names first
    x, y = read_back(load_latents(tmp_path / "b.npz"))
    np.testing.assert_array_equal(x, xy[0])
    np.testing.assert_array_equal(y, xy[1])


def test_a_key_the_user_chose_is_looked_for_alone(tmp_path, xy):
    # Falling back to the usual names is for the defaults: a mistyped --latent_key read X, a mistyped --label_key y.
    from safetensors.numpy import save_file

    save_file({"X": xy[0], "y": xy[1]}, str(tmp_path / "a.safetensors"))
    np.savez(tmp_path / "a.npz", X=xy[0], y=xy[1])
    datasets.Dataset.from_dict({"X": xy[0], "y": xy[1]}).save_to_disk(tmp_path / "saved")
    for source, message in ((tmp_path / "a.safetensors", r"no tensor named 'Z'; the file has"),
                            (tmp_path / "a.npz", r"no array named 'Z'; the file has"),
                            (tmp_path / "saved", r"no latents column \(looked for 'Z'\); the columns are")):
        expect_error(source, message, latent_key="Z")
        x, y = read_back(load_latents(source, label_key="nope"))
        np.testing.assert_array_equal(x, xy[0])
        assert y is None, source
        _, y = read_back(load_latents(source, label_key="labels"))  # a usual name still finds the others
        np.testing.assert_array_equal(y, xy[1])


def test_the_hubs_label_column_is_taken(tmp_path, xy):
    # A hub dataset's labels are usually a `label` column (datasets' ClassLabel); it was dropped as "no labels".
    datasets.Dataset.from_dict({"latents": xy[0], "label": xy[1]}).save_to_disk(tmp_path / "saved")
    np.savez(tmp_path / "a.npz", X=xy[0], label=xy[1])
    for source in (tmp_path / "saved", tmp_path / "a.npz"):
        x, y = read_back(load_latents(source))
        np.testing.assert_array_equal(x, xy[0])
        np.testing.assert_array_equal(y, xy[1])


def test_error_not_4d(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 4, 4), np.float32))
    expect_error(tmp_path / "x.npy", r"4-D \(N, C, H, W\), got shape \(5, 4, 4\) \(add a channel axis")


def test_error_integer_dtype(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 1, 4, 4), np.int32))
    expect_error(tmp_path / "x.npy", "floating point, got dtype int32")


def test_error_object_array_never_unpickled(tmp_path):
    obj = np.empty((2, 1, 2, 2), dtype=object)
    np.save(tmp_path / "x.npy", obj, allow_pickle=True)
    np.savez(tmp_path / "x.npz", X=obj)
    expect_error(tmp_path / "x.npy", "Python objects")
    expect_error(tmp_path / "x.npz", "Python objects")


def test_error_nan_inf_count_and_position(tmp_path, xy):
    x = xy[0].copy()
    x[4, 1, 2, 5], x[9, 0, 0, 0] = np.inf, np.nan
    np.savez(tmp_path / "a.npz", X=x)
    expect_error(tmp_path / "a.npz", r"2 NaN/Inf values .* sample 4 at \(channel 1, row 2, col 5\)")
    datasets.Dataset.from_dict({"X": x.tolist()}).to_parquet(str(tmp_path / "p.parquet"))
    expect_error(tmp_path / "p.parquet", "2 NaN/Inf", cache_dir=tmp_path / "pq")
    assert len(load_latents(tmp_path / "p.parquet", cache_dir=tmp_path / "pq", verify=False)) == N  # trusted: no scan


@pytest.mark.parametrize("labels, match", [
    (np.arange(N - 1), r"shape \(10,\) to match 10 latents, got \(9,\)"),
    (np.linspace(0, 1, N), "integers .* got dtype float64"),
    (np.array([0, 1, -2] + [0] * (N - 3)), ">= 0, found -2 at index 2"),
])
def test_error_bad_labels(tmp_path, xy, labels, match):
    np.savez(tmp_path / "a.npz", X=xy[0], y=labels)
    expect_error(tmp_path / "a.npz", match)


def test_error_negative_labels_in_arrow_source(tmp_path, xy):
    datasets.Dataset.from_dict({"X": xy[0].tolist(), "y": [-1] * N}).save_to_disk(str(tmp_path / "d"))
    expect_error(tmp_path / "d", ">= 0, found -1")


def test_error_empty(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((0, 4, 8, 8), np.float32))
    expect_error(tmp_path / "x.npy", "empty")


def test_error_missing_column(tmp_path, xy):
    datasets.Dataset.from_dict({"pixels": xy[0].tolist()}).save_to_disk(str(tmp_path / "d"))
    expect_error(tmp_path / "d", r"no latents column .* the columns are \['pixels'\]")


def test_check_compatible(xy):
    ds = dataset_from_arrays(*xy)
    check_compatible(ds, in_channels=C, downsample_factor=2)
    with pytest.raises(DataError, match="4x6 is not divisible by the model's downsampling factor 4"):
        check_compatible(ds, downsample_factor=4, source="x.npz")
    with pytest.raises(DataError, match="x.npz: latents have 3 channels but the model expects 4"):
        check_compatible(ds, in_channels=4, source="x.npz")


@pytest.mark.parametrize("shape, warns", [((32, 32, 4), True), ((64, 64, 1), True), ((8, 8, 4), False),
                                          ((4, 32, 32), False), ((16, 16, 16), False), ((32, 8, 8), False),
                                          ((8, 1, 64), False)])
def test_channels_last_latents_warn(tmp_path, shape, warns):
    # (N, H, W, C) latents, as TF/JAX save them, trained silently as C=H channels of HxW.
    import warnings

    from latent_ddpm.feeding import load_training_data

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4, *shape)).astype(np.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_training_data(str(tmp_path / "x.npy"))
    said = [str(w.message) for w in caught if "channels-last" in str(w.message)]
    assert len(said) == warns, said
    if warns:
        c, h, w = shape
        assert f"latents of {c}x{h}x{w} look channels-last (N, H, W, C)" in said[0]
        assert "save X.transpose(0, 3, 1, 2) (N, C, H, W) instead" in said[0]
