"""Hardening of data loading (latent_ddpm.data.load_latents): damaged and odd .npy/.npz/Parquet files (zero-size
dimensions, corrupt compressed members, labels that are not class ids, values beyond float32, string, null and
ragged columns), the Arrow cache (when it is used, its key; the cast copy: test_cast_cache.py), constant channels
and the names of in-memory datasets. Everything is tiny."""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _helpers import C, H, N, W, latents, read_back

from latent_ddpm.data import DataError, dataset_from_arrays, load_latents
from latent_ddpm.feeding import compute_stats
from latent_ddpm.validation import MAX_CLASS_ID

# ============================================================================ 3. load_latents: damaged and odd data


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_zero_size_dimension(tmp_path, suffix):
    x = np.zeros((5, 0, 8, 8), np.float32)
    path = tmp_path / f"x{suffix}"
    np.save(path, x) if suffix == ".npy" else np.savez(path, X=x)
    with pytest.raises(DataError, match=r"every dimension of \(N, C, H, W\) must be at least 1, got shape "
                                        r"\(5, 0, 8, 8\)") as info:
        load_latents(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("shape, hint", [
    ((6, 4 * 8 * 8), "(one flat vector per sample: reshape to (N, C, H, W), e.g. X.reshape(len(X), C, H, W)"),
    ((6, 1, 4, 8, 8), "(one axis too many: drop or merge it, e.g. X.squeeze(1) or X.reshape(-1, C, H, W))")])
def test_latents_of_another_rank_say_how_to_reshape(tmp_path, shape, hint):
    # flattened latents (a Parquet column of vectors) or an extra axis: the line says what to save instead
    flat = np.zeros(shape, np.float32).reshape(6, -1)
    pq.write_table(pa.table({"latents": flat.tolist()}), tmp_path / "flat.parquet")
    np.savez(tmp_path / "x.npz", X=np.zeros(shape, np.float32))
    for path in [tmp_path / "x.npz", *([tmp_path / "flat.parquet"] if len(shape) == 2 else [])]:
        with pytest.raises(DataError, match=r"latents must be 4-D") as info:
            load_latents(path, cache_dir=tmp_path / "cache")
        assert hint in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("y, hint", [
    (np.eye(3, dtype=np.int64)[np.arange(6) % 3], "; one-hot or score rows? save the class ids, y.argmax(1)"),
    (np.eye(3, dtype=np.float32)[np.arange(6) % 3], "; one-hot or score rows? save the class ids, y.argmax(1)"),
    (np.zeros((6, 1), np.int64), "; save them as y.reshape(-1)")])
def test_labels_of_shape_n_by_k_say_what_to_save(tmp_path, y, hint):
    np.savez(tmp_path / "x.npz", X=np.zeros((6, 4, 8, 8), np.float32), y=y)
    with pytest.raises(DataError, match=r"labels must have shape \(6,\) to match 6 latents") as info:
        load_latents(tmp_path / "x.npz")
    assert str(info.value).endswith(hint)


def corrupt_deflate_member(path: Path, member: str) -> None:
    """Make the middle of a compressed member's data an invalid deflate block, so that zlib raises there.

    The member's first half is re-compressed and byte-aligned with a full flush; the next byte starts a block
    of the reserved type 3 ("invalid block type"); the rest of the original compressed bytes follow."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info, plain = zf.getinfo(member), zf.read(member)
    assert info.compress_type == zipfile.ZIP_DEFLATED
    o = info.header_offset
    start = o + 30 + int.from_bytes(raw[o + 26:o + 28], "little") + int.from_bytes(raw[o + 28:o + 30], "little")
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    stream = comp.compress(plain[: len(plain) // 2]) + comp.flush(zlib.Z_FULL_FLUSH) + b"\x07"
    assert len(stream) < info.compress_size
    raw[start:start + len(stream)] = stream
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("cached", [False, True], ids=["in-memory", "arrow-cache"])
def test_corrupt_compressed_npz_is_a_data_error(tmp_path, cached):
    x = np.random.default_rng(0).integers(0, 4, (N, C, H, W)).astype(np.float32)  # compressible: Huffman blocks
    path = tmp_path / "c.npz"
    np.savez_compressed(path, X=x, y=np.arange(N))
    corrupt_deflate_member(path, "X.npy")
    with zipfile.ZipFile(path) as zf, pytest.raises(zlib.error):  # the damage is one that zlib itself reports
        zf.read("X.npy")
    kwargs = dict(in_memory_max_bytes=0, cache_dir=tmp_path / "cache") if cached else {}
    with pytest.raises(DataError, match=r"c\.npz\[X\]: .*corrupt") as info:
        load_latents(path, **kwargs)
    assert "\n" not in str(info.value)
    assert not cached or not list((tmp_path / "cache").glob("*.arrow"))  # nothing half-written is kept


def test_uint64_labels_beyond_int64_are_refused(tmp_path):
    y = np.zeros(N, np.uint64)
    y[3] = 2**63 + 5
    np.savez(tmp_path / "a.npz", X=latents(), y=y)
    with pytest.raises(DataError, match=rf"label {2**63 + 5} at index 3 is not a class id"):
        load_latents(tmp_path / "a.npz")


def test_labels_above_max_class_id_are_refused(tmp_path):
    y = np.arange(N)
    y[6] = MAX_CLASS_ID + 1
    np.savez(tmp_path / "a.npz", X=latents(), y=y)
    with pytest.raises(DataError, match=rf"label {MAX_CLASS_ID + 1} at index 6 .*largest allowed is {MAX_CLASS_ID}"):
        load_latents(tmp_path / "a.npz")
    y[6] = MAX_CLASS_ID  # the largest allowed id itself loads
    np.savez(tmp_path / "b.npz", X=latents(), y=y)
    assert read_back(load_latents(tmp_path / "b.npz"))[1][6] == MAX_CLASS_ID


def test_labels_above_max_class_id_in_parquet(tmp_path):
    x = latents()
    pq.write_table(pa.table({"latents": [s.tolist() for s in x],
                             "labels": pa.array([0, 1, MAX_CLASS_ID + 7, 2, 0, 1, 2, 0], pa.int64())}),
                   tmp_path / "big_label.parquet")
    with pytest.raises(DataError, match=rf"label {MAX_CLASS_ID + 7} at index 2 is not a class id"):
        load_latents(tmp_path / "big_label.parquet", cache_dir=tmp_path / "hf")


@pytest.mark.parametrize("cached", [False, True], ids=["in-memory", "arrow-cache"])
def test_float64_beyond_float32_range(tmp_path, cached):
    x = latents(dtype=np.float64)
    x[2, 1, 3, 4] = 1e300
    np.save(tmp_path / "x.npy", x)
    kwargs = dict(in_memory_max_bytes=0, cache_dir=tmp_path / "cache") if cached else {}
    with pytest.raises(DataError, match=r"1 values are beyond float32's range .* the first in sample 2") as info:
        load_latents(tmp_path / "x.npy", **kwargs)
    assert "NaN" not in str(info.value)


def nested(x: np.ndarray) -> list:
    return [s.tolist() for s in x]


def parquet(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_string_latents(tmp_path):
    path = parquet(tmp_path / "s.parquet", latents=pa.array([f"sample {i}" for i in range(N)]))
    with pytest.raises(DataError, match=r"latents column 'latents' must hold floating-point arrays"):
        load_latents(path, cache_dir=tmp_path / "hf")


def test_parquet_string_labels(tmp_path):
    path = parquet(tmp_path / "s.parquet", latents=nested(latents()), labels=pa.array(["cat", "dog"] * (N // 2)))
    with pytest.raises(DataError, match=r"labels column 'labels' must hold one integer class id per sample"):
        load_latents(path, cache_dir=tmp_path / "hf")


def test_parquet_labels_with_a_null(tmp_path):
    path = parquet(tmp_path / "n.parquet", latents=nested(latents()),
                   labels=pa.array([0, 1, None, 1, 0, 1, 0, 1], pa.int64()))
    with pytest.raises(DataError, match=r"labels column 'labels' has 1 missing values"):
        load_latents(path, cache_dir=tmp_path / "hf")


@pytest.mark.parametrize("row", [0, 5])
def test_parquet_null_latent_row(tmp_path, row):
    rows = nested(latents())
    rows[row] = None  # a missing sample, not a sample of NaN values
    path = parquet(tmp_path / "n.parquet", latents=rows)
    with pytest.raises(DataError, match=rf"latents column 'latents' has 1 missing samples \(null rows, the first at "
                                        rf"index {row}\)"):
        load_latents(path, cache_dir=tmp_path / "hf")


@pytest.mark.parametrize("row", [0, 5])
def test_parquet_ragged_latents(tmp_path, row):
    x = latents()
    rows = nested(x)
    rows[row] = x[row, :, :, :7].tolist()  # one sample 4x8x7 among 4x8x8 ones
    path = parquet(tmp_path / "r.parquet", latents=rows)
    with pytest.raises(DataError, match=r"cannot be read as one \(C, H, W\) float32 array per sample") as info:
        load_latents(path, cache_dir=tmp_path / "hf")
    assert "\n" not in str(info.value)


def test_parquet_with_no_rows(tmp_path):
    table = pa.table({"latents": nested(latents())}).slice(0, 0)
    pq.write_table(table, tmp_path / "zero.parquet")
    with pytest.raises(DataError, match=r"zero\.parquet: .*(no rows|empty)") as info:
        load_latents(tmp_path / "zero.parquet", cache_dir=tmp_path / "hf")
    assert "\n" not in str(info.value)


def test_parquet_good_file_still_loads(tmp_path):
    x, y = latents(), np.arange(N) % 3
    path = parquet(tmp_path / "good.parquet", latents=nested(x), labels=pa.array(y, pa.int64()))
    got_x, got_y = read_back(load_latents(path, cache_dir=tmp_path / "hf"))
    assert np.array_equal(got_x, x) and np.array_equal(got_y, y)


# ============================================================================ 4-6. the Arrow cache


def arrow_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.arrow")) if folder.is_dir() else []


def test_cache_decision_uses_the_latents_size_not_the_file_size(tmp_path):
    x = np.zeros((64, C, H, W), np.float32)  # 64 KiB of latents in a file of a few hundred bytes
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, X=x)
    nbytes = x.nbytes
    assert path.stat().st_size < 4096 < nbytes
    cache = tmp_path / "cache"
    ds = load_latents(path, cache_dir=cache, in_memory_max_bytes=nbytes)  # exactly fits: in memory
    assert not arrow_files(cache) and not ds.cache_files
    ds = load_latents(path, cache_dir=cache, in_memory_max_bytes=4096)  # the file fits, its latents do not
    assert len(arrow_files(cache)) == 1 and ds.cache_files
    assert np.array_equal(read_back(ds)[0], x)
    other = tmp_path / "cache2"
    load_latents(path, cache_dir=other, in_memory_max_bytes=nbytes - 1)
    assert len(arrow_files(other)) == 1
    load_latents(path, cache_dir=tmp_path / "cache3", in_memory_max_bytes=1 << 30)
    assert not arrow_files(tmp_path / "cache3")


def test_unwritable_cache_folder(tmp_path):
    np.save(tmp_path / "x.npy", latents())
    (tmp_path / "a_file").write_text("not a folder")
    cache = tmp_path / "a_file" / "cache"
    with pytest.raises(DataError) as info:
        load_latents(tmp_path / "x.npy", cache_dir=cache, in_memory_max_bytes=0)
    message = str(info.value)
    assert str(cache) in message and "LATENT_DDPM_CACHE" in message and "\n" not in message


def test_cache_key_covers_the_labels_file(tmp_path):
    x = latents()
    np.save(tmp_path / "x.npy", x)
    labels = tmp_path / "y.npy"
    np.save(labels, np.zeros(N, np.int64))
    cache = tmp_path / "cache"
    first = load_latents(tmp_path / "x.npy", labels_file=labels, in_memory_max_bytes=0, cache_dir=cache)
    assert np.array_equal(read_back(first)[1], np.zeros(N))
    old = labels.stat()
    np.save(labels, np.arange(N, dtype=np.int64))  # same size: only the content and the mtime change
    os.utime(labels, ns=(old.st_atime_ns, old.st_mtime_ns + 5 * 10**9))
    assert labels.stat().st_size == old.st_size and labels.stat().st_mtime_ns != old.st_mtime_ns
    again = load_latents(tmp_path / "x.npy", labels_file=labels, in_memory_max_bytes=0, cache_dir=cache)
    got_x, got_y = read_back(again)
    assert np.array_equal(got_y, np.arange(N)) and np.array_equal(got_x, x)
    assert len(arrow_files(cache)) == 2


# ============================================================================ 13. constant channels


def test_a_constant_channel_is_kept_unscaled_with_a_warning():
    # A padding channel (all zeros) was refused, and the suggested fix (--normalization none) gave up the
    # normalisation of every other channel. It keeps std 1 (centred, not scaled); the others are standardised.
    x = latents()
    x[:, 2] = 3.0
    ds = dataset_from_arrays(x)
    with pytest.warns(UserWarning, match=r"channel\(s\) \[2\] of the latents are constant .* not scaled"):
        stats = compute_stats(ds, mode="channel")
    assert stats.mean[2] == 3.0 and stats.std[2] == 1.0
    z = stats.normalize(torch.from_numpy(x))
    assert torch.all(z[:, 2] == 0) and torch.allclose(z[:, [0, 1, 3]].std(dim=(0, 2, 3), unbiased=False),
                                                      torch.ones(3), atol=1e-5)
    assert torch.allclose(stats.denormalize(z), torch.from_numpy(x), atol=1e-5)


@pytest.mark.parametrize("mode", ["channel", "global"])
def test_all_constant_latents_are_an_error(mode):
    with pytest.raises(DataError, match=r"every value of the latents is the same \(1\.5\)"):
        compute_stats(dataset_from_arrays(np.full((N, C, H, W), 1.5, np.float32)), mode=mode)


def test_in_memory_datasets_are_named_by_their_file_not_hashed(tmp_path):
    """The in-memory path gives the dataset a fingerprint from the file's path, size and mtime (hashing the
    table would copy it): the same for two loads of one file, new when the file changes."""
    x = np.random.default_rng(0).standard_normal((8, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    first, again = load_latents(tmp_path / "x.npy"), load_latents(tmp_path / "x.npy")
    assert first._fingerprint == again._fingerprint
    np.save(tmp_path / "x.npy", x + 1)
    os.utime(tmp_path / "x.npy", ns=(1, 1))
    assert load_latents(tmp_path / "x.npy")._fingerprint != first._fingerprint
    assert dataset_from_arrays(x)._fingerprint != dataset_from_arrays(x)._fingerprint  # arrays: random names


# --- Crafted .npy headers: refused from the header, before numpy allocates what they claim ----------------------


def _header_only(shape, descr="<i8") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_labels_with_a_huge_header_are_refused_before_reading(tmp_path):
    x = latents()
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "lab.npy").write_bytes(_header_only((10**12,)))  # 7 TiB claimed (was a MemoryError)
    with pytest.raises(DataError, match=rf"labels must have shape \({N},\) to match {N} latents, got \(10+,\)"):
        load_latents(tmp_path / "x.npy", labels_file=tmp_path / "lab.npy")
    with zipfile.ZipFile(tmp_path / "xy.npz", "w") as zf:
        zf.writestr("X.npy", _npy_bytes(x))
        zf.writestr("y.npy", _header_only((10**12,)))
    with pytest.raises(DataError, match=r"xy.npz\[y\]: labels must have shape"):
        load_latents(tmp_path / "xy.npz")


def test_an_npz_given_as_labels_file_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", latents())
    np.savez(tmp_path / "lab.npz", y=np.zeros(N, dtype=np.int64))  # was an AttributeError traceback
    with pytest.raises(DataError, match="lab.npz: not a readable .npy array"):
        load_latents(tmp_path / "x.npy", labels_file=tmp_path / "lab.npz")


def test_latents_whose_header_claims_a_giant_sample_are_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "giant.npz", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("X.npy", _header_only((2**62, 2**62, 4, 4), "<f4"))  # was an OverflowError in the reader
    with pytest.raises(DataError, match=r"one sample of shape \(4611686018427387904, 4, 4\) would take more than"):
        load_latents(tmp_path / "giant.npz")


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_convert_no_labels_leaves_an_original_y_out(tmp_path, capsys):
    # The original's `y` need not be class ids (train.py ignores it unless --class_conditional); convert refused
    # such a file, with no way to leave the labels out.
    from _helpers import exit_status

    from latent_ddpm import data

    np.savez(tmp_path / "orig.npz", X=latents(), y=np.random.default_rng(0).standard_normal(N))
    assert exit_status(data.main, ["convert", str(tmp_path / "orig.npz"), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err  # the default y: the message names the way to leave it out
    assert "labels must be integers" in err and err.rstrip().endswith("or pass --no_labels to convert the latents "
                                                                     "without them")
    for key, labels in (("y", np.arange(N) - 1), ("y", np.array(["cat"] * N)),  # negative ids, class names; one-hot
                        ("label", np.eye(3, dtype=np.int64)[np.arange(N) % 3]), ("labels", np.arange(N + 1))):
        np.savez(tmp_path / "other.npz", X=latents(), **{key: labels})
        assert exit_status(data.main, ["convert", str(tmp_path / "other.npz"), str(tmp_path / "a")]) == 2
        assert "--no_labels" in capsys.readouterr().err
    assert exit_status(data.main, ["convert", str(tmp_path / "orig.npz"), str(tmp_path / "a"), "--label_key", "y"]) == 2
    assert "--no_labels" not in capsys.readouterr().err  # labels asked for by name: the fix is to the labels
    assert exit_status(data.main, ["convert", str(tmp_path / "orig.npz"), str(tmp_path / "a"), "--no_labels"]) == 0
    assert load_latents(tmp_path / "a").column_names == ["latents"]
    assert exit_status(data.main, ["convert", str(tmp_path / "orig.npz"), str(tmp_path / "b"), "--no_labels",
                                   "--label_key", "y"]) == 2
