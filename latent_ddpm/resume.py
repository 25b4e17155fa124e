"""The rules of a resume: which settings a resumed run must share with its checkpoint (the model, the data,
the objective, the global batch), which it may change (the batch layout: another number of processes), and
which of this run's flags replace the checkpoint's copies (learning rate, AdamW, EMA)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .checkpointing import STATE_FILE
from .errors import UserInputError
from .pipeline import format_class_ids

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

    from .config import TrainConfig


#: TrainConfig fields that define the training objective (noise schedule, loss, data scaling, label dropout).
#: They are saved with a checkpoint's run settings, so that a resumed run cannot switch objective mid-run
#: (e.g. after a changed default).
OBJECTIVE_SETTINGS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                      "snr_gamma", "snr_floor", "normalization", "scaling_factor", "cond_drop_prob")


#: Objective settings recorded as None when other settings make them inert (`objective_settings`), and those others
#: (cond_drop_prob's is --class_conditional, which a resume compares as part of the model).
DERIVED_FROM = {"snr_floor": ("snr_gamma", "prediction_type"), "beta_start": ("beta_schedule",),
                "beta_end": ("beta_schedule",), "normalization": ("scaling_factor",)}


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


def check_resume_compatible(path: Path, model_config: dict, run_settings: dict | None = None,
                            max_steps: int | None = None) -> str | None:
    """Refuse to resume `path` past the run's end (`max_steps`), with a model of another shape (e.g. data with
    another channel count), or with other run settings: those that fix the data order and noise streams
    (processes, batch size, accumulation, seed), the data (count, statistics, class ids) and the objective
    (`OBJECTIVE_SETTINGS`). A setting the
    checkpoint does not record (an older one) is not compared. The processes, batch size and accumulation may
    change together when the global batch stays the same (another number of GPUs): the data order is kept, the
    random streams are not, and the returned note says so (None when nothing changed)."""
    state = json.loads((path / STATE_FILE).read_text())
    if max_steps is not None and isinstance(step := state.get("global_step"), int) and step > max_steps:
        raise UserInputError(f"--max_train_steps: {path} is already at step {step}, past this run's end at step "
                             f"{max_steps}; raise --max_train_steps (or --num_epochs) to train on")
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
    # A setting that stopped (or started) acting because another one changed (snr_floor with epsilon prediction)
    # is recorded as None: not named beside the change that caused it.
    inert = {k for k in changed if None in (settings[k], current[k]) and set(DERIVED_FROM.get(k, ())) & set(changed)}
    named = [k for k in changed if k not in inert] or changed
    details = ", ".join(f"{k}={_shown(settings[k])} there vs {_shown(current[k])} now" for k in named)
    batch = global_batch(settings)
    if changed and batch is not None and batch == global_batch(current) and set(changed) <= set(BATCH_LAYOUT):
        return (f"resuming {path} with another batch layout ({details}) and the same global batch of {batch}: the "
                "data order continues, the random streams are new, so the run is not bit-identical to one that "
                "never stopped")
    if changed:
        layout = (f" (the processes, --train_batch_size and --gradient_accumulation_steps may change together when "
                  f"the global batch, {batch} there, stays the same)" if set(changed) & set(BATCH_LAYOUT) and batch
                  else "")
        raise UserInputError(f"--resume_from_checkpoint: {path} was made with other settings ({details}); resume "
                             f"with the same ones{layout} (a resumed run continues the same data order, noise and "
                             f"objective), or start a new --output_dir")
    return None


def _shown(value) -> str:
    """A run setting for a message: a list (a data set's class ids) as `format_class_ids` shows them (a long one as
    its first ids and how many)."""
    return f"[{format_class_ids(value)}]" if isinstance(value, list) else str(value)


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


def reseed_for_new_layout(gen: torch.Generator, seed: int, step: int, rank: int) -> None:
    """After a resume with another batch layout (`check_resume_compatible`'s note): new random streams on every
    rank, fixed by (seed, step, rank): the noise generator `gen`, and python's, numpy's and torch's global ones
    (dropout) that accelerate's `load_state` restored for the old ranks only."""
    from accelerate.utils import set_seed

    noise, rest = np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint32)
    gen.manual_seed(int(noise))
    set_seed(int(rest))
