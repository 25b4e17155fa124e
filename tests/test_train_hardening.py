"""train.py hardening: bit-identical resumes across previews, complete loss history, the resumed run's own
optimizer/EMA flags, all-damaged checkpoints, flag validation, tiny data sets, --overwrite_output_dir, --dry_run
conflicts, the logged learning rate, fp16 on CPU and --help. Checkpoint writing itself (rotation, a crash's
leftovers, another rank's failure) is in test_checkpoint_saving.py.

Training runs are real processes forked from `tests/_forkserver.py` (train.py imported once: fast starts, one
thread, so the float arithmetic of every run is the same).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import ForkServerClient
from PIL import Image
from safetensors.torch import load_file

from latent_ddpm.checkpointing import checkpoint_problem, list_checkpoints
from latent_ddpm.demo import make_demo_latents

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
BOUND_S = 300  # the longest one run may take on a busy machine before the test fails (a bound, not a timing)

# Tiny and fast: the tiny preset, 8x8 latents, one preview sample, no quality figures, no epoch previews.
FAST = ["--preset", "tiny", "--num_eval_samples", "0", "--num_preview_samples", "1", "--preview_inference_steps", "1",
        "--save_images_epochs", "0"]
STEP_LOG = re.compile(r"INFO step (\d+)/\d+ .*?\blr=(\S+)")


@dataclass
class Result:
    code: int
    out: str  # stdout: train.py logs there
    err: str


class ForkServer(ForkServerClient):
    """The fork server client, with a run-to-completion call."""

    def run(self, argv: list, log: Path, env: dict | None = None) -> Result:
        pid = self._ask({"cmd": "start", "argv": [str(a) for a in argv], "out": str(log),
                         "err": str(log.with_suffix(".err")), "env": env or {}, "fsize": None})["pid"]
        status = self._ask({"cmd": "wait", "pid": pid, "timeout": BOUND_S})["status"]
        assert status is not None, f"run did not finish in {BOUND_S}s: {log.read_text()[-2000:]}"
        return Result(status, log.read_text(), log.with_suffix(".err").read_text())


@pytest.fixture(scope="module")
def fork():
    server = ForkServer()
    yield server
    server.close()


@pytest.fixture
def train(fork, tmp_path):
    """train(*argv, env=...) -> Result: one train.py process (through run_cli: errors are one line, exit 2)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    count = iter(range(1000))

    def run(*argv, env: dict | None = None) -> Result:
        return fork.run(list(argv), logs / f"run{next(count)}.txt", env=env)

    return run


def ok(result: Result, code: int = 0) -> Result:
    assert result.code == code, (result.code, result.err[-3000:], result.out[-2000:])
    return result


def tensors_equal(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} of {len(ta)} tensors differ in {a.name}, e.g. {different[:3]}"


def logged_lrs(log: str) -> dict[int, float]:
    return {int(step): float(lr) for step, lr in STEP_LOG.findall(log)}


def state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def npz(path: Path, n: int) -> Path:
    x, y = make_demo_latents(num_samples=n, seed=0, size=8)
    np.savez(path, X=x, y=y)
    return path


@pytest.fixture(scope="module")
def finished(fork, data, tmp_path_factory) -> Path:
    """A finished 2-step run (pipeline, metrics.json, checkpoint-2): not to be modified; copy it first."""
    folder = tmp_path_factory.mktemp("finished")
    out = folder / "run"
    ok(fork.run(["--latent", data, "--max_train_steps", "2", "--train_batch_size", "16", *FAST, "--output_dir", out],
                folder / "log.txt"))
    assert (out / "pipeline").is_dir() and (out / "train/metrics.json").is_file()
    return out


# 1 and 2: resumes are the uninterrupted run (64 samples / batch 16 = 4 steps per epoch).

def test_resume_at_an_epoch_end_with_previews_and_dropout_is_bit_identical(train, data, tmp_path):
    # The checkpoint at step 4 ends epoch 1, whose preview the uninterrupted run samples after it and the resumed
    # one on resuming (it was never written: the crash came between the two): the preview (and the pipeline copy
    # it builds) must leave the global RNG (dropout's) alone.
    args = ["--latent", data, *FAST, "--train_batch_size", "16", "--model_config", '{"dropout": 0.1}',
            "--max_train_steps", "8", "--checkpointing_steps", "4", "--save_images_epochs", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    ok(train(*args, "--output_dir", a))
    assert (a / "train/samples_epoch_1.png").is_file()  # the preview did run in the uninterrupted run
    ok(train(*args, "--output_dir", b, env={"LATENT_DDPM_EXIT_AFTER_CHECKPOINT": "4"}), 3)
    assert (b / "train/checkpoint-4/COMPLETE").is_file() and not (b / "train/samples_epoch_1.png").exists()
    resumed = ok(train(*args, "--output_dir", b, "--resume_from_checkpoint", "latest"))
    assert f"resumed from {b / 'train/checkpoint-4'} at step 4" in resumed.out
    for name in ("model.safetensors", "ema.safetensors"):
        tensors_equal(a / "train/checkpoint-8" / name, b / "train/checkpoint-8" / name)
    grid = "train/samples_epoch_1.png"
    assert np.array_equal(np.asarray(Image.open(a / grid)), np.asarray(Image.open(b / grid)))


def test_loss_history_is_complete_after_a_mid_epoch_resume(train, data, tmp_path):
    # --logging_steps stays at its default (50): the history must not depend on logging having happened.
    args = ["--latent", data, *FAST, "--train_batch_size", "16", "--model_config", '{"dropout": 0.1}',
            "--max_train_steps", "8", "--checkpointing_steps", "3"]
    a, b = tmp_path / "a", tmp_path / "b"
    ok(train(*args, "--output_dir", a))
    ok(train(*args, "--output_dir", b, env={"LATENT_DDPM_EXIT_AFTER_CHECKPOINT": "3"}), 3)
    assert state(b / "train/checkpoint-3")["history"]["steps"] == [1, 2, 3]
    ok(train(*args, "--output_dir", b, "--resume_from_checkpoint", "latest"))
    ha, hb = state(a / "train/checkpoint-8")["history"], state(b / "train/checkpoint-8")["history"]
    assert ha["steps"] == list(range(1, 9)) and len(ha["losses"]) == 8 and ha["epoch_ends"] == [4, 8]
    for key in ("steps", "losses", "epoch_ends", "epoch_means"):
        assert ha[key] == hb[key], key
    assert ha["epoch_means"] == pytest.approx([np.mean(ha["losses"][:4]), np.mean(ha["losses"][4:])])


# 3: a resumed run uses this run's optimizer and EMA flags.

def test_resumed_run_uses_this_runs_optimizer_and_ema_flags(train, data, tmp_path):
    out = tmp_path / "run"
    base = ["--latent", data, *FAST, "--train_batch_size", "16", "--lr_warmup_steps", "0", "--logging_steps", "1",
            "--output_dir", out]
    first = ok(train(*base, "--max_train_steps", "4", "--learning_rate", "1e-3"))
    assert all(lr == pytest.approx(1e-3) for lr in logged_lrs(first.out).values())
    new = ["--learning_rate", "1e-5", "--adam_weight_decay", "0.5", "--ema_decay", "0.5"]
    resumed = ok(train(*base, "--max_train_steps", "6", *new, "--resume_from_checkpoint", "latest"))
    changed = [line for line in resumed.out.splitlines() if "resumed with this run's settings" in line]
    assert len(changed) == 1, resumed.out[-3000:]
    for change in ("learning_rate 0.001 -> 1e-05", "weight_decay 0.01 -> 0.5", "ema_decay 0.9999 -> 0.5"):
        assert change in changed[0], changed[0]
    lrs = logged_lrs(resumed.out)
    assert sorted(lrs) == [5, 6], resumed.out[-3000:]
    assert lrs[5] == pytest.approx(1e-5) and lrs[6] == pytest.approx(1e-5), lrs
    ckpt = out / "train/checkpoint-6"
    assert state(ckpt)["lr_scheduler"]["base_lrs"] == pytest.approx([1e-5])
    groups = torch.load(ckpt / "optimizer.bin", weights_only=True)["param_groups"]
    assert all(g["lr"] == pytest.approx(1e-5) and g["weight_decay"] == 0.5 for g in groups)
    assert state(ckpt)["ema"]["decay"] == 0.5
    # The same flags again: nothing to report.
    again = ok(train(*base, "--max_train_steps", "7", *new, "--resume_from_checkpoint", "latest"))
    assert f"resumed from {ckpt} at step 6" in again.out
    assert "resumed with this run's settings" not in again.out
    assert logged_lrs(again.out) == {7: pytest.approx(1e-5)}


# 4: damaged checkpoints (5, rotation, is in test_checkpoint_saving.py).

def test_every_checkpoint_damaged_starts_over_and_sets_them_aside(train, data, tmp_path):
    out = tmp_path / "run"
    train_dir = out / "train"
    args = ["--latent", data, *FAST, "--train_batch_size", "16", "--checkpointing_steps", "4",
            "--checkpoints_total_limit", "2", "--max_train_steps", "12", "--output_dir", out]
    ok(train(*args))
    assert [s for s, _ in list_checkpoints(train_dir)] == [8, 12]
    for step in (8, 12):
        model = train_dir / f"checkpoint-{step}/model.safetensors"
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    shutil.rmtree(out / "pipeline")  # a run that crashed: a finished one's pipeline/ is not replaced (refused)
    resumed = ok(train(*args, "--resume_from_checkpoint", "latest", env={"LATENT_DDPM_EXIT_AFTER_CHECKPOINT": "4"}), 3)
    assert "\nwarning: skipping damaged checkpoint" in "\n" + resumed.err and "no complete checkpoint" in resumed.out
    assert "UserWarning" not in resumed.err  # one line each, without train.py's source line
    assert checkpoint_problem(train_dir / "checkpoint-4") is None  # written, complete, and not rotated away
    assert state(train_dir / "checkpoint-4")["global_step"] == 4
    assert sorted(p.name for p in train_dir.glob("checkpoint-*")) == ["checkpoint-4"]
    assert sorted(p.name for p in (train_dir / "abandoned").iterdir()) == ["checkpoint-12", "checkpoint-8"]



# 6: flags checked before anything is written.

@pytest.mark.parametrize("case", ["timesteps", "timesteps_max", "eval", "eval_max", "preview_max", "snr_floor", "seed",
                                  "ddp_timeout", "output_dir", "train_data", "classes", "channels"])
def test_bad_flags_exit_2_with_one_line_before_writing(train, data, tmp_path, case):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "run"
    flag, extra = {
        "timesteps": ("--preview_inference_steps", ["--num_train_timesteps", "20", "--preview_inference_steps", "25"]),
        "timesteps_max": ("--num_train_timesteps", ["--num_train_timesteps", "10000000000"]),  # was a 40 GB alloc
        "eval": ("--num_eval_samples", ["--num_eval_samples", "3"]),
        # Set by the data: trained unconditional, saved with 10 classes; or silently replaced.
        "classes": ("--model_config", ["--model_config", '{"num_class_embeds": 10}']),
        "channels": ("--model_config", ["--model_config", '{"in_channels": 3, "sample_size": 8}']),
        # Sampled after training, in memory: 1e8 ran the whole training, then exhausted the memory.
        "eval_max": ("--num_eval_samples", ["--num_eval_samples", "100000000"]),
        "preview_max": ("--num_preview_samples", ["--num_preview_samples", "257"]),
        "snr_floor": ("--snr_floor", ["--snr_gamma", "5", "--snr_floor", "5.5"]),  # above the cap: no floor left
        "seed": ("--seed", ["--seed", "4294967296"]),
        "ddp_timeout": ("--ddp_timeout", ["--ddp_timeout", "100000000000000000"]),
        "output_dir": ("--output_dir", ["--resume_from_checkpoint", "latest"]),
        "train_data": ("--train_data", ["--train_data", str(work / ("x" * 300 + ".npz"))]),
    }[case]
    if case == "output_dir":
        out = work / ("d" * 300)
    result = train("--latent", data, *FAST, "--max_train_steps", "2", "--output_dir", out, *extra)
    lines = result.err.strip().splitlines()
    assert result.code == 2, result.err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], lines
    assert "Traceback" not in result.err
    assert list(work.iterdir()) == []  # nothing written


@pytest.mark.parametrize("flags", [["--num_eval_samples", "0"], ["--num_eval_samples", "4"],
                                   ["--num_eval_samples", "50000", "--num_preview_samples", "256"],
                                   ["--snr_gamma", "5", "--snr_floor", "5"], ["--snr_gamma", "0", "--snr_floor", "9"]])
def test_bounds_are_inclusive(train, data, tmp_path, flags):
    result = ok(train("--latent", data, *FAST, *flags, "--dry_run", "--output_dir", tmp_path / "run"))
    assert "dry run, nothing written" in result.out and not (tmp_path / "run").exists()


# 7: tiny data sets train to the end.

def test_seven_samples_give_an_evaluation_without_baseline(train, tmp_path):
    out = tmp_path / "run"
    ok(train("--latent", npz(tmp_path / "seven.npz", 7), *FAST, "--train_batch_size", "1", "--num_eval_samples", "16",
             "--max_train_steps", "2", "--output_dir", out))
    metrics = json.loads((out / "train/metrics.json").read_text())
    assert "evaluation" in metrics and "baseline" not in metrics["evaluation"], metrics.get("evaluation")
    assert "fd" in metrics["evaluation"]


def test_three_samples_leave_the_quality_figures_out(train, tmp_path):
    out = tmp_path / "run"
    result = ok(train("--latent", npz(tmp_path / "three.npz", 3), *FAST, "--train_batch_size", "1",
                      "--num_eval_samples", "16", "--max_train_steps", "2", "--output_dir", out))
    assert "too few for the quality figures" in result.err
    metrics = json.loads((out / "train/metrics.json").read_text())
    assert "evaluation" not in metrics and (out / "pipeline/model_index.json").is_file()


# 8 and 9: --overwrite_output_dir and --dry_run in a folder that holds a run.

def test_overwrite_output_dir_deletes_the_old_runs_outputs_first(train, data, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("mine")
    (out / "train/model.pth").write_bytes(b"original project weights")
    result = train("--latent", data, *FAST, "--train_batch_size", "16", "--max_train_steps", "4",
                   "--checkpointing_steps", "1", "--output_dir", out, "--overwrite_output_dir",
                   env={"LATENT_DDPM_EXIT_AFTER_CHECKPOINT": "1"})
    ok(result, 3)
    assert not (out / "pipeline").exists() and not (out / "train/metrics.json").exists()
    assert not (out / "train/samples.png").exists() and not (out / "train/checkpoint-2").exists()
    assert (out / "train/checkpoint-1/COMPLETE").is_file()
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "train/model.pth").read_bytes() == b"original project weights"


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


def test_dry_run_refuses_a_folder_that_holds_a_run(train, data, finished, tmp_path):
    original = tmp_path / "original"
    (original / "train").mkdir(parents=True)
    (original / "train/model.pth").write_bytes(b"original project weights")
    for folder, message in ((finished, "already holds a run"), (original, "original project")):
        before = _tree(folder)
        args = ["--latent", data, *FAST, "--dry_run", "--output_dir", folder]
        refused = train(*args)
        lines = refused.err.strip().splitlines()
        assert refused.code == 2 and len(lines) == 1 and message in lines[0], refused.err[-2000:]
        allowed = ok(train(*args, "--overwrite_output_dir"))
        assert "dry run, nothing written" in allowed.out
        assert _tree(folder) == before  # a dry run writes (and deletes) nothing


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_dry_run_refuses_an_output_dir_the_run_would_refuse(train, data, tmp_path, where):
    (tmp_path / "a_file").write_text("mine")
    out = tmp_path / "a_file" if where == "file" else tmp_path / "a_file" / "run"
    refused = train("--latent", data, *FAST, "--dry_run", "--output_dir", out)
    lines = refused.err.strip().splitlines()
    assert refused.code == 2 and len(lines) == 1, refused.err[-2000:]
    assert f"--output_dir {out}: {tmp_path / 'a_file'} is a file, not a folder" in lines[0], lines
    assert (tmp_path / "a_file").read_text() == "mine"


def test_a_short_schedules_warning_is_logged_and_a_refusal_is_still_one_line(train, data, tmp_path):
    # The original's --n_steps 50 ends far from noise: said in the log; rerun into that run folder, the refusal
    # was preceded on stderr by the two lines of a UserWarning.
    args = ["--latent", data, *FAST, "--n_steps", "50", "--max_train_steps", "2", "--output_dir", tmp_path / "run"]
    first = ok(train(*args))
    assert "the noise schedule ends with alpha_bar_T" in first.out
    refused = train(*args)
    lines = refused.err.strip().splitlines()
    assert refused.code == 2 and len(lines) == 1 and "already holds a run" in lines[0], refused.err[-2000:]


# 10 and 11: the logged learning rate; fp16 on CPU.

def test_logged_lr_is_the_rate_the_step_used(train, data, tmp_path):
    result = ok(train("--latent", data, *FAST, "--train_batch_size", "16", "--lr_warmup_steps", "4",
                      "--logging_steps", "1", "--max_train_steps", "2", "--learning_rate", "2e-3", "--output_dir",
                      tmp_path / "run"))
    lrs = logged_lrs(result.out)
    # constant_with_warmup: factor step/4 for the step with index `step` (0 first).
    assert lrs == {1: 0.0, 2: pytest.approx(2e-3 / 4)}, result.out[-2000:]


def test_fp16_on_cpu_warns_that_it_trains_in_float32(train, data, tmp_path):
    result = ok(train("--latent", data, *FAST, "--mixed_precision", "fp16", "--dry_run", "--output_dir",
                      tmp_path / "run"))
    assert "fp16" in result.out and "trains in float32" in result.out, result.out[-2000:]


# 12: --help.

def test_help_lists_the_no_switches(train):
    result = ok(train("--help"))
    assert "--no_use_ema" in result.out and "--no_allow_tf32" in result.out
    assert "--no_data_in_memory" in result.out  # its default, None, means "when it fits": it was hidden
    assert "(default: when it fits) (default: None)" not in " ".join(result.out.split())
