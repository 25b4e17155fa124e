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
    latents are not images in [-1, 1]."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         beta_start=beta_start, beta_end=beta_end, prediction_type=prediction_type,
                         clip_sample=False)


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


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor | None:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023), finite at every timestep.

    The weight on the x0-error is min(SNR, gamma); expressed for the model's target it becomes
    min(SNR, gamma) / SNR for epsilon (= min(1, gamma / SNR), finite even at SNR = 0),
    min(SNR, gamma) / (SNR + 1) for v-prediction, and min(SNR, gamma) for sample prediction.
    None when weighting is off.
    """
    if not gamma:
        return None
    snr = compute_snr(scheduler, timesteps).float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return torch.clamp(gamma / snr, max=1.0)  # gamma / 0 = inf -> 1
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if kind == "v_prediction" else clipped
