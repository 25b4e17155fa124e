"""`LatentDDPMPipeline`: sample latents from an `AdvancedUNet2DModel` with any diffusers scheduler."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .unet import AdvancedUNet2DModel

# The default noise schedule: DDPM (Ho et al. 2020, sec. 4) with 1000 linear betas from 1e-4 to
# 0.02. clip_sample is off: latents are not images in [-1, 1], and clipping destroys them.
DEFAULT_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False
)


@dataclass
class LatentPipelineOutput(BaseOutput):
    """Output of `LatentDDPMPipeline`: `latents` (B, C, H, W) in the data's own scale."""

    latents: np.ndarray | torch.Tensor


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
    """

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: AdvancedUNet2DModel,
        scheduler: SchedulerMixin,
        latents_mean: list[float] | float | None = None,
        latents_std: list[float] | float | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(latents_mean=_as_list(latents_mean), latents_std=_as_list(latents_std))

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
    ) -> LatentPipelineOutput | tuple:
        """Run the reverse diffusion process.

        Args:
            batch_size: number of latents (ignored when `latents` is given).
            num_inference_steps: denoising steps; None means every training step for DDPM
                (the original's ancestral sampler) and 50 for other schedulers.
            generator: one generator, or one per sample (results then do not depend on batch size).
            class_labels: one label per sample for a class-conditional UNet.
            guidance_scale: classifier-free guidance weight w (Ho & Salimans 2022); 1 disables it.
            eta: DDIM's eta (0 is deterministic); used by schedulers whose `step` accepts it.
            latents: starting noise (B, C, H, W) instead of drawing it.
            output_type: "np" (float32 numpy) or "pt" (torch tensor).
        """
        if output_type not in ("np", "pt"):
            raise ValueError(f"output_type must be 'np' or 'pt', got {output_type!r}")
        unet, device = self.unet, self._execution_device
        c, size = unet.config.in_channels, unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if latents is not None:
            batch_size = latents.shape[0]
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
        for name in ("latents_mean", "latents_std"):
            stats = getattr(self.config, name, None)
            if stats is not None and len(stats) not in (1, c):
                raise ValueError(f"{name} has {len(stats)} values; expected 1 or one per channel ({c})")

        # 1. Class labels; with guidance the batch is [conditional, unconditional].
        labels = None
        if unet.config.num_class_embeds is not None and class_labels is not None:
            labels = torch.as_tensor(class_labels, device=device, dtype=torch.long).reshape(-1)
            if labels.shape[0] != batch_size:
                raise ValueError(f"got {labels.shape[0]} class_labels for a batch of {batch_size}")
            bad = (labels < 0) | (labels >= unet.config.num_class_embeds)
            if bad.any():
                raise ValueError(f"class_labels must lie in 0..{unet.config.num_class_embeds - 1}")
        elif class_labels is not None:
            raise ValueError("class_labels given, but the UNet is unconditional (num_class_embeds=None)")
        use_cfg = labels is not None and guidance_scale != 1.0
        if use_cfg:
            labels = torch.cat([labels, torch.full_like(labels, unet.null_class_label)])

        # 2. Start from x_T ~ N(0, I), scaled as the scheduler expects. set_timesteps comes first:
        # init_noise_sigma (Euler, Heun, ...) depends on the timesteps it sets.
        if num_inference_steps is None:
            num_inference_steps = self.scheduler.config.num_train_timesteps if isinstance(
                self.scheduler, DDPMScheduler) else 50
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if latents is None:
            latents = randn_tensor((batch_size, c, h, w), generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma
        step_kwargs = {"generator": generator} if _accepts(self.scheduler.step, "generator") else {}
        if _accepts(self.scheduler.step, "eta"):
            step_kwargs["eta"] = eta

        # 3. Reverse process: predict with the UNet, then let the scheduler take x_t -> x_{t-1}.
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = self.scheduler.scale_model_input(latents, t)
            model_in = torch.cat([model_in, model_in]) if use_cfg else model_in
            pred = unet(model_in.to(unet.dtype), t, class_labels=labels).sample.float()
            if use_cfg:
                # eps~ = eps(x, c) + w * (eps(x, c) - eps(x, null)) with w = guidance_scale - 1.
                cond, uncond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(pred, t, latents, **step_kwargs).prev_sample

        # 4. Back to the data's scale.
        latents = self._denormalize(latents)
        self.maybe_free_model_hooks()
        out = latents.cpu().numpy() if output_type == "np" else latents
        return LatentPipelineOutput(latents=out) if return_dict else (out,)


def _as_list(value: list[float] | float | np.ndarray | torch.Tensor | None) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters
