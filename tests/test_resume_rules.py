"""The rules of a resume (`latent_ddpm.resume.check_resume_compatible`) on checkpoints that hold only their trainer
state: which settings must match (objective, class conditioning, class ids, seed), which may change together (the
batch layout, when the global batch stays), and what the refusal names. No training runs here; the end-to-end
resumes are in test_train_resume.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latent_ddpm.errors import UserInputError


def test_a_long_list_of_class_ids_is_shortened_in_the_message(tmp_path):
    from latent_ddpm.resume import check_resume_compatible

    ckpt = _checkpoint_with_settings(tmp_path / "checkpoint-2", {"class_ids": list(range(100))})
    with pytest.raises(UserInputError, match=r"class_ids=\[0, 1, .*, 9, \.\.\. \(100 ids\)\] there vs "
                                             r"\[0, 1, .*, 9, \.\.\. \(99 ids\)\] now"):
        check_resume_compatible(ckpt, {}, {"class_ids": list(range(99))})


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
    from latent_ddpm.config import TrainConfig
    from latent_ddpm.resume import check_resume_compatible, objective_settings

    ckpt = _checkpoint_with_settings(tmp_path / "checkpoint-2", objective_settings(TrainConfig(**{field: saved})))
    with pytest.raises(UserInputError) as err:
        check_resume_compatible(ckpt, {}, objective_settings(TrainConfig(**{field: now})))
    message = str(err.value)
    assert len(message.splitlines()) == 1 and f"{field}={saved} there vs {now} now" in message, message
    if field == "prediction_type":  # not also "snr_floor=0.02 there vs None now", which the user did not touch
        assert "snr_floor" not in message, message


def test_a_refusal_names_a_setting_the_user_set_to_or_from_none_beside_another(tmp_path):
    from latent_ddpm.config import TrainConfig
    from latent_ddpm.resume import check_resume_compatible, objective_settings

    ckpt = _checkpoint_with_settings(tmp_path / "checkpoint-2", {"seed": 0, **objective_settings(TrainConfig())})
    with pytest.raises(UserInputError) as err:
        check_resume_compatible(ckpt, {}, {"seed": 1, **objective_settings(TrainConfig(scaling_factor=0.18215))})
    message = str(err.value)
    assert "scaling_factor=None there vs 0.18215 now" in message and "seed=0 there vs 1 now" in message, message
    assert "normalization" not in message, message  # inert under a fixed scale: not the user's change


def test_resume_with_the_same_objective_is_allowed(tmp_path):
    from latent_ddpm.config import TrainConfig
    from latent_ddpm.resume import OBJECTIVE_SETTINGS, check_resume_compatible, objective_settings

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


def test_resume_with_class_conditioning_toggled_names_it(tmp_path):
    # It was reported as "cond_drop_prob=None there vs 0.1 now", a setting the user had not touched.
    from latent_ddpm.config import TrainConfig
    from latent_ddpm.resume import check_resume_compatible, objective_settings

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({
        "global_step": 2, "run_settings": objective_settings(TrainConfig()),
        "model_config": {"in_channels": 4, "num_class_embeds": None}}))
    with pytest.raises(UserInputError, match="^--class_conditional: .* was trained without class conditioning"):
        check_resume_compatible(folder, {"in_channels": 4, "num_class_embeds": 3},
                                objective_settings(TrainConfig(class_conditional=True)))


def test_a_resume_may_change_the_batch_layout_when_the_global_batch_stays(tmp_path):
    from latent_ddpm.resume import check_resume_compatible

    saved = {"world_size": 2, "train_batch_size": 4, "gradient_accumulation_steps": 1, "seed": 0}
    ckpt = _checkpoint_with_settings(tmp_path / "checkpoint-2", saved)
    assert check_resume_compatible(ckpt, {}, saved) is None
    for now in ({"world_size": 1, "train_batch_size": 8}, {"world_size": 1, "gradient_accumulation_steps": 2},
                {"world_size": 4, "train_batch_size": 2}):
        note = check_resume_compatible(ckpt, {}, {**saved, **now})
        assert "same global batch of 8" in note and "not bit-identical" in note, now
    with pytest.raises(UserInputError, match=r"world_size=2 there vs 1 now\); resume with the same ones \(the "
                                             r"processes, .* the global batch, 8 there, stays the same\)"):
        check_resume_compatible(ckpt, {}, {**saved, "world_size": 1})
    with pytest.raises(UserInputError, match="seed=0 there vs 1 now"):  # another setting beside the layout
        check_resume_compatible(ckpt, {}, {**saved, "world_size": 1, "train_batch_size": 8, "seed": 1})
