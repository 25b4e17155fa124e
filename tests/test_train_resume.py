"""End-to-end tests of resuming train.py: tiny models on tiny demo latents, CPU, fp32. A resumed run is
bit-identical to an uninterrupted one (one process and two), an existing run is never overwritten silently, a
resume with other data, run settings or training objective is refused, and resuming an older checkpoint sets the
newer ones aside."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import TRAIN_FAST as FAST
from _helpers import run_train as run
from _helpers import train_subprocess as cli
from safetensors.torch import load_file

from latent_ddpm.demo import make_demo_latents
from latent_ddpm.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def test_resume_mid_epoch_is_bit_identical(data, tmp_path):
    # 64 samples / batch 4 = 16 micro-batches = 8 steps per epoch with accumulation 2; the crash at step 3
    # lands mid-epoch, and the run continues into a second epoch.
    args = ["--latent", str(data), "--max_train_steps", "10", "--checkpointing_steps", "3", *FAST,
            "--train_batch_size", "4", "--gradient_accumulation_steps", "2", "--class_conditional", "--random_flip",
            "--model_config", '{"dropout": 0.1}']
    # Both runs in subprocesses: the same thread count gives the same float arithmetic.
    assert cli(*args, "--output_dir", str(tmp_path / "a")).returncode == 0
    crashed = cli(*args, "--output_dir", str(tmp_path / "b"), env={"LATENT_DDPM_EXIT_AFTER_CHECKPOINT": "3"})
    assert crashed.returncode == 3 and (tmp_path / "b/train/checkpoint-3/COMPLETE").exists()
    assert not (tmp_path / "b/pipeline").exists()
    assert cli(*args, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest").returncode == 0
    a, b = tmp_path / "a/train/checkpoint-10", tmp_path / "b/train/checkpoint-10"
    for name in ("model.safetensors", "ema.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    opt_a = torch.load(a / "optimizer.bin", weights_only=True)["state"]
    opt_b = torch.load(b / "optimizer.bin", weights_only=True)["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


def test_resume_latest_without_checkpoint_starts_fresh(data, tmp_path):
    out = tmp_path / "run"
    assert run(["--latent", str(data), "--max_train_steps", "2", "--output_dir", str(out), *FAST,
                "--resume_from_checkpoint", "latest"]) == 0
    assert (out / "pipeline" / "model_index.json").is_file()


def test_existing_run_is_never_overwritten_silently(data, tmp_path):
    out = tmp_path / "run"
    args = ["--latent", str(data), "--max_train_steps", "2", "--output_dir", str(out), *FAST]
    assert run(args) == 0
    before = weights(out)
    with pytest.raises(UserInputError, match="already holds a run"):
        run(args)
    after = weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert run([*args, "--overwrite_output_dir", "--seed", "1"]) == 0
    assert not all(torch.equal(before[k], weights(out)[k]) for k in before)


def torchrun(*args, env=None) -> subprocess.CompletedProcess:
    """train.py in a real 2-process gloo run on the CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.skipif(sys.platform != "linux", reason="gloo 2-process run tested on Linux")
def test_two_process_run_and_resume(data, tmp_path):
    args = ["--latent", str(data), "--max_train_steps", "6", "--checkpointing_steps", "3", *FAST,
            "--train_batch_size", "4", "--model_config", '{"dropout": 0.1}']  # per-rank dropout streams resume
    # The main process holds its final report until rank 1 has finished: the other ranks must not wait for it.
    ended = tmp_path / "rank_1_ended"
    full = torchrun(*args, "--output_dir", str(tmp_path / "a"), env={"LATENT_DDPM_HOLD_REPORT": str(ended)})
    assert full.returncode == 0, full.stderr[-3000:]
    assert ended.exists() and (tmp_path / "a/train/metrics.json").exists()
    checksums = json.loads((tmp_path / "a/train/metrics.json").read_text())["rank_weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert (tmp_path / "a/train/checkpoint-6/random_states_1.pkl").exists()
    crashed = torchrun(*args, "--output_dir", str(tmp_path / "b"), env={"LATENT_DDPM_EXIT_AFTER_CHECKPOINT": "3"})
    assert crashed.returncode != 0 and (tmp_path / "b/train/checkpoint-3/COMPLETE").exists()
    resumed = torchrun(*args, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


DROPOUT_MASKS = """
import hashlib, os, sys
import torch.nn.functional as F
sys.path.insert(0, sys.argv.pop(1))
real = F.dropout
def recording(x, p=0.5, training=True, inplace=False):
    out = real(x, p, training, inplace)
    if training and p > 0:
        with open(os.path.join(os.environ["MASKS"], os.environ["RANK"]), "a") as f:
            f.write(hashlib.sha1(((out == 0) & (x != 0)).numpy().tobytes()).hexdigest() + "\\n")
    return out
F.dropout = recording
import train
from latent_ddpm.errors import run_cli
run_cli(train.main)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="gloo 2-process run tested on Linux")
def test_each_rank_draws_its_own_dropout(data, tmp_path):
    # Every rank was seeded alike for the shared initial weights and then drew the same dropout masks on its own
    # data shard.
    script, masks = tmp_path / "record.py", tmp_path / "masks"
    script.write_text(DROPOUT_MASKS)
    masks.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(ROOT), "--latent", str(data), "--max_train_steps", "1", *FAST, "--model_config", '{"dropout": 0.1}',
           "--output_dir", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env={
        **os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MASKS": str(masks)})
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = ((masks / r).read_text().split() for r in ("0", "1"))
    assert rank0 and len(rank0) == len(rank1) and not set(rank0) & set(rank1)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo 2-process run tested on Linux")
def test_resume_on_two_processes_of_a_one_process_run_with_the_same_global_batch(data, tmp_path):
    # It was refused ("world_size=1 there vs 2 now"): a run could not continue on another number of GPUs.
    args = ["--latent", data, "--max_train_steps", "6", "--checkpointing_steps", "3", *FAST]
    crashed = cli(*args, "--train_batch_size", "8", "--output_dir", str(tmp_path / "a"),
                  env={"LATENT_DDPM_EXIT_AFTER_CHECKPOINT": "3"})
    assert crashed.returncode == 3, crashed.stderr[-2000:]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for run_dir in ("a", "b"):
        resumed = torchrun(*args, "--train_batch_size", "4", "--output_dir", tmp_path / run_dir,
                           "--resume_from_checkpoint", "latest")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "same global batch of 8: the data order continues, the random streams are new" in resumed.stdout
    state = json.loads((tmp_path / "a/train/checkpoint-6/trainer_state.json").read_text())
    assert state["run_settings"]["world_size"] == 2 and len(state["noise_generator"]) == 2
    # Rank 1 had no noise stream to continue: its new one is fixed by (seed, step, rank), so the run repeats.
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and all(torch.isfinite(v).all() for v in wa.values())


def test_a_resume_with_another_batch_layout_continues_the_same_data_order(tmp_path, monkeypatch):
    # Through train.py: the samples of every optimizer step after a resume that halves the batch and doubles the
    # accumulation are those of the run that never stopped, across epoch ends (20 samples: 2 steps of 8 per epoch).
    from latent_ddpm.feeding import LatentFeeder

    x, y = make_demo_latents(num_samples=20, seed=0, size=8)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    consumed: list[list[int]] = []
    real = LatentFeeder.epoch_batches

    def recording(self, epoch, start_batch=0):
        for idx, batch in zip(self.rank_indices(epoch, start_batch), real(self, epoch, start_batch), strict=True):
            consumed.append(idx.tolist())
            yield batch

    monkeypatch.setattr(LatentFeeder, "epoch_batches", recording)
    args = ["--latent", str(tmp_path / "d.npz"), "--checkpointing_steps", "3", *FAST, "--random_flip"]
    assert run([*args, "--max_train_steps", "6", "--output_dir", str(tmp_path / "a")]) == 0
    steps = [sorted(i) for i in consumed]  # batch 8, accumulation 1: one list per step
    consumed.clear()
    assert run([*args, "--max_train_steps", "3", "--output_dir", str(tmp_path / "b")]) == 0
    consumed.clear()
    assert run([*args, "--max_train_steps", "6", "--output_dir", str(tmp_path / "b"), "--train_batch_size", "4",
                "--gradient_accumulation_steps", "2", "--resume_from_checkpoint", "latest"]) == 0
    resumed = [sorted(consumed[i] + consumed[i + 1]) for i in range(0, len(consumed), 2)]
    assert len(steps) == 6 and resumed == steps[3:]


def test_resume_with_another_channel_count_is_refused(data, tmp_path):
    out = tmp_path / "run"
    args = ["--max_train_steps", "2", "--output_dir", str(out), *FAST]
    assert run(["--latent", str(data), *args]) == 0
    x, y = make_demo_latents(num_samples=64, seed=0, size=8, channels=3)
    other = tmp_path / "three.npz"
    np.savez(other, X=x, y=y)
    before = (out / "train" / "config.json").read_text()
    with pytest.raises(UserInputError, match="in_channels=4 there vs 3 now"):
        run(["--latent", str(other), *args, "--resume_from_checkpoint", "latest"])
    assert (out / "train" / "config.json").read_text() == before


def test_resume_with_other_run_settings_is_refused(data, tmp_path):
    out = tmp_path / "run"
    assert run(["--latent", str(data), "--max_train_steps", "2", "--output_dir", str(out), *FAST]) == 0
    for dry_run in ([], ["--dry_run"]):  # a dry run refuses it too (it said "dry run, nothing written")
        with pytest.raises(UserInputError, match="train_batch_size=8 there vs 4 now"):
            run(["--latent", str(data), "--max_train_steps", "4", "--output_dir", str(out), *FAST,
                 "--train_batch_size", "4", "--resume_from_checkpoint", "latest", *dry_run])


def test_a_run_s_own_config_fed_back_cannot_delete_it(data, tmp_path):
    # train/config.json recorded --overwrite_output_dir true: `--config <run>/train/config.json` (say, with another
    # seed) then deleted and retrained that very run instead of being refused.
    out = tmp_path / "run"
    assert run(["--latent", str(data), "--max_train_steps", "2", "--output_dir", str(out), *FAST,
                "--overwrite_output_dir"]) == 0
    config = out / "train" / "config.json"
    assert json.loads(config.read_text())["overwrite_output_dir"] is False
    before = weights(out)
    with pytest.raises(UserInputError, match="already holds"):
        run(["--config", str(config), "--seed", "7"])
    assert all(torch.equal(before[k], v) for k, v in weights(out).items())


def test_resume_with_other_class_ids_is_refused(tmp_path):
    # The same latents (count and statistics) and the same largest label, so the same model: only the set of class
    # ids differs. It resumed, and the new pipeline recorded the new ids beside weights trained on the old ones.
    x, y = make_demo_latents(num_samples=64, seed=0, size=8, channels=4)
    first, other = tmp_path / "first.npz", tmp_path / "other.npz"
    np.savez(first, X=x, y=y)  # ids 0..3
    np.savez(other, X=x, y=np.where(y == 1, 3, y))  # ids 0, 2, 3
    out = tmp_path / "run"
    args = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir", str(out), "--class_conditional",
            *FAST]
    assert cli("--latent", str(first), *args, env={"LATENT_DDPM_EXIT_AFTER_CHECKPOINT": "2"}).returncode == 3
    with pytest.raises(UserInputError, match=r"class_ids=\[0, 1, 2, 3\] there vs \[0, 2, 3\] now"):
        run(["--latent", str(other), *args, "--resume_from_checkpoint", "latest"])
    assert run(["--latent", str(first), *args, "--resume_from_checkpoint", "latest"]) == 0


def test_every_ranks_rng_state_is_required_and_an_old_checkpoint_names_its_world_size(tmp_path):
    # An older marker ("ok") with random_states_1.pkl missing passed: rank 1 resumed with a fresh RNG, silently
    # inexact. A checkpoint from before run_settings were recorded, resumed on another rank count, ended in an
    # IndexError on noise_generator[rank].
    from safetensors.torch import save_file

    from latent_ddpm.checkpointing import checkpoint_problem
    from latent_ddpm.resume import check_resume_compatible

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "COMPLETE").write_text("ok")
    state = {"global_step": 2, "history": {}, "lr_scheduler": {}, "noise_generator": [[0], [1]]}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    save_file({"w": torch.zeros(2)}, ckpt / "model.safetensors")
    for name in ("optimizer.bin", "random_states_0.pkl"):
        torch.save({}, ckpt / name)
    assert checkpoint_problem(ckpt) == "random_states_1.pkl is missing"
    torch.save({}, ckpt / "random_states_1.pkl")
    assert checkpoint_problem(ckpt) is None
    with pytest.raises(UserInputError, match="world_size=2 there vs 1 now"):
        check_resume_compatible(ckpt, {}, {"world_size": 1})
    check_resume_compatible(ckpt, {}, {"world_size": 2})


def test_train_refuses_to_resume_with_another_snr_floor(data, tmp_path, capfd):
    from latent_ddpm.errors import run_cli

    out = tmp_path / "run"
    args = ["--latent", str(data), "--max_train_steps", "2", "--output_dir", str(out), *FAST]
    assert run(args) == 0  # the default --snr_floor 0.02
    state = (out / "train" / "checkpoint-2" / "trainer_state.json").read_text()
    assert json.loads(state)["run_settings"]["snr_floor"] == 0.02
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(run, [*args, "--max_train_steps", "4", "--snr_floor", "0", "--resume_from_checkpoint", "latest"])
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert exc.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "snr_floor=0.02 there vs 0.0 now" in lines[0], err
    assert sorted(p.name for p in (out / "train").glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "train" / "checkpoint-2" / "trainer_state.json").read_text() == state
    assert run([*args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"]) == 0  # unchanged: resumes


def test_resume_with_overwrite_resumes_and_says_the_overwrite_is_ignored(data, tmp_path, capfd):
    # Both flags: resuming keeps the run (nothing is deleted), and the ignored flag is named, not dropped silently.
    out = tmp_path / "run"
    args = ["--latent", str(data), "--checkpointing_steps", "2", "--output_dir", str(out), *FAST]
    assert run([*args, "--max_train_steps", "2"]) == 0
    first = load_file(out / "train" / "checkpoint-2" / "model.safetensors")
    capfd.readouterr()
    assert run([*args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", "--overwrite_output_dir"]) == 0
    log = capfd.readouterr().out  # train.py logs to stdout
    assert sorted(p.name for p in (out / "train").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    kept = load_file(out / "train" / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(kept[k], first[k]) for k in first)
    assert json.loads((out / "train" / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert any("--overwrite_output_dir ignored: resuming" in line and "checkpoint-2" in line
               for line in log.splitlines()), log[-2000:]


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(data, tmp_path):
    # A run with checkpoints 2, 4, 6 resumed from checkpoint-2: 4 and 6 belong to the abandoned timeline. They
    # are kept under train/abandoned/, and `latest` afterwards means the new timeline's checkpoints.
    out = tmp_path / "run"
    args = ["--latent", str(data), "--max_train_steps", "6", "--checkpointing_steps", "2", "--output_dir", str(out),
            *FAST]
    assert run(args) == 0
    train_dir = out / "train"
    old6 = load_file(train_dir / "checkpoint-6" / "model.safetensors")
    assert run([*args, "--max_train_steps", "3", "--resume_from_checkpoint", str(train_dir / "checkpoint-2")]) == 0
    assert sorted(p.name for p in train_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in (train_dir / "abandoned").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    kept = load_file(train_dir / "abandoned" / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(kept[k], old6[k]) for k in old6)  # moved, not rewritten
    assert json.loads((train_dir / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3


def test_set_aside_keeps_an_earlier_abandoned_folder_of_the_same_step(tmp_path):
    from latent_ddpm.checkpointing import set_aside_newer_checkpoints

    for name in ("checkpoint-1", "checkpoint-5", "checkpoint-5.tmp", "abandoned/checkpoint-5", "notes"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    moved = set_aside_newer_checkpoints(tmp_path, tmp_path / "checkpoint-1")
    assert moved == [tmp_path / "abandoned" / "checkpoint-5.1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abandoned", "checkpoint-1", "checkpoint-5.tmp", "notes"]
    assert set_aside_newer_checkpoints(tmp_path, tmp_path / "checkpoint-1") == []


def test_resuming_another_runs_checkpoint_sets_aside_this_runs_checkpoint_of_the_same_step(tmp_path):
    from latent_ddpm.checkpointing import set_aside_newer_checkpoints

    other, here = tmp_path / "other" / "train", tmp_path / "here" / "train"
    for folder in (other / "checkpoint-4", here / "checkpoint-2", here / "checkpoint-4"):
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": int(folder.name.split("-")[1])}))
    moved = set_aside_newer_checkpoints(here, other / "checkpoint-4")
    assert moved == [here / "abandoned" / "checkpoint-4"] and (here / "checkpoint-2").is_dir()
