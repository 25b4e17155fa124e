"""Shared helpers for the benchmark scripts: machine info, timing, peak memory, FLOPs, JSON output.

Benchmarks here are scripts that print JSON, never timed tests. On a shared, busy machine single
timings are noise: run candidates side by side, interleaved (`interleave`), report medians (`summarize`)
and ratios, and measure each candidate's peak memory in its own process (`Worker`, `PeakMemory`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- machine info
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else `platform.processor()`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Where a benchmark ran: CPU, cores, load, torch build and threads, and the accelerator if any."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "memory_gib": _total_memory_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "device": str(device),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def _total_memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------- timing
def synchronize(device: str | torch.device) -> None:
    """Wait for queued device work (CUDA is asynchronous); a no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], n: int, device: str | torch.device = "cpu") -> list[float]:
    """Wall-clock seconds of `n` calls of `fn`, each synchronized with the device."""
    times = []
    for _ in range(n):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def interleave(candidates: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, list[float]]:
    """Run each candidate's timing function once per round, round-robin, and pool its timings.

    Interleaving spreads the machine's load changes over all candidates instead of biasing one.
    """
    pooled: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            pooled[name].extend(run())
    return pooled


def summarize(times: Iterable[float]) -> dict[str, float]:
    """Median, min, max and count of a list of timings (seconds)."""
    times = sorted(times)
    if not times:
        return {"n": 0}
    return {"median_s": round(statistics.median(times), 4), "min_s": round(times[0], 4),
            "max_s": round(times[-1], 4), "n": len(times)}


def ratio(numerator: float | None, denominator: float | None, digits: int = 2) -> float | None:
    """numerator / denominator, rounded; None when either is missing or the denominator is 0."""
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, digits)


# ----------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory above a baseline, for the process (CPU) or the CUDA caching allocator.

    CPU: the process's resident set high-water mark (VmHWM), reset through /proc/self/clear_refs
    so that import-time peaks do not count; where that is unavailable, `ru_maxrss`. Measure in a
    fresh process per candidate: freed memory is not always returned to the OS.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.baseline = 0

    def start(self) -> None:
        """Set the baseline to the current usage and reset the high-water mark."""
        if self.device.type == "cuda":
            synchronize(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline = current_rss()
        self.reset_peak()

    def reset_peak(self) -> None:
        """Forget the peak so far (e.g. after warm-up), keeping the baseline."""
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_delta(self) -> int:
        """Bytes of peak usage above the baseline since `start`."""
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        return max(0, peak_rss() - self.baseline)


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident set size of this process in bytes (0 where unknown)."""
    kib = _proc_status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


def peak_rss() -> int:
    """Resident set high-water mark of this process in bytes."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def mib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / 2**20, 1)


# ----------------------------------------------------------------------------- FLOPs
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls/convolutions/attention run by `fn` (torch.utils.flop_counter).

    Run it on the "meta" device to count without computing: the count is the model's, and does
    not include padding a kernel may add on one device.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- worker processes
class Worker:
    """A benchmark candidate living in its own Python process, driven by JSON lines.

    The child runs `python <script> --worker '<json spec>'`; the script's worker loop reads one
    JSON command per stdin line and answers one JSON line on stdout (see `serve`). Each candidate
    gets a fresh process, so its peak memory is its own, while the parent interleaves them.
    """

    def __init__(self, script: str | Path, spec: dict[str, Any], env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        self.ready = self._read()

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                reply = json.loads(line)
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                return reply
        raise RuntimeError(f"worker exited with code {self.proc.wait()} before answering")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def serve(handlers: dict[str, Callable[..., dict[str, Any]]], ready: dict[str, Any]) -> None:
    """The worker side of `Worker`: answer `{"cmd": name, **kwargs}` lines until stdin closes."""
    reply(ready)
    for line in sys.stdin:
        command = json.loads(line)
        try:
            reply(handlers[command.pop("cmd")](**command))
        except Exception as err:  # report, keep serving: the parent decides what to do
            reply({"error": f"{type(err).__name__}: {err}"})


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- demo quality
#: Seed of the "real at the same N" demo draw in the quality benchmarks (the training set is seed 0).
FRESH_DEMO_SEED = 7


def quality_figures(evaluator, baseline_fd: float, x) -> dict[str, Any]:
    """`latent_ddpm.evaluate.Evaluator` figures (FD, fd_ratio to the real-vs-real FD, precision, recall) and the
    demo judge's, rounded, for samples `x` of the demo set."""
    from latent_ddpm.demo import demo_quality

    ev, judge = evaluator(x), demo_quality(x)
    return {"fd": round(ev["fd"], 4), "fd_ratio": round(ev["fd"] / baseline_fd, 3),
            "precision": round(ev["precision"], 4), "recall": round(ev["recall"], 4),
            "demo_quality_score": round(judge["score"], 4), "valid_fraction": round(judge["valid_fraction"], 4),
            "coverage": judge["coverage"], "nonfinite": ev["num_nonfinite_samples"]}


def fd_infinity(evaluator, x, min_size: int = 256) -> dict[str, Any]:
    """FD against the sample count and its extrapolation to infinitely many samples (Chong & Forsyth 2020,
    "FID_inf"): the mean FD of disjoint subsets of `min_size`, twice that, ... up to all of `x`, fitted
    linearly in 1/N. FD carries a positive bias of order 1/N, so ratios of FDs at one N shrink towards 1 as
    N falls; the intercept removes that bias."""
    import numpy as np

    sizes = [n for n in (min_size * 2**i for i in range(32)) if n <= len(x)]
    means = [float(np.mean([evaluator(x[i:i + n])["fd"] for i in range(0, len(x) - n + 1, n)])) for n in sizes]
    by_n = {n: round(m, 3) for n, m in zip(sizes, means, strict=True)}
    if len(sizes) < 2:
        return {"fd_by_n": by_n, "fd_inf": None}
    _slope, intercept = np.polyfit([1 / n for n in sizes], means, 1)
    return {"fd_by_n": by_n, "fd_inf": round(float(intercept), 3)}


# ----------------------------------------------------------------------------- caches
def short_hash(obj: Any) -> str:
    """8 hex digits naming a cache entry: sha1 of `obj` as JSON with sorted keys (non-JSON values by `str`)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def recipe_key(train_argv: list[str], *extra: Any) -> str:
    """The `short_hash` naming a cached trained model: of the resolved training config that `train_argv` gives
    (`parse_train_args(train_argv)`, so defaults resolved per preset, such as the learning rate, count as their
    value), the UNet preset definitions (`PRESETS`) and `extra` (thread count, ...). A change to any of them
    gives a new key, so a stale model is never reused; a change to a default that leaves this recipe as it was
    keeps the key. Where the run is written (`output_dir`, `overwrite_output_dir`) is not part of it."""
    from latent_ddpm.flags import parse_train_args
    from latent_ddpm.unet import PRESETS

    config = parse_train_args(list(train_argv)).to_dict()
    for name in ("output_dir", "overwrite_output_dir"):
        config.pop(name)
    return short_hash([config, PRESETS, *extra])


# ----------------------------------------------------------------------------- output
def emit(result: dict[str, Any], out_name: str | None = None, quiet: bool = False,
         path: str | os.PathLike | None = None) -> None:
    """Print `result` as JSON (unless `quiet`); also write it to `path` if given, and to $OUT/<out_name> when
    $OUT is set."""
    text = json.dumps(result, indent=2)
    if not quiet:
        print(text)
    if path:
        Path(path).write_text(text + "\n")
    if out_name and os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / out_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
