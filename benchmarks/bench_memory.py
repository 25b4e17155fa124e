"""Peak memory of sampling to disk and of training from an on-disk Arrow dataset, at two sizes; JSON on stdout.

    python benchmarks/bench_memory.py                                   # defaults: see --help
    python benchmarks/bench_memory.py --sample_sizes 20000 100000       # the full-size check (hours on 2 CPUs)

Each measurement runs in a fresh process (`--worker`), which reports its resident-set high-water mark
(VmHWM, includes pages of memory-mapped files, which the kernel can drop) and the peak of anonymous
memory (RssAnon, sampled every 20 ms: the memory the process really holds). Flat means the peak does not
grow with the size. Sampling uses a deliberately small UNet and 1 inference step: the model's cost is not
what is measured, the output path is (samples stream through a row writer into a .npz on disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from latent_ddpm.errors import ArgumentParser, run_cli  # noqa: E402

SMALL_UNET = dict(down_channels=(8, 8, 8), mid_channels=(8, 8), time_emb_dim=8, down_sample=(True, True),
                  num_heads=1, norm_num_groups=4, head_channels=8, attention_levels=(), num_down_layers=1,
                  num_mid_layers=1, num_up_layers=1)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class AnonPeak(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _status_kib("RssAnon"))
            time.sleep(0.02)


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec.get("threads", 1))
    watch = AnonPeak()
    watch.start()
    start = time.perf_counter()
    if spec["kind"] == "sample":
        import sample

        code = run_cli(sample.main, ["--model", spec["model"], "--num_samples", str(spec["n"]), "--batch_size", "256",
                                     "--num_inference_steps", "1", "--output", spec["output"], "--no_grid",
                                     "--scheduler", "ddim"])
    else:
        import train

        code = run_cli(train.main, ["--latent", spec["data"], "--output_dir", spec["output"], "--preset", "tiny",
                                    "--max_train_steps", "20", "--train_batch_size", "64", "--no_data_in_memory",
                                    "--num_eval_samples", "0", "--save_images_epochs", "0", "--checkpointing_steps",
                                    "20", "--num_preview_samples", "1", "--preview_inference_steps", "1"])
    watch.stop.set()
    watch.join()
    watch.peak = max(watch.peak, _status_kib("RssAnon"))
    return {"exit": code, "seconds": round(time.perf_counter() - start, 1), "peak_rss_mib": round(
        _status_kib("VmHWM") / 1024, 1), "peak_anon_mib": round(watch.peak / 1024, 1)}


def measure(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 1))})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sample_sizes", type=int, nargs=2, default=[1000, 10000], help="samples of (4, 64, 64)")
    p.add_argument("--train_sizes", type=int, nargs=2, default=[5000, 50000], help="Arrow dataset rows")
    p.add_argument("--train_shape", type=int, nargs=3, default=[4, 32, 32], help="latent shape of the dataset")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="scratch folder (deleted afterwards)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import numpy as np
    import torch
    from _common import machine_info

    from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline, default_scheduler
    from latent_ddpm.data import convert

    scratch = Path(tempfile.mkdtemp(prefix="bench_memory_", dir=args.dir))
    result = {"machine": machine_info(), "free_disk_gib": round(shutil.disk_usage(scratch).free / 2**30, 1),
              "sampling": [], "training": []}
    try:
        torch.manual_seed(0)
        unet = AdvancedUNet2DModel(in_channels=4, sample_size=64, **SMALL_UNET)
        LatentDDPMPipeline(unet=unet, scheduler=default_scheduler()).save_pretrained(scratch / "pipe")
        for n in args.sample_sizes:
            output = scratch / f"samples_{n}.npz"
            row = measure({"kind": "sample", "model": str(scratch / "pipe"), "n": n, "output": str(output),
                           "threads": args.threads})
            row.update(n=n, shape=[4, 64, 64], output_gib=round(output.stat().st_size / 2**30, 3))
            output.unlink()
            result["sampling"].append(row)
        c, h, w = args.train_shape
        rng = np.random.default_rng(0)
        for n in args.train_sizes:
            npy = scratch / f"latents_{n}.npy"
            arr = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(n, c, h, w))
            for i in range(0, n, 4096):
                arr[i:i + 4096] = rng.standard_normal((min(4096, n - i), c, h, w), dtype=np.float32)
            arr.flush()
            del arr
            convert(npy, scratch / f"arrow_{n}")
            npy.unlink()
            row = measure({"kind": "train", "data": str(scratch / f"arrow_{n}"), "output": str(scratch / f"run_{n}"),
                           "threads": args.threads})
            row.update(n=n, shape=[c, h, w], dataset_gib=round(n * c * h * w * 4 / 2**30, 3))
            shutil.rmtree(scratch / f"arrow_{n}")
            shutil.rmtree(scratch / f"run_{n}")
            result["training"].append(row)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for key in ("sampling", "training"):
        a, b = result[key]
        result[f"{key}_anon_growth_mib"] = round(b["peak_anon_mib"] - a["peak_anon_mib"], 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_cli(main)  # a bad flag: one line, exit status 2
