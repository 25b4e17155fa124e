"""A checkpoint loads into a run set up differently from the one that wrote it, where the difference does not
change the training: a compiled model or a plain one, and an fp16 gradient scaler the checkpoint has no state
for. Tiny models, one CPU process, accelerate's real save_state/load_state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers import TRAIN_FAST as FAST
from _helpers import reset_accelerate
from _helpers import run_train as run
from accelerate import Accelerator
from safetensors import safe_open

from latent_ddpm import AdvancedUNet2DModel
from latent_ddpm.checkpointing import COMPILED_PREFIX, STATE_FILE, load_checkpoint, save_checkpoint

STATE = {"global_step": 1, "history": {}, "lr_scheduler": {}, "noise_generator": [[]]}


@pytest.fixture
def accelerator():
    reset_accelerate()
    yield Accelerator(cpu=True)
    reset_accelerate()


def _prepared(accelerator: Accelerator, seed: int, compiled: bool) -> tuple[AdvancedUNet2DModel, torch.nn.Module]:
    """A tiny UNet (initialised from `seed`) and what runs it, prepared as train.py does: (unet, model)."""
    torch.manual_seed(seed)
    unet = AdvancedUNet2DModel.from_preset("tiny", in_channels=4, sample_size=8)
    model, _ = accelerator.prepare(torch.compile(unet) if compiled else unet, torch.optim.AdamW(unet.parameters()))
    return unet, model


def _names(checkpoint: Path) -> list[str]:
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        return list(f.keys())


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize(("saved_compiled", "loaded_compiled"), [(True, False), (False, True)])
def test_a_checkpoint_resumes_with_or_without_compile(accelerator, tmp_path, saved_compiled, loaded_compiled):
    # accelerate saves the module it was given: a compiled one's names all start with `_orig_mod.`, which a plain
    # model refused (a traceback of missing and unexpected keys), as a compiled model refused plain names.
    saved, _ = _prepared(accelerator, 0, saved_compiled)
    checkpoint = save_checkpoint(accelerator, tmp_path / "train", 1, STATE)
    assert _names(checkpoint) and not any(name.startswith(COMPILED_PREFIX) for name in _names(checkpoint))
    reset_accelerate()
    other = Accelerator(cpu=True)
    loaded, _ = _prepared(other, 1, loaded_compiled)
    assert not _same_weights(saved, loaded)
    load_checkpoint(other, checkpoint)
    assert _same_weights(saved, loaded)


def test_a_checkpoint_written_with_compiled_names_still_loads(accelerator, tmp_path):
    # Checkpoints of --compile runs from before the names were stripped.
    saved, _ = _prepared(accelerator, 0, compiled=True)
    legacy = tmp_path / "checkpoint-1"
    accelerator.save_state(str(legacy), safe_serialization=True)  # without save_checkpoint: the prefixed names
    (legacy / STATE_FILE).write_text(json.dumps(STATE))
    assert all(name.startswith(COMPILED_PREFIX) for name in _names(legacy))
    reset_accelerate()
    other = Accelerator(cpu=True)
    loaded, _ = _prepared(other, 1, compiled=False)
    load_checkpoint(other, legacy)
    assert _same_weights(saved, loaded)


def test_fp16_resumes_a_checkpoint_written_without_it_with_a_fresh_scaler(accelerator, tmp_path):
    # On a GPU, --mixed_precision fp16 gives the accelerator a GradScaler, and load_state read scaler.pt, which
    # only fp16 runs write: FileNotFoundError. (No CPU run has a scaler: one is attached by hand.)
    _prepared(accelerator, 0, compiled=False)
    checkpoint = save_checkpoint(accelerator, tmp_path / "train", 1, STATE)
    scaler = torch.amp.GradScaler("cpu")
    accelerator.scaler = scaler
    load_checkpoint(accelerator, checkpoint)
    assert accelerator.scaler is scaler


def test_train_py_resumes_a_compiled_run_without_compile(data, tmp_path):
    out = tmp_path / "run"
    args = ["--latent", str(data), "--output_dir", str(out), *FAST]
    assert run([*args, "--max_train_steps", "2", "--compile"]) == 0  # its last step writes checkpoint-2
    assert run([*args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"]) == 0
    assert json.loads((out / "train" / "checkpoint-4" / STATE_FILE).read_text())["global_step"] == 4
