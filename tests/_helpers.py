"""Pieces several test files share: the client of `tests/_forkserver.py`, and tiny saved pipelines for sample.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from latent_ddpm import AdvancedUNet2DModel, LatentDDPMPipeline, default_scheduler
from latent_ddpm.errors import run_cli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class ForkServerClient:
    """Starts `tests/_forkserver.py` (train.py imported once, a forked process per run) and talks its protocol:
    one JSON request per line in, one JSON answer per line out."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_forkserver.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert "ready" in self._ask(None)

    def _ask(self, request: dict | None) -> dict:
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def save_tiny_pipelines(folders: list[tuple[Path, int | None]]) -> None:
    """A tiny pipeline (4x8x8 latents, per-channel latents_mean, latents_std 2) saved in each folder, with that
    many classes (None: unconditional); seeded, so the same folders get the same weights."""
    torch.manual_seed(0)
    for where, classes in folders:
        unet = AdvancedUNet2DModel.from_preset("tiny", in_channels=4, sample_size=8, num_class_embeds=classes)
        pipe = LatentDDPMPipeline(unet=unet, scheduler=default_scheduler(), latents_mean=[0.0, 1.0, 2.0, 3.0],
                                  latents_std=2.0)
        pipe.save_pretrained(where)


def exit_status(main, argv: list) -> int:
    """A command's `main` through `run_cli`, as its `__main__` runs it (arguments made strings): the exit status."""
    try:
        return run_cli(main, [str(a) for a in argv])
    except SystemExit as err:
        return err.code
