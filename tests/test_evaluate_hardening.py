"""Hardening of `python -m latent_ddpm.evaluate` against samples files the metrics cannot use: truncated or corrupt
.npz files, labels that do not fit, integer samples, an --out that is the samples file, a folder, not .json or
under a file, too few usable samples or reference latents, and finite values so large the features overflow. Every
refusal is exit status 2 with exactly one `error:` line on stderr. The command runs in this process through
`run_cli`, on tiny latents (4x8x8).
"""

from __future__ import annotations

import json
import shutil
import struct
import types
import zipfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from _helpers import exit_status, one_error_line

from latent_ddpm import evaluate


def run_evaluate(argv) -> int:
    """`python -m latent_ddpm.evaluate argv` in this process: the exit status."""
    return exit_status(evaluate.main, argv)


# --- 9.-12. python -m latent_ddpm.evaluate ---------------------------------------------------------------------------


def _latents(n, shape=(4, 8, 8), seed=0):
    return (np.random.default_rng(seed).normal(size=(n, *shape)) * 2.0 + 1.0).astype(np.float32)


@pytest.fixture
def ev(tmp_path):
    """A 40-latent labelled reference and a good 20-sample file; `argv(samples, *extra)` builds a command line."""
    np.savez(tmp_path / "ref.npz", X=_latents(40), y=np.arange(40) % 2)
    np.savez(tmp_path / "good.npz", samples=_latents(20, seed=3), labels=np.arange(20) % 2)

    def argv(samples, *extra):
        return ["--samples", samples, "--reference", tmp_path / "ref.npz", "--num_projections", "16", *extra]

    return types.SimpleNamespace(dir=tmp_path, argv=argv)


def test_evaluate_good_file_works(ev, capsys):
    assert run_evaluate(ev.argv(ev.dir / "good.npz")) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["fd"])


@pytest.mark.parametrize("kind, name", [("npy", "samples.bin"), ("npz", "samples.npy"), ("npy", "samples.npz")])
def test_evaluate_reads_a_misnamed_file_by_its_content(ev, capsys, kind, name):
    # np.load decides .npy or .npz by the file's content; so does evaluate (a misnamed file was a traceback).
    path, samples = ev.dir / name, _latents(20, seed=3)
    with open(path, "wb") as f:  # a file object: numpy adds no suffix
        if kind == "npy":
            np.save(f, samples)
        else:
            np.savez(f, samples=samples)
    assert run_evaluate(ev.argv(path)) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["fd"])


def test_evaluate_truncated_samples(ev, capsys):
    path = ev.dir / "cut.npz"
    shutil.copy(ev.dir / "good.npz", path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    assert run_evaluate(ev.argv(path)) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "not a readable" in line, line


def damage_member(path: Path, fraction: float, damage: bytes) -> Path:
    """Overwrite the bytes of `path`'s 'samples.npy' zip member at `fraction` of its stored data with `damage`
    (the data starts after the member's local header, whose name and extra-field lengths are read from it)."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("samples.npy")
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + int(info.compress_size * fraction)
    raw[start:start + len(damage)] = damage
    path.write_bytes(bytes(raw))
    return path


def corrupt_stored(tmp_path: Path) -> Path:
    """An uncompressed .npz whose 'samples' data bytes were changed after writing (its CRC no longer matches)."""
    np.savez(tmp_path / "crc.npz", samples=_latents(20, seed=3))
    return damage_member(tmp_path / "crc.npz", 0.5, b"\x5a" * 64)


def corrupt_compressed(tmp_path: Path) -> Path:
    """A compressed .npz whose deflate stream was overwritten in the middle."""
    np.savez_compressed(tmp_path / "deflate.npz", samples=_latents(20, seed=3))
    return damage_member(tmp_path / "deflate.npz", 1 / 3, b"\xff" * 200)


def bad_npy_member(tmp_path: Path) -> Path:
    """A valid zip whose 'samples.npy' member is not a .npy array."""
    path = tmp_path / "member.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("samples.npy", b"\x93NUMPY garbage, not an array header" + bytes(100))
    return path


@pytest.mark.parametrize("make", [corrupt_stored, corrupt_compressed, bad_npy_member])
def test_evaluate_corrupt_member(ev, capsys, make):
    path = make(ev.dir)
    assert run_evaluate(ev.argv(path)) == 2
    line = one_error_line(capsys)
    assert str(path) in line, line


@pytest.mark.parametrize("labels", [np.arange(21) % 2, np.arange(19) % 2, (np.arange(20) % 2)[:, None],
                                    np.zeros((20, 2), np.int64), np.arange(20) + 0.5],
                         ids=["one-more", "one-fewer", "column", "2-d", "float"])
def test_evaluate_bad_labels(ev, capsys, labels):
    path = ev.dir / "labels.npz"
    np.savez(path, samples=_latents(20, seed=3), labels=labels)
    assert run_evaluate(ev.argv(path)) == 2
    line = one_error_line(capsys)
    assert "--samples" in line and "labels" in line, line


@pytest.mark.parametrize("dtype, ok", [(np.float32, True), (np.float64, True), (np.float16, True),
                                       (np.int64, False), (np.int8, False), (np.uint8, False)])
def test_evaluate_sample_dtype(ev, capsys, dtype, ok):
    path = ev.dir / "typed.npz"
    np.savez(path, samples=(_latents(20, seed=3) * 10).astype(dtype))
    if ok:
        assert run_evaluate(ev.argv(path, "--no_baseline")) == 0
    else:
        assert run_evaluate(ev.argv(path)) == 2
        line = one_error_line(capsys)
        assert "--samples" in line and "floating point" in line, line


def test_evaluate_out_is_the_samples_file(ev, capsys):
    samples = ev.dir / "good.npz"
    before = samples.read_bytes()
    assert run_evaluate(ev.argv(samples, "--out", samples)) == 2
    line = one_error_line(capsys)
    assert "--out" in line and "would replace the input" in line, line
    assert samples.read_bytes() == before


@pytest.mark.parametrize("where", ["folder.json", "folder", "metrics.txt", "metrics", "."])
def test_evaluate_out_not_a_json_file(ev, capsys, where):
    out = ev.dir / where  # ".": the folder holding the samples, which it would not replace
    if where.startswith("folder"):
        out.mkdir()
    assert run_evaluate(ev.argv(ev.dir / "good.npz", "--out", out)) == 2
    line = one_error_line(capsys)
    assert "--out" in line and ".json" in line and "replace" not in line, line
    assert out.is_dir() == (where.startswith("folder") or where == ".")
    if where.startswith("folder"):
        assert list(out.iterdir()) == []


@pytest.mark.parametrize("flags, named", [(["--max_pr_samples", "3"], "--max_pr_samples"),
                                          (["--max_reference", "3", "--no_baseline"], "--max_reference"),
                                          (["--max_reference", "7"], "--max_reference 7"),
                                          (["--num_projections", "2000000000"], "--num_projections")])
def test_evaluate_subsample_sizes_the_k_nn_radii_cannot_use(ev, capsys, flags, named):
    # Named as the flag, not as a failure inside the metrics or as too small a --reference file.
    assert run_evaluate(ev.argv(ev.dir / "good.npz", *flags)) == 2
    line = one_error_line(capsys)
    assert named in line and ("--k" in line or "at most 4096" in line), line


def test_evaluate_out_under_a_file(ev, capsys):
    (ev.dir / "a_file").write_text("x")
    assert run_evaluate(ev.argv(ev.dir / "good.npz", "--out", ev.dir / "a_file" / "m.json")) == 2
    line = one_error_line(capsys)
    assert "--out" in line and "is a file" in line, line


def test_evaluate_out_written_and_replaced(ev, capsys):
    out = ev.dir / "m" / "x.json"
    assert run_evaluate(ev.argv(ev.dir / "good.npz", "--out", out)) == 0
    first = json.loads(out.read_text())
    assert first == json.loads(capsys.readouterr().out) and np.isfinite(first["fd"])
    out.write_text("old metrics")
    assert run_evaluate(ev.argv(ev.dir / "good.npz", "--out", out, "--no_baseline")) == 0
    second = json.loads(out.read_text())
    assert "baseline" not in second and second["fd"] == first["fd"]
    assert [p.name for p in out.parent.iterdir()] == ["x.json"]  # no temporary or set-aside file left


@pytest.mark.parametrize("usable, nan", [(0, 0), (1, 0), (2, 0), (3, 0), (1, 9)], ids=["0", "1", "2", "3", "1-of-10"])
def test_evaluate_too_few_usable_samples(ev, capsys, usable, nan):
    x = _latents(usable + nan, seed=3)
    x[usable:, 0, 0, 0] = np.nan
    path = ev.dir / "few.npz"
    np.savez(path, samples=x)
    assert run_evaluate(ev.argv(path)) == 2
    line = one_error_line(capsys)
    assert "--samples" in line and "--k" in line and f"{usable} usable" in line, line


def test_evaluate_four_usable_samples_are_enough(ev, capsys):
    x = _latents(10, seed=3)
    x[4:, 1, 2, 3] = np.nan
    np.savez(ev.dir / "four.npz", samples=x)
    assert run_evaluate(ev.argv(ev.dir / "four.npz", "--no_baseline")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 4 and report["num_nonfinite_samples"] == 6


def test_evaluate_small_reference_needs_no_baseline(ev, capsys):
    np.savez(ev.dir / "ref5.npz", X=_latents(5, seed=9))
    argv = ["--samples", ev.dir / "good.npz", "--reference", ev.dir / "ref5.npz", "--num_projections", "16"]
    assert run_evaluate(argv) == 2
    line = one_error_line(capsys)
    assert "--reference" in line and "--no_baseline" in line, line
    assert run_evaluate([*argv, "--no_baseline"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "baseline" not in report and np.isfinite(report["fd"])
    # Too few even without the baseline: 3 latents and --k 3.
    np.savez(ev.dir / "ref3.npz", X=_latents(3, seed=9))
    for extra in ([], ["--no_baseline"]):  # first said "or --no_baseline", which then failed on --k
        assert run_evaluate([*argv[:3], ev.dir / "ref3.npz", *argv[4:], *extra]) == 2
        line = one_error_line(capsys)
        assert "--reference" in line and "--k 3" in line and "--no_baseline" not in line, line


@pytest.mark.parametrize("signed", [False, True], ids=["positive", "signed"])
@pytest.mark.parametrize("baseline", [[], ["--no_baseline"]], ids=["baseline", "no-baseline"])
def test_evaluate_huge_finite_samples(ev, capsys, recwarn, signed, baseline):
    """Finite float32 values near its maximum (~3e38) overflow the features: one line, not a LinAlgError."""
    rng = np.random.default_rng(0)
    x = rng.uniform(2.9e38, 3.3e38, size=(20, 4, 8, 8)) * (rng.choice([-1, 1], size=(20, 4, 8, 8)) if signed else 1)
    x = x.astype(np.float32)
    assert np.isfinite(x).all()
    np.savez(ev.dir / "huge.npz", samples=x)
    assert run_evaluate(ev.argv(ev.dir / "huge.npz", *baseline)) == 2
    line = one_error_line(capsys)
    assert "--samples" in line and "cannot be computed" in line, line
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # numpy's lines would precede it


def test_reference_labels_a_typo_is_refused_and_no_labels_ignores_them(tmp_path, capsys):
    # A mistyped --label_key gave no per-class figures with exit status 0; an original project's `y` that is not
    # class ids (floats) could not be evaluated against at all.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "ref.npz", X=x, y=rng.integers(0, 3, 64))
    np.savez(tmp_path / "floaty.npz", X=x, y=rng.standard_normal(64))
    np.savez(tmp_path / "s.npz", samples=x[:16] + 0.1)
    base = ["--samples", str(tmp_path / "s.npz"), "--no_baseline"]
    assert run_evaluate([*base, "--reference", str(tmp_path / "ref.npz"), "--label_key", "nope"]) == 2
    assert "--label_key nope: " in (line := one_error_line(capsys)) and "has no such labels" in line, line
    # The default `y` that is not class ids: no per-class figures, with a note (it was refused, naming the wrong
    # fix); named with --label_key, it is still refused.
    assert run_evaluate([*base, "--reference", str(tmp_path / "floaty.npz")]) == 0
    out, err = capsys.readouterr()
    assert "per_class" not in json.loads(out) and "'y' labels are not class ids" in err and "--no_labels" in err
    np.savez(tmp_path / "named.npz", X=x, label=np.array(["cat", "dog"] * 32))  # a fallback's class names
    assert run_evaluate([*base, "--reference", str(tmp_path / "named.npz")]) == 0
    assert "'label' labels are not class ids" in capsys.readouterr().err  # it named 'y', which the file lacks
    (tmp_path / "shards").mkdir()  # names not known before loading (a folder of shards, a hub dataset): none
    datasets.Dataset.from_dict({"latents": x, "label": ["cat", "dog"] * 32}).to_parquet(
        str(tmp_path / "shards" / "train-00000-of-00001.parquet"))
    assert run_evaluate([*base, "--reference", str(tmp_path / "shards")]) == 0
    assert "shards: its labels are not class ids" in capsys.readouterr().err
    assert run_evaluate([*base, "--reference", str(tmp_path / "floaty.npz"), "--label_key", "y"]) == 2
    assert "labels must be integers" in one_error_line(capsys)
    assert run_evaluate([*base, "--reference", str(tmp_path / "floaty.npz"), "--no_labels"]) == 0
    out, err = capsys.readouterr()
    assert "fd" in json.loads(out) and not err


def test_a_constant_reference_channel_keeps_the_distance_finite_and_small(tmp_path, capsys):
    # A reference channel of zeros (padding) was standardised by the 1e-8 floor: any deviation of the samples
    # there became ~1e8 per value, and the Frechet distance ~1e17.
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((64, 4, 8, 8)).astype(np.float32)
    ref[:, 2] = 0.0
    samples = rng.standard_normal((32, 4, 8, 8)).astype(np.float32)
    samples[:, 2] = 0.01 * rng.standard_normal((32, 8, 8))
    np.savez(tmp_path / "ref.npz", X=ref)
    np.savez(tmp_path / "s.npz", samples=samples)
    argv = ["--samples", tmp_path / "s.npz", "--reference", tmp_path / "ref.npz", "--num_projections", "16"]
    assert run_evaluate(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 <= report["fd"] < 10 * max(report["baseline"]["fd"], 1.0), report
    assert abs(report["channel"]["std_error"][2] - 0.01) < 0.003  # in the data's units: the samples' spread there
