#!/usr/bin/env python
"""Generate latents with a trained LatentDDPMPipeline (see docs/sampling.md).

    python sample.py --model runs/x_ddpm_4_1000_0.0001_0.02/pipeline --num_samples 1000 \\
        --scheduler dpmsolver++ --num_inference_steps 25 --seed 0
    python sample.py --latent x.npz --n_samples 64          # the original's flags: finds the run folder
    accelerate launch --num_processes 4 sample.py --model DIR --num_samples 50000   # same samples, faster

Output: `<run>/generated/seed_<seed>/samples_<seed>_<n>.npz` (or --output) with `samples`
(N, C, H, W) float32 in the data's scale and `labels` (N,) int64 when sampled with --class_labels, plus a PNG
grid next to it. Sample i depends only on (seed, i), never on the batch size or process count.
With --decode (or --vae), the latents are also decoded with an autoencoder: one PNG per sample in
`<output stem>_images/` (`000000.png`, ...) and a grid `<output stem>_images.png` (docs/encode.md).
"""

from __future__ import annotations

import errno
import inspect
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from tqdm.auto import tqdm

from latent_ddpm import faults
from latent_ddpm.autoencoder import load_vae, run_encoding_info
from latent_ddpm.errors import UserInputError, json_object, run_cli, stderr_line
from latent_ddpm.images import save_image_grid, to_uint8
from latent_ddpm.paths import (
    NpyRowWriter,
    OutputLock,
    check_replaceable,
    partial_path,
    remove_abandoned_partials,
    remove_path,
    replace_with,
    unwritable_folder,
    write_npz,
)
from latent_ddpm.pipeline import default_inference_steps, inference_steps_error
from latent_ddpm.plots import save_latent_grid
from latent_ddpm.run_folder import (
    PIPELINE_SUBDIR,
    checkpoint_of,
    default_output,
    locate_run,
    pipeline_of,
    recorded_train_data,
    run_dir_of,
)
from latent_ddpm.sampling import (
    DTYPES,
    SCHEDULERS,
    ArgParser,
    configure_scheduler,
    distributed_state,
    first_error,
    labels_for,
    load_pipeline,
    make_scheduler,
    parse_class_labels,
    sample_generators,
    saved_scheduler,
    scheduler_problem,
    steps_taken,
)

# The first bytes of every PNG file.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Most samples shown in the PNG preview grid.
GRID_SAMPLES = 64


def parse_args(argv: list[str] | None = None):
    p = ArgParser(prog="sample.py", description="Generate latents with a trained LatentDDPMPipeline.")
    p.add_argument("--model", help="pipeline folder, train.py run folder or hub id (default: derived from --latent)")
    p.add_argument("--num_samples", "--n_samples", type=int, default=16, help="how many samples (default 16)")
    p.add_argument("--batch_size", type=int, default=64, help="samples per UNet batch and process (default 64)")
    p.add_argument("--num_inference_steps", "--n_steps", type=int, default=None,
                   help="denoising steps (default: every training step for ddpm, min(50, T - 1) otherwise)")
    p.add_argument("--scheduler", default=None,
                   help=f"sampler: {', '.join(SCHEDULERS)} (default: the pipeline's saved scheduler)")
    p.add_argument("--scheduler_config", default=None,
                   help="JSON object (or .json file) of scheduler settings, e.g. '{\"use_karras_sigmas\": true}' "
                        "or '{\"timestep_spacing\": \"trailing\"}' (the training's betas and prediction type "
                        "stay fixed)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like (ddim only)")
    p.add_argument("--seed", type=int, default=42, help="base seed; sample i uses (seed, i) (default 42)")
    p.add_argument("--class_labels", nargs="+", default=None,
                   help="labels to cycle through (sample i gets labels[i %% len]), or 'all' for every class id "
                        "in the training data")
    p.add_argument("--guidance_scale", type=float, default=1.0, help="classifier-free guidance weight (1 = off)")
    p.add_argument("--mixed_precision", choices=tuple(DTYPES), default="no", help="UNet weights dtype")
    p.add_argument("--output", help="output .npz (default: <run>/generated/seed_<seed>/samples_<seed>_<n>.npz)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output: the .npz, and the grids and decoded images beside it")
    p.add_argument("--no_grid", action="store_true", help="do not write the PNG preview grid")
    p.add_argument("--decode", action="store_true", help="also decode to PNG images with --vae, else the "
                   "pipeline's vae, else the autoencoder named in the training data's encoding.json")
    p.add_argument("--vae", default=None, help="autoencoder folder or hub id for --decode (implies --decode)")
    p.add_argument("--vae_subfolder", default=None, help="subfolder of --vae holding the autoencoder")
    original = p.add_argument_group("the original project's flags (to locate runs/<stem>_ddpm_<n_dim>_<n_steps>_"
                                    "<lbeta>_<ubeta>/)")
    original.add_argument("--latent", help="the training latent file; its stem names the run folder")
    original.add_argument("--n_dim", type=int, help="latent channels in the run folder name")
    original.add_argument("--lbeta", type=float, help="first beta in the run folder name")
    original.add_argument("--ubeta", type=float, help="last beta in the run folder name")
    original.add_argument("--runs_dir", default=None, help="where run folders live (default runs)")
    original.add_argument("--mode", choices=("sample",), help="accepted for compatibility (train with train.py)")
    args = p.parse_args(argv)
    for flag in ("num_samples", "batch_size", "num_inference_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserInputError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.seed < 0:
        raise UserInputError(f"--seed must be >= 0, got {args.seed}")
    if args.model is None and args.latent is None:
        raise UserInputError("pass --model DIR_OR_HUB_ID (a saved pipeline) or the original's --latent FILE")
    located_by = [f"--{f}" for f in ("latent", "n_dim", "lbeta", "ubeta", "runs_dir") if getattr(args, f) is not None]
    if args.model is not None and located_by:  # they would be ignored
        raise UserInputError(f"{' '.join(located_by)}: only used to find a run folder, which --model already names; "
                             "drop them or --model")
    if args.vae_subfolder is not None and args.vae is None:
        raise UserInputError("--vae_subfolder needs --vae (the autoencoder it is a subfolder of)")
    if args.output is not None and Path(args.output).name.lower() in ("", ".npz"):  # "" is the folder "."
        raise UserInputError(f"--output {args.output!r}: name the .npz file to write, e.g. samples.npz")
    if not 0.0 <= args.eta <= 1.0:  # also refuses nan; beyond 1 DDIM's noise exceeds the step's variance
        raise UserInputError(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {args.eta}")
    if not math.isfinite(args.guidance_scale):
        raise UserInputError(f"--guidance_scale must be a finite number, got {args.guidance_scale}")
    if args.guidance_scale != 1.0 and not args.class_labels:
        raise UserInputError("--guidance_scale needs --class_labels (guidance steers towards a class)")
    args.decode = args.decode or args.vae is not None
    return args


def process_rows(num_samples: int, rank: int, world: int) -> range:
    """This process's contiguous sample indices, split as `PartialState.split_between_processes` splits a list
    (the first num_samples % world processes take one more), without building the list."""
    per, extra = divmod(num_samples, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


def attach_vae(pipe, args, model: str, device) -> None:
    """Give `pipe` the autoencoder for --decode: --vae, else the pipeline's own, else the training data's."""
    if args.vae is None and getattr(pipe, "vae", None) is None:
        info = run_encoding_info(run_dir_of(model))
        if info is None or not info.get("vae", {}).get("id"):
            raise UserInputError(f"--decode: {model} has no vae and its training data has no encoding.json; "
                                 "pass --vae PATH_OR_HUB_ID")
        args.vae, args.vae_subfolder = info["vae"]["id"], info["vae"].get("subfolder")
    if args.vae is not None:
        pipe.register_modules(vae=load_vae(args.vae, args.vae_subfolder))
    channels = getattr(pipe.vae.config, "latent_channels", None)
    if channels is not None and channels != pipe.unet.config.in_channels:
        raise UserInputError(f"--decode: the vae takes {channels}-channel latents but the model makes "
                             f"{pipe.unet.config.in_channels}; pass the autoencoder the data was encoded with")
    torch.nn.Module.to(pipe.vae, device=device, dtype=torch.float32)  # decoding stays float32 (fp16 VAEs overflow)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state = distributed_state()
    faults.limit_file_size(state.process_index)  # a test's full disk in one rank

    # 1. Where the model is and where the samples go; refuse to overwrite before any work.
    model = pipeline_of(args.model) if args.model is not None else None  # a run folder: its pipeline/
    if model is None:
        model = str(locate_run(args.latent, args.runs_dir or "runs", args.n_dim, args.num_inference_steps, args.lbeta,
                               args.ubeta) / PIPELINE_SUBDIR)
    output = Path(args.output) if args.output else default_output(run_dir_of(model), args.seed, args.num_samples,
                                                                   checkpoint_of(model))
    if output.suffix != ".npz":
        raise UserInputError(f"--output {output} must end in .npz")
    if output.is_dir():
        raise UserInputError(f"--output {output} is a folder; name the .npz file to write")
    if problem := unwritable_folder(output.parent):
        raise UserInputError(f"--output {output}: {problem}; choose another --output")
    images_dir = output.with_name(f"{output.stem}_images")
    latent_grid, image_grid = output.with_suffix(".png"), output.with_name(f"{output.stem}_images.png")
    grids = [] if args.no_grid else [latent_grid] + [image_grid] * args.decode
    writes = [output, *grids, *([images_dir] if args.decode else [])]
    # --overwrite over an earlier output replaces its whole set: what this run does not rewrite (its grid under
    # --no_grid, its decoded images) goes too, so that nothing stale sits beside the new samples; only what looks
    # like sample.py's own files (`written_by_sample_py`). Without --overwrite, or a new output, all is left alone.
    earlier = (latent_grid, image_grid, images_dir) if args.overwrite and output.is_file() else ()
    stale = [path for path in earlier if path not in writes and written_by_sample_py(path)]
    # Never over the data; inside --model is fine (a bare pipeline folder's samples go to its own generated/).
    inputs = (args.latent, args.scheduler_config, recorded_train_data(run_dir_of(model)))  # the run's data too
    for path in writes + stale:
        check_replaceable(path, "--output", inputs)
        if os.path.lexists(path) and not args.overwrite:
            raise UserInputError(f"{path} exists; pass --overwrite to replace it, or choose another --output")
    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        raise UserInputError(f"unknown --scheduler {args.scheduler!r}; valid names: {', '.join(SCHEDULERS)}")
    options = None if args.scheduler_config is None else json_object(args.scheduler_config, "--scheduler_config",
                                                                      "scheduler settings")

    # 2. The pipeline, with the requested sampler built from the saved scheduler config.
    diffusers_logging.disable_progress_bar()
    pipe = load_pipeline(model, args.mixed_precision, state.device)
    saved = saved_scheduler(pipe.scheduler)
    if args.scheduler is not None:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config, guided=args.guidance_scale != 1.0)
    else:
        pipe.scheduler = saved
    if args.eta != 0 and "eta" not in inspect.signature(pipe.scheduler.step).parameters:  # refused, not ignored
        raise UserInputError(f"--eta acts only with --scheduler ddim, and {type(pipe.scheduler).__name__} has no "
                             "eta; drop --eta, or pass --scheduler ddim")
    steps = args.num_inference_steps or default_inference_steps(pipe.scheduler)
    if error := inference_steps_error(pipe.scheduler, steps):
        raise UserInputError(f"--num_inference_steps: {error}")
    if options is not None:
        pipe.scheduler = configure_scheduler(pipe.scheduler, options, steps, pipe.unet.config.in_channels)
    elif failure := scheduler_problem(pipe.scheduler, steps, pipe.unet.config.in_channels):
        if args.scheduler is not None and scheduler_problem(saved, steps, pipe.unet.config.in_channels) is None:
            raise UserInputError(f"--scheduler {args.scheduler} cannot sample {model} at {steps} steps ({failure}); "
                                 "choose another --scheduler")
        raise UserInputError(f"--model {model}: {type(pipe.scheduler).__name__}, built from its saved scheduler "
                             f"config, cannot sample {steps} steps ({failure}); fix scheduler/scheduler_config.json")
    if (taken := steps_taken(pipe.scheduler, steps)) < steps and state.is_main_process:
        stderr_line(f"note: {type(pipe.scheduler).__name__} takes {taken} of the {steps} steps with these settings")
    if args.decode:
        attach_vae(pipe, args, model, state.device)
    unet = pipe.unet.config
    cycle = parse_class_labels(args.class_labels, pipe.trained_class_ids())
    size = unet.sample_size
    shape = (args.num_samples, unet.in_channels, *((size, size) if isinstance(size, int) else size))

    # 3. The main process locks the output against a second sample.py and creates the gathering file; every
    #    process gets its verdict (no rank hangs on another's error) and fills its own contiguous rows.
    partial, error = partial_path(output), None
    images_work = partial.with_name(f".{images_dir.name}.partial")
    lock = OutputLock(partial.with_suffix(".lock"), "another sample.py writing " + output.name,
                      "wait for it, or choose another --output")
    if state.is_main_process:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            for other in remove_abandoned_partials(output.parent):
                stderr_line(f"note: removed the unfinished samples of an interrupted run writing {other.name}")
            NpyRowWriter(partial, shape, create=True)
            if args.decode:  # decoded into a work folder, swapped in at the end: a failed run keeps the old one
                shutil.rmtree(images_work, ignore_errors=True)
                images_work.mkdir(parents=True)
        except UserInputError as err:
            error = str(err)
        except OSError as err:  # a full disk, a file too large for the file system
            partial.unlink(missing_ok=True)
            error = f"--output {output}: cannot create the samples file ({err.strerror or err}); {write_advice(err)}"
    if (error := first_error(error)) is not None:
        lock.release()
        raise UserInputError(error)
    writer, written = NpyRowWriter(partial, shape), False
    try:
        mine = process_rows(args.num_samples, state.process_index, state.num_processes)
        start_time = time.perf_counter()
        bar = tqdm(total=args.num_samples, desc="sampling", unit="sample", disable=not state.is_main_process)
        failure, nonfinite = None, 0  # a rank's own write error is shared below, so no rank dies in the barrier
        try:
            nonfinite = sample_rows(pipe, args, mine, steps, cycle, writer, images_work, bar, state.num_processes)
        except UserInputError as err:  # out of accelerator memory at one sample per batch
            failure = str(err)
        except OSError as err:
            failure = write_error(output, err)
        bar.close()
        if nonfinite:  # written as they are, but never silently
            stderr_line(f"warning: {nonfinite} of this process's {len(mine)} samples hold NaN/Inf values (too "
                        "large a --guidance_scale, or a diverged model)")
        if (failure := first_error(failure)) is not None:  # also the barrier
            raise UserInputError(failure)

        # 4. One normal .npz, written by streaming (memory stays bounded), atomically; then the preview.
        if state.is_main_process:
            arrays = {"samples": partial}
            if cycle is not None:
                arrays["labels"] = np.asarray(cycle, dtype=np.int64)[np.arange(args.num_samples) % len(cycle)]
            write_npz(output, arrays)
            if args.decode:
                replace_with(images_work, images_dir)
            written = True
            for path in stale:
                remove_path(path)
                stderr_line(f"note: removed {path}, from an earlier run writing {output.name}")
            elapsed = time.perf_counter() - start_time
            if not args.no_grid:
                preview = np.load(partial, mmap_mode="r", allow_pickle=False)[:GRID_SAMPLES]
                labels = arrays.get("labels")
                save_latent_grid(latent_grid, np.array(preview),
                                 None if labels is None else labels[:GRID_SAMPLES],
                                 title=f"{output.name} ({args.scheduler or type(pipe.scheduler).__name__})")
                if args.decode:
                    shown = [np.asarray(Image.open(images_dir / f"{i:06d}.png").convert("RGB"))
                             for i in range(min(GRID_SAMPLES, args.num_samples))]
                    save_image_grid(image_grid, np.stack(shown))
            print(f"wrote {args.num_samples} samples {shape[1:]} to {output} "
                  f"({args.num_samples / elapsed:.2f} samples/s over {state.num_processes} process(es))")
    except OSError as err:  # a full disk: the partial file goes (below); a finished .npz was written atomically
        note = "; the samples file itself is complete" if written else ""
        raise UserInputError(write_error(output, err, note)) from None
    finally:
        if state.is_main_process:
            partial.unlink(missing_ok=True)
            shutil.rmtree(images_work, ignore_errors=True)
            lock.release()
    return 0


def written_by_sample_py(path: Path) -> bool:
    """Whether `path` looks like what sample.py writes beside an output: a PNG file (a grid) or a folder of
    nothing but `NNNNNN.png` files (decoded images). Anything else there is the user's, never removed."""
    def is_png(file: Path) -> bool:
        with open(file, "rb") as f:
            return f.read(8) == PNG_SIGNATURE

    try:
        if path.is_symlink() or not path.exists():
            return False
        if path.is_file():
            return is_png(path)
        children = list(path.iterdir()) if path.name.endswith("_images") else []
        return bool(children) and all(not c.is_symlink() and c.is_file() and re.fullmatch(r"\d{6}\.png", c.name)
                                      and is_png(c) for c in children)
    except OSError:  # unreadable: not known to be ours
        return False


def write_error(output: Path, err: OSError, note: str = "") -> str:
    """The one line for a write that failed (a full disk, a file too large for the file system)."""
    return f"--output {output}: cannot write {err.filename or 'the samples'} ({err.strerror or err}){note}; " \
           f"{write_advice(err)}"


def write_advice(err: OSError) -> str:
    """What to do about a failed write: space for a full disk, else another place."""
    full = err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    return "free space or choose another --output" if full else "choose another --output (a folder you can write)"


def sample_rows(pipe, args, mine: list[int], steps: int, cycle, writer: NpyRowWriter, images_dir: Path, bar,
                num_processes: int) -> int:
    """Sample this process's rows `mine` batch by batch into `writer` (and decoded PNGs into `images_dir`);
    returns how many samples hold NaN/Inf. Out of accelerator memory, the batch is halved: sample i depends
    on (seed, i), not on the batch."""
    start, batch, nonfinite = 0, args.batch_size, 0
    while start < len(mine):
        idx = mine[start:start + batch]
        try:
            out = pipe(batch_size=len(idx), num_inference_steps=steps, generator=sample_generators(args.seed, idx),
                       class_labels=labels_for(idx, cycle), guidance_scale=args.guidance_scale, eta=args.eta,
                       output_type="np_image" if args.decode else "np")
        except torch.cuda.OutOfMemoryError:
            if len(idx) == 1:
                raise UserInputError("out of accelerator memory at one sample per batch; sample with "
                                     "--mixed_precision bf16 or on a larger device") from None
            batch = len(idx) // 2
            torch.cuda.empty_cache()
            tqdm.write(f"out of accelerator memory at {len(idx)} samples per batch: going on at {batch} "
                       f"(pass --batch_size {batch} to start there)\n", file=sys.stderr, end="")  # one write
            continue
        writer.write(idx[0], out.latents)
        nonfinite += int((~np.isfinite(out.latents).reshape(len(idx), -1).all(axis=1)).sum())
        for i, image in zip(idx, out.images if args.decode else (), strict=False):
            Image.fromarray(to_uint8(image)).save(images_dir / f"{i:06d}.png")
        bar.update(min(len(idx) * num_processes, bar.total - bar.n))  # others run in step
        start += len(idx)
    return nonfinite


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
