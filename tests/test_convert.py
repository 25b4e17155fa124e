"""Converting original checkpoints: same function as the original UNet, strict key checks, one-line CLI errors."""

from __future__ import annotations

import os
import runpy
import sys
import warnings

import pytest
import torch
from _helpers import exit_status

from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline
from latent_ddpm.convert_original import infer_original_config, load_original_checkpoint, main, rename_original_key
from latent_ddpm.errors import UserInputError

# A tiny original config (the original hard-codes GroupNorm(8), 4 heads and a 16-channel last up block)
# and the matching AdvancedUNet2DModel flags.
TINY_ORIGINAL = dict(im_channels=2, down_channels=[16, 32, 32], mid_channels=[32, 32], time_emb_dim=16,
                     down_sample=[True, False], num_down_layers=1, num_mid_layers=1, num_up_layers=1)
TINY_FLAGS = dict(down_channels=(16, 32, 32), mid_channels=(32, 32), time_emb_dim=16, down_sample=(True, False),
                  sample_size=8)
TINY_ARGV = ["--down_channels", "16", "32", "32", "--mid_channels", "32", "32", "--time_emb_dim", "16",
             "--down_sample", "true", "false", "--sample_size", "8"]


def _original(module, seed=0, **overrides):
    torch.manual_seed(seed)
    model = module.Unet({**TINY_ORIGINAL, **overrides}).eval()
    with torch.no_grad():  # GroupNorm starts at weight 1, bias 0: randomise so a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _save(model, path, prefix="", wrap=None):
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({wrap: sd} if wrap else sd, path)
    return path


def _assert_same_function(original, ours, c, hw=(8, 8), timesteps=(0, 17, 49)):
    x = torch.randn(len(timesteps), c, *hw, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(timesteps)
    with torch.no_grad():
        ref, out = original(x, t), ours(x, t).sample
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- same function


@pytest.mark.parametrize("prefix, wrap", [("", None), ("model.", None), ("model.", "state_dict"), ("", "model"),
                                          ("module.", None)])  # the last: saved from nn.DataParallel
def test_converted_model_computes_the_same_function(original_unet, tmp_path, prefix, wrap):
    original = _original(original_unet)
    path = _save(original, tmp_path / "model.pth", prefix, wrap)
    ours = load_original_checkpoint(path, AdvancedUNet2DModel, **TINY_FLAGS)
    assert ours.config.in_channels == 2  # inferred from conv_in
    _assert_same_function(original, ours, c=2)


def test_two_layers_per_block_and_classmethod(original_unet, tmp_path):
    layers = dict(num_down_layers=2, num_mid_layers=2, num_up_layers=2)  # the original's upstream default
    original = _original(original_unet, seed=1, im_channels=3, **layers)
    path = _save(original, tmp_path / "ddpm_epoch_10.pt", "model.")
    ours = AdvancedUNet2DModel.from_original_checkpoint(path, **TINY_FLAGS, **layers)
    _assert_same_function(original, ours, c=3, hw=(8, 12), timesteps=(3, 999))


def test_seed_model_converts_exactly(original_unet, tmp_path):
    original = _original(original_unet, **original_unet.ORIGINAL_CONFIG)
    ours = load_original_checkpoint(_save(original, tmp_path / "model.pth", "model."))
    assert sum(p.numel() for p in ours.parameters()) == 6_069_156
    _assert_same_function(original, ours, c=4, timesteps=(1, 30))


def test_rename_table_and_inferred_config(original_unet):
    original = original_unet.Unet(original_unet.ORIGINAL_CONFIG)
    ours = AdvancedUNet2DModel.from_preset("seed")
    renamed = [rename_original_key(k) for k in original.state_dict()]
    assert len(set(renamed)) == len(renamed) and sorted(renamed) == sorted(ours.state_dict())
    assert infer_original_config(original.state_dict()) == dict(
        in_channels=4, time_emb_dim=128, head_channels=16, down_channels=[32, 64, 128, 256],
        down_sample=[True, True, False], num_down_layers=1, mid_channels=[256, 256, 128], num_mid_layers=1,
        num_up_layers=1)


# ---------------------------------------------------------------- strictness


def _error(path, **config) -> str:
    with pytest.raises(UserInputError) as info:
        load_original_checkpoint(path, AdvancedUNet2DModel, **{**TINY_FLAGS, **config})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_and_unexpected_keys_are_named(original_unet, tmp_path):
    sd = _original(original_unet).state_dict()
    del sd["downs.0.attentions.0.out_proj.weight"]
    sd["downs.0.extra.weight"] = torch.zeros(1)
    message = _error(_save_sd(sd, tmp_path / "m.pth"))
    assert "1 missing key(s) (down_blocks.0.attentions.0.to_out.weight)" in message
    assert "1 unexpected key(s) (downs.0.extra.weight)" in message


def test_wrong_config_suggests_flags(original_unet, tmp_path):
    path = _save(_original(original_unet), tmp_path / "m.pth", "model.")
    message = _error(path, num_down_layers=2)
    assert "missing key(s)" in message and "--num_down_layers 1" in message
    message = _error(path, down_channels=(16, 24, 32), mid_channels=(32, 24))
    assert "shape mismatch" in message and "--down_channels 16 32 32" in message
    assert "conv_in.weight (16, 2, 3, 3) vs (16, 3, 3, 3)" in _error(path, in_channels=3)
    assert "unexpected key(s)" in _error(path, attention_levels=(1,))
    assert "missing key(s) (class_embedding.weight)" in _error(path, num_class_embeds=3)
    assert "mid_channels[0]" in _error(path, mid_channels=(16, 32))  # an invalid config is a UserInputError too


def _save_sd(sd, path):
    torch.save(sd, path)
    return path


class _RunsCode:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):  # unpickling would call os.mkdir(target)
        return os.mkdir, (self.target,)


def test_unreadable_files_are_one_line_errors(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"conv_in.weight": torch.zeros(1), "x": _RunsCode(str(marker))}, tmp_path / "evil.pth")
    torch.save(_RunsCode(str(marker)), tmp_path / "code.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save({"conv_in.weight": torch.zeros(1), "epoch": 3}, tmp_path / "mixed.pth")
    torch.save({}, tmp_path / "empty.pth")
    torch.save({"conv_in.weight": torch.zeros(1), 1: torch.zeros(1)}, tmp_path / "int_key.pth")
    cases = {"int_key.pth": "it has the key 1 (int) where parameter names are strings",
             "evil.pth": "refused to load", "code.pth": "mkdir", "garbage.pth": "not a torch.save file",
             "tensor.pth": "got Tensor", "mixed.pth": "'epoch' holds int, not a tensor", "empty.pth": "(empty)",
             "absent.pth": "does not exist"}
    for name, expected in cases.items():
        assert expected in _error(tmp_path / name), name
    assert not marker.exists()  # weights_only=True never ran the pickled code


# ---------------------------------------------------------------- command line


def _cli(argv, capsys) -> tuple[int, str, str]:
    code = exit_status(main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_converts_a_model(original_unet, tmp_path, capsys):
    original = _original(original_unet)
    ckpt = _save(original, tmp_path / "model.pth", "model.")
    code, out, err = _cli([ckpt, tmp_path / "out", *TINY_ARGV], capsys)
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    ours = AdvancedUNet2DModel.from_pretrained(tmp_path / "out")
    assert ours.config.sample_size == 8 and ours.config.in_channels == 2
    _assert_same_function(original, ours, c=2)


def test_cli_pipeline_with_the_original_schedule(original_unet, tmp_path, capsys):
    ckpt = _save(_original(original_unet), tmp_path / "model.pth")
    argv = [ckpt, tmp_path / "pipe", *TINY_ARGV, "--pipeline", "--n_steps", "40", "--lbeta", "2e-4", "--ubeta", "0.03"]
    code, _, err = _cli(argv, capsys)
    assert code == 0, err
    assert not [p for p in (tmp_path / "pipe").rglob("*") if p.suffix in (".bin", ".pkl", ".pt", ".pth")]
    pipe = LatentDDPMPipeline.from_pretrained(tmp_path / "pipe")
    cfg = pipe.scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end) == (40, 2e-4, 0.03)
    assert (cfg.beta_schedule, cfg.clip_sample) == ("linear", False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0)).latents.shape == (1, 2, 8, 8)


def test_cli_refuses_a_non_empty_output_dir(original_unet, tmp_path, capsys):
    ckpt = _save(_original(original_unet), tmp_path / "model.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _cli([ckpt, out, *TINY_ARGV], capsys)
    assert code == 2 and err.count("\n") == 1 and "not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    code, _, err = _cli([ckpt, out, *TINY_ARGV, "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "diffusion_pytorch_model.safetensors").is_file() and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("extra, expected", [
    (["--num_mid_layers", "2"], "missing key(s)"),
    (["--pipeline", "--lbeta", "0.1", "--ubeta", "0.01"], "--lbeta < --ubeta"),
    (["--sample_size", "8", "8", "8"], "--sample_size takes"),
    (["--sample_size", "7"], "divisible by 2"),
    (["--n_steps", "1000", "--lbeta", "0.5"], "--n_steps --lbeta describe the noise schedule of a --pipeline"),
    (["--sample_size", "0"], "sample_size must be"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(original_unet, tmp_path, capsys, extra, expected):
    ckpt = _save(_original(original_unet), tmp_path / "model.pth")
    out = tmp_path / "out"
    code, _, err = _cli([ckpt, out, *TINY_ARGV, *extra], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert "Traceback" not in err and not out.exists()


def test_cli_output_under_a_file_is_one_line(original_unet, tmp_path, capsys):
    ckpt = _save(_original(original_unet), tmp_path / "model.pth")
    (tmp_path / "a_file").write_text("x")
    code, _, err = _cli([ckpt, tmp_path / "a_file" / "sub", *TINY_ARGV], capsys)
    assert code == 2 and err.count("\n") == 1 and "a_file is a file, not a folder" in err, err
    assert (tmp_path / "a_file").read_text() == "x"


def test_cli_module_entry_point_on_a_bad_file(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"\x00\x01garbage")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["convert_original", str(bad), str(out)])
    with pytest.raises(SystemExit) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported
        runpy.run_module("latent_ddpm.convert_original", run_name="__main__")  # `python -m ...`, in process
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: cannot read checkpoint") and err.count("\n") == 1, err
    assert not out.exists()
