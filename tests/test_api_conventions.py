"""LatentDDPMPipeline and AdvancedUNet2DModel used as a diffusers user would: every scheduler's starting noise,
step counts a scheduler cannot take, and bad arguments named before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from latent_ddpm import LatentDDPMPipeline, default_scheduler

T = 50  # the original project's schedule length: sigma_max 0.81, far from diffusers' sigma_max >> 1 assumption


def first_unet_input(pipe: LatentDDPMPipeline, noise: torch.Tensor) -> torch.Tensor:
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda _module, args: seen.append(args[0].clone()))
    try:
        pipe(latents=noise, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler,
                                 EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler,
                                 KDPM2DiscreteScheduler])
@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
def test_the_unet_first_sees_the_starting_noise_itself(make_unet, cls, spacing):
    # The sigma-based schedulers with "trailing"/"linspace" spacing scaled the noise by diffusers' init_noise_sigma,
    # sigma_max instead of sqrt(sigma_max^2 + 1): the UNet's first input was 0.63x the noise at T=50, and Euler,
    # Heun and Euler ancestral samples came out with 0.62-0.74x the data's spread (DDIM: 0.99x).
    base = default_scheduler(num_train_timesteps=T, prediction_type="v_prediction", timestep_spacing=spacing)
    pipe = LatentDDPMPipeline(unet=make_unet(), scheduler=cls.from_config(base.config))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first_unet_input(pipe, noise), noise, rtol=1e-5, atol=1e-5)


def test_euler_samples_have_the_spread_of_the_data(make_unet):
    # A UNet that predicts v = 0 is exact for N(0, I) data; every sampler should return about unit spread.
    unet = make_unet()
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    base = default_scheduler(num_train_timesteps=T, prediction_type="v_prediction")
    pipe = LatentDDPMPipeline(unet=unet, scheduler=base)
    pipe.set_progress_bar_config(disable=True)
    for cls in (DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler):
        pipe.scheduler = cls.from_config(base.config)
        out = pipe(batch_size=16, num_inference_steps=20, generator=torch.Generator().manual_seed(0)).latents
        assert 0.9 < float(np.std(out)) < 1.1, (cls.__name__, float(np.std(out)))


def test_a_step_count_the_scheduler_cannot_set_is_named(make_unet):
    # PNDM below 4 steps failed inside numpy ("operands could not be broadcast together with shapes (2,) (8,)")
    pipe = LatentDDPMPipeline(unet=make_unet(), scheduler=PNDMScheduler.from_config(default_scheduler().config))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="PNDMScheduler cannot take 2 steps"):
        pipe(batch_size=1, num_inference_steps=2)
    out = pipe(batch_size=1, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).latents
    assert np.isfinite(out).all()
    # no step at all: the starting noise came back as samples (an IndexError once the noise scale was probed)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(default_scheduler().config, lambda_min_clipped=5.0)
    with pytest.raises(ValueError, match="leave no denoising step"):
        pipe(batch_size=1, num_inference_steps=20)


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_labels=[]), "class_labels is empty"),  # was "must be integer class ids, got torch.float32 values"
    (dict(latents=torch.zeros(2, 2, 5, 5)), r"H and W divisible by 2 \(the UNet's downsampling\), got \(2, 2, 5, 5\)"),
])
def test_bad_call_arguments_are_named_before_any_work(make_unet, kwargs, message):
    pipe = LatentDDPMPipeline(unet=make_unet(num_class_embeds=3), scheduler=default_scheduler(num_train_timesteps=T))
    with pytest.raises(ValueError, match=message):
        pipe(**{"batch_size": 2, "num_inference_steps": 2, **kwargs})


def test_a_diffusers_unet2d_model_still_samples():
    # benchmarks/bench_quality.py samples a plain diffusers UNet2DModel through LatentDDPMPipeline; the latents'
    # H/W check asked every UNet for AdvancedUNet2DModel's downsample_factor (an AttributeError).
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    pipe = LatentDDPMPipeline(unet=unet, scheduler=default_scheduler(num_train_timesteps=T))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).latents
    assert out.shape == (2, 2, 8, 8) and np.isfinite(out).all()
