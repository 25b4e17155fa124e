"""sample.py's output lock and --overwrite: a live lock refuses, a stale one is taken over, none is left after a run,
an interrupted run's leftovers are removed and a live run's kept; --overwrite removes what sample.py wrote before and
the new run does not rewrite, and never a file it did not write or the data.

sample.py runs in this process through `run_cli` (loaded from its file, as tests/test_sample.py does), on tiny
pipelines (4x8x8 latents, 2 denoising steps).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import SAMPLE_FAST as FAST
from _helpers import load_npz, one_error_line, sample_script
from _helpers import run_sample as run

from latent_ddpm import paths

# --- 1. the output lock -----------------------------------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def lock_of(out: Path) -> Path:
    return paths.partial_path(out).with_suffix(".lock")


def test_live_lock_refuses(pipes, tmp_path, capsys):
    out = tmp_path / "x.npz"
    lock = lock_of(out)
    mine = f"{socket.gethostname()} {os.getpid()}"  # this test process: alive
    lock.write_text(mine)
    assert run(["--model", pipes / "uncond", "--output", out, "--no_grid", *FAST]) == 2
    line = one_error_line(capsys)
    assert "in use by another sample.py" in line and str(os.getpid()) in line, line
    assert not out.exists() and not paths.partial_path(out).exists()
    assert lock.read_text() == mine  # another writer's lock is left alone


def test_stale_lock_is_taken_over_and_released(pipes, tmp_path):
    out = tmp_path / "x.npz"
    lock = lock_of(out)
    lock.write_text(f"{socket.gethostname()} {dead_pid()}")  # a process that has exited
    assert run(["--model", pipes / "uncond", "--output", out, "--no_grid", *FAST]) == 0
    assert load_npz(out)["samples"].shape == (2, 4, 8, 8)
    assert not os.path.lexists(lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]  # no lock, partial or temporary left


def test_no_lock_remains_after_a_run(pipes, tmp_path):
    out = tmp_path / "x.npz"
    assert run(["--model", pipes / "uncond", "--output", out, *FAST]) == 0
    assert not os.path.lexists(lock_of(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz", "x.png"]



def test_another_outputs_abandoned_partial_is_removed_a_live_one_kept(pipes, tmp_path, capsys):
    # A run killed while writing old.npz left its hidden gathering file, work folder and (stale) lock; a run
    # writing busy.npz is alive. A run with another --output removes only the abandoned leftovers.
    old, busy = tmp_path / "old.npz", tmp_path / "busy.npz"
    for out, pid in ((old, dead_pid()), (busy, os.getpid())):
        paths.partial_path(out).write_bytes(b"\0" * 1000)
        lock_of(out).write_text(f"{socket.gethostname()} {pid}")
    (tmp_path / ".old_images.partial").mkdir()
    (tmp_path / ".old_images.partial" / "000000.png").write_bytes(b"png")
    assert run(["--model", pipes / "uncond", "--output", tmp_path / "x.npz", "--no_grid", *FAST]) == 0
    assert "removed the unfinished samples of an interrupted run writing old.npz" in capsys.readouterr().err
    assert not paths.partial_path(old).exists() and not (tmp_path / ".old_images.partial").exists()
    assert not os.path.lexists(lock_of(old))  # taken to delete, then released
    assert paths.partial_path(busy).read_bytes() == b"\0" * 1000  # a live run's file is never touched
    assert lock_of(busy).read_text() == f"{socket.gethostname()} {os.getpid()}"


# --- 2. --overwrite and what an earlier run wrote ---------------------------------------------------------------


PNG = b"\x89PNG\r\n\x1a\n and the rest"


@pytest.mark.parametrize("rerun", [["--no_grid"], []], ids=["no-grid", "grid-without-decode"])
def test_overwrite_removes_what_the_new_run_does_not_rewrite(pipes, tmp_path, capsys, rerun):
    # An earlier run's grid and decoded images would sit beside other samples: --overwrite replaces the whole set.
    out = tmp_path / "x.npz"
    assert run(["--model", pipes / "uncond", "--output", out, *FAST]) == 0
    (tmp_path / "x_images").mkdir()  # as --decode writes them
    (tmp_path / "x_images" / "000000.png").write_bytes(PNG)
    (tmp_path / "x_images.png").write_bytes(PNG)
    capsys.readouterr()
    assert run(["--model", pipes / "uncond", "--output", out, "--overwrite", *rerun, *FAST]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == (["x.npz"] if rerun else ["x.npz", "x.png"])
    assert f"note: removed {tmp_path / 'x_images'}, from an earlier run writing x.npz" in capsys.readouterr().err


def test_overwrite_never_removes_files_sample_py_did_not_write(pipes, tmp_path):
    # The first version removed <stem>.png and <stem>_images/ under --overwrite whatever they held, even with no
    # earlier output: a user's photos went with no word.
    (tmp_path / "cat_images").mkdir()
    (tmp_path / "cat_images" / "photo.jpg").write_bytes(b"precious")
    (tmp_path / "cat.png").write_bytes(PNG)
    (tmp_path / "cat_images.png").write_bytes(b"not a PNG")
    argv = ["--model", pipes / "uncond", "--output", tmp_path / "cat.npz", "--overwrite", "--no_grid", *FAST]
    assert run(argv) == 0  # no earlier cat.npz: nothing beside it is this command's
    assert run(argv) == 0  # an earlier cat.npz: still, a folder holding a .jpg and a non-PNG file are not its own
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.npz", "cat_images", "cat_images.png"]
    assert (tmp_path / "cat_images" / "photo.jpg").read_bytes() == b"precious"


def test_only_sample_pys_own_files_count_as_an_earlier_output(tmp_path):
    ours = sample_script.written_by_sample_py
    (tmp_path / "x.png").write_bytes(PNG)
    (tmp_path / "x_images").mkdir()
    (tmp_path / "x_images" / "000000.png").write_bytes(PNG)
    assert ours(tmp_path / "x.png") and ours(tmp_path / "x_images")
    (tmp_path / "empty_images").mkdir()  # an empty folder, a folder named like a grid, PNG names without PNGs
    (tmp_path / "d.png").mkdir()
    (tmp_path / "d.png" / "000000.png").write_bytes(PNG)
    (tmp_path / "fake_images").mkdir()
    (tmp_path / "fake_images" / "000000.png").write_bytes(b"my notes")
    (tmp_path / "link_images").symlink_to(tmp_path / "x_images")
    for name in ("empty_images", "d.png", "fake_images", "link_images", "missing.png"):
        assert not ours(tmp_path / name), name


def test_overwrite_never_removes_the_data_as_a_stale_output(pipes, tmp_path):
    data = tmp_path / "x_images"  # a saved-dataset folder named like --output's decoded images
    data.mkdir()
    (data / "dataset_info.json").write_text("{}")
    (tmp_path / "runs" / "x_images_ddpm_4_1000_0.0001_0.02").mkdir(parents=True)  # the run --latent finds
    (tmp_path / "runs" / "x_images_ddpm_4_1000_0.0001_0.02" / "pipeline").symlink_to(pipes / "uncond")
    argv = ["--latent", data, "--runs_dir", tmp_path / "runs", "--output", tmp_path / "x.npz", "--overwrite", *FAST]
    assert run(argv) == 0 and run(argv) == 0  # the second over an earlier x.npz
    assert (data / "dataset_info.json").read_text() == "{}"
