"""Encode images to latents with a diffusers autoencoder, as a latent dataset `train.py` reads (docs/encode.md).

    python -m latent_ddpm.encode --data images/ --vae stabilityai/sd-vae-ft-mse --resolution 256 --output latents/
    accelerate launch -m latent_ddpm.encode --data user/images --vae DIR --resolution 512 --output latents/

Latents are the posterior mean (or a sample with --sample_posterior), stored RAW: not multiplied by the
autoencoder's scaling_factor. `OUTPUT/encoding.json` records the autoencoder, its scaling factors and the
settings. The work goes in shards of --shard_size images under `OUTPUT.partial/`; a rerun of the same
command skips the complete shards, and the last step concatenates them into OUTPUT.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import sys
from pathlib import Path

import datasets
import diffusers
import numpy as np
import torch
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from . import faults
from .autoencoder import ENCODING_FILE, load_vae, vae_id, vae_info
from .data import DataError, latent_features
from .errors import UserInputError, first_line, run_cli
from .image_data import open_image_dataset, pick_columns
from .images import prepare_image, to_model_range
from .paths import check_replaceable, remove_path, replace_with, unwritable_folder, write_text_atomically
from .sampling import DTYPES, ArgParser, distributed_state, first_error, sample_seed

#: Version of the encoding.json layout.
ENCODING_FORMAT = 1
#: Images per shard: the unit of resumption (a rerun redoes at most one shard per process).
DEFAULT_SHARD_SIZE = 1024
#: Skipped images listed by name in encoding.json (all are counted); and messages printed per kind.
MAX_LISTED_SKIPS, MAX_PRINTED = 100, 10
#: Settings that must match when a partial encode is resumed.
RESUME_KEYS = ("data", "split", "image_column", "label_column", "vae", "vae_subfolder", "resolution", "flip_augment",
               "sample_posterior", "seed", "min_size", "shard_size", "mixed_precision")


class Tally:
    """Counts skipped and adjusted images; prints the first `MAX_PRINTED` messages of each kind to stderr."""

    def __init__(self, counts: dict | None = None, skipped: list | None = None):
        self.counts, self.skipped = dict(counts or {}), list(skipped or [])

    def add(self, kind: str, where: str, message: str, skipped: bool = False) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if skipped and len(self.skipped) < MAX_LISTED_SKIPS:
            self.skipped.append({"image": where, "reason": message})
        if self.counts[kind] <= MAX_PRINTED:
            more = f" (more are counted in {ENCODING_FILE})" if self.counts[kind] == MAX_PRINTED else ""
            tqdm.write(f"{'warning' if skipped or kind == 'upscaled' else 'note'}: {where}: {message}{more}\n",
                       file=sys.stderr, end="")  # one write: the ranks share stderr


@torch.no_grad()
def encode_batch(vae, pixels: np.ndarray, rows: list[int], sample: bool, seed: int) -> np.ndarray:
    """uint8 images (B, H, W, 3) -> raw latents (B, C, h, w) float32: the posterior mean, or a sample whose
    noise for output row r comes from `sample_seed(seed, r)` (independent of batches and processes)."""
    x = torch.from_numpy(to_model_range(pixels)).to(device=vae.device, dtype=vae.dtype)
    out = vae.encode(x, return_dict=False)[0]
    if hasattr(out, "mean") and hasattr(out, "std"):  # a posterior (AutoencoderKL & co.)
        z = out.mean.float()
        if sample:
            noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(sample_seed(seed, r)))
                                 for r in rows]).to(z.device)
            z = z + out.std.float() * noise
    else:  # deterministic encoders (AutoencoderTiny, ...) return the latents
        z = out.float()
    z = z.cpu().numpy()
    if not np.isfinite(z).all():
        raise UserInputError("the autoencoder produced NaN/Inf latents; with --mixed_precision fp16 use bf16 or no "
                             "(or an fp16-safe VAE)")
    return z


def encode_shard(vae, ds, image_column: str, labels: np.ndarray | None, rows: range, args, shape, out: Path,
                 bar) -> None:
    """Encode images `rows` into the Arrow file `out` (written to a temp name, then renamed) and write
    `out`.done.json with its counts: the shard's completion marker."""
    tally = Tally()
    tmp = out.with_name(out.name + ".tmp")
    writer = ArrowWriter(features=latent_features(shape, labels is not None), path=str(tmp))
    try:  # any failure (a full disk mid-shard, an interrupt) leaves no partial file behind
        for start in range(rows.start, rows.stop, args.batch_size):
            idx = range(start, min(rows.stop, start + args.batch_size))
            entries = ds[idx.start:idx.stop][image_column]
            kept, pixels = [], []
            for i, entry in zip(idx, entries, strict=True):
                where = _describe(entry, i)
                prepared = prepare_image(entry, args.resolution, args.min_size)
                if prepared.pixels is None:
                    kind, message = prepared.skip.split(": ", 1)
                    tally.add(kind, where, f"skipped, {message}", skipped=True)
                    continue
                for kind, message in prepared.notes:
                    tally.add(kind, where, message)
                kept.append(i)
                pixels.append(prepared.pixels)
            bar.update(len(idx))
            if not kept:
                continue
            pixels = np.stack(pixels)
            if args.flip_augment:  # each image, then its mirror image: rows 2i and 2i + 1
                pixels = np.stack([pixels, pixels[:, :, ::-1]], axis=1).reshape(-1, *pixels.shape[1:])
            copies = 2 if args.flip_augment else 1
            out_rows = [copies * i + k for i in kept for k in range(copies)]
            z = encode_batch(vae, pixels, out_rows, args.sample_posterior, args.seed)
            batch = {"latents": z}
            if labels is not None:
                batch["labels"] = np.repeat(labels[kept], copies)
            writer.write_batch(batch)
        writer.finalize()
        os.replace(tmp, out)
        marker = {"images": len(rows), "counts": tally.counts, "skipped": tally.skipped}
        # atomic: a half marker would read as done
        write_text_atomically(out.with_name(out.name + ".done.json"), json.dumps(marker))
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()  # its file handle, before the file goes
        tmp.unlink(missing_ok=True)
        raise


def _describe(entry, index: int) -> str:
    path = entry.get("path") if isinstance(entry, dict) else entry if isinstance(entry, str) else None
    return f"{path} (image {index})" if path else f"image {index}"


def encode_images(args) -> dict:
    """Run the whole encode for parsed arguments (see `parse_args`); returns the encoding.json content."""
    state = distributed_state()
    faults.limit_file_size(state.process_index)  # a test's full disk in one rank
    inputs = [args.data, *glob.glob(args.data), args.vae, args.cache_dir]  # --data may be a glob of parquet files
    output = check_replaceable(args.output, "--output", inputs)
    partial = check_replaceable(output.with_name(output.name + ".partial"), "--output's work folder", inputs)
    if os.path.lexists(output) and not args.overwrite:
        raise UserInputError(f"--output {output} exists; pass --overwrite to replace it, or choose another folder")
    if problem := unwritable_folder(output.parent):
        raise UserInputError(f"--output {output}: {problem}; choose another --output")
    settings = {k: getattr(args, k) for k in RESUME_KEYS}
    settings["vae"] = vae_id(args.vae)

    # 1. Images, labels and the autoencoder; the latent shape from one dummy encode.
    ds = open_image_dataset(args.data, args.split, args.cache_dir)
    ds, image_column, labels, label_names = pick_columns(ds, args.image_column, args.label_column, args.data)
    vae = load_vae(args.vae, args.vae_subfolder, DTYPES[args.mixed_precision]).to(state.device)
    shape = latent_shape(vae, args.resolution)

    # 2. The work folder: a resumed run must use the same settings. The main process decides and every process
    #    gets its verdict (the others would die in a collective with a traceback, or wait for the timeout).
    num_shards = -(-len(ds) // args.shard_size)
    error = None
    if state.is_main_process:
        try:
            _prepare_work_folder(partial, settings, args.overwrite)
        except UserInputError as err:
            error = str(err)
        except OSError as err:  # a full or read-only disk
            error = f"--output {output}: cannot write its work folder {partial} ({err.strerror or err}); free " \
                    "space or choose another --output"
    if (error := first_error(error)) is not None:
        raise UserInputError(error)

    # 3. This process's shards (shard k goes to process k % num_processes); complete ones are skipped.
    shard_path = [partial / f"shard-{k:05d}.arrow" for k in range(num_shards)]
    done = [p.with_name(p.name + ".done.json").is_file() for p in shard_path]
    mine = [k for k in range(state.process_index, num_shards, state.num_processes)]
    todo = [k for k in mine if not done[k]]
    size = lambda k: min(len(ds), (k + 1) * args.shard_size) - k * args.shard_size  # noqa: E731
    bar = tqdm(total=sum(size(k) for k in mine), initial=sum(size(k) for k in mine if done[k]), unit="image",
               desc="encoding", disable=not state.is_main_process)
    error = None
    try:
        for k in todo:
            rows = range(k * args.shard_size, k * args.shard_size + size(k))
            encode_shard(vae, ds, image_column, labels, rows, args, shape, shard_path[k], bar)
    except OSError as err:  # a full disk: finished shards stay, and a rerun of the same command resumes
        error = f"--output {output}: cannot write {err.filename or 'a shard'} in {partial} ({err.strerror or err}); " \
                "free space, then rerun the same command: it resumes from the finished shards"
    bar.close()
    if (error := first_error(error)) is not None:  # every rank learns of any rank's failure
        raise UserInputError(error)
    if not state.is_main_process:
        return {}

    # 4. Concatenate the shards into OUTPUT (saved beside, then renamed) with encoding.json.
    tally, parts = Tally(), []
    for path in shard_path:
        marker = json.loads(path.with_name(path.name + ".done.json").read_text())
        for kind, n in marker["counts"].items():
            tally.counts[kind] = tally.counts.get(kind, 0) + n
        tally.skipped += marker["skipped"][: MAX_LISTED_SKIPS - len(tally.skipped)]
        part = datasets.Dataset.from_file(str(path))
        parts.append(part) if len(part) else None
    if not parts:
        shutil.rmtree(partial, ignore_errors=True)  # nothing in it worth resuming
        raise DataError(f"--data {args.data}: none of the {len(ds)} images could be encoded (see the warnings)")
    final = partial / "dataset"
    shutil.rmtree(final, ignore_errors=True)
    try:
        datasets.concatenate_datasets(parts).save_to_disk(str(final))
    except OSError as err:
        shutil.rmtree(final, ignore_errors=True)
        raise UserInputError(f"--output {output}: cannot write the dataset ({err.strerror or err}); free space, then "
                             "rerun the same command: the encoded shards are kept") from None
    info = {
        "format": ENCODING_FORMAT,
        "vae": vae_info(vae),
        "latents": "raw (unscaled): decode with vae.decode(latents) directly",
        "posterior": "sample" if args.sample_posterior else "mean",
        "latent_shape": list(shape),
        "settings": settings,
        "label_names": label_names,
        "counts": {"images": len(ds), "latents": sum(len(p) for p in parts),
                   "skipped_corrupt": tally.counts.get("corrupt", 0),
                   "skipped_too_small": tally.counts.get("too_small", 0),
                   "upscaled": tally.counts.get("upscaled", 0), "converted_to_rgb": tally.counts.get("converted", 0)},
        "skipped": tally.skipped,
    }
    (final / ENCODING_FILE).write_text(json.dumps(info, indent=2) + "\n")
    del parts
    replace_with(final, output)
    shutil.rmtree(partial, ignore_errors=True)
    return info


def _prepare_work_folder(partial: Path, settings: dict, overwrite: bool) -> None:
    """Create (or, for the same settings, keep) the work folder of an encode, with its settings.json."""
    old = _interrupted_settings(partial, overwrite)
    if old is None and os.path.lexists(partial):  # --overwrite
        remove_path(partial)
    elif old is not None and old != settings:
        diff = ", ".join(f"--{k} {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v)
        raise UserInputError(f"{partial} holds an interrupted encode with other settings ({diff}); rerun with "
                             "the same flags to resume, or pass --overwrite to start again")
    partial.mkdir(parents=True, exist_ok=True)
    write_text_atomically(partial / "settings.json", json.dumps(settings, indent=2))  # a rerun must be able to read it


def _interrupted_settings(partial: Path, overwrite: bool) -> dict | None:
    """The settings of the interrupted encode in `partial`, or None when there is none (or --overwrite drops it).
    Anything else there, not written by an encode, is refused rather than deleted."""
    if not os.path.lexists(partial) or overwrite:
        return None
    try:
        settings = json.loads((partial / "settings.json").read_text())
    except (OSError, ValueError):
        settings = None
    if not isinstance(settings, dict):
        raise UserInputError(f"{partial} exists but holds no interrupted encode (no readable settings.json); move "
                             "it away, or pass --overwrite to replace it")
    return settings


def latent_shape(vae, resolution: int) -> tuple[int, ...]:
    """The (C, h, w) latent of one `resolution` square image, from a dummy encode; a size the autoencoder
    cannot take whole (it would silently drop the last rows and columns) or cannot hold in memory is refused."""
    try:
        with torch.no_grad():
            probe = vae.encode(torch.zeros(1, 3, resolution, resolution, device=vae.device, dtype=vae.dtype),
                               return_dict=False)[0]
    except (RuntimeError, ValueError) as err:
        if isinstance(err, torch.OutOfMemoryError) or "memory" in str(err).lower():
            raise UserInputError(f"--resolution {resolution}: encoding one image of that size runs out of memory; "
                                 "use a smaller --resolution") from None
        raise UserInputError(f"--resolution {resolution}: the autoencoder cannot encode that size "
                             f"({first_line(err)}); use a larger multiple of its downsampling factor") from err
    shape = tuple((probe.mean if hasattr(probe, "mean") else probe).shape[1:])
    blocks = vae.config.get("block_out_channels")  # diffusers pipelines' vae_scale_factor; else measured
    factor = 2 ** (len(blocks) - 1) if isinstance(blocks, (list, tuple)) else max(1, round(resolution / shape[-1]))
    if shape[-1] * factor != resolution:
        lower, upper = shape[-1] * factor, (shape[-1] + 1) * factor
        raise UserInputError(f"--resolution {resolution}: the autoencoder downsamples by {factor}, so the last "
                             f"{resolution - lower} pixel rows and columns would be dropped ({shape[-1]}x{shape[-1]} "
                             f"latents); use a multiple of {factor}, such as {lower} or {upper}")
    return shape


def parse_args(argv: list[str] | None = None):
    """The command line of `python -m latent_ddpm.encode` (see docs/encode.md)."""
    p = ArgParser(prog="python -m latent_ddpm.encode", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="image folder (class subfolders = labels), save_to_disk folder, "
                   ".parquet file/glob or hub dataset id")
    p.add_argument("--vae", required=True, help="diffusers autoencoder: local folder or hub id")
    p.add_argument("--vae_subfolder", default=None, help="subfolder of --vae holding it (default: itself, else vae/)")
    p.add_argument("--resolution", type=int, required=True, help="images are resized + center-cropped to N x N")
    p.add_argument("--output", required=True, help="latent dataset folder to create (train.py --train_data)")
    p.add_argument("--split", default="train", help="dataset split (default train)")
    p.add_argument("--image_column", default=None, help="image column (default: the Image-typed one)")
    p.add_argument("--label_column", default=None, help="labels: class names or ids (default: imagefolder's label)")
    p.add_argument("--flip_augment", action="store_true", help="also store each image's horizontal mirror")
    p.add_argument("--sample_posterior", action="store_true", help="sample the posterior instead of its mean")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample_posterior's noise (default 0)")
    p.add_argument("--min_size", type=int, default=0, help="skip images whose shorter side is below this (default "
                   "0: upscale every small image, with a warning)")
    p.add_argument("--batch_size", type=int, default=16, help="images per autoencoder batch (default 16)")
    p.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"images per resumable shard (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--mixed_precision", choices=tuple(DTYPES), default="no", help="autoencoder weights dtype")
    p.add_argument("--cache_dir", default=None, help="datasets cache for image folders / hub data")
    p.add_argument("--overwrite", action="store_true", help="replace --output, and restart an interrupted encode")
    args = p.parse_args(argv)
    for flag in ("resolution", "batch_size", "shard_size"):
        if getattr(args, flag) < 1:
            raise UserInputError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.min_size < 0:
        raise UserInputError(f"--min_size must be >= 0, got {args.min_size}")
    if args.seed < 0:  # numpy's SeedSequence refuses it, after the images are read
        raise UserInputError(f"--seed must be >= 0, got {args.seed}")
    return args


def main(argv: list[str] | None = None) -> int:
    """`python -m latent_ddpm.encode`: see `encode_images`."""
    args = parse_args(argv)
    datasets.disable_progress_bars()
    diffusers.utils.logging.disable_progress_bar()
    info = encode_images(args)
    if info:
        c = info["counts"]
        print(f"wrote {args.output}: {c['latents']} latents of shape {tuple(info['latent_shape'])} from {c['images']} "
              f"images ({c['skipped_corrupt']} corrupt and {c['skipped_too_small']} too small skipped, "
              f"{c['upscaled']} upscaled, {c['converted_to_rgb']} converted to RGB); details in {ENCODING_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
