"""Hardening around runs and checkpoints: train.py on the original's labels and run folders and on a malformed or
unloadable encoding.json, original checkpoints with bad tensors or another config (convert_original), run lookup
with glob characters in the name (locate_run), and upload folders with a malformed model_index.json or
metrics.json. Everything is tiny; train.py runs in this process (dry runs or 2 steps)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import cli, one_line_error, snapshot

from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline, convert_original, data, default_scheduler
from latent_ddpm.demo import make_demo_latents
from latent_ddpm.errors import UserInputError, run_cli
from latent_ddpm.hub import prepare_upload_folder
from latent_ddpm.run_folder import checkpoint_of, default_output, locate_run, run_dir_of

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

#: train.py kept small: the tiny preset, no evaluation, no image grids, short previews.
FAST = ["--preset", "tiny", "--train_batch_size", "8", "--num_eval_samples", "0", "--num_preview_samples", "2",
        "--preview_inference_steps", "2", "--save_images_epochs", "0"]
TINY_PIPE_UNET = dict(in_channels=4, down_channels=(8, 16, 16), mid_channels=(16, 16), time_emb_dim=16,
                      down_sample=(True, False), num_heads=2, norm_num_groups=4, head_channels=8, sample_size=8)
#: A tiny original UNet (the original hard-codes GroupNorm(8), 4 heads and a 16-channel last up block).
TINY_ORIGINAL = dict(im_channels=2, down_channels=[16, 32, 32], mid_channels=[32, 32], time_emb_dim=16,
                     down_sample=[True, False], num_down_layers=1, num_mid_layers=1, num_up_layers=1)


# ============================================================================ 7-9. train.py


@pytest.fixture(scope="module")
def demo_x() -> np.ndarray:
    x, _ = make_demo_latents(num_samples=16, seed=0, size=8)
    return x


@pytest.mark.parametrize("labels, message", [
    (lambda n: np.arange(n, dtype=np.float32) + 0.5, "labels must be integers"),
    (lambda n: np.arange(n, dtype=np.int64)[:, None], "labels must have shape (16,) to match 16 latents"),
    (lambda n: np.array([f"class{i % 3}" for i in range(n)]), "labels must be integers"),
], ids=["float", "2d", "strings"])
def test_train_ignores_the_originals_labels_unless_class_conditional(demo_x, tmp_path, capfd, labels, message):
    path = tmp_path / "original.npz"
    np.savez(path, X=demo_x, y=labels(len(demo_x)))
    base = ["--train_data", path, "--output_dir", tmp_path / "run", "--dry_run", *FAST]
    code, out, err = cli(train.main, base, capfd)
    assert code == 0, err[-3000:]
    assert "dry run, nothing written" in out and "16 latents of 4x8x8" in out
    code, _, err = cli(train.main, [*base, "--class_conditional"], capfd)
    one_line_error(code, err, "original.npz[y]", message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("old_file", ["model.pth", "ddpm_epoch_10.pt"])
def test_train_refuses_a_run_folder_of_the_original(demo_x, tmp_path, capfd, old_file):
    path = tmp_path / "demo.npz"
    np.savez(path, X=demo_x)
    run_dir = tmp_path / "runs" / "demo_ddpm_4_1000_0.0001_0.02"
    (run_dir / "train").mkdir(parents=True)
    (run_dir / "train" / old_file).write_bytes(b"")
    (run_dir / "train" / "notes.txt").write_text("the original's run")
    before = snapshot(run_dir)
    base = ["--train_data", path, "--output_dir", run_dir, "--max_train_steps", "2", *FAST]
    code, _, err = cli(train.main, base, capfd)
    one_line_error(code, err, "original project", f"train/{old_file}", "--overwrite_output_dir")
    assert snapshot(run_dir) == before
    # "Resume if there is anything to resume" found no checkpoint of ours, and trained beside them unasked.
    code, _, err = cli(train.main, [*base, "--resume_from_checkpoint", "latest"], capfd)
    one_line_error(code, err, "original project", f"train/{old_file}", "--overwrite_output_dir")
    assert snapshot(run_dir) == before
    code, _, err = cli(train.main, [*base, "--overwrite_output_dir"], capfd)
    assert code == 0, err[-3000:]
    assert (run_dir / "pipeline" / "model_index.json").is_file()
    assert (run_dir / "train" / old_file).is_file() and (run_dir / "train" / "notes.txt").is_file()  # beside them
    # That run, started beside them on purpose, resumes like any other (no second --overwrite_output_dir).
    code, out, err = cli(train.main, [*base[:-len(FAST) - 2], "--max_train_steps", "4", *FAST,
                                      "--resume_from_checkpoint", "latest"], capfd)
    assert code == 0 and "resumed from" in out + err, err[-3000:]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite_output_dir"]])
def test_a_converted_pipeline_and_the_users_files_are_never_replaced(demo_x, tmp_path, capfd, overwrite):
    # migration.md saves a converted checkpoint as <run>/pipeline; "already holds a run ... --overwrite_output_dir"
    # was the advice, and following it deleted the converted pipeline (and the user's train/logs/ files).
    path = tmp_path / "demo.npz"
    np.savez(path, X=demo_x)
    run_dir = tmp_path / "runs" / "demo_ddpm_4_1000_0.0001_0.02"
    (run_dir / "train" / "logs").mkdir(parents=True)
    (run_dir / "train" / "model.pth").write_bytes(b"")
    (run_dir / "train" / "logs" / "mine.txt").write_text("the user's")
    (run_dir / "pipeline").mkdir()
    (run_dir / "pipeline" / "model_index.json").write_text("{}")
    before = snapshot(run_dir)
    base = ["--train_data", path, "--output_dir", run_dir, "--max_train_steps", "2", *FAST, *overwrite]
    one_line_error(*cli(train.main, base, capfd)[::2], "pipeline was not written by train.py", "move it elsewhere")
    assert snapshot(run_dir) == before
    # Nor does a resume from another folder's checkpoint (it replaced the converted pipeline).
    other = tmp_path / "other"
    assert cli(train.main, ["--train_data", path, "--output_dir", other, "--max_train_steps", "2", *FAST,
                            "--checkpointing_steps", "2"], capfd)[0] == 0
    one_line_error(*cli(train.main, [*base, "--max_train_steps", "3", "--resume_from_checkpoint",
                                     other / "train" / "checkpoint-2"], capfd)[::2], "was not written by train.py")
    assert snapshot(run_dir) == before
    shutil.move(run_dir / "pipeline", tmp_path / "converted")  # moved: the run trains beside the original's files
    assert cli(train.main, [*base, "--overwrite_output_dir"], capfd)[0] == 0
    assert (run_dir / "train" / "logs" / "mine.txt").read_text() == "the user's"


@pytest.fixture(scope="module")
def saved_dataset(demo_x, tmp_path_factory) -> Path:
    """A save_to_disk folder made by `python -m latent_ddpm.data convert` (in this process)."""
    root = tmp_path_factory.mktemp("saved")
    np.savez(root / "demo.npz", X=demo_x)
    assert run_cli(data.main, ["convert", str(root / "demo.npz"), str(root / "latents")]) == 0
    return root / "latents"


@pytest.mark.parametrize("text", ["[1, 2]", '{"vae": null}', '{"vae": {"id": 3}}', "{not json"],
                         ids=["list", "null-vae", "numeric-id", "not-json"])
def test_train_refuses_a_malformed_encoding_json(saved_dataset, tmp_path, capfd, text):
    folder = tmp_path / "latents"
    shutil.copytree(saved_dataset, folder)
    (folder / "encoding.json").write_text(text)
    argv = ["--train_data", folder, "--output_dir", tmp_path / "run", "--dry_run", *FAST]
    code, _, err = cli(train.main, argv, capfd)
    one_line_error(code, err, str(folder / "encoding.json"))
    assert not (tmp_path / "run").exists()


def test_train_without_the_encoding_vae_warns_and_saves_no_vae(saved_dataset, tmp_path, capfd, caplog):
    folder = tmp_path / "latents"
    shutil.copytree(saved_dataset, folder)
    (folder / "encoding.json").write_text(json.dumps({"vae": {"id": "/nonexistent/vae"}}))
    out = tmp_path / "run"
    code, stdout, err = cli(train.main, ["--train_data", folder, "--output_dir", out, "--max_train_steps", "2",
                                         *FAST], capfd)
    assert code == 0, err[-3000:]
    text = stdout + err + caplog.text
    warning = next((line for line in text.splitlines() if "cannot be loaded" in line), None)
    assert warning is not None and "encoding.json" in warning and "/nonexistent/vae" in warning, text[-3000:]
    assert (out / "pipeline" / "unet").is_dir() and not (out / "pipeline" / "vae").exists()
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index.get("vae") in (None, [None, None])


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


# ============================================================================ 11. locate_run


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


# ============================================================================ 10. resuming a finished run


@pytest.mark.parametrize("damage", ["deleted", "damaged"])
def test_resume_without_a_usable_checkpoint_keeps_a_finished_run(demo_x, tmp_path, capfd, damage):
    # --resume_from_checkpoint latest with every checkpoint deleted (or damaged) trained from scratch and replaced
    # the finished run's pipeline, metrics and figures, with only an INFO line.
    np.savez(tmp_path / "d.npz", X=demo_x)
    run = tmp_path / "run"
    base = ["--train_data", tmp_path / "d.npz", "--output_dir", run, *FAST, "--max_train_steps", "2",
            "--checkpointing_steps", "2"]
    assert cli(train.main, base, capfd)[0] == 0
    for ckpt in (run / "train").glob("checkpoint-*"):
        if damage == "deleted":
            shutil.rmtree(ckpt)
        else:
            (ckpt / "COMPLETE").unlink()
    before = snapshot(run)
    one_line_error(*cli(train.main, [*base, "--resume_from_checkpoint", "latest"], capfd)[::2],
                   "holds a finished run (pipeline/) and no complete checkpoint to resume", "--overwrite_output_dir")
    assert snapshot(run) == before
    shutil.rmtree(run / "pipeline")  # a crashed run's folder: nothing finished to lose, so it starts from scratch
    assert cli(train.main, [*base, "--resume_from_checkpoint", "latest"], capfd)[0] == 0


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


@pytest.mark.parametrize("damage", ["old_marker_missing_optimizer", "old_marker_missing_ema", "state_without_step",
                                    "nan_weights"])
def test_damage_the_marker_does_not_list_is_skipped(demo_x, tmp_path, capfd, damage):
    # An older marker ("ok") lists no files, so a missing optimizer.bin or ema.safetensors passed the check and
    # accelerate's load_state / load_file raised a traceback; so did a trainer_state.json without global_step.
    from latent_ddpm.checkpointing import checkpoint_problem

    np.savez(tmp_path / "d.npz", X=demo_x)
    run = tmp_path / "run"
    base = ["--train_data", tmp_path / "d.npz", "--output_dir", run, *FAST, "--checkpointing_steps", "1"]
    assert cli(train.main, [*base, "--max_train_steps", "2"], capfd)[0] == 0
    ckpt = run / "train" / "checkpoint-2"
    if damage == "nan_weights":  # same size, so the marker's sizes match; resumed, the run blamed the learning rate
        from safetensors.torch import load_file, save_file

        weights = load_file(ckpt / "model.safetensors")
        save_file({k: torch.full_like(t, float("nan")) for k, t in weights.items()}, ckpt / "model.safetensors")
        marker = json.loads((ckpt / "COMPLETE").read_text())  # checksums that match: the finiteness check acts
        marker["sha256"]["model.safetensors"] = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
        marker["files"]["model.safetensors"] = (ckpt / "model.safetensors").stat().st_size
        (ckpt / "COMPLETE").write_text(json.dumps(marker))
        assert "model.safetensors holds non-finite values" in checkpoint_problem(ckpt)
    elif damage == "state_without_step":
        state = json.loads((ckpt / "trainer_state.json").read_text())
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "global_step": "2"}))
        (ckpt / "COMPLETE").write_text("ok")
    else:
        (ckpt / "COMPLETE").write_text("ok")
        (ckpt / ("optimizer.bin" if damage == "old_marker_missing_optimizer" else "ema.safetensors")).unlink()
    assert checkpoint_problem(ckpt) is not None
    assert checkpoint_problem(run / "train" / "checkpoint-1") is None
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*checkpoint-2"):
        code, out, err = cli(train.main, [*base, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"],
                             capfd)
    assert code == 0, err[-3000:]
    assert "checkpoint-1 at step 1" in out, out[-3000:]


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


def test_resuming_on_other_data_is_refused(demo_x, tmp_path, capfd):
    # Same shape, other data: accepted silently; the data order (a function of N) and the statistics changed.
    np.savez(tmp_path / "d.npz", X=demo_x)
    np.savez(tmp_path / "more.npz", X=np.concatenate([demo_x, demo_x * 2]))
    run = tmp_path / "run"
    base = ["--output_dir", run, *FAST, "--checkpointing_steps", "2"]
    assert cli(train.main, ["--train_data", tmp_path / "d.npz", *base, "--max_train_steps", "2"], capfd)[0] == 0
    before = snapshot(run)
    resumed = cli(train.main, ["--train_data", tmp_path / "more.npz", *base, "--max_train_steps", "4",
                               "--resume_from_checkpoint", "latest"], capfd)
    one_line_error(resumed[0], resumed[2], "num_latents=16 there vs 32 now")
    assert snapshot(run) == before
    np.savez(tmp_path / "other.npz", X=demo_x * 3 + 1)  # the same count, other data: other statistics
    resumed = cli(train.main, ["--train_data", tmp_path / "other.npz", *base, "--max_train_steps", "4",
                               "--resume_from_checkpoint", "latest"], capfd)
    one_line_error(resumed[0], resumed[2], "data_stats={'mode': 'channel', 'mean': [")
    assert snapshot(run) == before
    resumed = cli(train.main, ["--train_data", tmp_path / "d.npz", *base, "--max_train_steps", "4",
                               "--resume_from_checkpoint", "latest"], capfd)
    assert resumed[0] == 0, resumed[2][-2000:]  # the same data resumes


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


def test_another_runs_checkpoint_does_not_replace_a_finished_run(demo_x, tmp_path, capfd):
    # Resuming run A's checkpoint with --output_dir B, where B had finished, replaced B's pipeline and reports
    # (its checkpoints moved to abandoned/) with only a warning about the checkpoints.
    path = tmp_path / "demo.npz"
    np.savez(path, X=demo_x)
    base = ["--train_data", path, "--max_train_steps", "2", "--checkpointing_steps", "2", *FAST]
    for name in ("a", "b"):
        assert cli(train.main, [*base, "--output_dir", tmp_path / name], capfd)[0] == 0
    before = snapshot(tmp_path / "b")
    foreign = ["--output_dir", tmp_path / "b", "--resume_from_checkpoint", tmp_path / "a" / "train" / "checkpoint-2"]
    code, _, err = cli(train.main, [*base, "--max_train_steps", "3", *foreign], capfd)  # the last value counts
    one_line_error(code, err, "holds a finished run (pipeline/), which resuming another run's checkpoint",
                   "--overwrite_output_dir")
    assert snapshot(tmp_path / "b") == before
    # Its own checkpoint resumes as before, and so does the other's into a folder without a finished run.
    own = ["--output_dir", tmp_path / "b", "--resume_from_checkpoint", "latest"]
    assert cli(train.main, [*base, "--max_train_steps", "3", *own], capfd)[0] == 0
    assert cli(train.main, [*base, "--max_train_steps", "3", *foreign[:1], tmp_path / "c", *foreign[2:]], capfd)[0] == 0
    # --overwrite_output_dir, as the refusal advises, clears B's old run first (it was "ignored": B's checkpoints
    # stayed beside the resumed lineage's).
    code, _, err = cli(train.main, [*base, "--max_train_steps", "3", *foreign, "--overwrite_output_dir"], capfd)
    assert code == 0 and "ignored" not in err, err[-3000:]
    assert sorted(p.name for p in (tmp_path / "b" / "train").glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (tmp_path / "b" / "train" / "abandoned").exists()


def _finished_run(demo_x, tmp_path: Path, capfd) -> tuple[list, Path]:
    """A finished 4-step run with checkpoints at steps 2 and 4: (its train.py arguments but the steps, its folder)."""
    np.savez(tmp_path / "demo.npz", X=demo_x)
    run_dir = tmp_path / "run"
    base = ["--train_data", tmp_path / "demo.npz", "--output_dir", run_dir, "--checkpointing_steps", "2", *FAST]
    assert cli(train.main, [*base, "--max_train_steps", "4"], capfd)[0] == 0
    return base, run_dir


def test_an_abandoned_checkpoint_of_a_finished_run_resumes_in_place(demo_x, tmp_path, capfd):
    # A checkpoint set aside in train/abandoned/ counted as another run's, and was refused in its own run.
    base, run_dir = _finished_run(demo_x, tmp_path, capfd)
    older = ["--resume_from_checkpoint", run_dir / "train" / "checkpoint-2"]
    assert cli(train.main, [*base, "--max_train_steps", "3", *older], capfd)[0] == 0  # sets checkpoint-4 aside
    abandoned = run_dir / "train" / "abandoned" / "checkpoint-4"
    code, out, err = cli(train.main, [*base, "--max_train_steps", "6", "--resume_from_checkpoint", abandoned,
                                      "--dry_run"], capfd)
    assert code == 0 and "dry run, nothing written" in out, err[-3000:]
    code, _, err = cli(train.main, [*base, "--resume_from_checkpoint", abandoned.parent], capfd)
    one_line_error(code, err, "holds checkpoints but is not one", str(abandoned))
    assert "--output_dir" not in err  # the in-place resume is for a run's train/ folder only


def test_a_checkpoint_past_the_runs_end_is_refused(demo_x, tmp_path, capfd):
    # It "finished" without a step and rewrote the pipeline and reports, whose plan named the shorter run.
    base, run_dir = _finished_run(demo_x, tmp_path, capfd)
    before = snapshot(run_dir)
    code, _, err = cli(train.main, [*base, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"], capfd)
    one_line_error(code, err, "checkpoint-4 is already at step 4, past this run's end at step 2",
                   "raise --max_train_steps")
    assert snapshot(run_dir) == before
