"""Pieces of `sample.py`: schedulers by name and their checks, per-sample generators, class labels and run
folders (its streaming `.npz` writer and output lock are in `latent_ddpm.paths`).

Reproducibility: sample `i` of a run with seed `s` draws all its noise (initial and per step) from its
own `torch.Generator` seeded with `sample_seed(s, i)`, on the CPU, so the noise does not depend on the
batch size, the number of processes or the device.
"""

from __future__ import annotations

import inspect
import json
import os
import types
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .errors import ArgumentParser, UserInputError, first_line
from .hybrid_solver import HybridDPMSolverMultistepScheduler
from .pipeline import DEFAULT_SCHEDULER_CONFIG, LatentDDPMPipeline, format_class_ids, inference_steps_error
from .run_folder import PIPELINE_SUBDIR, pipeline_of
from .sources import diffusers_logs_on_success, is_hub_id

# Sampler name -> (diffusers class, config overrides). All are built with `from_config` from the
# saved (training) scheduler config, so they share its betas and prediction type.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddpm": (DDPMScheduler, {}),  # ancestral sampling, the original's sampler
    "ddim": (DDIMScheduler, {}),  # deterministic at eta=0 (Song et al. 2021)
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),  # multistep, 10-25 steps
    "sde-dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),  # stochastic variant
    # deterministic above sigma 6 (t ~ 600), stochastic below (hybrid_solver.py)
    "hybrid-dpmsolver++": (HybridDPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),  # predictor-corrector, good at 5-20 steps
    "euler": (EulerDiscreteScheduler, {}),  # Karras et al. 2022 Euler ODE
    "euler_a": (EulerAncestralDiscreteScheduler, {}),  # Euler, ancestral (stochastic)
    "heun": (HeunDiscreteScheduler, {}),  # 2nd-order, two UNet calls per step
}
# Where a sampler's timesteps sit (diffusers' `timestep_spacing`). DDPMScheduler's default, "leading", which
# every sampler inherits through `from_config`, never starts at the last training step: DPM-Solver++ and UniPC
# start at t = (T // (n + 1)) * n (940 of 999 at 20 steps, 900 at 100, 800 at 200), the others at T - T // n
# (900 at 10 steps). Sampling from pure noise at a step that still holds signal loses it (Lin et al. 2024, sec.
# 3.3, "Common Diffusion Noise Schedules and Sample Steps are Flawed"); "trailing" starts every sampler at
# T - 1 at any step count. DDPM-1000 is the same under all three. One value: the pipeline's default scheduler
# (and the training scheduler, pinned to it by tests/test_diffusion.py) saves the same.
TIMESTEP_SPACING = DEFAULT_SCHEDULER_CONFIG["timestep_spacing"]
# Order of the deterministic DPM-Solver++, as diffusers' documentation recommends: 3 for unguided sampling, 2
# with classifier-free guidance (a higher order extrapolates the guided prediction further). On the demo
# model, unguided, order 3 lowered the FD at 20 steps on all seven models tried (-5% median; no change at 10).
DPM_SOLVER_ORDER = {"unguided": 3, "guided": 2}
# Scheduler settings that define the noise process the UNet was trained on, or how it is fed: `--scheduler_config`
# may not change them (other betas, a flow-matching process, another prediction type or continuous timesteps
# would misread every model output).
TRAINING_SCHEDULER_KEYS = frozenset({
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
    "rescale_betas_zero_snr", "use_flow_sigmas", "flow_shift", "shift_terminal", "use_dynamic_shifting",
    "time_shift_type", "timestep_type"})
# Multistep solver orders diffusers implements (a larger value only costs memory and time).
SOLVER_ORDERS = (1, 2, 3)
# `--mixed_precision` -> the dtype of the UNet weights (the scheduler always works in float32).
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


ArgParser = ArgumentParser  # the one-line-error parser, under the name sample.py and encode.py use


def load_pipeline(model: str, mixed_precision: str = "no", device: torch.device | str = "cpu") -> LatentDDPMPipeline:
    """Load a saved `LatentDDPMPipeline` from a folder or a hub id onto `device`, its UNet in the dtype of
    `mixed_precision` (no, fp16, bf16); any failure is one `UserInputError` line."""
    model = pipeline_of(model)  # a run folder: its pipeline/
    path = Path(model)
    if path.exists():
        if not (path / "model_index.json").is_file():
            if path.is_file():
                hint = f"; pass the folder that holds it, {path.parent}" if path.name == "model_index.json" else (
                    "; pass a pipeline folder (it holds model_index.json), not a file")
            elif (path / PIPELINE_SUBDIR).is_dir():  # a run folder whose final pipeline was never completed
                hint = f"; nor is its {path / PIPELINE_SUBDIR} (an unfinished run? resume it with train.py)"
            elif (path / "trainer_state.json").is_file():
                hint = (f"; it is a training checkpoint (resume it with train.py), the run's pipeline is "
                        f"{path.parent.parent / PIPELINE_SUBDIR}")
            else:
                hint = ""
            raise UserInputError(f"--model {model}: not a saved pipeline (no model_index.json){hint}")
    elif not is_hub_id(model):
        raise UserInputError(f"--model {model}: no such folder (and not a hub id of the form owner/name)")
    try:
        with diffusers_logs_on_success():
            pipe = LatentDDPMPipeline.from_pretrained(model, use_safetensors=True)  # never pickled .bin weights
    except UserInputError as err:  # already one line (the hub, a malformed model_index.json)
        raise UserInputError(f"--model {err}" if str(err).startswith(model) else f"--model {model}: {err}") from None
    except Exception as err:  # noqa: BLE001 - hub, file and config errors all mean "cannot load this"
        raise UserInputError(f"--model {model}: cannot load the pipeline ({type(err).__name__}: "
                             f"{first_line(err)})") from err
    channels = pipe.unet.config.in_channels
    for name in ("latents_mean", "latents_std"):
        stats = getattr(pipe.config, name, None)
        if stats is not None and len(stats) not in (1, channels):
            raise UserInputError(f"--model {model}: model_index.json's {name} has {len(stats)} values but the UNet "
                                 f"has {channels} channels; re-save the pipeline with one value per channel")
    pipe.to(device)
    # The pipeline casts the UNet's input and output itself; plain Module.to skips diffusers' dtype warning.
    torch.nn.Module.to(pipe.unet, DTYPES[mixed_precision])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def distributed_state() -> PartialState:
    """accelerate's process state, for `accelerate launch` and `torchrun` alike.

    CPU processes are used when ACCELERATE_USE_CPU is set or when
    several processes are launched without CUDA; a launch that accelerate does not pick up is an error
    (each process would otherwise compute every sample).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or (world > 1 and not torch.cuda.is_available()))
    if state.num_processes != world:
        raise UserInputError(f"launched as {world} processes but accelerate sees {state.num_processes}; "
                             "on CPU launch with ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N")
    return state


def first_error(error: str | None) -> str | None:
    """The first process's error among every process's `error` (None when none failed). A collective, hence a
    barrier too: every process calls it and all get the same verdict, instead of one failing alone while the
    others wait for it (or die in the next collective with a traceback)."""
    return next((e for e in gather_object([error]) if e is not None), None)


def make_scheduler(name: str, config, *, guided: bool = False) -> SchedulerMixin:
    """Build the scheduler `name` (see `SCHEDULERS`) from a saved scheduler config. `guided`: the sampling
    uses classifier-free guidance, which selects the deterministic DPM-Solver++'s order (`DPM_SOLVER_ORDER`).
    The multistep solvers' order and every sampler's `TIMESTEP_SPACING` are always set, so a config taken from
    another sampler, or a pipeline saved with diffusers' "leading" spacing, cannot carry its own; `--scheduler_config`
    (`configure_scheduler`) may still change either."""
    if name not in SCHEDULERS:
        raise UserInputError(f"unknown --scheduler {name!r}; valid names: {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    overrides = {"timestep_spacing": TIMESTEP_SPACING, **overrides}
    if name == "dpmsolver++":
        overrides = {**overrides, "solver_order": DPM_SOLVER_ORDER["guided" if guided else "unguided"]}
    elif name in ("sde-dpmsolver++", "hybrid-dpmsolver++", "unipc"):
        overrides = {**overrides, "solver_order": 2}  # diffusers' default (and its advice for the SDE form)
    return cls.from_config(config, **overrides)


def saved_scheduler(scheduler: SchedulerMixin) -> SchedulerMixin:
    """The pipeline's own scheduler, as sampling with no named sampler uses it: with `TIMESTEP_SPACING`, like
    every scheduler `make_scheduler` builds. A pipeline saved before trailing spacing became the default
    carries diffusers' "leading", which starts DDPM at t = T - T // n at n < T steps; `--scheduler_config
    '{"timestep_spacing": "leading"}'` (`configure_scheduler`) still restores it."""
    spacing = getattr(scheduler.config, "timestep_spacing", None)
    takes_spacing = "timestep_spacing" in inspect.signature(type(scheduler).__init__).parameters
    if spacing == TIMESTEP_SPACING or not takes_spacing:
        return scheduler
    return type(scheduler).from_config(scheduler.config, timestep_spacing=TIMESTEP_SPACING)


def configure_scheduler(scheduler: SchedulerMixin, overrides: dict, num_inference_steps: int, channels: int = 4
                        ) -> SchedulerMixin:
    """`scheduler` rebuilt with the options of `--scheduler_config` (a dict, see `errors.json_object`), e.g.
    `{"use_karras_sigmas": true}` or `{"timestep_spacing": "trailing"}`, checked so that a bad option is one
    `UserInputError` line before any sampling: every key must be an argument of the scheduler's class and not
    one of `TRAINING_SCHEDULER_KEYS`, with a value of its default's type; the result must take
    `num_inference_steps` (`inference_steps_error`) and, tried on a copy with random (B=1, `channels`, 2, 2)
    inputs, step only through training timesteps and end finite."""
    cls, flag = type(scheduler), f"--scheduler_config {json.dumps(overrides)}"
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k not in ("self", "kwargs")}
    valid = sorted(set(params) - TRAINING_SCHEDULER_KEYS)
    unknown = sorted(set(overrides) - set(params) - TRAINING_SCHEDULER_KEYS)
    if unknown:
        raise UserInputError(f"--scheduler_config: {cls.__name__} has no setting {', '.join(unknown)}; "
                             f"valid: {', '.join(valid)}")
    fixed = sorted(set(overrides) & TRAINING_SCHEDULER_KEYS)
    if fixed:
        raise UserInputError(f"--scheduler_config: {', '.join(fixed)} is fixed by the model's training (its "
                             "saved scheduler config); choose sampler settings only")
    for key, value in overrides.items():
        default = params[key].default
        kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(default))
        if kinds and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
            raise UserInputError(f"--scheduler_config: {key} takes a {type(default).__name__} (like its default "
                                 f"{json.dumps(default)}), got {json.dumps(value)}")
    if "solver_order" in overrides and overrides["solver_order"] not in SOLVER_ORDERS:
        raise UserInputError(f"--scheduler_config: solver_order must be one of {SOLVER_ORDERS}, "
                             f"got {overrides['solver_order']}")
    if str(overrides.get("variance_type", "")).startswith("learned"):
        raise UserInputError("--scheduler_config: a learned variance_type needs a UNet that predicts the variance; "
                             "this one does not (use fixed_small or fixed_large)")
    for key, value in overrides.items():  # diffusers types its string options as Literal[...]; some fall back silently
        if (allowed := literal_values(cls, key)) is not None and value not in allowed:
            usable = [json.dumps(v) for v in allowed if not str(v).startswith("learned")]  # see the check above
            raise UserInputError(f"--scheduler_config: {key} must be one of {', '.join(usable)} for {cls.__name__}, "
                                 f"got {json.dumps(value)}")
    if overrides.get("steps_offset", 0) < 0:
        raise UserInputError(f"--scheduler_config: steps_offset must be >= 0, got {overrides['steps_offset']}")
    try:
        configured = cls.from_config(scheduler.config, **overrides)
    except Exception as err:  # noqa: BLE001 - any failure of these settings is bad input, said in one line
        raise UserInputError(f"{flag}: {cls.__name__} refuses it ({type(err).__name__}: {first_line(err)})") from err
    if error := inference_steps_error(configured, num_inference_steps):
        raise UserInputError(f"{flag}: {error}")
    if failure := scheduler_problem(configured, num_inference_steps, channels):
        raise UserInputError(f"{flag}: {cls.__name__} cannot sample {num_inference_steps} steps with it ({failure})")
    return configured


def literal_values(cls: type, key: str) -> tuple | None:
    """The values `cls.__init__` allows for `key` when its annotation lists them (`Literal[...]`, maybe
    `| None`), else None (no list to check against: an older diffusers, or a free-form option)."""
    try:
        hint = typing.get_type_hints(cls.__init__).get(key)
    except Exception:  # noqa: BLE001 - an annotation this Python cannot resolve: nothing to check against
        return None
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    values: list = []
    for part in typing.get_args(hint) if union else (hint,):
        if typing.get_origin(part) is typing.Literal:
            values += typing.get_args(part)
        elif part is type(None):
            values.append(None)
        else:
            return None
    return tuple(values) if values and values != [None] else None


def scheduler_problem(scheduler: SchedulerMixin, num_inference_steps: int, channels: int = 4) -> str | None:
    """Why `scheduler` cannot sample `num_inference_steps` steps for this UNet, or None: a learned variance (the
    UNet predicts none), a negative steps_offset, a step count it refuses, or, tried on a copy with random
    (1, `channels`, 2, 2) inputs, a step outside the training timesteps, an error or non-finite values (a bad
    prediction_type, betas beyond 1, ...). Used for `--scheduler_config` and for a pipeline's saved config."""
    with warnings.catch_warnings():  # numpy/torch warnings of the probe on bad settings: the verdict says it all
        warnings.simplefilter("ignore")
        return _scheduler_problem(scheduler, num_inference_steps, channels)


def _scheduler_problem(scheduler: SchedulerMixin, num_inference_steps: int, channels: int) -> str | None:
    config = scheduler.config
    if str(getattr(config, "variance_type", None) or "").startswith("learned"):
        return "a learned variance_type needs a UNet that predicts the variance; this one does not"
    if (getattr(config, "steps_offset", 0) or 0) < 0:
        return f"steps_offset must be >= 0, got {config.steps_offset}"
    if error := inference_steps_error(scheduler, num_inference_steps):
        return error
    try:
        probe = type(scheduler).from_config(config)
        probe.set_timesteps(num_inference_steps)
        if len(probe.timesteps) == 0:  # e.g. DPM-Solver's lambda_min_clipped above every noise level
            return "these settings leave no denoising step: the samples would be the starting noise"
        with torch.random.fork_rng(devices=[]):  # stochastic steps draw from the global generator: keep it
            torch.manual_seed(0)
            x = torch.randn(1, channels, 2, 2) * probe.init_noise_sigma
            for t in probe.timesteps:
                x = probe.step(0.1 * torch.randn_like(x), t, probe.scale_model_input(x, t)).prev_sample
        steps = probe.timesteps.float()
        outside = bool((steps < 0).any() or (steps > config.num_train_timesteps - 1).any())
        return ("steps outside the training timesteps" if outside else
                None if torch.isfinite(x).all() else "non-finite samples")
    except Exception as err:  # noqa: BLE001 - any failure of these settings is bad input, said in one line
        return f"{type(err).__name__}: {first_line(err)}"


def steps_taken(scheduler: SchedulerMixin, num_inference_steps: int) -> int:
    """How many timesteps `scheduler` (a copy of it) steps through when asked for `num_inference_steps`: fewer
    when a setting such as DPM-Solver's `lambda_min_clipped` cuts the trajectory and equal steps merge."""
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(num_inference_steps)
    return len(probe.timesteps)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` in a run with `seed`: a SeedSequence hash, so nearby seeds do not overlap."""
    hi, lo = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return (int(hi) << 31) ^ int(lo)  # < 2**63, a valid torch seed


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample index (CPU noise is the same on every device)."""
    return [torch.Generator("cpu").manual_seed(sample_seed(seed, int(i))) for i in indices]


def parse_class_labels(spec: Sequence[str] | None, class_ids: list[int] | None) -> list[int] | None:
    """`--class_labels` values -> a list of labels to cycle through (None: unconditional).

    `class_ids` are the model's classes (`LatentDDPMPipeline.trained_class_ids`: the ids in its training data, or
    0..num_class_embeds-1 for a pipeline that does not record them; None for an unconditional model). `all`
    cycles through them; other labels must be integers among them; a model without class embeddings accepts none.
    """
    if not spec:
        return None
    if class_ids is None:
        raise UserInputError("--class_labels given, but the model is unconditional (num_class_embeds=None)")
    if list(spec) == ["all"]:
        return list(class_ids)
    try:
        labels = [int(v) for v in spec]
    except ValueError:
        raise UserInputError(f"--class_labels takes integers or 'all', got {' '.join(spec)}") from None
    known = set(class_ids)
    bad = list(dict.fromkeys(v for v in labels if v not in known))
    if bad:
        raise UserInputError(f"--class_labels {', '.join(map(str, bad))}: not a class this model was trained on; "
                             f"its classes are {format_class_ids(class_ids)}")
    return labels


def labels_for(indices: Sequence[int], cycle: list[int] | None) -> list[int] | None:
    """The label of each sample index: `cycle[i % len(cycle)]` (independent of batches and processes)."""
    return None if cycle is None else [cycle[int(i) % len(cycle)] for i in indices]
