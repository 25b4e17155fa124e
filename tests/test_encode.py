"""Images -> latents: latent_ddpm.encode (posterior means or samples, flips, labels, resuming, bad images, one-line
errors, full disks, work folders) and loading an autoencoder (latent_ddpm.autoencoder.load_vae). Latents -> images
(the pipeline's vae, sample.py --decode, previews) are in test_decode.py.

A tiny random AutoencoderKL (factor 2, 4 latent channels) and 16x16 images: 4x8x8 latents (tests/_helpers.py,
fixtures in conftest.py).
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from _helpers import RES, encode_args, image
from _helpers import run_main as run
from diffusers import AutoencoderKL, AutoencoderTiny

from latent_ddpm import autoencoder, encode
from latent_ddpm.data import load_latents
from latent_ddpm.images import prepare_image, to_model_range


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
