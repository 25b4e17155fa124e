"""Atomic resumable checkpoints: writing them, checking them, choosing the one to resume (its rules: `resume`).

A checkpoint is `train/checkpoint-<step>/`: accelerate's `save_state` (model, optimizer, RNG
states), the EMA weights as safetensors, and `trainer_state.json` (step, epoch, data position, LR
schedule, counters). It is written into `checkpoint-<step>.tmp/`, completed with a `COMPLETE`
marker, then renamed: a folder without the marker is never resumed from, and old checkpoints are
deleted only once the new one is complete. The marker lists every file with its size and SHA-256, so a
resume skips a checkpoint damaged on disk later (truncated, or bits flipped) for the previous one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import faults
from .errors import UserInputError, first_line

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
#: What a resume reads from STATE_FILE, and its JSON type.
STATE_KEYS = {"global_step": int, "history": dict, "lr_scheduler": dict, "noise_generator": list}
EMA_FILE = "ema.safetensors"
#: Where checkpoints of an abandoned timeline go when an older checkpoint is resumed (under the train folder).
ABANDONED_DIR = "abandoned"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_LEFTOVER_RE = re.compile(r"^checkpoint-(\d+)(\.tmp)?$")
#: The prefix torch.compile's wrapper adds to parameter names; checkpoints store the names without it.
COMPILED_PREFIX = "_orig_mod."
#: accelerate's file for the fp16 gradient scaler's state (written only by fp16 runs).
SCALER_FILE = "scaler.pt"


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


def incomplete_checkpoints(train_dir: Path, below: int | None = None) -> list[Path]:
    """Checkpoint folders under `train_dir` that are not complete checkpoints (of steps below `below`, when given):
    what a crash left of a write (`checkpoint-<step>.tmp`, marker or not) or of a rotation's delete (the marker goes
    first). Never resumed, and not counted by the rotation, so they would stay for good."""
    if not train_dir.is_dir():
        return []
    found = []
    for path in sorted(train_dir.iterdir()):
        match = _LEFTOVER_RE.match(path.name)
        if (match and path.is_dir() and not path.is_symlink()
                and (match.group(2) or not (path / COMPLETE_MARKER).exists())
                and (below is None or int(match.group(1)) < below)):
            found.append(path)
    return found


def delete_checkpoint(path: Path, ignore_errors: bool = False) -> None:
    """Delete a checkpoint folder, its marker first: a half-deleted folder is never "complete"."""
    (path / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=ignore_errors)


def is_valid_checkpoint(path: Path) -> bool:
    """A complete checkpoint: every file the marker lists is there at its size, the state file parses,
    every safetensors file loads, and every torch file (optimizer, RNG states) loads with weights_only."""
    return checkpoint_problem(path) is None


def checkpoint_problem(path: Path) -> str | None:
    """None for a usable checkpoint, else what is wrong with it (for warnings)."""
    try:
        marker = (path / COMPLETE_MARKER).read_text()
    except OSError:
        return f"no {COMPLETE_MARKER} marker (the write did not finish)"
    try:
        manifest = json.loads(marker) if marker.lstrip().startswith("{") else {}
        files, digests = manifest.get("files", {}), manifest.get("sha256")
        if digests is not None and set(digests) != set(files):  # markers before checksums list none
            return f"the {COMPLETE_MARKER} marker's checksums do not cover the files it lists"
        for name, size in files.items():  # markers of older checkpoints ("ok") list no files
            if (problem := _member_problem(path, name)) is not None:
                return problem
            if (path / name).stat().st_size != size:
                return f"{name} is {(path / name).stat().st_size} bytes, the marker says {size} (truncated?)"
        for name, digest in (digests or {}).items():
            if _sha256(path / name) != digest:
                return f"{name} does not match its SHA-256 in the {COMPLETE_MARKER} marker (changed on disk)"
        state = json.loads((path / STATE_FILE).read_text())
        if missing := [name for name in _required_files(state) if not (path / name).is_file()]:
            return f"{missing[0]} is missing"
        if bad := [key for key, kind in STATE_KEYS.items() if not isinstance(state.get(key), kind)
                   or isinstance(state.get(key), bool)]:
            return f"{STATE_FILE} has no valid '{bad[0]}' (not a checkpoint this package wrote?)"
        for file in sorted(path.iterdir()):
            if file.suffix == ".safetensors":  # training stops before weights turn NaN/Inf: such weights are damage
                if bad := next((k for k, t in load_file(file).items() if not torch.isfinite(t).all()), None):
                    return f"{file.name} holds non-finite values ({bad})"
            elif file.suffix in (".bin", ".pkl", ".pt"):
                from accelerate.utils import load as safe_torch_load  # weights_only=True + numpy RNG types

                safe_torch_load(file, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any damage means "not usable"
        return f"{type(err).__name__}: {first_line(err)[:200]}"
    return None


def _member_problem(folder: Path, name: str) -> str | None:
    """Why the marker's entry `name` is not a regular file inside `folder` (a crafted or garbled marker must not
    make the check read elsewhere, or block on a device or FIFO); None when it is one."""
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
        return f"the {COMPLETE_MARKER} marker lists {name!r}, which is not a file of the checkpoint"
    file = folder / name
    if not file.is_symlink() and not file.exists():
        return f"{name} is missing"
    if file.is_symlink() or not file.is_file():
        return f"{name} is not a plain file"
    return None


def _required_files(state) -> list[str]:
    """What every checkpoint holds, whatever its marker lists (an older marker, "ok", lists nothing): the model,
    the optimizer, each rank's RNG state (a missing one resumes that rank inexactly, with no error) and the
    EMA when the state records one."""
    ema = isinstance(state, dict) and "ema" in state
    ranks = state.get("noise_generator") if isinstance(state, dict) else None
    rng = [f"random_states_{r}.pkl" for r in range(len(ranks) if isinstance(ranks, list) and ranks else 1)]
    return ["model.safetensors", "optimizer.bin", *rng, *([EMA_FILE] if ema else [])]


def resolve_resume(train_dir: Path, spec: str | None) -> Path | None:
    """`--resume_from_checkpoint latest|PATH` -> a checkpoint folder, or None to start from scratch.

    Damaged checkpoints are skipped with a warning in favour of the previous complete one.
    """
    if spec is None:
        return None
    if spec != "latest":
        path = Path(spec)
        # a run folder, its train/ or abandoned/ given for one of its checkpoints
        for folder in () if (path / COMPLETE_MARKER).exists() else (path / "train", path):
            if found := list_checkpoints(folder):
                in_place = (f", or resume the run in place with --output_dir {folder.parent} "
                            "--resume_from_checkpoint latest" if folder.name == "train" else "")
                raise UserInputError(f"--resume_from_checkpoint: {spec} holds checkpoints but is not one; pass one "
                                     f"of them, e.g. {found[-1][1]} (its newest){in_place}")
        problem = checkpoint_problem(path) if path.is_dir() else "no such folder"
        if problem is not None:
            raise UserInputError(f"--resume_from_checkpoint: {spec} is not a complete checkpoint folder "
                                 f"({problem}); use 'latest' or a checkpoint-<step> folder under {train_dir}")
        return path
    for _, path in reversed(list_checkpoints(train_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(f"skipping damaged checkpoint {path} ({problem}); trying the previous one", stacklevel=2)
    return None


def resolve_resume_once(accelerator, train_dir: Path, spec: str | None) -> Path | None:
    """`resolve_resume` in the main process alone, its verdict (or error) shared with every process: the check
    reads each checkpoint file in full once, not once per rank, and every rank resumes the same checkpoint."""
    from accelerate.utils import broadcast_object_list

    found, error = None, None
    if accelerator.is_main_process:
        try:
            found = resolve_resume(train_dir, spec)
        except UserInputError as err:
            error = str(err)
    found, error = broadcast_object_list([found, error])  # as it is, with one process
    if error is not None:
        raise UserInputError(error)
    return found


def set_aside_newer_checkpoints(train_dir: Path, resume: Path | None) -> list[Path]:
    """Move this run's checkpoints that the resumed one does not lead to into `train_dir/abandoned/` (kept);
    with `resume` None (every checkpoint was damaged, so the run starts from scratch), all of them.

    Resuming an older checkpoint starts a new timeline from it; the newer folders belong to the old one, and
    left in place a later `--resume_from_checkpoint latest` would jump back to them (and the new run would
    overwrite them step by step). The step is the resumed checkpoint's `global_step`; when it lives in another
    folder, this folder's checkpoint of the same step is another run's too. Returns their new paths.
    """
    if not train_dir.is_dir():
        return []
    step = 0 if resume is None else int(json.loads((resume / STATE_FILE).read_text())["global_step"])
    elsewhere = resume is not None and resume.resolve().parent != train_dir.resolve()
    moved = []
    for path in sorted(train_dir.iterdir()):
        other = _CKPT_RE.match(path.name)
        if other is None or not path.is_dir() or int(other.group(1)) < step + (0 if elsewhere else 1):
            continue
        target = train_dir / ABANDONED_DIR / path.name
        for n in itertools.count(1):  # an earlier set-aside of the same step keeps its name
            if not target.exists():
                break
            target = train_dir / ABANDONED_DIR / f"{path.name}.{n}"
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        moved.append(target)
    return moved


def save_checkpoint(accelerator, train_dir: Path, step: int, state: dict, ema=None, limit: int | None = None) -> Path:
    """Write checkpoint-<step> atomically on every process (accelerate saves per-rank RNG states)."""
    final = train_dir / f"checkpoint-{step}"
    tmp = train_dir / f"checkpoint-{step}.tmp"
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        with _plain_weights(accelerator):
            accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()  # every rank's RNG state is in before the folder is completed
        if accelerator.is_main_process:
            if ema is not None:
                ema_state = ema.state_dict()
                shadow = ema_state.pop("shadow_params")
                save_file({str(i): p.detach().contiguous().cpu() for i, p in enumerate(shadow)}, tmp / EMA_FILE)
                state = {**state, "ema": ema_state}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
            faults.pause_in_save(tmp)
            _fsync_tree(tmp)
            files = {str(f.relative_to(tmp)): f for f in sorted(tmp.rglob("*")) if f.is_file()}
            manifest = {"step": step, "files": {name: f.stat().st_size for name, f in files.items()},
                        "sha256": {name: _sha256(f) for name, f in files.items()}}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(manifest, indent=1) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except (OSError, RuntimeError, SafetensorError) as err:  # disk full, file too large, read-only, permissions
        # torch.save reports a failed write as a RuntimeError ("unexpected pos ..."), safetensors as its own error.
        if accelerator.is_main_process:  # the folder is the main process's: another rank deleting it mid-write
            shutil.rmtree(tmp, ignore_errors=True)  # made the main one fail with "Parent directory does not exist"
        previous = list_checkpoints(train_dir)
        kept = f"the last complete checkpoint {previous[-1][1]} is intact" if previous else "no checkpoint was kept"
        if isinstance(err, torch.distributed.DistError) or "gloo" in str(err):  # a peer died in the barrier
            raise UserInputError(f"another process failed while checkpoint-{step} was written (see its error); "
                                 f"{kept}; continue with --resume_from_checkpoint latest") from None
        free = _free_space(train_dir)
        detail = first_line(err)[:160]
        raise UserInputError(f"cannot write checkpoint-{step} in {train_dir} ({type(err).__name__}: {detail}; "
                             f"{free}); free disk space or make the folder writable, then continue with "
                             f"--resume_from_checkpoint latest; {kept}") from None
    if accelerator.is_main_process and limit is not None:
        older = [(s, p) for s, p in list_checkpoints(train_dir) if s < step]  # never the one just written
        for _, old in older[:max(0, len(older) - (limit - 1))]:
            delete_checkpoint(old, ignore_errors=True)  # rotation: a leftover is not complete, never resumed
    if accelerator.is_main_process:  # what a crash left of an older write or rotation
        for leftover in incomplete_checkpoints(train_dir, below=step):
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    faults.exit_after_checkpoint(step)  # a test's crash right after this checkpoint
    return final


def load_checkpoint(accelerator, path: Path, ema=None) -> dict:
    """Restore accelerate's state (and the EMA) from `path`; returns the trainer state dict. The run may
    compile where the checkpoint's did not, or the reverse, and may use fp16 where it did not (a fresh
    gradient scaler then starts)."""
    scaler = accelerator.scaler
    if scaler is not None and not (path / SCALER_FILE).exists():  # written without fp16: nothing to restore
        accelerator.scaler = None
    try:
        with _plain_weights(accelerator):
            accelerator.load_state(str(path))
    finally:
        accelerator.scaler = scaler
    state = json.loads((path / STATE_FILE).read_text())
    if ema is not None and "ema" in state:
        tensors = load_file(path / EMA_FILE)
        ema_state = dict(state["ema"], shadow_params=[tensors[str(i)] for i in range(len(tensors))])
        ema.load_state_dict(ema_state)
        ema.to(accelerator.device)
    return state


@contextmanager
def _plain_weights(accelerator) -> Iterator[None]:
    """Within it, accelerate saves and loads the model's weights under their plain names, whether or not it
    was prepared compiled (`torch.compile` prefixes every name with `_orig_mod.`): so a run can resume with
    or without --compile. Checkpoints written with the prefix (before this) still load."""
    def strip_names(models, weights, output_dir):
        for weight in weights:  # in place: accelerate prepares only an OrderedDict (contiguous, unaliased) to save
            torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(weight, COMPILED_PREFIX)

    def plain_models(models, input_dir):
        for i, model in enumerate(models):
            models[i] = accelerator.unwrap_model(model, keep_torch_compile=False)
            hooks.append(models[i].register_load_state_dict_pre_hook(_accept_compiled_names))

    hooks = [accelerator.register_save_state_pre_hook(strip_names),
             accelerator.register_load_state_pre_hook(plain_models)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _accept_compiled_names(module, state_dict, prefix, *args) -> None:
    """A load_state_dict pre-hook: the names of a checkpoint saved from a compiled model, without the prefix."""
    if prefix == "":
        torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state_dict, COMPILED_PREFIX)


def generator_state(gen: torch.Generator) -> list[int]:
    """A torch.Generator's state as a JSON-able list of bytes."""
    return gen.get_state().tolist()


def set_generator_state(gen: torch.Generator, state: list[int]) -> None:
    gen.set_state(torch.tensor(state, dtype=torch.uint8))


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB free there"
    except OSError:
        return "free space unknown"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
