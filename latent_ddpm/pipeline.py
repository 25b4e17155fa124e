"""`LatentDDPMPipeline`: sample latents from an `AdvancedUNet2DModel` with any diffusers scheduler."""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .call_checks import check_call, check_callback, step_end_latents
from .unet import AdvancedUNet2DModel

# The default noise schedule: DDPM (Ho et al. 2020, sec. 4) with 1000 linear betas from 1e-4 to
# 0.02 (the same betas as TrainConfig's defaults; tests/test_diffusion.py pins them together; the hub copy
# of this file cannot import the config). clip_sample is off: latents are not images in [-1, 1], and
# clipping destroys them.
DEFAULT_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
    timestep_spacing="trailing",  # start at the last training step at any step count (sampling.TIMESTEP_SPACING)
)
# `output_type`s: latents ("np" float32 numpy, "pt" torch) and, with a `vae`, decoded images ("pil" a
# list of PIL images, "np_image" float numpy (B, H, W, 3) in [0, 1]).
LATENT_OUTPUT_TYPES, IMAGE_OUTPUT_TYPES = ("np", "pt"), ("pil", "np_image")


@dataclass
class LatentPipelineOutput(BaseOutput):
    """Output of `LatentDDPMPipeline`: `latents` (B, C, H, W) in the data's own scale and, for the image
    output types, the decoded `images` (a list of PIL images, or float numpy (B, H, W, 3) in [0, 1])."""

    latents: np.ndarray | torch.Tensor
    images: list | np.ndarray | None = None


def inference_steps_error(scheduler: SchedulerMixin, num_inference_steps: int) -> str | None:
    """Why `num_inference_steps` cannot work with `scheduler`, or None: a step count its `set_timesteps` fails on
    (PNDM below 4), more steps than training timesteps, or repeated noise levels in a multistep solver
    (DPM-Solver++, UniPC: a `solver_order` in its config), which divides by the step size; with as many steps as
    training timesteps, diffusers' linspace spacing repeats a noise level and the zero step turns every sample
    into NaN. The check runs on a copy and looks at the noise levels stepped on (sigmas where the scheduler has
    them: Karras sigmas may map distinct sigmas to one integer timestep, which is fine). More steps than
    training timesteps are refused for every scheduler: the model knows that many noise levels, and some
    schedulers (LMS, SA-Solver, Karras sigmas) give NaN or fail past them, PNDM wrong samples."""
    limit = scheduler.config.get("num_train_timesteps")
    if limit and num_inference_steps > limit:
        return (f"{type(scheduler).__name__} cannot take {num_inference_steps} steps: the model was trained on "
                f"{limit} timesteps (num_train_timesteps); use at most {limit}")
    probe = type(scheduler).from_config(scheduler.config)
    try:  # every scheduler: PNDM below 4 steps failed in numpy ("operands could not be broadcast together")
        with warnings.catch_warnings():  # numpy/torch warnings on bad settings: the verdict below says it all
            warnings.simplefilter("ignore")
            probe.set_timesteps(num_inference_steps)
    except Exception as err:  # noqa: BLE001 - also a wrong-typed setting (TypeError, AttributeError): one line
        return f"{type(scheduler).__name__} cannot take {num_inference_steps} steps: {type(err).__name__}: {err}"
    if len(probe.timesteps) == 0:  # e.g. DPM-Solver's lambda_min_clipped above every noise level
        return (f"{type(scheduler).__name__} cannot take {num_inference_steps} steps: these settings leave no "
                "denoising step: the samples would be the starting noise")
    if "solver_order" not in scheduler.config:
        return None
    levels = getattr(probe, "sigmas", None)
    levels = probe.timesteps if levels is None else levels[: len(probe.timesteps)]
    if len(torch.unique(levels)) == len(levels):
        return None
    alphas_cumprod = getattr(probe, "alphas_cumprod", None)
    hint = ("alpha_bar reaches 0 in float32 (too many or too large betas), so no step count works"
            if alphas_cumprod is not None and float(alphas_cumprod[-1]) == 0 else "use fewer steps")
    return (f"{type(scheduler).__name__} cannot take {num_inference_steps} steps: its noise levels repeat and a "
            f"zero step gives NaN; {hint}")


def default_inference_steps(scheduler: SchedulerMixin) -> int:
    """The pipeline's step count when none is given: every training step for DDPM (the original's ancestral
    sampler), min(50, T - 1) for the others (fewer than T, for short schedules: see `inference_steps_error`)."""
    steps = scheduler.config.num_train_timesteps
    return steps if isinstance(scheduler, DDPMScheduler) else min(50, steps - 1)


def start_noise_sigma(scheduler: SchedulerMixin, device: torch.device | str = "cpu") -> float:
    """The scale of the starting noise, for a scheduler whose timesteps are set: the one that makes its first
    model input (after `scale_model_input`) unit-variance noise, as the UNet saw at the top training step. That
    is `init_noise_sigma`, except for the sigma-based schedulers (Euler, Euler ancestral, Heun, LMS, KDPM2)
    with "trailing" or "linspace" spacing: there diffusers gives sigma_max for sqrt(sigma_max^2 + 1), right only
    when sigma_max >> 1 (157 at T=1000); at T=50 (0.81) their noise was 37% short and the samples too narrow."""
    probe = copy.deepcopy(scheduler)  # scale_model_input may set the step index
    one = torch.ones(1, 1, 1, 1, device=device)
    return 1.0 / float(probe.scale_model_input(one, probe.timesteps[0]).reshape(-1)[0])


def default_scheduler(**overrides) -> DDPMScheduler:
    """A `DDPMScheduler` with the project's defaults (see `DEFAULT_SCHEDULER_CONFIG`)."""
    return DDPMScheduler(**{**DEFAULT_SCHEDULER_CONFIG, **overrides})


class LatentDDPMPipeline(DiffusionPipeline):
    """Generate latents with a trained `AdvancedUNet2DModel` and a diffusers scheduler.

    Args:
        unet: the denoiser; its config gives the latent shape (in_channels, sample_size).
        scheduler: any diffusers scheduler (default recipe: `DDPMScheduler`, see
            `default_scheduler`); swap with `Scheduler.from_config(pipe.scheduler.config)`.
        latents_mean, latents_std: the normalisation used in training, a list per channel or one
            number. The UNet works on `(x - mean) / std`; the pipeline returns `x` in the data's
            own scale. None means identity.
        vae: optional diffusers autoencoder (`AutoencoderKL`, `AutoencoderTiny`, ... anything with
            `.decode`) for `output_type="pil"`/`"np_image"`. Its `decode` gets the latents in the
            data's scale, so the data must be the autoencoder's raw (unscaled) latents, as
            `python -m latent_ddpm.encode` stores them (see docs/encode.md for scaled data). Saved
            with the pipeline (`vae/` subfolder), like diffusers' own pipelines.
        class_ids: for a class-conditional UNet, the class ids present in the training data (train.py
            records them; ids need not be 0..K-1). `class_labels` outside them are refused. None (an
            unconditional UNet, or a pipeline saved before they were recorded) means every id in
            0..num_class_embeds-1.
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]  # what callback_on_step_end can get (and replace)
    _interrupt, _num_timesteps = False, 0  # set by each call (diffusers' `interrupt`, `num_timesteps`)

    def __init__(
        self,
        unet: AdvancedUNet2DModel,
        scheduler: SchedulerMixin,
        latents_mean: list[float] | float | None = None,
        latents_std: list[float] | float | None = None,
        vae: AutoencoderKL | AutoencoderTiny | None = None,
        class_ids: list[int] | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(latents_mean=_as_list(latents_mean, "latents_mean"),
                                latents_std=_as_list(latents_std, "latents_std"),
                                class_ids=_as_class_ids(class_ids, unet.config.num_class_embeds))

    # Hub hooks (implemented in latent_ddpm/hub.py). The hub copy of this file (pipeline.py in uploaded
    # repos, generated by latent_ddpm.remote.code) drops these methods, as they import from the package.
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs) -> LatentDDPMPipeline:
        """`DiffusionPipeline.from_pretrained`, also for repo ids and for repos made by `push_to_hub`.

        Always builds this package's classes: a repo's remote code never runs, no `trust_remote_code`.
        """
        from .hub import load_pipeline

        return load_pipeline(cls, pretrained_model_name_or_path, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload with a model card and the code diffusers needs; see `latent_ddpm.hub.push_pipeline_to_hub`."""
        from .hub import push_pipeline

        return push_pipeline(self, repo_id, **kwargs)

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs) -> None:
        """`DiffusionPipeline.save_pretrained`; `push_to_hub=True` (with `repo_id`, `token`, ...) then uploads the
        folder as `push_to_hub` does: with the model card and the code diffusers needs to load it."""
        from .hub import save_pipeline

        save_pipeline(self, save_directory, *args, push_to_hub=push_to_hub, **kwargs)

    def trained_class_ids(self) -> list[int] | None:
        """The class ids to sample: the recorded `class_ids`, else (a pipeline saved before they were recorded)
        every id in 0..num_class_embeds-1; None for an unconditional UNet."""
        num_classes = self.unet.config.num_class_embeds
        if num_classes is None:
            return None
        ids = getattr(self.config, "class_ids", None)
        return list(ids) if ids is not None else list(range(num_classes))

    @property
    def num_timesteps(self) -> int:
        """`len(scheduler.timesteps)` of the current (or last) call: a step-end callback's step_index is 0..n-1."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """True once `pipe._interrupt = True` is set (in a step-end callback): this call skips its remaining steps."""
        return self._interrupt

    def _denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Map model-space latents back to the data's scale: x = z * std + mean."""
        shape = (1, -1, 1, 1)
        if self.config.latents_std is not None:
            z = z * torch.tensor(self.config.latents_std, dtype=z.dtype, device=z.device).view(shape)
        if self.config.latents_mean is not None:
            z = z + torch.tensor(self.config.latents_mean, dtype=z.dtype, device=z.device).view(shape)
        return z

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        class_labels: list[int] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
    ) -> LatentPipelineOutput | tuple:
        """Run the reverse diffusion process.

        Args:
            batch_size: number of latents (ignored when `latents` is given).
            num_inference_steps: denoising steps; None means every training step for DDPM
                (the original's ancestral sampler) and min(50, T - 1) for other schedulers.
            generator: one generator, or one per sample (results then do not depend on batch size).
            class_labels: one label per sample for a class-conditional UNet.
            guidance_scale: classifier-free guidance weight w (Ho & Salimans 2022); 1 disables it.
            eta: DDIM's eta (0 is deterministic); used by schedulers whose `step` accepts it.
            latents: starting noise (B, C, H, W) instead of drawing it.
            output_type: "np" (float32 numpy) or "pt" (torch tensor) latents; with a `vae`, "pil" (a list
                of PIL images) or "np_image" (float numpy (B, H, W, 3) in [0, 1]) decoded images, with
                the latents still in `.latents` (numpy). `return_dict=False` gives `(latents,)` or `(images,)`.
            callback_on_step_end: diffusers' step-end callback, `fn(pipe, step_index, timestep, callback_kwargs)
                -> dict`, or a `PipelineCallback`/`MultiPipelineCallbacks` (their `tensor_inputs` are then used),
                called after each scheduler step. `callback_kwargs["latents"]` are the loop's latents after that
                step: model space (normalised, `(x - mean) / std`, in the scheduler's own scale), before they are
                mapped back to the data's scale; "latents" in the returned dict replace them. Setting
                `pipe._interrupt = True` skips the remaining steps (the output is then the latents so far).
            callback_on_step_end_tensor_inputs: the names passed in `callback_kwargs`, among
                `_callback_tensor_inputs` (only "latents").
        """
        if output_type not in LATENT_OUTPUT_TYPES + IMAGE_OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {LATENT_OUTPUT_TYPES + IMAGE_OUTPUT_TYPES}, "
                             f"got {output_type!r}")
        if output_type in IMAGE_OUTPUT_TYPES and getattr(self, "vae", None) is None:
            raise ValueError(f"output_type={output_type!r} decodes with a vae, but this pipeline has none; pass "
                             "vae= (e.g. AutoencoderKL.from_pretrained(...)) or use output_type='np'")
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        unet, device = self.unet, self._execution_device
        c, size = unet.config.in_channels, unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        check_call(batch_size, num_inference_steps, generator, class_labels, guidance_scale, eta, latents, c,
                   getattr(unet, "downsample_factor", 1))  # a diffusers UNet2DModel (bench_quality) has none
        batch_size = latents.shape[0] if latents is not None else int(batch_size)  # numpy's numbers as Python's
        num_inference_steps = None if num_inference_steps is None else int(num_inference_steps)
        guidance_scale, eta = float(guidance_scale), float(eta)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
        for name in ("latents_mean", "latents_std"):
            stats = getattr(self.config, name, None)
            if stats is not None and len(stats) not in (1, c):
                raise ValueError(f"{name} has {len(stats)} values; expected 1 or one per channel ({c})")

        # 1. Class labels; with guidance the batch is [conditional, unconditional].
        labels = None
        if unet.config.num_class_embeds is not None and class_labels is not None:
            labels = torch.as_tensor(class_labels, device=device).reshape(-1).long()  # integers (check_call)
            if labels.shape[0] != batch_size:
                raise ValueError(f"got {labels.shape[0]} class_labels for a batch of {batch_size}")
            bad = (labels < 0) | (labels >= unet.config.num_class_embeds)
            if bad.any():
                raise ValueError(f"class_labels must lie in 0..{unet.config.num_class_embeds - 1}")
            ids = getattr(self.config, "class_ids", None)
            unseen = sorted(set(labels.tolist()) - set(ids)) if ids is not None else []
            if unseen:
                raise ValueError(f"class_labels {unseen} are not among the class ids this pipeline was trained on; "
                                 f"valid ids: {format_class_ids(ids)}")
        elif class_labels is not None:
            raise ValueError("class_labels given, but the UNet is unconditional (num_class_embeds=None)")
        use_cfg = labels is not None and guidance_scale != 1.0
        if use_cfg:
            labels = torch.cat([labels, torch.full_like(labels, unet.null_class_label)])

        # 2. Start from x_T ~ N(0, I), scaled as the scheduler expects. set_timesteps comes first:
        # the noise scale (Euler, Heun, ...) depends on the timesteps it sets.
        if num_inference_steps is None:
            num_inference_steps = default_inference_steps(self.scheduler)
        error = inference_steps_error(self.scheduler, num_inference_steps)
        if error:
            raise ValueError(error)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps, self._interrupt = len(self.scheduler.timesteps), False
        if latents is None:
            latents = randn_tensor((batch_size, c, h, w), generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32) * start_noise_sigma(self.scheduler, device)
        step_kwargs = {"generator": generator} if _accepts(self.scheduler.step, "generator") else {}
        if _accepts(self.scheduler.step, "eta"):
            step_kwargs["eta"] = eta

        # 3. Reverse process: predict with the UNet, then let the scheduler take x_t -> x_{t-1}.
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                continue
            model_in = self.scheduler.scale_model_input(latents, t)
            model_in = torch.cat([model_in, model_in]) if use_cfg else model_in
            pred = unet(model_in.to(unet.dtype), t, class_labels=labels).sample.float()
            if use_cfg:
                # eps~ = eps(x, c) + w * (eps(x, c) - eps(x, null)) with w = guidance_scale - 1.
                cond, uncond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(pred, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:  # diffusers' convention: returned tensors replace the loop's
                step_tensors = {"latents": latents}  # one entry per name in _callback_tensor_inputs
                kwargs = {k: step_tensors[k] for k in callback_on_step_end_tensor_inputs}
                latents = step_end_latents(callback_on_step_end(self, i, t, kwargs), latents)

        # 4. Back to the data's scale.
        latents = self._denormalize(latents)

        # 5. Optionally decode: the data's scale is the autoencoder's raw latent scale.
        if output_type in IMAGE_OUTPUT_TYPES:
            images = self.decode_latents(latents, output_type)
            self.maybe_free_model_hooks()
            out = LatentPipelineOutput(latents=latents.cpu().numpy(), images=images)
            return out if return_dict else (images,)
        self.maybe_free_model_hooks()
        out = latents.cpu().numpy() if output_type == "np" else latents
        return LatentPipelineOutput(latents=out) if return_dict else (out,)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor | np.ndarray, output_type: str = "np_image") -> list | np.ndarray:
        """Decode raw latents (B, C, H, W) with `self.vae.decode` into "pil" images or "np_image" floats in [0, 1]."""
        vae = self.vae
        channels = getattr(vae.config, "latent_channels", None)
        if channels is not None and latents.shape[1] != channels:
            raise ValueError(f"the vae decodes {channels}-channel latents, but these have {latents.shape[1]}")
        z = torch.as_tensor(latents).to(device=vae.device, dtype=vae.dtype)
        image = vae.decode(z, return_dict=False)[0]
        image = (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # [-1, 1] -> [0, 1]
        return self.numpy_to_pil(image) if output_type == "pil" else image


def _as_list(value: list[float] | float | np.ndarray | torch.Tensor | None, name: str) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    try:
        values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or a list of numbers (one per channel), got {value!r}") from None
    if not all(math.isfinite(v) for v in values) or (name == "latents_std" and min(values) <= 0):
        raise ValueError(f"{name} must be finite{' and > 0' if name == 'latents_std' else ''}, got {values}")
    return values


def format_class_ids(ids: list[int], limit: int = 10) -> str:
    """`ids` for a message: all of them, or the first `limit` and how many in all."""
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown if len(ids) <= limit else f"{shown}, ... ({len(ids)} ids)"


def _as_class_ids(value, num_class_embeds: int | None) -> list[int] | None:
    """`class_ids` as a sorted list of distinct ints, each an id the UNet embeds (0..num_class_embeds-1)."""
    if value is None:
        return None
    if num_class_embeds is None:
        raise ValueError("class_ids given, but the UNet is unconditional (num_class_embeds=None); leave it None")
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        raise ValueError(f"class_ids must be a non-empty list of integer class ids, got {value!r}")
    ids = sorted({int(v) for v in value})
    if ids[0] < 0 or ids[-1] >= num_class_embeds:
        raise ValueError(f"class_ids must lie in 0..{num_class_embeds - 1} (the UNet's num_class_embeds is "
                         f"{num_class_embeds}), got {format_class_ids(ids)}")
    return ids


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters
