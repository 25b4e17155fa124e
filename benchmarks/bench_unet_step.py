"""Training-step benchmark of `AdvancedUNet2DModel` against the original UNet, side by side.

One training step = forward + MSE loss + backward + Adam step. Each candidate runs in its own
process (so its peak memory is its own); the parent interleaves them round by round and reports
the median step time, samples/s, peak memory above the model's resting footprint, FLOPs per step
and achieved FLOP/s, and, for the `seed` preset, ratios against the original implementation
(`benchmarks/original_unet.py`: `nn.MultiheadAttention`, which materialises the attention matrix).

    python benchmarks/bench_unet_step.py                       # seed preset, (4, 64, 64), batch 8, fp32
    python benchmarks/bench_unet_step.py --presets tiny,small,large --no-original
    python benchmarks/bench_unet_step.py --channels_last --compile --rounds 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (  # noqa: E402
    PeakMemory,
    Worker,
    count_flops,
    emit,
    machine_info,
    mib,
    ratio,
    serve,
    summarize,
    time_calls,
)

from latent_ddpm.errors import ArgumentParser, run_cli  # noqa: E402
from latent_ddpm.unet import AdvancedUNet2DModel  # noqa: E402

# Default (batch, size) per preset on CPU: `large` is a GPU model, so smaller on CPU.
CPU_DEFAULTS = {"tiny": (8, 64), "small": (8, 64), "seed": (8, 64), "large": (2, 32)}
ORIGINAL_PRESET = "seed"  # the preset that is exactly the original's model


def load_original_module():
    """`benchmarks/original_unet.py` (a reference, outside the package)."""
    spec = importlib.util.spec_from_file_location("original_unet", Path(__file__).with_name("original_unet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_model(impl: str, preset: str, channels: int) -> torch.nn.Module:
    if impl == "original":
        module = load_original_module()
        return module.Unet({**module.ORIGINAL_CONFIG, "im_channels": channels})
    return AdvancedUNet2DModel.from_preset(preset, in_channels=channels)


def predict(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = model(x, t)
    return out if isinstance(out, torch.Tensor) else out[0]


# ----------------------------------------------------------------------------- worker side
def worker_main(spec: dict[str, Any]) -> None:
    """One candidate: build it, warm up, then time `steps` training steps per "run" command."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    b, c, s = spec["batch"], spec["channels"], spec["size"]
    model = build_model(spec["impl"], spec["preset"], c).to(device).train()
    x = torch.randn(b, c, s, s, device=device)
    target = torch.randn_like(x)
    t = torch.randint(0, 1000, (b,), device=device)
    if spec["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if spec["compile"] else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = F.mse_loss(predict(forward, x, t), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    memory = PeakMemory(device)
    memory.start()  # baseline: model, data and process, before any step (optimizer state comes in step 1)
    warmup = time_calls(step, spec["warmup"], device)
    memory.reset_peak()  # steady-state peak: leave out one-time warm-up and compilation peaks

    def run(steps: int) -> dict[str, Any]:
        return {"times": time_calls(step, steps, device), "peak_bytes": memory.peak_delta()}

    serve({"run": run}, ready={"warmup_s": [round(w, 3) for w in warmup]})


# ----------------------------------------------------------------------------- parent side
def model_flops(impl: str, preset: str, batch: int, channels: int, size: int) -> int:
    """FLOPs of one forward + backward, counted on the meta device (nothing is computed)."""
    with torch.device("meta"):
        model = build_model(impl, preset, channels)
        x = torch.randn(batch, channels, size, size)
        t = torch.randint(0, 1000, (batch,))
    return count_flops(lambda: predict(model, x, t).float().pow(2).mean().backward())


def check_equivalence(channels: int, size: int) -> float:
    """Max |ours - original| of the seed preset's output, with the original's weights converted."""
    from latent_ddpm.convert_original import rename_original_key

    torch.manual_seed(0)
    original = build_model("original", ORIGINAL_PRESET, channels).eval()
    ours = build_model("ours", ORIGINAL_PRESET, channels).eval()
    ours.load_state_dict({rename_original_key(k): v for k, v in original.state_dict().items()})
    x, t = torch.randn(2, channels, size, size), torch.tensor([3, 700])
    with torch.no_grad():
        return (predict(ours, x, t) - original(x, t)).abs().max().item()


def candidates(args: argparse.Namespace, preset: str) -> dict[str, dict[str, Any]]:
    base = dict(preset=preset, impl="ours", channels_last=False, compile=False)
    cands = {}
    if preset == ORIGINAL_PRESET and not args.no_original:
        cands["original"] = {**base, "impl": "original"}
    cands["ours"] = base
    if args.channels_last:
        cands["ours+channels_last"] = {**base, "channels_last": True}
    if args.compile:
        cands["ours+compile"] = {**base, "compile": True, "channels_last": args.channels_last}
    return cands


def bench_preset(args: argparse.Namespace, preset: str) -> dict[str, Any]:
    batch, size = CPU_DEFAULTS.get(preset, (8, 64)) if args.device == "cpu" else (64, 64)
    batch, size = args.batch_size or batch, args.size or size
    common = dict(batch=batch, size=size, channels=args.channels, device=args.device, threads=args.threads,
                  warmup=args.warmup)
    flops = model_flops("ours", preset, batch, args.channels, size)
    workers: dict[str, Worker] = {}
    times: dict[str, list[float]] = {}
    peaks: dict[str, int] = {}
    errors: dict[str, str] = {}
    script = Path(__file__).resolve()
    for name, spec in candidates(args, preset).items():
        try:
            workers[name] = Worker(script, {**common, **spec})
            times[name] = []
        except Exception as err:  # one broken candidate must not lose the others
            errors[name] = f"{type(err).__name__}: {err}"
    for _ in range(args.rounds):  # interleaved: every candidate once per round
        for name, worker in list(workers.items()):
            try:
                answer = worker.ask({"cmd": "run", "steps": args.steps})
            except Exception as err:
                errors[name] = f"{type(err).__name__}: {err}"
                worker.close()
                del workers[name]
                continue
            times[name].extend(answer["times"])
            peaks[name] = max(peaks.get(name, 0), answer["peak_bytes"])
    for worker in workers.values():
        worker.close()

    results: dict[str, Any] = {}
    for name, ts in times.items():
        if not ts:
            continue
        stats = summarize(ts)
        results[name] = {**stats, "samples_per_s": round(batch / stats["median_s"], 2),
                         "peak_memory_mib": mib(peaks.get(name)),
                         "achieved_gflop_per_s": round(flops / stats["median_s"] / 1e9, 1)}
    out: dict[str, Any] = {"batch_size": batch, "latent_shape": [args.channels, size, size],
                           "gflop_per_step": round(flops / 1e9, 2), "candidates": results}
    if "original" in results:
        ref = results["original"]
        out["vs_original"] = {
            name: {"speedup": ratio(ref["median_s"], r["median_s"]),
                   "memory_reduction": ratio(ref["peak_memory_mib"], r["peak_memory_mib"])}
            for name, r in results.items() if name != "original"
        }
        out["max_abs_diff_vs_original"] = check_equivalence(args.channels, min(size, 32))
    if errors:
        out["errors"] = errors
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="seed", help="comma-separated presets (tiny, small, seed, large)")
    parser.add_argument("--batch_size", type=int, help="batch size for every preset (default: per preset)")
    parser.add_argument("--size", type=int, help="latent H = W for every preset (default: per preset)")
    parser.add_argument("--channels", type=int, default=4, help="latent channels C")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per candidate per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median over steps x rounds)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per candidate first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each candidate's process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels_last", action="store_true", help="also time ours in channels_last")
    parser.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    parser.add_argument("--no-original", dest="no_original", action="store_true",
                        help="skip the original implementation (it needs ~10 GB at batch 8, 64x64)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "benchmark": "unet_step",
        "machine": machine_info(args.device),
        "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "step": "forward + MSE + backward + Adam.step, fp32, eager unless +compile",
        "presets": {},
    }
    for preset in args.presets.split(","):
        result["presets"][preset] = bench_preset(args, preset.strip())
    emit(result, "bench_unet_step.json")


if __name__ == "__main__":
    run_cli(main)  # a bad flag: one line, exit status 2
