"""sample.py and latent_ddpm/sampling.py on a tiny pipeline (4x8x8 latents, 2-3 denoising steps). The samplers
(--scheduler, --scheduler_config, the timestep spacing) are tested in test_sample_schedulers.py."""

import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import ORIGINAL_RUN as RUN
from _helpers import SAMPLE_FAST_NO_GRID as FAST
from _helpers import load_npz
from _helpers import run_sample as run

from latent_ddpm import LatentDDPMPipeline, paths
from latent_ddpm.paths import NpyRowWriter, write_npz
from latent_ddpm.run_folder import locate_run
from latent_ddpm.sampling import SCHEDULERS, sample_generators

ROOT = Path(__file__).resolve().parents[1]


def test_batch_size_invariance(models, tmp_path):
    common = ["--model", models / "cond" / "pipeline", "--num_samples", 5, "--scheduler", "ddpm", "--seed", 3,
              "--class_labels", "all", "--guidance_scale", 2.0, *FAST]
    for bs in (2, 5, 1):
        assert run([*common, "--batch_size", bs, "--output", tmp_path / f"b{bs}.npz"]) == 0
    b2, b5, b1 = (load_npz(tmp_path / f"b{bs}.npz") for bs in (2, 5, 1))
    # The noise is identical by construction; the UNet's float arithmetic (BLAS kernels chosen by batch
    # shape) may differ in the last bits, so the outputs agree to float32 rounding, relative to the largest
    # value (the untrained model's samples, which start at t = T - 1, reach ~450).
    atol = 4e-6 * np.abs(b5["samples"]).max()
    np.testing.assert_allclose(b2["samples"], b5["samples"], rtol=1e-5, atol=atol)
    np.testing.assert_allclose(b1["samples"], b5["samples"], rtol=1e-5, atol=atol)
    np.testing.assert_array_equal(b2["labels"], [0, 1, 2, 0, 1])
    # A different seed gives different samples.
    assert run([*common, "--seed", 4, "--output", tmp_path / "s4.npz"]) == 0
    assert np.abs(load_npz(tmp_path / "s4.npz")["samples"] - b5["samples"]).max() > 0.1


def test_out_of_memory_halves_the_batch_and_gives_the_same_samples(models, tmp_path, monkeypatch, capsys):
    # A device that fits 3 samples per batch: --batch_size 8 over 7 samples runs 7 -> 3, 3, 1, the batches of
    # --batch_size 3, so the file is bit-identical to that run's.
    common = ["--model", models / "cond" / "pipeline", "--num_samples", 7, "--class_labels", "all", "--seed", 5,
              *FAST]
    assert run([*common, "--batch_size", 3, "--output", tmp_path / "b3.npz"]) == 0
    real_call, sizes = LatentDDPMPipeline.__call__, []

    def fits_three(self, batch_size=1, **kwargs):
        sizes.append(batch_size)
        if batch_size > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_call(self, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(LatentDDPMPipeline, "__call__", fits_three)
    capsys.readouterr()
    assert run([*common, "--batch_size", 8, "--output", tmp_path / "b8.npz"]) == 0
    assert sizes == [7, 3, 3, 1]
    assert "out of accelerator memory at 7 samples per batch: going on at 3" in capsys.readouterr().err
    a, b = load_npz(tmp_path / "b3.npz"), load_npz(tmp_path / "b8.npz")
    np.testing.assert_array_equal(a["samples"], b["samples"])
    np.testing.assert_array_equal(a["labels"], b["labels"])


def test_out_of_memory_at_one_sample_is_one_line_and_writes_nothing(models, tmp_path, monkeypatch, capsys):
    def never_fits(self, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(LatentDDPMPipeline, "__call__", never_fits)
    out = tmp_path / "x.npz"
    assert run(["--model", models / "runs" / RUN / "pipeline", "--num_samples", 4, "--output", out, *FAST]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "out of accelerator memory at one sample per batch" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_per_sample_noise_does_not_depend_on_batch():
    alone = [torch.randn(3, generator=g) for g in sample_generators(7, [4, 2])]
    batch = [torch.randn(3, generator=g) for g in sample_generators(7, range(6))]
    assert torch.equal(alone[0], batch[4]) and torch.equal(alone[1], batch[2])
    assert not torch.equal(batch[0], batch[1])


def test_two_processes_match_one(models, tmp_path):
    common = ["--model", models / "cond" / "pipeline", "--num_samples", 6, "--batch_size", 3, "--seed", 1,
              "--class_labels", "all", "--scheduler", "euler_a", *FAST]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv = [*torchrun, str(ROOT / "sample.py"), *map(str, common), "--output", str(tmp_path / "two.npz")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "over 2 process(es)" in proc.stdout
    assert run([*common, "--output", tmp_path / "one.npz"]) == 0
    one, two = load_npz(tmp_path / "one.npz"), load_npz(tmp_path / "two.npz")
    # Same batches on each side (rank 0: 0-2, rank 1: 3-5), hence bit-identical.
    np.testing.assert_array_equal(one["samples"], two["samples"])
    np.testing.assert_array_equal(one["labels"], two["labels"])
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_a_write_failure_in_one_rank_is_one_line_in_every_rank(models, tmp_path):
    # The failing rank printed its line; the other died at the barrier with a gloo "Connection closed" traceback.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "LATENT_DDPM_FSIZE_LIMIT": "1:2048"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv = [*torchrun, str(ROOT / "sample.py"), "--model", str(models / "cond" / "pipeline"), "--num_samples", "6",
            "--batch_size", "3", "--class_labels", "all", *map(str, FAST), "--output", str(tmp_path / "two.npz")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all("cannot write" in e and "File too large" in e for e in errors), proc.stderr[-3000:]
    assert "Connection closed" not in proc.stderr and "gloo" not in proc.stderr, proc.stderr[-3000:]
    assert not list(tmp_path.iterdir())  # no samples file, no partial, no lock


def test_original_flags_locate_the_run(models, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(models / "runs", work / "runs")
    monkeypatch.chdir(work)
    assert run(["--latent", "data/x.npz", "--n_samples", 3, "--n_steps", 2, "--seed", 7, "--mode", "sample"]) == 0
    out = work / "runs" / RUN / "generated" / "seed_7" / "samples_7_3.npz"
    assert load_npz(out)["samples"].shape == (3, 4, 8, 8) and "labels" not in load_npz(out)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert locate_run("x.npz", n_dim=4, lbeta=1e-4, ubeta=0.02, n_steps=50) == Path("runs") / RUN
    # A second run with 50 steps: ambiguous without --n_steps, picked with it.
    shutil.copytree(work / "runs" / RUN / "pipeline", work / "runs" / "x_ddpm_4_50_0.0001_0.02" / "pipeline")
    assert locate_run("x.npz", n_steps=50).name == "x_ddpm_4_50_0.0001_0.02"
    with pytest.raises(ValueError, match="matches several runs"):
        locate_run("x.npz")
    with pytest.raises(ValueError, match=r"looked for runs/x_ddpm_3_\*_\*_\*/pipeline"):
        locate_run("x.npz", n_dim=3)


def test_original_beta_flags_pick_the_run(models, tmp_path, monkeypatch):
    # sample.py's --lbeta/--ubeta only choose the run folder (the noise schedule is the model's own). No test passed
    # them through its command line: dropped or swapped, they failed nothing.
    work = tmp_path / "work"
    for name in (RUN, "x_ddpm_4_1000_0.0003_0.05"):
        shutil.copytree(models / "runs" / RUN, work / "runs" / name)
    monkeypatch.chdir(work)
    assert run(["--latent", "x.npz", "--lbeta", "0.0003", "--ubeta", "0.05", "--n_samples", 1, "--n_steps", 2,
                "--seed", 7, "--no_grid"]) == 0
    assert (work / "runs" / "x_ddpm_4_1000_0.0003_0.05" / "generated" / "seed_7" / "samples_7_1.npz").is_file()
    assert not (work / "runs" / RUN / "generated").exists()


def test_no_overwrite_then_overwrite(models, tmp_path, capsys):
    out = tmp_path / "s.npz"
    out.write_bytes(b"precious")
    argv = ["--model", models / "runs" / RUN / "pipeline", "--num_samples", 2, "--output", out, *FAST]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0] and "--overwrite" in err[0]
    assert out.read_bytes() == b"precious"
    assert run([*argv, "--overwrite"]) == 0
    assert load_npz(out)["samples"].shape == (2, 4, 8, 8)


@pytest.mark.parametrize("extra, message", [
    (["--scheduler", "nope"], "valid names: ddpm, ddim, dpmsolver++"),
    (["--num_samples", "0"], "at least 1"),
    (["--num_inference_steps", "5000"], "cannot take 5000 steps: the model was trained on 1000 timesteps"),
    # T steps repeat a noise level under linspace spacing (the default "trailing" takes them, see
    # test_every_sampler_starts_at_the_last_training_step).
    (["--scheduler", "dpmsolver++", "--num_inference_steps", "1000", "--scheduler_config",
      '{"timestep_spacing": "linspace"}'], "noise levels repeat"),
    (["--scheduler", "unipc", "--num_inference_steps", "1000", "--scheduler_config",
      '{"timestep_spacing": "linspace"}'], "use fewer steps"),
    (["--seed", "-3"], "--seed must be >= 0"),
    # Flags that would be ignored: the original's run-locating flags beside --model, a subfolder without --vae.
    (["--n_dim", "4", "--lbeta", "0.0001"], "--n_dim --lbeta: only used to find a run folder"),
    (["--runs_dir", "elsewhere"], "--runs_dir: only used to find a run folder"),  # was silently ignored
    (["--vae_subfolder", "vae"], "--vae_subfolder needs --vae"),
    (["--output", ".npz"], "name the .npz file to write"),
    (["--output", ""], "name the .npz file to write"),  # was the default output path, silently
    (["--mixed_precision", "fp8"], "invalid choice"),
    (["--output", "x.txt"], "must end in .npz"),
    (["--class_labels", "1"], "unconditional"),
    (["--guidance_scale", "3"], "needs --class_labels"),
    (["--bogus"], "unrecognized arguments"),
    (["--scheduler_config", "{bad"], "--scheduler_config: invalid JSON"),
    (["--scheduler_config", "[1]"], "neither a JSON object nor a readable .json file"),
    (["--scheduler_config", "x" * 300], "neither a JSON object nor a readable .json file"),
    (["--scheduler_config", __file__], f"--scheduler_config {__file__}: invalid JSON"),
    (["--scheduler", "ddim", "--scheduler_config", '{"use_karras_sigmas": true}'],
     "DDIMScheduler has no setting use_karras_sigmas; valid: clip_sample,"),
    (["--scheduler_config", '{"beta_end": 0.03}'], "beta_end is fixed by the model's training"),
    (["--scheduler", "dpmsolver++", "--scheduler_config", '{"prediction_type": "epsilon"}'], "fixed by"),
    (["--scheduler", "dpmsolver++", "--scheduler_config", '{"use_flow_sigmas": true}'], "use_flow_sigmas is fixed"),
    (["--scheduler", "euler", "--scheduler_config", '{"timestep_type": "continuous"}'], "timestep_type is fixed"),
    (["--scheduler", "ddim", "--scheduler_config", '{"timestep_spacing": "bogus"}'],
     'timestep_spacing must be one of "leading", "trailing", "linspace" for DDIMScheduler, got "bogus"'),
    (["--scheduler", "dpmsolver++", "--scheduler_config", '{"algorithm_type": "nope"}'],
     'algorithm_type must be one of "dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++" for '
     'DPMSolverMultistepScheduler, got "nope"'),
    (["--scheduler", "dpmsolver++", "--scheduler_config", '{"variance_type": "learned_range"}'],
     "needs a UNet that predicts the variance"),
    (["--scheduler", "ddim", "--scheduler_config", '{"clip_sample": "false"}'],
     'clip_sample takes a bool (like its default true), got "false"'),
    (["--scheduler", "dpmsolver++", "--scheduler_config", '{"solver_order": 1000000}'],
     "solver_order must be one of (1, 2, 3)"),
    (["--scheduler", "ddim", "--scheduler_config", '{"steps_offset": -1}'], "steps_offset must be >= 0"),
    # A wrong-typed setting that fails inside set_timesteps (was an AttributeError / TypeError traceback).
    (["--scheduler", "unipc", "--scheduler_config", '{"solver_p": "x"}'],
     "UniPCMultistepScheduler cannot take 50 steps: AttributeError"),
    (["--scheduler", "unipc", "--scheduler_config", '{"use_karras_sigmas": true, "sigma_min": "abc"}'],
     "cannot take 50 steps: TypeError"),
    # Clipped above every noise level: no step at all (the starting noise was written, exit 0).
    (["--scheduler", "dpmsolver++", "--scheduler_config", '{"lambda_min_clipped": 1e9}'],
     "leave no denoising step"),
    (["--scheduler", "dpmsolver++", "--scheduler_config", '{"thresholding": true, "sample_max_value": 0}'],
     "(non-finite samples)"),
    (["--scheduler", "dpmsolver++", "--num_inference_steps", "1000", "--scheduler_config",
      '{"timestep_spacing": "leading"}'],
     '--scheduler_config {"timestep_spacing": "leading"}: DPMSolverMultistepScheduler cannot take 1000 steps'),
])
def test_bad_flags_one_line(models, tmp_path, capsys, extra, message):
    assert run(["--model", models / "runs" / RUN / "pipeline", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_bad_models_and_labels(models, tmp_path, capsys):
    cond = models / "cond" / "pipeline"
    (tmp_path / "run_without_index" / "pipeline").mkdir(parents=True)
    for argv, message in [(["--model", tmp_path / "missing"], "no such folder"),
                          (["--model", models / "cond" / "nothing"], "no such folder"),
                          (["--model", tmp_path / "run_without_index"], "an unfinished run?"),
                          ([], "--model DIR_OR_HUB_ID"),
                          (["--model", cond, "--class_labels", "3"], "its classes are 0, 1, 2"),
                          (["--model", cond, "--class_labels", "a"], "integers or 'all'")]:
        assert run([*argv, "--output", tmp_path / "o.npz"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.npz").exists()


def test_a_run_folder_samples_its_pipeline_into_the_run(models, tmp_path, monkeypatch):
    # `--model runs/demo` was refused ("did you mean runs/demo/pipeline?"); LatentDDPMPipeline.from_pretrained
    # takes the run folder, and so does sample.py, writing into that run's generated/.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(models / "cond", tmp_path / "cond")
    assert run(["--model", "cond", "--num_samples", 2, "--class_labels", "all", *FAST]) == 0
    assert load_npz(tmp_path / "cond" / "generated" / "seed_42" / "samples_42_2.npz")["samples"].shape == (2, 4, 8, 8)
    # A checkpoint folder whose pipeline/ came from --push_checkpoints: the samples go outside the checkpoint.
    shutil.copytree(models / "cond" / "pipeline", tmp_path / "cond" / "train" / "checkpoint-2" / "pipeline")
    assert run(["--model", "cond/train/checkpoint-2", "--num_samples", 2, "--class_labels", "all", *FAST]) == 0
    assert (tmp_path / "cond" / "generated" / "checkpoint-2" / "seed_42" / "samples_42_2.npz").is_file()
    assert not (tmp_path / "cond" / "train" / "checkpoint-2" / "generated").exists()


def test_cli_subprocess_exit_status(models):
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(models / "cond" / "pipeline"),
                           "--scheduler", "bogus"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: unknown --scheduler 'bogus'; valid names: {', '.join(SCHEDULERS)}"]


def test_labels_mixed_precision_and_grid(models, tmp_path):
    out = tmp_path / "c.npz"
    assert run(["--model", models / "cond" / "pipeline", "--num_samples", 3, "--class_labels", 2, 0,
                "--guidance_scale", 1.5, "--mixed_precision", "bf16", "--num_inference_steps", 2, "--output", out]) == 0
    got = load_npz(out)
    np.testing.assert_array_equal(got["labels"], [2, 0, 2])
    assert got["labels"].dtype == np.int64 and np.isfinite(got["samples"]).all()
    assert out.with_suffix(".png").exists()


def test_streaming_writer_memory_is_bounded(tmp_path, monkeypatch):
    """Peak Python/numpy allocations stay near one batch + one copy chunk, far below the data size."""
    monkeypatch.setattr(paths, "COPY_CHUNK_BYTES", 2**20)
    n, shape, batch = 16_000, (4, 8, 8), 250  # 16.4 MB of float32 in all
    total = n * int(np.prod(shape)) * 4
    tracemalloc.start()
    try:
        partial = tmp_path / "p.npy"
        writer = NpyRowWriter(partial, (n, *shape), create=True)
        for start in reversed(range(0, n, batch)):  # any order
            rows = np.arange(start, min(start + batch, n), dtype=np.float32)[:, None, None, None]
            writer.write(start, np.broadcast_to(rows, (len(rows), *shape)))
        write_npz(tmp_path / "big.npz", {"samples": partial, "labels": np.arange(n) % 3})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 2**20 and peak < total / 5, peak
    with np.load(tmp_path / "big.npz", allow_pickle=False) as f:
        x = f["samples"]
        assert x.shape == (n, *shape) and x.dtype == np.float32
        np.testing.assert_array_equal(x[:, 1, 2, 3], np.arange(n))
        np.testing.assert_array_equal(f["labels"], np.arange(n) % 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npz", "p.npy"]  # no temporary left


def test_writer_rejects_misplaced_rows(tmp_path):
    writer = NpyRowWriter(tmp_path / "p.npy", (4, 2), create=True)
    with pytest.raises(ValueError):
        writer.write(3, np.zeros((2, 2)))
    with pytest.raises(ValueError):
        writer.write(0, np.zeros((1, 3)))
