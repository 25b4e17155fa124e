"""What train.py's training step does, checked from outside: the UNet gets the normalised data (per each
--normalization and --scaling_factor) noised as x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps at every timestep 0..T-1,
labels dropped at --cond_drop_prob to the "no class" label, gradients clipped to --max_grad_norm and averaged over
--gradient_accumulation_steps, the EMA warm-up that the saved pipeline holds, and the documented default recipe.
Mutation testing found each of these could break (a forgotten call, an off-by-one, swapped arguments, a changed
default) with every other test passing. Tiny runs in this process; the UNet, the target and the optimizer spied on.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import TRAIN_FAST as FAST
from _helpers import run_train as run
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline
from latent_ddpm.flags import parse_train_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (the script; its training_target is patched in-process)

#: A short schedule with far-apart noise levels (alpha_bar 0.9, 0.57, 0.21, 0.02): every timestep is drawn in a
#: few steps, and a wrong alpha shows.
T, BETA_START, BETA_END = 4, 0.1, 0.9
SHORT_SCHEDULE = ["--num_train_timesteps", str(T), "--beta_start", str(BETA_START), "--beta_end", str(BETA_END)]


@pytest.fixture
def spy(monkeypatch):
    """Record what the UNet gets in training (x_t, t, labels) and what the target is computed from (x0, noise, t),
    one entry per micro-batch, in order."""
    seen: dict[str, list] = {"forward": [], "target": []}
    real_forward, real_target = AdvancedUNet2DModel.forward, train.training_target

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        if self.training:  # not the previews' sampling
            labels = None if class_labels is None else class_labels.detach().clone()
            seen["forward"].append((sample.detach().clone(), timestep.detach().clone(), labels, self.null_class_label))
        return real_forward(self, sample, timestep, class_labels, return_dict)

    def target(scheduler, x0, noise, t):
        seen["target"].append((x0.detach().clone(), noise.clone(), t.clone()))
        return real_target(scheduler, x0, noise, t)

    monkeypatch.setattr(AdvancedUNet2DModel, "forward", forward)
    monkeypatch.setattr(train, "training_target", target)
    return seen


def _raw(data: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(data) as f:
        return f["X"].astype(np.float64), f["y"]


@pytest.mark.parametrize("flags, mode", [([], "channel"), (["--normalization", "global"], "global"),
                                         (["--normalization", "none"], "none"), (["--scaling_factor", "0.5"], "scale")])
def test_the_unet_learns_the_normalised_data_noised_at_every_timestep(data, tmp_path, spy, flags, mode):
    # 64 latents / batch 8 = 8 steps: one epoch, every latent once.
    assert run(["--latent", str(data), "--max_train_steps", "8", "--output_dir", str(tmp_path / "run"), *FAST,
                *SHORT_SCHEDULE, *flags]) == 0
    assert len(spy["forward"]) == len(spy["target"]) == 8
    betas = torch.linspace(BETA_START, BETA_END, T, dtype=torch.float32)
    alpha_bar = torch.cumprod(1 - betas, 0)
    for (x_t, t_model, _, _), (x0, noise, t) in zip(spy["forward"], spy["target"], strict=True):
        assert torch.equal(t_model, t)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    drawn = torch.cat([t for _, _, t in spy["target"]])
    assert sorted(set(drawn.tolist())) == list(range(T))  # 0 and T - 1 included
    # The epoch's x0 are the whole data set normalised as the flags say (compared by per-channel moments).
    x0 = torch.cat([x for x, _, _ in spy["target"]]).double().numpy()
    raw, _ = _raw(data)
    expected = {"channel": (raw - raw.mean((0, 2, 3), keepdims=True)) / raw.std((0, 2, 3), keepdims=True),
                "global": (raw - raw.mean()) / raw.std(), "none": raw, "scale": raw * 0.5}[mode]
    np.testing.assert_allclose(x0.mean((0, 2, 3)), expected.mean((0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(x0.std((0, 2, 3)), expected.std((0, 2, 3)), rtol=1e-5)


def test_labels_are_dropped_to_the_no_class_label_at_the_default_rate(data, tmp_path, spy):
    # Two epochs: 128 labels; the default --cond_drop_prob 0.1 drops about 13 of them.
    assert run(["--latent", str(data), "--max_train_steps", "16", "--output_dir", str(tmp_path / "run"), *FAST,
                "--class_conditional"]) == 0
    raw, y = _raw(data)
    normalised = (raw - raw.mean((0, 2, 3), keepdims=True)) / raw.std((0, 2, 3), keepdims=True)
    flat = torch.from_numpy(normalised.reshape(len(raw), -1))
    dropped = kept = 0
    for (_, _, labels, null), (x0, _, _) in zip(spy["forward"], spy["target"], strict=True):
        index = torch.cdist(x0.double().flatten(1), flat).argmin(1).numpy()  # which latent each row is
        is_null = labels.numpy() == null
        assert (labels.numpy()[~is_null] == y[index[~is_null]]).all()  # the rest keep their own labels
        dropped, kept = dropped + is_null.sum(), kept + (~is_null).sum()
    assert null == 4 and dropped + kept == 128  # the demo's classes are 0..3
    assert 0.03 < dropped / 128 < 0.2, dropped


def test_gradients_are_clipped_to_max_grad_norm(data, tmp_path):
    norms: list[float] = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)))

    handle = register_optimizer_step_pre_hook(record)  # every optimizer's step, before it runs
    try:
        for clip in ("0.01", "0"):  # 0: no clipping, whose norms show that 0.01 binds
            norms.clear()
            assert run(["--latent", str(data), "--max_train_steps", "3", "--output_dir", str(tmp_path / clip), *FAST,
                        "--max_grad_norm", clip]) == 0
            assert len(norms) == 3
            if clip == "0.01":
                assert max(norms) <= 0.01 * (1 + 1e-5), norms
    finally:
        handle.remove()
    assert min(norms) > 0.01, norms



def test_accumulated_gradients_are_the_mean_of_the_micro_batches(data, tmp_path):
    # The first step's learning rate is 0 (warm-up), so the weights stay put and a batch-4 run's first two
    # gradients are those of the two micro-batches of an accumulation-2 run's first step (the same samples and
    # noise: one data order, one noise stream). Summed instead of averaged, clipping and Adam's epsilon would act
    # on a gradient --gradient_accumulation_steps times too large.
    grads: list[torch.Tensor] = []

    def record(optimizer, args, kwargs):
        grads.append(torch.cat([p.grad.flatten() for g in optimizer.param_groups for p in g["params"]]).double())

    handle = register_optimizer_step_pre_hook(record)
    try:
        for accumulation, steps in (("1", "2"), ("2", "1")):
            assert run(["--latent", str(data), "--max_train_steps", steps, "--output_dir", str(tmp_path / accumulation),
                        *FAST, "--train_batch_size", "4", "--gradient_accumulation_steps", accumulation,
                        "--max_grad_norm", "0"]) == 0
    finally:
        handle.remove()
    assert len(grads) == 3
    torch.testing.assert_close(grads[2], (grads[0] + grads[1]) / 2, rtol=1e-4, atol=1e-7)

def test_the_ema_warms_up_and_is_what_the_pipeline_holds(data, tmp_path):
    # README: decay 1 - (1 + step)^-2/3 (step counted from 0 at the first update, so the first update copies the
    # weights), capped at --ema_decay; the saved pipeline holds the EMA weights, not the raw ones.
    out = tmp_path / "run"  # no warm-up: the learning rate would be 0 at the first step, 1e-5 at the second
    assert run(["--latent", str(data), "--max_train_steps", "2", "--checkpointing_steps", "1", "--output_dir",
                str(out), *FAST, "--lr_warmup_steps", "0"]) == 0
    model = [load_file(out / f"train/checkpoint-{s}/model.safetensors") for s in (1, 2)]
    ema = [load_file(out / f"train/checkpoint-{s}/ema.safetensors") for s in (1, 2)]
    unet = LatentDDPMPipeline.from_pretrained(out / "pipeline").unet
    names, pipe = [name for name, _ in unet.named_parameters()], unet.state_dict()  # the EMA's order
    decay = 1 - 2 ** (-2 / 3)
    for i, name in enumerate(names):
        torch.testing.assert_close(ema[0][str(i)], model[0][name])
        torch.testing.assert_close(ema[1][str(i)], decay * model[0][name] + (1 - decay) * model[1][name])
        assert torch.equal(pipe[name], ema[1][str(i)]), name
    moved = max(float((model[1][name] - model[0][name]).abs().max()) for name in names)
    assert moved > 1e-4, moved  # the weights moved: the checks above tell the EMA from the raw weights


def test_the_default_recipe_is_the_documented_one():
    # README's "default recipe": a changed default changes every run silently (--cond_drop_prob 0 would leave the
    # "no class" embedding untrained, so guidance would steer from an untrained prediction).
    cfg = parse_train_args([])
    assert (cfg.normalization, cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end,
            cfg.prediction_type, cfg.snr_gamma, cfg.snr_floor, cfg.cond_drop_prob) == (
        "channel", 1000, "linear", 1e-4, 0.02, "v_prediction", 5.0, 0.02, 0.1)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_grad_norm) == (
        0.9, 0.99, "constant_with_warmup", 200, 1.0)
    assert (cfg.use_ema, cfg.ema_decay, cfg.ema_power) == (True, 0.9999, pytest.approx(2 / 3))
