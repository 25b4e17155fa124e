"""Hardening around train.py's runs: train.py on the original's labels and run folders, on a converted pipeline and
on a malformed or unloadable encoding.json, and resuming (a finished run without a usable checkpoint, damage the
checkpoint's marker does not list, other data, another run's checkpoint, an abandoned checkpoint, a checkpoint past
the run's end). Everything is tiny; train.py runs in this process (dry runs or 2-4 steps). convert_original,
locate_run and upload folders are in test_convert_locate_upload_hardening.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import cli, one_line_error, snapshot

from latent_ddpm import data
from latent_ddpm.demo import make_demo_latents
from latent_ddpm.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

#: train.py kept small: the tiny preset, no evaluation, no image grids, short previews.
FAST = ["--preset", "tiny", "--train_batch_size", "8", "--num_eval_samples", "0", "--num_preview_samples", "2",
        "--preview_inference_steps", "2", "--save_images_epochs", "0"]


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
    # "Resume if there is anything to resume" found no checkpoint of ours, and trained beside them unasked.
    code, _, err = cli(train.main, [*base, "--resume_from_checkpoint", "latest"], capfd)
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


@pytest.mark.parametrize("overwrite", [[], ["--overwrite_output_dir"]])
def test_a_converted_pipeline_and_the_users_files_are_never_replaced(demo_x, tmp_path, capfd, overwrite):
    # migration.md saves a converted checkpoint as <run>/pipeline; "already holds a run ... --overwrite_output_dir"
    # was the advice, and following it deleted the converted pipeline (and the user's train/logs/ files).
    path = tmp_path / "demo.npz"
    np.savez(path, X=demo_x)
    run_dir = tmp_path / "runs" / "demo_ddpm_4_1000_0.0001_0.02"
    (run_dir / "train" / "logs").mkdir(parents=True)
    (run_dir / "train" / "model.pth").write_bytes(b"")
    (run_dir / "train" / "logs" / "mine.txt").write_text("the user's")
    (run_dir / "pipeline").mkdir()
    (run_dir / "pipeline" / "model_index.json").write_text("{}")
    before = snapshot(run_dir)
    base = ["--train_data", path, "--output_dir", run_dir, "--max_train_steps", "2", *FAST, *overwrite]
    one_line_error(*cli(train.main, base, capfd)[::2], "pipeline was not written by train.py", "move it elsewhere")
    assert snapshot(run_dir) == before
    # Nor does a resume from another folder's checkpoint (it replaced the converted pipeline).
    other = tmp_path / "other"
    assert cli(train.main, ["--train_data", path, "--output_dir", other, "--max_train_steps", "2", *FAST,
                            "--checkpointing_steps", "2"], capfd)[0] == 0
    one_line_error(*cli(train.main, [*base, "--max_train_steps", "3", "--resume_from_checkpoint",
                                     other / "train" / "checkpoint-2"], capfd)[::2], "was not written by train.py")
    assert snapshot(run_dir) == before
    shutil.move(run_dir / "pipeline", tmp_path / "converted")  # moved: the run trains beside the original's files
    assert cli(train.main, [*base, "--overwrite_output_dir"], capfd)[0] == 0
    assert (run_dir / "train" / "logs" / "mine.txt").read_text() == "the user's"


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


# ============================================================================ 10. resuming a finished run


@pytest.mark.parametrize("damage", ["deleted", "damaged"])
def test_resume_without_a_usable_checkpoint_keeps_a_finished_run(demo_x, tmp_path, capfd, damage):
    # --resume_from_checkpoint latest with every checkpoint deleted (or damaged) trained from scratch and replaced
    # the finished run's pipeline, metrics and figures, with only an INFO line.
    np.savez(tmp_path / "d.npz", X=demo_x)
    run = tmp_path / "run"
    base = ["--train_data", tmp_path / "d.npz", "--output_dir", run, *FAST, "--max_train_steps", "2",
            "--checkpointing_steps", "2"]
    assert cli(train.main, base, capfd)[0] == 0
    for ckpt in (run / "train").glob("checkpoint-*"):
        if damage == "deleted":
            shutil.rmtree(ckpt)
        else:
            (ckpt / "COMPLETE").unlink()
    before = snapshot(run)
    one_line_error(*cli(train.main, [*base, "--resume_from_checkpoint", "latest"], capfd)[::2],
                   "holds a finished run (pipeline/) and no complete checkpoint to resume", "--overwrite_output_dir")
    assert snapshot(run) == before
    shutil.rmtree(run / "pipeline")  # a crashed run's folder: nothing finished to lose, so it starts from scratch
    assert cli(train.main, [*base, "--resume_from_checkpoint", "latest"], capfd)[0] == 0


@pytest.mark.parametrize("damage", ["old_marker_missing_optimizer", "old_marker_missing_ema", "state_without_step",
                                    "nan_weights"])
def test_damage_the_marker_does_not_list_is_skipped(demo_x, tmp_path, capfd, damage):
    # An older marker ("ok") lists no files, so a missing optimizer.bin or ema.safetensors passed the check and
    # accelerate's load_state / load_file raised a traceback; so did a trainer_state.json without global_step.
    from latent_ddpm.checkpointing import checkpoint_problem

    np.savez(tmp_path / "d.npz", X=demo_x)
    run = tmp_path / "run"
    base = ["--train_data", tmp_path / "d.npz", "--output_dir", run, *FAST, "--checkpointing_steps", "1"]
    assert cli(train.main, [*base, "--max_train_steps", "2"], capfd)[0] == 0
    ckpt = run / "train" / "checkpoint-2"
    if damage == "nan_weights":  # same size, so the marker's sizes match; resumed, the run blamed the learning rate
        from safetensors.torch import load_file, save_file

        weights = load_file(ckpt / "model.safetensors")
        save_file({k: torch.full_like(t, float("nan")) for k, t in weights.items()}, ckpt / "model.safetensors")
        marker = json.loads((ckpt / "COMPLETE").read_text())  # checksums that match: the finiteness check acts
        marker["sha256"]["model.safetensors"] = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
        marker["files"]["model.safetensors"] = (ckpt / "model.safetensors").stat().st_size
        (ckpt / "COMPLETE").write_text(json.dumps(marker))
        assert "model.safetensors holds non-finite values" in checkpoint_problem(ckpt)
    elif damage == "state_without_step":
        state = json.loads((ckpt / "trainer_state.json").read_text())
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "global_step": "2"}))
        (ckpt / "COMPLETE").write_text("ok")
    else:
        (ckpt / "COMPLETE").write_text("ok")
        (ckpt / ("optimizer.bin" if damage == "old_marker_missing_optimizer" else "ema.safetensors")).unlink()
    assert checkpoint_problem(ckpt) is not None
    assert checkpoint_problem(run / "train" / "checkpoint-1") is None
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*checkpoint-2"):
        code, out, err = cli(train.main, [*base, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"],
                             capfd)
    assert code == 0, err[-3000:]
    assert "checkpoint-1 at step 1" in out, out[-3000:]


def test_resuming_on_other_data_is_refused(demo_x, tmp_path, capfd):
    # Same shape, other data: accepted silently; the data order (a function of N) and the statistics changed.
    np.savez(tmp_path / "d.npz", X=demo_x)
    np.savez(tmp_path / "more.npz", X=np.concatenate([demo_x, demo_x * 2]))
    run = tmp_path / "run"
    base = ["--output_dir", run, *FAST, "--checkpointing_steps", "2"]
    assert cli(train.main, ["--train_data", tmp_path / "d.npz", *base, "--max_train_steps", "2"], capfd)[0] == 0
    before = snapshot(run)
    resumed = cli(train.main, ["--train_data", tmp_path / "more.npz", *base, "--max_train_steps", "4",
                               "--resume_from_checkpoint", "latest"], capfd)
    one_line_error(resumed[0], resumed[2], "num_latents=16 there vs 32 now")
    assert snapshot(run) == before
    np.savez(tmp_path / "other.npz", X=demo_x * 3 + 1)  # the same count, other data: other statistics
    resumed = cli(train.main, ["--train_data", tmp_path / "other.npz", *base, "--max_train_steps", "4",
                               "--resume_from_checkpoint", "latest"], capfd)
    one_line_error(resumed[0], resumed[2], "data_stats={'mode': 'channel', 'mean': [")
    assert snapshot(run) == before
    resumed = cli(train.main, ["--train_data", tmp_path / "d.npz", *base, "--max_train_steps", "4",
                               "--resume_from_checkpoint", "latest"], capfd)
    assert resumed[0] == 0, resumed[2][-2000:]  # the same data resumes


def test_another_runs_checkpoint_does_not_replace_a_finished_run(demo_x, tmp_path, capfd):
    # Resuming run A's checkpoint with --output_dir B, where B had finished, replaced B's pipeline and reports
    # (its checkpoints moved to abandoned/) with only a warning about the checkpoints.
    path = tmp_path / "demo.npz"
    np.savez(path, X=demo_x)
    base = ["--train_data", path, "--max_train_steps", "2", "--checkpointing_steps", "2", *FAST]
    for name in ("a", "b"):
        assert cli(train.main, [*base, "--output_dir", tmp_path / name], capfd)[0] == 0
    before = snapshot(tmp_path / "b")
    foreign = ["--output_dir", tmp_path / "b", "--resume_from_checkpoint", tmp_path / "a" / "train" / "checkpoint-2"]
    code, _, err = cli(train.main, [*base, "--max_train_steps", "3", *foreign], capfd)  # the last value counts
    one_line_error(code, err, "holds a finished run (pipeline/), which resuming another run's checkpoint",
                   "--overwrite_output_dir")
    assert snapshot(tmp_path / "b") == before
    # Its own checkpoint resumes as before, and so does the other's into a folder without a finished run.
    own = ["--output_dir", tmp_path / "b", "--resume_from_checkpoint", "latest"]
    assert cli(train.main, [*base, "--max_train_steps", "3", *own], capfd)[0] == 0
    assert cli(train.main, [*base, "--max_train_steps", "3", *foreign[:1], tmp_path / "c", *foreign[2:]], capfd)[0] == 0
    # --overwrite_output_dir, as the refusal advises, clears B's old run first (it was "ignored": B's checkpoints
    # stayed beside the resumed lineage's).
    code, _, err = cli(train.main, [*base, "--max_train_steps", "3", *foreign, "--overwrite_output_dir"], capfd)
    assert code == 0 and "ignored" not in err, err[-3000:]
    assert sorted(p.name for p in (tmp_path / "b" / "train").glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (tmp_path / "b" / "train" / "abandoned").exists()


def _finished_run(demo_x, tmp_path: Path, capfd) -> tuple[list, Path]:
    """A finished 4-step run with checkpoints at steps 2 and 4: (its train.py arguments but the steps, its folder)."""
    np.savez(tmp_path / "demo.npz", X=demo_x)
    run_dir = tmp_path / "run"
    base = ["--train_data", tmp_path / "demo.npz", "--output_dir", run_dir, "--checkpointing_steps", "2", *FAST]
    assert cli(train.main, [*base, "--max_train_steps", "4"], capfd)[0] == 0
    return base, run_dir


def test_an_abandoned_checkpoint_of_a_finished_run_resumes_in_place(demo_x, tmp_path, capfd):
    # A checkpoint set aside in train/abandoned/ counted as another run's, and was refused in its own run.
    base, run_dir = _finished_run(demo_x, tmp_path, capfd)
    older = ["--resume_from_checkpoint", run_dir / "train" / "checkpoint-2"]
    assert cli(train.main, [*base, "--max_train_steps", "3", *older], capfd)[0] == 0  # sets checkpoint-4 aside
    abandoned = run_dir / "train" / "abandoned" / "checkpoint-4"
    code, out, err = cli(train.main, [*base, "--max_train_steps", "6", "--resume_from_checkpoint", abandoned,
                                      "--dry_run"], capfd)
    assert code == 0 and "dry run, nothing written" in out, err[-3000:]
    code, _, err = cli(train.main, [*base, "--resume_from_checkpoint", abandoned.parent], capfd)
    one_line_error(code, err, "holds checkpoints but is not one", str(abandoned))
    assert "--output_dir" not in err  # the in-place resume is for a run's train/ folder only


def test_a_checkpoint_past_the_runs_end_is_refused(demo_x, tmp_path, capfd):
    # It "finished" without a step and rewrote the pipeline and reports, whose plan named the shorter run.
    base, run_dir = _finished_run(demo_x, tmp_path, capfd)
    before = snapshot(run_dir)
    code, _, err = cli(train.main, [*base, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"], capfd)
    one_line_error(code, err, "checkpoint-4 is already at step 4, past this run's end at step 2",
                   "raise --max_train_steps")
    assert snapshot(run_dir) == before
