"""Writing checkpoints (`latent_ddpm.checkpointing.save_checkpoint`) with a fake one-process Accelerator: rotation
never deletes the checkpoint just written, what a crash left of a checkpoint is removed, and a failure in another
rank is named and leaves the folder to the main one. No training runs here; train.py's resumes and damaged
checkpoints are in test_train_hardening.py and test_faults.py."""

from __future__ import annotations

import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from latent_ddpm.checkpointing import checkpoint_problem, list_checkpoints, save_checkpoint
from latent_ddpm.errors import UserInputError


class _FakeAccelerator:
    """What save_checkpoint needs of an Accelerator, for one process."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def register_save_state_pre_hook(self, hook):
        return torch.utils.hooks.RemovableHandle(OrderedDict())

    register_load_state_pre_hook = register_save_state_pre_hook

    def save_state(self, path: str, safe_serialization: bool = True):
        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.zeros(2)}, Path(path) / "model.safetensors")
        torch.save({"state": {}}, Path(path) / "optimizer.bin")
        torch.save({"step": 0}, Path(path) / "random_states_0.pkl")


def _save(train_dir: Path, step: int, limit: int | None) -> Path:
    state = {"global_step": step, "history": {}, "lr_scheduler": {}, "noise_generator": []}
    return save_checkpoint(_FakeAccelerator(), train_dir, step, state, None, limit)


def test_a_checkpoint_failure_in_another_rank_is_named_and_leaves_the_folder_to_the_main_one(tmp_path):
    # A rank whose barrier failed because a peer died blamed its own disk; a non-main rank that failed deleted the
    # shared checkpoint-N.tmp while the main one was still writing into it.
    class PeerDied(_FakeAccelerator):
        is_main_process = False

        def save_state(self, path: str, safe_serialization: bool = True):
            super().save_state(path, safe_serialization)
            raise torch.distributed.DistError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer")

    train_dir = tmp_path / "train"
    train_dir.mkdir()
    with pytest.raises(UserInputError, match="^another process failed while checkpoint-2 was written"):
        save_checkpoint(PeerDied(), train_dir, 2, {"global_step": 2}, None, None)
    assert (train_dir / "checkpoint-2.tmp" / "model.safetensors").is_file()  # the main process's to clean up


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path, monkeypatch):
    monkeypatch.delenv("LATENT_DDPM_EXIT_AFTER_CHECKPOINT", raising=False)
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    for step in (8, 12):  # newer checkpoints (another timeline's) are already there
        _save(train_dir, step, None)
    for limit in (2, 1):
        written = _save(train_dir, 4, limit)
        assert written == train_dir / "checkpoint-4" and checkpoint_problem(written) is None, limit
    # Ordinary rotation still keeps the newest `limit`, the one just written included.
    other = tmp_path / "other"
    other.mkdir()
    for step in (2, 4, 6):
        _save(other, step, 2)
    assert [s for s, _ in list_checkpoints(other)] == [4, 6]
    _save(other, 8, 1)
    assert [s for s, _ in list_checkpoints(other)] == [8]


def test_what_a_crash_left_of_a_checkpoint_is_removed(tmp_path, monkeypatch):
    # A kill inside a rotation (the marker goes first) left a checkpoint folder without its marker: never resumed and
    # never counted by the rotation, it stayed for good beside the limit's checkpoints, as did a killed write's .tmp;
    # --overwrite_output_dir left them in the fresh run's folder.
    from latent_ddpm.run_folder import clear_run

    monkeypatch.delenv("LATENT_DDPM_EXIT_AFTER_CHECKPOINT", raising=False)
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    for step in (2, 4):
        _save(train_dir, step, 2)
    (train_dir / "checkpoint-2" / "COMPLETE").unlink()  # a rotation's delete, cut short
    shutil.copytree(train_dir / "checkpoint-4", train_dir / "checkpoint-5.tmp")  # a write cut short after its marker
    (train_dir / "checkpoint-9.tmp").mkdir()  # newer than the next checkpoint: its step may still come
    _save(train_dir, 6, 2)
    assert sorted(p.name for p in train_dir.iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-9.tmp"]
    (train_dir / "checkpoint-4" / "COMPLETE").unlink()
    (train_dir / "config.json").write_text("{}")
    clear_run(tmp_path)
    assert sorted(p.name for p in train_dir.iterdir()) == ["config.json"]
