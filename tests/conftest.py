"""Shared pytest fixtures: tiny models (CPU, fast), the original UNet reference, the training tests' data, the
sample tests' saved pipelines and the encode and decode tests' autoencoder, images and latents."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from latent_ddpm import AdvancedUNet2DModel

ROOT = Path(__file__).resolve().parents[1]

# Tests use tiny models: extra threads only add overhead (10-50x on a busy, shared machine).
torch.set_num_threads(1)

#: A tiny, fast UNet config: 2 levels (one downsampling), attention everywhere, 8x8 latents.
TINY_UNET = dict(in_channels=2, down_channels=(8, 16, 16), mid_channels=(16, 16), time_emb_dim=16,
                 down_sample=(True, False), num_heads=2, norm_num_groups=4, head_channels=8, sample_size=8)


@pytest.fixture
def make_unet():
    """Build a tiny `AdvancedUNet2DModel` (seeded, eval mode) with any config value overridden."""

    def make(seed: int = 0, **overrides) -> AdvancedUNet2DModel:
        torch.manual_seed(seed)
        return AdvancedUNet2DModel(**{**TINY_UNET, **overrides}).eval()

    return make


@pytest.fixture
def make_pipe(make_unet):
    """Build a tiny `LatentDDPMPipeline` (conftest's tiny UNet, `PIPE_TIMESTEPS` training timesteps, no progress
    bar) with the given normalisation and UNet config overrides."""
    from _helpers import PIPE_TIMESTEPS

    from latent_ddpm import LatentDDPMPipeline, default_scheduler

    def make(seed: int = 0, latents_mean=None, latents_std=None, **unet_overrides) -> LatentDDPMPipeline:
        pipe = LatentDDPMPipeline(unet=make_unet(seed=seed, **unet_overrides),
                                  scheduler=default_scheduler(num_train_timesteps=PIPE_TIMESTEPS),
                                  latents_mean=latents_mean, latents_std=latents_std)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


@pytest.fixture(scope="session")
def original_unet():
    """The `benchmarks/original_unet.py` module (a reference, not part of the package)."""
    spec = importlib.util.spec_from_file_location("original_unet", ROOT / "benchmarks" / "original_unet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """64 demo latents of (4, 8, 8) with labels, as the original's `.npz` (`X`, `y`): the training tests' data."""
    from latent_ddpm.demo import make_demo_latents

    x, y = make_demo_latents(num_samples=64, seed=0, size=8)
    path = tmp_path_factory.mktemp("data") / "demo8.npz"
    np.savez(path, X=x, y=y)
    return path


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> Path:
    """An unconditional pipeline in uncond/ and a 3-class one in cond/ (tiny UNets, 4x8x8 latents): the sample
    hardening tests' models (`models` below are laid out as the original's run folders)."""
    from _helpers import save_tiny_pipelines

    root = tmp_path_factory.mktemp("pipes")
    save_tiny_pipelines([(root / "uncond", None), (root / "cond", 3)])
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An unconditional pipeline in runs/<RUN>/pipeline and a 3-class one in cond/pipeline: the sample tests'
    models (tests/test_sample.py, test_sample_schedulers.py)."""
    from _helpers import ORIGINAL_RUN as RUN
    from _helpers import save_tiny_pipelines

    root = tmp_path_factory.mktemp("models")
    save_tiny_pipelines([(root / "runs" / RUN / "pipeline", None), (root / "cond" / "pipeline", 3)])
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """A tiny random AutoencoderKL (factor 2, 4 latent channels), saved: the encode and decode tests' autoencoder."""
    from _helpers import TINY_VAE
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    AutoencoderKL(**TINY_VAE).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """imagefolder layout: 3 cats and 3 dogs, one of them not square."""
    from _helpers import RES, image

    root = tmp_path_factory.mktemp("images") / "pets"
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            image(10 * c + i, size=(24, RES) if i == 2 else (RES, RES)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def encoded(images, vae_dir, tmp_path_factory) -> Path:
    """`images` encoded by `vae_dir` with --flip_augment (12 latents of 4x8x8, labels cat 0 and dog 1)."""
    from _helpers import encode_args
    from _helpers import run_main as run

    from latent_ddpm import encode

    tmp = tmp_path_factory.mktemp("encoded")
    assert run(encode.main, encode_args(images, vae_dir, tmp / "latents", tmp, "--flip_augment")) == 0
    return tmp / "latents"
