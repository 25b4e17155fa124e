"""Bad input, table-driven: every command answers each bad file, config or flag with one line on stderr
(what, where, how to fix), exit status 2, no traceback, and leaves every file on disk as it was.

The commands run in this process through `run_cli` (what their `__main__` does), so 60 cases take seconds;
`test_the_real_commands_exit_2` runs one case per command as a real subprocess.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from _helpers import reset_accelerate, snapshot
from safetensors.torch import save_file

from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline, convert_original, data, default_scheduler, evaluate
from latent_ddpm.demo import make_demo_latents
from latent_ddpm.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402
import train  # noqa: E402

FAST = ["--preset", "tiny", "--train_batch_size", "8", "--num_eval_samples", "0", "--save_images_epochs", "0",
        "--max_train_steps", "2"]
TINY_PIPE_UNET = dict(in_channels=4, down_channels=(8, 16, 16), mid_channels=(16, 16), time_emb_dim=16,
                      down_sample=(True, False), num_heads=2, norm_num_groups=4, head_channels=8, sample_size=8)
COMMANDS = {"train": train.main, "sample": sample.main, "data": data.main, "convert_original": convert_original.main,
            "evaluate": evaluate.main}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Every input, good and bad, in one folder."""
    d = tmp_path_factory.mktemp("inputs")
    x, y = make_demo_latents(num_samples=64, seed=0, size=8)
    nan = x.copy()
    nan[5, 1, 2, 3] = np.nan
    np.save(d / "nan.npy", nan)
    np.savez(d / "good.npz", X=x, y=y)
    np.savez(d / "unlabelled.npz", X=x)
    np.savez(d / "other_label_key.npz", X=x, classes=y)
    np.save(d / "unlabelled.npy", x)
    np.savez(d / "constant.npz", X=np.full_like(x, 1.5))
    np.savez(d / "int8.npz", X=(x * 10).astype(np.int8), y=y)  # 4-D, the right shape, but int8
    np.savez(d / "labels_n_plus_1.npz", X=x, y=np.append(y, 0))
    np.savez(d / "x3d.npz", X=x[:, 0], y=y)
    np.savez(d / "other_key.npz", Z=x)
    raw = (d / "good.npz").read_bytes()
    (d / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    np.savez(d / "empty.npz", X=x[:0], y=y[:0])
    np.savez(d / "negative_labels.npz", X=x, y=np.where(np.arange(64) == 7, -1, y))
    np.savez(d / "float_labels.npz", X=x, y=y.astype(np.float32) + 0.5)
    np.savez(d / "odd7.npz", X=np.zeros((8, 4, 7, 7), np.float32))
    (d / "latents.txt").write_text("1 2 3\n")
    save_file({"Z": torch.from_numpy(x)}, d / "other_key.safetensors")
    save_file({"X": torch.from_numpy(x)}, d / "truncated.safetensors")
    raw = (d / "truncated.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    save_file({"X": torch.from_numpy(nan).to(torch.bfloat16)}, d / "nan_bf16.safetensors")
    save_file({"X": torch.from_numpy(x * 10).to(torch.int16)}, d / "int16.safetensors")
    (d / "test_shards_only").mkdir()  # a hub dataset's layout, with no train split
    test_shard = d / "test_shards_only" / "test-00000-of-00001.parquet"
    datasets.Dataset.from_dict({"X": x[:8].tolist()}).to_parquet(str(test_shard))
    (d / "garbage.parquet").write_bytes(os.urandom(1000))
    good = data.load_latents(d / "good.npz")
    good.save_to_disk(str(d / "saved"))  # one Dataset, no splits
    datasets.DatasetDict(train=good).save_to_disk(str(d / "saved_dict"))
    (d / "plain_folder").mkdir()
    (d / "plain_folder" / "a.txt").write_text("not a dataset")
    configs = {"neg_lr": "learning_rate: -0.001\n", "beta_order": "beta_start: 0.02\nbeta_end: 0.001\n",
               "zero_t": "num_train_timesteps: 0\n", "a_list": "- preset\n- tiny\n", "unknown": "learnin_rate: 1\n",
               "wrong_type": "learning_rate: fast\n", "bad_yaml": "preset: [tiny\n",
               "mixed_keys": "1: 2\nfoo: 3\n", "model_config_date": "model_config: {dropout: 0.1, when: 2024-01-01}\n",
               "huge_int_lr": f"learning_rate: {10**400}\n", "octal_seed": "preset: tiny\nseed: 042\n"}
    for name, text in configs.items():
        (d / f"{name}.yaml").write_text(text)
    (d / "a_file").write_text("a regular file where a folder is expected")
    (d / "a_run" / "train" / "checkpoint-4").mkdir(parents=True)  # a run folder, its checkpoint marked complete
    (d / "a_run" / "train" / "checkpoint-4" / "COMPLETE").write_text("ok")
    (d / "run_train_is_file").mkdir()
    (d / "run_train_is_file" / "train").write_text("a regular file where the run's train/ folder goes")

    torch.manual_seed(0)
    pipe = LatentDDPMPipeline(unet=AdvancedUNet2DModel(**TINY_PIPE_UNET), scheduler=default_scheduler())
    pipe.save_pretrained(d / "pipe", safe_serialization=True)
    pipe.save_pretrained(d / "pipe_pickled", safe_serialization=False)  # .bin weights: refused, never unpickled
    for name in ("pipe_badclass", "pipe_truncated", "pipe_badjson", "pipe_noweights"):
        shutil.copytree(d / "pipe", d / name)
    index = d / "pipe_badclass/model_index.json"
    index.write_text(index.read_text().replace('"AdvancedUNet2DModel"', '"NoSuchUNet2DModel"'))
    weights = d / "pipe_truncated/unet/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    (d / "pipe_badjson/model_index.json").write_text('{"_class_name": "LatentDDPMPipeline", ')
    (d / "pipe_noweights/unet/diffusion_pytorch_model.safetensors").unlink()
    (d / "no_index").mkdir()

    (d / "garbage.pth").write_bytes(os.urandom(4096))
    torch.save([torch.zeros(2)], d / "a_list.pth")
    torch.save({"conv_in.weight": torch.zeros(3, 3)}, d / "wrong_keys.pth")
    (d / "empty.pth").write_bytes(b"")

    np.savez(d / "samples.npz", samples=x[:16])
    np.savez(d / "samples_4x4.npz", samples=x[:16, :, :4, :4])
    np.savez(d / "samples_other_key.npz", latents=x[:16])
    np.savez(d / "samples_int8.npz", samples=(x[:16] * 10).astype(np.int8))
    return d


def out(d: Path) -> str:
    return str(d / "out_not_created")


# (id, command, argv (a function of the inputs folder), text the one line must contain)
CASES = [
    # --- train.py: data files
    ("train-int8-latents", "train", lambda d: ["--latent", d / "int8.npz"], "must be floating point, got dtype int8"),
    ("train-labels-n-plus-1", "train", lambda d: ["--latent", d / "labels_n_plus_1.npz", "--class_conditional"],
     "labels must have shape (64,) to match 64 latents, got (65,)"),
    ("train-3d-latents", "train", lambda d: ["--latent", d / "x3d.npz"], "must be 4-D (N, C, H, W)"),
    ("train-wrong-key", "train", lambda d: ["--latent", d / "other_key.npz"], "no array named 'X' (nor 'latents')"),
    ("train-truncated-npz", "train", lambda d: ["--latent", d / "truncated.npz"], "truncated.npz"),
    ("train-nan", "train", lambda d: ["--latent", d / "nan.npy"], "1 NaN/Inf values in the latents, the first in "
     "sample 5"),
    ("train-empty", "train", lambda d: ["--latent", d / "empty.npz"], "the dataset is empty"),
    ("train-negative-label", "train", lambda d: ["--latent", d / "negative_labels.npz", "--class_conditional"],
     "labels must be >= 0"),
    ("train-float-labels", "train", lambda d: ["--latent", d / "float_labels.npz", "--class_conditional"],
     "labels must be integers"),
    ("train-odd-size", "train", lambda d: ["--latent", d / "odd7.npz"], "7x7 is not divisible by the model's "
     """downsampling factor 2; crop/pad the latents to a multiple of 2, or down-sample fewer times (--preset tiny """
     """halves them 1 time): --model_config '{"down_sample": [false, false]}' (with any other keys"""),
    ("train-unknown-format", "train", lambda d: ["--latent", d / "latents.txt"], "unknown format '.txt'"),
    ("train-torch-pickle", "train", lambda d: ["--latent", d / "a_list.pth"],
     "a pickle ('.pth', e.g. from torch.save) is never loaded, as it can run code; save the latents as safetensors"),
    ("train-missing-file", "train", lambda d: ["--latent", d / "missing.npz"], "no such file or folder"),
    ("train-garbage-parquet", "train", lambda d: ["--latent", d / "garbage.parquet"], "not a readable .parquet file"),
    ("train-plain-folder", "train", lambda d: ["--latent", d / "plain_folder"], "not a saved dataset"),
    ("train-split-of-a-file", "train", lambda d: ["--latent", d / "good.npz", "--train_split", "test"],
     "good.npz: a file has no splits (only a saved DatasetDict, a folder of .parquet shards or a hub dataset has), "
     "so no split 'test'; drop split= (train.py --train_split, evaluate --split)"),
    ("train-split-of-a-dataset", "train", lambda d: ["--latent", d / "saved", "--train_split", "test"],
     "a saved dataset without splits (not a DatasetDict), so no split 'test'; read it whole"),
    ("train-split-missing", "train", lambda d: ["--latent", d / "saved_dict", "--train_split", "validation"],
     "no split 'validation'; the splits are ['train']; choose one with split= (train.py --train_split"),
    ("train-subset-of-a-file", "train", lambda d: ["--latent", d / "good.npz", "--dataset_config_name", "vae"],
     "good.npz: no subsets (only a hub dataset or a folder of .parquet shards"),
    ("train-subset-empty", "train", lambda d: ["--latent", d / "saved_dict", "--dataset_config_name", ""],
     "--dataset_config_name: is empty; name a subset"),
    ("train-split-empty", "train", lambda d: ["--latent", d / "saved_dict", "--train_split", " "],
     "--train_split: is empty; name a split"),
    ("train-labels-needed", "train", lambda d: ["--latent", d / "unlabelled.npz", "--class_conditional"],
     "has no 'y', 'labels' or 'label' labels"),
    ("train-labels-other-key", "train", lambda d: ["--latent", d / "other_label_key.npz", "--class_conditional",
                                                    "--label_key", "labelz"],
     "has no 'labelz' labels (it holds 'X', 'classes'); name the labels with --label_key"),  # named neither
    ("train-labels-needed-npy", "train", lambda d: ["--latent", d / "unlabelled.npy", "--class_conditional"],
     "a .npy holds no labels: join them with python -m latent_ddpm.data convert"),  # was: pass --label_key
    ("train-constant-latents", "train", lambda d: ["--latent", d / "constant.npz"],
     "constant.npz: every value of the latents is the same (1.5)"),  # one constant channel is kept (std 1)
    # (.safetensors and Parquet shard folders: read since the fifteenth session)
    ("train-safetensors-wrong-key", "train", lambda d: ["--latent", d / "other_key.safetensors"],
     "no tensor named 'X' (nor 'latents'); the file has ['Z']"),
    ("train-safetensors-truncated", "train", lambda d: ["--latent", d / "truncated.safetensors"],
     "truncated.safetensors: not a readable .safetensors file"),
    ("train-safetensors-nan-bf16", "train", lambda d: ["--latent", d / "nan_bf16.safetensors"],
     "nan_bf16.safetensors[X]: 1 NaN/Inf values in the latents, the first in sample 5"),
    ("train-safetensors-int-latents", "train", lambda d: ["--latent", d / "int16.safetensors"],
     "latents must be floating point (float16, bfloat16, float32 or float64), got dtype int16"),
    ("train-shards-without-train-split", "train", lambda d: ["--latent", d / "test_shards_only"],
     "no split 'train' among its .parquet files; the splits are ['test']"),
    # --- train.py: configs and flags
    ("train-config-negative-lr", "train", lambda d: ["--config", d / "neg_lr.yaml"],
     "--learning_rate: must be > 0, got -0.001"),
    ("train-config-beta-order", "train", lambda d: ["--config", d / "beta_order.yaml"],
     "--beta_end: must be larger than --beta_start"),
    ("train-config-zero-timesteps", "train", lambda d: ["--config", d / "zero_t.yaml"],
     "--num_train_timesteps: must be in 2..100000, got 0"),
    ("train-config-list", "train", lambda d: ["--config", d / "a_list.yaml"], "must hold a mapping"),
    ("train-config-unknown-key", "train", lambda d: ["--config", d / "unknown.yaml"], "unknown keys ['learnin_rate']"),
    ("train-config-wrong-type", "train", lambda d: ["--config", d / "wrong_type.yaml"],
     "--learning_rate: expected float, got 'fast'"),
    ("train-config-bad-yaml", "train", lambda d: ["--config", d / "bad_yaml.yaml"], "is not valid YAML/JSON"),
    ("train-ddp-timeout", "train", lambda d: ["--ddp_timeout", "0"], "--ddp_timeout: must be 1..2592000 seconds"),
    ("train-nan-flag", "train", lambda d: ["--learning_rate", "nan"], "--learning_rate: must be a finite number"),
    ("train-output-under-file", "train", lambda d: ["--output_dir", d / "a_file" / "run"],
     "cannot create the run folder"),
    ("train-train-folder-is-a-file", "train", lambda d: ["--output_dir", d / "run_train_is_file"],
     "cannot prepare the run folder"),
    ("train-negative-snr-floor", "train", lambda d: ["--snr_floor", "-0.1"], "--snr_floor: must be >= 0, got -0.1"),
    ("train-resume-missing", "train", lambda d: ["--resume_from_checkpoint", d / "nowhere"],
     "not a complete checkpoint folder (no such folder)"),
    # (tracebacks until the fourteenth session:)
    ("train-config-mixed-keys", "train", lambda d: ["--config", d / "mixed_keys.yaml"], "unknown keys [1, 'foo']"),
    ("train-config-model-config-date", "train", lambda d: ["--config", d / "model_config_date.yaml"],
     "--model_config: Object of type date is not JSON serializable"),
    ("train-config-huge-int", "train", lambda d: ["--config", d / "huge_int_lr.yaml"],
     "--learning_rate: must be a finite number"),
    ("train-huge-max-steps", "train", lambda d: ["--max_train_steps", "1" + "0" * 400],
     "--max_train_steps: must be at most 1e+12"),
    ("train-huge-warmup", "train", lambda d: ["--lr_warmup_steps", "9" * 400], "--lr_warmup_steps: must be at most"),
    ("train-polynomial-lr-end", "train", lambda d: ["--lr_scheduler", "polynomial", "--learning_rate", "1e-7"],
     "--learning_rate: must be above 1e-07, the rate --lr_scheduler polynomial decays to"),
    ("train-config-folder", "train", lambda d: ["--config", d / "plain_folder"], "plain_folder is a folder"),
    ("train-resume-a-run-folder", "train", lambda d: ["--resume_from_checkpoint", d / "a_run"],
     "a_run holds checkpoints but is not one; pass one of them"),  # was "... (the write did not finish)"
    ("train-model-config-type", "train", lambda d: ["--model_config", '{"down_channels": "wide"}'],
     "--preset/--model_config"),
    # (silently another setting until the fifteenth session:)
    ("train-config-octal-int", "train", lambda d: ["--config", d / "octal_seed.yaml"],
     "octal_seed.yaml line 2: YAML reads 042 as the octal number 34; write 42 (no leading zero)"),
    ("train-constant-lr-with-warmup", "train", lambda d: ["--lr_scheduler", "constant", "--lr_warmup_steps", "50"],
     "--lr_warmup_steps 50: --lr_scheduler constant has no warm-up; use --lr_scheduler constant_with_warmup"),
    # --- sample.py: pipeline folders and flags
    ("sample-unknown-class", "sample", lambda d: ["--model", d / "pipe_badclass"],
     "not a LatentDDPMPipeline with an AdvancedUNet2DModel"),
    ("sample-truncated-weights", "sample", lambda d: ["--model", d / "pipe_truncated"], "cannot load the pipeline"),
    ("sample-bad-json", "sample", lambda d: ["--model", d / "pipe_badjson"], "model_index.json: not readable JSON"),
    ("sample-no-weights", "sample", lambda d: ["--model", d / "pipe_noweights"], "cannot load the pipeline"),
    ("sample-pickled-weights", "sample", lambda d: ["--model", d / "pipe_pickled"],
     "no file named diffusion_pytorch_model.safetensors"),
    ("sample-no-index", "sample", lambda d: ["--model", d / "no_index"], "not a saved pipeline (no model_index"),
    ("sample-zero-samples", "sample", lambda d: ["--model", d / "pipe", "--num_samples", "0"],
     "--num_samples must be at least 1"),
    ("sample-output-suffix", "sample", lambda d: ["--model", d / "pipe", "--output", d / "x.txt"], "must end in .npz"),
    ("sample-labels-unconditional", "sample", lambda d: ["--model", d / "pipe", "--class_labels", "1",
                                                         "--output", d / "s.npz"], "the model is unconditional"),
    ("sample-eta-without-ddim", "sample", lambda d: ["--model", d / "pipe", "--scheduler", "dpmsolver++", "--eta",
                                                     "0.5"], "--eta acts only with --scheduler ddim"),  # was ignored
    ("sample-unknown-scheduler", "sample", lambda d: ["--model", d / "pipe", "--scheduler", "nope",
                                                      "--output", d / "s.npz"], "unknown --scheduler 'nope'"),
    ("sample-scheduler-config-fixed", "sample", lambda d: ["--model", d / "pipe", "--scheduler_config",
                                                           '{"prediction_type": "epsilon"}', "--output", d / "s.npz"],
     "prediction_type is fixed by the model's training"),
    ("sample-scheduler-config-typo", "sample", lambda d: ["--model", d / "pipe", "--scheduler", "ddpm",
                                                          "--scheduler_config", '{"variance_type": "fixed_larg"}',
                                                          "--output", d / "s.npz"],
     'variance_type must be one of "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log" for '
     'DDPMScheduler, got "fixed_larg"'),  # was silently fixed_small, until the fifteenth session
    ("sample-scheduler-config-missing-file", "sample", lambda d: ["--model", d / "pipe", "--scheduler_config",
                                                                  d / "missing.json", "--output", d / "s.npz"],
     "neither a JSON object nor a readable .json file"),
    ("sample-existing-output", "sample", lambda d: ["--model", d / "pipe", "--output", d / "samples.npz"],
     "exists; pass --overwrite"),
    # --- python -m latent_ddpm.data convert
    ("convert-int8", "data", lambda d: ["convert", d / "int8.npz", d / "out_arrow"], "must be floating point"),
    ("convert-labels-n-plus-1", "data", lambda d: ["convert", d / "labels_n_plus_1.npz", d / "out_arrow"],
     "labels must have shape (64,)"),
    ("convert-output-exists", "data", lambda d: ["convert", d / "good.npz", d / "plain_folder"],
     "already exists; pass --overwrite"),
    ("convert-missing", "data", lambda d: ["convert", d / "missing.npz", d / "out_arrow"], "no such file"),
    ("convert-truncated", "data", lambda d: ["convert", d / "truncated.npz", d / "out_arrow"], "truncated.npz"),
    ("convert-no-arguments", "data", lambda d: ["convert"], "the following arguments are required: input, output"),
    # --- python -m latent_ddpm.convert_original
    ("original-garbage", "convert_original", lambda d: [d / "garbage.pth", d / "out_conv"], "cannot read checkpoint"),
    ("original-empty-file", "convert_original", lambda d: [d / "empty.pth", d / "out_conv"],
     "cannot read checkpoint"),
    ("original-a-list", "convert_original", lambda d: [d / "a_list.pth", d / "out_conv"], "is not a model state dict"),
    ("original-wrong-keys", "convert_original", lambda d: [d / "wrong_keys.pth", d / "out_conv"],
     "does not match the model config"),
    ("original-output-is-file", "convert_original", lambda d: [d / "wrong_keys.pth", d / "a_file"],
     "exists and is not a directory"),
    ("original-beta-order", "convert_original", lambda d: [d / "wrong_keys.pth", d / "out_conv", "--pipeline",
                                                           "--lbeta", "0.5", "--ubeta", "0.1"], "need 0 < --lbeta"),
    ("original-one-step", "convert_original", lambda d: [d / "wrong_keys.pth", d / "out_conv", "--pipeline",
                                                         "--n_steps", "1"], "--n_steps must be in 2..100000"),
    ("original-bad-flag", "convert_original", lambda d: [d / "wrong_keys.pth", d / "out_conv", "--down_sample",
                                                         "maybe"], "expected true or false, got 'maybe'"),
    # --- python -m latent_ddpm.evaluate
    ("evaluate-missing", "evaluate", lambda d: ["--samples", d / "missing.npz", "--reference", d / "good.npz"],
     "no such file"),
    ("evaluate-shape", "evaluate", lambda d: ["--samples", d / "samples_4x4.npz", "--reference", d / "good.npz"],
     "does not match the reference latents"),
    ("evaluate-key", "evaluate", lambda d: ["--samples", d / "samples_other_key.npz", "--reference", d / "good.npz"],
     "no array 'samples'"),
    ("evaluate-int8-reference", "evaluate", lambda d: ["--samples", d / "samples.npz", "--reference", d / "int8.npz"],
     "must be floating point"),
    ("evaluate-split-of-a-file", "evaluate", lambda d: ["--samples", d / "samples.npz", "--reference", d / "good.npz",
                                                        "--split", "test"],
     "good.npz: a file has no splits (only a saved DatasetDict, a folder of .parquet shards or a hub dataset has), "
     "so no split 'test'; drop split= (train.py --train_split, evaluate --split)"),  # the flag evaluate takes
    ("evaluate-missing-split", "evaluate", lambda d: ["--samples", d / "samples.npz", "--reference", d / "saved_dict",
                                                      "--split", "test"],
     "no split 'test'; the splits are ['train']; choose one with split= (train.py --train_split, evaluate --split)"),
    ("evaluate-empty-subset", "evaluate", lambda d: ["--samples", d / "samples.npz", "--reference", d / "saved_dict",
                                                     "--subset", ""], "--subset: is empty; name one"),
    ("evaluate-bad-flag", "evaluate", lambda d: ["--samples", d / "samples.npz", "--reference", d / "good.npz",
                                                 "--k", "many"], "invalid int value"),
]


def call(command: str, argv: list, capfd) -> tuple[int, str]:
    """`python <command> argv` in this process (accelerate's process-wide state reset around it)."""
    reset_accelerate()
    try:
        with pytest.raises(SystemExit) as exc:
            run_cli(COMMANDS[command], [str(a) for a in argv])
    finally:
        reset_accelerate()
    return exc.value.code, capfd.readouterr().err


@pytest.mark.parametrize("case_id, command, make_argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(files, capfd, case_id, command, make_argv, message):
    argv = make_argv(files)
    if command == "train":
        argv = [*FAST, *([] if "--latent" in argv else ["--latent", files / "good.npz"]), *argv]
        argv += [] if "--output_dir" in argv else ["--output_dir", files / "run_not_created"]
    before = snapshot(files)
    code, err = call(command, argv, capfd)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert snapshot(files) == before


def test_there_are_enough_cases():
    assert len(CASES) >= 25 and {c[1] for c in CASES} == set(COMMANDS)


def test_the_docs_count_the_cases_right():
    # docs/reliability.md and the README quote the table's size; they drifted by one (seventy-something) before.
    root = Path(__file__).resolve().parents[1]
    per_command = {name: sum(c[1] == name for c in CASES) for name in COMMANDS}
    text = " ".join((root / "docs" / "reliability.md").read_text().split())
    quoted = re.search(r"one table of (\d+) inputs over the five commands \(train\.py (\d+), sample\.py (\d+), "
                       r"`python -m latent_ddpm\.data convert` (\d+), `python -m latent_ddpm\.convert_original` (\d+), "
                       r"`python -m latent_ddpm\.evaluate` (\d+)\)", text)
    assert quoted, "docs/reliability.md no longer quotes the table's size in the expected words"
    order = ("train", "sample", "data", "convert_original", "evaluate")
    assert [int(n) for n in quoted.groups()] == [len(CASES), *(per_command[name] for name in order)]
    assert f"| {len(CASES)} table-driven cases over" in (root / "README.md").read_text()


@pytest.mark.parametrize("command, argv, message", [
    ([str(ROOT / "train.py")], ["--latent", "int8.npz", "--dry_run"], "must be floating point"),
    ([str(ROOT / "sample.py")], ["--model", "pipe_pickled", "--output", "s.npz"], "no file named diffusion_pytorch"),
    (["-m", "latent_ddpm.data"], ["convert", "labels_n_plus_1.npz", "out"], "labels must have shape"),
    (["-m", "latent_ddpm.convert_original"], ["a_list.pth", "out"], "is not a model state dict"),
    (["-m", "latent_ddpm.evaluate"], ["--samples", "samples_4x4.npz", "--reference", "good.npz"], "does not match"),
], ids=["train", "sample", "data", "convert_original", "evaluate"])
def test_the_real_commands_exit_2(files, command, argv, message):
    before = snapshot(files)
    result = subprocess.run([sys.executable, *command, *argv], capture_output=True, text=True, cwd=files,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert snapshot(files) == before


def test_first_line_of_an_error_message():
    from latent_ddpm.errors import first_line

    assert first_line(ValueError("\n  first  \nsecond")) == "first"
    assert first_line(ValueError("")) == "no details"  # the inline splitlines()[0] copies raised IndexError here


def test_the_package_warnings_print_as_one_line(monkeypatch):
    # "skipping damaged checkpoint" and "could not push" printed a second stderr line: train.py's source line.
    import warnings

    from latent_ddpm import checkpointing, errors

    monkeypatch.setattr(warnings, "formatwarning", errors._format_warning_default)
    assert run_cli(lambda argv: 0) == 0 and warnings.formatwarning is errors._format_warning
    ours = warnings.formatwarning("skipping damaged checkpoint", UserWarning, checkpointing.__file__, 7, "code")
    theirs = warnings.formatwarning("deprecated", FutureWarning, torch.__file__, 7, "code")
    assert ours == "warning: skipping damaged checkpoint\n"
    assert theirs.startswith(torch.__file__) and "FutureWarning: deprecated" in theirs


def test_the_error_line_is_one_write(monkeypatch):
    # print() wrote the text and its newline separately: under torchrun the two ranks' lines, sharing one stderr
    # pipe, came out interleaved as "error: ...error: ...\n\n" (seen in a 2-rank sample.py run).
    import io

    from latent_ddpm import errors

    writes: list[str] = []

    class Recording(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return super().write(text)

    monkeypatch.setattr(sys, "stderr", Recording())
    with pytest.raises(SystemExit):
        errors.fail("--output x.npz: cannot write it")
    assert writes == ["error: --output x.npz: cannot write it\n"]
