"""The autoencoder behind a latent dataset: loading any diffusers autoencoder (safetensors only), and the
`encoding.json` that `latent_ddpm.encode` writes beside the latents to name it (read by train.py and sample.py)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import diffusers
import torch

from .errors import UserInputError, first_line
from .sources import diffusers_logs_on_success, quiet_hub_retries
from .validation import DataError

#: The file beside the latent dataset that describes the encoding (read by sampling and training).
ENCODING_FILE = "encoding.json"
#: The autoencoder config values copied to encoding.json (absent ones are stored as null).
VAE_CONFIG_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "latent_channels")


def read_encoding_info(train_data: str | os.PathLike | None) -> dict | None:
    """The `encoding.json` of a latent dataset folder written by `latent_ddpm.encode`, or None (other sources)."""
    if train_data is None:
        return None
    path = Path(train_data) / ENCODING_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({err}); re-encode or delete it") from err
    vae = info.get("vae") if isinstance(info, dict) else None
    if not (isinstance(vae, dict) and isinstance(vae.get("id"), str)
            and isinstance(vae.get("subfolder"), (str, type(None)))):
        raise DataError(f"{path}: not an encoding.json written by latent_ddpm.encode (it needs \"vae\": {{\"id\": "
                        "...}); re-encode or delete it")
    return info


def load_data_vae(info: dict | None, where: str) -> Any:
    """The autoencoder that `read_encoding_info`'s `info` names, for previews and the pipeline; None, with a
    warning, when it cannot be loaded (moved, or a hub id offline): training needs only the latents."""
    if info is None:
        return None
    source = info["vae"]["id"]
    try:
        return load_vae(source, info["vae"].get("subfolder"))
    except VaeLoadError as err:
        gone = Path(source).is_absolute() and not Path(source).exists()
        reason = "that folder no longer exists" if gone else err.reason
        logging.getLogger(__name__).warning(
            "%s names the autoencoder %s, which cannot be loaded (%s); training without it: previews stay "
            "latents and the pipeline is saved without a VAE", Path(where) / ENCODING_FILE, source, reason)
        return None


def run_encoding_info(run_dir: str | os.PathLike) -> dict | None:
    """The encoding.json of the data a training run used (`<run>/train/config.json`'s train_data), or None."""
    config = Path(run_dir) / "train" / "config.json"
    try:
        train_data = json.loads(config.read_text()).get("train_data") if config.is_file() else None
    except (OSError, ValueError):
        return None
    return read_encoding_info(train_data)


class VaeLoadError(UserInputError):
    """An autoencoder that cannot be loaded: the message names `--vae`; `reason` is the why alone."""

    def __init__(self, source: str, reason: str, hint: str = ""):
        super().__init__(f"--vae {source}: {reason}{'; ' + hint if hint else ''}")
        self.reason = reason


def load_vae(id_or_path: str | os.PathLike, subfolder: str | None = None, torch_dtype: torch.dtype | None = None
             ) -> Any:
    """Load any diffusers autoencoder by local path or hub id; the class comes from its config's `_class_name`.

    A pipeline folder/repo (with a `vae/` subfolder) works too. Weights are read from safetensors only.
    Raises `VaeLoadError` (a one-line `UserInputError`) when it cannot be loaded.
    """
    source = os.fspath(id_or_path)
    if subfolder is not None and os.path.isdir(source) and not os.path.isdir(os.path.join(source, subfolder)):
        # diffusers falls back to the folder itself when a local subfolder is missing: a typo would load (and
        # record) another model than the one asked for
        found = sorted(p.name for p in Path(source).iterdir() if p.is_dir() and not p.name.startswith("."))
        hint = (f"its folders are {found}; fix" if found else "fix") + " --vae_subfolder or leave it out"
        raise VaeLoadError(source, f"it has no subfolder '{subfolder}'", hint + " (the folder itself, else vae/)")
    config, last = None, None
    for sub in [subfolder] if subfolder is not None else [None, "vae"]:
        try:
            with quiet_hub_retries():
                config = diffusers.AutoencoderKL.load_config(source, subfolder=sub)
            subfolder = sub
            break
        except (OSError, ValueError) as err:
            last = err
    if config is None:
        raise VaeLoadError(source, f"no autoencoder config found ({first_line(last)})", "pass a diffusers "
                           "autoencoder folder or hub id (with --vae_subfolder for a pipeline)")
    if not isinstance(config, dict):
        raise VaeLoadError(source, "its config.json is not a JSON object of autoencoder settings")
    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and hasattr(cls, "encode") and hasattr(cls, "decode")):
        raise VaeLoadError(source, f"config class {name!r} is not a diffusers autoencoder")
    try:
        with quiet_hub_retries(), diffusers_logs_on_success():
            vae = cls.from_pretrained(source, subfolder=subfolder, torch_dtype=torch_dtype, use_safetensors=True)
    except Exception as err:  # noqa: BLE001 - missing weights, a config value of the wrong type, ...: cannot load it
        raise VaeLoadError(source, f"cannot load the {name} weights (safetensors only; {first_line(err)})") from err
    vae.eval().requires_grad_(False)
    vae.latent_ddpm_source = {"id": vae_id(source), "subfolder": subfolder}
    return vae


def vae_id(source: str) -> str:
    """A local path made absolute (found again from anywhere); a hub id unchanged."""
    return str(Path(source).resolve()) if Path(source).exists() else source


def vae_info(vae) -> dict[str, Any]:
    """What encoding.json records about an autoencoder: id, class and its scaling config values."""
    info = dict(getattr(vae, "latent_ddpm_source", {"id": None, "subfolder": None}), class_name=type(vae).__name__)
    info.update({k: _plain(vae.config.get(k)) for k in VAE_CONFIG_KEYS})
    return info


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
