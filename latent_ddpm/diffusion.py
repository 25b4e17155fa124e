"""The training objective: noise schedule, targets and min-SNR weighting (diffusers schedulers underneath)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

# Warn when the schedule's last step keeps more than this fraction of the signal (alpha_bar_T):
# sampling starts from pure noise, so training must end close to it. 1000 linear steps end at
# ~4e-5; the original's default of 50 steps ended at ~0.6.
MAX_TERMINAL_ALPHA_BAR = 0.01


def build_noise_scheduler(num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float,
                          prediction_type: str) -> DDPMScheduler:
    """The DDPM noise schedule used for training (and saved with the pipeline). No sample clipping:
    latents are not images in [-1, 1]. "trailing" timesteps (`latent_ddpm.sampling.TIMESTEP_SPACING`): a
    sampler built from the saved config with diffusers' `from_config` starts at the last training step."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         beta_start=beta_start, beta_end=beta_end, prediction_type=prediction_type,
                         clip_sample=False, timestep_spacing="trailing")


def terminal_signal_warning(scheduler: DDPMScheduler) -> str | None:
    """A warning when x_T still holds a lot of x_0 (alpha_bar_T > MAX_TERMINAL_ALPHA_BAR), else None."""
    alpha_bar_t = float(scheduler.alphas_cumprod[-1])
    if alpha_bar_t <= MAX_TERMINAL_ALPHA_BAR:
        return None
    return (f"the noise schedule ends with alpha_bar_T = {alpha_bar_t:.3f}: the last noisy latent keeps "
            f"{alpha_bar_t:.0%} of the signal's variance, but sampling starts from pure noise. Use more "
            f"steps (--num_train_timesteps 1000) or a larger --beta_end.")


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict for x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (Ho et al. 2020, eq. 4)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":  # v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022, sec. 4)
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {kind!r}; valid: epsilon, v_prediction, sample")


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float | None,
                    floor: float = 0.0) -> torch.Tensor | None:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023) with a floor, finite at every timestep.

    The weight on the x0-error is clamp(SNR, floor, gamma). Min-SNR alone (floor 0) caps the easy low-noise
    timesteps at gamma but also weights the noisiest ones by their SNR, ~4e-5 at t = T on the linear schedule:
    the model never learns them. An ancestral sampler all but ignores its first predictions (they enter with
    tiny coefficients, under fresh noise), but a deterministic one (DDIM, DPM-Solver) starts there and keeps
    what they say. The floor keeps them trained at a small weight (Salimans & Ho 2022 floor it at 1:
    "truncated SNR"; a floor that high takes capacity from the mid-noise timesteps in a short run).

    Expressed for the model's target, the x0-weight w becomes w / SNR for epsilon, w / (SNR + 1) for
    v-prediction and w for sample prediction. The floor is not applied for epsilon (floor / SNR would weight
    the noise error at t = T by floor x 25,000); there the weight is min(1, gamma / SNR), finite at SNR = 0.
    None when weighting is off (gamma 0 or None).
    """
    if not gamma:
        return None
    snr = compute_snr(scheduler, timesteps).float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return torch.clamp(gamma / snr, max=1.0)  # gamma / 0 = inf -> 1
    x0_weight = torch.clamp(snr, min=min(floor, gamma), max=gamma)
    return x0_weight / (snr + 1) if kind == "v_prediction" else x0_weight
