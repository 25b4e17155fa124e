"""Hardening of sample.py against broken saved pipelines: a scheduler_config.json that cannot sample (a bad
prediction_type, betas, learned variance, a negative steps_offset) and model_index.json latent statistics that do
not match the UNet; and `sampling.scheduler_problem`, the check behind the first, on every sampler. Every refusal is
exit status 2 with exactly one `error:` line on stderr, naming the file, and writes nothing.

sample.py runs in this process through `run_cli` (loaded from its file, as tests/test_sample.py does), on tiny
pipelines (4x8x8 latents, 2 denoising steps).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _helpers import SAMPLE_FAST as FAST
from _helpers import no_outputs, one_error_line
from _helpers import run_sample as run
from diffusers import DDPMScheduler

from latent_ddpm import default_scheduler
from latent_ddpm.errors import UserInputError
from latent_ddpm.pipeline import default_inference_steps
from latent_ddpm.sampling import SCHEDULERS, load_pipeline, make_scheduler, scheduler_problem

# --- 5. a broken saved scheduler config ---------------------------------------------------------------------------

# (a bad saved setting, what the one line says about it)
BAD_SCHEDULER_CONFIGS = [({"prediction_type": "bogus"}, "prediction_type given as bogus"),
                         ({"beta_end": 2.0}, "non-finite samples"),
                         ({"variance_type": "learned_range"}, "learned variance_type"),
                         ({"steps_offset": -3}, "steps_offset must be >= 0, got -3")]
IDS = [next(iter(c)) for c, _ in BAD_SCHEDULER_CONFIGS]


def copy_pipeline(pipes: Path, tmp_path: Path, name: str = "uncond") -> Path:
    pipe = tmp_path / "pipe"
    shutil.copytree(pipes / name, pipe)
    return pipe


def edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("change, reason", BAD_SCHEDULER_CONFIGS, ids=IDS)
def test_bad_saved_scheduler_config_is_one_line(pipes, tmp_path, capsys, change, reason):
    pipe = copy_pipeline(pipes, tmp_path)
    edit_json(pipe / "scheduler" / "scheduler_config.json", **change)
    out = tmp_path / "x.npz"
    assert run(["--model", pipe, "--output", out, *FAST]) == 2
    line = one_error_line(capsys)
    assert "scheduler_config.json" in line and reason in line and str(pipe) in line, line
    no_outputs(tmp_path, out)


def test_good_saved_scheduler_config_samples(pipes, tmp_path):
    """The control for the test above: the same copy, unedited, samples."""
    pipe = copy_pipeline(pipes, tmp_path)
    edit_json(pipe / "scheduler" / "scheduler_config.json")
    assert run(["--model", pipe, "--output", tmp_path / "x.npz", "--no_grid", *FAST]) == 0


def test_scheduler_problem_directly():
    config = default_scheduler().config
    good = DDPMScheduler.from_config(config)
    for steps in (2, 50, 1000):
        assert scheduler_problem(good, steps) is None, steps
    for change, reason in BAD_SCHEDULER_CONFIGS:
        # As keyword arguments: a key in the config's `_use_default_values` would otherwise be reset.
        bad = DDPMScheduler.from_config(config, **change)
        assert all(getattr(bad.config, k) == v for k, v in change.items()), bad.config
        for steps in (2, 50):
            problem = scheduler_problem(bad, steps)
            assert isinstance(problem, str) and reason in problem, (change, steps, problem)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_problem_passes_every_sampler_at_its_default_steps(name, guided):
    """The check that sample.py runs on every scheduler must not refuse a valid one: each sampler of the table,
    built from a trained pipeline's config, at its default step count, guided or not."""
    scheduler = make_scheduler(name, default_scheduler().config, guided=guided)
    assert scheduler_problem(scheduler, default_inference_steps(scheduler)) is None


def test_scheduler_problem_keeps_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert scheduler_problem(DDPMScheduler.from_config(default_scheduler().config), 5) is None
    assert torch.equal(torch.rand(3), expected)


# --- 6. model_index.json statistics that do not match the UNet -----------------------------------------------------


@pytest.mark.parametrize("name", ["latents_mean", "latents_std"])
def test_latent_stats_of_the_wrong_length(pipes, tmp_path, capsys, name):
    pipe = copy_pipeline(pipes, tmp_path)
    edit_json(pipe / "model_index.json", **{name: [1.0, 2.0, 3.0]})  # 3 values, 4 channels
    with pytest.raises(UserInputError, match=rf"model_index.json's {name} has 3 values but the UNet has 4"):
        load_pipeline(str(pipe))
    out = tmp_path / "x.npz"
    assert run(["--model", pipe, "--output", out, *FAST]) == 2
    line = one_error_line(capsys)
    assert "model_index.json" in line and name in line, line
    no_outputs(tmp_path, out)


def test_latent_stats_of_one_value_or_one_per_channel_load(pipes, tmp_path):
    pipe = copy_pipeline(pipes, tmp_path)
    assert load_pipeline(str(pipe)).config.latents_mean == [0.0, 1.0, 2.0, 3.0]  # 4 values, as saved
    edit_json(pipe / "model_index.json", latents_mean=[1.5])
    assert load_pipeline(str(pipe)).config.latents_mean == [1.5]
