"""What a training run leaves behind: the pipeline (EMA weights), previews, the loss curve and quality figures,
and the log's warning when the loss shows the run has diverged."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import DDPMScheduler

from .checkpointing import list_checkpoints
from .errors import UserInputError
from .images import save_image_grid
from .pipeline import LatentDDPMPipeline
from .plots import save_latent_grid, save_loss_curve
from .sampling import make_scheduler, sample_generators, scheduler_problem
from .unet import AdvancedUNet2DModel

if TYPE_CHECKING:
    from .checkpoint_uploads import CheckpointUploader

# Reference latents for the end-of-run quality figures: a bounded set keeps them a few seconds on CPU.
MAX_REFERENCE = 4096
# Latents decoded per autoencoder call for the image previews: bounds the decoder's memory.
DECODE_BATCH = 8
#: Sampler of the previews and the final quality figures: DPM-Solver++'s stochastic (SDE) form, diffusers' own. At 20
#: steps its Frechet distance averages 6.76 over six training seeds of the 2000-step demo model against the
#: deterministic form's 7.08, and 7.03 against 8.78 on the seed preset. `hybrid-dpmsolver++` beats both on the small
#: preset's seeds but not on the seed preset's, so it is not the default (docs/benchmarks.md, "Tenth session").
PREVIEW_SAMPLER = "sde-dpmsolver++"
#: Steps whose losses the divergence check averages (one step's loss varies several-fold with its timesteps).
SPIKE_WINDOW = 50
#: A window mean this many times the lowest one after warm-up is reported as a likely divergence. Window means
#: of a healthy run vary by about 20%; the seed preset's divergence at lr 2e-3 reached 3.4x (docs/benchmarks.md).
SPIKE_FACTOR = 2.0


class DivergenceWatch:
    """Warns once when the mean loss of the last `SPIKE_WINDOW` steps exceeds `SPIKE_FACTOR` times the lowest
    such mean seen after the learning-rate warm-up: a loss that jumps and stays up (the run has likely diverged)
    is named in the log while training goes on, instead of showing only in the samples at the end."""

    def __init__(self, warmup_steps: int):
        self.start, self.lowest, self.warned = warmup_steps + SPIKE_WINDOW, math.inf, False

    def update(self, step: int, losses: list[float]) -> str | None:
        """The warning's text the first time the check fails at `step` (losses: one per step, newest last)."""
        if self.warned or step < self.start or len(losses) < SPIKE_WINDOW:
            return None
        recent = [v for v in losses[-SPIKE_WINDOW:] if math.isfinite(v)]  # skipped steps log nan
        if not recent:
            return None
        mean = sum(recent) / len(recent)
        self.lowest = min(self.lowest, mean)
        if mean <= SPIKE_FACTOR * self.lowest:
            return None
        self.warned = True
        return (f"the loss over the last {SPIKE_WINDOW} steps ({mean:.4g}, step {step}) is {mean / self.lowest:.1f}x "
                f"its lowest ({self.lowest:.4g}): training has likely diverged; resume from an earlier checkpoint "
                f"or restart with a lower --learning_rate")


def nonfinite_stop(count: int, step: int, train_dir: Path, resume: Path | None) -> UserInputError:
    """The error that stops a run after `count` non-finite losses in a row at `step`, naming the last good
    checkpoint (this run's newest, else the one it resumed)."""
    kept = list_checkpoints(train_dir)
    last = kept[-1][1] if kept else resume
    return UserInputError(f"{count} non-finite losses in a row at step {step}; stopping. Lower --learning_rate, use "
                          "--mixed_precision bf16 or no, or check the data; " +
                          (f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"))


def record_epoch(history: dict, global_step: int, steps_per_epoch: int) -> None:
    """Add the epoch that ends at `global_step` to `history` (`epoch_ends`, `epoch_means`): the mean loss of its
    steps in the history (all of them, unless the run resumed from a checkpoint of an older version)."""
    recent = zip(history["steps"][-steps_per_epoch:], history["losses"][-steps_per_epoch:], strict=True)
    epoch_losses = [loss for step, loss in recent if step > global_step - steps_per_epoch]
    if epoch_losses:
        history["epoch_ends"].append(global_step)
        history["epoch_means"].append(sum(epoch_losses) / len(epoch_losses))


def build_pipeline(unet: AdvancedUNet2DModel, ema, noise_scheduler: DDPMScheduler, stats, vae=None,
                   class_ids: list[int] | None = None) -> LatentDDPMPipeline:
    """A CPU/device copy of the model with the EMA weights (when EMA is on), paired with the training
    schedule, the data's normalisation, the class ids in the data (a class-conditional model) and, if given, the
    autoencoder that decodes the latents (the data's encoding.json names it:
    `latent_ddpm.autoencoder.read_encoding_info` + `load_vae`). The global random state
    is left as it was (the copy's initialisation draws from it), so a run that builds one at a checkpoint or an
    epoch's end trains on exactly as one resumed from there does."""
    with keep_random_state(next(unet.parameters()).device):
        model = AdvancedUNet2DModel.from_config(unet.config)
    model = model.to(next(unet.parameters()).device)
    model.load_state_dict(unet.state_dict())
    if ema is not None:
        ema.copy_to(model.parameters())
    scheduler = DDPMScheduler.from_config(noise_scheduler.config)
    pipe = LatentDDPMPipeline(unet=model.eval(), scheduler=scheduler, latents_mean=stats.mean, latents_std=stats.std,
                              vae=vae, class_ids=class_ids)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def keep_random_state(device: torch.device) -> contextlib.AbstractContextManager:
    """`torch.random.fork_rng` over the CPU and, on a GPU, `device`: whatever runs inside leaves the global random
    state (dropout's, for one) untouched."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def save_decoded_grid(pipe: LatentDDPMPipeline, latents: np.ndarray, path: Path) -> None:
    """With a vae in `pipe`, decode `latents` (in batches of `DECODE_BATCH`) and write them as an image grid."""
    if getattr(pipe, "vae", None) is None or not len(latents):
        return
    images = [pipe.decode_latents(latents[i:i + DECODE_BATCH]) for i in range(0, len(latents), DECODE_BATCH)]
    save_image_grid(path, np.concatenate(images))


def schedule_error(scheduler: DDPMScheduler, cfg, channels: int) -> str | None:
    """Why the previews' sampler cannot sample the training noise schedule `scheduler` (one line naming the
    flags), or None. A schedule whose alpha_bar underflows (very many or very large betas) trains, but its noise
    levels repeat and no sampler can use it."""
    problem = scheduler_problem(make_scheduler(PREVIEW_SAMPLER, scheduler.config), cfg.preview_inference_steps,
                                channels)
    if problem is None:
        return None
    return (f"--num_train_timesteps {cfg.num_train_timesteps} --beta_schedule {cfg.beta_schedule} --beta_start "
            f"{cfg.beta_start} --beta_end {cfg.beta_end}: the previews' {PREVIEW_SAMPLER} cannot sample this noise "
            f"schedule at --preview_inference_steps {cfg.preview_inference_steps} ({problem}); the default schedule "
            "is 1000 linear steps from 1e-4 to 0.02")


def sample_for_preview(pipe: LatentDDPMPipeline, num: int, steps: int, seed: int, batch_size: int = 64
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """`num` samples with `PREVIEW_SAMPLER` (`steps` steps), one generator per sample (batch-size independent);
    class labels cycle through the trained class ids (`pipe.trained_class_ids()`) when the model is conditional."""
    scheduler = pipe.scheduler
    pipe.scheduler = make_scheduler(PREVIEW_SAMPLER, scheduler.config)
    ids = pipe.trained_class_ids()
    labels = np.array(ids, dtype=np.int64)[np.arange(num) % len(ids)] if ids else None
    out = []
    try:
        for start in range(0, num, batch_size):
            idx = range(start, min(num, start + batch_size))
            gens = sample_generators(seed, idx)
            kw = {"class_labels": labels[start:idx.stop].tolist()} if labels is not None else {}
            out.append(pipe(batch_size=len(idx), num_inference_steps=steps, generator=gens, **kw).latents)
    finally:
        pipe.scheduler = scheduler
    return np.concatenate(out), labels


def preview_grid(pipe: LatentDDPMPipeline, cfg, path: Path) -> None:
    """Write a grid of `cfg.num_preview_samples` samples of `pipe` (from `build_pipeline`) to `path`; when the
    pipeline has a vae, also the decoded images to `<path stem>_images.png`."""
    with keep_random_state(pipe.unet.device):  # samplers may draw from it: the run must not notice
        latents, labels = sample_for_preview(pipe, cfg.num_preview_samples, cfg.preview_inference_steps, cfg.seed)
    save_latent_grid(path, latents, labels=labels, title=path.stem)
    save_decoded_grid(pipe, latents, path.with_name(f"{path.stem}_images.png"))


#: What to do after the final report could not be written: the checkpoint of the last step is complete.
RECOVER_HINT = ("free disk space, then write it from the last checkpoint: the same command with "
                "--resume_from_checkpoint latest")


def save_pipeline_atomically(pipe: LatentDDPMPipeline, out: Path) -> None:
    """save_pretrained into a temporary folder, then swap it in: a crash never leaves half a pipeline. A write
    that fails (a full disk) removes the temporary folder and raises `UserInputError` naming `out`."""
    from safetensors import SafetensorError

    from .errors import UserInputError, first_line

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
    except (OSError, RuntimeError, SafetensorError) as err:  # safetensors reports a full disk as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserInputError(f"cannot write the pipeline {out} ({type(err).__name__}: {first_line(err)[:160]}); "
                             f"{RECOVER_HINT}") from None
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)  # left by a crash between the two renames below
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def push_checkpoint(pipe: LatentDDPMPipeline, ckpt: Path, uploader: CheckpointUploader) -> None:
    """Save `pipe` (from `build_pipeline`) as checkpoint `ckpt`'s `ckpt/pipeline` and hand it to `uploader`
    (one commit, in the background; a failed upload only warns)."""
    save_pipeline_atomically(pipe, ckpt / "pipeline")
    uploader.submit(ckpt / "pipeline", f"checkpoint {ckpt.name}", train_dir=ckpt.parent)


def final_report(pipe: LatentDDPMPipeline, cfg, dataset, run_dir: Path, history: dict, plan: str) -> dict:
    """Save `pipe` (from `build_pipeline`) as `run_dir/pipeline`, and under `run_dir/train`: loss_curve.png,
    samples.png (and decoded samples_images.png when it has a vae), metrics.json. A write that fails (a full
    disk) raises `UserInputError` saying how to write them from the last checkpoint."""
    from .errors import UserInputError

    try:
        return _write_final_report(pipe, cfg, dataset, run_dir, history, plan)
    except OSError as err:
        raise UserInputError(f"cannot write the final report in {run_dir} ({err.strerror or err}"
                             f"{': ' + str(err.filename) if err.filename else ''}); {RECOVER_HINT}") from None


def _write_final_report(pipe: LatentDDPMPipeline, cfg, dataset, run_dir: Path, history: dict, plan: str) -> dict:
    train_dir = run_dir / "train"
    save_pipeline_atomically(pipe, run_dir / "pipeline")
    if history["steps"]:
        save_loss_curve(train_dir / "loss_curve.png", history["steps"], history["losses"],
                        history["epoch_ends"], history["epoch_means"])
    metrics: dict = {"plan": plan, "final_loss": history["losses"][-1] if history["losses"] else None,
                     "skipped_steps": history["skipped"],
                     "rank_weight_checksums": history.get("rank_weight_checksums")}
    n_eval = max(cfg.num_eval_samples, cfg.num_preview_samples)
    if cfg.num_eval_samples or cfg.num_preview_samples:
        samples, labels = sample_for_preview(pipe, n_eval, cfg.preview_inference_steps, cfg.seed)
        metrics.update(sampler=PREVIEW_SAMPLER, inference_steps=cfg.preview_inference_steps)
        save_latent_grid(train_dir / "samples.png", samples[: cfg.num_preview_samples],
                         labels=None if labels is None else labels[: cfg.num_preview_samples], title="samples")
        save_decoded_grid(pipe, samples[: cfg.num_preview_samples], train_dir / "samples_images.png")
        if cfg.num_eval_samples:
            eval_labels = None if labels is None else labels[: cfg.num_eval_samples]
            metrics.update(quality_figures(samples[: cfg.num_eval_samples], eval_labels, dataset, cfg))
    (train_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return metrics


def quality_figures(samples: np.ndarray, labels: np.ndarray | None, dataset, cfg) -> dict:
    """Fréchet distance, precision/recall against the training data (and the demo judge on demo data)."""
    from .evaluate import K_NEIGHBOURS, evaluate, reference_rows

    n_ref = min(len(dataset), MAX_REFERENCE)
    if n_ref <= K_NEIGHBOURS:
        warnings.warn(f"{n_ref} training latents are too few for the quality figures (precision/recall need more "
                      f"than {K_NEIGHBOURS}); they are left out", stacklevel=2)
        return {}
    ref_x, ref_y = reference_rows(dataset, n_ref, with_labels=labels is not None)  # as evaluate's --reference
    # The real-vs-real baseline splits the reference in two halves, each of which needs more than k latents.
    out = {"evaluation": evaluate(samples, ref_x, sample_labels=labels, reference_labels=ref_y,
                                  baseline=n_ref // 2 > K_NEIGHBOURS)}
    if cfg.train_data is None:
        from .demo import demo_quality

        out["demo_quality"] = demo_quality(samples, labels)
    return out
