"""The model card (README.md) of an uploaded repo: YAML metadata, model summary, usage, config, metrics."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData
from safetensors import safe_open

from ..errors import UserInputError
from ..pipeline import format_class_ids
from ..sources import is_hub_id


def build_model_card(
    repo_id: str,
    folder: str | os.PathLike | None = None,
    *,
    train_config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    images: Mapping[str, str] | None = None,
    datasets: str | list[str] | None = None,
    license: str = "mit",
    tags: list[str] | tuple[str, ...] = (),
    pipeline_tag: str | None = None,
    base_model: str | None = None,
    description: str | None = None,
) -> ModelCard:
    """The repo's README.md: YAML metadata, model summary, usage with and without latent-ddpm, config, metrics.

    Args:
        repo_id: the repository the usage snippets load.
        folder: a saved pipeline or upload folder; its configs and weights give the model summary.
        train_config: the training configuration (e.g. `train/config.json`), shown as YAML; keys
            containing "token" are dropped.
        metrics: final metrics (e.g. `train/metrics.json`), shown as a table.
        images: {alt text: path relative to the repo root}, e.g. {"Samples": "samples.png"}.
        datasets: hub dataset id(s) trained on (default: `train_config["train_data"]` if it is one).
        license, tags, pipeline_tag, base_model: card metadata. No pipeline_tag by default: the
            pipeline outputs latents, not images, so the hub's image widgets do not apply.
        description: a paragraph under the title.
    """
    train_config = {k: v for k, v in (train_config or {}).items() if "token" not in k.lower()}
    for key in LOCAL_PATH_KEYS:  # an absolute local path tells the hub about the user's machine: its name only
        if isinstance(train_config.get(key), str) and os.path.isabs(train_config[key]):
            train_config[key] = Path(train_config[key]).name
    if datasets is None and _looks_like_dataset_id(train_config.get("train_data")):
        datasets = train_config["train_data"]
    datasets = [datasets] if isinstance(datasets, str) else datasets
    data = ModelCardData(library_name="diffusers", license=license, datasets=datasets, base_model=base_model,
                         pipeline_tag=pipeline_tag, tags=list(dict.fromkeys([*CARD_TAGS, *tags])))
    name = repo_id.split("/")[-1]
    parts = [f"# {name}", description or (
        "A DDPM trained on precomputed latents with latent-ddpm. "
        "It generates latents `(C, H, W)` in the data's own scale: decode them with the model (e.g. the VAE) "
        "that produced the training latents.")]
    if folder is not None:
        parts += ["## Model", _model_summary(Path(folder))]
    parts += ["## Usage", USAGE.format(repo_id=repo_id)]
    for alt, path in (images or {}).items():
        parts.append(f"## {alt}\n\n![{alt}]({Path(path).as_posix()})")
    if metrics:
        rows = "\n".join(f"| {k} | {_cell(v)} |" for k, v in metrics.items())
        parts.append(f"## Metrics\n\n| metric | value |\n|---|---|\n{rows}")
    if train_config:
        plain = json.loads(json.dumps(train_config, default=str))
        parts.append(f"## Training configuration\n\n```yaml\n{yaml.safe_dump(plain, sort_keys=False).strip()}\n```")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n")


#: Training settings that may hold a local path (train.py records `train_data` absolute).
LOCAL_PATH_KEYS = ("train_data", "output_dir", "resume_from_checkpoint", "model_config")

#: Tags every card gets.
CARD_TAGS = ["diffusers", "latent-diffusion", "ddpm", "latent-ddpm"]

USAGE = """With the latent-ddpm package installed:

```python
import torch
from latent_ddpm import LatentDDPMPipeline

pipe = LatentDDPMPipeline.from_pretrained("{repo_id}")
latents = pipe(batch_size=4, generator=torch.Generator().manual_seed(0)).latents  # numpy (4, C, H, W)
```

With diffusers only (runs this repo's `pipeline.py` and `unet/advanced_unet.py`):

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)
latents = pipe(batch_size=4, generator=torch.Generator().manual_seed(0)).latents
```

Swap the sampler with any diffusers scheduler, e.g. 50 DDIM steps:

```python
from diffusers import DDIMScheduler

pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
latents = pipe(batch_size=4, num_inference_steps=50).latents
```"""


def find_run_files(pipeline_dir: str | os.PathLike, train_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """What train.py leaves beside a pipeline: {"images": {alt: path}, "train_config": ..., "metrics": ...}.

    Looks in `train_dir` (default `<pipeline_dir>/../train`, if it exists) and in `pipeline_dir`.
    """
    pipeline_dir = Path(pipeline_dir)
    if train_dir is not None and not Path(train_dir).is_dir():
        raise UserInputError(f"train folder {train_dir} does not exist")
    folders = [pipeline_dir] + [Path(train_dir) if train_dir is not None else pipeline_dir.parent / "train"]
    found: dict[str, Any] = {"images": {}}
    for alt, file in RUN_IMAGES.items():
        hits = [d / file for d in folders if (d / file).is_file()]
        if hits:
            found["images"][alt] = hits[0].resolve()
    for key, file in (("train_config", "config.json"), ("metrics", "metrics.json")):
        try:  # an unreadable file is left out of the card, like a missing one
            value = json.loads((folders[-1] / file).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(value, dict):
            found[key] = value
    return found


#: Card section title -> file name, as train.py writes them under run_dir/train.
RUN_IMAGES = {"Samples": "samples.png", "Training loss": "loss_curve.png"}


def _model_summary(folder: Path) -> str:
    unet = json.loads((folder / "unet" / "config.json").read_text())
    index = json.loads((folder / "model_index.json").read_text())
    size = unet.get("sample_size")
    h, w = (size, size) if isinstance(size, int) else size
    n_params = 0
    for weights in (folder / "unet").glob("*.safetensors"):
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n_params += math.prod(shape)
    classes, ids = unet.get("num_class_embeds"), index.get("class_ids")
    conditioning = f"{classes} classes, classifier-free guidance" if classes else "unconditional"
    if classes and isinstance(ids, list) and ids != list(range(classes)):  # ids other than 0..K-1: say which
        conditioning = f"{len(ids)} classes (ids {format_class_ids(ids)}), classifier-free guidance"
    lines = [
        f"- latents: {unet['in_channels']} x {h} x {w} (C x H x W)",
        f"- denoiser: `AdvancedUNet2DModel`, {n_params:,} parameters, widths {unet.get('down_channels')}",
        f"- conditioning: {conditioning}",
        f"- scheduler: `{index['scheduler'][1]}`",
        f"- normalisation: mean {index.get('latents_mean')}, std {index.get('latents_std')}",
    ]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else value if isinstance(value, str) else json.dumps(value)
    return str(text).replace("|", "\\|")


def _looks_like_dataset_id(value: Any) -> bool:
    file_suffixes = (".npz", ".npy", ".parquet", ".arrow", ".pt", ".safetensors")
    return is_hub_id(value) and Path(value).suffix.lower() not in file_suffixes
