"""The training objective: targets and min-SNR weights for every prediction type and schedule."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from latent_ddpm.diffusion import build_noise_scheduler, min_snr_weights, terminal_signal_warning, training_target


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_min_snr_weights_are_finite_and_bounded_at_every_timestep(prediction_type, schedule):
    scheduler = build_noise_scheduler(1000, schedule, 1e-4, 0.02, prediction_type)
    t = torch.arange(1000)
    w = min_snr_weights(scheduler, t, gamma=5.0)
    assert torch.isfinite(w).all() and (w > 0).all()
    assert w.max() <= 5.0 + 1e-5  # never above gamma in any parameterisation


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_stay_finite_with_zero_terminal_snr(prediction_type):
    # A zero-terminal-SNR schedule has SNR = 0 at the last step, where naive weights divide by zero.
    scheduler = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True, prediction_type=prediction_type)
    w = min_snr_weights(scheduler, torch.arange(1000), gamma=5.0)
    assert torch.isfinite(w).all()


def test_min_snr_weights_match_the_paper():
    scheduler = build_noise_scheduler(1000, "linear", 1e-4, 0.02, "epsilon")
    t = torch.tensor([0, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0).double(), expected, rtol=1e-5, atol=1e-6)
    v = build_noise_scheduler(1000, "linear", 1e-4, 0.02, "v_prediction")
    torch.testing.assert_close(min_snr_weights(v, t, 5.0).double(),
                               torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1), rtol=1e-5, atol=1e-6)
    assert min_snr_weights(scheduler, t, None) is None and min_snr_weights(scheduler, t, 0.0) is None


def test_training_targets():
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([1, 400, 900])
    eps = build_noise_scheduler(1000, "linear", 1e-4, 0.02, "epsilon")
    assert torch.equal(training_target(eps, x0, noise, t), noise)
    x = build_noise_scheduler(1000, "linear", 1e-4, 0.02, "sample")
    assert torch.equal(training_target(x, x0, noise, t), x0)
    v = build_noise_scheduler(1000, "linear", 1e-4, 0.02, "v_prediction")
    a = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(training_target(v, x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)


def test_short_schedule_warning():
    assert terminal_signal_warning(build_noise_scheduler(1000, "linear", 1e-4, 0.02, "epsilon")) is None
    msg = terminal_signal_warning(build_noise_scheduler(50, "linear", 1e-4, 0.02, "epsilon"))
    assert msg is not None and "60%" in msg


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_snr_floor_keeps_the_noisiest_timesteps_trained(prediction_type):
    # Min-SNR weights the x0-error at t = T by its SNR (~4e-5): a deterministic sampler starts from an untrained
    # model. The floor lifts only the timesteps whose SNR is below it and leaves every other weight as it was.
    scheduler = build_noise_scheduler(1000, "linear", 1e-4, 0.02, prediction_type)
    t = torch.arange(1000)
    plain, floored = min_snr_weights(scheduler, t, 5.0), min_snr_weights(scheduler, t, 5.0, floor=0.05)
    snr = scheduler.alphas_cumprod.double() / (1 - scheduler.alphas_cumprod.double())
    x0_weight = floored.double() * ((snr + 1) if prediction_type == "v_prediction" else 1)
    assert x0_weight.min() >= 0.05 - 1e-6 and plain[-1] < 1e-3
    torch.testing.assert_close(floored[snr >= 0.05], plain[snr >= 0.05])
    assert (floored[snr < 0.05] > plain[snr < 0.05]).all()


def test_snr_floor_is_not_applied_to_epsilon():
    # floor / SNR would weight the noise error at t = T by ~floor x 25,000.
    eps = build_noise_scheduler(1000, "linear", 1e-4, 0.02, "epsilon")
    t = torch.arange(1000)
    torch.testing.assert_close(min_snr_weights(eps, t, 5.0, floor=0.05), min_snr_weights(eps, t, 5.0))


def test_one_default_noise_schedule():
    """train.py's default schedule (TrainConfig) and the pipeline's default scheduler have the same betas:
    the values are written twice (the pipeline's hub copy cannot import the config), so pin them together."""
    from latent_ddpm.config import TrainConfig
    from latent_ddpm.pipeline import DEFAULT_SCHEDULER_CONFIG

    cfg = TrainConfig()
    trained = build_noise_scheduler(cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end,
                                    cfg.prediction_type)
    for key, value in DEFAULT_SCHEDULER_CONFIG.items():
        assert trained.config[key] == value, key
