"""LatentDDPMPipeline: shapes, determinism, generators, schedulers, guidance, normalisation, saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import PIPE_TIMESTEPS, gen
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline, default_scheduler

T = PIPE_TIMESTEPS  # training timesteps of conftest's make_pipe


def test_default_scheduler_recipe():
    s = default_scheduler()
    assert (s.config.num_train_timesteps, s.config.beta_schedule, s.config.clip_sample) == (1000, "linear", False)
    assert (s.config.beta_start, s.config.beta_end) == (1e-4, 0.02)
    assert default_scheduler(num_train_timesteps=50).config.num_train_timesteps == 50


@pytest.mark.parametrize("sample_size, hw", [(8, (8, 8)), ((8, 16), (8, 16))])
def test_output_shape_dtype_and_types(make_pipe, sample_size, hw):
    pipe = make_pipe(sample_size=sample_size)
    out = pipe(batch_size=3, num_inference_steps=3, generator=gen(0)).latents
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3, 2, *hw)
    assert np.isfinite(out).all()
    pt = pipe(batch_size=1, num_inference_steps=2, generator=gen(0), output_type="pt", return_dict=False)[0]
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 2, *hw)
    with pytest.raises(ValueError, match="output_type"):
        pipe(num_inference_steps=1, output_type="pil")


def test_default_steps_run_every_training_step_for_ddpm(make_pipe):
    pipe = make_pipe()
    pipe(batch_size=1, generator=gen(0))
    assert len(pipe.scheduler.timesteps) == T


def test_same_generator_same_latents(make_pipe):
    pipe = make_pipe()
    a = pipe(batch_size=2, num_inference_steps=4, generator=gen(1)).latents
    b = pipe(batch_size=2, num_inference_steps=4, generator=gen(1)).latents
    c = pipe(batch_size=2, num_inference_steps=4, generator=gen(2)).latents
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_per_sample_generators_do_not_depend_on_batch_split(make_pipe):
    pipe = make_pipe()
    both = pipe(batch_size=2, num_inference_steps=5, generator=[gen(10), gen(11)]).latents
    first = pipe(batch_size=1, num_inference_steps=5, generator=[gen(10)]).latents
    second = pipe(batch_size=1, num_inference_steps=5, generator=[gen(11)]).latents
    np.testing.assert_allclose(both, np.concatenate([first, second]), atol=1e-5)
    assert not np.allclose(first, second)
    with pytest.raises(ValueError, match="generators"):
        pipe(batch_size=3, num_inference_steps=1, generator=[gen(0)])


def test_given_latents_are_the_starting_noise(make_pipe):
    pipe = make_pipe()
    noise = torch.randn(2, 2, 8, 8, generator=gen(5))
    a = pipe(latents=noise, num_inference_steps=3, generator=gen(0)).latents
    b = pipe(latents=noise, num_inference_steps=3, generator=gen(0)).latents
    assert a.shape[0] == 2
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mean, std", [([1.0, -2.0], [3.0, 0.5]), (1.5, 2.0), (None, [2.0, 4.0]), ([0.5, 0.5], None)])
def test_latents_mean_std_denormalisation(make_pipe, mean, std):
    noise = torch.randn(2, 2, 8, 8, generator=gen(7))
    plain = make_pipe()(latents=noise, num_inference_steps=3, generator=gen(0)).latents
    scaled = make_pipe(latents_mean=mean, latents_std=std)(latents=noise, num_inference_steps=3, generator=gen(0))
    m = np.asarray(0.0 if mean is None else mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(1.0 if std is None else std, dtype=np.float32).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(scaled.latents, plain * s + m, rtol=1e-5, atol=1e-5)


def test_latents_stats_of_the_wrong_length_are_refused(make_pipe):
    with pytest.raises(ValueError, match="latents_mean has 3 values"):
        make_pipe(latents_mean=[0.0, 1.0, 2.0])(num_inference_steps=1)
    # "could not convert string to float: 'abc'", naming neither; a zero or NaN std silently broke the output
    with pytest.raises(ValueError, match="latents_std must be a number or a list of numbers"):
        make_pipe(latents_std="abc")
    with pytest.raises(ValueError, match=r"latents_std must be finite and > 0, got \[1.0, 0.0\]"):
        make_pipe(latents_std=[1.0, 0.0])
    with pytest.raises(ValueError, match="latents_mean must be finite"):
        make_pipe(latents_mean=[float("nan"), 0.0])


SCHEDULERS = [(DDIMScheduler, {}), (DPMSolverMultistepScheduler, {}), (EulerDiscreteScheduler, {}),
              (EulerDiscreteScheduler, dict(timestep_spacing="leading")), (UniPCMultistepScheduler, {}),
              (DDPMScheduler, {})]


BAD_CALLS = [  # each failed inside torch/diffusers with a message not naming the argument, or silently
    (dict(batch_size=-1), ValueError, "batch_size must be an int >= 1"),
    (dict(batch_size=2.0), ValueError, "batch_size must be an int >= 1"),
    (dict(batch_size=0), ValueError, "batch_size must be an int >= 1"),  # an empty array
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be an int >= 1"),  # ZeroDivisionError
    (dict(num_inference_steps=-1), ValueError, "num_inference_steps must be"),  # the noise, undenoised
    (dict(num_inference_steps=2.5), ValueError, "num_inference_steps must be"),  # 3 steps
    (dict(generator=0), TypeError, "generator must be a torch.Generator"),
    (dict(class_labels=[0.7, 1.9]), ValueError, "class_labels must be integer class ids"),  # truncated to 0, 1
    (dict(class_labels=[True, False]), ValueError, "class_labels must be integer class ids"),
    (dict(class_labels=["a", "b"]), ValueError, "class_labels must be integer class ids"),
    (dict(class_labels=[0, 1], guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite"),
    (dict(class_labels=[0, 1], guidance_scale="3"), ValueError, "guidance_scale must be a finite"),
    (dict(guidance_scale=3.0), ValueError, "guidance_scale needs class_labels"),  # silently ignored
    (dict(eta=-1.0), ValueError, "eta must be a number in"),
    (dict(latents=np.zeros((2, 2, 8, 8), np.float32)), ValueError, "latents must be a torch.Tensor"),
    (dict(latents=torch.zeros(2, 3, 8, 8)), ValueError, r"latents must be a torch.Tensor of shape \(B, 2, H, W\)"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_CALLS, ids=[m + str(k) for k, _, m in BAD_CALLS])
def test_bad_call_arguments_are_named(make_pipe, kwargs, error, message):
    pipe = make_pipe(num_class_embeds=3)
    with pytest.raises(error, match=message):
        pipe(**{"batch_size": 2, "num_inference_steps": 2, **kwargs})


@pytest.mark.parametrize("cls", [PNDMScheduler, EulerDiscreteScheduler])  # (LMS, which gave NaN, needs scipy)
def test_more_steps_than_training_timesteps_are_refused(make_pipe, cls):
    # PNDM gave wrong latents (repeated timesteps), LMS and SA-Solver all-NaN ones, DPM-Solver++ with Karras sigmas
    # an IndexError deep inside its step; a model trained on T timesteps knows T noise levels.
    pipe = make_pipe()
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=f"cannot take {T + 1} steps: the model was trained on {T} timesteps"):
        pipe(batch_size=1, num_inference_steps=T + 1)
    assert np.isfinite(pipe(batch_size=1, num_inference_steps=T, generator=gen(0)).latents).all()


def test_numpy_numbers_are_accepted_as_pythons(make_pipe):
    # A sweep over np.arange or a float32 grid was refused ("must be an int >= 1, got np.int64(2)"), as diffusers'
    # own pipelines accept them; a numpy bool still is not a number.
    pipe = make_pipe(num_class_embeds=3)
    kw = dict(class_labels=[0, 1], generator=[gen(0), gen(1)])
    a = pipe(batch_size=np.int64(2), num_inference_steps=np.int32(3), guidance_scale=np.float32(2.0), **kw).latents
    kw = dict(class_labels=[0, 1], generator=[gen(0), gen(1)])
    np.testing.assert_array_equal(a, pipe(batch_size=2, num_inference_steps=3, guidance_scale=2.0, **kw).latents)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        pipe(batch_size=np.bool_(True), num_inference_steps=2)


@pytest.mark.parametrize("cls, kw", SCHEDULERS, ids=[c.__name__ + "".join(f"-{v}" for v in k.values())
                                                     for c, k in SCHEDULERS])
def test_scheduler_swap_via_from_config(make_pipe, cls, kw):
    pipe = make_pipe()
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kw)
    assert pipe.scheduler.config.num_train_timesteps == T and pipe.scheduler.config.beta_end == 0.02
    # The first call must give what later calls give: no state left over from a previous run
    # (e.g. Euler's init_noise_sigma depends on set_timesteps).
    a = pipe(batch_size=2, num_inference_steps=4, generator=gen(0)).latents
    b = pipe(batch_size=2, num_inference_steps=4, generator=gen(0)).latents
    assert a.shape == (2, 2, 8, 8) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert len(pipe.scheduler.timesteps) == 4


def test_ddim_eta_is_used(make_pipe):
    pipe = make_pipe()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    det1 = pipe(batch_size=1, num_inference_steps=4, generator=gen(0), eta=0.0).latents
    det2 = pipe(latents=torch.randn(1, 2, 8, 8, generator=gen(0)), num_inference_steps=4, generator=gen(9)).latents
    stoch = pipe(batch_size=1, num_inference_steps=4, generator=gen(0), eta=1.0).latents
    np.testing.assert_allclose(det1, det2, atol=1e-6)  # eta=0: only the starting noise matters
    assert not np.allclose(det1, stoch, atol=1e-4)


def test_classifier_free_guidance(make_pipe):
    pipe = make_pipe(num_class_embeds=3)
    torch.nn.init.normal_(pipe.unet.class_embedding.weight)
    kw = dict(batch_size=2, num_inference_steps=3, class_labels=[0, 2])
    base = pipe(generator=[gen(0), gen(1)], guidance_scale=1.0, **kw).latents
    again = pipe(generator=[gen(0), gen(1)], guidance_scale=1.0, **kw).latents
    guided = pipe(generator=[gen(0), gen(1)], guidance_scale=3.0, **kw).latents
    other = pipe(generator=[gen(0), gen(1)], batch_size=2, num_inference_steps=3, class_labels=[1, 1]).latents
    np.testing.assert_array_equal(base, again)
    assert guided.shape == base.shape and np.isfinite(guided).all()
    assert not np.allclose(base, guided, atol=1e-4)
    assert not np.allclose(base, other, atol=1e-4)
    with pytest.raises(ValueError, match="got 2 class_labels for a batch of 1"):
        pipe(batch_size=1, num_inference_steps=1, class_labels=[0, 1])
    with pytest.raises(ValueError, match=r"lie in 0\.\.2"):
        pipe(batch_size=1, num_inference_steps=1, class_labels=[3])
    with pytest.raises(ValueError, match="unconditional"):
        make_pipe()(batch_size=1, num_inference_steps=1, class_labels=[0])



def test_guidance_extrapolates_from_the_no_class_prediction(make_pipe):
    # One deterministic DDIM step is affine in the UNet's prediction, so the guided sample is
    # uncond + w * (cond - uncond) of the samples at scale 0 (the "no class" prediction alone) and 1 (no guidance).
    pipe = make_pipe(num_class_embeds=3)
    torch.nn.init.normal_(pipe.unet.class_embedding.weight)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    noise = torch.randn(2, 2, 8, 8, generator=gen(4))

    def sample(scale: float) -> np.ndarray:
        return pipe(latents=noise, num_inference_steps=1, class_labels=[0, 2], guidance_scale=scale).latents

    uncond, cond, guided = sample(0.0), sample(1.0), sample(3.0)
    np.testing.assert_allclose(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    t = pipe.scheduler.timesteps[0]  # scale 0: the UNet's own "no class" label (class_labels=None gives it)
    with torch.no_grad():
        expected = pipe.scheduler.step(pipe.unet(noise, t).sample, t, noise).prev_sample.numpy()
    np.testing.assert_allclose(uncond, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(uncond, cond, atol=1e-4)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmsolver++", "unipc", "euler", "euler_a", "heun"])
def test_the_unet_sees_unit_variance_input_at_the_first_step(make_pipe, name):
    # x_T is drawn with the scheduler's init_noise_sigma (Euler's: sigma_max, ~157 here) and scale_model_input
    # brings the UNet's input back to unit variance, as in training.
    from latent_ddpm.sampling import make_scheduler

    pipe = make_pipe()
    pipe.scheduler = make_scheduler(name, default_scheduler().config)
    stds: list[float] = []
    pipe.unet.register_forward_pre_hook(lambda module, args: stds.append(float(args[0].std())))
    pipe(batch_size=8, num_inference_steps=3, generator=gen(0))
    assert 0.9 < stds[0] < 1.1, stds

def test_save_pretrained_round_trip(make_pipe, tmp_path):
    pipe = make_pipe(num_class_embeds=2, latents_mean=[0.5, -1.0], latents_std=2.0, sample_size=(8, 16))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    kw = dict(batch_size=2, num_inference_steps=3, class_labels=[0, 1], guidance_scale=2.0)
    before = pipe(generator=gen(3), **kw).latents
    pipe.save_pretrained(tmp_path)
    names = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert "model_index.json" in names and "diffusion_pytorch_model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pkl", ".pt", ".pth"))]
    loaded = LatentDDPMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.config.latents_mean == [0.5, -1.0] and loaded.config.latents_std == [2.0]
    np.testing.assert_array_equal(loaded(generator=gen(3), **kw).latents, before)


@pytest.mark.parametrize("name", ["dpmsolver++", "sde-dpmsolver++", "unipc"])
def test_multistep_solver_refuses_as_many_steps_as_timesteps(name):
    """With num_inference_steps == T, diffusers' linspace spacing repeats a noise level and a multistep
    solver divides by the zero step (NaN samples): the pipeline refuses it. The project's "trailing" spacing
    (`sampling.TIMESTEP_SPACING`) has T distinct steps, so there T works, as do T - 1 and the default step
    count on a short schedule."""
    from latent_ddpm.pipeline import inference_steps_error
    from latent_ddpm.sampling import make_scheduler

    base = default_scheduler(num_train_timesteps=20)
    unet = AdvancedUNet2DModel.from_preset("tiny", in_channels=4, sample_size=8)
    solver = make_scheduler(name, base.config)
    linspace = LatentDDPMPipeline(unet=unet, scheduler=type(solver).from_config(solver.config,
                                                                                 timestep_spacing="linspace"))
    with pytest.raises(ValueError, match="noise levels repeat"):
        linspace(batch_size=1, num_inference_steps=20)
    pipe = LatentDDPMPipeline(unet=unet, scheduler=make_scheduler(name, base.config))
    for steps in (20, 19, None):  # None: the pipeline's default, min(50, T - 1) for non-DDPM samplers
        out = pipe(batch_size=1, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).latents
        assert np.isfinite(out).all()
    # Karras sigmas map distinct noise levels to repeated integer timesteps: that is not refused.
    karras = DPMSolverMultistepScheduler.from_config(default_scheduler().config, use_karras_sigmas=True)
    karras.set_timesteps(500)
    assert len(torch.unique(karras.timesteps)) < 500 and inference_steps_error(karras, 500) is None


def test_an_underflowing_schedule_is_named_not_the_step_count():
    """Betas whose alpha_bar reaches 0 in float32 repeat the top noise level at any step count: the error says
    so, instead of "use fewer steps"."""
    from latent_ddpm.pipeline import inference_steps_error
    from latent_ddpm.sampling import make_scheduler

    solver = make_scheduler("sde-dpmsolver++", default_scheduler(beta_end=0.99).config)
    assert "alpha_bar reaches 0" in inference_steps_error(solver, 2)
    assert "use fewer steps" not in inference_steps_error(solver, 2)
