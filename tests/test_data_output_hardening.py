"""Hardening of the outputs of `python -m latent_ddpm.data convert` and `python -m latent_ddpm.encode`: an output
that would destroy an input or the working folder is refused, one under a regular file is named, --overwrite
replaces a previous output whole, a label source convert would not use is refused; and latent_ddpm.paths, which
checks and replaces them. Everything is tiny; the commands run in this process."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from _helpers import N, cli, latents, one_line_error, read_back, snapshot

from latent_ddpm import data, encode
from latent_ddpm.data import convert
from latent_ddpm.errors import UserInputError
from latent_ddpm.paths import check_replaceable, replace_with

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


# ============================================================================ 3. convert: which labels


def test_convert_refuses_a_label_key_the_input_lacks(npz_dir, tmp_path, monkeypatch, capfd):
    # A misspelt --label_key converted without labels and exited 0.
    monkeypatch.chdir(tmp_path)
    one_line_error(*cli(data.main, ["convert", str(npz_dir / "in.npz"), "out", "--label_key", "labels"], capfd)[::2],
                   "has no such array (it has ['X', 'y'])")
    np.save("x.npy", latents())
    one_line_error(*cli(data.main, ["convert", "x.npy", "out", "--label_key", "y"], capfd)[::2],
                   "for a .npy, give the labels with --labels_file")
    assert not Path("out").exists()
    code, _, _ = cli(data.main, ["convert", str(npz_dir / "in.npz"), "out", "--label_key", "y"], capfd)
    assert code == 0 and datasets.load_from_disk("out")["labels"] == list(np.arange(N) % 3)


def test_a_labels_file_beside_npz_labels_is_refused(npz_dir, tmp_path, monkeypatch, capfd):
    # The labels file silently replaced the .npz's own y.
    monkeypatch.chdir(tmp_path)
    np.save("other.npy", np.zeros(N, dtype=np.int64))
    one_line_error(*cli(data.main, ["convert", str(npz_dir / "in.npz"), "out", "--labels_file", "other.npy"],
                        capfd)[::2], "holds its own labels 'y'")
    assert not Path("out").exists()
    for name in ("labels", "label"):  # label_key's fallbacks: the line named 'y', which the file did not hold
        np.savez("named.npz", X=latents(), **{name: np.zeros(N, dtype=np.int64)})
        for args in (["--labels_file", "other.npy"], ["--label_key", name, "--labels_file", "other.npy"]):
            one_line_error(*cli(data.main, ["convert", "named.npz", "out", *args], capfd)[::2],
                           f"holds its own labels '{name}' and a labels file other.npy was given too; use one: drop "
                           f"the labels file, or re-save the .npz without '{name}'")
    np.savez("unlabelled.npz", X=latents())  # an .npz without labels may take them from a file
    assert cli(data.main, ["convert", "unlabelled.npz", "out", "--labels_file", "other.npy"], capfd)[0] == 0
