"""The float32 cast copy of Arrow sources that need one (float64 lists, int32 labels: the common Hugging Face
layout): it goes under the cache folder, never into the data folder, is reused, and an unwritable cache is one line.
Everything is tiny."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _helpers import N, latents

from latent_ddpm.data import DataError, load_latents


def folder_listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


def test_a_saved_folder_needing_a_cast_is_never_written_to(tmp_path):
    # float64 lists and int32 labels (the common Hugging Face layout) need a cast to float32/int64: datasets wrote
    # that copy into the data folder itself: a traceback (PermissionError) when it is read-only, and a
    # surprise file in a --dry_run ("nothing written"). It goes to the cache folder, and is reused from there.
    import datasets

    x = latents(seed=3).astype(np.float64)
    data, cache = tmp_path / "data", tmp_path / "cache"
    datasets.Dataset.from_dict({"X": x.tolist(), "y": np.arange(N, dtype=np.int32) % 3}).save_to_disk(str(data))
    before = folder_listing(data)
    for _ in range(2):  # the second read reuses the cast copy
        ds = load_latents(data, cache_dir=cache)
        assert ds.features["latents"].dtype == "float32" and ds.features["labels"].dtype == "int64"
        np.testing.assert_array_equal(np.stack(ds.with_format("numpy")["latents"]), x.astype(np.float32))
        np.testing.assert_array_equal(ds.with_format("numpy")["labels"], np.arange(N) % 3)
        assert folder_listing(data) == before
        assert len(list((cache / "casts").iterdir())) == 1


def test_an_unwritable_cast_cache_is_one_line(tmp_path):
    import datasets

    data = tmp_path / "data"
    datasets.Dataset.from_dict({"X": latents(seed=3).astype(np.float64).tolist()}).save_to_disk(str(data))
    (tmp_path / "cache").write_text("a file where the cache folder goes")
    with pytest.raises(DataError, match=r"cannot write its float32 copy under .*cache/casts .*LATENT_DDPM_CACHE"):
        load_latents(data, cache_dir=tmp_path / "cache")


def test_a_hub_source_casts_into_the_given_cache(tmp_path, monkeypatch):
    import datasets

    saved = tmp_path / "hub_copy"  # what load_dataset returns: file-backed, float64 lists
    datasets.Dataset.from_dict({"X": latents(seed=5).astype(np.float64).tolist()}).save_to_disk(str(saved))
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: datasets.load_from_disk(str(saved)))
    ds = load_latents("owner/latents", cache_dir=tmp_path / "mycache")
    assert ds.features["latents"].dtype == "float32" and len(list((tmp_path / "mycache" / "casts").iterdir())) == 1
