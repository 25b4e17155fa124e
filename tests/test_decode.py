"""Latents -> images: the pipeline's vae (decoding to PIL and numpy images, saving and loading it), encode -> train.py
-> sample.py --decode, the decoded grid's overwrite check, previews with a vae, and upload folders with a vae loaded
by diffusers alone and by the package. Images -> latents are in test_encode.py.

A tiny random AutoencoderKL (factor 2, 4 latent channels) and 16x16 images: 4x8x8 latents (tests/_helpers.py,
fixtures in conftest.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _helpers import RES, ROOT
from _helpers import run_main as run
from diffusers import AutoencoderKL
from diffusers.models import modeling_utils
from PIL import Image

from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline, default_scheduler
from latent_ddpm.feeding import LatentStats
from latent_ddpm.hub import prepare_upload_folder
from latent_ddpm.images import save_image_grid
from latent_ddpm.reporting import build_pipeline, preview_grid


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipe_with_vae(vae_dir) -> LatentDDPMPipeline:
    torch.manual_seed(0)
    unet = AdvancedUNet2DModel.from_preset("tiny", in_channels=4, sample_size=RES // 2)
    pipe = LatentDDPMPipeline(unet=unet.eval(), scheduler=default_scheduler(num_train_timesteps=10),
                              latents_mean=0.5, latents_std=2.0, vae=AutoencoderKL.from_pretrained(vae_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_decodes_to_pil_and_np_images(pipe_with_vae):
    pipe, gen = pipe_with_vae, lambda: torch.Generator().manual_seed(0)
    latents = pipe(batch_size=2, num_inference_steps=2, generator=gen()).latents
    out = pipe(batch_size=2, num_inference_steps=2, generator=gen(), output_type="np_image")
    np.testing.assert_array_equal(out.latents, latents)  # the vae changes nothing upstream
    assert out.images.shape == (2, RES, RES, 3) and out.images.dtype == np.float32
    assert 0 <= out.images.min() and out.images.max() <= 1
    with torch.no_grad():
        direct = pipe.vae.decode(torch.from_numpy(latents)).sample  # raw latents straight into decode
    np.testing.assert_allclose(out.images, (direct / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = pipe(batch_size=2, num_inference_steps=2, generator=gen(), output_type="pil", return_dict=False)[0]
    assert [(im.mode, im.size) for im in pil] == [("RGB", (RES, RES))] * 2
    np.testing.assert_array_equal(np.asarray(pil[0]), (out.images[0] * 255).round().astype(np.uint8))
    bare = LatentDDPMPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    with pytest.raises(ValueError, match="has none"):
        bare(num_inference_steps=1, output_type="pil")


def test_pipeline_with_vae_saves_and_loads(pipe_with_vae, tmp_path):
    pipe_with_vae.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    assert (tmp_path / "p" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = LatentDDPMPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    kw = dict(batch_size=1, num_inference_steps=2, output_type="np_image")
    a = pipe_with_vae(generator=torch.Generator().manual_seed(1), **kw).images
    np.testing.assert_array_equal(loaded(generator=torch.Generator().manual_seed(1), **kw).images, a)
    LatentDDPMPipeline(unet=pipe_with_vae.unet, scheduler=pipe_with_vae.scheduler).save_pretrained(tmp_path / "q")
    assert LatentDDPMPipeline.from_pretrained(tmp_path / "q").vae is None


def test_encode_train_sample_decode_round_trip(encoded, vae_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, str(ROOT))
    train, sample = _script("train"), _script("sample")
    logged: list[str] = []
    monkeypatch.setattr(modeling_utils.logger, "warning", lambda msg, *a, **k: logged.append(str(msg)))
    fast = ["--preset", "tiny", "--train_batch_size", "4", "--num_eval_samples", "0", "--num_preview_samples", "2",
            "--preview_inference_steps", "2", "--save_images_epochs", "0", "--num_train_timesteps", "10"]
    assert run(train.main, ["--train_data", encoded, "--max_train_steps", 3, "--output_dir", "run", *fast]) == 0
    # train.py stores the data's autoencoder in the pipeline, so sample.py --decode needs nothing more.
    assert type(LatentDDPMPipeline.from_pretrained(tmp_path / "run" / "pipeline").vae).__name__ == "AutoencoderKL"
    out = tmp_path / "gen" / "s.npz"
    assert run(sample.main, ["--model", "run/pipeline", "--num_samples", 3, "--num_inference_steps", 2,
                             "--batch_size", 2, "--output", out, "--decode"]) == 0
    assert not [m for m in logged if "kept in float32" in m]  # diffusers' warning on .to(dtype=): a stray line
    with np.load(out, allow_pickle=False) as f:
        assert f["samples"].shape == (3, 4, RES // 2, RES // 2)
    pngs = sorted((tmp_path / "gen" / "s_images").glob("*.png"))
    assert [p.name for p in pngs] == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(pngs[0]).size == (RES, RES) and (tmp_path / "gen" / "s_images.png").is_file()
    # An explicit --vae gives the same images; a model without any known vae is a one-line error.
    assert run(sample.main, ["--model", "run/pipeline", "--num_samples", 3, "--num_inference_steps", 2,
                             "--output", tmp_path / "gen2" / "s.npz", "--vae", vae_dir, "--no_grid"]) == 0
    assert np.array_equal(np.asarray(Image.open(pngs[2])),
                          np.asarray(Image.open(tmp_path / "gen2" / "s_images" / "000002.png")))
    # Without the vae in the pipeline, sample.py finds it through the run's config -> the data's encoding.json.
    trained = LatentDDPMPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    LatentDDPMPipeline(unet=trained.unet, scheduler=trained.scheduler, latents_mean=trained.config.latents_mean,
                       latents_std=trained.config.latents_std).save_pretrained(tmp_path / "run" / "pipeline")
    assert run(sample.main, ["--model", "run/pipeline", "--num_samples", 1, "--num_inference_steps", 2,
                             "--output", tmp_path / "gen4" / "s.npz", "--decode"]) == 0
    # A failed --decode --overwrite keeps the previous images: they were deleted before sampling started.
    before = {p.name: p.read_bytes() for p in (tmp_path / "gen" / "s_images").iterdir()}
    saved = Image.Image.save

    def full_disk_at_the_second_image(self, fp, *args, **kwargs):
        if str(fp).endswith("000001.png"):
            raise OSError(28, "No space left on device", str(fp))
        return saved(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk_at_the_second_image)
    assert run(sample.main, ["--model", "run/pipeline", "--num_samples", 3, "--num_inference_steps", 2,
                             "--batch_size", 2, "--output", out, "--decode", "--overwrite", "--seed", 5]) == 2
    monkeypatch.setattr(Image.Image, "save", saved)
    assert {p.name: p.read_bytes() for p in (tmp_path / "gen" / "s_images").iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["s.npz", "s.png", "s_images", "s_images.png"]
    (tmp_path / "run" / "train" / "config.json").unlink()
    assert run(sample.main, ["--model", "run/pipeline", "--output", tmp_path / "gen3" / "s.npz", "--decode"]) == 2


def test_decode_checks_the_image_grid_it_writes(pipe_with_vae, tmp_path):
    # With a dot in --output's stem (run.v1.npz), the check looked at run.png (not written) and the decoded grid
    # run.v1_images.png was replaced without --overwrite.
    sys.path.insert(0, str(ROOT))
    sample = _script("sample")
    pipe_with_vae.save_pretrained(tmp_path / "pipe")
    grid, unrelated = tmp_path / "out" / "run.v1_images.png", tmp_path / "out" / "run.png"
    grid.parent.mkdir()
    grid.write_bytes(b"mine")
    unrelated.write_bytes(b"not sample.py's")
    argv = ["--model", tmp_path / "pipe", "--num_samples", 2, "--num_inference_steps", 2, "--output",
            tmp_path / "out" / "run.v1.npz", "--decode"]
    assert run(sample.main, argv) == 2
    assert grid.read_bytes() == b"mine" and not (tmp_path / "out" / "run.v1.npz").exists()
    grid.unlink()
    assert run(sample.main, argv) == 0  # run.png is not in its way
    assert grid.read_bytes()[:4] == b"\x89PNG" and unrelated.read_bytes() == b"not sample.py's"


def test_previews_decode_with_a_vae(pipe_with_vae, tmp_path):
    stats = LatentStats("channel", [0.0] * 4, [1.0] * 4)
    cfg = SimpleNamespace(num_preview_samples=3, preview_inference_steps=2, seed=0)
    pipe = build_pipeline(pipe_with_vae.unet, None, pipe_with_vae.scheduler, stats, vae=pipe_with_vae.vae)
    preview_grid(pipe, cfg, tmp_path / "step_1.png")
    assert (tmp_path / "step_1.png").is_file()
    grid = Image.open(tmp_path / "step_1_images.png")
    assert grid.size == (2 * (RES + 2) + 2,) * 2  # 3 images on a 2x2 grid with 2-pixel gaps
    save_image_grid(tmp_path / "g.png", [Image.new("L", (4, 4))])


DIFFUSERS_ONLY = """
import sys
import numpy as np
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
assert "latent_ddpm" not in sys.modules and type(pipe.vae).__name__ == "AutoencoderKL"
out = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np_image")
np.save(sys.argv[2], out.images)
"""


def test_uploaded_pipeline_with_vae_loads_with_diffusers_only(pipe_with_vae, tmp_path):
    pipe_with_vae.save_pretrained(tmp_path / "pipeline")
    upload = prepare_upload_folder(tmp_path / "pipeline", tmp_path / "upload", repo_id="user/repo")
    assert (upload / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    (tmp_path / "user.py").write_text(DIFFUSERS_ONLY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "user.py"), str(upload), str(tmp_path / "x.npy")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = pipe_with_vae(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(1),
                             output_type="np_image").images
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), expected, atol=1e-5)


def test_uploaded_pipeline_with_vae_loads_with_the_package(pipe_with_vae, tmp_path):
    pipe_with_vae.save_pretrained(tmp_path / "pipeline")
    upload = prepare_upload_folder(tmp_path / "pipeline", tmp_path / "upload", repo_id="user/repo")
    loaded = LatentDDPMPipeline.from_pretrained(upload)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.vae).__name__ == "AutoencoderKL"
    kw = dict(batch_size=1, num_inference_steps=2, output_type="np_image")
    got = loaded(generator=torch.Generator().manual_seed(1), **kw).images
    expected = pipe_with_vae(generator=torch.Generator().manual_seed(1), **kw).images
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_data_folders_unloadable_autoencoder_is_named_once(tmp_path, caplog):
    # `--train_data latents/` (a trailing slash) named latents//encoding.json in the warning.
    from latent_ddpm.autoencoder import load_data_vae

    gone = tmp_path / "moved_vae"
    with caplog.at_level("WARNING", logger="latent_ddpm.autoencoder"):
        assert load_data_vae({"vae": {"id": str(gone)}}, f"{tmp_path}/latents/") is None
    assert (f"{tmp_path}/latents/encoding.json names the autoencoder {gone}, which cannot be loaded (that folder no "
            "longer exists); training without it") in caplog.text
