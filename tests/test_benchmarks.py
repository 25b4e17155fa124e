"""The benchmarks' cache keys: stable across processes (else every run recomputes its caches) and sensitive
to what they must cover."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from latent_ddpm.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = """
import sys
sys.path.insert(0, "benchmarks")
from _common import recipe_key
from bench_sampling import scheduler_tag
from latent_ddpm.diffusion import build_noise_scheduler
from latent_ddpm.sampling import SCHEDULERS, make_scheduler
base = build_noise_scheduler(1000, "linear", 1e-4, 0.02, "v_prediction").config
print(recipe_key(["--preset", "small"], 1), *(scheduler_tag(make_scheduler(name, base)) for name in SCHEDULERS))
"""


def keys(hash_seed: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SNIPPET], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


def test_cache_keys_are_the_same_in_every_process():
    first, second = keys("1"), keys("2")
    assert first == second
    assert len(set(first[1:])) == len(first) - 1  # every sampler has its own tag


def test_recipe_key_is_the_resolved_recipe():
    """A cached model is named by what train.py would train: a default spelled out keeps the key (the small
    preset's resolved learning rate is 2e-3), any other value, preset or thread count changes it, and where the
    run is written does not count."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import recipe_key

    base = ["--preset", "small", "--max_train_steps", "2000"]
    key = recipe_key(base, 1)
    assert recipe_key([*base, "--learning_rate", "2e-3"], 1) == key
    assert recipe_key([*base, "--output_dir", "/elsewhere", "--overwrite_output_dir"], 1) == key
    assert recipe_key([*base, "--learning_rate", "1e-3"], 1) != key
    assert recipe_key(["--preset", "tiny", "--max_train_steps", "2000"], 1) != key
    assert recipe_key(base, 2) != key


def test_scheduler_tag_follows_the_sampler_config():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_sampling import scheduler_tag

    from latent_ddpm.diffusion import build_noise_scheduler
    from latent_ddpm.sampling import make_scheduler

    base = build_noise_scheduler(1000, "linear", 1e-4, 0.02, "v_prediction").config
    unguided, guided = make_scheduler("dpmsolver++", base), make_scheduler("dpmsolver++", base, guided=True)
    assert scheduler_tag(unguided) != scheduler_tag(guided)  # solver_order 3 vs 2
    # make_scheduler pins the multistep solvers' order: one built from the order-3 config keeps its own.
    for name in ("sde-dpmsolver++", "unipc"):
        assert make_scheduler(name, unguided.config).config.solver_order == 2


def test_fd_infinity_removes_the_one_over_n_bias():
    """FD_inf: the mean FD of disjoint subsets of 256, 512, ... samples, fitted linearly in 1/N; an FD that is
    exactly 3 + 500/N extrapolates to 3, and each size's subsets are disjoint and cover the samples."""
    from _common import fd_infinity

    seen = []

    def evaluator(x):
        seen.append(len(x))
        return {"fd": 3.0 + 500.0 / len(x)}

    out = fd_infinity(evaluator, np.zeros((2048, 2)))
    assert out["fd_inf"] == pytest.approx(3.0, abs=1e-6)
    assert out["fd_by_n"] == {n: pytest.approx(3 + 500 / n, abs=1e-3) for n in (256, 512, 1024, 2048)}
    assert sorted(seen) == [256] * 8 + [512] * 4 + [1024] * 2 + [2048]
    assert fd_infinity(evaluator, np.zeros((300, 2)))["fd_inf"] is None  # one size: nothing to extrapolate


@pytest.mark.parametrize("spec, message", [
    ("warp:20", "unknown sampler 'warp'"),
    ("dpmsolver++", "the step count must be a positive integer"),
    ("dpmsolver++:twenty", "the step count must be a positive integer"),
    ("dpmsolver++:0", "the step count must be a positive integer"),
    ("dpmsolver++:20:{karras}", "invalid JSON options"),
    ("dpmsolver++:20:[1]", "the options must be a JSON object"),
])
def test_extra_samplers_refuses_bad_entries_in_one_line(spec, message, capsys):
    """A bad `--extra_samplers` entry stops bench_sampling when its flags are parsed, before any training or
    sampling: one error line naming the entry, exit status 2."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_sampling

    with pytest.raises(SystemExit) as stop:
        run_cli(bench_sampling.main, ["--extra_samplers", f"ddpm:50;{spec}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message in err[0] and "--extra_samplers" in err[0], err


def test_extra_samplers_normalises_the_options():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_sampling import parse_args

    args = parse_args(["--extra_samplers", 'dpmsolver++:20:{"solver_order": 2, "use_karras_sigmas": true}; '
                                           'ddpm:50'])
    assert args.extra_samplers == [("dpmsolver++", 20, '{"solver_order": 2, "use_karras_sigmas": true}'),
                                   ("ddpm", 50, "")]
    again = parse_args(["--extra_samplers", 'dpmsolver++:20:{"use_karras_sigmas":true,"solver_order":2}'])
    assert again.extra_samplers[0] == args.extra_samplers[0]  # same sampler, same cache key


def test_gpu_bench_smoke_times_and_profiles(tmp_path, monkeypatch):
    """gpu_bench's CPU smoke run: each named candidate is timed, the profile's family shares add up to 1, and
    the JSON written to $OUT is the one returned."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_bench

    monkeypatch.setenv("OUT", str(tmp_path))
    result = gpu_bench.main(["--smoke", "--device", "cpu", "--candidates", "fp32_eager,bf16_eager",
                             "--profile", "fp32_eager"])
    assert result["errors"] == {} and result["skipped"] == []
    assert set(result["candidates"]) == {"fp32_eager", "bf16_eager"}
    assert result["candidates"]["bf16_eager"]["images_per_s"] > 0
    assert set(result["speedup_vs_fp32_eager"]) == {"fp32_eager", "bf16_eager"}
    profile = result["profiles"]["fp32_eager"]
    assert profile["device_ms_per_step"] > 0 and profile["top_kernels"]
    assert sum(profile["share_by_family"].values()) == pytest.approx(1.0, abs=0.01)
    assert json.loads((tmp_path / "gpu_bench.json").read_text()) == json.loads(json.dumps(result))


@pytest.mark.parametrize("flag", ["--candidates", "--profile"])
def test_gpu_bench_refuses_unknown_candidates(flag, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_bench

    with pytest.raises(SystemExit) as exit_info:
        run_cli(gpu_bench.main, [flag, "fp32_eager,bf17_compile"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"{flag}: unknown candidate(s) bf17_compile" in err[0], err


@pytest.mark.parametrize("name", ["bench_memory", "bench_quality", "bench_sampling", "bench_train",
                                  "bench_unet_step", "gpu_bench"])
def test_every_benchmark_refuses_a_bad_flag_in_one_line(name, capsys):
    """As the product's commands: a bad flag is one `error:` line naming it (no usage block), exit status 2."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, ["--no_such_flag", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--no_such_flag" in err[0], err


def test_gpu_sampler_gap_smoke_trains_benches_and_packs(tmp_path):
    # The device script's plumbing on a CPU: one 2-step job (AdamW beta2 and seed from its name), 4 samples per
    # sampler, plus an unknown job name.
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "JOBS": "beta95_s43 bogus", "STEPS_SCALE": "0.001",
           "NUM_SAMPLES": "4", "BENCH_BATCH": "4", "DEADLINE_S": "400", "BENCH_RESERVE_S": "300"}
    result = subprocess.run(["bash", "benchmarks/gpu_sampler_gap.sh"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unknown job bogus" in result.stdout
    assert "gpu_sampler_gap: train beta95_s43: exit 0" in result.stdout
    config = json.loads((work / "beta95_s43" / "train" / "config.json").read_text())
    assert (config["adam_beta2"], config["seed"]) == (0.95, 43)
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
        bench = json.load(tar.extractfile("bench_beta95_s43.json"))
    assert {"bench_beta95_s43.json", "bench_beta95_s43.log", "train_beta95_s43.log"} <= set(names)
    assert bench["quality"]["complete"] and "ddpm-1000" in bench["quality"]["samplers"]
    with tarfile.open(out / "pipe_beta95_s43.tar") as tar:
        assert "pipeline/model_index.json" in tar.getnames()
