"""Hardening of sample.py and `python -m latent_ddpm.evaluate`: bad flags, outputs that cannot or must not be
written, the output lock, broken saved pipelines, the split of samples between processes, and samples files the
metrics cannot use. Every refusal is exit status 2 with exactly one `error:` line on stderr and writes nothing.

Both commands run in this process through `run_cli` (sample.py loaded from its file, as tests/test_sample.py
does), on tiny pipelines (4x8x8 latents, 2 denoising steps).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import exit_status, save_tiny_pipelines
from accelerate.state import PartialState
from diffusers import DDPMScheduler

from latent_ddpm import default_scheduler, evaluate, paths
from latent_ddpm.errors import UserInputError
from latent_ddpm.pipeline import default_inference_steps
from latent_ddpm.sampling import SCHEDULERS, load_pipeline, make_scheduler, scheduler_problem

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sample_hardening_script", ROOT / "sample.py")
sample_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_script)

FAST = ["--num_inference_steps", "2", "--num_samples", "2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """An unconditional pipeline in uncond/ and a 3-class one in cond/ (tiny UNets, 4x8x8 latents)."""
    root = tmp_path_factory.mktemp("hardening_models")
    save_tiny_pipelines([(root / "uncond", None), (root / "cond", 3)])
    return root


def run(argv) -> int:
    """sample.py's main through run_cli, as its __main__ runs it: the exit status."""
    return exit_status(sample_script.main, argv)


def run_evaluate(argv) -> int:
    """`python -m latent_ddpm.evaluate argv` in this process: the exit status."""
    return exit_status(evaluate.main, argv)


def one_error_line(capsys) -> str:
    """The single `error:` line on stderr (asserting that there is exactly one)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0], lines
    return lines[0]


def load(path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture
def no_loading(monkeypatch):
    """Make loading the pipeline fail the test: a refusal must come before any model is loaded or sampled."""
    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was loaded: the refusal came too late")

    monkeypatch.setattr(sample_script, "load_pipeline", refuse)


def no_outputs(folder: Path, output: Path) -> None:
    """Neither the output, its grid, its gathering file nor its lock exists."""
    partial = paths.partial_path(output)
    for path in (output, output.with_suffix(".png"), partial, partial.with_suffix(".lock")):
        assert not os.path.lexists(path), path


# --- 1. --eta and --guidance_scale ------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", ["1.5", "-0.5", "nan", "inf"])
def test_eta_outside_0_1_is_refused(models, tmp_path, capsys, no_loading, eta):
    out = tmp_path / "x.npz"
    assert run(["--model", models / "uncond", "--scheduler", "ddim", f"--eta={eta}", "--output", out, *FAST]) == 2
    line = one_error_line(capsys)
    assert "--eta must be in [0, 1]" in line, line
    no_outputs(tmp_path, out)


@pytest.mark.parametrize("eta", ["0", "1"])
def test_eta_at_the_bounds_is_accepted(models, tmp_path, eta):
    out = tmp_path / "x.npz"
    assert run(["--model", models / "uncond", "--scheduler", "ddim", "--eta", eta, "--output", out, "--no_grid",
                *FAST]) == 0
    assert np.isfinite(load(out)["samples"]).all()


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("labels", [["--class_labels", "0", "1"], []], ids=["labelled", "unlabelled"])
def test_non_finite_guidance_scale_is_refused(models, tmp_path, capsys, no_loading, scale, labels):
    """Refused as not finite, with or without --class_labels (before the 'needs --class_labels' check)."""
    out = tmp_path / "x.npz"
    assert run(["--model", models / "cond", f"--guidance_scale={scale}", *labels, "--output", out, *FAST]) == 2
    line = one_error_line(capsys)
    assert "--guidance_scale must be a finite number" in line, line
    no_outputs(tmp_path, out)


# --- 2. outputs that cannot be written ----------------------------------------------------------------------------


def test_output_that_is_a_folder(models, tmp_path, capsys, no_loading):
    out = tmp_path / "x.npz"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run(["--model", models / "uncond", "--output", out, *FAST]) == 2
    line = one_error_line(capsys)
    assert "is a folder" in line and str(out) in line, line
    assert out.is_dir() and (out / "keep.txt").read_text() == "mine"
    assert not paths.partial_path(out).exists()
    # --overwrite does not turn a folder into a file either.
    assert run(["--model", models / "uncond", "--output", out, "--overwrite", *FAST]) == 2
    assert "is a folder" in one_error_line(capsys)
    assert out.is_dir() and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("below", [["x.npz"], ["sub", "deeper", "x.npz"]], ids=["parent", "ancestor"])
def test_output_under_a_regular_file(models, tmp_path, capsys, no_loading, below):
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file")
    out = blocker.joinpath(*below)
    assert run(["--model", models / "uncond", "--output", out, *FAST]) == 2
    line = one_error_line(capsys)
    assert "--output" in line and "is a file, not a folder" in line, line
    assert blocker.read_text() == "a regular file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root can write into any folder whatever its mode")
def test_output_in_an_unwritable_folder(models, tmp_path, capsys, no_loading):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        out = locked / "x.npz"
        assert run(["--model", models / "uncond", "--output", out, *FAST]) == 2
        line = one_error_line(capsys)
        assert "--output" in line and "is not writable" in line, line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_output_in_an_unwritable_folder_simulated(models, tmp_path, capsys, no_loading, monkeypatch):
    """The same refusal where the tests run as root: `os.access` says the folder is not writable."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(paths.os, "access",
                        lambda p, mode, *a, **kw: False if Path(p) == locked else real_access(p, mode, *a, **kw))
    out = locked / "sub" / "x.npz"
    assert run(["--model", models / "uncond", "--output", out, *FAST]) == 2
    line = one_error_line(capsys)
    assert "--output" in line and f"{locked} is not writable" in line, line
    assert list(locked.iterdir()) == []


# --- 3. the grid PNG next to the output -------------------------------------------------------------------------


def test_existing_grid_png_needs_overwrite(models, tmp_path, capsys):
    out, png = tmp_path / "x.npz", tmp_path / "x.png"
    png.write_bytes(b"an older grid, not to be lost")
    argv = ["--model", models / "uncond", "--output", out, *FAST]
    assert run(argv) == 2
    line = one_error_line(capsys)
    assert str(png) in line and "--overwrite" in line, line
    assert png.read_bytes() == b"an older grid, not to be lost"
    assert not out.exists() and not paths.partial_path(out).exists()
    # Without a grid to write, the PNG is no obstacle (and is left alone).
    assert run([*argv, "--no_grid"]) == 0
    assert load(out)["samples"].shape == (2, 4, 8, 8)
    assert png.read_bytes() == b"an older grid, not to be lost"
    out.unlink()
    # With --overwrite the grid is replaced by a real one.
    assert run([*argv, "--overwrite"]) == 0
    assert load(out)["samples"].shape == (2, 4, 8, 8)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- 4. the output lock -----------------------------------------------------------------------------------------


def lock_of(out: Path) -> Path:
    return paths.partial_path(out).with_suffix(".lock")


def test_live_lock_refuses(models, tmp_path, capsys):
    out = tmp_path / "x.npz"
    lock = lock_of(out)
    mine = f"{socket.gethostname()} {os.getpid()}"  # this test process: alive
    lock.write_text(mine)
    assert run(["--model", models / "uncond", "--output", out, "--no_grid", *FAST]) == 2
    line = one_error_line(capsys)
    assert "in use by another sample.py" in line and str(os.getpid()) in line, line
    assert not out.exists() and not paths.partial_path(out).exists()
    assert lock.read_text() == mine  # another writer's lock is left alone


def test_stale_lock_is_taken_over_and_released(models, tmp_path):
    out = tmp_path / "x.npz"
    lock = lock_of(out)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    lock.write_text(f"{socket.gethostname()} {proc.pid}")  # a process that has exited
    assert run(["--model", models / "uncond", "--output", out, "--no_grid", *FAST]) == 0
    assert load(out)["samples"].shape == (2, 4, 8, 8)
    assert not os.path.lexists(lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]  # no lock, partial or temporary left


def test_no_lock_remains_after_a_run(models, tmp_path):
    out = tmp_path / "x.npz"
    assert run(["--model", models / "uncond", "--output", out, *FAST]) == 0
    assert not os.path.lexists(lock_of(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz", "x.png"]


# --- 5. a broken saved scheduler config ---------------------------------------------------------------------------

# (a bad saved setting, what the one line says about it)
BAD_SCHEDULER_CONFIGS = [({"prediction_type": "bogus"}, "prediction_type given as bogus"),
                         ({"beta_end": 2.0}, "non-finite samples"),
                         ({"variance_type": "learned_range"}, "learned variance_type"),
                         ({"steps_offset": -3}, "steps_offset must be >= 0, got -3")]
IDS = [next(iter(c)) for c, _ in BAD_SCHEDULER_CONFIGS]


def copy_pipeline(models: Path, tmp_path: Path, name: str = "uncond") -> Path:
    pipe = tmp_path / "pipe"
    shutil.copytree(models / name, pipe)
    return pipe


def edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("change, reason", BAD_SCHEDULER_CONFIGS, ids=IDS)
def test_bad_saved_scheduler_config_is_one_line(models, tmp_path, capsys, change, reason):
    pipe = copy_pipeline(models, tmp_path)
    edit_json(pipe / "scheduler" / "scheduler_config.json", **change)
    out = tmp_path / "x.npz"
    assert run(["--model", pipe, "--output", out, *FAST]) == 2
    line = one_error_line(capsys)
    assert "scheduler_config.json" in line and reason in line and str(pipe) in line, line
    no_outputs(tmp_path, out)


def test_good_saved_scheduler_config_samples(models, tmp_path):
    """The control for the test above: the same copy, unedited, samples."""
    pipe = copy_pipeline(models, tmp_path)
    edit_json(pipe / "scheduler" / "scheduler_config.json")
    assert run(["--model", pipe, "--output", tmp_path / "x.npz", "--no_grid", *FAST]) == 0


def test_scheduler_problem_directly():
    config = default_scheduler().config
    good = DDPMScheduler.from_config(config)
    for steps in (2, 50, 1000):
        assert scheduler_problem(good, steps) is None, steps
    for change, reason in BAD_SCHEDULER_CONFIGS:
        # As keyword arguments: a key in the config's `_use_default_values` would otherwise be reset.
        bad = DDPMScheduler.from_config(config, **change)
        assert all(getattr(bad.config, k) == v for k, v in change.items()), bad.config
        for steps in (2, 50):
            problem = scheduler_problem(bad, steps)
            assert isinstance(problem, str) and reason in problem, (change, steps, problem)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_problem_passes_every_sampler_at_its_default_steps(name, guided):
    """The check that sample.py runs on every scheduler must not refuse a valid one: each sampler of the table,
    built from a trained pipeline's config, at its default step count, guided or not."""
    scheduler = make_scheduler(name, default_scheduler().config, guided=guided)
    assert scheduler_problem(scheduler, default_inference_steps(scheduler)) is None


def test_scheduler_problem_keeps_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert scheduler_problem(DDPMScheduler.from_config(default_scheduler().config), 5) is None
    assert torch.equal(torch.rand(3), expected)


# --- 6. model_index.json statistics that do not match the UNet -----------------------------------------------------


@pytest.mark.parametrize("name", ["latents_mean", "latents_std"])
def test_latent_stats_of_the_wrong_length(models, tmp_path, capsys, name):
    pipe = copy_pipeline(models, tmp_path)
    edit_json(pipe / "model_index.json", **{name: [0.0, 1.0, 2.0]})  # 3 values, 4 channels
    with pytest.raises(UserInputError, match=rf"model_index.json's {name} has 3 values but the UNet has 4"):
        load_pipeline(str(pipe))
    out = tmp_path / "x.npz"
    assert run(["--model", pipe, "--output", out, *FAST]) == 2
    line = one_error_line(capsys)
    assert "model_index.json" in line and name in line, line
    no_outputs(tmp_path, out)


def test_latent_stats_of_one_value_or_one_per_channel_load(models, tmp_path):
    pipe = copy_pipeline(models, tmp_path)
    assert load_pipeline(str(pipe)).config.latents_mean == [0.0, 1.0, 2.0, 3.0]  # 4 values, as saved
    edit_json(pipe / "model_index.json", latents_mean=[1.5])
    assert load_pipeline(str(pipe)).config.latents_mean == [1.5]


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
def test_written_labels_follow_the_cycle(models, tmp_path, cycle, n, batch):
    out = tmp_path / "x.npz"
    assert run(["--model", models / "cond", "--class_labels", *cycle, "--num_samples", n, "--batch_size", batch,
                "--num_inference_steps", 2, "--no_grid", "--output", out]) == 0
    got = load(out)
    np.testing.assert_array_equal(got["labels"], [cycle[i % len(cycle)] for i in range(n)])
    assert got["labels"].dtype == np.int64 and got["samples"].shape == (n, 4, 8, 8)


# --- 9.-12. python -m latent_ddpm.evaluate ---------------------------------------------------------------------------


def _latents(n, shape=(4, 8, 8), seed=0):
    return (np.random.default_rng(seed).normal(size=(n, *shape)) * 2.0 + 1.0).astype(np.float32)


@pytest.fixture
def ev(tmp_path):
    """A 40-latent labelled reference and a good 20-sample file; `argv(samples, *extra)` builds a command line."""
    np.savez(tmp_path / "ref.npz", X=_latents(40), y=np.arange(40) % 2)
    np.savez(tmp_path / "good.npz", samples=_latents(20, seed=3), labels=np.arange(20) % 2)

    def argv(samples, *extra):
        return ["--samples", samples, "--reference", tmp_path / "ref.npz", "--num_projections", "16", *extra]

    return types.SimpleNamespace(dir=tmp_path, argv=argv)


def test_evaluate_good_file_works(ev, capsys):
    assert run_evaluate(ev.argv(ev.dir / "good.npz")) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["fd"])


def test_evaluate_truncated_samples(ev, capsys):
    path = ev.dir / "cut.npz"
    shutil.copy(ev.dir / "good.npz", path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    assert run_evaluate(ev.argv(path)) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "not a readable" in line, line


def damage_member(path: Path, fraction: float, damage: bytes) -> Path:
    """Overwrite the bytes of `path`'s 'samples.npy' zip member at `fraction` of its stored data with `damage`
    (the data starts after the member's local header, whose name and extra-field lengths are read from it)."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("samples.npy")
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + int(info.compress_size * fraction)
    raw[start:start + len(damage)] = damage
    path.write_bytes(bytes(raw))
    return path


def corrupt_stored(tmp_path: Path) -> Path:
    """An uncompressed .npz whose 'samples' data bytes were changed after writing (its CRC no longer matches)."""
    np.savez(tmp_path / "crc.npz", samples=_latents(20, seed=3))
    return damage_member(tmp_path / "crc.npz", 0.5, b"\x5a" * 64)


def corrupt_compressed(tmp_path: Path) -> Path:
    """A compressed .npz whose deflate stream was overwritten in the middle."""
    np.savez_compressed(tmp_path / "deflate.npz", samples=_latents(20, seed=3))
    return damage_member(tmp_path / "deflate.npz", 1 / 3, b"\xff" * 200)


def bad_npy_member(tmp_path: Path) -> Path:
    """A valid zip whose 'samples.npy' member is not a .npy array."""
    path = tmp_path / "member.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("samples.npy", b"\x93NUMPY garbage, not an array header" + bytes(100))
    return path


@pytest.mark.parametrize("make", [corrupt_stored, corrupt_compressed, bad_npy_member])
def test_evaluate_corrupt_member(ev, capsys, make):
    path = make(ev.dir)
    assert run_evaluate(ev.argv(path)) == 2
    line = one_error_line(capsys)
    assert str(path) in line, line


@pytest.mark.parametrize("labels", [np.arange(21) % 2, np.arange(19) % 2, (np.arange(20) % 2)[:, None],
                                    np.zeros((20, 2), np.int64), np.arange(20) + 0.5],
                         ids=["one-more", "one-fewer", "column", "2-d", "float"])
def test_evaluate_bad_labels(ev, capsys, labels):
    path = ev.dir / "labels.npz"
    np.savez(path, samples=_latents(20, seed=3), labels=labels)
    assert run_evaluate(ev.argv(path)) == 2
    line = one_error_line(capsys)
    assert "--samples" in line and "labels" in line, line


@pytest.mark.parametrize("dtype, ok", [(np.float32, True), (np.float64, True), (np.float16, True),
                                       (np.int64, False), (np.int8, False), (np.uint8, False)])
def test_evaluate_sample_dtype(ev, capsys, dtype, ok):
    path = ev.dir / "typed.npz"
    np.savez(path, samples=(_latents(20, seed=3) * 10).astype(dtype))
    if ok:
        assert run_evaluate(ev.argv(path, "--no_baseline")) == 0
    else:
        assert run_evaluate(ev.argv(path)) == 2
        line = one_error_line(capsys)
        assert "--samples" in line and "floating point" in line, line


def test_evaluate_out_is_the_samples_file(ev, capsys):
    samples = ev.dir / "good.npz"
    before = samples.read_bytes()
    assert run_evaluate(ev.argv(samples, "--out", samples)) == 2
    line = one_error_line(capsys)
    assert "--out" in line and "would replace the input" in line, line
    assert samples.read_bytes() == before


@pytest.mark.parametrize("where", ["folder.json", "folder", "metrics.txt", "metrics"])
def test_evaluate_out_not_a_json_file(ev, capsys, where):
    out = ev.dir / where
    if where.startswith("folder"):
        out.mkdir()
    assert run_evaluate(ev.argv(ev.dir / "good.npz", "--out", out)) == 2
    line = one_error_line(capsys)
    assert "--out" in line and ".json" in line, line
    assert out.is_dir() == where.startswith("folder")
    if out.is_dir():
        assert list(out.iterdir()) == []


def test_evaluate_out_under_a_file(ev, capsys):
    (ev.dir / "a_file").write_text("x")
    assert run_evaluate(ev.argv(ev.dir / "good.npz", "--out", ev.dir / "a_file" / "m.json")) == 2
    line = one_error_line(capsys)
    assert "--out" in line and "is a file" in line, line


def test_evaluate_out_written_and_replaced(ev, capsys):
    out = ev.dir / "m" / "x.json"
    assert run_evaluate(ev.argv(ev.dir / "good.npz", "--out", out)) == 0
    first = json.loads(out.read_text())
    assert first == json.loads(capsys.readouterr().out) and np.isfinite(first["fd"])
    out.write_text("old metrics")
    assert run_evaluate(ev.argv(ev.dir / "good.npz", "--out", out, "--no_baseline")) == 0
    second = json.loads(out.read_text())
    assert "baseline" not in second and second["fd"] == first["fd"]
    assert [p.name for p in out.parent.iterdir()] == ["x.json"]  # no temporary or set-aside file left


@pytest.mark.parametrize("usable, nan", [(1, 0), (2, 0), (3, 0), (1, 9)], ids=["1", "2", "3", "1-of-10"])
def test_evaluate_too_few_usable_samples(ev, capsys, usable, nan):
    x = _latents(usable + nan, seed=3)
    x[usable:, 0, 0, 0] = np.nan
    path = ev.dir / "few.npz"
    np.savez(path, samples=x)
    assert run_evaluate(ev.argv(path)) == 2
    line = one_error_line(capsys)
    assert "--samples" in line and "--k" in line and f"{usable} usable" in line, line


def test_evaluate_four_usable_samples_are_enough(ev, capsys):
    x = _latents(10, seed=3)
    x[4:, 1, 2, 3] = np.nan
    np.savez(ev.dir / "four.npz", samples=x)
    assert run_evaluate(ev.argv(ev.dir / "four.npz", "--no_baseline")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 4 and report["num_nonfinite_samples"] == 6


def test_evaluate_small_reference_needs_no_baseline(ev, capsys):
    np.savez(ev.dir / "ref5.npz", X=_latents(5, seed=9))
    argv = ["--samples", ev.dir / "good.npz", "--reference", ev.dir / "ref5.npz", "--num_projections", "16"]
    assert run_evaluate(argv) == 2
    line = one_error_line(capsys)
    assert "--reference" in line and "--no_baseline" in line, line
    assert run_evaluate([*argv, "--no_baseline"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "baseline" not in report and np.isfinite(report["fd"])
    # Too few even without the baseline: 3 latents and --k 3.
    np.savez(ev.dir / "ref3.npz", X=_latents(3, seed=9))
    assert run_evaluate([*argv[:3], ev.dir / "ref3.npz", *argv[4:], "--no_baseline"]) == 2
    line = one_error_line(capsys)
    assert "--reference" in line and "--k" in line, line


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy on the overflowing features
@pytest.mark.parametrize("signed", [False, True], ids=["positive", "signed"])
@pytest.mark.parametrize("baseline", [[], ["--no_baseline"]], ids=["baseline", "no-baseline"])
def test_evaluate_huge_finite_samples(ev, capsys, signed, baseline):
    """Finite float32 values near its maximum (~3e38) overflow the features: one line, not a LinAlgError."""
    rng = np.random.default_rng(0)
    x = rng.uniform(2.9e38, 3.3e38, size=(20, 4, 8, 8)) * (rng.choice([-1, 1], size=(20, 4, 8, 8)) if signed else 1)
    x = x.astype(np.float32)
    assert np.isfinite(x).all()
    np.savez(ev.dir / "huge.npz", samples=x)
    assert run_evaluate(ev.argv(ev.dir / "huge.npz", *baseline)) == 2
    line = one_error_line(capsys)
    assert "--samples" in line and "cannot be computed" in line, line
