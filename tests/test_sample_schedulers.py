"""sample.py's samplers on a tiny pipeline (4x8x8 latents, 2-10 denoising steps): every --scheduler, DPM-Solver++'s
order, --scheduler_config (what it sets, refuses and notes, inline or from a file) and the timestep spacing every
sampler starts from (the last training step). The rest of sample.py is tested in test_sample.py."""

import numpy as np
import pytest
import torch
from _helpers import ORIGINAL_RUN as RUN
from _helpers import SAMPLE_FAST_NO_GRID as FAST
from _helpers import load_npz, sample_script
from _helpers import run_sample as run

from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline, default_scheduler, sampling
from latent_ddpm.paths import partial_path
from latent_ddpm.sampling import SCHEDULERS, configure_scheduler, load_pipeline, make_scheduler


def test_every_scheduler(models, tmp_path):
    for name in SCHEDULERS:
        out = tmp_path / f"{name}.npz"
        eta = ["--eta", 0.5] if name == "ddim" else []  # refused with the others, which have no eta
        assert run(["--model", models / "cond" / "pipeline", "--scheduler", name, "--num_samples", 2, *eta,
                    "--output", out, *FAST]) == 0
        x = load_npz(out)["samples"]
        assert x.shape == (2, 4, 8, 8) and x.dtype == np.float32 and np.isfinite(x).all(), name


def test_dpm_solver_order_follows_guidance(models, tmp_path, monkeypatch):
    """Deterministic DPM-Solver++ runs at order 3 unguided and 2 with classifier-free guidance (diffusers'
    recommendation); its stochastic form supports at most 2 and is left alone."""
    config = load_pipeline(str(models / "cond" / "pipeline")).scheduler.config
    assert make_scheduler("dpmsolver++", config).config.solver_order == 3
    assert make_scheduler("dpmsolver++", config, guided=True).config.solver_order == 2
    assert make_scheduler("sde-dpmsolver++", config).config.solver_order == 2
    used = []
    monkeypatch.setattr(sample_script, "make_scheduler",
                        lambda *a, **kw: used.append(make_scheduler(*a, **kw).config.solver_order) or
                        make_scheduler(*a, **kw))
    common = ["--model", models / "cond" / "pipeline", "--scheduler", "dpmsolver++", "--num_samples", 2, *FAST]
    assert run([*common, "--output", tmp_path / "u.npz"]) == 0
    assert run([*common, "--class_labels", "all", "--guidance_scale", 2.0, "--output", tmp_path / "g.npz"]) == 0
    assert used == [3, 2]


def test_a_refused_setting_prints_only_its_error_line(models, capsys, recwarn):
    # The probe's own numpy/torch warnings (a negative sigma_min: complex casts, invalid powers) used to print
    # before the error line.
    assert run(["--model", models / "runs" / RUN / "pipeline", "--scheduler", "unipc", "--scheduler_config",
                '{"use_karras_sigmas": true, "sigma_min": -5}', "--num_inference_steps", 4]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(non-finite samples)" in err[0], err
    assert [str(w.message) for w in recwarn] == []


def test_a_trajectory_cut_short_is_noted(models, tmp_path, capsys):
    # lambda_min_clipped 0 leaves DPM-Solver a few of the steps asked for: sampled, and said.
    out = tmp_path / "x.npz"
    assert run(["--model", models / "runs" / RUN / "pipeline", "--scheduler", "dpmsolver++", "--scheduler_config",
                '{"lambda_min_clipped": 0.0}', "--num_inference_steps", 10, "--num_samples", 2, "--no_grid",
                "--output", out]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "DPMSolverMultistepScheduler takes" in notes[0] and "of the 10 steps" in notes[0]
    assert np.isfinite(load_npz(out)["samples"]).all()


def test_scheduler_config(models, tmp_path):
    """--scheduler_config sets sampler options on top of --scheduler (overriding the project's solver order),
    inline or from a file, and they act: Karras sigmas change deterministic samples."""
    config = load_pipeline(str(models / "cond" / "pipeline")).scheduler.config
    dpm = make_scheduler("dpmsolver++", config)
    assert sampling.configure_scheduler(dpm, {"solver_order": 2}, 20).config.solver_order == 2
    assert sampling.configure_scheduler(dpm, {"solver_order": 2}, 20).config.beta_end == config.beta_end
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    sampling.configure_scheduler(make_scheduler("ddpm", config), {}, 10)  # the probe's noise is its own
    assert torch.equal(torch.rand(3), expected)
    (tmp_path / "karras.json").write_text('{"use_karras_sigmas": true}')
    common = ["--model", models / "runs" / RUN / "pipeline", "--scheduler", "dpmsolver++", "--num_samples", 2,
              "--num_inference_steps", 4, "--no_grid"]
    assert run([*common, "--output", tmp_path / "plain.npz"]) == 0
    assert run([*common, "--scheduler_config", tmp_path / "karras.json", "--output", tmp_path / "k.npz"]) == 0
    assert run([*common, "--scheduler_config", '{"use_karras_sigmas": true}', "--output", tmp_path / "k2.npz"]) == 0
    plain, karras = load_npz(tmp_path / "plain.npz")["samples"], load_npz(tmp_path / "k.npz")["samples"]
    assert np.isfinite(karras).all() and not np.allclose(plain, karras)
    np.testing.assert_array_equal(karras, load_npz(tmp_path / "k2.npz")["samples"])
    # Without --scheduler the settings apply to the pipeline's saved scheduler (DDPM here), and act.
    ddpm = ["--model", models / "runs" / RUN / "pipeline", "--num_samples", 1, *FAST]
    assert run([*ddpm, "--output", tmp_path / "small.npz"]) == 0
    large = '{"variance_type": "fixed_large"}'
    assert run([*ddpm, "--scheduler_config", large, "--output", tmp_path / "large.npz"]) == 0
    assert not np.allclose(load_npz(tmp_path / "small.npz")["samples"], load_npz(tmp_path / "large.npz")["samples"])


def test_scheduler_config_checks_the_default_step_count(tmp_path, capsys):
    """With no --num_inference_steps, the pipeline's default step count (min(50, T - 1) = 19 for T = 20) is
    checked against the configured scheduler before sampling: here leading spacing repeats a noise level."""
    unet = AdvancedUNet2DModel.from_preset("tiny", in_channels=4, sample_size=8)
    LatentDDPMPipeline(unet=unet, scheduler=default_scheduler(num_train_timesteps=20)).save_pretrained(tmp_path / "p")
    out = tmp_path / "s.npz"
    argv = ["--model", tmp_path / "p", "--scheduler", "dpmsolver++", "--num_samples", 1, "--no_grid", "--output", out]
    assert run(argv) == 0
    out.unlink()
    capsys.readouterr()
    assert run([*argv, "--scheduler_config", '{"timestep_spacing": "leading", "steps_offset": 1}']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--scheduler_config" in err[0] and "19 steps" in err[0], err
    assert not out.exists() and not partial_path(out).exists()


@pytest.mark.parametrize("steps", [10, 20, 50, 100, 200])
def test_every_sampler_starts_at_the_last_training_step(steps):
    """Diffusers' "leading" spacing, which a pipeline saved before `TIMESTEP_SPACING` carries, started
    DPM-Solver++ and UniPC at t = 800 of 999 at 200 steps (FD 10.1 against 3.8 for DDIM 500 on the demo
    model) and every sampler at t = 900 at 10 steps. `make_scheduler` starts all of them at T - 1, from an old
    config and a new one alike, and a `--scheduler_config` spacing still wins."""
    from latent_ddpm.diffusion import build_noise_scheduler

    new = build_noise_scheduler(1000, "linear", 1e-4, 0.02, "v_prediction").config
    old = {**new, "timestep_spacing": "leading"}
    for name in SCHEDULERS:
        for config in (old, new, default_scheduler().config):
            scheduler = make_scheduler(name, config)
            scheduler.set_timesteps(steps)
            assert int(scheduler.timesteps[0]) == 999, (name, steps)
    leading = configure_scheduler(make_scheduler("dpmsolver++", new), {"timestep_spacing": "leading"}, steps)
    leading.set_timesteps(steps)
    assert int(leading.timesteps[0]) < 999


def test_saved_scheduler_gets_the_default_spacing(tmp_path):
    """With no --scheduler, sample.py samples with the pipeline's own scheduler, but with `TIMESTEP_SPACING`:
    a pipeline saved with diffusers' "leading" DDPM samples exactly as `--scheduler ddpm` does (both start at
    t = T - 1), where before it started at t = T - T // n. `--scheduler_config` still restores leading."""
    from diffusers import DDPMScheduler

    old = DDPMScheduler.from_config(default_scheduler().config, timestep_spacing="leading")
    assert sampling.saved_scheduler(old).config.timestep_spacing == sampling.TIMESTEP_SPACING
    new = default_scheduler()
    assert sampling.saved_scheduler(new) is new  # already trailing: kept as is

    torch.manual_seed(0)
    unet = AdvancedUNet2DModel.from_preset("tiny", in_channels=4, sample_size=8)
    LatentDDPMPipeline(unet=unet, scheduler=old).save_pretrained(tmp_path / "old")
    base = ["--model", tmp_path / "old", "--num_samples", 2, "--num_inference_steps", 4, "--no_grid"]
    outs = {}
    for name, extra in (("saved", []), ("ddpm", ["--scheduler", "ddpm"]),
                        ("leading", ["--scheduler_config", '{"timestep_spacing": "leading"}'])):
        outs[name] = tmp_path / f"{name}.npz"
        assert run([*base, *extra, "--output", outs[name]]) == 0
    saved, ddpm, leading = (load_npz(outs[n])["samples"] for n in ("saved", "ddpm", "leading"))
    np.testing.assert_array_equal(saved, ddpm)
    assert not np.allclose(saved, leading)
