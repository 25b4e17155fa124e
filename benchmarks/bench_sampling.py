"""Sampling: pipeline overhead against a bare denoising loop, and quality against steps per sampler.

1. Overhead: `LatentDDPMPipeline.__call__` against a bare loop (the same UNet, scheduler and steps:
   `set_timesteps`, scaled noise, then `unet` + `scheduler.step` per timestep), calls alternating,
   median wall and process-CPU seconds per call. Target: the pipeline >= 95% of the bare loop's samples/s.
2. Quality: `--num_samples` samples from ONE trained demo model with each sampler of `SAMPLERS`
   (DDPM-1000, DDIM 50/20/10, DPM-Solver++ 20/10, UniPC 10, SDE-DPM-Solver++ 20), every sampler with the same per-sample
   seeds (`latent_ddpm.sampling.sample_generators`), judged with `latent_ddpm.evaluate.Evaluator`
   against the demo data (FD, fd_ratio to the real-vs-real halves, precision/recall) and with
   `demo_quality`. `real_same_n` is fresh demo data of the same count: the floor of FD at this N.
   Target: DPM-Solver++ 20 steps within 10% of DDPM-1000's FD.

The model: `--model DIR` (a saved pipeline), else `train.py --preset small --max_train_steps
--train_steps` is run once into `--work_dir` and reused. Samples are cached per sampler and chunk
of `--batch_size` under `--work_dir` (per-sample seeds make chunks independent of each other), and
each run starts no new chunk after `--budget_s` seconds: DDPM-1000 on 512 samples takes ~10-30 minutes
of a shared CPU core, so rerun until the JSON says `"complete": true`. Runs started side by side
share the work (a chunk being sampled is locked; `--skip_overhead` for such helper runs).

    python benchmarks/bench_sampling.py                        # trains once (~6 min), then samples
    python benchmarks/bench_sampling.py --model /tmp/latent_ddpm_bench/small_2000_<recipe>/pipeline
    python benchmarks/bench_sampling.py --skip_quality         # overhead only (~1-2 min)
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (  # noqa: E402
    FRESH_DEMO_SEED,
    emit,
    fd_infinity,
    machine_info,
    quality_figures,
    ratio,
    recipe_key,
    short_hash,
    synchronize,
)

from latent_ddpm.demo import make_demo_latents  # noqa: E402
from latent_ddpm.errors import ArgumentParser, run_cli  # noqa: E402
from latent_ddpm.evaluate import Evaluator  # noqa: E402
from latent_ddpm.pipeline import start_noise_sigma  # noqa: E402
from latent_ddpm.sampling import (  # noqa: E402
    SCHEDULERS,
    configure_scheduler,
    load_pipeline,
    make_scheduler,
    sample_generators,
)

ROOT = Path(__file__).resolve().parents[1]
#: (scheduler name in latent_ddpm.sampling.SCHEDULERS, steps), cheapest first; the first is the reference.
SAMPLERS = (("ddpm", 1000), ("ddim", 50), ("ddim", 20), ("ddim", 10), ("dpmsolver++", 20), ("dpmsolver++", 10),
            ("unipc", 10), ("sde-dpmsolver++", 20), ("hybrid-dpmsolver++", 20))


# ----------------------------------------------------------------------------- model
def ensure_model(args: argparse.Namespace) -> Path:
    """The pipeline folder: `--model`, or a cached `train.py --preset small` run (trained on first use)."""
    if args.model:
        return Path(args.model)
    # The resolved recipe, the presets and the thread count (it changes the float arithmetic, hence the weights)
    # are in the folder name: a changed recipe, preset or --threads trains a new model.
    recipe_argv = ["--preset", args.preset, "--max_train_steps", str(args.train_steps)]
    run = Path(args.work_dir) / f"{args.preset}_{args.train_steps}_{recipe_key(recipe_argv, args.threads)}"
    if not (run / "pipeline" / "model_index.json").is_file():
        print(f"training the demo model into {run} (once) ...", file=sys.stderr)
        start = time.perf_counter()
        cmd = [sys.executable, str(ROOT / "train.py"), *recipe_argv, "--output_dir", str(run), "--overwrite_output_dir"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=sys.stderr)
        print(f"trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return run / "pipeline"


# ----------------------------------------------------------------------------- 1. overhead
def bare_sample(unet, scheduler, batch: int, steps: int, generator: torch.Generator, device,
                step_kwargs: dict) -> torch.Tensor:
    """The minimal denoising loop: what the pipeline does, without its checks, labels and output handling."""
    c, size = unet.config.in_channels, unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    scheduler.set_timesteps(steps, device=device)
    x = torch.randn((batch, c, h, w), generator=generator, device=device) * start_noise_sigma(scheduler, device)
    with torch.no_grad():
        for t in scheduler.timesteps:
            pred = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
    return x


def time_overhead(pipe, base_config, name: str, steps: int, batch: int, rounds: int, device) -> dict[str, Any]:
    """Alternate pipeline and bare-loop calls (same scheduler, steps, batch, generator); medians and ratios."""
    scheduler = make_scheduler(name, base_config)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    pipe.scheduler = scheduler

    def run_pipe():
        pipe(batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt")

    def run_bare():
        gen = torch.Generator().manual_seed(0)
        bare_sample(pipe.unet, scheduler, batch, steps, gen, device, {"generator": gen} if takes_generator else {})

    times: dict[str, list[tuple[float, float]]] = {"pipeline": [], "bare": []}
    run_pipe(), run_bare()  # warm-up
    for r in range(rounds):  # A B B A ...
        for label, fn in (("pipeline", run_pipe), ("bare", run_bare))[::1 if r % 2 == 0 else -1]:
            synchronize(device)
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            times[label].append((time.perf_counter() - w0, time.process_time() - c0))
    res: dict[str, Any] = {"batch_size": batch, "steps": steps}
    for label, ts in times.items():
        wall, cpu = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        res[label] = {"median_wall_s": round(wall, 3), "median_cpu_s": round(cpu, 3),
                      "samples_per_s_wall": round(batch / wall, 2), "samples_per_s_cpu": round(batch / cpu, 2),
                      "calls": len(ts)}
    for clock in ("cpu", "wall"):
        res[f"pipeline_vs_bare_{clock}"] = ratio(res["pipeline"][f"samples_per_s_{clock}"],
                                                 res["bare"][f"samples_per_s_{clock}"], 3)
    return res


# ----------------------------------------------------------------------------- 2. quality
def scheduler_tag(scheduler) -> str:
    """A short hash of a scheduler's class and public config, part of each cached chunk's name, so that a
    changed sampler setting samples afresh. The "_"-keys are left out: diffusers' `_use_default_values` lists
    a set, in an order that varies from process to process."""
    public = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    return short_hash([type(scheduler).__name__, public])


def cached_samples(pipe, base_config, name: str, steps: int, args: argparse.Namespace, cache: Path, deadline: float,
                   options: str = "") -> tuple[np.ndarray | None, float]:
    """All `--num_samples` samples of one sampler (from the cache where present); None when the time
    budget ran out first. Also returns the seconds spent sampling in this run. `options`: sample.py's
    `--scheduler_config` JSON, if any."""
    pipe.scheduler = make_scheduler(name, base_config)
    if options:
        pipe.scheduler = configure_scheduler(pipe.scheduler, json.loads(options), steps,
                                             pipe.unet.config.in_channels)
    tag = scheduler_tag(pipe.scheduler)
    chunks, spent, incomplete = [], 0.0, False
    for start in range(0, args.num_samples, args.batch_size):
        stop = min(args.num_samples, start + args.batch_size)
        path = cache / f"{name}_{steps}_{tag}_seed{args.seed}_{start}-{stop}.npy"
        if not path.is_file():
            lock = path.with_suffix(".lock")
            if time.perf_counter() > deadline:
                return None, spent
            try:  # another run of this script may be sampling this chunk: leave it to that run
                os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                incomplete = True
                continue
            try:
                t0 = time.perf_counter()
                gens = sample_generators(args.seed, range(start, stop))
                x = pipe(batch_size=stop - start, num_inference_steps=steps, generator=gens).latents
                spent += time.perf_counter() - t0
                np.save(path.with_suffix(".tmp.npy"), x)
                os.replace(path.with_suffix(".tmp.npy"), path)
            finally:
                lock.unlink(missing_ok=True)  # a user may have removed a stale lock by hand
        if not incomplete:
            chunks.append(np.load(path))
    return (None if incomplete else np.concatenate(chunks)), spent



def bench_quality(pipe, base_config, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    cache.mkdir(parents=True, exist_ok=True)
    reference, _ = make_demo_latents()  # the training set
    evaluator = Evaluator(reference)
    baseline = evaluator.baseline()
    fresh, _ = make_demo_latents(args.num_samples, seed=FRESH_DEMO_SEED)
    out: dict[str, Any] = {"num_samples": args.num_samples, "seed": args.seed,
                           "baseline_real_halves": {"fd": round(baseline["fd"], 4), "num_per_half": baseline[
                               "num_per_half"], "precision": round(baseline["precision"], 4),
                               "recall": round(baseline["recall"], 4)},
                           "real_same_n": quality_figures(evaluator, baseline["fd"], fresh), "samplers": {}}
    deadline = time.perf_counter() + args.budget_s
    missing = []
    # Cheap samplers first, so a short budget still gives most of the table; DDPM-1000 fills in over runs.
    samplers = [(name, steps, "") for name, steps in SAMPLERS] + args.extra_samplers
    for name, steps, options in sorted(samplers, key=lambda s: s[1]):
        x, spent = cached_samples(pipe, base_config, name, steps, args, cache, deadline, options)
        key = sampler_key(name, steps, options)
        if x is None:
            missing.append(key)
            continue
        out["samplers"][key] = {**quality_figures(evaluator, baseline["fd"], x), **fd_infinity(evaluator, x),
                                "sampling_s_this_run": round(spent, 1)}
    out["samplers"] = {sampler_key(*s): out["samplers"][sampler_key(*s)] for s in samplers
                       if sampler_key(*s) in out["samplers"]}
    out["complete"] = not missing
    if missing:
        out["missing"] = missing
    ref, fast = out["samplers"].get("ddpm-1000"), out["samplers"].get("dpmsolver++-20")
    if ref and fast:
        out["dpmsolver++20_fd_vs_ddpm1000"] = ratio(fast["fd"], ref["fd"], 3)
        out["target"] = "DPM-Solver++ 20 steps FD <= 1.10 x DDPM-1000 FD"
        out["target_met"] = fast["fd"] <= 1.10 * ref["fd"]
        if ref["fd_inf"] and fast["fd_inf"]:  # the same ratio without FD's finite-sample bias
            out["dpmsolver++20_fd_inf_vs_ddpm1000"] = ratio(fast["fd_inf"], ref["fd_inf"], 3)
    return out


def sampler_key(name: str, steps: int, options: str = "") -> str:
    """The JSON key of one sampler: `name-steps`, then its `--scheduler_config` options if any."""
    return f"{name}-{steps}" + (f" {options}" if options else "")


def parse_extra_samplers(text: str) -> list[tuple[str, int, str]]:
    """`--extra_samplers`: `name:steps[:JSON options]` entries separated by ';' -> (name, steps, options), the
    options normalised (sorted keys), so that spacing does not change a sampler's key."""
    out = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        name, *rest = entry.split(":", 2)
        steps, options = (rest[0] if rest else ""), rest[1:]
        if name not in SCHEDULERS:
            raise argparse.ArgumentTypeError(f"unknown sampler {name!r} in {entry!r}; valid: {', '.join(SCHEDULERS)}")
        try:
            num_steps = int(steps)
        except ValueError:
            num_steps = 0
        if num_steps < 1:
            raise argparse.ArgumentTypeError(f"{entry!r}: the step count must be a positive integer, as in "
                                             f"'{name}:20'")
        try:
            value = json.loads(options[0]) if options else {}
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"{entry!r}: invalid JSON options ({err.msg})") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{entry!r}: the options must be a JSON object, as in "
                                             f"'{name}:{num_steps}:{{\"use_karras_sigmas\": true}}'")
        out.append((name, num_steps, json.dumps(value, sort_keys=True) if value else ""))
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a saved pipeline folder (default: train one into --work_dir once)")
    parser.add_argument("--work_dir", default="/tmp/latent_ddpm_bench", help="model and sample cache")
    parser.add_argument("--preset", default="small", help="preset of the trained demo model")
    parser.add_argument("--train_steps", type=int, default=2000, help="train.py --max_train_steps of the demo model")
    parser.add_argument("--num_samples", type=int, default=512, help="samples per sampler")
    parser.add_argument("--batch_size", type=int, default=128, help="sampling batch (= cache chunk)")
    parser.add_argument("--seed", type=int, default=0, help="per-sample seeds: sample_seed(seed, i)")
    parser.add_argument("--budget_s", type=float, default=420, help="seconds of new sampling per run")
    parser.add_argument("--overhead_batch", type=int, default=64)
    parser.add_argument("--overhead_rounds", type=int, default=6, help="calls of each, alternating")
    parser.add_argument("--overhead_samplers", default="dpmsolver++:20,ddpm:50",
                        help="name:steps pairs timed against the bare loop")
    parser.add_argument("--extra_samplers", default="", type=parse_extra_samplers,
                        help="more samplers for the quality table, 'name:steps[:JSON]' separated by ';', the JSON "
                             "as sample.py's --scheduler_config, e.g. 'sde-dpmsolver++:50;dpmsolver++:20:"
                             "{\"use_lu_lambdas\": true}'")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared CPU stalls more)")
    parser.add_argument("--skip_overhead", action="store_true")
    parser.add_argument("--skip_quality", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    args.overhead_samplers = [(p.split(":")[0], int(p.split(":")[1])) for p in args.overhead_samplers.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    model = ensure_model(args)
    pipe = load_pipeline(str(model), device=device)
    base_config = pipe.scheduler.config  # the saved (training) scheduler: every sampler is built from it
    out: dict[str, Any] = {"benchmark": "bench_sampling", "machine": machine_info(device), "model": str(model),
                           "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    if not args.skip_overhead:
        out["overhead"] = {f"{name}-{steps}": time_overhead(pipe, base_config, name, steps, args.overhead_batch,
                                                            args.overhead_rounds, device)
                           for name, steps in args.overhead_samplers}
        out["overhead_target"] = "pipeline >= 0.95 x bare (CPU-time samples/s on CPU)"
        key = "pipeline_vs_bare_cpu" if device.type == "cpu" else "pipeline_vs_bare_wall"
        out["overhead_target_met"] = all(r[key] >= 0.95 for r in out["overhead"].values())
    if not args.skip_quality:
        weights = sorted((model / "unet").glob("*.safetensors"))
        digest = hashlib.sha1(b"".join(p.read_bytes() for p in weights)).hexdigest()[:12]
        cache = Path(args.work_dir) / "sample_cache" / digest  # per model weights
        out["quality"] = bench_quality(pipe, base_config, args, cache)
    out["wall_s"] = round(time.perf_counter() - start, 1)
    emit(out, path=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))  # a bad flag: one line, exit status 2
