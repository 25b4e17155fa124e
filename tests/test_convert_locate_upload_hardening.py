"""Hardening around pipelines and run folders outside train.py: original checkpoints with bad tensors or another
config (convert_original), run lookup with glob characters in the name (locate_run), where samples of a checkpoint's
pipeline go and what a --model that is a checkpoint or a file is told, and upload folders with a malformed
model_index.json or metrics.json or a failed build. Everything is tiny; nothing trains. train.py's runs are in
test_runs_hardening.py."""

from __future__ import annotations

import json
import re

import pytest
import torch
from _helpers import cli, one_line_error

from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline, convert_original, default_scheduler
from latent_ddpm.errors import UserInputError
from latent_ddpm.hub import prepare_upload_folder
from latent_ddpm.run_folder import checkpoint_of, default_output, locate_run, run_dir_of

TINY_PIPE_UNET = dict(in_channels=4, down_channels=(8, 16, 16), mid_channels=(16, 16), time_emb_dim=16,
                      down_sample=(True, False), num_heads=2, norm_num_groups=4, head_channels=8, sample_size=8)
#: A tiny original UNet (the original hard-codes GroupNorm(8), 4 heads and a 16-channel last up block).
TINY_ORIGINAL = dict(im_channels=2, down_channels=[16, 32, 32], mid_channels=[32, 32], time_emb_dim=16,
                     down_sample=[True, False], num_down_layers=1, num_mid_layers=1, num_up_layers=1)


# ============================================================================ 10. convert_original


@pytest.mark.parametrize("tensor, message", [
    (lambda: torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "holds NaN/Inf values"),
    (lambda: torch.eye(3).to_sparse(), "is not a plain real tensor"),
    (lambda: torch.zeros(3, dtype=torch.complex64), "is not a plain real tensor"),
    (lambda: torch.zeros(16), "does not match the model config"),
], ids=["nan", "sparse", "complex", "1d-conv-in"])
def test_convert_original_bad_tensors(tmp_path, capfd, tensor, message):
    ckpt = tmp_path / "model.pth"
    torch.save({"conv_in.weight": tensor(), "t_proj.0.weight": torch.zeros(16, 16)}, ckpt)
    code, _, err = cli(convert_original.main, [ckpt, tmp_path / "out"], capfd)
    one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_convert_original_suggested_flags_work_verbatim(original_unet, tmp_path, capfd):
    torch.manual_seed(0)
    model = original_unet.Unet(TINY_ORIGINAL).eval()
    ckpt = tmp_path / "model.pth"
    torch.save(model.state_dict(), ckpt)
    code, _, err = cli(convert_original.main, [ckpt, tmp_path / "out"], capfd)  # the seed preset: wrong
    line = one_line_error(code, err, "The checkpoint's shapes suggest:", "--head_channels 16")
    flags = re.search(r"The checkpoint's shapes suggest: (.*?); pass", line).group(1).split()
    code, _, err = cli(convert_original.main, [ckpt, tmp_path / "out", *flags, "--sample_size", "8"], capfd)
    assert code == 0, err
    ours = AdvancedUNet2DModel.from_pretrained(tmp_path / "out")
    assert ours.config.head_channels == 16 and ours.config.in_channels == 2
    x, t = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 17])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t).sample, model(x, t), atol=1e-5, rtol=1e-4)
    # The flag reaches the model: another width does not fit this checkpoint.
    wrong = [f if f != "16" or flags[i - 1] != "--head_channels" else "8" for i, f in enumerate(flags)]
    assert wrong != flags
    code, _, err = cli(convert_original.main, [ckpt, tmp_path / "out2", *wrong, "--sample_size", "8"], capfd)
    one_line_error(code, err, "does not match the model config")


# ============================================================================ 11. locate_run, a checkpoint's pipeline


def test_locate_run_with_glob_characters_in_the_name(tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / "lat[1]_ddpm_4_1000_0.0001_0.02"
    (run_dir / "pipeline").mkdir(parents=True)
    (runs / "lat1_ddpm_4_1000_0.0001_0.02" / "pipeline").mkdir(parents=True)  # what the glob [1] would match
    assert locate_run("lat[1].npz", runs_dir=runs) == run_dir
    assert locate_run("data/lat[1].npz", runs_dir=runs, n_dim=4, lbeta=1e-4) == run_dir
    assert locate_run("lat1.npz", runs_dir=runs) == runs / "lat1_ddpm_4_1000_0.0001_0.02"
    with pytest.raises(UserInputError, match="no trained run"):
        locate_run("lat[2].npz", runs_dir=runs)
    with pytest.raises(UserInputError, match=r"looked for .*lat2_ddpm_4_\*_\*_\*/pipeline"):  # not ..._4_50_...:
        locate_run("lat2.npz", runs_dir=runs, n_dim=4, n_steps=50)  # --n_steps does not name the folder


def test_samples_of_a_checkpoints_pipeline_go_outside_the_checkpoint(tmp_path):
    # sample.py wrote them into <run>/train/checkpoint-N/generated/, which checkpoint rotation (or
    # --overwrite_output_dir) deleted with the checkpoint.
    ckpt_pipe = tmp_path / "run" / "train" / "checkpoint-2" / "pipeline"
    ckpt_pipe.mkdir(parents=True)
    (tmp_path / "run" / "pipeline").mkdir()
    model = str(ckpt_pipe)
    assert run_dir_of(model) == tmp_path / "run" and checkpoint_of(model) == "checkpoint-2"
    assert default_output(run_dir_of(model), 7, 4, checkpoint_of(model)) == (
        tmp_path / "run" / "generated" / "checkpoint-2" / "seed_7" / "samples_7_4.npz")
    final = str(tmp_path / "run" / "pipeline")  # the final pipeline keeps the original's layout
    assert checkpoint_of(final) is None
    assert default_output(run_dir_of(final), 7, 4) == tmp_path / "run" / "generated" / "seed_7" / "samples_7_4.npz"


def test_a_model_that_is_a_checkpoint_or_a_file_gets_a_hint(tmp_path):
    from latent_ddpm.sampling import load_pipeline

    ckpt = tmp_path / "run" / "train" / "checkpoint-6"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (tmp_path / "model_index.json").write_text("{}")
    cases = {ckpt: f"a training checkpoint (resume it with train.py), the run's pipeline is {tmp_path / 'run'}",
             tmp_path / "model_index.json": f"pass the folder that holds it, {tmp_path}",
             ckpt / "trainer_state.json": "pass a pipeline folder (it holds model_index.json), not a file"}
    for model, hint in cases.items():
        with pytest.raises(UserInputError, match="not a saved pipeline") as info:
            load_pipeline(str(model))
        assert hint in str(info.value), info.value


# ============================================================================ 12. hub upload folder


@pytest.mark.parametrize("text", ['{"_class_name": "LatentDDPMPipeline", ', "[1, 2]"], ids=["truncated", "a-list"])
def test_upload_folder_malformed_model_index(tmp_path, text):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text(text)
    with pytest.raises(UserInputError, match=r"model_index\.json") as info:
        prepare_upload_folder(tmp_path / "pipeline", tmp_path / "upload", repo_id="me/model")
    assert not isinstance(info.value, json.JSONDecodeError) and "\n" not in str(info.value)
    assert not (tmp_path / "upload").exists()


@pytest.mark.parametrize("mutate", [lambda i: {k: v for k, v in i.items() if k != "scheduler"},
                                    lambda i: {**i, "scheduler": "DDPMScheduler"}, lambda i: [1, 2]],
                         ids=["no-scheduler", "scheduler-a-string", "a-list"])
def test_loading_an_upload_folder_with_a_malformed_model_index(tmp_path, mutate):
    # KeyError: 'scheduler', "too many values to unpack" and "'list' object has no attribute 'get'" before.
    torch.manual_seed(0)
    pipe = LatentDDPMPipeline(unet=AdvancedUNet2DModel(**TINY_PIPE_UNET), scheduler=default_scheduler())
    pipe.save_pretrained(tmp_path / "pipeline", safe_serialization=True)
    upload = prepare_upload_folder(tmp_path / "pipeline", tmp_path / "upload", repo_id="me/model")
    index = json.loads((upload / "model_index.json").read_text())
    (upload / "model_index.json").write_text(json.dumps(mutate(index)))
    with pytest.raises(UserInputError, match=r"model_index\.json"):
        LatentDDPMPipeline.from_pretrained(upload)


def test_upload_folder_leaves_a_malformed_metrics_json_out_of_the_card(tmp_path):
    torch.manual_seed(0)
    pipe = LatentDDPMPipeline(unet=AdvancedUNet2DModel(**TINY_PIPE_UNET), scheduler=default_scheduler())
    pipe.save_pretrained(tmp_path / "pipeline", safe_serialization=True)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.json").write_text('{"final_loss": 0.5, ')
    (tmp_path / "train" / "config.json").write_text(json.dumps({"learning_rate": 0.001}))
    out = prepare_upload_folder(tmp_path / "pipeline", tmp_path / "upload", repo_id="me/model")
    card = (out / "README.md").read_text()
    assert "## Metrics" not in card and "final_loss" not in card
    assert "## Training configuration" in card and "learning_rate: 0.001" in card
    (tmp_path / "train" / "metrics.json").write_text(json.dumps({"final_loss": 0.5}))  # a good one is shown
    out = prepare_upload_folder(tmp_path / "pipeline", tmp_path / "upload2", repo_id="me/model")
    assert "| final_loss | 0.5 |" in (out / "README.md").read_text()


def test_a_failed_upload_folder_build_leaves_nothing(tmp_path):
    # A missing card image failed after the copies: the half-built folder made the retry "not empty".
    torch.manual_seed(0)
    pipe = LatentDDPMPipeline(unet=AdvancedUNet2DModel(**TINY_PIPE_UNET), scheduler=default_scheduler())
    pipe.save_pretrained(tmp_path / "pipeline", safe_serialization=True)
    with pytest.raises(UserInputError, match="nope.png does not exist"):
        prepare_upload_folder(tmp_path / "pipeline", tmp_path / "up", images={"a": tmp_path / "nope.png"})
    assert not (tmp_path / "up").exists()
    (tmp_path / "empty").mkdir()  # a folder the caller made is kept, emptied
    with pytest.raises(UserInputError, match="nope.png does not exist"):
        prepare_upload_folder(tmp_path / "pipeline", tmp_path / "empty", images={"a": tmp_path / "nope.png"})
    assert list((tmp_path / "empty").iterdir()) == []
    assert prepare_upload_folder(tmp_path / "pipeline", tmp_path / "up").is_dir()  # the retry works
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserInputError, match="is a file; name a folder"):  # NotADirectoryError before
        prepare_upload_folder(tmp_path / "pipeline", tmp_path / "a_file")
