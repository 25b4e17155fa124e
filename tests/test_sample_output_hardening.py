"""Hardening of sample.py's flags and outputs: --eta and --guidance_scale out of range, outputs that cannot be
written (a folder, under a regular file, an unwritable folder), the grid PNG next to the output, an output that is
the data, the split of samples between processes, the labels written to the .npz and a full disk. Every refusal is
exit status 2 with exactly one `error:` line on stderr, comes before any model is loaded, and writes nothing. The
output lock and what --overwrite removes are in test_sample_lock_and_overwrite.py.

sample.py runs in this process through `run_cli` (loaded from its file, as tests/test_sample.py does), on tiny
pipelines (4x8x8 latents, 2 denoising steps).
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
from _helpers import SAMPLE_FAST as FAST
from _helpers import load_npz, no_outputs, one_error_line, sample_script
from _helpers import run_sample as run
from accelerate.state import PartialState

from latent_ddpm import paths
from latent_ddpm.config import TrainConfig


@pytest.fixture
def no_loading(monkeypatch):
    """Make loading the pipeline fail the test: a refusal must come before any model is loaded or sampled."""
    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was loaded: the refusal came too late")

    monkeypatch.setattr(sample_script, "load_pipeline", refuse)


# --- 1. --eta and --guidance_scale ------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", ["1.5", "-0.5", "nan", "inf"])
def test_eta_outside_0_1_is_refused(pipes, tmp_path, capsys, no_loading, eta):
    out = tmp_path / "x.npz"
    assert run(["--model", pipes / "uncond", "--scheduler", "ddim", f"--eta={eta}", "--output", out, *FAST]) == 2
    line = one_error_line(capsys)
    assert "--eta must be in [0, 1]" in line, line
    no_outputs(tmp_path, out)


@pytest.mark.parametrize("eta", ["0", "1"])
def test_eta_at_the_bounds_is_accepted(pipes, tmp_path, eta):
    out = tmp_path / "x.npz"
    assert run(["--model", pipes / "uncond", "--scheduler", "ddim", "--eta", eta, "--output", out, "--no_grid",
                *FAST]) == 0
    assert np.isfinite(load_npz(out)["samples"]).all()


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("labels", [["--class_labels", "0", "1"], []], ids=["labelled", "unlabelled"])
def test_non_finite_guidance_scale_is_refused(pipes, tmp_path, capsys, no_loading, scale, labels):
    """Refused as not finite, with or without --class_labels (before the 'needs --class_labels' check)."""
    out = tmp_path / "x.npz"
    assert run(["--model", pipes / "cond", f"--guidance_scale={scale}", *labels, "--output", out, *FAST]) == 2
    line = one_error_line(capsys)
    assert "--guidance_scale must be a finite number" in line, line
    no_outputs(tmp_path, out)


# --- 2. outputs that cannot be written ----------------------------------------------------------------------------


def test_output_that_is_a_folder(pipes, tmp_path, capsys, no_loading):
    out = tmp_path / "x.npz"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run(["--model", pipes / "uncond", "--output", out, *FAST]) == 2
    line = one_error_line(capsys)
    assert "is a folder" in line and str(out) in line, line
    assert out.is_dir() and (out / "keep.txt").read_text() == "mine"
    assert not paths.partial_path(out).exists()
    # --overwrite does not turn a folder into a file either.
    assert run(["--model", pipes / "uncond", "--output", out, "--overwrite", *FAST]) == 2
    assert "is a folder" in one_error_line(capsys)
    assert out.is_dir() and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("below", [["x.npz"], ["sub", "deeper", "x.npz"]], ids=["parent", "ancestor"])
def test_output_under_a_regular_file(pipes, tmp_path, capsys, no_loading, below):
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file")
    out = blocker.joinpath(*below)
    assert run(["--model", pipes / "uncond", "--output", out, *FAST]) == 2
    line = one_error_line(capsys)
    assert "--output" in line and "is a file, not a folder" in line, line
    assert blocker.read_text() == "a regular file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root can write into any folder whatever its mode")
def test_output_in_an_unwritable_folder(pipes, tmp_path, capsys, no_loading):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        out = locked / "x.npz"
        assert run(["--model", pipes / "uncond", "--output", out, *FAST]) == 2
        line = one_error_line(capsys)
        assert "--output" in line and "is not writable" in line, line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_output_in_an_unwritable_folder_simulated(pipes, tmp_path, capsys, no_loading, monkeypatch):
    """The same refusal where the tests run as root: `os.access` says the folder is not writable."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(paths.os, "access",
                        lambda p, mode, *a, **kw: False if Path(p) == locked else real_access(p, mode, *a, **kw))
    out = locked / "sub" / "x.npz"
    assert run(["--model", pipes / "uncond", "--output", out, *FAST]) == 2
    line = one_error_line(capsys)
    assert "--output" in line and f"{locked} is not writable" in line, line
    assert list(locked.iterdir()) == []


# --- 3. the grid PNG next to the output -------------------------------------------------------------------------


def test_existing_grid_png_needs_overwrite(pipes, tmp_path, capsys):
    out, png = tmp_path / "x.npz", tmp_path / "x.png"
    png.write_bytes(b"an older grid, not to be lost")
    argv = ["--model", pipes / "uncond", "--output", out, *FAST]
    assert run(argv) == 2
    line = one_error_line(capsys)
    assert str(png) in line and "--overwrite" in line, line
    assert png.read_bytes() == b"an older grid, not to be lost"
    assert not out.exists() and not paths.partial_path(out).exists()
    # Without a grid to write, the PNG is no obstacle (and is left alone).
    assert run([*argv, "--no_grid"]) == 0
    assert load_npz(out)["samples"].shape == (2, 4, 8, 8)
    assert png.read_bytes() == b"an older grid, not to be lost"
    out.unlink()
    # With --overwrite the grid is replaced by a real one.
    assert run([*argv, "--overwrite"]) == 0
    assert load_npz(out)["samples"].shape == (2, 4, 8, 8)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_output_never_replaces_the_data(pipes, tmp_path, capsys, no_loading):
    # `--output` on the --latent training data with --overwrite replaced it with samples; data convert, evaluate and
    # encode refuse an output that is one of their inputs, with or without --overwrite.
    data = tmp_path / "x.npz"
    np.savez(data, X=np.zeros((4, 4, 8, 8), np.float32))
    before = data.read_bytes()
    (tmp_path / "runs" / "x_ddpm_4_1000_0.0001_0.02").mkdir(parents=True)  # the run --latent finds
    (tmp_path / "runs" / "x_ddpm_4_1000_0.0001_0.02" / "pipeline").symlink_to(pipes / "uncond")
    assert run(["--latent", data, "--runs_dir", tmp_path / "runs", "--output", data, "--overwrite", *FAST]) == 2
    assert "--output" in (line := one_error_line(capsys)) and f"would replace the input {data}" in line, line
    assert data.read_bytes() == before


@pytest.mark.parametrize("given", ["absolute", "relative"])
def test_output_never_replaces_the_runs_training_data(pipes, tmp_path, capsys, no_loading, monkeypatch, given):
    # With --model RUN (not --latent), --output on the data that RUN was trained on replaced it under --overwrite:
    # the run's train/config.json names that data, absolute even when train.py was given a relative path, so
    # that sample.py run from another folder still finds it.
    data = tmp_path / "x.npz"
    np.savez(data, X=np.zeros((4, 4, 8, 8), np.float32))
    before = data.read_bytes()
    run_dir = tmp_path / "run"
    (run_dir / "train").mkdir(parents=True)
    (run_dir / "pipeline").symlink_to(pipes / "uncond")
    monkeypatch.chdir(tmp_path)  # where train.py ran
    config = TrainConfig(train_data=str(data) if given == "absolute" else "x.npz").to_dict()
    (run_dir / "train" / "config.json").write_text(json.dumps(config))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # where sample.py runs
    assert run(["--model", run_dir, "--output", data, "--overwrite", *FAST]) == 2
    assert f"would replace the input {data}" in one_error_line(capsys)
    assert data.read_bytes() == before




# --- 7. the split of samples between processes ---------------------------------------------------------------------


def accelerate_split(n: int, rank: int, world: int) -> list[int]:
    """What accelerate's own `PartialState.split_between_processes` gives process `rank` of `world`."""
    fake = types.SimpleNamespace(num_processes=world, process_index=rank)
    with PartialState.split_between_processes(fake, list(range(n))) as mine:
        return list(mine)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 16, 17, 100])
def test_process_rows_split_as_accelerate(n, world):
    ranges = [sample_script.process_rows(n, rank, world) for rank in range(world)]
    assert all(isinstance(r, range) and r.step == 1 for r in ranges)
    for rank, rows in enumerate(ranges):
        assert list(rows) == accelerate_split(n, rank, world), (n, world, rank)
        # accelerate's rule, restated: the first n % world ranks take one more.
        assert len(rows) == n // world + (rank < n % world), (n, world, rank)
    # Together they tile 0..n-1 exactly, in order, with no overlap.
    assert [i for rows in ranges for i in rows] == list(range(n))


def test_process_rows_fewer_samples_than_processes():
    ranges = [sample_script.process_rows(3, rank, 8) for rank in range(8)]
    assert [list(r) for r in ranges] == [[0], [1], [2], [], [], [], [], []]


# --- 8. labels in the .npz --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cycle, n, batch", [([2, 0, 1], 7, 3), ([1], 4, 2), ([0, 2], 5, 64)])
def test_written_labels_follow_the_cycle(pipes, tmp_path, cycle, n, batch):
    out = tmp_path / "x.npz"
    assert run(["--model", pipes / "cond", "--class_labels", *cycle, "--num_samples", n, "--batch_size", batch,
                "--num_inference_steps", 2, "--no_grid", "--output", out]) == 0
    got = load_npz(out)
    np.testing.assert_array_equal(got["labels"], [cycle[i % len(cycle)] for i in range(n)])
    assert got["labels"].dtype == np.int64 and got["samples"].shape == (n, 4, 8, 8)


# --- A full disk while sampling: one line, the partial file and the lock gone, an older output kept -------------


def error_line(capsys) -> str:
    """The one `error:` line on stderr (the progress bar shares stderr once sampling has begun)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device", "/simulated/file")


@pytest.mark.parametrize("where", ["rows", "npz"])
def test_a_full_disk_is_one_line_and_keeps_the_old_output(pipes, tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "x.npz"
    assert run(["--model", pipes / "uncond", "--output", out, "--no_grid", *FAST]) == 0
    before = out.read_bytes()
    if where == "rows":
        monkeypatch.setattr(sample_script.NpyRowWriter, "write", _disk_full)
    else:
        monkeypatch.setattr(sample_script, "write_npz", _disk_full)
    capsys.readouterr()
    assert run(["--model", pipes / "uncond", "--seed", 9, "--output", out, "--no_grid",
                "--overwrite", *FAST]) == 2
    line = error_line(capsys)
    assert f"--output {out}: cannot write /simulated/file (No space left on device)" in line, line
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]  # no partial file, no lock


def test_only_a_full_disk_is_told_to_free_space(tmp_path):
    # `--output /proc/x.npz` (No such file or directory) was told to "free space".
    import errno

    full = sample_script.write_error(tmp_path / "x.npz", OSError(errno.ENOSPC, "No space left on device", "f"))
    assert full.endswith("; free space or choose another --output"), full
    missing = sample_script.write_error(tmp_path / "x.npz", OSError(errno.ENOENT, "No such file or directory", "f"))
    assert "free space" not in missing and missing.endswith("choose another --output (a folder you can write)")


def test_a_full_disk_at_the_grid_says_the_samples_are_written(pipes, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample_script, "save_latent_grid", _disk_full)
    out = tmp_path / "x.npz"
    assert run(["--model", pipes / "uncond", "--output", out, *FAST]) == 2
    line = error_line(capsys)
    assert "cannot write /simulated/file (No space left on device); the samples file itself is complete" in line, line
    assert load_npz(out)["samples"].shape[0] == 2


def test_non_finite_samples_are_written_but_said(pipes, tmp_path, capsys):
    out = tmp_path / "x.npz"
    assert run(["--model", pipes / "cond", "--class_labels", "1", "--guidance_scale", "1e308", "--output", out,
                "--no_grid", *FAST]) == 0
    warnings_ = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings_ == ["warning: 2 of this process's 2 samples hold NaN/Inf values (too large a --guidance_scale, "
                         "or a diverged model)"], warnings_
    assert not np.isfinite(load_npz(out)["samples"]).all()
    assert run(["--model", pipes / "cond", "--class_labels", "1", "--output", tmp_path / "y.npz", "--no_grid",
                *FAST]) == 0
    assert "warning: " not in capsys.readouterr().err
