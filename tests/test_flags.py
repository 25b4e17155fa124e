"""train.py's flags and `--config` files: what they read (as on the command line, `none`, `~`, pipes, a run's own
saved config), what they refuse before anything is written, and what `--help` lists. No training runs here."""

from __future__ import annotations

import json

import pytest

from latent_ddpm.errors import UserInputError
from latent_ddpm.flags import parse_train_args


@pytest.mark.parametrize("tracker, check", [("wandb", "is_wandb_available"),
                                            ("tensorboard", "is_tensorboard_available")])
def test_report_to_an_uninstalled_tracker_is_refused(monkeypatch, tracker, check):
    # accelerate only warns and the run tracks nothing, while its config.json says it did.
    import accelerate.utils

    from latent_ddpm.errors import UserInputError
    from latent_ddpm.flags import parse_train_args

    monkeypatch.setattr(accelerate.utils, check, lambda: False)
    with pytest.raises(UserInputError, match=f"--report_to: {tracker} is not installed; pip install {tracker}"):
        parse_train_args(["--report_to", tracker])
    monkeypatch.setattr(accelerate.utils, check, lambda: True)
    assert parse_train_args(["--report_to", tracker]).report_to == tracker


def test_config_file_values_read_as_on_the_command_line(tmp_path):
    # "none" clears an optional setting as `--snr_gamma none` does; a nested model_config is the same JSON.
    from latent_ddpm.flags import parse_train_args

    config = tmp_path / "c.yaml"
    config.write_text("snr_gamma: none\nmax_grad_norm: None\ncheckpoints_total_limit: null\n"
                      "model_config: {dropout: 0.1}\n")
    cfg = parse_train_args(["--config", str(config)])
    assert (cfg.snr_gamma, cfg.max_grad_norm, cfg.checkpoints_total_limit) == (None, None, None)
    assert cfg.model_overrides() == {"dropout": 0.1}


def test_config_file_unquoted_no_says_to_quote_it(tmp_path):
    from latent_ddpm.errors import UserInputError
    from latent_ddpm.flags import parse_train_args

    config = tmp_path / "c.yaml"
    config.write_text("mixed_precision: no\n")  # YAML 1.1: the boolean False
    with pytest.raises(UserInputError, match=r"--mixed_precision: expected str, got False \(YAML reads an unquoted"):
        parse_train_args(["--config", str(config)])
    config.write_text("mixed_precision: 'no'\n")
    assert parse_train_args(["--config", str(config)]).mixed_precision == "no"


def test_config_file_paths_expand_the_home_folder_as_the_shell_does(tmp_path, monkeypatch):
    # `output_dir: ~/runs/x` made a folder named "~" in the current one; `--output_dir ~/runs/x` never did.
    from latent_ddpm.flags import parse_train_args

    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "c.yaml"
    config.write_text("output_dir: ~/runs/x\nresume_from_checkpoint: latest\n")
    cfg = parse_train_args(["--config", str(config)])
    assert (cfg.output_dir, cfg.resume_from_checkpoint) == (str(tmp_path / "runs" / "x"), "latest")
    assert parse_train_args(["--config", str(config), "--output_dir", "~x"]).output_dir == "~x"  # the shell's call


def test_config_file_may_be_a_pipe(tmp_path):
    # `--config <(...)` is a pipe (/dev/fd/N), refused as "does not exist".
    import os

    from latent_ddpm.flags import parse_train_args

    read, write = os.pipe()
    os.write(write, b"preset: tiny\n")
    os.close(write)
    try:
        assert parse_train_args(["--config", f"/dev/fd/{read}"]).preset == "tiny"
    finally:
        os.close(read)


def test_help_lists_each_choice_flags_values():
    from latent_ddpm.config import LR_SCHEDULERS, REPORT_TO
    from latent_ddpm.flags import build_parser

    text = " ".join(build_parser().format_help().split())
    assert f"one of {', '.join(LR_SCHEDULERS)}" in text and f"one of {', '.join(REPORT_TO)}" in text


def test_the_flag_parsing_still_imports_from_config():
    # It moved to latent_ddpm.flags; code importing it from latent_ddpm.config got an ImportError.
    from latent_ddpm import config, flags
    from latent_ddpm.config import parse_train_args

    assert parse_train_args is flags.parse_train_args and config.build_parser is flags.build_parser
    with pytest.raises(AttributeError):
        config.no_such_name  # noqa: B018


def test_a_saved_config_of_a_constant_lr_run_reads_back(tmp_path):
    # train/config.json holds the resolved --lr_warmup_steps (the default 200) also for --lr_scheduler constant:
    # fed back with --config it was refused as a warm-up "given" with constant. A value given is still refused.
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(parse_train_args(["--lr_scheduler", "constant"]).to_dict()))
    assert parse_train_args(["--config", str(saved)]).lr_scheduler == "constant"
    for argv in (["--config", str(saved), "--lr_warmup_steps", "200"], ["--lr_scheduler", "constant",
                                                                         "--lr_warmup_steps", "7"]):
        with pytest.raises(UserInputError, match="--lr_scheduler constant has no warm-up"):
            parse_train_args(argv)


def test_the_originals_beta_flags_reach_the_config():
    # --lbeta/--ubeta are the original's names for --beta_start/--beta_end. test_train.py's run of the original's
    # flags passes their default values (0.0001, 0.02), so a mapping that dropped them passed it.
    cfg = parse_train_args(["--lbeta", "0.0003", "--ubeta", "0.05"])
    assert (cfg.beta_start, cfg.beta_end) == (0.0003, 0.05)
    saved = cfg.to_dict()  # what train/config.json holds
    assert (saved["beta_start"], saved["beta_end"]) == (0.0003, 0.05)
