"""End-to-end tests of train.py: tiny models on tiny demo latents, CPU, fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from safetensors.torch import load_file

from latent_ddpm import LatentDDPMPipeline
from latent_ddpm.config import parse_train_args
from latent_ddpm.demo import make_demo_latents
from latent_ddpm.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (the script; its main(argv) is called in-process)

# Small and fast: the tiny preset, 8x8 latents, no preview sampling unless a test asks.
FAST = ["--preset", "tiny", "--train_batch_size", "8", "--num_eval_samples", "0", "--num_preview_samples", "2",
        "--preview_inference_steps", "2", "--logging_steps", "1", "--save_images_epochs", "0"]


def run(argv: list[str]) -> int:
    """train.main in this process, with accelerate's process-wide state reset around it."""
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    try:
        return train.main(argv)
    finally:
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def test_training_writes_the_run_and_lowers_the_loss(data, tmp_path):
    out = tmp_path / "run"
    assert run(["--latent", str(data), "--max_train_steps", "80", "--output_dir", str(out), "--lr_warmup_steps", "5",
                "--checkpointing_steps", "40", *FAST, "--train_batch_size", "32", "--num_eval_samples", "8",
                "--num_preview_samples", "4"]) == 0
    train_dir = out / "train"
    for name in ("config.json", "latent_stats.json", "loss_curve.png", "samples.png", "metrics.json"):
        assert (train_dir / name).is_file(), name
    saved = json.loads((train_dir / "config.json").read_text())
    assert saved["learning_rate"] == 2e-3  # resolved, not null; so are the two below
    assert saved["mixed_precision"] == "no" and saved["data_in_memory"] is True
    assert sorted(p.name for p in train_dir.glob("checkpoint-*")) == ["checkpoint-40", "checkpoint-80"]
    state = json.loads((train_dir / "checkpoint-80" / "trainer_state.json").read_text())
    losses = state["history"]["losses"]
    assert len(losses) == 80 and np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    metrics = json.loads((train_dir / "metrics.json").read_text())
    assert "evaluation" in metrics and metrics["skipped_steps"] == 0
    pipe = LatentDDPMPipeline.from_pretrained(out / "pipeline")
    stats = json.loads((train_dir / "latent_stats.json").read_text())
    assert pipe.config.latents_mean == pytest.approx(stats["mean"]) and pipe.config.latents_std == pytest.approx(
        stats["std"])
    assert pipe.scheduler.config.prediction_type == "v_prediction" and not pipe.scheduler.config.clip_sample


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


def test_original_flags_and_default_run_folder(data, tmp_path):
    # --latent/--n_steps/--lbeta/--ubeta/--epochs/--batch_size/--lr/--seed/--n_dim, run from tmp_path.
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--mode", "train", "--latent", str(data), "--n_steps", "100",
         "--lbeta", "0.0001", "--ubeta", "0.02", "--epochs", "1", "--batch_size", "16", "--lr", "1e-3",
         "--seed", "7", "--n_dim", "4", *FAST[:2], "--num_eval_samples", "0", "--num_preview_samples", "2",
         "--preview_inference_steps", "2"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "runs" / "demo8_ddpm_4_100_0.0001_0.02"
    cfg = json.loads((run_dir / "train" / "config.json").read_text())
    assert (cfg["num_train_timesteps"], cfg["num_epochs"], cfg["train_batch_size"], cfg["learning_rate"],
            cfg["seed"]) == (100, 1, 16, 1e-3, 7)
    assert (run_dir / "train" / "checkpoint-4").is_dir()  # 64 samples / 16 = 4 steps in the one epoch


@pytest.mark.parametrize("argv, rate", [
    ([], 1e-3),  # the seed preset (256 wide): diverged at 2e-3 on the demo latents
    (["--preset", "tiny"], 2e-3), (["--preset", "small"], 2e-3), (["--preset", "large"], 5e-4),
    (["--preset", "small", "--model_config", '{"down_channels": [32, 64, 512], "mid_channels": [512, 64]}'], 5e-4),
    (["--preset", "large", "--lr", "1e-4"], 1e-4), (["--learning_rate", "none"], 1e-3),
    # widths the model's own validation refuses later: the reference rate, not a confusing --learning_rate error
    (["--model_config", '{"down_channels": [-8, -8], "mid_channels": [-8, -8]}'], 2e-3),
    (["--model_config", '{"down_channels": "wide"}'], 2e-3),
])
def test_default_learning_rate_follows_the_model_width(argv, rate):
    assert parse_train_args(argv).learning_rate == pytest.approx(rate)


def test_config_file_with_flag_override(data, tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"train_data: {data}\nmax_train_steps: 3\nlearning_rate: 0.0005\npreset: tiny\n")
    out = tmp_path / "run"
    assert run(["--config", str(cfg_file), "--learning_rate", "0.001", "--output_dir", str(out), *FAST]) == 0
    saved = json.loads((out / "train" / "config.json").read_text())
    assert saved["max_train_steps"] == 3 and saved["learning_rate"] == 0.001 and saved["train_data"] == str(data)


def test_dry_run_writes_nothing(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["--latent", str(data), "--output_dir", str(out), "--dry_run", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "dry run" in printed and "peak learning rate 0.002;" in printed and not out.exists()


@pytest.mark.parametrize("extra", [
    ["--prediction_type", "epsilon", "--beta_schedule", "scaled_linear"],
    ["--prediction_type", "sample", "--beta_schedule", "squaredcos_cap_v2", "--snr_gamma", "none"],
    ["--mixed_precision", "bf16", "--channels_last", "--gradient_checkpointing"],
    ["--no_use_ema", "--lr_scheduler", "cosine", "--max_grad_norm", "0"],
    ["--normalization", "global", "--random_flip"],
    ["--normalization", "none", "--report_to", "none"],
    ["--scaling_factor", "0.18215", "--class_conditional", "--cond_drop_prob", "0.2"],
    ["--report_to", "tensorboard", "--save_images_epochs", "1", "--train_batch_size", "32"],
])
def test_switches_train_end_to_end(data, tmp_path, extra):
    out = tmp_path / "run"
    assert run(["--latent", str(data), "--max_train_steps", "3", "--output_dir", str(out), *FAST, *extra]) == 0
    pipe = LatentDDPMPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    kw = {"class_labels": [0, 1], "guidance_scale": 2.0} if "--class_conditional" in extra else {}
    sample = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kw).latents
    assert sample.shape == (2, 4, 8, 8) and np.isfinite(sample).all()


def test_tensorboard_logs_and_epoch_previews(data, tmp_path):
    out = tmp_path / "run"
    assert run(["--latent", str(data), "--max_train_steps", "4", "--output_dir", str(out), *FAST,
                "--train_batch_size", "32", "--report_to", "tensorboard", "--save_images_epochs", "1"]) == 0
    # 64 samples / 32 = 2 steps per epoch: previews after epoch 1 (not after the last, the final grid covers it)
    assert (out / "train" / "samples_epoch_1.png").is_file() and not (out / "train" / "samples_epoch_2.png").exists()
    assert list(out.rglob("events.out.tfevents.*"))


def test_compile_switch(data, tmp_path):
    out = tmp_path / "run"
    assert run(["--latent", str(data), "--max_train_steps", "2", "--output_dir", str(out), *FAST, "--compile"]) == 0
    assert (out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_non_finite_losses_are_skipped_then_stop(data, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train.training_target

    def poisoned(scheduler, x0, noise, t):  # steps 3 and onwards get a NaN target
        calls["n"] += 1
        target = real(scheduler, x0, noise, t)
        return target * float("nan") if calls["n"] >= 3 else target

    monkeypatch.setattr(train, "training_target", poisoned)
    out = tmp_path / "run"
    with pytest.raises(UserInputError, match="3 non-finite losses in a row"):
        run(["--latent", str(data), "--max_train_steps", "20", "--output_dir", str(out), *FAST,
             "--checkpointing_steps", "2", "--max_nonfinite_steps", "3"])
    ckpt = out / "train" / "checkpoint-2"
    assert (ckpt / "COMPLETE").exists() and not (out / "train" / "checkpoint-4").exists()


def test_skipped_step_leaves_parameters_and_ema_untouched(data, tmp_path, monkeypatch):
    real = train.training_target
    calls = {"n": 0}

    def poisoned(scheduler, x0, noise, t):  # only step 3 is poisoned
        calls["n"] += 1
        target = real(scheduler, x0, noise, t)
        return target * float("inf") if calls["n"] == 3 else target

    monkeypatch.setattr(train, "training_target", poisoned)
    out = tmp_path / "run"
    assert run(["--latent", str(data), "--max_train_steps", "3", "--checkpointing_steps", "2", "--output_dir",
                str(out), *FAST]) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        two, three = load_file(out / f"train/checkpoint-2/{name}"), load_file(out / f"train/checkpoint-3/{name}")
        assert all(torch.equal(two[k], three[k]) for k in two), name
    assert json.loads((out / "train/metrics.json").read_text())["skipped_steps"] == 1


@pytest.mark.parametrize("args, message", [
    (["--learning_rate", "-1"], "--learning_rate: must be > 0"),
    (["--beta_start", "0.02", "--beta_end", "0.01"], "--beta_end: must be larger than --beta_start"),
    (["--num_train_timesteps", "0"], "--num_train_timesteps: must be >= 2"),
    (["--prediction_type", "noise"], "--prediction_type: 'noise' is not one of"),
    (["--bogus_flag"], "unrecognized arguments: --bogus_flag"),
    (["--n_dim", "3"], "--n_dim 3 does not match the data"),
    (["--model_config", "{not json"], "--model_config: invalid JSON"),
    (["--model_config", '{"down_channels": [8, 16]}'], "mid_channels[0]"),
    (["--config", "/nonexistent.yaml"], "--config: /nonexistent.yaml does not exist"),
    (["--seed", "-1"], "--seed: must be in 0..4294967295"),
    (["--train_batch_size", "none"], "invalid int value: 'none'"),
    (["--model_config", '{"norm_num_groups": 0}'], "norm_num_groups must be >= 1"),
])
def test_bad_flags_exit_2_with_one_line(data, tmp_path, args, message):
    result = cli("--latent", str(data), "--output_dir", str(tmp_path / "run"), *FAST, *args)
    assert result.returncode == 2, result.stderr[-1000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_short_schedule_warns(data, tmp_path):
    result = cli("--latent", str(data), "--n_steps", "50", "--dry_run", *FAST)
    assert result.returncode == 0 and "keeps 60% of the signal" in result.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="gloo 2-process run tested on Linux")
def test_two_process_run_and_resume(data, tmp_path):
    def torchrun(*args, env=None):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})})

    args = ["--latent", str(data), "--max_train_steps", "6", "--checkpointing_steps", "3", *FAST,
            "--train_batch_size", "4"]
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


def test_push_to_hub_uploads_final_pipeline_and_checkpoints(data, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi

    uploads: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        names = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        uploads.append({"repo_id": repo_id, "files": names, "message": kwargs.get("commit_message")})
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/1", commit_message="",
                                          commit_description="", oid="1", pr_url=None)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "run"
    assert run(["--latent", str(data), "--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir",
                str(out), *FAST, "--push_to_hub", "--hub_model_id", "me/demo", "--hub_token", "hf_x",
                "--push_checkpoints"]) == 0
    assert [u["message"] for u in uploads] == ["checkpoint checkpoint-2", "checkpoint checkpoint-4",
                                               "Upload LatentDDPMPipeline"]
    final = uploads[-1]["files"]
    assert "README.md" in final and "unet/diffusion_pytorch_model.safetensors" in final
    assert "loss_curve.png" in final or any(f.endswith("loss_curve.png") for f in final)
    assert "hf_x" not in (out / "train" / "config.json").read_text()


def test_push_to_hub_without_token_fails_before_training(data, tmp_path, monkeypatch):
    import huggingface_hub

    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "run"
    with pytest.raises(UserInputError, match="no Hugging Face token"):
        run(["--latent", str(data), "--max_train_steps", "2", "--output_dir", str(out), *FAST, "--push_to_hub",
             "--hub_model_id", "me/demo"])
    assert not out.exists()


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
    with pytest.raises(UserInputError, match="train_batch_size=8 there vs 4 now"):
        run(["--latent", str(data), "--max_train_steps", "4", "--output_dir", str(out), *FAST,
             "--train_batch_size", "4", "--resume_from_checkpoint", "latest"])


def _checkpoint_with_settings(folder: Path, run_settings: dict) -> Path:
    """A checkpoint folder holding only the trainer state that `check_resume_compatible` reads."""
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2, "run_settings": run_settings}))
    return folder


@pytest.mark.parametrize("field, saved, now", [("snr_floor", 0.02, 0.0), ("snr_floor", 0.0, 0.02),
                                               ("prediction_type", "v_prediction", "epsilon"),
                                               ("snr_gamma", None, 5.0),
                                               ("beta_schedule", "linear", "squaredcos_cap_v2"),
                                               ("num_train_timesteps", 1000, 100), ("beta_end", 0.02, 0.012),
                                               ("normalization", "channel", "global"),
                                               ("scaling_factor", None, 0.18215)])
def test_resume_with_another_objective_is_refused(tmp_path, field, saved, now):
    from latent_ddpm.checkpointing import check_resume_compatible, objective_settings
    from latent_ddpm.config import TrainConfig

    ckpt = _checkpoint_with_settings(tmp_path / "checkpoint-2", objective_settings(TrainConfig(**{field: saved})))
    with pytest.raises(UserInputError) as err:
        check_resume_compatible(ckpt, {}, objective_settings(TrainConfig(**{field: now})))
    message = str(err.value)
    assert len(message.splitlines()) == 1 and f"{field}={saved} there vs {now} now" in message, message


def test_resume_with_the_same_objective_is_allowed(tmp_path):
    from latent_ddpm.checkpointing import OBJECTIVE_SETTINGS, check_resume_compatible, objective_settings
    from latent_ddpm.config import TrainConfig

    cfg = TrainConfig(beta_start=1e-4, beta_end=0.012, snr_floor=0.02, snr_gamma=5)
    ckpt = _checkpoint_with_settings(tmp_path / "a" / "checkpoint-2", {"seed": 0, **objective_settings(cfg)})
    check_resume_compatible(ckpt, {}, {"seed": 0, **objective_settings(TrainConfig(**{**vars(cfg),
                                                                                       "snr_gamma": 5.0}))})
    # snr_gamma 0 and None both turn the weighting off: the same objective.
    off = _checkpoint_with_settings(tmp_path / "b" / "checkpoint-2", objective_settings(TrainConfig(snr_gamma=0)))
    check_resume_compatible(off, {}, objective_settings(TrainConfig(snr_gamma=None)))
    # Settings that cannot act are not compared: the floor for epsilon, with the weighting off, or above
    # gamma; the betas of squaredcos_cap_v2; the normalization under a fixed scale; label dropout unlabelled.
    same = [({"prediction_type": "epsilon", "snr_floor": 0.0}, {"prediction_type": "epsilon", "snr_floor": 0.3}),
            ({"snr_gamma": 0, "snr_floor": 0.0}, {"snr_gamma": None, "snr_floor": 0.3}),
            ({"snr_gamma": 5, "snr_floor": 10.0}, {"snr_gamma": 5, "snr_floor": 20.0}),
            ({"beta_schedule": "squaredcos_cap_v2"}, {"beta_schedule": "squaredcos_cap_v2", "beta_end": 0.012}),
            ({"scaling_factor": 0.18215}, {"scaling_factor": 0.18215, "normalization": "global"}),
            ({"cond_drop_prob": 0.1}, {"cond_drop_prob": 0.2})]
    for i, (before, after) in enumerate(same):
        ckpt = _checkpoint_with_settings(tmp_path / f"s{i}" / "checkpoint-2", objective_settings(TrainConfig(**before)))
        check_resume_compatible(ckpt, {}, objective_settings(TrainConfig(**after)))
    # ...but label dropout does act in a class-conditional run.
    cond = _checkpoint_with_settings(tmp_path / "d" / "checkpoint-2",
                                     objective_settings(TrainConfig(class_conditional=True, cond_drop_prob=0.1)))
    with pytest.raises(UserInputError, match="cond_drop_prob=0.1 there vs 0.2 now"):
        check_resume_compatible(cond, {}, objective_settings(TrainConfig(class_conditional=True, cond_drop_prob=0.2)))
    # A checkpoint from before the objective was recorded resumes (nothing to compare against).
    old = _checkpoint_with_settings(tmp_path / "c" / "checkpoint-2", {"seed": 0, "train_batch_size": 8})
    check_resume_compatible(old, {}, {"seed": 0, "train_batch_size": 8,
                                      **objective_settings(TrainConfig(snr_floor=0.5))})
    assert set(OBJECTIVE_SETTINGS) >= {"prediction_type", "snr_gamma", "snr_floor", "num_train_timesteps",
                                       "beta_schedule", "beta_start", "beta_end"}


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


def test_config_file_float_written_without_a_dot(data, tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("learning_rate: 1e-4\nmax_train_steps: 2\n")  # YAML 1.1 reads 1e-4 as a string
    out = tmp_path / "run"
    assert run(["--config", str(cfg_file), "--latent", str(data), "--output_dir", str(out), *FAST]) == 0
    assert json.loads((out / "train" / "config.json").read_text())["learning_rate"] == 1e-4


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


def test_snr_floor_reaches_the_training_loss(data, tmp_path):
    # The same first step (same seed: same batch, noise and timesteps) with and without the floor: the loss differs
    # exactly when train.py passes --snr_floor to the weighting.
    losses = {}
    for floor in ("0", "5"):
        out = tmp_path / f"floor{floor}"
        assert run(["--latent", str(data), "--max_train_steps", "1", "--output_dir", str(out), *FAST,
                    "--snr_floor", floor]) == 0
        state = json.loads((out / "train" / "checkpoint-1" / "trainer_state.json").read_text())
        losses[floor] = state["history"]["losses"][0]
    assert losses["5"] > losses["0"]  # floor = gamma: every weight at its maximum


def test_divergence_watch_warns_once_on_a_loss_that_jumps_and_stays_up():
    from latent_ddpm.reporting import SPIKE_WINDOW, DivergenceWatch

    rng = np.random.default_rng(0)
    healthy = list(0.055 * rng.uniform(0.2, 1.8, 1900))  # single steps vary several-fold; window means ~10%
    losses = [0.5] * 200 + healthy  # high during the warm-up: not a divergence
    watch = DivergenceWatch(warmup_steps=200)
    assert all(watch.update(step, losses[:step]) is None for step in range(50, len(losses) + 1, 50))
    losses += [0.18] * SPIKE_WINDOW  # the seed preset at lr 2e-3 (docs/benchmarks.md)
    losses[-3] = float("nan")  # a skipped step is left out, not averaged
    message = watch.update(len(losses), losses)
    assert message and "x its lowest" in message and "--learning_rate" in message
    assert watch.update(len(losses) + 50, losses + [0.2] * 50) is None  # once


def test_train_py_names_a_divergence_in_the_log(data, tmp_path, capsys, monkeypatch):
    # The wiring: with a factor below 1 every window after the warm-up counts as a divergence, so the warning
    # must appear (once) in a healthy 60-step run; at the real factor it must not.
    from latent_ddpm import reporting

    for factor, expected in ((0.5, 1), (reporting.SPIKE_FACTOR, 0)):
        monkeypatch.setattr(reporting, "SPIKE_FACTOR", factor)
        capsys.readouterr()
        assert run(["--latent", str(data), "--max_train_steps", "60", "--output_dir", str(tmp_path / str(factor)),
                    "--lr_warmup_steps", "5", *FAST]) == 0
        assert capsys.readouterr().out.count("training has likely diverged") == expected  # train.py logs to stdout
