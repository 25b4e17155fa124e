"""Is a user-given `--train_data` / `--data` / `--model` string a local path or a Hugging Face Hub id? One rule."""

from __future__ import annotations

import os

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
