"""`--push_checkpoints`: each checkpoint's pipeline uploaded in a background thread while training goes on."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

from diffusers.utils import logging

from .errors import UserInputError, first_line, stderr_line
from .hub import _upload, prepare_upload_folder

logger = logging.get_logger(__name__)


class CheckpointUploader:
    """Uploads checkpoints' pipelines (`push_checkpoints`) in a background thread, so that training goes on
    while they travel, as transformers' Trainer pushes its checkpoints. One upload at a time, in order: a new
    checkpoint waits only for a previous upload that is still running. A failed upload is a warning (training
    goes on, and the final push happens anyway). Call `wait()` before the final push."""

    def __init__(self, repo_id: str, *, private: bool = False, token: str | None = None):
        self.repo_id, self.private, self.token = repo_id, private, token
        self._thread: threading.Thread | None = None
        self._failure: str | None = None
        self._running: tuple[str, Path, Path] | None = None  # commit message, pipeline, upload copy
        atexit.register(self._abandon)

    def submit(self, pipeline_dir: str | os.PathLike, commit_message: str,
               train_dir: str | os.PathLike | None = None) -> None:
        """Copy `pipeline_dir` into an upload folder now (so that checkpoint rotation cannot pull it away),
        then upload it as one commit in the background."""
        self.wait()
        tmp = Path(tempfile.mkdtemp(prefix="latent_ddpm_upload_"))
        try:
            folder = prepare_upload_folder(pipeline_dir, tmp / "upload", repo_id=self.repo_id, train_dir=train_dir)
        except (UserInputError, OSError) as err:  # e.g. a full temporary folder: training goes on
            shutil.rmtree(tmp, ignore_errors=True)
            warnings.warn(f"could not push {commit_message}: {first_line(err)}", stacklevel=2)
            return
        self._running = (commit_message, Path(pipeline_dir), tmp)
        self._thread = threading.Thread(target=self._run, args=(folder, tmp, commit_message), daemon=True,
                                        name="latent_ddpm_checkpoint_upload")
        self._thread.start()

    def _run(self, folder: Path, tmp: Path, commit_message: str) -> None:
        try:
            url = _upload(folder, self.repo_id, private=self.private, token=self.token, commit_message=commit_message)
            logger.info(f"uploaded {commit_message} to {url}")
        except Exception as err:  # noqa: BLE001 - reported by wait(), in the training thread
            self._failure = f"could not push {commit_message}: {first_line(err) or type(err).__name__}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def wait(self) -> None:
        """Wait for the running upload, if any; warn if the last one failed."""
        if self._thread is not None:
            if self._thread.is_alive():
                logger.info("waiting for the previous checkpoint's upload to finish")
            self._thread.join()
            self._thread = self._running = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            warnings.warn(failure, stacklevel=2)

    def _abandon(self) -> None:
        """At exit (a run that failed or was stopped before `wait`): say which upload did not finish, and
        remove its copy; the checkpoint itself stays on disk."""
        if self._thread is not None and self._thread.is_alive() and self._running is not None:
            message, pipeline_dir, tmp = self._running
            stderr_line(f"warning: the upload of {message} did not finish before the run ended; upload it with "
                        f"latent_ddpm.hub.push_pipeline_to_hub('{pipeline_dir}', '{self.repo_id}')")
            shutil.rmtree(tmp, ignore_errors=True)
        elif self._failure is not None:
            stderr_line(f"warning: {self._failure}")
