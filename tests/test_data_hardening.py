"""Hardening of inputs and outputs: outputs that would destroy an input or the working folder, damaged or odd data
files, the Arrow cache, the original's labels and run folders, encoding.json, original checkpoints, run lookup,
upload folders and constant channels. Everything is tiny; train.py runs in this process (dry runs or 2 steps)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import zipfile
import zlib
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState

from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline, convert_original, data, default_scheduler, encode
from latent_ddpm.data import DataError, convert, dataset_from_arrays, load_latents
from latent_ddpm.demo import make_demo_latents
from latent_ddpm.errors import UserInputError, run_cli
from latent_ddpm.feeding import compute_stats
from latent_ddpm.hub import prepare_upload_folder
from latent_ddpm.paths import check_replaceable, replace_with
from latent_ddpm.sampling import locate_run
from latent_ddpm.validation import MAX_CLASS_ID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

N, C, H, W = 8, 4, 8, 8
#: train.py kept small: the tiny preset, no evaluation, no image grids, short previews.
FAST = ["--preset", "tiny", "--train_batch_size", "8", "--num_eval_samples", "0", "--num_preview_samples", "2",
        "--preview_inference_steps", "2", "--save_images_epochs", "0"]
TINY_PIPE_UNET = dict(in_channels=4, down_channels=(8, 16, 16), mid_channels=(16, 16), time_emb_dim=16,
                      down_sample=(True, False), num_heads=2, norm_num_groups=4, head_channels=8, sample_size=8)
#: A tiny original UNet (the original hard-codes GroupNorm(8), 4 heads and a 16-channel last up block).
TINY_ORIGINAL = dict(im_channels=2, down_channels=[16, 32, 32], mid_channels=[32, 32], time_emb_dim=16,
                     down_sample=[True, False], num_down_layers=1, num_mid_layers=1, num_up_layers=1)


def latents(n: int = N, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, C, H, W)).astype(dtype)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (folders too) -> a hash of its content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def reset_accelerate() -> None:
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


def cli(main, argv: list, capfd) -> tuple[int, str, str]:
    """A command's main through run_cli (what its `__main__` does), in this process: (exit status, out, err)."""
    reset_accelerate()
    try:
        code = run_cli(main, [str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    finally:
        reset_accelerate()
    out, err = capfd.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *fragments: str) -> str:
    """Assert exit status 2 and exactly one `error: ...` line on stderr holding every fragment; return the line."""
    lines = err.strip().splitlines()
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def read_back(ds: datasets.Dataset) -> tuple[np.ndarray, np.ndarray | None]:
    view = ds.with_format("numpy")[:]
    return view["latents"], view.get("labels")


# ============================================================================ 1. convert: outputs it must not replace


@pytest.fixture
def npz_dir(tmp_path) -> Path:
    """tmp_path/inputs/ holding in.npz (X, y) and a sibling file."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    np.savez(folder / "in.npz", X=latents(), y=np.arange(N) % 3)
    (folder / "keep.txt").write_text("a sibling of the input")
    return folder


def test_convert_refuses_the_current_folder(npz_dir, monkeypatch, capfd):
    monkeypatch.chdir(npz_dir)
    before = snapshot(npz_dir)
    code, _, err = cli(data.main, ["convert", "in.npz", ".", "--overwrite"], capfd)
    one_line_error(code, err, "is the current folder")
    assert snapshot(npz_dir) == before


def test_convert_refuses_a_folder_above_the_current_one(npz_dir, tmp_path, monkeypatch, capfd):
    work = tmp_path / "project" / "sub"
    work.mkdir(parents=True)
    (tmp_path / "project" / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    code, _, err = cli(data.main, ["convert", npz_dir / "in.npz", "..", "--overwrite"], capfd)
    one_line_error(code, err, "is the current folder or a folder above it")
    code, _, err = cli(data.main, ["convert", npz_dir / "in.npz", tmp_path / "project", "--overwrite"], capfd)
    one_line_error(code, err, "is the current folder or a folder above it")
    assert snapshot(tmp_path) == before and work.is_dir()


def test_convert_refuses_the_input_file_itself(npz_dir, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    before = snapshot(npz_dir)
    code, _, err = cli(data.main, ["convert", npz_dir / "in.npz", npz_dir / "in.npz", "--overwrite"], capfd)
    one_line_error(code, err, "would replace the input")
    assert snapshot(npz_dir) == before


def test_convert_refuses_a_folder_holding_the_input(npz_dir, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    before = snapshot(npz_dir)
    code, _, err = cli(data.main, ["convert", npz_dir / "in.npz", npz_dir, "--overwrite"], capfd)
    one_line_error(code, err, "would replace the input", str(npz_dir / "in.npz"))
    assert snapshot(npz_dir) == before
    assert (npz_dir / "in.npz").is_file() and (npz_dir / "keep.txt").read_text() == "a sibling of the input"


def test_convert_refuses_the_labels_file(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "x.npy", latents())
    np.save(tmp_path / "y.npy", np.arange(N))
    before = snapshot(tmp_path)
    code, _, err = cli(data.main, ["convert", "x.npy", "y.npy", "--labels_file", "y.npy", "--overwrite"], capfd)
    one_line_error(code, err, "would replace the input y.npy")
    assert snapshot(tmp_path) == before


def test_convert_output_under_a_regular_file_names_it(npz_dir, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    before = snapshot(tmp_path)
    code, _, err = cli(data.main, ["convert", npz_dir / "in.npz", blocker / "deeper" / "out"], capfd)
    one_line_error(code, err, f"{blocker} is a file, not a folder")
    assert snapshot(tmp_path) == before


def test_convert_overwrite_replaces_a_previous_output(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    first, second = latents(seed=1), latents(seed=2)
    np.savez(tmp_path / "a.npz", X=first, y=np.zeros(N, np.int64))
    np.savez(tmp_path / "b.npz", X=second, y=np.arange(N))
    out = tmp_path / "results" / "ds"
    code, _, err = cli(data.main, ["convert", "a.npz", out], capfd)
    assert code == 0, err
    assert np.array_equal(read_back(datasets.load_from_disk(str(out)))[0], first)
    code, _, err = cli(data.main, ["convert", "b.npz", out], capfd)
    one_line_error(code, err, "already exists; pass --overwrite")
    code, _, err = cli(data.main, ["convert", "b.npz", out, "--overwrite"], capfd)
    assert code == 0, err
    x, y = read_back(datasets.load_from_disk(str(out)))
    assert np.array_equal(x, second) and np.array_equal(y, np.arange(N))
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds"]  # no .ds.replaced-* or .ds.tmp-* left
    # The function too, over a previous output that is a file.
    (tmp_path / "results" / "file_out").write_text("old")
    ds = convert(tmp_path / "a.npz", tmp_path / "results" / "file_out", overwrite=True)
    assert np.array_equal(read_back(ds)[0], first) and (tmp_path / "results" / "file_out").is_dir()
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds", "file_out"]


def test_convert_function_raises_user_input_error(npz_dir, monkeypatch):
    monkeypatch.chdir(npz_dir)
    with pytest.raises(UserInputError, match="is the current folder"):
        convert("in.npz", ".", overwrite=True)
    with pytest.raises(UserInputError, match="would replace the input"):
        convert(npz_dir / "in.npz", npz_dir / "in.npz", overwrite=True)
    assert (npz_dir / "in.npz").is_file() and (npz_dir / "keep.txt").is_file()


# ---------------------------------------------------------------------------- latent_ddpm.paths


def test_check_replaceable(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    src = tmp_path / "data" / "x.npz"
    src.parent.mkdir()
    src.write_bytes(b"x")
    monkeypatch.chdir(work)
    ok = check_replaceable(tmp_path / "out", "--output", [src, None, tmp_path / "missing"])
    assert ok == tmp_path / "out" and isinstance(ok, Path)
    assert check_replaceable("sub/out", "--output") == Path("sub/out")  # below the current folder: fine
    for bad in (".", work, "..", tmp_path / "a", tmp_path):
        with pytest.raises(UserInputError, match=r"^--output .*: is the current folder or a folder above it"):
            check_replaceable(bad, "--output", [src])
    for bad in (src, src.parent, tmp_path / "data" / ".." / "data"):
        with pytest.raises(UserInputError, match=r"^--flag .*would replace the input"):
            check_replaceable(bad, "--flag", [src])


def test_replace_with_a_file_over_a_folder(tmp_path):
    out = tmp_path / "out"
    (out / "inner").mkdir(parents=True)
    (out / "inner" / "old.txt").write_text("old")
    new = tmp_path / "staging" / "new.bin"
    new.parent.mkdir()
    new.write_bytes(b"new")
    replace_with(new, out)
    assert out.is_file() and out.read_bytes() == b"new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "staging"]  # the aside copy is gone


def test_replace_with_a_folder_over_a_folder_and_onto_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new = tmp_path / "staging" / "new"
    new.mkdir(parents=True)
    (new / "fresh.txt").write_text("fresh")
    replace_with(new, out)
    assert sorted(p.name for p in out.iterdir()) == ["fresh.txt"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "staging"]
    assert not list(tmp_path.glob(".out.replaced-*"))
    other = tmp_path / "staging" / "file"
    other.write_text("into a new place")
    replace_with(other, tmp_path / "fresh")
    assert (tmp_path / "fresh").read_text() == "into a new place" and not other.exists()


# ============================================================================ 2. encode: outputs it must not replace


@pytest.fixture
def image_dir(tmp_path) -> Path:
    root = tmp_path / "data" / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        (root / name / "0.png").write_bytes(b"\x89PNG not really an image")
    return root


@pytest.fixture
def nothing_heavy(monkeypatch):
    """encode must refuse before it opens the images or loads the autoencoder."""
    def loaded(*args, **kwargs):
        raise AssertionError("loaded data or the autoencoder before checking --output")

    monkeypatch.setattr(encode, "load_vae", loaded)
    monkeypatch.setattr(encode, "open_image_dataset", loaded)


@pytest.mark.parametrize("output, message", [
    (lambda root, work: root, "would replace the input"),
    (lambda root, work: root.parent, "would replace the input"),
    (lambda root, work: root / "cat", "is inside the input folder"),
    (lambda root, work: ".", "is the current folder"),
    (lambda root, work: work.parent, "is the current folder or a folder above it"),
], ids=["the-data-folder", "a-folder-holding-it", "inside-it", "dot", "above-cwd"])
def test_encode_refuses_outputs_that_would_destroy_inputs(image_dir, tmp_path, monkeypatch, capfd, nothing_heavy,
                                                          output, message):
    work = tmp_path / "elsewhere" / "cwd"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    argv = ["--data", image_dir, "--vae", tmp_path / "no_vae_here", "--resolution", "16", "--output",
            output(image_dir, work), "--cache_dir", work / "hf", "--overwrite"]
    code, _, err = cli(encode.main, argv, capfd)
    one_line_error(code, err, "--output", message)
    assert snapshot(tmp_path) == before


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


# ============================================================================ 7-9. train.py


@pytest.fixture(scope="module")
def demo_x() -> np.ndarray:
    x, _ = make_demo_latents(num_samples=16, seed=0, size=8)
    return x


@pytest.mark.parametrize("labels, message", [
    (lambda n: np.arange(n, dtype=np.float32) + 0.5, "labels must be integers"),
    (lambda n: np.arange(n, dtype=np.int64)[:, None], "labels must have shape (16,) to match 16 latents"),
    (lambda n: np.array([f"class{i % 3}" for i in range(n)]), "labels must be integers"),
], ids=["float", "2d", "strings"])
def test_train_ignores_the_originals_labels_unless_class_conditional(demo_x, tmp_path, capfd, labels, message):
    path = tmp_path / "original.npz"
    np.savez(path, X=demo_x, y=labels(len(demo_x)))
    base = ["--train_data", path, "--output_dir", tmp_path / "run", "--dry_run", *FAST]
    code, out, err = cli(train.main, base, capfd)
    assert code == 0, err[-3000:]
    assert "dry run, nothing written" in out and "16 latents of 4x8x8" in out
    code, _, err = cli(train.main, [*base, "--class_conditional"], capfd)
    one_line_error(code, err, "original.npz[y]", message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("old_file", ["model.pth", "ddpm_epoch_10.pt"])
def test_train_refuses_a_run_folder_of_the_original(demo_x, tmp_path, capfd, old_file):
    path = tmp_path / "demo.npz"
    np.savez(path, X=demo_x)
    run_dir = tmp_path / "runs" / "demo_ddpm_4_1000_0.0001_0.02"
    (run_dir / "train").mkdir(parents=True)
    (run_dir / "train" / old_file).write_bytes(b"")
    (run_dir / "train" / "notes.txt").write_text("the original's run")
    before = snapshot(run_dir)
    base = ["--train_data", path, "--output_dir", run_dir, "--max_train_steps", "2", *FAST]
    code, _, err = cli(train.main, base, capfd)
    one_line_error(code, err, "original project", f"train/{old_file}", "--overwrite_output_dir")
    assert snapshot(run_dir) == before
    code, _, err = cli(train.main, [*base, "--overwrite_output_dir"], capfd)
    assert code == 0, err[-3000:]
    assert (run_dir / "pipeline" / "model_index.json").is_file()
    assert (run_dir / "train" / old_file).is_file() and (run_dir / "train" / "notes.txt").is_file()  # beside them
    # That run, started beside them on purpose, resumes like any other (no second --overwrite_output_dir).
    code, out, err = cli(train.main, [*base[:-len(FAST) - 2], "--max_train_steps", "4", *FAST,
                                      "--resume_from_checkpoint", "latest"], capfd)
    assert code == 0 and "resumed from" in out + err, err[-3000:]


@pytest.fixture(scope="module")
def saved_dataset(demo_x, tmp_path_factory) -> Path:
    """A save_to_disk folder made by `python -m latent_ddpm.data convert` (in this process)."""
    root = tmp_path_factory.mktemp("saved")
    np.savez(root / "demo.npz", X=demo_x)
    assert run_cli(data.main, ["convert", str(root / "demo.npz"), str(root / "latents")]) == 0
    return root / "latents"


@pytest.mark.parametrize("text", ["[1, 2]", '{"vae": null}', '{"vae": {"id": 3}}', "{not json"],
                         ids=["list", "null-vae", "numeric-id", "not-json"])
def test_train_refuses_a_malformed_encoding_json(saved_dataset, tmp_path, capfd, text):
    folder = tmp_path / "latents"
    shutil.copytree(saved_dataset, folder)
    (folder / "encoding.json").write_text(text)
    argv = ["--train_data", folder, "--output_dir", tmp_path / "run", "--dry_run", *FAST]
    code, _, err = cli(train.main, argv, capfd)
    one_line_error(code, err, str(folder / "encoding.json"))
    assert not (tmp_path / "run").exists()


def test_train_without_the_encoding_vae_warns_and_saves_no_vae(saved_dataset, tmp_path, capfd, caplog):
    folder = tmp_path / "latents"
    shutil.copytree(saved_dataset, folder)
    (folder / "encoding.json").write_text(json.dumps({"vae": {"id": "/nonexistent/vae"}}))
    out = tmp_path / "run"
    code, stdout, err = cli(train.main, ["--train_data", folder, "--output_dir", out, "--max_train_steps", "2",
                                         *FAST], capfd)
    assert code == 0, err[-3000:]
    text = stdout + err + caplog.text
    warning = next((line for line in text.splitlines() if "cannot be loaded" in line), None)
    assert warning is not None and "encoding.json" in warning and "/nonexistent/vae" in warning, text[-3000:]
    assert (out / "pipeline" / "unet").is_dir() and not (out / "pipeline" / "vae").exists()
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index.get("vae") in (None, [None, None])


# ============================================================================ 10. convert_original


@pytest.mark.parametrize("tensor, message", [
    (lambda: torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "holds NaN/Inf values"),
    (lambda: torch.eye(3).to_sparse(), "is not a plain real tensor"),
    (lambda: torch.zeros(3, dtype=torch.complex64), "is not a plain real tensor"),
    (lambda: torch.zeros(16), "does not match the model config"),
], ids=["nan", "sparse", "complex", "1d-conv-in"])
def test_convert_original_bad_tensors(tmp_path, capfd, tensor, message):
    ckpt = tmp_path / "model.pth"
    torch.save({"conv_in.weight": tensor(), "t_proj.0.weight": torch.zeros(16, 16)}, ckpt)
    code, _, err = cli(convert_original.main, [ckpt, tmp_path / "out"], capfd)
    one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_convert_original_suggested_flags_work_verbatim(original_unet, tmp_path, capfd):
    torch.manual_seed(0)
    model = original_unet.Unet(TINY_ORIGINAL).eval()
    ckpt = tmp_path / "model.pth"
    torch.save(model.state_dict(), ckpt)
    code, _, err = cli(convert_original.main, [ckpt, tmp_path / "out"], capfd)  # the seed preset: wrong
    line = one_line_error(code, err, "The checkpoint's shapes suggest:", "--head_channels 16")
    flags = re.search(r"The checkpoint's shapes suggest: (.*?); pass", line).group(1).split()
    code, _, err = cli(convert_original.main, [ckpt, tmp_path / "out", *flags, "--sample_size", "8"], capfd)
    assert code == 0, err
    ours = AdvancedUNet2DModel.from_pretrained(tmp_path / "out")
    assert ours.config.head_channels == 16 and ours.config.in_channels == 2
    x, t = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 17])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t).sample, model(x, t), atol=1e-5, rtol=1e-4)
    # The flag reaches the model: another width does not fit this checkpoint.
    wrong = [f if f != "16" or flags[i - 1] != "--head_channels" else "8" for i, f in enumerate(flags)]
    assert wrong != flags
    code, _, err = cli(convert_original.main, [ckpt, tmp_path / "out2", *wrong, "--sample_size", "8"], capfd)
    one_line_error(code, err, "does not match the model config")


# ============================================================================ 11. locate_run


def test_locate_run_with_glob_characters_in_the_name(tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / "lat[1]_ddpm_4_1000_0.0001_0.02"
    (run_dir / "pipeline").mkdir(parents=True)
    (runs / "lat1_ddpm_4_1000_0.0001_0.02" / "pipeline").mkdir(parents=True)  # what the glob [1] would match
    assert locate_run("lat[1].npz", runs_dir=runs) == run_dir
    assert locate_run("data/lat[1].npz", runs_dir=runs, n_dim=4, lbeta=1e-4) == run_dir
    assert locate_run("lat1.npz", runs_dir=runs) == runs / "lat1_ddpm_4_1000_0.0001_0.02"
    with pytest.raises(UserInputError, match="no trained run"):
        locate_run("lat[2].npz", runs_dir=runs)


# ============================================================================ 12. hub upload folder


@pytest.mark.parametrize("text", ['{"_class_name": "LatentDDPMPipeline", ', "[1, 2]"], ids=["truncated", "a-list"])
def test_upload_folder_malformed_model_index(tmp_path, text):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text(text)
    with pytest.raises(UserInputError, match=r"model_index\.json") as info:
        prepare_upload_folder(tmp_path / "pipeline", tmp_path / "upload", repo_id="me/model")
    assert not isinstance(info.value, json.JSONDecodeError) and "\n" not in str(info.value)
    assert not (tmp_path / "upload").exists()


def test_upload_folder_leaves_a_malformed_metrics_json_out_of_the_card(tmp_path):
    torch.manual_seed(0)
    pipe = LatentDDPMPipeline(unet=AdvancedUNet2DModel(**TINY_PIPE_UNET), scheduler=default_scheduler())
    pipe.save_pretrained(tmp_path / "pipeline", safe_serialization=True)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.json").write_text('{"final_loss": 0.5, ')
    (tmp_path / "train" / "config.json").write_text(json.dumps({"learning_rate": 0.001}))
    out = prepare_upload_folder(tmp_path / "pipeline", tmp_path / "upload", repo_id="me/model")
    card = (out / "README.md").read_text()
    assert "## Metrics" not in card and "final_loss" not in card
    assert "## Training configuration" in card and "learning_rate: 0.001" in card
    (tmp_path / "train" / "metrics.json").write_text(json.dumps({"final_loss": 0.5}))  # a good one is shown
    out = prepare_upload_folder(tmp_path / "pipeline", tmp_path / "upload2", repo_id="me/model")
    assert "| final_loss | 0.5 |" in (out / "README.md").read_text()


# ============================================================================ 13. constant channels


def test_constant_channel_names_the_train_flag():
    x = latents()
    x[:, 2] = 3.0
    ds = dataset_from_arrays(x)
    with pytest.raises(DataError, match=r"channel\(s\) \[2\] of the latents are constant") as info:
        compute_stats(ds, mode="channel")
    assert "--normalization none" in str(info.value)
    assert compute_stats(ds, mode="none").mode == "none"


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
