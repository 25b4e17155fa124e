"""Default run folders name only the data's stem (plus a subset, and a split other than train), as the original
project did: two sources can share one. A folder holding a run on other data is refused with a message that says
so (resuming it is no way out; the same data moved elsewhere is still that run), and sample.py's run lookup names
the runs of a source's subsets and splits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import TRAIN_FAST, cli, one_line_error, snapshot

from latent_ddpm.demo import make_demo_latents
from latent_ddpm.errors import UserInputError
from latent_ddpm.run_folder import locate_run, other_data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

RUN = "lat_ddpm_4_1000_0.0001_0.02"  # the default run folder of any lat.npz with 4 channels


@pytest.fixture
def two_sources(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """Two different files with one stem (d1/lat.npz, d2/lat.npz); the working folder is tmp_path."""
    monkeypatch.chdir(tmp_path)
    paths = []
    for seed, folder in enumerate(("d1", "d2")):
        (tmp_path / folder).mkdir()
        x, _ = make_demo_latents(num_samples=16, seed=seed, size=8)
        np.savez(tmp_path / folder / "lat.npz", X=x)
        paths.append(tmp_path / folder / "lat.npz")
    return paths[0], paths[1]


def test_a_default_run_folder_of_other_data_is_refused_as_such(two_sources, tmp_path, capfd):
    first, second = two_sources
    code, _, err = cli(train.main, ["--train_data", "d1/lat.npz", *TRAIN_FAST, "--max_train_steps", "2"], capfd)
    assert code == 0, err[-3000:]
    run = tmp_path / "runs" / RUN
    assert (run / "pipeline").is_dir()
    before = snapshot(tmp_path / "runs")
    for extra in ([], ["--dry_run"]):
        code, _, err = cli(train.main, ["--train_data", "d2/lat.npz", *TRAIN_FAST, *extra], capfd)
        line = one_line_error(code, err, f"runs/{RUN} already holds a run on other data ({first}; this run's: "
                                         f"{second})", "choose another --output_dir")
        assert "--resume_from_checkpoint" not in line  # resuming another data's run is refused anyway
    # The same data, named another way, is the same run: continuing it is offered.
    code, _, err = cli(train.main, ["--train_data", str(first), *TRAIN_FAST, "--dry_run"], capfd)
    one_line_error(code, err, "already holds a run; continue it with --resume_from_checkpoint latest")
    assert snapshot(tmp_path / "runs") == before
    # The same data moved elsewhere (its statistics recorded beside the run) is still this run: continue it.
    (tmp_path / "moved").mkdir()
    first.rename(tmp_path / "moved" / "lat.npz")
    code, _, err = cli(train.main, ["--train_data", "moved/lat.npz", *TRAIN_FAST, "--dry_run"], capfd)
    one_line_error(code, err, "already holds a run; continue it with --resume_from_checkpoint latest")


def _record(run: Path, **config) -> None:
    (run / "train").mkdir(parents=True)
    (run / "train" / "config.json").write_text(json.dumps(config))


def test_other_data_compares_the_source_its_key_subset_and_split(tmp_path):
    run = tmp_path / "run"
    _record(run, train_data="hub/ds", latent_key="X", train_split="train", dataset_config_name="vae b")
    same = dict(train_data="hub/ds", latent_key="X", train_split="train", dataset_config_name="vae b", seed=3)
    assert other_data(run, same) is None
    assert other_data(run, {**same, "dataset_config_name": "vae_b"}) == (
        "hub/ds, subset vae b; this run's: hub/ds, subset vae_b")
    assert other_data(run, {**same, "dataset_config_name": None, "train_split": "test"}) == (
        "hub/ds, subset vae b; this run's: hub/ds, split test")
    assert "--latent_key Z" in other_data(run, {**same, "latent_key": "Z"})
    assert other_data(run, {**same, "train_data": None}).endswith("this run's: the demo set, subset vae b")
    # A record from before splits and subsets were recorded compares what it has; an unreadable one, nothing.
    old = tmp_path / "old"
    _record(old, train_data="hub/ds")
    assert other_data(old, same) is None
    (old / "train" / "config.json").write_text("{not json")
    assert other_data(old, {**same, "train_data": "other"}) is None
    assert other_data(tmp_path / "none", same) is None


def test_other_data_with_the_same_statistics_is_the_same_data(tmp_path):
    run = tmp_path / "run"
    _record(run, train_data="/old/lat.npz")
    stats = {"mode": "channel", "mean": [0.5, -1.0], "std": [2.0, 0.25]}
    (run / "train" / "latent_stats.json").write_text(json.dumps(stats))
    moved = {"train_data": "/new/lat.npz"}
    assert other_data(run, moved, stats) is None
    assert other_data(run, moved, {**stats, "mean": [0.5, -1.0 + 1e-6]}) is None  # summed in another order
    for other in ({**stats, "mean": [0.5, -1.1]}, {**stats, "mode": "global"}, {**stats, "std": [2.0]},
                  {"mode": "none", "mean": None, "std": None}):
        assert other_data(run, moved, other) == "/old/lat.npz; this run's: /new/lat.npz", other
    assert other_data(run, moved) is not None  # no statistics given: the names decide
    # A scaling factor's statistics (or none) are the same for any data (Stable Diffusion latents with
    # --scaling_factor): the names decide, else a run on other data would be offered to resume.
    for fixed in ({"mode": "scale", "mean": [0.0, 0.0], "std": [5.49, 5.49]}, {"mode": "none", "mean": None,
                                                                              "std": None}):
        (run / "train" / "latent_stats.json").write_text(json.dumps(fixed))
        assert other_data(run, moved, fixed) == "/old/lat.npz; this run's: /new/lat.npz", fixed


def test_locate_run_names_the_runs_of_a_sources_subsets_and_splits(tmp_path):
    runs = tmp_path / "runs"
    for name in ("lat_vae_b_ddpm_4_1000_0.0001_0.02", "lat_test_ddpm_4_1000_0.0001_0.02", "latent_ddpm_4_1_1_1"):
        (runs / name / "pipeline").mkdir(parents=True)
    with pytest.raises(UserInputError) as refused:
        locate_run("lat.npz", runs_dir=runs)
    message = str(refused.value)
    assert "no trained run for --latent lat.npz" in message
    assert ("runs named lat_* (its subsets or splits, or other data): lat_test_ddpm_4_1000_0.0001_0.02, "
            "lat_vae_b_ddpm_4_1000_0.0001_0.02 "
            f"(pass --model {runs}/lat_test_ddpm_4_1000_0.0001_0.02/pipeline)") in message
    assert "latent_ddpm_4_1_1_1" not in message  # another stem's run, not a subset's
    assert locate_run("lat_vae_b", runs_dir=runs) == runs / "lat_vae_b_ddpm_4_1000_0.0001_0.02"


def test_a_malformed_record_is_compared_not_raised(tmp_path):
    # A recorded path too long for the file system (or under a folder this user may not enter) made Path.exists
    # raise: train.py --dry_run gave a traceback, a run 'cannot prepare the run folder'.
    long_name, moved = tmp_path / ("y" * 300), {"train_data": "/new/lat.npz"}
    _record(tmp_path / "long", train_data=str(long_name))
    assert other_data(tmp_path / "long", moved) == f"{long_name}; this run's: /new/lat.npz"
    # A recorded integer beyond any float made math.isclose raise.
    run = tmp_path / "run"
    _record(run, train_data="/old/lat.npz")
    (run / "train" / "latent_stats.json").write_text('{"mode": "channel", "mean": [1' + "0" * 400 + '], "std": [1]}')
    ours = {"mode": "channel", "mean": [1.0], "std": [1.0]}
    assert other_data(run, moved, ours) == "/old/lat.npz; this run's: /new/lat.npz"
