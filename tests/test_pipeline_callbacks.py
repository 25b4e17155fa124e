"""LatentDDPMPipeline's step-end callbacks (diffusers' `callback_on_step_end` convention), `interrupt` and
`num_timesteps`: in the package's class and in the hub copy that `trust_remote_code=True` loads."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from _helpers import gen
from diffusers import DiffusionPipeline, HeunDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback
from diffusers.utils.torch_utils import randn_tensor

from latent_ddpm.hub import prepare_upload_folder
from latent_ddpm.pipeline import start_noise_sigma

MEAN, STD = [0.5, -1.0], 2.0
# latents[:, :, 0, 0] of test_a_call_without_a_callback_is_the_loop_it_was's call, as the code before callbacks
# (a8acc1c) gave them.
OLD_CORNER = [[-2.0581812858581543, -3.1016509532928467], [-0.8004962205886841, -2.78608775138855]]


@pytest.fixture
def make_pipe(make_pipe):
    """conftest's tiny pipeline, normalised by MEAN and STD (callbacks see model-space latents)."""
    return functools.partial(make_pipe, latents_mean=MEAN, latents_std=STD)


def data_scale_mean(shape: tuple) -> np.ndarray:
    """What all-zero model-space latents are in the data's scale: the mean, per channel."""
    return np.broadcast_to(np.asarray(MEAN, np.float32).reshape(1, -1, 1, 1), shape)


def zero_at_last_step(pipe, step_index, timestep, callback_kwargs) -> dict:
    last = step_index == pipe.num_timesteps - 1
    return {"latents": torch.zeros_like(callback_kwargs["latents"])} if last else callback_kwargs


@pytest.mark.parametrize("heun", [False, True], ids=["ddpm", "heun"])  # Heun: 2 timesteps a step but the last
def test_the_callback_sees_every_step_with_its_index_timestep_and_model_space_latents(make_pipe, heun):
    pipe = make_pipe()
    if heun:
        pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    seen: list[tuple] = []

    def record(p, step_index, timestep, callback_kwargs):
        seen.append((p, step_index, timestep, set(callback_kwargs), callback_kwargs["latents"].clone()))
        return callback_kwargs

    out = pipe(batch_size=2, num_inference_steps=4, generator=gen(0), callback_on_step_end=record).latents
    timesteps = pipe.scheduler.timesteps
    assert pipe.num_timesteps == len(timesteps) == (7 if heun else 4)
    assert [s[1] for s in seen] == list(range(len(timesteps))) and all(s[0] is pipe for s in seen)
    assert torch.equal(torch.stack([s[2] for s in seen]), timesteps)
    assert all(s[3] == {"latents"} for s in seen)
    # The callback's latents are the loop's, in model space: the last ones, denormalised, are the output.
    np.testing.assert_array_equal(out, (seen[-1][4] * STD + torch.tensor(MEAN).view(1, -1, 1, 1)).numpy())


def test_latents_the_callback_returns_replace_the_loops(make_pipe):
    pipe = make_pipe()
    kw = dict(batch_size=2, num_inference_steps=4, output_type="pt")
    plain = pipe(generator=gen(0), **kw).latents
    zeroed = pipe(generator=gen(0), callback_on_step_end=zero_at_last_step, **kw).latents
    np.testing.assert_array_equal(zeroed.numpy(), data_scale_mean(zeroed.shape))

    def zero_first(p, step_index, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step_index == 0 else {}

    changed = pipe(generator=gen(0), callback_on_step_end=zero_first, **kw).latents
    assert torch.isfinite(changed).all() and not torch.allclose(changed, plain)


class ZeroAtCutoff(PipelineCallback):
    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs) -> dict:
        if step_index == self.config.cutoff_step_index:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs


def test_diffusers_pipeline_callbacks_and_their_tensor_inputs(make_pipe):
    pipe = make_pipe()
    zero_at_2 = ZeroAtCutoff(cutoff_step_ratio=None, cutoff_step_index=2)
    for callback in (zero_at_2, MultiPipelineCallbacks([zero_at_2])):
        out = pipe(batch_size=1, num_inference_steps=3, generator=gen(0), callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=[]).latents  # the callback's own tensor_inputs are used
        np.testing.assert_array_equal(out, data_scale_mean(out.shape))
    # diffusers' Stable Diffusion callback asks for prompt_embeds, which this pipeline has not got.
    with pytest.raises(ValueError, match=r"among \['latents'\] .*got \['prompt_embeds'\]"):
        pipe(num_inference_steps=1, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))


BAD_CALLBACKS = [
    (dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError,
     r"callback_on_step_end_tensor_inputs must be a list of names among \['latents'\] .*got \['noise'\]"),
    (dict(callback_on_step_end=lambda *a: a[-1], callback_on_step_end_tensor_inputs="latents"), ValueError,
     r"must be a list of names among \['latents'\] .*got 'latents'"),
    (dict(callback_on_step_end="print"), TypeError, "callback_on_step_end must be callable"),
    (dict(callback_on_step_end=lambda *a: None), TypeError, "callback_on_step_end must return a dict"),
    (dict(callback_on_step_end=lambda *a: {"latents": torch.zeros(1, 2, 8, 8)}), ValueError,
     r"returned latents of shape \(1, 2, 8, 8\); they must keep the loop's shape \(2, 2, 8, 8\)"),
    (dict(callback_on_step_end=lambda *a: {"latents": np.zeros((2, 2, 8, 8))}), ValueError,
     "returned latents as ndarray; they must be a torch tensor of the loop's shape"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_CALLBACKS, ids=[m[:40] for _, _, m in BAD_CALLBACKS])
def test_bad_callbacks_are_named(make_pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        make_pipe()(batch_size=2, num_inference_steps=2, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_returned_latents_are_taken_in_the_loops_dtype(make_pipe, dtype):
    # A callback returning a half or double copy at the last step changed the output's dtype ("np" is float32).
    def cast_last(p, step_index, timestep, callback_kwargs):
        last = step_index == p.num_timesteps - 1
        return {"latents": callback_kwargs["latents"].to(dtype)} if last else callback_kwargs

    pipe = make_pipe()
    for output_type in ("np", "pt"):
        out = pipe(batch_size=1, num_inference_steps=2, generator=gen(0), callback_on_step_end=cast_last,
                   output_type=output_type).latents
        assert out.dtype in (np.float32, torch.float32), (output_type, out.dtype)


def test_interrupt_skips_the_remaining_steps(make_pipe):
    pipe = make_pipe()
    unet_calls, seen = [], []
    pipe.unet.register_forward_pre_hook(lambda module, args: unet_calls.append(1))

    def stop_after_two(p, step_index, timestep, callback_kwargs):
        seen.append(callback_kwargs["latents"].clone())
        p._interrupt = step_index == 1
        return callback_kwargs

    out = pipe(batch_size=1, num_inference_steps=5, generator=gen(0), callback_on_step_end=stop_after_two).latents
    assert pipe.interrupt and len(seen) == len(unet_calls) == 2 and pipe.num_timesteps == 5
    np.testing.assert_array_equal(out, pipe._denormalize(seen[-1]).numpy())  # the latents so far
    pipe(batch_size=1, num_inference_steps=5, generator=gen(0))  # the next call starts afresh
    assert not pipe.interrupt and len(unet_calls) == 7


def test_a_call_without_a_callback_is_the_loop_it_was(make_pipe):
    pipe = make_pipe(num_class_embeds=3)
    torch.nn.init.normal_(pipe.unet.class_embedding.weight)
    kw = dict(batch_size=2, num_inference_steps=4, class_labels=[0, 2], guidance_scale=2.0)
    plain = pipe(generator=gen(0), **kw).latents
    for extra in (dict(callback_on_step_end=None), dict(callback_on_step_end=lambda p, i, t, kwargs: kwargs),
                  dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=[])):
        np.testing.assert_array_equal(pipe(generator=gen(0), **kw, **extra).latents, plain)
    # The loop as it was before callbacks (a8acc1c), written out: the same operations give the same bits.
    g, scheduler = gen(0), pipe.scheduler
    scheduler.set_timesteps(4)
    x = randn_tensor((2, 2, 8, 8), generator=g, dtype=torch.float32) * start_noise_sigma(scheduler)
    labels = torch.tensor([0, 2, pipe.unet.null_class_label, pipe.unet.null_class_label])
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(x, t)
            cond, uncond = pipe.unet(torch.cat([model_in, model_in]), t, class_labels=labels).sample.float().chunk(2)
            x = scheduler.step(uncond + 2.0 * (cond - uncond), t, x, generator=g).prev_sample
    np.testing.assert_array_equal(plain, (x * STD + torch.tensor(MEAN).view(1, -1, 1, 1)).numpy())
    # What the code before callbacks gave (another CPU may round differently: a tolerance).
    np.testing.assert_allclose(plain[:, :, 0, 0], OLD_CORNER, rtol=1e-4, atol=1e-4)


def test_the_hub_copy_takes_a_callback(make_pipe, tmp_path):
    pipe = make_pipe()
    pipe.save_pretrained(tmp_path / "saved")
    hub = DiffusionPipeline.from_pretrained(prepare_upload_folder(tmp_path / "saved", tmp_path / "upload"),
                                            trust_remote_code=True)
    hub.set_progress_bar_config(disable=True)
    assert type(hub).__name__ == "LatentDDPMPipeline" and not type(hub).__module__.startswith("latent_ddpm")
    steps: list[int] = []

    def record_and_zero(p, step_index, timestep, callback_kwargs):
        steps.append(step_index)
        return zero_at_last_step(p, step_index, timestep, callback_kwargs)

    out = hub(batch_size=2, num_inference_steps=3, generator=gen(0), callback_on_step_end=record_and_zero).latents
    assert steps == [0, 1, 2] and hub.num_timesteps == 3 and not hub.interrupt
    np.testing.assert_array_equal(out, data_scale_mean(out.shape))
    with pytest.raises(ValueError, match=r"among \['latents'\]"):
        hub(num_inference_steps=1, callback_on_step_end_tensor_inputs=["noise"])
