"""Convert the original project's UNet checkpoints (`model.pth`, `ddpm_epoch_N.pt`) to `AdvancedUNet2DModel`.

The original saved plain `torch.save(model.state_dict())` files (its training wrapper prefixed every
key with `model.`). They are read with `torch.load(..., weights_only=True)`, so a file holding
pickled code is refused, never run. Keys are renamed with a small table (`ORIGINAL_TO_DIFFUSERS`) and
loaded strictly: every key must match, both ways, with the same shapes.

    python -m latent_ddpm.convert_original runs/x_ddpm_4_50_0.0001_0.02/train/model.pth converted/ \
        --in_channels 4 --pipeline --n_steps 50
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError

from .config import MAX_TRAIN_TIMESTEPS
from .errors import ArgumentParser, UserInputError, first_line, run_cli
from .paths import unwritable_folder
from .unet import PRESETS, AdvancedUNet2DModel

#: The original project's noise schedule defaults (its --n_steps, --lbeta, --ubeta), for --pipeline.
ORIGINAL_SCHEDULE = {"n_steps": 50, "lbeta": 1e-4, "ubeta": 0.02}

# (pattern, replacement) applied in order with re.sub to every original key (after removing a
# `model.` prefix). Keys no rule touches (conv_in, norm_out, conv_out) keep their names.
ORIGINAL_TO_DIFFUSERS: list[tuple[str, str]] = [
    (r"^t_proj\.0\.", "time_embedding.linear_1."),
    (r"^t_proj\.2\.", "time_embedding.linear_2."),
    (r"^downs\.", "down_blocks."),
    (r"^mids\.", "mid_blocks."),
    (r"^ups\.", "up_blocks."),
    (r"\.resnet_conv_first\.(\d+)\.0\.", r".resnets.\1.norm1."),
    (r"\.resnet_conv_first\.(\d+)\.2\.", r".resnets.\1.conv1."),
    (r"\.t_emb_layers\.(\d+)\.1\.", r".resnets.\1.time_emb_proj."),
    (r"\.resnet_conv_second\.(\d+)\.0\.", r".resnets.\1.norm2."),
    (r"\.resnet_conv_second\.(\d+)\.2\.", r".resnets.\1.conv2."),
    (r"\.residual_input_conv\.(\d+)\.", r".resnets.\1.conv_shortcut."),
    (r"\.attention_norms\.(\d+)\.", r".attentions.\1.norm."),
    # nn.MultiheadAttention's fused [q; k; v] projection is laid out exactly like to_qkv.
    (r"\.attentions\.(\d+)\.in_proj_(weight|bias)$", r".attentions.\1.to_qkv.\2"),
    (r"\.attentions\.(\d+)\.out_proj\.", r".attentions.\1.to_out."),
    (r"\.down_sample_conv\.", ".downsample."),
    (r"\.up_sample_conv\.", ".upsample."),
]
_PREFIXES = ("model.", "module.")  # the original training wrapper; DataParallel
_SHOW = 3  # keys named per list in an error message


def rename_original_key(key: str) -> str:
    """The `AdvancedUNet2DModel` name of an original state-dict key (prefix already removed)."""
    for pattern, replacement in ORIGINAL_TO_DIFFUSERS:
        key = re.sub(pattern, replacement, key)
    return key


def read_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an original checkpoint as a plain state dict with the `model.` prefix removed.

    Accepts a state dict, or a dict wrapping one under "model" or "state_dict"; `.safetensors` files
    too. Anything else raises `UserInputError` (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"checkpoint {path} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _detail(err)
        if "GLOBAL" in detail:  # weights_only=True met a class or function: code it will never run
            raise UserInputError(
                f"refused to load {path}: it holds pickled code or objects, not only tensors ({detail}); "
                "re-save it in the original project with torch.save(model.state_dict(), path)"
            ) from None
        raise UserInputError(f"cannot read checkpoint {path}: not a torch.save file ({detail})") from None
    except Exception as err:  # corrupt zip, not a torch file, permissions, ...
        raise UserInputError(f"cannot read checkpoint {path}: {type(err).__name__}: {first_line(err)}") from None

    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj:
        raise UserInputError(
            f"{path} is not a model state dict (got {type(obj).__name__}{' (empty)' if obj == {} else ''}); "
            "expected the original's torch.save(model.state_dict()) file"
        )
    for key, value in obj.items():
        if not isinstance(key, str):
            raise UserInputError(f"{path} is not a model state dict: it has the key {key!r} ("
                                 f"{type(key).__name__}) where parameter names are strings")
        if not isinstance(value, torch.Tensor):
            raise UserInputError(f"{path} is not a model state dict: entry {key!r} holds "
                                 f"{type(value).__name__}, not a tensor")
    for key, tensor in obj.items():
        if tensor.layout != torch.strided or tensor.is_meta or tensor.is_complex():
            raise UserInputError(f"{path}: entry {key!r} is not a plain real tensor ({tensor.layout}, {tensor.dtype}"
                                 f"{', meta' if tensor.is_meta else ''}); expected the original's dense weights")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserInputError(f"{path}: entry {key!r} holds NaN/Inf values (the run had diverged when it was "
                                 "saved); convert an earlier checkpoint (ddpm_epoch_N.pt)")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def infer_original_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """Read the `AdvancedUNet2DModel` config an original state dict was built with, as far as its shapes tell.

    num_heads and sample_size are not stored in the weights (the original used 4 heads and 64x64).
    Returns only the values it could find.
    """
    sd, config = state_dict, {}

    def count(prefix: str) -> int:
        pat = re.compile(re.escape(prefix) + r"(\d+)\.")
        return len({m.group(1) for k in sd if (m := pat.match(k))})

    n_down, n_mid = count("downs."), count("mids.")
    try:
        if "conv_in.weight" in sd:
            config["in_channels"] = sd["conv_in.weight"].shape[1]
        if "t_proj.0.weight" in sd:
            config["time_emb_dim"] = sd["t_proj.0.weight"].shape[0]
        if "conv_out.weight" in sd:
            config["head_channels"] = sd["conv_out.weight"].shape[1]
        if n_down:
            config["down_channels"] = [sd["conv_in.weight"].shape[0]] + [
                sd[f"downs.{b}.resnet_conv_first.0.2.weight"].shape[0] for b in range(n_down)
            ]
            config["down_sample"] = [f"downs.{b}.down_sample_conv.weight" in sd for b in range(n_down)]
            config["num_down_layers"] = count("downs.0.resnet_conv_first.")
        if n_mid:
            config["mid_channels"] = [sd["mids.0.resnet_conv_first.0.2.weight"].shape[1]] + [
                sd[f"mids.{b}.resnet_conv_first.0.2.weight"].shape[0] for b in range(n_mid)
            ]
            config["num_mid_layers"] = count("mids.0.resnet_conv_first.") - 1
        if count("ups."):
            config["num_up_layers"] = count("ups.0.resnet_conv_first.")
    except (KeyError, IndexError):
        pass  # an incomplete or malformed checkpoint: the strict key and shape check reports it
    return config


def load_original_checkpoint(
    path: str | os.PathLike, cls: type[AdvancedUNet2DModel] = AdvancedUNet2DModel, **config
) -> AdvancedUNet2DModel:
    """Build `cls(**config)` and load an original checkpoint into it, strictly.

    `config` defaults to the original's model (the `seed` preset); `in_channels` defaults to the
    checkpoint's. Raises `UserInputError` (one line) for an unreadable file, a config the model
    rejects, or a checkpoint whose keys or shapes do not match the config, naming the flags to pass.
    """
    original = read_original_state_dict(path)
    inferred = infer_original_config(original)
    config = {**PRESETS["seed"], **config}
    if config.get("in_channels") is None:
        config["in_channels"] = inferred.get("in_channels", 4)
    try:
        model = cls(**config)
    except ValueError as err:
        raise UserInputError(str(err)) from None

    renamed: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # our key -> original key, for error messages
    for key, tensor in original.items():
        new = rename_original_key(key)
        if new in renamed:
            raise UserInputError(f"{path}: keys {source[new]!r} and {key!r} both map to {new!r}")
        renamed[new], source[new] = tensor, key

    expected = model.state_dict()
    missing = [k for k in expected if k not in renamed]
    unexpected = [source[k] for k in renamed if k not in expected]
    wrong = [
        f"{source[k]} {tuple(renamed[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in renamed and renamed[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s) ({_few(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
        if wrong:
            problems.append(f"{len(wrong)} shape mismatch(es), checkpoint vs model ({_few(wrong)})")
        raise UserInputError(
            f"checkpoint {path} does not match the model config: {'; '.join(problems)}. "
            f"The checkpoint's shapes suggest: {_as_flags(inferred) or 'nothing (is it an original UNet?)'}; "
            "pass those flags (or keyword arguments), and the right --num_heads if not 4"
        )
    model.load_state_dict(renamed, strict=True)
    return model.eval()


def _few(items: list[str]) -> str:
    return ", ".join(items[:_SHOW]) + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _detail(err: BaseException) -> str:
    """The line of a weights_only error that says what was refused (torch wraps it in boilerplate)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    hits = [line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")]
    return (hits or lines or ["no details"])[0]


def _as_flags(config: dict) -> str:
    def fmt(v) -> str:
        return " ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)

    return " ".join(f"--{k} {fmt(v)}" for k, v in config.items())


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "y"):
        return True
    if low in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m latent_ddpm.convert_original",
        description="Convert an original project checkpoint (model.pth, ddpm_epoch_N.pt) to a diffusers "
        "AdvancedUNet2DModel (safetensors), or with --pipeline a LatentDDPMPipeline. Model flags default to the "
        "original's model (the `seed` preset); --in_channels defaults to the checkpoint's.",
    )
    p.add_argument("checkpoint", help="the original's torch.save(model.state_dict()) file")
    p.add_argument("output_dir", help="where to save_pretrained (must be empty or new unless --overwrite)")
    p.add_argument("--in_channels", type=int, help="latent channels (the original --n_dim); default: from checkpoint")
    p.add_argument("--down_channels", type=int, nargs="+")
    p.add_argument("--mid_channels", type=int, nargs="+")
    p.add_argument("--time_emb_dim", type=int)
    p.add_argument("--down_sample", type=_bool, nargs="+", metavar="BOOL")
    p.add_argument("--num_down_layers", type=int)
    p.add_argument("--num_mid_layers", type=int)
    p.add_argument("--num_up_layers", type=int)
    p.add_argument("--num_heads", type=int)
    p.add_argument("--head_channels", type=int, help="width of the last up block (the original's 16)")
    p.add_argument("--sample_size", type=int, nargs="+", metavar="SIZE",
                   help="latent size: H, or H W (default 64)")
    p.add_argument("--pipeline", action="store_true", help="save a full LatentDDPMPipeline (unet + scheduler)")
    p.add_argument("--n_steps", type=int, help="with --pipeline: training timesteps of the original run (default 50)")
    p.add_argument("--lbeta", type=float, help="with --pipeline: first beta of the original run (default 1e-4)")
    p.add_argument("--ubeta", type=float, help="with --pipeline: last beta of the original run (default 0.02)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUTPUT_DIR")
    return p


_MODEL_FLAGS = ("in_channels", "down_channels", "mid_channels", "time_emb_dim", "down_sample", "num_down_layers",
                "num_mid_layers", "num_up_layers", "num_heads", "head_channels", "sample_size")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see `build_parser`)."""
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UserInputError(f"output directory {out} is not empty; pick a new one or pass --overwrite")
    if problem := unwritable_folder(out):
        raise UserInputError(f"output {out}: {problem}; pick another output directory")
    schedule = [f"--{k}" for k in ("n_steps", "lbeta", "ubeta") if getattr(args, k) is not None]
    if schedule and not args.pipeline:  # they would be ignored
        raise UserInputError(f"{' '.join(schedule)} describe the noise schedule of a --pipeline; add --pipeline or "
                             "drop them")
    for flag, default in ORIGINAL_SCHEDULE.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    if args.pipeline:
        if not 2 <= args.n_steps <= MAX_TRAIN_TIMESTEPS:  # train.py's range (1 step leaves samplers 0 to take)
            raise UserInputError(f"--n_steps must be in 2..{MAX_TRAIN_TIMESTEPS}, got {args.n_steps}")
        if not 0 < args.lbeta < args.ubeta < 1:
            raise UserInputError(f"need 0 < --lbeta < --ubeta < 1, got {args.lbeta} and {args.ubeta}")
    if args.sample_size is not None and len(args.sample_size) > 2:
        raise UserInputError(f"--sample_size takes H or H W, got {len(args.sample_size)} numbers")

    config = {k: getattr(args, k) for k in _MODEL_FLAGS if getattr(args, k) is not None}
    if "sample_size" in config:
        size = config["sample_size"]
        config["sample_size"] = size[0] if len(size) == 1 else tuple(size)
    model = load_original_checkpoint(args.checkpoint, AdvancedUNet2DModel, **config)

    try:
        out.mkdir(parents=True, exist_ok=True)
        if args.pipeline:
            from .pipeline import LatentDDPMPipeline, default_scheduler

            scheduler = default_scheduler(num_train_timesteps=args.n_steps, beta_start=args.lbeta,
                                          beta_end=args.ubeta)
            LatentDDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
        else:
            model.save_pretrained(out, safe_serialization=True)
    except (OSError, SafetensorError) as err:  # a full disk, a read-only mount
        raise UserInputError(f"cannot write {out} ({first_line(err)}); free space or pick another output "
                             "directory") from None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"converted {args.checkpoint} ({n_params:,} parameters) -> {out}{' (pipeline)' if args.pipeline else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
