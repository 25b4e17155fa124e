"""The typed training configuration: one dataclass and its validation.

Every hyperparameter is declared once, below, with its default and a comment (the `help` text). The
command-line flags and `--config FILE` derive from the fields (`latent_ddpm.flags.parse_train_args`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserInputError, json_object
from .evaluate import K_NEIGHBOURS
from .unet import PRESETS

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
NORMALIZATIONS = ("channel", "global", "none")
MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("none", "tensorboard", "wandb", "all")
#: Seeds feed numpy too, whose seeds are 32-bit.
MAX_SEED = 2**32 - 1
#: The longest --ddp_timeout accepted: 30 days is longer than any collective can legitimately wait (and far
#: inside what Python's timedelta holds).
MAX_DDP_TIMEOUT_S = 30 * 24 * 3600
#: The largest value of any integer setting (training steps and epochs among them): far beyond any run, and
#: small enough for float arithmetic.
MAX_STEPS = 10**12
#: The rate diffusers' "polynomial" schedule decays to (its `lr_end`): the peak rate must lie above it.
POLYNOMIAL_LR_END = 1e-7
#: The most diffusion steps accepted: 100x DDPM's 1000 (the schedule's tables are allocated before any check
#: of the schedule can run; 1e10 steps asked for 40 GB).
MAX_TRAIN_TIMESTEPS = 100_000
#: Most preview samples: a grid shows at most plots.MAX_CELLS (256; not imported here, to keep matplotlib out of
#: the config), and every mid-run preview samples them all.
MAX_PREVIEW_SAMPLES = 256
#: Most samples for train.py's final quality figures: FID's customary 50k. They are held in memory and sampled
#: after training, so a mistyped count must fail before the run, not exhaust the memory at its end.
MAX_EVAL_SAMPLES = 50_000
#: Peak AdamW learning rate of the default recipe at LR_REFERENCE_WIDTH channels: the small preset's widest layer,
#: where 1e-3, 2e-3 and 4e-3 trained equally well on the demo latents at batch 32 (docs/benchmarks.md).
LR_AT_REFERENCE_WIDTH = 2e-3
#: Wider models get a proportionally smaller default rate (Adam's stable step for hidden layers shrinks as
#: 1/width: Yang et al. 2022, muP). At 2e-3 the seed preset (256 wide) diverged at step ~1900 at batch 32 on
#: the demo latents, on a GPU and on a CPU, and trained stably at 1e-3 (docs/benchmarks.md, seventh session).
LR_REFERENCE_WIDTH = 128


def _f(default, help: str, **kw):  # noqa: A002 - the field's help text doubles as its comment
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything `train.py` needs; saved as `train/config.json` beside each run."""

    # --- Data -------------------------------------------------------------------------------------
    train_data: str | None = _f(None, "latents: .npz/.npy/.safetensors file, Arrow/Parquet file, saved dataset "
                                      "folder or folder of .parquet shards (see --train_split), or hub dataset id; "
                                      "none = the built-in demo latents", alias="--latent")
    train_split: str = _f("train", "the split to train on, for a source that has splits: a saved DatasetDict, a folder "
                                   "of .parquet shards (train-*, test-*, ...) or a hub dataset")
    dataset_config_name: str | None = _f(None, "the subset (config) of a hub dataset, or of a folder of .parquet "
                                               "shards whose README.md declares several; none = its default")
    latent_key: str = _f("X", "array key / column of the latents")
    label_key: str = _f("y", "array key / column of the integer labels (optional)")
    normalization: str = _f("channel", "latent standardisation: per-channel mean/std (channel), one mean/std "
                                       "(global) or none", choices=NORMALIZATIONS)
    scaling_factor: float | None = _f(None, "use a fixed scale instead of statistics, as Stable Diffusion VAEs "
                                            "(mean 0, std 1/scaling_factor)")
    random_flip: bool = _f(False, "horizontal-flip augmentation")
    n_dim: int | None = _f(None, "expected latent channels (the original --n_dim); checked against the data")
    # --- Model ------------------------------------------------------------------------------------
    preset: str = _f("seed", "model preset: " + ", ".join(PRESETS) + " (seed = the original project's UNet)",
                     choices=tuple(PRESETS))
    model_config: str | None = _f(None, "JSON object (or .json file) overriding preset values, "
                                        "e.g. '{\"dropout\": 0.1}'")
    class_conditional: bool = _f(False, "condition on the data's labels (classifier-free guidance ready)")
    cond_drop_prob: float = _f(0.1, "probability of dropping the label during training (classifier-free guidance)")
    # --- Diffusion --------------------------------------------------------------------------------
    num_train_timesteps: int = _f(1000, "diffusion steps T (DDPM paper: 1000)", alias="--n_steps")
    beta_schedule: str = _f("linear", "noise schedule", choices=BETA_SCHEDULES)
    beta_start: float = _f(1e-4, "first beta", alias="--lbeta")
    beta_end: float = _f(0.02, "last beta", alias="--ubeta")
    prediction_type: str = _f("v_prediction", "model target; v-prediction (Salimans & Ho 2022) trains the "
                                              "best on latents", choices=PREDICTION_TYPES)
    snr_gamma: float | None = _f(5.0, "min-SNR-gamma loss weighting (Hang et al. 2023); 0 or none disables")
    snr_floor: float = _f(0.02, "lower bound on the min-SNR weight of the x0-error (v and sample prediction): "
                                "keeps the noisiest timesteps, where DDIM/DPM-Solver start, trained; 0 = plain "
                                "min-SNR")
    # --- Optimisation -----------------------------------------------------------------------------
    num_epochs: int | None = _f(None, "epochs (none: as many as max_train_steps needs)", alias="--epochs")
    max_train_steps: int | None = _f(None, "optimizer steps; overrides num_epochs (default when neither: "
                                           "50 epochs, the original's default)")
    train_batch_size: int = _f(32, "batch size per process", alias="--batch_size")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    learning_rate: float | None = _f(None, "AdamW peak learning rate; none: 2e-3 x min(1, 128 / the model's widest "
                                           "channel count), i.e. 2e-3 for tiny and small, 1e-3 for seed, 5e-4 for "
                                           "large (see default_learning_rate)", alias="--lr")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    # EDM2's value: the second-moment average spans ~1/(1 - beta2) = 100 steps, so a change in the gradients' scale
    # is followed within a hundred steps, not a thousand. 0.999 gave worse 20-step samples on 4 of 4 demo seeds
    # (DPM-Solver++ 20 FD 9.4 vs 7.1 on average; docs/benchmarks.md, "Ninth session").
    adam_beta2: float = _f(0.99, "AdamW beta2 (the second-moment average's decay)")
    adam_weight_decay: float = _f(0.01, "AdamW decoupled weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    lr_scheduler: str = _f("constant_with_warmup", "diffusers learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _f(200, "linear warm-up steps")
    max_grad_norm: float | None = _f(1.0, "gradient clipping by global norm; 0 or none disables")
    use_ema: bool = _f(True, "keep an exponential moving average of the weights (used for the saved pipeline)")
    ema_decay: float = _f(0.9999, "EMA decay ceiling")
    ema_power: float = _f(2 / 3, "EMA warm-up power: decay = 1 - (1 + step)^-power, capped at ema_decay")
    max_nonfinite_steps: int = _f(10, "stop after this many consecutive non-finite losses (each is skipped)")
    # --- Performance ------------------------------------------------------------------------------
    mixed_precision: str | None = _f(None, "no, fp16 or bf16 (default: accelerate's config, else no)",
                                     choices=MIXED_PRECISION)
    compile: bool = _f(False, "torch.compile the model")
    channels_last: bool = _f(False, "channels_last memory format")
    gradient_checkpointing: bool = _f(False, "trade compute for memory")
    allow_tf32: bool = _f(True, "TF32 matmuls and convolutions on Ampere+ GPUs (off: both in full fp32)")
    data_in_memory: bool | None = _f(None, "keep the whole dataset on the device (default: when it fits)")
    dataloader_num_workers: int = _f(0, "DataLoader workers when the data is streamed from disk")
    ddp_timeout: int = _f(1800, "seconds a process waits in a collective (e.g. for a rank that died) before "
                                "failing; torchrun usually stops the survivors sooner. Also bounds the other "
                                "ranks' wait for the main process's previews during training, and for a "
                                "checkpoint upload still running at the next checkpoint")
    # --- Outputs, logging, checkpoints ------------------------------------------------------------
    output_dir: str | None = _f(None, "run folder (default: runs/<data>_ddpm_<C>_<T>_<beta_start>_<beta_end>; <data> "
                                      "adds the subset and a split other than train)")
    overwrite_output_dir: bool = _f(False, "start fresh in an existing run folder (its checkpoints, pipeline and "
                                           "reports are deleted)")
    seed: int = _f(42, "seed of everything: init, data order, noise")
    logging_steps: int = _f(50, "read the loss and log every N optimizer steps (no host sync in between)")
    report_to: str = _f("none", "tracker", choices=REPORT_TO)
    save_images_epochs: int = _f(10, "write a preview grid every N epochs (0: only at the end)")
    num_preview_samples: int = _f(16, "samples in preview grids")
    preview_inference_steps: int = _f(25, "steps of the preview sampler (sde-dpmsolver++) for previews and the "
                                          "final quality figures")
    num_eval_samples: int = _f(1024, "samples for the final quality figures (0 disables); as many as each half of "
                                     "the real-vs-real baseline, so both FDs carry a similar small-sample bias")
    checkpointing_steps: int = _f(500, "save a resumable checkpoint every N optimizer steps")
    checkpoints_total_limit: int | None = _f(3, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = _f(None, "'latest' or a checkpoint folder")
    dry_run: bool = _f(False, "check the data, model and config, print the plan, write nothing")
    # --- Hub --------------------------------------------------------------------------------------
    push_to_hub: bool = _f(False, "upload the final pipeline to the Hugging Face Hub")
    hub_model_id: str | None = _f(None, "repository id, e.g. user/my-latent-ddpm")
    hub_private_repo: bool = _f(False, "create the repository as private")
    hub_token: str | None = _f(None, "token (default: the logged-in one or HF_TOKEN)")
    push_checkpoints: bool = _f(False, "also upload every checkpoint (in the background, training goes on)")

    # -----------------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Raise `UserInputError` naming the flag for the first invalid value."""
        def need(ok: bool, flag: str, msg: str) -> None:
            if not ok:
                raise UserInputError(f"--{flag}: {msg}")

        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise UserInputError(f"--{f.name}: {value!r} is not one of {', '.join(choices)}")
            if isinstance(value, float) or "float" in str(f.type) and isinstance(value, int):  # a config file's int
                need(_finite(value), f.name, f"must be a finite number, got {value!s:.20}")
            elif isinstance(value, int) and not isinstance(value, bool):  # none is meant to be this large
                need(abs(value) <= MAX_STEPS, f.name, f"must be at most {MAX_STEPS:.0e}, got {value!s:.20}")
        need(0 <= self.seed <= MAX_SEED, "seed", f"must be in 0..{MAX_SEED} (2**32 - 1), got {self.seed}")
        need(2 <= self.num_train_timesteps <= MAX_TRAIN_TIMESTEPS, "num_train_timesteps",
             f"must be in 2..{MAX_TRAIN_TIMESTEPS}, got {self.num_train_timesteps}")
        need(0 < self.beta_start < 1, "beta_start", f"must be in (0, 1), got {self.beta_start}")
        need(0 < self.beta_end < 1, "beta_end", f"must be in (0, 1), got {self.beta_end}")
        need(self.beta_start < self.beta_end, "beta_end",
             f"must be larger than --beta_start ({self.beta_start}), got {self.beta_end}")
        need(self.learning_rate is None or self.learning_rate > 0, "learning_rate",
             f"must be > 0, got {self.learning_rate}")
        for name in ("adam_beta1", "adam_beta2"):  # torch's AdamW would refuse them only once the run folder exists
            need(0 <= getattr(self, name) < 1, name, f"must be in [0, 1), got {getattr(self, name)}")
        need(self.adam_weight_decay >= 0, "adam_weight_decay", f"must be >= 0, got {self.adam_weight_decay}")
        need(self.adam_epsilon > 0, "adam_epsilon", f"must be > 0 (it keeps Adam's step finite where a gradient's "
                                                    f"second moment is 0), got {self.adam_epsilon}")
        need(self.train_batch_size >= 1, "train_batch_size", f"must be >= 1, got {self.train_batch_size}")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        need(self.num_epochs is None or self.num_epochs >= 1, "num_epochs", "must be >= 1")
        need(self.max_train_steps is None or self.max_train_steps >= 1, "max_train_steps", "must be >= 1")
        need(self.lr_warmup_steps >= 0, "lr_warmup_steps", "must be >= 0")
        need(self.max_grad_norm is None or self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        need(self.snr_gamma is None or self.snr_gamma >= 0, "snr_gamma", "must be >= 0")
        need(self.snr_floor >= 0, "snr_floor", f"must be >= 0, got {self.snr_floor}")
        need(not self.snr_gamma or self.snr_floor <= self.snr_gamma, "snr_floor",
             f"must be <= --snr_gamma ({self.snr_gamma}), the weight's cap (above it every timestep gets the same "
             f"weight), got {self.snr_floor}")
        need(0 <= self.cond_drop_prob < 1, "cond_drop_prob", f"must be in [0, 1), got {self.cond_drop_prob}")
        need(0 < self.ema_decay < 1, "ema_decay", f"must be in (0, 1), got {self.ema_decay}")
        need(self.ema_power > 0, "ema_power", "must be > 0")
        need(self.scaling_factor is None or self.scaling_factor > 0, "scaling_factor", "must be > 0")
        need(self.checkpointing_steps >= 1, "checkpointing_steps", "must be >= 1")
        need(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
             "checkpoints_total_limit", "must be >= 1")
        need(self.logging_steps >= 1, "logging_steps", "must be >= 1")
        need(self.save_images_epochs >= 0, "save_images_epochs", "must be >= 0")
        need(1 <= self.num_preview_samples <= MAX_PREVIEW_SAMPLES, "num_preview_samples",
             f"must be in 1..{MAX_PREVIEW_SAMPLES} (the cells of a preview grid), got {self.num_preview_samples}")
        need(1 <= self.preview_inference_steps <= self.num_train_timesteps, "preview_inference_steps",
             f"must be in 1..{self.num_train_timesteps} (--num_train_timesteps), got {self.preview_inference_steps}")
        need(self.num_eval_samples == 0 or K_NEIGHBOURS < self.num_eval_samples <= MAX_EVAL_SAMPLES,
             "num_eval_samples", f"must be 0 (no quality figures) or {K_NEIGHBOURS + 1}..{MAX_EVAL_SAMPLES} (precision/"
             f"recall's k-NN radii need more than {K_NEIGHBOURS}; for more, evaluate sample.py's output with python -m "
             f"latent_ddpm.evaluate), got {self.num_eval_samples}")
        need(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")
        need(self.dataloader_num_workers >= 0, "dataloader_num_workers", "must be >= 0")
        need(1 <= self.ddp_timeout <= MAX_DDP_TIMEOUT_S, "ddp_timeout",
             f"must be 1..{MAX_DDP_TIMEOUT_S} seconds (30 days), got {self.ddp_timeout}")
        need(not self.push_to_hub or bool(self.hub_model_id), "hub_model_id", "is required with --push_to_hub")
        for flag in ("hub_model_id", "hub_private_repo", "hub_token", "push_checkpoints"):  # else silently unused
            need(self.push_to_hub or not getattr(self, flag), flag, "only applies with --push_to_hub; add it to upload")
        if self.report_to in ("wandb", "tensorboard"):  # accelerate would only warn, and the run track nothing
            from accelerate.utils import is_tensorboard_available, is_wandb_available

            need(bool((is_wandb_available if self.report_to == "wandb" else is_tensorboard_available)()), "report_to",
                 f"{self.report_to} is not installed; pip install {self.report_to}, or pass --report_to none")
        need(bool(self.train_split.strip()), "train_split", "is empty; name a split (train, test, ...)")
        need(self.dataset_config_name is None or bool(self.dataset_config_name.strip()), "dataset_config_name",
             "is empty; name a subset, or leave the flag out for the default one")
        for flag in ("train_data", "output_dir", "resume_from_checkpoint"):  # before any file-system call trips
            need(getattr(self, flag) != "", flag, "is empty; name a path (an empty one means the current folder)")
            need(not _name_too_long(getattr(self, flag)), flag, "the path (or one of its names) is too long for "
                 "the file system; use a shorter one")
        overrides = self.model_overrides()  # parses --model_config
        from_data = sorted({"in_channels", "sample_size", "num_class_embeds"} & overrides.keys())
        need(not from_data, "model_config", f"{', '.join(from_data)} come from the data (its channels and size; its "
             "labels' classes with --class_conditional); drop them")
        if self.learning_rate is None:  # resolved here, so that the saved config holds the rate used
            self.learning_rate = default_learning_rate(self.preset, overrides)
        need(self.lr_scheduler != "polynomial" or self.learning_rate > POLYNOMIAL_LR_END, "learning_rate",
             f"must be above {POLYNOMIAL_LR_END:g}, the rate --lr_scheduler polynomial decays to, got "
             f"{self.learning_rate:g}; raise it or choose another --lr_scheduler")
        return self

    def model_overrides(self) -> dict:
        """The `--model_config` JSON (inline or a file) as a dict."""
        if not self.model_config:
            return {}
        return json_object(self.model_config, "--model_config", "AdvancedUNet2DModel arguments")

    def to_dict(self) -> dict:
        """JSON-able dict of every field (the hub token is never written; a local `train_data` is made absolute, so
        that the record names the data wherever it is read from: sample.py never writes over it). The record
        reproduces the run, not what was done to the folder before it: `overwrite_output_dir` is written False, so
        that `--config <run>/train/config.json` cannot delete that very run."""
        out = dataclasses.asdict(self)
        out["hub_token"], out["overwrite_output_dir"] = None, False
        if self.train_data is not None and os.path.exists(self.train_data):
            out["train_data"] = os.path.abspath(self.train_data)
        return out


def _finite(value: float | int) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def _name_too_long(path: str | None) -> bool:
    """Whether `path` (existing or not) has a name longer than its file system takes (NAME_MAX of its nearest
    existing folder), or is longer than PATH_MAX: such a path fails deep inside a run with ENAMETOOLONG."""
    if not path:
        return False
    full = Path(path).absolute()
    base = next((p for p in (full, *full.parents) if os.path.isdir(p)), Path("/"))
    try:
        name_max, path_max = os.pathconf(base, "PC_NAME_MAX"), os.pathconf(base, "PC_PATH_MAX")
    except (OSError, ValueError):  # a platform without these limits: let the file system say it
        return False
    return len(os.fsencode(full)) >= path_max or any(len(os.fsencode(part)) > name_max for part in full.parts)


def default_learning_rate(preset: str, overrides: dict) -> float:
    """`--learning_rate`'s default for a model: LR_AT_REFERENCE_WIDTH x min(1, LR_REFERENCE_WIDTH / its widest
    channel count), from the preset and `--model_config` overrides (an unreadable width, which the model's own
    validation reports later, counts as the reference width)."""
    model = {**PRESETS.get(preset, {}), **overrides}
    try:
        width = max(*model["down_channels"], *model["mid_channels"])
        scale = min(1.0, LR_REFERENCE_WIDTH / width) if width > 0 else 1.0
    except (KeyError, TypeError, ValueError):
        scale = 1.0
    return LR_AT_REFERENCE_WIDTH * scale


def __getattr__(name: str):
    """The flag parsing moved to `latent_ddpm.flags` (fourteenth session); the old imports keep working."""
    if name in ("parse_train_args", "build_parser", "load_config_file", "NONE_WORDS"):
        from . import flags

        return getattr(flags, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
