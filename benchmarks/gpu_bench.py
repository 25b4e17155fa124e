"""GPU training throughput of `AdvancedUNet2DModel`: precision, layout, compile, optimizer and data placement.

One prepared run (well under 10 minutes on one H100): every candidate trains the same model on the same
synthetic latents (a DDPM noise-prediction step: sample a batch, add noise at random timesteps, MSE,
backward, optimizer step) and reports images/s, step time, peak memory and model FLOP utilisation
(MFU: model FLOPs per step / step time / the GPU's dense peak for the candidate's math precision).
Each candidate is guarded: one failure is recorded and the rest still run. The JSON is rewritten after
every candidate, to $OUT/gpu_bench.json when $OUT is set, and printed at the end.

    python benchmarks/gpu_bench.py                     # seed preset, (4, 64, 64), batch 128, on cuda
    python benchmarks/gpu_bench.py --batch_size 64 --candidates fp32_eager,bf16_compile
    python benchmarks/gpu_bench.py --smoke             # tiny preset, 2 steps, runs on CPU too

Target: bf16_compile at least 2x the images/s of fp32_eager.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import PeakMemory, count_flops, emit, machine_info, mib, ratio, synchronize  # noqa: E402

from latent_ddpm.errors import ArgumentParser, run_cli  # noqa: E402
from latent_ddpm.unet import AdvancedUNet2DModel  # noqa: E402

# Dense (no sparsity) peak TFLOP/s from NVIDIA's H100/H200 datasheets, by name substring, first match wins.
# "tf32" and "bf16" are tensor-core peaks; "fp32" is the non-tensor-core FP32 peak.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
]


@dataclass(frozen=True)
class Candidate:
    """One training configuration."""

    precision: str = "fp32"  # fp32 | tf32 (fp32 weights, TF32 matmuls/convs) | bf16 (autocast, TF32 elsewhere)
    channels_last: bool = False
    compile: bool = False
    fused_adamw: bool = False
    device_data: bool = True  # dataset resident on the device; False: pinned host memory, copied each step


CANDIDATES: dict[str, Candidate] = {
    "fp32_eager": Candidate(),
    "bf16_compile": Candidate("bf16", compile=True, fused_adamw=True),
    "fp32_eager_host_data": Candidate(device_data=False),
    "tf32_eager": Candidate("tf32"),
    "bf16_eager": Candidate("bf16"),
    "bf16_eager_channels_last": Candidate("bf16", channels_last=True),
    "bf16_eager_fused_adamw": Candidate("bf16", fused_adamw=True),
    "tf32_compile": Candidate("tf32", compile=True, fused_adamw=True),
    "bf16_compile_channels_last": Candidate("bf16", channels_last=True, compile=True, fused_adamw=True),
}


def peak_tflops(device: torch.device) -> tuple[str, dict[str, float] | None]:
    if device.type != "cuda":
        return "n/a", None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return name, peaks
    return name, None


def sdpa_fused_kernels(device: torch.device) -> dict[str, bool] | None:
    """Whether a fused SDPA kernel (flash, mem-efficient, cuDNN) takes each dtype at the model's head widths.

    On GPUs the model pads heads to a multiple of 8 for 16-bit inputs and of 4 for float32 (16 on CPU, so the
    CPU smoke run never sees the CUDA choice). A False at a width the model uses (float32_d4, bfloat16_d8,
    ...) means the math fallback, which materialises B x heads x 4096^2 scores at 64x64 (tens of GiB: OOM or
    slow)."""
    if device.type != "cuda":
        return None
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    except (ImportError, AttributeError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    found: dict[str, Any] = {}
    for dtype in (torch.float32, torch.bfloat16):
        for head_dim in (4, 8, 16):
            qkv = torch.randn(2, 64, 3, 4, head_dim, device=device, dtype=dtype, requires_grad=True)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # the model's strided views
            try:
                with sdpa_kernel(fused):
                    F.scaled_dot_product_attention(q, k, v).sum().backward()
                found[f"{str(dtype)[6:]}_d{head_dim}"] = True
            except Exception:  # "No available kernel": this one would take the math fallback
                found[f"{str(dtype)[6:]}_d{head_dim}"] = False
    return found


def set_precision(precision: str) -> None:
    tf32 = precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def model_flops(preset: str, batch: int, channels: int, size: int) -> int:
    """FLOPs of one forward + backward, counted on the meta device."""
    with torch.device("meta"):
        model = AdvancedUNet2DModel.from_preset(preset, in_channels=channels)
        x = torch.randn(batch, channels, size, size)
        t = torch.randint(0, 1000, (batch,))
    return count_flops(lambda: model(x, t).sample.float().pow(2).mean().backward())


def build_step(cand: Candidate, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    """A fresh model, optimizer and dataset for `cand`; returns one training step."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    set_precision(cand.precision)
    model = AdvancedUNet2DModel.from_preset(args.preset, in_channels=args.channels).to(device).train()
    memory_format = torch.channels_last if cand.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if cand.fused_adamw else None)
    forward = torch.compile(model) if cand.compile else model

    shape = (args.dataset_size, args.channels, args.size, args.size)
    data = torch.randn(shape, device=device) if cand.device_data else torch.randn(shape)
    pin = not cand.device_data and device.type == "cuda"
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=device), 0)
    b = args.batch_size

    def step() -> None:
        if cand.device_data:
            x0 = data[torch.randint(0, len(data), (b,), device=device)]
        else:
            # As DataLoader(pin_memory=True): gather on the host, pin the batch, copy it asynchronously.
            # (Indexing a pinned tensor gives a pageable one, so pinning `data` alone would not do this.)
            x0 = data[torch.randint(0, len(data), (b,))]
            x0 = (x0.pin_memory() if pin else x0).to(device, non_blocking=True)
        x0 = x0.contiguous(memory_format=memory_format)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (b,), device=device)
        a = alpha_bar[t].view(b, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cand.precision == "bf16"):
            pred = forward(x_t, t).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_candidate(cand: Candidate, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Train `args.warmup + args.chunks * args.steps` steps; images/s is the median over the chunks."""
    step = build_step(cand, args, device)
    b = args.batch_size
    memory = PeakMemory(device)
    memory.start()
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    memory.reset_peak()
    chunk_s = []
    for _ in range(args.chunks):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize(device)
        chunk_s.append((time.perf_counter() - start) / args.steps)
    step_s = statistics.median(chunk_s)
    return {"options": asdict(cand), "step_ms": round(step_s * 1e3, 2), "images_per_s": round(b / step_s, 1),
            "step_ms_per_chunk": [round(s * 1e3, 2) for s in chunk_s], "warmup_s": round(warmup_s, 1),
            "peak_memory_mib": mib(memory.peak_delta())}


# Kernel families for the profile's breakdown, by substring of the kernel name, first match wins.
KERNEL_FAMILIES: list[tuple[str, tuple[str, ...]]] = [
    ("attention", ("fmha", "flash", "attention", "attn")),
    ("group_norm", ("group_norm", "groupnorm", "welford")),
    ("conv_gemm", ("conv", "gemm", "sm90", "sm80", "cutlass", "xmma", "cudnn", "wgrad", "dgrad", "cublas")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
]


def profile_candidate(cand: Candidate, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Where one step's device time goes: the top kernels and their families, over `args.profile_steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    step = build_step(cand, args, device)
    for _ in range(args.warmup):
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step()
        synchronize(device)
    events = [e for e in prof.key_averages() if e.device_type.name == device.type.upper()]
    if not events:  # CPU (smoke run): operator self time instead of kernels
        events = list(prof.key_averages())

    def self_us(e) -> float:
        return float(getattr(e, "self_device_time_total", 0) or 0) if device.type == "cuda" else e.self_cpu_time_total

    total = sum(self_us(e) for e in events) or 1.0
    families: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        family = next((f for f, keys in KERNEL_FAMILIES if any(k in name for k in keys)), "other")
        families[family] = families.get(family, 0.0) + self_us(e)
    top = sorted(events, key=self_us, reverse=True)[:args.profile_top]
    per_step_ms = total / args.profile_steps / 1e3
    return {"options": asdict(cand), "device_ms_per_step": round(per_step_ms, 2),
            "share_by_family": {f: round(v / total, 3) for f, v in sorted(families.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": e.key[:120], "share": round(self_us(e) / total, 3), "calls": e.count}
                            for e in top]}


def add_mfu(result: dict[str, Any], flops: int, peaks: dict[str, float] | None) -> None:
    achieved = flops / (result["step_ms"] / 1e3) / 1e12
    result["achieved_tflop_per_s"] = round(achieved, 2)
    if peaks:
        precision = result["options"]["precision"]
        result["mfu"] = round(achieved / peaks[precision], 4)
        result["mfu_vs_bf16_peak"] = round(achieved / peaks["bf16"], 4)


def split_names(names: str) -> list[str]:
    return [n.strip() for n in names.split(",") if n.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--size", type=int, default=64, help="latent H = W")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--dataset_size", type=int, default=4096, help="synthetic latents to sample batches from")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per chunk")
    parser.add_argument("--chunks", type=int, default=3, help="timed chunks (images/s is the median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated, from: "
                        + ", ".join(CANDIDATES))
    parser.add_argument("--profile", default="bf16_eager,fp32_eager,bf16_compile",
                        help="candidates to profile after the timed ones, while time is left (empty: none)")
    parser.add_argument("--profile_steps", type=int, default=3, help="profiled steps per candidate")
    parser.add_argument("--profile_top", type=int, default=15, help="kernels listed per profile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--time_budget_s", type=float, default=None,
                        help="skip the remaining candidates once this much time has passed (default 420; "
                        "no limit with --smoke)")
    parser.add_argument("--deadline_s", type=float, default=None,
                        help="hard stop (default 530 s after start; no limit with --smoke): skip a candidate whose "
                        "estimated time would pass it, interrupt the one running at it, and write the JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 16x16, batch 4, 2 steps: checks the script")
    args = parser.parse_args(argv)
    for flag in ("candidates", "profile"):
        unknown = [n for n in split_names(getattr(args, flag)) if n not in CANDIDATES]
        if unknown:
            parser.error(f"--{flag}: unknown candidate(s) {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}")
    if args.smoke:
        args.preset, args.size, args.batch_size, args.dataset_size = "tiny", 16, 4, 16
        args.steps, args.chunks, args.warmup, args.profile_steps = 2, 1, 1, 1
    unlimited = float("inf") if args.smoke else None
    args.time_budget_s = args.time_budget_s if args.time_budget_s is not None else unlimited or 420.0
    args.deadline_s = args.deadline_s if args.deadline_s is not None else unlimited or 530.0
    return args


class Deadline(Exception):
    """Raised by SIGALRM in the main thread when --deadline_s is reached."""


# Until a candidate of the same kind has been timed, the seconds one is assumed to take (warm-up + timed steps):
# a cold torch.compile of this UNet (forward and backward) takes about 1-3 minutes.
FIRST_ESTIMATE_S = {"compile": 180.0, "eager": 45.0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = parse_args(argv)
    if not os.environ.get("OUT"):
        print("gpu_bench: $OUT is not set; the JSON is only printed at the end", file=sys.stderr)
    device = torch.device(args.device)
    gpu_name, peaks = peak_tflops(device)
    flops = model_flops(args.preset, args.batch_size, args.channels, args.size)
    settings = {k: None if v == float("inf") else v for k, v in vars(args).items()}  # strict JSON: no Infinity
    result: dict[str, Any] = {
        "benchmark": "gpu_bench", "machine": machine_info(device), "settings": settings,
        "c_compiler": os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"),  # Triton needs one
        "sdpa_fused_kernels": sdpa_fused_kernels(device),
        "peak_tflops_dense": {"gpu": gpu_name, **(peaks or {})},
        "gflop_per_step": round(flops / 1e9, 2), "candidates": {}, "profiles": {}, "errors": {},
        "skipped": [],
    }
    emit(result, "gpu_bench.json", quiet=True)

    def on_deadline(signum, frame):
        def give_up(signum, frame):  # the Deadline was swallowed somewhere: write what there is and leave
            emit(result, "gpu_bench.json")
            sys.stdout.flush()
            os._exit(3)

        signal.signal(signal.SIGALRM, give_up)
        signal.alarm(30)
        raise Deadline(f"--deadline_s {args.deadline_s:g} reached")

    finite = args.deadline_s != float("inf")
    if finite:
        signal.signal(signal.SIGALRM, on_deadline)
        signal.alarm(max(1, int(args.deadline_s - (time.perf_counter() - started))))
    estimate = dict(FIRST_ESTIMATE_S)
    # The timed candidates, then the profiles: a profile is not held to --time_budget_s, only to the deadline.
    jobs = [("time", n) for n in split_names(args.candidates)] + [("profile", n) for n in split_names(args.profile)]
    try:
        for job, name in jobs:
            label = name if job == "time" else f"profile:{name}"  # its key in "skipped" and "errors"
            elapsed = time.perf_counter() - started
            kind = "compile" if CANDIDATES[name].compile else "eager"
            over_budget = job == "time" and elapsed > args.time_budget_s
            if over_budget or elapsed + estimate[kind] > args.deadline_s:
                result["skipped"].append(label)
                continue
            try:
                if job == "time":
                    res = run_candidate(CANDIDATES[name], args, device)
                    add_mfu(res, flops, peaks)
                    res["total_s"] = round(time.perf_counter() - started - elapsed, 1)
                    estimate[kind] = res["total_s"]
                    result["candidates"][name] = res
                    print(f"gpu_bench: {name}: {res['images_per_s']} img/s, {res['step_ms']} ms/step, "
                          f"mfu {res.get('mfu')}, {res['total_s']} s", flush=True)
                else:
                    res = profile_candidate(CANDIDATES[name], args, device)
                    res["total_s"] = round(time.perf_counter() - started - elapsed, 1)
                    result["profiles"][name] = res
                    print(f"gpu_bench: profile {name}: {res['device_ms_per_step']} device ms/step, "
                          f"{res['share_by_family']}, {res['total_s']} s", flush=True)
            except Exception as err:  # record it (Deadline included); the other candidates still run
                result["errors"][label] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            summarize_speedups(result)
            emit(result, "gpu_bench.json", quiet=True)  # partial results survive a run cut short
    except Deadline as err:  # it struck between candidates
        result["errors"]["deadline"] = str(err)
    if finite:
        signal.alarm(0)
    result["total_s"] = round(time.perf_counter() - started, 1)
    emit(result, "gpu_bench.json")
    return result


def summarize_speedups(result: dict[str, Any]) -> None:
    cands = result["candidates"]
    base = cands.get("fp32_eager", {}).get("images_per_s")
    result["speedup_vs_fp32_eager"] = {name: ratio(c["images_per_s"], base) for name, c in cands.items()}
    speedup = result["speedup_vs_fp32_eager"].get("bf16_compile")
    result["target_bf16_compile_2x"] = None if speedup is None else speedup >= 2.0


if __name__ == "__main__":
    run_cli(main)  # a bad flag: one line, exit status 2
