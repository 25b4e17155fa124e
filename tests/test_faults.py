"""Faults: kill -9 at random moments, damaged checkpoints, disk full, a second run, a dying rank.

The promise under test: a crash costs at most `--checkpointing_steps` steps of work, the resumed run is
bit-for-bit the uninterrupted one (CPU, fp32, one thread), and a damaged or half-written checkpoint is
never resumed from. Training processes are forked from `tests/_forkserver.py` (real processes, fast
starts); figures go to docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import ForkServerClient
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file

from latent_ddpm.checkpointing import list_checkpoints, resolve_resume
from latent_ddpm.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

CKPT_STEPS, MAX_STEPS = 4, 40
# The kill test's run is longer, so that a kill that lands a few steps late (the jitter, a busy machine) never
# lets the run reach its final checkpoint before all the kills are done.
KILL_MAX_STEPS = 400
# 64 samples / batch 8 = 8 steps per epoch, 5 epochs; dropout and flips make the torch RNG state matter.
FAST = ["--preset", "tiny", "--train_batch_size", "8", "--num_eval_samples", "0", "--num_preview_samples", "2",
        "--preview_inference_steps", "2", "--logging_steps", "1", "--save_images_epochs", "0",
        "--lr_warmup_steps", "5", "--random_flip", "--model_config", '{"dropout": 0.1}']
BOUND_S = 120  # the longest any single wait may take on a busy machine before the test fails
STEP_RE = re.compile(r"INFO step (\d+)/")


class ForkServer(ForkServerClient):
    def start(self, argv: list[str], log: Path, env: dict | None = None, fsize: int | None = None) -> int:
        return self._ask({"cmd": "start", "argv": [str(a) for a in argv], "out": str(log),
                          "err": str(log.with_suffix(".err")), "env": env or {}, "fsize": fsize})["pid"]

    def wait(self, pid: int, timeout: float = BOUND_S) -> int | None:
        return self._ask({"cmd": "wait", "pid": pid, "timeout": timeout})["status"]

    def run(self, argv: list[str], log: Path, **kw) -> int:
        status = self.wait(self.start(argv, log, **kw))
        assert status is not None, f"run did not finish in {BOUND_S}s: {log.read_text()[-2000:]}"
        return status


@pytest.fixture(scope="module")
def fork():
    server = ForkServer()
    yield server
    server.close()


def args(data: Path, out: Path, *extra: str, max_steps: int = MAX_STEPS) -> list[str]:
    return ["--latent", data, "--max_train_steps", str(max_steps), "--checkpointing_steps", str(CKPT_STEPS),
            *FAST, "--output_dir", out, *extra]


@pytest.fixture(scope="module")
def reference(fork, data, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert fork.run(args(data, out), out.parent / "log.txt") == 0, (out.parent / "log.err").read_text()[-3000:]
    return out


def poll(condition, what: str, bound: float = BOUND_S, pid: int | None = None):
    """Wait for `condition()` to be truthy (bounded); fail early if `pid` has exited."""
    deadline = time.monotonic() + bound
    while not (value := condition()):
        if pid is not None and not _alive(pid):
            pytest.fail(f"process {pid} exited while waiting for {what}")
        assert time.monotonic() < deadline, f"timed out after {bound}s waiting for {what}"
        time.sleep(0.005)
    return value


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def logged_steps(log: Path) -> list[int]:
    return [int(m) for m in STEP_RE.findall(log.read_text())] if log.exists() else []


def usable_checkpoint(path: Path) -> bool:
    """The test's own, independent check of a checkpoint: marker present and every file loads."""
    if not (path / "COMPLETE").is_file():
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        assert state["global_step"] == int(path.name.split("-")[1])
        for f in path.iterdir():
            if f.suffix == ".safetensors":
                load_file(f)
            elif f.suffix in (".bin", ".pkl"):
                accelerate_load(f, map_location="cpu")  # weights_only=True
        return True
    except Exception:  # noqa: BLE001
        return False


def latest_usable(train_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in train_dir.glob("checkpoint-*")
             if re.fullmatch(r"checkpoint-\d+", p.name) and usable_checkpoint(p)]
    return max(steps, default=0)


def assert_same_final_weights(a: Path, b: Path, max_steps: int = MAX_STEPS) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        ta = load_file(a / f"train/checkpoint-{max_steps}/{name}")
        tb = load_file(b / f"train/checkpoint-{max_steps}/{name}")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    pa = load_file(a / "pipeline/unet/diffusion_pytorch_model.safetensors")
    pb = load_file(b / "pipeline/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.fixture(scope="module")
def long_reference(fork, data, tmp_path_factory) -> Path:
    """The uninterrupted run of the kill test (KILL_MAX_STEPS)."""
    out = tmp_path_factory.mktemp("long_reference") / "run"
    log = out.parent / "log.txt"
    assert fork.run(args(data, out, max_steps=KILL_MAX_STEPS), log) == 0, log.with_suffix(".err").read_text()[-3000:]
    return out


def test_kill_9_at_random_moments_resumes_the_same_run(fork, data, long_reference, tmp_path):
    """At least 20 SIGKILLs in one run folder: after steps, mid-step, in start-up, and inside checkpoint
    writes (held there by the pause hook). Every resume picks the newest usable checkpoint, loses at most
    --checkpointing_steps steps, takes over the stale lock; the finished run equals the reference."""
    rng = random.Random(20240611)
    out = tmp_path / "run"
    train_dir = out / "train"
    flag = tmp_path / "paused"
    kinds = ["step"] * 16 + ["pause"] * 6 + ["startup"] * 2
    rng.shuffle(kinds)
    kinds[0] = "step"  # the first start has no checkpoint to resume from: let it make some
    records, resumed_from = [], 0
    lock_refused = False
    for i, kind in enumerate(kinds):
        log = tmp_path / f"log{i}.txt"
        argv = args(data, out, *(["--resume_from_checkpoint", "latest"] if i else []), max_steps=KILL_MAX_STEPS)
        stale_lock = (out / ".lock").exists()
        env = {"LATENT_DDPM_PAUSE_IN_SAVE": str(flag)} if kind == "pause" else {}
        pid = fork.start(argv, log, env=env)
        if kind == "pause":
            poll(flag.exists, "the pause inside a checkpoint write", pid=pid)
            if not lock_refused:  # a second run on the same folder, while the first is alive, refuses
                second = tmp_path / "second.txt"
                assert fork.run(argv, second) == 2
                err = second.with_suffix(".err").read_text().strip().splitlines()
                assert len(err) == 1 and "is in use by another training run" in err[0], err
                lock_refused = True
        elif kind == "step":
            target = resumed_from + rng.randint(1, 2 * CKPT_STEPS)
            poll(lambda t=target, f=log: any(s >= t for s in logged_steps(f)), f"step {target}", pid=pid)
            time.sleep(rng.uniform(0, 0.05))  # random jitter: the kill lands anywhere in the next step or save
        else:  # a random moment of start-up: data loading, model building, resume loading, first steps
            time.sleep(rng.uniform(0, 0.5))
        os.kill(pid, signal.SIGKILL)
        assert fork.wait(pid) == -signal.SIGKILL, f"kill {i} did not land (the run ended first)"
        flag.unlink(missing_ok=True)

        text = log.read_text()
        if i:  # this process resumed from the checkpoint our own check chose before it started
            want = (f"resumed from {train_dir / f'checkpoint-{resumed_from}'} at step {resumed_from}" if resumed_from
                    else "no complete checkpoint")
            assert want in text or kind == "startup", (want, text[-1500:])
        done = max(logged_steps(log), default=resumed_from)
        now = latest_usable(train_dir)
        assert now >= resumed_from and now % CKPT_STEPS == 0
        lost = done - now
        assert 0 <= lost <= CKPT_STEPS, (i, kind, done, now)
        # resolve_resume (what train.py uses) agrees with the independent check, whatever was half-written
        picked = resolve_resume(train_dir, "latest")
        assert (picked.name if picked else None) == (f"checkpoint-{now}" if now else None)
        in_save = kind == "pause" or any(p.name.endswith(".tmp") for p in train_dir.glob("checkpoint-*"))
        records.append({"kind": kind, "done": done, "resume": now, "lost": lost, "in_save": in_save,
                        "stale_lock": stale_lock})
        resumed_from = now

    final = tmp_path / "final.txt"
    assert fork.run(args(data, out, "--resume_from_checkpoint", "latest", max_steps=KILL_MAX_STEPS),
                    final) == 0, final.read_text()[-2000:]
    assert f"at step {resumed_from}" in final.read_text() or resumed_from == 0
    assert resumed_from < KILL_MAX_STEPS  # every kill landed before the end
    assert_same_final_weights(long_reference, out, max_steps=KILL_MAX_STEPS)
    assert lock_refused and sum(r["stale_lock"] for r in records) >= 10
    assert len(records) >= 20 and sum(r["in_save"] for r in records) >= 6
    summary = {"kills": len(records), "in_checkpoint_write": sum(r["in_save"] for r in records),
               "kinds": {k: kinds.count(k) for k in set(kinds)}, "max_lost_steps": max(r["lost"] for r in records),
               "mean_lost_steps": round(sum(r["lost"] for r in records) / len(records), 2),
               "resumed_over_stale_lock": sum(r["stale_lock"] for r in records)}
    print("kill summary", json.dumps(summary))


def _copy_checkpoints(reference: Path, dest: Path) -> Path:
    train_dir = dest / "train"
    train_dir.mkdir(parents=True)
    for p in (reference / "train").glob("checkpoint-*"):
        shutil.copytree(p, train_dir / p.name)
    return train_dir


def test_damaged_checkpoints_are_skipped_with_a_warning(fork, data, reference, tmp_path):
    out = tmp_path / "run"
    train_dir = _copy_checkpoints(reference, out)
    assert sorted(p.name for p in train_dir.iterdir()) == ["checkpoint-32", "checkpoint-36", "checkpoint-40"]
    model = train_dir / "checkpoint-40/model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # truncated
    rng_state = train_dir / "checkpoint-36/random_states_0.pkl"
    data_bytes = bytearray(rng_state.read_bytes())
    data_bytes[len(data_bytes) // 2: len(data_bytes) // 2 + 64] = b"\xff" * 64  # corrupted, same size
    rng_state.write_bytes(bytes(data_bytes))
    with pytest.warns(UserWarning) as caught:
        assert resolve_resume(train_dir, "latest") == train_dir / "checkpoint-32"
    messages = [str(w.message) for w in caught]
    assert any("skipping damaged checkpoint" in m and "checkpoint-40" in m and "truncated" in m for m in messages)
    assert any("skipping damaged checkpoint" in m and "checkpoint-36" in m for m in messages)
    with pytest.raises(UserInputError, match="checkpoint-40 is not a complete checkpoint folder"):
        resolve_resume(train_dir, str(train_dir / "checkpoint-40"))
    # The real resume takes checkpoint-32, redoes 33..40, and ends where the reference ended.
    log = tmp_path / "log.txt"
    assert fork.run(args(data, out, "--resume_from_checkpoint", "latest"), log) == 0, log.read_text()[-2000:]
    assert "skipping damaged checkpoint" in log.with_suffix(".err").read_text()
    assert f"resumed from {train_dir / 'checkpoint-32'} at step 32" in log.read_text()
    assert_same_final_weights(reference, out)


def test_a_folder_without_marker_is_never_resumed(tmp_path, reference):
    train_dir = _copy_checkpoints(reference, tmp_path / "run")
    (train_dir / "checkpoint-40" / "COMPLETE").unlink()  # the rename happened, the marker did not (impossible
    shutil.copytree(train_dir / "checkpoint-36", train_dir / "checkpoint-44.tmp")  # in the code, but be safe)
    assert resolve_resume(train_dir, "latest") == train_dir / "checkpoint-36"
    # Not even listed: rotation counts, and the non-finite stop names, only complete checkpoints.
    assert [step for step, _ in list_checkpoints(train_dir)][-1] == 36


def test_a_flipped_bit_that_keeps_weights_finite_is_caught_by_the_checksum(tmp_path, reference):
    # Sizes and finite values were all a resume checked: such damage resumed silently from wrong weights.
    train_dir = _copy_checkpoints(reference, tmp_path / "run")
    model = train_dir / "checkpoint-40/model.safetensors"
    data_bytes = bytearray(model.read_bytes())
    data_bytes[-4] ^= 1  # the lowest mantissa bit of the last float32 weight: same size, still finite
    model.write_bytes(bytes(data_bytes))
    with pytest.warns(UserWarning, match="checkpoint-40 .model.safetensors does not match its SHA-256"):
        assert resolve_resume(train_dir, "latest") == train_dir / "checkpoint-36"


def test_disk_full_during_a_checkpoint(fork, data, reference, tmp_path):
    """RLIMIT_FSIZE makes the checkpoint's big files fail to write (EFBIG), as a full disk would."""
    out = tmp_path / "run"
    train_dir = out / "train"
    assert fork.run(args(data, out), tmp_path / "a.txt", env={"LATENT_DDPM_EXIT_AFTER_CHECKPOINT": "8"}) == 3
    before = {p.name: p.read_bytes() for p in (train_dir / "checkpoint-8").iterdir()}
    log = tmp_path / "full.txt"
    status = fork.run(args(data, out, "--resume_from_checkpoint", "latest"), log, fsize=64 * 1024)
    err = log.with_suffix(".err").read_text()
    assert status == 2 and "Traceback" not in err, err[-3000:]
    # Besides the error: the progress bar, redrawn with carriage returns (as a terminal shows it).
    errors = [ln for ln in re.split(r"[\r\n]", err) if "error" in ln.lower()]
    assert len(errors) == 1, errors
    line = errors[0]
    assert line.startswith("error: cannot write checkpoint-12 in " + str(train_dir)), line
    assert "free disk space" in line and "checkpoint-8 is intact" in line
    assert sorted(p.name for p in train_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]  # no .tmp
    assert {p.name: p.read_bytes() for p in (train_dir / "checkpoint-8").iterdir()} == before
    assert not (out / ".lock").exists()  # released on the error
    # With space again, the run continues and is still the reference run.
    assert fork.run(args(data, out, "--resume_from_checkpoint", "latest"), tmp_path / "c.txt") == 0
    assert_same_final_weights(reference, out)


def test_disk_full_at_the_final_pipeline(fork, data, reference, tmp_path):
    """The last checkpoint is written, the pipeline is not (a resume at the last step writes only the report):
    one line saying how to write it, no half pipeline; the same command with space again writes it."""
    out = tmp_path / "run"
    _copy_checkpoints(reference, out)
    log = tmp_path / "full.txt"
    status = fork.run(args(data, out, "--resume_from_checkpoint", "latest"), log, fsize=16 * 1024)
    err = log.with_suffix(".err").read_text()
    assert status == 2 and "Traceback" not in err, err[-3000:]
    errors = [ln for ln in re.split(r"[\r\n]", err) if "error" in ln.lower()]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"error: cannot write the pipeline {out / 'pipeline'} ("), errors[0]
    assert "--resume_from_checkpoint latest" in errors[0], errors[0]
    assert not (out / "pipeline").exists() and not (out / "pipeline.tmp").exists()
    assert fork.run(args(data, out, "--resume_from_checkpoint", "latest"), tmp_path / "again.txt") == 0
    assert_same_final_weights(reference, out)


def test_unwritable_output_folder_is_one_line(fork, data, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the run folder's parent should be")
    log = tmp_path / "log.txt"
    assert fork.run(args(data, blocker / "run"), log) == 2
    err = log.with_suffix(".err").read_text().strip().splitlines()
    assert len(err) == 1 and f"cannot create the run folder {blocker / 'run'}" in err[0], err
    assert blocker.read_text().startswith("a file")


@pytest.mark.skipif(sys.platform != "linux", reason="gloo 2-process run tested on Linux")
def test_a_dying_rank_stops_the_other_instead_of_hanging(data, tmp_path):
    """Rank 1 exits abruptly at step 3 (after checkpoint-2): rank 0 must not wait 30 minutes for it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--latent", str(data), "--max_train_steps", "8", "--checkpointing_steps", "2",
           *FAST, "--train_batch_size", "4", "--output_dir", str(tmp_path / "run"), "--ddp_timeout", "60"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "LATENT_DDPM_DIE_AT": "1:3"}
    # Bounded: without the teardown (or the --ddp_timeout) this would block in a collective.
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240, env=env)
    assert result.returncode != 0
    assert (tmp_path / "run/train/checkpoint-2/COMPLETE").exists()
    assert not (tmp_path / "run/pipeline").exists()
    assert resolve_resume(tmp_path / "run/train", "latest").name == "checkpoint-2"
