"""Splits and subsets of a source (train.py --train_split / --dataset_config_name, evaluate --split / --subset,
`load_latents(split=, subset=)`): what each source takes or refuses, what the messages name, and the run folder's
name. Tiny Parquet shards, as in test_data_formats.py."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from test_data_formats import arrays, expect_error, latents, write_shard

from latent_ddpm.errors import UserInputError


def test_train_py_trains_on_the_split_train_split_names(tmp_path):
    import subprocess
    import sys

    from latent_ddpm.feeding import load_training_data

    x = latents(20, seed=3)
    folder = tmp_path / "hub"
    write_shard(folder / "train-00000-of-00001.parquet", x[:12])
    write_shard(folder / "test-00000-of-00001.parquet", x[12:])
    np.testing.assert_array_equal(arrays(load_training_data(str(folder), split="test").dataset)[0], x[12:])
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "train.py", "--train_data", str(folder), "--train_split", "test",
                           "--dry_run", "--preset", "tiny", "--train_batch_size", "4", "--output_dir",
                           str(tmp_path / "run")], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "hub_test: 8 latents of 3x4x6" in done.stdout + done.stderr, done.stderr


def test_a_subset_goes_to_the_hub_as_its_config_name_and_files_have_none(tmp_path, monkeypatch):
    asked = {}

    def offline(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    expect_error("owner/latents", "cannot be loaded from the hub", subset="vae_b", split="test")
    assert asked == {"repo_id": "owner/latents", "name": "vae_b", "split": "test"}
    np.savez(tmp_path / "a.npz", X=latents())
    expect_error(tmp_path / "a.npz", r"no subsets .* so no subset 'vae_b'; drop subset=", subset="vae_b")


def test_the_demo_set_has_no_split_or_subset():
    from latent_ddpm.feeding import load_training_data

    with pytest.raises(UserInputError, match="--dataset_config_name vae: the demo set has no subsets; drop it"):
        load_training_data(None, subset="vae")
    with pytest.raises(UserInputError, match="--train_split test: the demo set has no splits"):
        load_training_data(None, split="test")


def test_evaluate_takes_a_held_out_split_as_its_reference(tmp_path, capsys):
    import json

    from _helpers import exit_status

    from latent_ddpm import evaluate

    x = latents(60, seed=7)
    folder = tmp_path / "hub"
    write_shard(folder / "train-00000-of-00001.parquet", x[:20])
    write_shard(folder / "test-00000-of-00001.parquet", x[20:])
    np.savez(tmp_path / "samples.npz", samples=x[:20])
    base = ["--samples", str(tmp_path / "samples.npz"), "--reference", str(folder), "--no_baseline"]
    capsys.readouterr()
    assert exit_status(evaluate.main, base) == 0
    on_train = json.loads(capsys.readouterr().out)
    assert exit_status(evaluate.main, [*base, "--split", "test"]) == 0
    on_test = json.loads(capsys.readouterr().out)
    assert on_train["fd"] < 1e-6 < on_test["fd"]  # the samples are the train split itself
    assert exit_status(evaluate.main, [*base, "--subset", "vae"]) == 2  # named as evaluate takes it, not train.py
    assert "no subset 'vae'; it declares none (no configs: in a README.md); drop subset= (train.py " \
           "--dataset_config_name, evaluate --subset)" in capsys.readouterr().err


def test_a_subset_or_split_is_part_of_the_data_name_and_so_of_the_run_folder(tmp_path):
    # Runs on two subsets of one folder shared the default run folder, where --overwrite_output_dir (which the refusal
    # suggests) would delete the other subset's run.
    from latent_ddpm.feeding import load_training_data

    x = latents(8, seed=4)
    folder = tmp_path / "hub"
    for name, rows in (("vae_a", x[:4]), ("vae b", x[4:])):
        write_shard(folder / name / "train-00000-of-00001.parquet", rows)
        write_shard(folder / name / "test-00000-of-00001.parquet", rows)
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: vae_a\n  data_dir: vae_a\n"
                                      "- config_name: vae b\n  data_dir: vae b\n---\n")
    names = {(subset, split): load_training_data(str(folder), subset=subset, split=split).name
             for subset in ("vae_a", "vae b") for split in ("train", "test")}
    assert names == {("vae_a", "train"): "hub_vae_a", ("vae_a", "test"): "hub_vae_a_test",
                     ("vae b", "train"): "hub_vae_b", ("vae b", "test"): "hub_vae_b_test"}
    assert load_training_data(str(folder / "vae_a")).name == "vae_a"


def test_the_data_stem_in_the_run_folder_is_kept_as_it_was(tmp_path):
    # Only a subset or split is made safe for a folder name: the stem as before, so an existing run's folder is found
    # again and sample.py --latent's locate_run (which globs the raw stem) finds the run train.py made.
    from latent_ddpm.feeding import load_training_data
    from latent_ddpm.run_folder import default_run_dir, locate_run

    np.savez(tmp_path / "my data (v2).npz", X=latents())
    name = load_training_data(str(tmp_path / "my data (v2).npz")).name
    assert name == "my data (v2)"
    (tmp_path / default_run_dir(name, 3, 10, 0.0001, 0.02) / "pipeline").mkdir(parents=True)
    assert locate_run("my data (v2).npz", runs_dir=tmp_path / "runs").name == "my data (v2)_ddpm_3_10_0.0001_0.02"


@pytest.mark.parametrize("said, fix", [
    ('Unknown split "validation". Should be one of [\'train\', \'test\'].',
     "choose one with split= (train.py --train_split"),
    ("Config name is missing.\nPlease pick one among the available configs: ['vae_a', 'vae_b']",
     "choose one with subset= (train.py --dataset_config_name"),
    ("offline", "check the path or the dataset id"),
    ("Couldn't reach 'owner/split-config-latents' on the Hub (OfflineModeIsEnabled)",  # words of the id itself
     "check the path or the dataset id")])
def test_a_hub_dataset_s_split_or_config_error_names_the_flag(monkeypatch, said, fix):
    def refuse(repo_id, **kwargs):
        raise ValueError(said)

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    message = expect_error("owner/split-config-latents", "cannot be loaded from the hub")  # one line (checked)
    assert fix in message and said.split()[-1] in message  # datasets' list of configs or splits kept
