"""Atomic resumable checkpoints: writing, checking, choosing one to resume, and the resume rules.

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
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import faults
from .errors import UserInputError, first_line

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

    from .config import TrainConfig

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
#: What a resume reads from STATE_FILE, and its JSON type.
STATE_KEYS = {"global_step": int, "history": dict, "lr_scheduler": dict, "noise_generator": list}
EMA_FILE = "ema.safetensors"
#: Where checkpoints of an abandoned timeline go when an older checkpoint is resumed (under the train folder).
ABANDONED_DIR = "abandoned"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


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


def delete_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder, its marker first: a half-deleted folder is never "complete"."""
    (path / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


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
        for name, size in manifest.get("files", {}).items():  # markers of older checkpoints ("ok") list no files
            if not (path / name).is_file():
                return f"{name} is missing"
            if (path / name).stat().st_size != size:
                return f"{name} is {(path / name).stat().st_size} bytes, the marker says {size} (truncated?)"
        for name, digest in manifest.get("sha256", {}).items():  # markers before checksums list none
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


def _required_files(state) -> list[str]:
    """What every checkpoint holds, whatever its marker lists (an older marker, "ok", lists nothing): the model,
    the optimizer, each rank's RNG state (a missing one resumes that rank inexactly, with no error) and the
    EMA when the state records one."""
    ema = isinstance(state, dict) and "ema" in state
    ranks = state.get("noise_generator") if isinstance(state, dict) else None
    rng = [f"random_states_{r}.pkl" for r in range(len(ranks) if isinstance(ranks, list) and ranks else 1)]
    return ["model.safetensors", "optimizer.bin", *rng, *([EMA_FILE] if ema else [])]


def resolve_resume(train_dir: Path, spec: str | None, warn: bool = True) -> Path | None:
    """`--resume_from_checkpoint latest|PATH` -> a checkpoint folder, or None to start from scratch.

    Damaged checkpoints are skipped with a warning (when `warn`: the main process's) in favour of the previous
    complete one.
    """
    if spec is None:
        return None
    if spec != "latest":
        path = Path(spec)
        problem = checkpoint_problem(path) if path.is_dir() else "no such folder"
        if problem is not None:
            raise UserInputError(f"--resume_from_checkpoint: {spec} is not a complete checkpoint folder "
                                 f"({problem}); use 'latest' or a checkpoint-<step> folder under {train_dir}")
        return path
    for _, path in reversed(list_checkpoints(train_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if warn:
            warnings.warn(f"skipping damaged checkpoint {path} ({problem}); trying the previous one", stacklevel=2)
    return None


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


#: TrainConfig fields that define the training objective (noise schedule, loss, data scaling, label dropout).
#: They are saved with a checkpoint's run settings, so that a resumed run cannot switch objective mid-run
#: (e.g. after a changed default).
OBJECTIVE_SETTINGS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                      "snr_gamma", "snr_floor", "normalization", "scaling_factor", "cond_drop_prob")


def objective_settings(cfg) -> dict:
    """The objective part of a run's settings (`OBJECTIVE_SETTINGS` of a TrainConfig), as compared on resume.

    Settings that cannot change the objective are recorded as None, so that equivalent runs compare equal:
    snr_gamma 0 and None both turn min-SNR weighting off; snr_floor acts only with that weighting on, not for
    epsilon prediction, and as min(floor, gamma) (`diffusion.min_snr_weights`); squaredcos_cap_v2 ignores the
    betas; a fixed scaling_factor replaces the normalization; label dropout needs labels. Floats survive the
    state file's JSON round trip exactly.
    """
    s = {k: getattr(cfg, k) for k in OBJECTIVE_SETTINGS}
    s["snr_gamma"] = s["snr_gamma"] or None
    floor_applies = s["snr_gamma"] is not None and s["prediction_type"] != "epsilon"
    s["snr_floor"] = min(s["snr_floor"], s["snr_gamma"]) if floor_applies else None
    if s["beta_schedule"] == "squaredcos_cap_v2":
        s["beta_start"] = s["beta_end"] = None
    if s["scaling_factor"] is not None:
        s["normalization"] = None  # a fixed scale replaces the statistics
    if not cfg.class_conditional:
        s["cond_drop_prob"] = None
    return s


#: Run settings that may change together on resume while their product, the global batch of one optimizer step,
#: stays the same: the data order (global batches of a fixed permutation) and the epochs are then unchanged.
BATCH_LAYOUT = ("world_size", "train_batch_size", "gradient_accumulation_steps")


def global_batch(settings: dict) -> int | None:
    """Samples per optimizer step of `settings` (run settings), None when one of `BATCH_LAYOUT` is unknown."""
    values = [settings.get(k) for k in BATCH_LAYOUT]
    return math.prod(values) if all(isinstance(v, int) for v in values) else None


def check_resume_compatible(path: Path, model_config: dict, run_settings: dict | None = None) -> str | None:
    """Refuse to resume `path` with a model of another shape (e.g. data with another channel count), or with
    other run settings: those that fix the data order and noise streams (processes, batch size, accumulation,
    seed) and the objective (`OBJECTIVE_SETTINGS`). A setting the checkpoint does not record (an older one)
    is not compared. The processes, batch size and accumulation may change together when the global batch
    stays the same (another number of GPUs): the data order is kept, the noise streams are not, and the
    returned note says so (None when nothing changed)."""
    state = json.loads((path / STATE_FILE).read_text())
    saved = state.get("model_config")
    if saved is not None:  # first: a model change (e.g. --class_conditional) also changes run settings it implies
        current = json.loads(json.dumps(model_config))  # tuples -> lists, as saved
        if (saved.get("num_class_embeds") is None) != (current.get("num_class_embeds") is None):
            was = "without" if saved.get("num_class_embeds") is None else "with"
            raise UserInputError(f"--class_conditional: {path} was trained {was} class conditioning; resume with the "
                                 "same --class_conditional setting, or start a new --output_dir")
        diff = sorted(k for k in set(saved) | set(current) if not k.startswith("_") and saved.get(k) != current.get(k))
        if diff:
            details = ", ".join(f"{k}={saved.get(k)} there vs {current.get(k)} now" for k in diff[:3])
            raise UserInputError(f"--resume_from_checkpoint: {path} was trained with another model ({details}); "
                                 f"use the same data, --preset and --model_config, or another --output_dir")
    settings = dict(state.get("run_settings") or {})
    if isinstance(state.get("noise_generator"), list):  # one per rank: older checkpoints record no world_size
        settings.setdefault("world_size", len(state["noise_generator"]))
    current = json.loads(json.dumps(run_settings or {}))  # as it would be saved
    changed = [k for k in current if k in settings and settings[k] != current[k]]
    details = ", ".join(f"{k}={settings[k]} there vs {current[k]} now" for k in changed)
    same_batch = global_batch(settings) is not None and global_batch(settings) == global_batch(current)
    if changed and same_batch and set(changed) <= set(BATCH_LAYOUT):
        return (f"resuming {path} with another batch layout ({details}) and the same global batch of "
                f"{global_batch(current)}: the data order continues, the noise streams are new, so the run is "
                "not bit-identical to one that never stopped")
    if changed:
        layout = (f" (the processes, --train_batch_size and --gradient_accumulation_steps may change together when "
                  f"the global batch, {global_batch(settings)} there, stays the same)"
                  if set(changed) & set(BATCH_LAYOUT) and global_batch(settings) else "")
        raise UserInputError(f"--resume_from_checkpoint: {path} was made with other settings ({details}); resume "
                             f"with the same ones{layout} (a resumed run continues the same data order, noise and "
                             f"objective), or start a new --output_dir")
    return None


def save_checkpoint(accelerator, train_dir: Path, step: int, state: dict, ema=None, limit: int | None = None) -> Path:
    """Write checkpoint-<step> atomically on every process (accelerate saves per-rank RNG states)."""
    final = train_dir / f"checkpoint-{step}"
    tmp = train_dir / f"checkpoint-{step}.tmp"
    try:
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
            faults.pause_in_save(tmp)
            _fsync_tree(tmp)
            files = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
            manifest = {"step": step, "files": {str(f.relative_to(tmp)): f.stat().st_size for f in files},
                        "sha256": {str(f.relative_to(tmp)): _sha256(f) for f in files}}
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
            delete_checkpoint(old)
    accelerator.wait_for_everyone()
    faults.exit_after_checkpoint(step)  # a test's crash right after this checkpoint
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


def apply_resumed_settings(optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
                           ema: EMAModel | None, cfg: TrainConfig) -> list[str]:
    """After a resume, make the run use this run's flags rather than the checkpoint's copies of them: the peak
    learning rate (the schedule's current factor kept), AdamW's betas, weight decay and epsilon, and the EMA's
    decay and power. Lowering `--learning_rate` when resuming from before a divergence is what the divergence
    warning advises. Returns what changed, as "name old -> new"."""
    changed: list[str] = []

    def note(name: str, old, new) -> None:
        if old != new:
            changed.append(f"{name} {old} -> {new}")

    for group in optimizer.param_groups:
        peak = group.get("initial_lr", group["lr"])
        if peak != cfg.learning_rate:  # untouched otherwise: a resume with the same flags stays bit-identical
            note("learning_rate", peak, cfg.learning_rate)
            group["lr"] = group["lr"] * cfg.learning_rate / peak if peak else cfg.learning_rate
            group["initial_lr"] = cfg.learning_rate
        for key, value in (("betas", (cfg.adam_beta1, cfg.adam_beta2)), ("weight_decay", cfg.adam_weight_decay),
                           ("eps", cfg.adam_epsilon)):
            note(key, tuple(group[key]) if key == "betas" else group[key], value)
            group[key] = value
    lr_scheduler.base_lrs = [cfg.learning_rate] * len(lr_scheduler.base_lrs)
    if ema is not None:
        note("ema_decay", ema.decay, cfg.ema_decay)
        note("ema_power", ema.power, cfg.ema_power)
        ema.decay, ema.power = cfg.ema_decay, cfg.ema_power
    return list(dict.fromkeys(changed))  # once, not once per parameter group


def generator_state(gen: torch.Generator) -> list[int]:
    """A torch.Generator's state as a JSON-able list of bytes."""
    return gen.get_state().tolist()


def set_generator_state(gen: torch.Generator, state: list[int]) -> None:
    gen.set_state(torch.tensor(state, dtype=torch.uint8))


def resume_noise_generator(gen: torch.Generator, states: list[list[int]], rank: int, world: int, seed: int,
                           step: int) -> None:
    """Continue this rank's noise stream from a checkpoint's `states` (one per rank). Resumed on another number
    of processes, each rank starts a new stream fixed by (seed, step, rank): reproducible, but not the old one."""
    if len(states) == world:
        set_generator_state(gen, states[rank])
    else:
        gen.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0]))


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
