"""Run folders, atomic resumable checkpoints and the run lock.

A checkpoint is `train/checkpoint-<step>/`: accelerate's `save_state` (model, optimizer, RNG
states), the EMA weights as safetensors, and `trainer_state.json` (step, epoch, data position, LR
schedule, counters). It is written into `checkpoint-<step>.tmp/`, completed with a `COMPLETE`
marker, then renamed: a folder without the marker is never resumed from, and old checkpoints are
deleted only once the new one is complete.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import socket
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserInputError

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
LOCK_FILE = ".lock"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def default_run_dir(data_name: str, channels: int, timesteps: int, beta_start: float, beta_end: float) -> Path:
    """The original project's layout: runs/<data stem>_ddpm_<C>_<T>_<beta_start>_<beta_end>."""
    return Path("runs") / f"{data_name}_ddpm_{channels}_{timesteps}_{beta_start}_{beta_end}"


def list_checkpoints(train_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `train_dir`, oldest first."""
    if not train_dir.is_dir():
        return []
    found = []
    for path in train_dir.iterdir():
        match = _CKPT_RE.match(path.name)
        if match and path.is_dir() and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def is_valid_checkpoint(path: Path) -> bool:
    """A complete checkpoint whose state file parses and whose EMA file (if any) loads."""
    try:
        json.loads((path / STATE_FILE).read_text())
        if (path / EMA_FILE).exists():
            load_file(path / EMA_FILE)
        return (path / COMPLETE_MARKER).is_file()
    except Exception:  # noqa: BLE001 - any damage means "not usable"
        return False


def resolve_resume(train_dir: Path, spec: str | None) -> Path | None:
    """`--resume_from_checkpoint latest|PATH` -> a checkpoint folder, or None to start from scratch.

    Damaged checkpoints are skipped with a warning in favour of the previous complete one.
    """
    if spec is None:
        return None
    if spec != "latest":
        path = Path(spec)
        if not path.is_dir() or not is_valid_checkpoint(path):
            raise UserInputError(f"--resume_from_checkpoint: {spec} is not a complete checkpoint folder "
                                 f"(expected {STATE_FILE} and {COMPLETE_MARKER} inside); use 'latest' or a "
                                 f"checkpoint-<step> folder under {train_dir}")
        return path
    for _, path in reversed(list_checkpoints(train_dir)):
        if is_valid_checkpoint(path):
            return path
        warnings.warn(f"skipping damaged checkpoint {path}", stacklevel=2)
    return None


def save_checkpoint(accelerator, train_dir: Path, step: int, state: dict, ema=None, limit: int | None = None) -> Path:
    """Write checkpoint-<step> atomically on every process (accelerate saves per-rank RNG states)."""
    final = train_dir / f"checkpoint-{step}"
    tmp = train_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every rank's RNG state is in before the folder is completed
    if accelerator.is_main_process:
        if ema is not None:
            ema_state = ema.state_dict()
            shadow = ema_state.pop("shadow_params")
            save_file({str(i): p.detach().contiguous().cpu() for i, p in enumerate(shadow)}, tmp / EMA_FILE)
            state = {**state, "ema": ema_state}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        _checkpoint_hook(tmp)
        _fsync_tree(tmp)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if limit is not None:
            for _, old in list_checkpoints(train_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    if os.environ.get("LATENT_DDPM_EXIT_AFTER_CHECKPOINT") == str(step):
        os._exit(3)  # test hook: simulate a crash right after this checkpoint
    return final


def load_checkpoint(accelerator, path: Path, ema=None) -> dict:
    """Restore accelerate's state (and the EMA) from `path`; returns the trainer state dict."""
    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text())
    if ema is not None and "ema" in state:
        tensors = load_file(path / EMA_FILE)
        ema_state = dict(state["ema"], shadow_params=[tensors[str(i)] for i in range(len(tensors))])
        ema.load_state_dict(ema_state)
        ema.to(accelerator.device)
    return state


def generator_state(gen: torch.Generator) -> list[int]:
    """A torch.Generator's state as a JSON-able list of bytes."""
    return gen.get_state().tolist()


def set_generator_state(gen: torch.Generator, state: list[int]) -> None:
    gen.set_state(torch.tensor(state, dtype=torch.uint8))


def _checkpoint_hook(tmp: Path) -> None:
    """Test hook: with LATENT_DDPM_PAUSE_IN_SAVE=FILE, create FILE and wait for it to vanish, so a test
    can kill the process half-way through a checkpoint write."""
    flag = os.environ.get("LATENT_DDPM_PAUSE_IN_SAVE")
    if flag:
        import time

        Path(flag).write_text(str(tmp))
        while Path(flag).exists():
            time.sleep(0.01)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


class RunLock:
    """An exclusive lock on a run folder: a second run on the same folder refuses to start; a stale
    lock (its process is gone) is taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                holder = self.path.read_text().strip() if self.path.exists() else "?"
                raise UserInputError(f"{self.path.parent} is in use by another training run (host, pid: {holder}); "
                                     f"wait for it, or use another --output_dir") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self.held = True
            atexit.register(self.release)  # also on errors; a killed run leaves a stale lock, taken over later
            return

    def _stale(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return True
        if host != socket.gethostname():
            return False  # another machine's run: we cannot tell, so respect it
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
