"""Untrusted files never run code: pickle payloads in a .npz, an original .pth, a pipeline's .bin weights and
a checkpoint's torch files are refused (or read as data only). Each payload would create a marker file; the
control test proves it does when unpickled, every other test that it never appears. Plus a scan of our code
for ways to unpickle."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import load as accelerate_load

from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline, convert_original, data, default_scheduler, evaluate
from latent_ddpm.checkpointing import resolve_resume
from latent_ddpm.demo import make_demo_latents
from latent_ddpm.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402
import train  # noqa: E402

FAST = ["--preset", "tiny", "--train_batch_size", "8", "--num_eval_samples", "0", "--save_images_epochs", "0",
        "--logging_steps", "1"]


class Payload:
    """Unpickling this runs `exec`, which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def cli(main, argv, capsys) -> tuple[int, str]:
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    try:
        with pytest.raises(SystemExit) as exc:
            run_cli(main, [str(a) for a in argv])
    finally:
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return exc.value.code, err[0]


def test_control_the_payload_does_run_when_unpickled(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("where", ["X", "y"])
def test_npz_with_a_pickled_object_array_is_refused(tmp_path, capsys, where):
    marker = tmp_path / "ran"
    x, y = make_demo_latents(num_samples=16, seed=0, size=8)
    arrays = {"X": x, "y": y}
    arrays[where] = np.array([Payload(marker)] * 16, dtype=object)
    np.savez(tmp_path / "evil.npz", **arrays)  # np.savez pickles object arrays
    labels = ["--class_conditional"] if where == "y" else []  # labels are read only for a conditional model
    assert cli(train.main, ["--latent", tmp_path / "evil.npz", "--output_dir", tmp_path / "run", *FAST, *labels],
               capsys)[0] == 2
    code, line = cli(data.main, ["convert", tmp_path / "evil.npz", tmp_path / "arrow"], capsys)
    assert code == 2 and ("Python objects" in line or "labels" in line), line
    np.savez(tmp_path / "evil_samples.npz", samples=np.array([Payload(marker)] * 4, dtype=object))
    code, line = cli(evaluate.main, ["--samples", tmp_path / "evil_samples.npz", "--reference",
                                     tmp_path / "evil.npz"], capsys)
    assert code == 2
    assert not marker.exists() and not (tmp_path / "run").exists() and not (tmp_path / "arrow").exists()


def test_original_checkpoint_with_a_payload_is_refused(tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"conv_in.weight": torch.zeros(2), "evil": Payload(marker)}, tmp_path / "model.pth")
    code, line = cli(convert_original.main, [tmp_path / "model.pth", tmp_path / "out"], capsys)
    assert code == 2 and "refused to load" in line and "pickled code" in line, line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_pipeline_with_pickled_bin_weights_is_not_executed(tmp_path, capsys):
    marker = tmp_path / "ran"
    unet = AdvancedUNet2DModel(in_channels=4, down_channels=(8, 16, 16), mid_channels=(16, 16), time_emb_dim=16,
                               down_sample=(True, False), num_heads=2, norm_num_groups=4, head_channels=8,
                               sample_size=8)
    folder = tmp_path / "pipe"
    LatentDDPMPipeline(unet=unet, scheduler=default_scheduler()).save_pretrained(folder, safe_serialization=False)
    weights = folder / "unet" / "diffusion_pytorch_model.bin"
    assert weights.exists() and not list(folder.rglob("*.safetensors"))
    torch.save({**torch.load(weights, weights_only=True), "evil": Payload(marker)}, weights)
    code, line = cli(sample.main, ["--model", folder, "--output", tmp_path / "s.npz"], capsys)
    assert code == 2 and "cannot load the pipeline" in line and "safetensors" in line, line  # refused outright
    with pytest.raises(OSError, match="Unable to load weights") as exc:  # the library: diffusers' weights_only
        LatentDDPMPipeline.from_pretrained(folder)
    assert exc.value is not None
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # what diffusers calls
        torch.load(weights, map_location="cpu", weights_only=True)
    assert not marker.exists() and not (tmp_path / "s.npz").exists()


def test_a_checkpoint_marker_cannot_make_the_check_read_outside_the_checkpoint(tmp_path):
    # The check hashed whatever the marker named: "../../etc/hostname" was read, "/dev/zero" hung every rank.
    from latent_ddpm.checkpointing import checkpoint_problem

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"x")
    (tmp_path / "outside").write_bytes(b"x")
    os.mkfifo(ckpt / "fifo")
    (ckpt / "link").symlink_to(tmp_path / "outside")
    digest = hashlib.sha256(b"x").hexdigest()
    for name, problem in [("../outside", "not a file of the checkpoint"), ("/dev/zero", "not a file of the checkpoint"),
                          ("fifo", "fifo is not a plain file"), ("link", "link is not a plain file")]:
        marker = {"step": 2, "files": {name: 1}, "sha256": {name: digest}}
        (ckpt / "COMPLETE").write_text(json.dumps(marker))
        assert problem in checkpoint_problem(ckpt), name
    marker = {"step": 2, "files": {"model.safetensors": 1, "other": 1}, "sha256": {"model.safetensors": digest}}
    (ckpt / "COMPLETE").write_text(json.dumps(marker))
    assert "checksums do not cover the files it lists" in checkpoint_problem(ckpt)


def test_checkpoint_torch_files_with_a_payload_are_skipped(tmp_path):
    """accelerate 1.15's load_state reads optimizer.bin and random_states_*.pkl with weights_only=True (plus
    numpy's array types); resume validation uses the same loader and skips such a checkpoint."""
    marker = tmp_path / "ran"
    x, y = make_demo_latents(num_samples=16, seed=0, size=8)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    out = tmp_path / "run"
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    assert train.main(["--latent", str(tmp_path / "d.npz"), "--max_train_steps", "2", "--checkpointing_steps", "1",
                       "--output_dir", str(out), *FAST]) == 0
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    train_dir = out / "train"
    for name in ("random_states_0.pkl", "optimizer.bin"):
        shutil.copytree(train_dir / "checkpoint-2", train_dir / "evil")
        torch.save({"evil": Payload(marker)}, train_dir / "evil" / name)
        manifest = json.loads((train_dir / "evil" / "COMPLETE").read_text())  # a crafted file, sizes,
        manifest["files"][name] = (train_dir / "evil" / name).stat().st_size  # checksums and all
        manifest["sha256"][name] = hashlib.sha256((train_dir / "evil" / name).read_bytes()).hexdigest()
        (train_dir / "evil" / "COMPLETE").write_text(json.dumps(manifest))
        shutil.rmtree(train_dir / "checkpoint-2")
        (train_dir / "evil").rename(train_dir / "checkpoint-2")
        with pytest.warns(UserWarning, match="skipping damaged checkpoint .*checkpoint-2.*Weights only load failed"):
            assert resolve_resume(train_dir, "latest") == train_dir / "checkpoint-1"
        with pytest.raises(pickle.UnpicklingError):
            accelerate_load(train_dir / "checkpoint-2" / name)  # what accelerate's load_state calls
        shutil.rmtree(train_dir / "checkpoint-2")
        shutil.copytree(train_dir / "checkpoint-1", train_dir / "checkpoint-2")  # restore a good one, any
    assert not marker.exists()


# Ways to unpickle (or to write pickles) that our code must not contain.
FORBIDDEN = [r"pickle\.loads?\(", r"pickle\.Unpickler", r"allow_pickle=True", r"weights_only=False",
             r"import(dill|cloudpickle|joblib)\b", r"torch\.save\(", r"safe_serialization=False",
             r"trust_remote_code=True"]


def code_lines(path: Path) -> dict[int, str]:
    """Each line's code without strings, docstrings and comments, tokens joined without spaces."""
    lines: dict[int, str] = {}
    with open(path, "rb") as fh:
        for tok in tokenize.tokenize(fh.readline):
            if tok.type not in (tokenize.STRING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING,
                                tokenize.INDENT, tokenize.DEDENT):
                lines[tok.start[0]] = lines.get(tok.start[0], "") + tok.string
    return lines


def test_the_code_never_unpickles():
    files = [*sorted((ROOT / "latent_ddpm").rglob("*.py")), ROOT / "train.py", ROOT / "sample.py"]
    hits, pickle_uses = [], set()
    for path in files:
        for n, code in code_lines(path).items():
            hits += [f"{path.relative_to(ROOT)}:{n}: {code}" for pat in FORBIDDEN if re.search(pat, code)]
            pickle_uses |= set(re.findall(r"\bpickle\.\w+", code))
    assert not hits, hits
    # The one use of the pickle module names the exception that weights_only=True raises.
    assert pickle_uses <= {"pickle.UnpicklingError"}, pickle_uses


def test_the_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('import pickle\nx = np.load(f, allow_pickle=True)  # "quoted"\ny = pickle.loads(b)\n'
                   'torch.load(p, weights_only = False)\ns = "allow_pickle=True in a string is fine"\n')
    found = [pat for code in code_lines(bad).values() for pat in FORBIDDEN if re.search(pat, code)]
    assert len(found) == 3
