"""Fault-injection hooks for the tests: each reads one environment variable and does nothing unless it is set.

They let the tests crash a rank or a run at a chosen point, or hold the main process back, for real (in the
processes torchrun starts), where a mock cannot reach.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

#: How long `hold_report` waits for the other ranks before it gives up (seconds).
HOLD_REPORT_TIMEOUT_S = 120.0


def die_at(rank: int, step: int) -> None:
    """LATENT_DDPM_DIE_AT="RANK:STEP" makes that rank exit abruptly (status 1) as it starts STEP."""
    if os.environ.get("LATENT_DDPM_DIE_AT") == f"{rank}:{step}":
        os._exit(1)


def limit_file_size(rank: int) -> None:
    """LATENT_DDPM_FSIZE_LIMIT="RANK:BYTES" caps the files that rank writes at BYTES (RLIMIT_FSIZE): a write past
    it fails with EFBIG, as on a full disk, in that rank only."""
    spec = os.environ.get("LATENT_DDPM_FSIZE_LIMIT", "")
    if spec.partition(":")[0] == str(rank):
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        limit = int(spec.partition(":")[2])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def exit_after_checkpoint(step: int) -> None:
    """LATENT_DDPM_EXIT_AFTER_CHECKPOINT=STEP makes every rank exit (status 3) right after checkpoint-STEP."""
    if os.environ.get("LATENT_DDPM_EXIT_AFTER_CHECKPOINT") == str(step):
        os._exit(3)


def pause_in_save(folder: Path) -> None:
    """LATENT_DDPM_PAUSE_IN_SAVE=FILE: write `folder` (the checkpoint being written) into FILE and wait until
    FILE is deleted, so that a test can kill the process half-way through a checkpoint write."""
    if flag := os.environ.get("LATENT_DDPM_PAUSE_IN_SAVE"):
        Path(flag).write_text(str(folder))
        while Path(flag).exists():
            time.sleep(0.01)


def rank_ended(is_main: bool) -> None:
    """LATENT_DDPM_HOLD_REPORT=PATH: every process but the main one creates PATH once its training has ended
    (see `hold_report`)."""
    if (path := os.environ.get("LATENT_DDPM_HOLD_REPORT")) and not is_main:
        Path(path).touch()


def hold_report() -> None:
    """LATENT_DDPM_HOLD_REPORT=PATH: the main process waits for PATH (polling, at most `HOLD_REPORT_TIMEOUT_S`)
    before its final report. A report that still held the other ranks back would never start."""
    if not (path := os.environ.get("LATENT_DDPM_HOLD_REPORT")):
        return
    deadline = time.monotonic() + HOLD_REPORT_TIMEOUT_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"LATENT_DDPM_HOLD_REPORT: {path} did not appear: another rank is still held")
        time.sleep(0.1)
