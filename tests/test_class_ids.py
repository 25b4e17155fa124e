"""Class ids that are not 0..K-1 (labels {3, 7, 100}): train.py records the ids in its data in the pipeline
(`class_ids`), its previews and metrics.json's evaluation cycle through them, sample.py's `--class_labels all`
gives them and refuses any other id, and so does the pipeline's `class_labels`. A pipeline saved before the ids
were recorded loads with every id in 0..num_class_embeds-1, as before."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from _helpers import (
    SAMPLE_FAST,
    TRAIN_FAST,
    load_npz,
    no_outputs,
    one_error_line,
    run_sample,
    run_train,
    save_tiny_pipelines,
)

from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline, default_scheduler, reporting
from latent_ddpm.hub import prepare_upload_folder

SPARSE = [3, 7, 100]


def tiny_pipe(num_class_embeds: int | None = 101, class_ids=SPARSE) -> LatentDDPMPipeline:
    torch.manual_seed(0)
    unet = AdvancedUNet2DModel.from_preset("tiny", in_channels=4, sample_size=8, num_class_embeds=num_class_embeds)
    pipe = LatentDDPMPipeline(unet=unet.eval(), scheduler=default_scheduler(num_train_timesteps=10),
                              class_ids=class_ids)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory) -> dict:
    """A 4-step class-conditional run on 24 latents labelled 3, 7 and 100 (an epoch preview after step 3, 9
    evaluation samples), with the labels of every latent grid it drew."""
    root = tmp_path_factory.mktemp("sparse")
    x = np.random.default_rng(0).standard_normal((24, 4, 8, 8)).astype(np.float32)
    np.savez(root / "sparse.npz", X=x, y=np.array(SPARSE * 8))
    grids: list = []
    with pytest.MonkeyPatch.context() as mp:
        draw = reporting.save_latent_grid
        mp.setattr(reporting, "save_latent_grid", lambda path, latents, labels=None, **kw: (
            grids.append(None if labels is None else labels.tolist()), draw(path, latents, labels=labels, **kw)))
        assert run_train(["--latent", str(root / "sparse.npz"), "--class_conditional", "--max_train_steps", "4",
                          "--output_dir", str(root / "run"), *TRAIN_FAST, "--save_images_epochs", "1",
                          "--num_preview_samples", "4", "--num_eval_samples", "9", "--checkpointing_steps", "3"]) == 0
    return {"root": root, "run": root / "run", "grids": grids}


def test_train_records_the_ids_and_previews_and_evaluates_only_them(sparse_run):
    run = sparse_run["run"]
    index = json.loads((run / "pipeline" / "model_index.json").read_text())
    assert index["class_ids"] == SPARSE
    pipe = LatentDDPMPipeline.from_pretrained(run)
    assert pipe.unet.config.num_class_embeds == 101 and pipe.trained_class_ids() == SPARSE  # ids kept, not remapped
    # The epoch preview and the final grid; the evaluation's 9 samples are 3 per trained class (were 0..8).
    assert sparse_run["grids"] == [[3, 7, 100, 3], [3, 7, 100, 3]]
    per_class = json.loads((run / "train" / "metrics.json").read_text())["evaluation"]["per_class"]
    assert {k: v["num_samples"] for k, v in per_class.items()} == {"3": 3, "7": 3, "100": 3}


def test_a_resumed_run_records_the_same_ids(sparse_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sparse_run["run"], run)
    assert (run / "train" / "checkpoint-3").is_dir()
    shutil.rmtree(run / "train" / "checkpoint-4")  # resume from step 3
    assert run_train(["--latent", str(sparse_run["root"] / "sparse.npz"), "--class_conditional",
                      "--max_train_steps", "4", "--output_dir", str(run), *TRAIN_FAST,
                      "--resume_from_checkpoint", "latest"]) == 0
    assert json.loads((run / "pipeline" / "model_index.json").read_text())["class_ids"] == SPARSE


def test_sample_all_gives_the_trained_ids_and_refuses_others(sparse_run, tmp_path, capsys):
    out = tmp_path / "all.npz"
    assert run_sample(["--model", sparse_run["run"], "--class_labels", "all", *SAMPLE_FAST, "--num_samples", 4,
                       "--no_grid", "--output", out]) == 0
    np.testing.assert_array_equal(load_npz(out)["labels"], [3, 7, 100, 3])  # was 0, 1, 2, 3
    assert run_sample(["--model", sparse_run["run"], "--class_labels", 100, 7, *SAMPLE_FAST, "--no_grid",
                       "--output", tmp_path / "some.npz"]) == 0
    capsys.readouterr()
    # Inside 0..100 but never in the data: they were accepted silently.
    for labels, named in [(["5"], "--class_labels 5: "), (["7", "0", "5", "0"], "--class_labels 0, 5: ")]:
        out = tmp_path / "bad.npz"
        assert run_sample(["--model", sparse_run["run"], "--class_labels", *labels, *SAMPLE_FAST, "--output", out]) == 2
        line = one_error_line(capsys)
        assert named in line and line.endswith("its classes are 3, 7, 100"), line
        no_outputs(tmp_path, out)


def test_a_pipeline_saved_without_class_ids_keeps_every_id(tmp_path, capsys):
    """A pipeline saved before the ids were recorded (no class_ids in model_index.json) samples 0..K-1, as
    before, from its save_pretrained folder and from its upload folder."""
    save_tiny_pipelines([(tmp_path / "old", 3)])
    index_file = tmp_path / "old" / "model_index.json"
    index = json.loads(index_file.read_text())
    del index["class_ids"]
    index_file.write_text(json.dumps(index))
    upload = prepare_upload_folder(tmp_path / "old", tmp_path / "upload")
    assert "class_ids" not in json.loads((upload / "model_index.json").read_text())
    for folder in (tmp_path / "old", upload):
        pipe = LatentDDPMPipeline.from_pretrained(folder)
        assert pipe.config.class_ids is None and pipe.trained_class_ids() == [0, 1, 2]
    out = tmp_path / "all.npz"
    assert run_sample(["--model", tmp_path / "old", "--class_labels", "all", *SAMPLE_FAST, "--num_samples", 4,
                       "--no_grid", "--output", out]) == 0
    np.testing.assert_array_equal(load_npz(out)["labels"], [0, 1, 2, 0])
    capsys.readouterr()
    assert run_sample(["--model", tmp_path / "old", "--class_labels", "3", *SAMPLE_FAST,
                       "--output", tmp_path / "x.npz"]) == 2
    assert "its classes are 0, 1, 2" in one_error_line(capsys)


def test_pipeline_refuses_labels_outside_its_class_ids(tmp_path):
    pipe = tiny_pipe()
    kw = dict(batch_size=2, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert np.isfinite(pipe(class_labels=[3, 100], **kw).latents).all()
    for labels in ([3, 5], torch.tensor([0, 7])):
        with pytest.raises(ValueError, match=r"class_labels \[\d\] are not among .* valid ids: 3, 7, 100$"):
            pipe(class_labels=labels, **kw)
    with pytest.raises(ValueError, match=r"lie in 0\.\.100"):
        pipe(class_labels=[3, 101], **kw)
    # Saved, loaded (the package's classes and the upload folder's hub copy of the pipeline), still refused.
    pipe.save_pretrained(tmp_path / "p")
    upload = prepare_upload_folder(tmp_path / "p", tmp_path / "upload")
    assert "2 classes" not in (upload / "README.md").read_text() and "3 classes (ids 3, 7, 100)" in (
        upload / "README.md").read_text()
    from diffusers import DiffusionPipeline

    for loaded in (LatentDDPMPipeline.from_pretrained(tmp_path / "p"), LatentDDPMPipeline.from_pretrained(upload),
                   DiffusionPipeline.from_pretrained(upload, trust_remote_code=True)):
        loaded.set_progress_bar_config(disable=True)
        assert loaded.config.class_ids == SPARSE
        with pytest.raises(ValueError, match="valid ids: 3, 7, 100"):
            loaded(class_labels=[4, 4], **kw)
    # Any id from 0..num_class_embeds-1 without recorded ids (an unconditional-era pipeline): as before.
    assert np.isfinite(tiny_pipe(class_ids=None)(class_labels=[5, 100], **kw).latents).all()


def test_class_ids_are_checked_when_built():
    assert tiny_pipe(class_ids=np.array([100, 3, 7, 3])).config.class_ids == SPARSE  # sorted, distinct, ints
    many = list(range(0, 40, 2))
    with pytest.raises(ValueError, match=r"class_labels \[1\] .* valid ids: 0, 2, 4, .*, 18, \.\.\. \(20 ids\)$"):
        tiny_pipe(40, many)(batch_size=1, num_inference_steps=1, class_labels=[1])
    for num, ids, message in [(None, [0], "the UNet is unconditional"), (101, [3, 101], r"lie in 0\.\.100"),
                              (101, [-1], r"lie in 0\.\.100"), (101, [], "non-empty list"),
                              (101, [1.5], "integer class ids"), (101, 3, "list of integer")]:
        with pytest.raises(ValueError, match=message):
            tiny_pipe(num, ids)



def test_sparse_ids_far_above_the_class_count_warn(tmp_path):
    # Two classes with ids up to 1,000,000 made a tiny UNet 250x larger, silently (the ids are kept as given).
    import warnings

    from latent_ddpm.feeding import UNUSED_IDS_WARNING, load_training_data

    x = np.zeros((4, 2, 4, 4), np.float32) + np.arange(4, dtype=np.float32)[:, None, None, None]
    far, near = UNUSED_IDS_WARNING + 7, UNUSED_IDS_WARNING + 1  # 10,006 unused ids; 9,998 (under the limit)
    for ids, expected in (([5, 5, far, 5], [f"2 classes with ids up to {far}; the UNet embeds every id from 0 "
                                            f"({far + 1} embeddings, {far - 1} unused)"]),
                          ([3, 70, 1000, 3], []), ([0, near, 2, 3], [])):
        np.savez(tmp_path / "x.npz", X=x, y=np.array(ids))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = load_training_data(str(tmp_path / "x.npz"), class_conditional=True)
        assert data.class_ids == sorted(set(ids))
        said = [str(w.message) for w in caught if "map the labels to 0..K-1" in str(w.message)]
        assert len(said) == len(expected) and all(e in m for e, m in zip(expected, said, strict=True)), (ids, said)
