"""Images -> latents -> images: latent_ddpm.encode, the pipeline's vae, sample.py --decode, previews.

A tiny random AutoencoderKL (factor 2, 4 latent channels) and 16x16 images: 4x8x8 latents.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.models import modeling_utils
from PIL import Image

from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline, autoencoder, default_scheduler, encode
from latent_ddpm.data import load_latents
from latent_ddpm.errors import run_cli
from latent_ddpm.feeding import LatentStats
from latent_ddpm.hub import prepare_upload_folder
from latent_ddpm.images import prepare_image, save_image_grid, to_model_range
from latent_ddpm.reporting import build_pipeline, preview_grid

ROOT = Path(__file__).resolve().parents[1]
RES = 16  # image resolution; latents are 4 x RES/2 x RES/2
TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(main, argv) -> int:
    """A command's main through run_cli (exit status, one-line errors), accelerate state reset around it."""
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    try:
        return run_cli(main, [str(a) for a in argv])
    except SystemExit as err:
        return err.code
    finally:
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()


def image(seed: int, size=(RES, RES), mode="RGB") -> Image.Image:
    """A smooth random image (a gradient plus noise) of `size` (w, h)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1, 3) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB").convert(mode)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    AutoencoderKL(**TINY_VAE).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """imagefolder layout: 3 cats and 3 dogs, one of them not square."""
    root = tmp_path_factory.mktemp("images") / "pets"
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            image(10 * c + i, size=(24, RES) if i == 2 else (RES, RES)).save(root / name / f"{i}.png")
    return root


def encode_args(data, vae, out, tmp, *extra):
    return ["--data", data, "--vae", vae, "--resolution", RES, "--output", out, "--cache_dir", tmp / "hf",
            "--batch_size", 2, "--shard_size", 4, *extra]


@pytest.fixture(scope="module")
def encoded(images, vae_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("encoded")
    assert run(encode.main, encode_args(images, vae_dir, tmp / "latents", tmp, "--flip_augment")) == 0
    return tmp / "latents"


def posterior_mean(vae_dir: Path, pixels: np.ndarray) -> np.ndarray:
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        return vae.encode(torch.from_numpy(to_model_range(pixels))).latent_dist.mean.numpy()


def test_encode_writes_raw_posterior_means_labels_flips_and_the_factors(encoded, images, vae_dir):
    ds = load_latents(encoded)
    assert ds.features["latents"].shape == (4, RES // 2, RES // 2) and len(ds) == 12  # 6 images x (image, flip)
    x, y = np.asarray(ds.with_format("numpy")["latents"]), np.asarray(ds["labels"])
    assert y.tolist() == [0] * 6 + [1] * 6  # class subfolders cat, dog
    pixels = np.stack([prepare_image(str(images / "dog" / "2.png"), RES).pixels] * 2)
    pixels[1] = pixels[1, :, ::-1]  # row 11 is the mirror of dog/2.png (24x16: resized + center-cropped)
    np.testing.assert_allclose(x[10:12], posterior_mean(vae_dir, pixels), rtol=1e-5, atol=1e-5)  # raw, unscaled
    info = autoencoder.read_encoding_info(encoded)
    assert info["vae"]["id"] == str(vae_dir.resolve()) and info["vae"]["class_name"] == "AutoencoderKL"
    assert info["vae"]["scaling_factor"] == 0.18215 and info["vae"]["shift_factor"] is None
    assert info["vae"]["latents_mean"] is None and info["posterior"] == "mean"
    assert info["label_names"] == ["cat", "dog"] and info["latent_shape"] == [4, 8, 8]
    assert info["counts"] == {"images": 6, "latents": 12, "skipped_corrupt": 0, "skipped_too_small": 0,
                              "upscaled": 0, "converted_to_rgb": 0}
    assert info["settings"]["resolution"] == RES and info["settings"]["flip_augment"] is True
    assert autoencoder.read_encoding_info(images) is None and autoencoder.read_encoding_info(None) is None
    assert not encoded.with_name("latents.partial").exists()


def test_sample_posterior_is_seeded_per_image(images, vae_dir, tmp_path):
    outs = []
    for name, shard in (("a", 4), ("b", 2)):  # a different sharding gives the same noise
        out = tmp_path / name
        assert run(encode.main, encode_args(images, vae_dir, out, tmp_path, "--sample_posterior", "--seed", 3,
                                            "--shard_size", shard)) == 0
        outs.append(np.asarray(load_latents(out).with_format("numpy")["latents"]))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
    assert autoencoder.read_encoding_info(tmp_path / "a")["posterior"] == "sample"
    pixels = np.stack([prepare_image(str(images / "cat" / "0.png"), RES).pixels])
    assert not np.allclose(outs[0][0], posterior_mean(vae_dir, pixels)[0], atol=1e-3)


def test_interrupted_encode_resumes_and_equals_an_uninterrupted_one(images, vae_dir, encoded, tmp_path,
                                                                    monkeypatch):
    out, real, calls = tmp_path / "latents", encode.encode_shard, []

    def interrupt_after_first(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # as Ctrl-C or a killed job, after shard 0 is complete
        calls.append(args[4])
        real(*args, **kwargs)

    argv = encode_args(images, vae_dir, out, tmp_path, "--flip_augment")
    monkeypatch.setattr(encode, "encode_shard", interrupt_after_first)
    with pytest.raises(KeyboardInterrupt):
        run(encode.main, argv)
    partial = tmp_path / "latents.partial"
    assert (partial / "shard-00000.arrow.done.json").is_file() and not (partial / "shard-00001.arrow").exists()
    assert not out.exists()
    # Other settings are refused; the same command resumes and encodes only the missing shard.
    monkeypatch.setattr(encode, "encode_shard", real)
    assert run(encode.main, encode_args(images, vae_dir, out, tmp_path)) == 2
    done = []
    monkeypatch.setattr(encode, "encode_shard", lambda *a, **k: (done.append(a[4]), real(*a, **k)))
    assert run(encode.main, argv) == 0
    assert done == [range(4, 6)] and not partial.exists()
    resumed, full = (np.asarray(load_latents(p).with_format("numpy")["latents"]) for p in (out, encoded))
    np.testing.assert_array_equal(resumed, full)
    assert load_latents(out)["labels"] == load_latents(encoded)["labels"]
    assert run(encode.main, argv) == 2  # the output exists: refused without --overwrite


def test_bad_images_are_skipped_converted_or_upscaled_with_messages(vae_dir, tmp_path, capsys):
    data = tmp_path / "mixed"
    data.mkdir()
    image(0).save(data / "a_rgb.png")
    (data / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    image(1, mode="L").save(data / "c_gray.png")
    image(2, mode="RGBA").save(data / "d_rgba.png")
    image(3, mode="P").save(data / "e_palette.png")
    image(4, size=(8, 6)).save(data / "f_small.png")
    image(5, size=(40, 20)).save(data / "g_wide.jpg")
    assert run(encode.main, encode_args(data, vae_dir, tmp_path / "out", tmp_path)) == 0
    err = capsys.readouterr().err
    assert "b_corrupt.png (image 1): skipped, not a readable image" in err and "Traceback" not in err
    assert "grayscale (L) image converted to RGB" in err and "RGBA (RGBA) image converted to RGB" in err
    assert "f_small.png (image 5): 8x6 is smaller than --resolution 16: upscaled" in err
    info = autoencoder.read_encoding_info(tmp_path / "out")
    assert info["counts"] == {"images": 7, "latents": 6, "skipped_corrupt": 1, "skipped_too_small": 0,
                              "upscaled": 1, "converted_to_rgb": 3}
    assert info["skipped"][0]["image"].endswith("b_corrupt.png (image 1)") and info["label_names"] is None
    assert "labels" not in load_latents(tmp_path / "out").column_names  # one folder: no classes
    # --min_size skips small images instead of upscaling them.
    assert run(encode.main, encode_args(data, vae_dir, tmp_path / "out2", tmp_path, "--min_size", 10)) == 0
    assert "f_small.png (image 5): skipped, 8x6 is below --min_size 10" in capsys.readouterr().err
    assert autoencoder.read_encoding_info(tmp_path / "out2")["counts"]["skipped_too_small"] == 1


def test_one_line_errors(vae_dir, images, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"junk")
    cases = [
        (encode_args(bad, vae_dir, tmp_path / "o", tmp_path), "none of the 1 images could be encoded"),
        (encode_args(images, tmp_path / "nope", tmp_path / "o", tmp_path), "no autoencoder config found"),
        (encode_args(tmp_path / "missing", vae_dir, tmp_path / "o", tmp_path), "not an image folder"),
        (encode_args(images, vae_dir, tmp_path / "o", tmp_path, "--label_column", "nope"), "no label column"),
        (encode_args(images, vae_dir, tmp_path / "o", tmp_path, "--batch_size", 0), "--batch_size must be"),
        # diffusers loads the folder itself when a local subfolder is missing: the typo was recorded as used
        (encode_args(images, vae_dir, tmp_path / "o", tmp_path, "--vae_subfolder", "nope"), "no subfolder 'nope'"),
        # 15 px through a factor-2 autoencoder silently gave 7x7 latents, the last pixel row and column dropped
        ([*encode_args(images, vae_dir, tmp_path / "o", tmp_path), "--resolution", 15], "such as 14 or 16"),
    ]
    for argv, message in cases:
        assert run(encode.main, argv) == 2, message
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last and "Traceback" not in err, err


def test_autoencoder_and_seed_errors_are_exactly_one_line(vae_dir, images, tmp_path, capsys):
    # A config.json value of the wrong type was a TypeError traceback; a folder without safetensors weights printed
    # diffusers' "An error occurred while trying to fetch" line before ours; a negative --seed was a traceback
    # from numpy after the images were read, leaving OUTPUT.partial/ behind.
    wrong_type, no_weights = tmp_path / "wrong_type", tmp_path / "no_weights"
    shutil.copytree(vae_dir, wrong_type)
    config = json.loads((wrong_type / "config.json").read_text())
    (wrong_type / "config.json").write_text(json.dumps({**config, "block_out_channels": 8}))
    no_weights.mkdir()
    shutil.copy(vae_dir / "config.json", no_weights)
    cases = [(encode_args(images, wrong_type, tmp_path / "o", tmp_path), "cannot load the AutoencoderKL weights"),
             (encode_args(images, no_weights, tmp_path / "o", tmp_path), "cannot load the AutoencoderKL weights"),
             ([*encode_args(images, vae_dir, tmp_path / "o", tmp_path), "--sample_posterior", "--seed", -1],
              "--seed must be >= 0, got -1")]
    for argv, message in cases:
        assert run(encode.main, argv) == 2, message
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("where", ["finalize", "write_batch"])
def test_a_full_disk_is_one_line_and_the_rerun_resumes(vae_dir, images, encoded, tmp_path, capsys, monkeypatch,
                                                       where):
    # An OSError traceback before (and with 2 ranks, a gloo traceback on the other); finished shards were kept.
    # Full in the middle of a shard (write_batch) left its .tmp file behind.
    from datasets.arrow_writer import ArrowWriter

    real = getattr(ArrowWriter, where)

    def full_disk_at_the_second_shard(self, *args, **kwargs):
        if str(getattr(self, "_path", "")).endswith("shard-00001.arrow.tmp"):  # not datasets' own cache writes
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ArrowWriter, where, full_disk_at_the_second_shard)
    out = tmp_path / "lat"
    assert run(encode.main, encode_args(images, vae_dir, out, tmp_path, "--flip_augment")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --output") and "No space left on device" in last and "resumes" in last, last
    partial = tmp_path / "lat.partial"
    assert sorted(p.name for p in partial.iterdir()) == ["settings.json", "shard-00000.arrow",
                                                         "shard-00000.arrow.done.json"]  # no .tmp shard left
    monkeypatch.setattr(ArrowWriter, where, real)
    assert run(encode.main, encode_args(images, vae_dir, out, tmp_path, "--flip_augment")) == 0
    assert load_latents(out)["latents"] == load_latents(encoded)["latents"]


def test_a_resolution_too_large_for_memory_says_so(vae_dir, images, tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):  # what the probe encode raised for --resolution 100000 (120 GB)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 120000000000 bytes")

    monkeypatch.setattr(AutoencoderKL, "encode", out_of_memory)
    assert run(encode.main, encode_args(images, vae_dir, tmp_path / "o", tmp_path)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "runs out of memory; use a smaller --resolution" in last and "multiple" not in last, last


def test_a_work_folder_that_is_not_an_encodes_is_refused_not_deleted(vae_dir, images, tmp_path, capsys):
    # <output>.partial without settings.json was deleted without --overwrite, even when it was the --data folder.
    out = tmp_path / "lat"
    (tmp_path / "lat.partial").mkdir()
    (tmp_path / "lat.partial" / "notes.txt").write_text("important")
    assert run(encode.main, encode_args(images, vae_dir, out, tmp_path)) == 2
    assert "holds no interrupted encode" in capsys.readouterr().err.strip().splitlines()[-1]
    assert (tmp_path / "lat.partial" / "notes.txt").read_text() == "important"
    photos = tmp_path / "photos.partial"  # the input itself has the work folder's name
    shutil.copytree(images, photos)
    before = sorted(p.relative_to(photos) for p in photos.rglob("*"))
    assert run(encode.main, encode_args(photos, vae_dir, tmp_path / "photos", tmp_path)) == 2
    assert "would replace the input" in capsys.readouterr().err.strip().splitlines()[-1]
    assert sorted(p.relative_to(photos) for p in photos.rglob("*")) == before
    (tmp_path / "garbled.partial").mkdir()  # a settings.json a kill left half-written
    (tmp_path / "garbled.partial" / "settings.json").write_text("{not json")
    assert run(encode.main, encode_args(images, vae_dir, tmp_path / "garbled", tmp_path)) == 2
    assert run(encode.main, encode_args(images, vae_dir, tmp_path / "garbled", tmp_path, "--overwrite")) == 0


def test_an_output_that_cannot_be_created_is_one_line(vae_dir, images, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert run(encode.main, encode_args(images, vae_dir, tmp_path / "a_file" / "lat", tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "a_file is a file, not a folder" in err.strip().splitlines()[-1], err


def test_load_vae_refuses_a_config_that_is_not_an_object(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("[1, 2]")  # was an AttributeError traceback
    with pytest.raises(autoencoder.VaeLoadError, match="config.json is not a JSON object"):
        autoencoder.load_vae(tmp_path / "vae")


def test_load_vae_hides_the_hubs_retry_warnings(monkeypatch):
    # Offline, `--vae someone/vae` printed 25 "Retrying in Ns" lines over 51 s before its one error line.
    import logging

    import diffusers

    shown = []

    def offline(*args, **kwargs):
        shown.append(logging.getLogger("huggingface_hub.utils._http").isEnabledFor(logging.WARNING))
        warnings.warn("The `local_dir_use_symlinks` argument is deprecated", UserWarning, stacklevel=2)  # 2 lines
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(diffusers.AutoencoderKL, "load_config", offline)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(autoencoder.VaeLoadError, match="someone/vae"):
        warnings.simplefilter("always")
        autoencoder.load_vae("someone/vae")
    assert shown == [False, False]  # the folder itself, then its vae/ subfolder
    assert not caught, [str(w.message) for w in caught]


def test_load_vae_by_class_name_and_pipeline_subfolder(vae_dir, tmp_path):
    torch.manual_seed(0)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    tiny.save_pretrained(tmp_path / "pipe" / "vae")
    assert type(autoencoder.load_vae(tmp_path / "pipe")).__name__ == "AutoencoderTiny"  # found in vae/
    vae = autoencoder.load_vae(vae_dir)
    assert isinstance(vae, AutoencoderKL) and autoencoder.vae_info(vae)["id"] == str(vae_dir.resolve())


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


def test_parquet_source_with_string_labels(vae_dir, tmp_path):
    def png(seed: int) -> bytes:
        buf = io.BytesIO()
        image(seed).save(buf, format="PNG")
        return buf.getvalue()

    feats = datasets.Features({"img": datasets.Image(), "kind": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"img": [{"bytes": png(i), "path": None} for i in range(3)],
                                     "kind": ["zebra", "ant", "zebra"]}, features=feats)
    ds.to_parquet(tmp_path / "images.parquet")
    out = tmp_path / "out"
    assert run(encode.main, encode_args(tmp_path / "images.parquet", vae_dir, out, tmp_path, "--label_column",
                                        "kind")) == 0
    assert load_latents(out)["labels"] == [1, 0, 1]
    assert autoencoder.read_encoding_info(out)["label_names"] == ["ant", "zebra"]


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
