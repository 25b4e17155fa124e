"""Pieces several test files share: the client of `tests/_forkserver.py`, tiny saved pipelines for sample.py,
in-process runs of the commands (train.py, sample.py, the package's `__main__`s) and their one-line errors,
small latents and snapshots of files on disk, and the encode and decode tests' images and flags."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from PIL import Image

from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline, default_scheduler, paths
from latent_ddpm.errors import run_cli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class ForkServerClient:
    """Starts `tests/_forkserver.py` (train.py imported once, a forked process per run) and talks its protocol:
    one JSON request per line in, one JSON answer per line out."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_forkserver.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert "ready" in self._ask(None)

    def _ask(self, request: dict | None) -> dict:
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def save_tiny_pipelines(folders: list[tuple[Path, int | None]]) -> None:
    """A tiny pipeline (4x8x8 latents, per-channel latents_mean, latents_std 2) saved in each folder, with that
    many classes (None: unconditional); seeded, so the same folders get the same weights."""
    torch.manual_seed(0)
    for where, classes in folders:
        unet = AdvancedUNet2DModel.from_preset("tiny", in_channels=4, sample_size=8, num_class_embeds=classes)
        pipe = LatentDDPMPipeline(unet=unet, scheduler=default_scheduler(), latents_mean=[0.0, 1.0, 2.0, 3.0],
                                  latents_std=2.0)
        pipe.save_pretrained(where)


def exit_status(main, argv: list) -> int:
    """A command's `main` through `run_cli`, as its `__main__` runs it (arguments made strings): the exit status."""
    try:
        return run_cli(main, [str(a) for a in argv])
    except SystemExit as err:
        return err.code


# --- the data and run hardening tests: commands in this process, tiny latents, files on disk --------------------

#: The shape of `latents()`: N samples of C x H x W.
N, C, H, W = 8, 4, 8, 8
#: Training timesteps of the pipeline tests' tiny pipelines (conftest's `make_pipe`): small, so a full DDPM run is fast.
PIPE_TIMESTEPS = 20


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`, for pipeline calls."""
    return torch.Generator().manual_seed(seed)


def latents(n: int = N, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, C, H, W)).astype(dtype)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (folders too) -> a hash of its content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def read_back(ds: datasets.Dataset) -> tuple[np.ndarray, np.ndarray | None]:
    view = ds.with_format("numpy")[:]
    return view["latents"], view.get("labels")


def reset_accelerate() -> None:
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


def cli(main, argv: list, capfd) -> tuple[int, str, str]:
    """A command's main through run_cli (what its `__main__` does), in this process: (exit status, out, err)."""
    reset_accelerate()
    try:
        code = exit_status(main, argv)
    finally:
        reset_accelerate()
    out, err = capfd.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *fragments: str) -> str:
    """Assert exit status 2 and exactly one `error: ...` line on stderr holding every fragment; return the line."""
    lines = err.strip().splitlines()
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- tests/test_train*.py: train.py in this process or as a subprocess --------------------------------------------

#: Small and fast: the tiny preset, 8x8 latents, no preview sampling unless a test asks.
TRAIN_FAST = ["--preset", "tiny", "--train_batch_size", "8", "--num_eval_samples", "0", "--num_preview_samples", "2",
              "--preview_inference_steps", "2", "--logging_steps", "1", "--save_images_epochs", "0"]


def run_train(argv: list[str]) -> int:
    """train.main in this process, with accelerate's process-wide state reset around it. train.py is the module
    `train` (the repository root on sys.path, as the test files import it), so a test's patches of it apply."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import train

    reset_accelerate()
    try:
        return train.main(argv)
    finally:
        reset_accelerate()


def train_subprocess(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python train.py args` as a subprocess from the repository root (env: variables added): its output captured."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})


# --- the sample.py and evaluate hardening tests -------------------------------------------------------------------

#: sample.py, loaded from its file; the sample tests (test_sample*.py) patch and run it.
_spec = importlib.util.spec_from_file_location("sample_hardening_script", ROOT / "sample.py")
sample_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_script)

#: Two samples in two denoising steps.
SAMPLE_FAST = ["--num_inference_steps", "2", "--num_samples", "2"]
#: Two denoising steps, no grid PNG: tests/test_sample.py's and test_sample_schedulers.py's FAST.
SAMPLE_FAST_NO_GRID = ["--num_inference_steps", "2", "--no_grid"]
#: The original's run folder name for x.npz, 4 channels, 1000 steps (conftest.py's `models` holds one).
ORIGINAL_RUN = "x_ddpm_4_1000_0.0001_0.02"


def run_sample(argv) -> int:
    """sample.py's main through run_cli, as its __main__ runs it: the exit status."""
    return exit_status(sample_script.main, argv)


def one_error_line(capsys) -> str:
    """The single `error:` line on stderr (asserting that there is exactly one)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0], lines
    return lines[0]


def no_outputs(folder: Path, output: Path) -> None:
    """Neither the output, its grid, its gathering file nor its lock exists."""
    partial = paths.partial_path(output)
    for path in (output, output.with_suffix(".png"), partial, partial.with_suffix(".lock")):
        assert not os.path.lexists(path), path


def load_npz(path) -> dict:
    """Every array of a .npz file (read without pickle)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# --- tests/test_encode.py and tests/test_decode.py: a tiny random AutoencoderKL (factor 2, 4 latent channels) and
# 16x16 images, so 4x8x8 latents (the fixtures vae_dir, images and encoded are in conftest.py) ----------------------

RES = 16  # image resolution; latents are 4 x RES/2 x RES/2
TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32)


def run_main(main, argv) -> int:
    """A command's main through run_cli (exit status, one-line errors), accelerate state reset around it."""
    reset_accelerate()
    try:
        return exit_status(main, argv)
    finally:
        reset_accelerate()


def image(seed: int, size=(RES, RES), mode="RGB") -> Image.Image:
    """A smooth random image (a gradient plus noise) of `size` (w, h)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1, 3) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB").convert(mode)


def encode_args(data, vae, out, tmp, *extra):
    return ["--data", data, "--vae", vae, "--resolution", RES, "--output", out, "--cache_dir", tmp / "hf",
            "--batch_size", 2, "--shard_size", 4, *extra]
