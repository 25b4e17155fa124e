"""Is a user-given `--train_data` / `--data` / `--model` string a local path or a Hugging Face Hub id? One rule."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id


def is_hub_id(text: object) -> bool:
    """True when `text` can only mean a hub repository `owner/name`: a valid repo id that is not an existing
    path and does not look like one (no leading `.`, `/` or `~`, no backslash, exactly one `/`)."""
    if not isinstance(text, str) or os.path.exists(text):
        return False
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


@contextmanager
def quiet_hub_retries() -> Iterator[None]:
    """Hide the warnings huggingface_hub and the HF libraries log for each retry of a hub request (offline, 10-25
    lines over up to a minute), and the Python warnings they raise on the way (deprecated arguments they pass
    each other): a failure is reported once, in the caller's own error line."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets", "diffusers")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


@contextmanager
def diffusers_logs_on_success() -> Iterator[None]:
    """Hold diffusers' log records while loading: replayed if the load succeeds, dropped if it fails (the one
    error line then says what went wrong, instead of diffusers' own lines before it)."""
    root, held = logging.getLogger("diffusers"), []
    hold = logging.Handler()
    hold.emit = held.append
    saved, root.handlers = root.handlers, [hold]
    try:
        yield
    finally:
        root.handlers = saved
    for record in held:
        root.handle(record)


@contextmanager
def quiet_parquet_reads() -> Iterator[None]:
    """Silence the line datasets' Parquet reader logs for a bad file: the caller's one error line says it all."""
    log = logging.getLogger("datasets.packaged_modules.parquet.parquet")
    log.disabled, was = True, log.disabled
    try:
        yield
    finally:
        log.disabled = was
