"""Share a trained `LatentDDPMPipeline` on the Hugging Face Hub, loadable with or without this package.

An upload folder (`prepare_upload_folder`) holds the saved pipeline (safetensors and JSON configs
only), a model card (`README.md`), the training figures, and the remote code diffusers needs to load
the repo without latent-ddpm: `pipeline.py` and `unet/advanced_unet.py`, generated from this
package's source (see `latent_ddpm.remote.code`), with `model_index.json` pointing at them.

    pipe = LatentDDPMPipeline.from_pretrained("user/repo")                         # this package's classes
    pipe = DiffusionPipeline.from_pretrained("user/repo", trust_remote_code=True)  # diffusers only
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diffusers
import huggingface_hub
from diffusers import DiffusionPipeline
from diffusers.utils import logging
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from . import __version__
from .errors import UserInputError, first_line
from .hybrid_solver import HybridDPMSolverMultistepScheduler
from .paths import remove_path
from .remote.card import build_model_card, find_run_files
from .remote.code import PIPELINE_ENTRY, SCHEDULER_ENTRY, UNET_ENTRY, remote_code_files
from .run_folder import pipeline_of
from .sources import is_hub_id
from .unet import AdvancedUNet2DModel

if TYPE_CHECKING:
    from .pipeline import LatentDDPMPipeline

logger = logging.get_logger(__name__)

__all__ = ["build_model_card", "check_hub_access", "prepare_upload_folder", "push_pipeline_to_hub"]

#: model_index.json entry of the UNet as `save_pretrained` writes it (the package's own module).
PACKAGE_UNET_ENTRY = ["latent_ddpm.unet", "AdvancedUNet2DModel"]
PACKAGE_SCHEDULER_ENTRY = ["latent_ddpm.hybrid_solver", "HybridDPMSolverMultistepScheduler"]
#: `vae=` not given to `from_pretrained` (None given means: load none).
_NOT_GIVEN = object()
#: Files copied from the saved pipeline's component folders; weights are safetensors only, never pickles.
COPIED_SUFFIXES = (".json", ".safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: What `LatentDDPMPipeline.from_pretrained` downloads from a repo: configs and weights, no code.
DOWNLOAD_PATTERNS = ["model_index.json", "*/*.json", "*/*.safetensors"]

_NETWORK_ERRORS: tuple[type[BaseException], ...] = (OfflineModeIsEnabled, ConnectionError, TimeoutError)
try:  # huggingface_hub >= 1.0 talks over httpx (re-exported), older versions over requests
    from huggingface_hub.utils import httpx as _httpx

    _NETWORK_ERRORS += (_httpx.TransportError,)
except ImportError:  # pragma: no cover
    import requests

    _NETWORK_ERRORS += (requests.ConnectionError, requests.Timeout)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, now or when huggingface_hub was imported."""
    env = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE",
                                                                                   "TRANSFORMERS_OFFLINE"))
    return env or huggingface_hub.constants.HF_HUB_OFFLINE


def check_hub_access(repo_id: str, token: str | None = None) -> str:
    """Fail fast, without network, before a long run that ends in an upload; returns the token to use.

    Raises `UserInputError` for an invalid repo id, offline mode, or no token (flag, HF_TOKEN or login).
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserInputError(f"hub repo id {repo_id!r} is not valid ({err})") from None
    if "/" not in repo_id:
        raise UserInputError(f"hub repo id {repo_id!r}: give the full id, e.g. your-name/{repo_id}")
    if hub_offline():
        raise UserInputError("the hub is unreachable (HF_HUB_OFFLINE=1 is set): unset it to push, or drop "
                             "--push_to_hub and upload later with latent_ddpm.hub.push_pipeline_to_hub")
    token = token or huggingface_hub.get_token()
    if not token:
        raise UserInputError("no Hugging Face token: run `huggingface-cli login` (or `hf auth login`), "
                             "pass --hub_token or set HF_TOKEN")
    return token


def prepare_upload_folder(
    pipeline_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    train_dir: str | os.PathLike | None = None,
    images: Mapping[str, str | os.PathLike] | None = None,
    **card_info: Any,
) -> Path:
    """Build, in an empty `out_dir`, exactly the folder `push_pipeline_to_hub` uploads; returns `out_dir`.

    Args:
        pipeline_dir: a `LatentDDPMPipeline.save_pretrained` folder (safetensors weights).
        out_dir: where to build the folder; created, and must be empty if it exists.
        repo_id: the repository id the card's usage snippets name.
        train_dir: the run's `train/` folder (default: `<pipeline_dir>/../train` if it exists); its
            config.json, metrics.json, samples.png and loss_curve.png fill the card unless given.
        images: {alt text: image file} for the card (default: samples.png / loss_curve.png found in
            pipeline_dir or train_dir); copied into the folder.
        card_info: more `build_model_card` arguments (train_config, metrics, datasets, license, ...).
    """
    src, out = Path(pipeline_dir), Path(out_dir)
    index = _read_model_index(src)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"upload folder {out} is a file; name a folder")
    if out.exists() and any(out.iterdir()):
        raise UserInputError(f"upload folder {out} is not empty")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _build_upload_folder(src, out, index, repo_id, train_dir, images, card_info)
    except BaseException:  # a half-built folder would make the retry "not empty"
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in list(out.iterdir()):
                remove_path(child)
        raise


def _build_upload_folder(src: Path, out: Path, index: dict, repo_id: str | None, train_dir, images,
                         card_info: dict) -> Path:
    # 1. The saved pipeline: configs and safetensors weights of each component folder.
    for component in (k for k, v in index.items() if isinstance(v, list) and not k.startswith("_")):
        folder = src / component
        if not folder.is_dir():
            continue
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UserInputError(f"{folder} holds pickled weights ({', '.join(pickles)}): save with "
                                 "safe_serialization=True; only safetensors are uploaded")
        (out / component).mkdir()
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix in COPIED_SUFFIXES:
                shutil.copy2(f, out / component / f.name)
    if not any((out / "unet").glob("*.safetensors")):
        raise UserInputError(f"{src / 'unet'} has no .safetensors weights: save with safe_serialization=True")

    # 2. model_index.json pointing at the remote code, and the code itself.
    hybrid = index.get("scheduler") in (PACKAGE_SCHEDULER_ENTRY, SCHEDULER_ENTRY)  # saved, or an upload again
    if not hybrid and index.get("scheduler", ["diffusers"])[0] != "diffusers":
        raise UserInputError(f"{src}: its scheduler {index['scheduler']} is neither a diffusers scheduler nor this "
                             "package's; set pipe.scheduler to one of those and save it again")
    index.update(_class_name=PIPELINE_ENTRY, unet=UNET_ENTRY, **({"scheduler": SCHEDULER_ENTRY} if hybrid else {}))
    index.pop("_name_or_path", None)
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for path, text in remote_code_files(__version__, hybrid_scheduler=hybrid).items():
        (out / path).write_text(text, encoding="utf-8")

    # 3. Figures and the model card.
    run_files = find_run_files(src, train_dir)
    card_images: dict[str, str] = {}
    found_images = run_files.pop("images")
    for alt, image in (found_images if images is None else images).items():
        image = Path(image)  # a relative path is relative to the current folder, like every other path given
        if not image.is_file():
            raise UserInputError(f"model card image {image} does not exist")
        name = image.name
        for n in itertools.count(2):  # two images of one name (a/samples.png, b/samples.png) stay two
            if name not in card_images.values() and name not in ("README.md", "model_index.json"):
                break
            name = f"{image.stem}_{n}{image.suffix}"
        shutil.copy2(image, out / name)
        card_images[alt] = name
    card_info = {**run_files, **card_info}
    card = build_model_card(repo_id or "your-name/your-repo", out, images=card_images, **card_info)
    card.save(out / "README.md")
    return out


def push_pipeline_to_hub(
    pipeline_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload LatentDDPMPipeline",
    revision: str | None = None,
    train_dir: str | os.PathLike | None = None,
    images: Mapping[str, str | os.PathLike] | None = None,
    create_pr: bool = False,
    **card_info: Any,
) -> str:
    """Upload a saved pipeline with its model card, figures and remote code; returns the commit URL.

    Creates the repo if needed (`private` only applies then). Call it for the final pipeline and, if
    wanted, for each checkpoint's pipeline (same repo, one commit each: the hub keeps the history);
    `create_pr` opens a pull request instead of committing to the branch.
    Raises `UserInputError` (one line; exit 2 in CLIs) when offline, without token, or refused.
    """
    token = check_hub_access(repo_id, token)
    with tempfile.TemporaryDirectory(prefix="latent_ddpm_upload_") as tmp:
        folder = prepare_upload_folder(pipeline_dir, Path(tmp) / "upload", repo_id=repo_id, train_dir=train_dir,
                                       images=images, **card_info)
        url = _upload(folder, repo_id, private=private, token=token, commit_message=commit_message,
                      revision=revision, create_pr=create_pr)
    logger.info(f"uploaded {pipeline_dir} to {url}")
    return url


def _upload(folder: Path, repo_id: str, *, private: bool, token: str | None, commit_message: str,
            revision: str | None = None, create_pr: bool = False) -> str:
    """Create the repo if needed and upload `folder` as one commit; returns the commit URL. Network and HTTP
    errors become one-line `UserInputError`s."""
    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_url.repo_id, folder_path=folder, commit_message=commit_message,
                                   revision=revision, repo_type="model", create_pr=create_pr)
    except _NETWORK_ERRORS as err:
        raise UserInputError(f"the hub is unreachable ({type(err).__name__}: {err}); check the network "
                             "or HF_ENDPOINT, or upload later with latent_ddpm.hub.push_pipeline_to_hub") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise UserInputError(f"the hub refused the upload to {repo_id} (HTTP {status}): check that the "
                                 "token is valid and has write access to that namespace") from None
        raise UserInputError(f"the hub answered the upload to {repo_id} with HTTP {status or '?'} "
                             f"({first_line(err)[:200]}); check HF_ENDPOINT, or try again later with "
                             "latent_ddpm.hub.push_pipeline_to_hub") from None
    return getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or str(commit)


def push_pipeline(pipe: LatentDDPMPipeline, repo_id: str, *, commit_message: str | None = None,
                  private: bool | None = None, token: str | None = None, variant: str | None = None,
                  **kwargs: Any) -> str:
    """`LatentDDPMPipeline.push_to_hub`: save the pipeline, then `push_pipeline_to_hub` (card + remote code)."""
    kwargs.pop("safe_serialization", None)  # always safetensors
    with tempfile.TemporaryDirectory(prefix="latent_ddpm_save_") as tmp:
        saved = Path(tmp) / "pipeline"  # no train/ beside it: the card only gets what kwargs give
        pipe.save_pretrained(saved, safe_serialization=True, variant=variant)
        return push_pipeline_to_hub(saved, repo_id, private=bool(private), token=token,
                                    commit_message=commit_message or "Upload LatentDDPMPipeline", **kwargs)


def save_pipeline(pipe: LatentDDPMPipeline, save_directory: str | os.PathLike, *args: Any, push_to_hub: bool = False,
                  **kwargs: Any) -> None:
    """`LatentDDPMPipeline.save_pretrained`. diffusers' own `push_to_hub=True` uploaded the bare folder: no model
    card, and no remote code, so `DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` failed."""
    hub = {k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message", "create_pr") if k in kwargs}
    if push_to_hub:  # diffusers' default repo id: the folder's name; checked before anything is written
        repo_id = hub.pop("repo_id", None) or Path(save_directory).name
        token = check_hub_access(repo_id, hub.pop("token", None))
    DiffusionPipeline.save_pretrained(pipe, save_directory, *args, **kwargs)
    if push_to_hub:
        push_pipeline_to_hub(save_directory, repo_id, token=token, private=bool(hub.pop("private", None)),
                             **{k: v for k, v in hub.items() if v is not None})


def load_pipeline(cls: type[LatentDDPMPipeline], pretrained_model_name_or_path: str | os.PathLike,
                  **kwargs: Any) -> LatentDDPMPipeline:
    """`LatentDDPMPipeline.from_pretrained`: a local folder (a train.py run folder: its pipeline/) or repo id,
    loaded with this package's classes.

    Repo ids are fetched with `snapshot_download` (configs and safetensors, never code), so diffusers'
    refusal of repos whose `model_index.json` names a package module does not apply. Folders in the
    upload layout (remote code) are built here from the package's `AdvancedUNet2DModel`, without running
    the repo's code; other folders go through `DiffusionPipeline.from_pretrained`.
    """
    path = os.fspath(pretrained_model_name_or_path)
    kwargs.pop("trust_remote_code", None)  # the package's code is used; nothing remote runs
    kwargs.pop("custom_pipeline", None)
    folder = pipeline_of(path if os.path.isdir(path) else _download(path, kwargs))  # a run folder: its pipeline/
    index = _read_model_index(Path(folder)) if os.path.isfile(os.path.join(folder, "model_index.json")) else {}
    if index.get("unet") != UNET_ENTRY:  # save_pretrained's layout: diffusers loads it as usual
        pipe = DiffusionPipeline.from_pretrained.__func__(cls, folder, **kwargs)
        pipe.register_to_config(_name_or_path=path)
        return pipe

    model_kwargs = {k: kwargs.pop(k) for k in ("torch_dtype", "dtype", "variant", "use_safetensors",
                                               "low_cpu_mem_usage", "device_map", "max_memory") if k in kwargs}
    unet = kwargs.pop("unet", None) or AdvancedUNet2DModel.from_pretrained(folder, subfolder="unet", **model_kwargs)
    scheduler = kwargs.pop("scheduler", None)
    if scheduler is None:
        entry = index.get("scheduler")
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            raise UserInputError(f"{path}: model_index.json's scheduler entry must be [library, class name], got "
                                 f"{entry!r}; save the pipeline again")
        library, name = entry
        if entry in (SCHEDULER_ENTRY, PACKAGE_SCHEDULER_ENTRY):  # its hub copy, or the package's own
            scheduler_cls = HybridDPMSolverMultistepScheduler
        else:
            scheduler_cls = getattr(diffusers, name, None) if library == "diffusers" else None
        if scheduler_cls is None:
            raise UserInputError(f"{path}: model_index.json names an unknown scheduler {library}.{name}")
        scheduler = scheduler_cls.from_pretrained(folder, subfolder="scheduler")
    stats = {k: kwargs.pop(k, index.get(k)) for k in ("latents_mean", "latents_std", "class_ids")}
    vae = kwargs.pop("vae", _NOT_GIVEN)  # vae=None: none, as diffusers does for an optional component
    if vae is _NOT_GIVEN:
        vae = None
        if isinstance(index.get("vae"), list) and index["vae"][0] == "diffusers":
            vae_cls = getattr(diffusers, index["vae"][1], None)
            if vae_cls is None:
                raise UserInputError(f"{path}: model_index.json names an unknown autoencoder "
                                     f"diffusers.{index['vae'][1]}")
            vae = vae_cls.from_pretrained(folder, subfolder="vae", **model_kwargs)
    if kwargs:
        logger.warning(f"Keyword arguments {sorted(kwargs)} are not expected by {cls.__name__} and will be ignored.")
    pipe = cls(unet=unet, scheduler=scheduler, vae=vae, **stats)
    pipe.register_to_config(_name_or_path=path)
    return pipe


def _download(repo_id: str, kwargs: dict[str, Any]) -> str:
    """Fetch a repo's configs and weights into the hub cache (or find them there when offline)."""
    hub_kwargs = {k: kwargs.pop(k) for k in ("cache_dir", "force_download", "local_files_only", "token", "revision")
                  if k in kwargs}
    kwargs.pop("proxies", None)
    if not is_hub_id(repo_id):
        raise UserInputError(f"{repo_id} is not a folder (and not a hub repo id of the form owner/name)")
    try:
        return snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS, **hub_kwargs)
    except (LocalEntryNotFoundError, *_NETWORK_ERRORS) as err:
        offline = "unset HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0") else (
            "connect to the network")
        raise UserInputError(f"{repo_id}: no such folder, and as a hub id it is not in the local Hugging Face cache "
                             f"and the hub is unreachable ({type(err).__name__}); check the path, or {offline}"
                             ) from None


def _read_model_index(folder: Path) -> dict[str, Any]:
    """The folder's model_index.json, checked to be a LatentDDPMPipeline."""
    path = folder / "model_index.json"
    if not path.is_file():
        raise UserInputError(f"{folder} is not a saved pipeline (no model_index.json)")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(f"{path}: not readable JSON ({first_line(err)}); save the pipeline again") from None
    if not isinstance(index, dict):
        raise UserInputError(f"{path}: not a pipeline index (a JSON object); save the pipeline again")
    class_name = index.get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, list) else class_name
    if class_name != "LatentDDPMPipeline" or index.get("unet") not in (PACKAGE_UNET_ENTRY, UNET_ENTRY):
        raise UserInputError(f"{path} describes a {class_name} with unet {index.get('unet')}, not a "
                             "LatentDDPMPipeline with an AdvancedUNet2DModel")
    return index
