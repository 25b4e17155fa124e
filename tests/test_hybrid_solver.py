"""The hybrid DPM-Solver++ (latent_ddpm/hybrid_solver.py): its two limits are the two diffusers solvers step for
step, and in between each step's form follows its sigma."""

import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline, default_scheduler
from latent_ddpm.errors import UserInputError
from latent_ddpm.hybrid_solver import SDE_BELOW_SIGMA, HybridDPMSolverMultistepScheduler
from latent_ddpm.sampling import configure_scheduler, make_scheduler, sample_generators


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    unet = AdvancedUNet2DModel.from_preset("tiny", in_channels=4, sample_size=8)
    return LatentDDPMPipeline(unet=unet, scheduler=default_scheduler())


def sample(pipe, scheduler, steps: int = 8) -> np.ndarray:
    pipe.scheduler = scheduler
    generators = sample_generators(0, range(3))
    return pipe(batch_size=3, num_inference_steps=steps, generator=generators, output_type="np").latents


def test_the_limits_are_the_two_solvers(pipe):
    config = default_scheduler().config
    hybrid = make_scheduler("hybrid-dpmsolver++", config)
    assert isinstance(hybrid, HybridDPMSolverMultistepScheduler) and hybrid.config.solver_order == 2
    ode = make_scheduler("dpmsolver++", config, guided=True)  # order 2, as the hybrid
    sde = make_scheduler("sde-dpmsolver++", config)
    np.testing.assert_array_equal(sample(pipe, configure_scheduler(hybrid, {"sde_below_sigma": 0.0}, 8)),
                                  sample(pipe, ode))
    np.testing.assert_array_equal(sample(pipe, configure_scheduler(hybrid, {"sde_below_sigma": 1e9}, 8)),
                                  sample(pipe, sde))
    between = sample(pipe, hybrid)
    assert np.isfinite(between).all()
    assert not np.allclose(between, sample(pipe, ode)) and not np.allclose(between, sample(pipe, sde))


def test_each_step_takes_the_form_of_its_sigma(monkeypatch):
    hybrid = make_scheduler("hybrid-dpmsolver++", default_scheduler().config)
    seen = []
    original = DPMSolverMultistepScheduler.step

    def record(self, model_output, timestep, sample, **kwargs):
        seen.append((float(self.sigmas[self.step_index]), self.config.algorithm_type))
        return original(self, model_output, timestep, sample, **kwargs)

    monkeypatch.setattr(DPMSolverMultistepScheduler, "step", record)
    hybrid.set_timesteps(20)
    x = torch.randn(1, 4, 2, 2)
    for t in hybrid.timesteps:
        x = hybrid.step(torch.randn_like(x), t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert len(seen) == 20
    for sigma, kind in seen:
        assert kind == ("sde-dpmsolver++" if sigma <= SDE_BELOW_SIGMA else "dpmsolver++"), (sigma, kind)
    assert {kind for _, kind in seen} == {"dpmsolver++", "sde-dpmsolver++"}
    assert hybrid.config.algorithm_type == "dpmsolver++"  # restored after every step


def test_settings_survive_from_config_and_bad_ones_are_refused():
    hybrid = make_scheduler("hybrid-dpmsolver++", default_scheduler().config)
    again = HybridDPMSolverMultistepScheduler.from_config(configure_scheduler(hybrid, {"sde_below_sigma": 2.5},
                                                                              20).config)
    assert again.config.sde_below_sigma == 2.5 and again.config.timestep_spacing == "trailing"
    assert math.isclose(float(again.betas[-1]), 0.02, rel_tol=1e-6)  # the training betas came through
    with pytest.raises(ValueError, match="algorithm_type must be dpmsolver"):
        HybridDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="sde_below_sigma must be >= 0"):
        HybridDPMSolverMultistepScheduler(sde_below_sigma=-1.0)
    with pytest.raises(UserInputError, match="sde_below_sigma takes a float"):
        configure_scheduler(hybrid, {"sde_below_sigma": "high"}, 20)
    with pytest.raises(UserInputError, match="refuses it"):
        configure_scheduler(hybrid, {"sde_below_sigma": -2.0}, 20)


def test_a_pipeline_saved_with_the_hybrid_scheduler_loads_back(pipe, tmp_path):
    """diffusers finds a saved component's loading method through its module; the pipeline round-trips with
    the hybrid scheduler and its switch point, and samples the same."""
    from latent_ddpm.sampling import load_pipeline

    hybrid = make_scheduler("hybrid-dpmsolver++", pipe.scheduler.config)
    hybrid = HybridDPMSolverMultistepScheduler.from_config(hybrid.config, sde_below_sigma=3.0)
    saved = LatentDDPMPipeline(unet=pipe.unet, scheduler=hybrid)
    saved.save_pretrained(tmp_path / "p")
    loaded = load_pipeline(str(tmp_path / "p"))
    assert isinstance(loaded.scheduler, HybridDPMSolverMultistepScheduler)
    assert loaded.scheduler.config.sde_below_sigma == 3.0
    np.testing.assert_array_equal(sample(saved, saved.scheduler), sample(loaded, loaded.scheduler))
