"""Run folders: the original project's layout, what a run leaves there, when a new run may start in one,
the lock that keeps two runs out of the same folder, and, for sample.py, finding a run from the original's
flags and where its samples go. Checkpoints inside it are `checkpointing`'s."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
from contextlib import suppress
from pathlib import Path

from .checkpointing import (
    ABANDONED_DIR,
    delete_checkpoint,
    incomplete_checkpoints,
    list_checkpoints,
    set_aside_newer_checkpoints,
)
from .errors import UserInputError, first_line
from .paths import OutputLock, remove_path

LOCK_FILE = ".lock"
# Name of the run folder's pipeline subfolder and of the samples folder (the original's layout).
PIPELINE_SUBDIR, GENERATED_SUBDIR = "pipeline", "generated"

logger = logging.getLogger(__name__)


def default_run_dir(data_name: str, channels: int, timesteps: int, beta_start: float, beta_end: float) -> Path:
    """The original project's layout: runs/<data stem>_ddpm_<C>_<T>_<beta_start>_<beta_end>."""
    return Path("runs") / f"{data_name}_ddpm_{channels}_{timesteps}_{beta_start}_{beta_end}"


def original_run_files(train_dir: Path) -> list[str]:
    """The original project's weights in a run's `train/` folder (`model.pth`, `ddpm_epoch_N.pt`): the same
    run-folder names mean a new run can land in an old one, whose files must not be silently replaced."""
    names = ["model.pth", *sorted(p.name for p in train_dir.glob("ddpm_epoch_*.pt"))] if train_dir.is_dir() else []
    return [name for name in names if (train_dir / name).is_file()]


#: What a finished run leaves besides checkpoints (reporting.final_report, previews, trackers): removed by
#: --overwrite_output_dir with the checkpoints, so an interrupted fresh start never shows the old run's model.
RUN_OUTPUTS = ("pipeline", "pipeline.tmp", "pipeline.old", "train/metrics.json", "train/loss_curve.png",
               "train/samples.png", "train/samples_images.png", "train/samples_epoch_*.png", "train/logs")


def is_train_run(run_dir: Path) -> bool:
    """Whether train.py has run in `run_dir`: it writes train/config.json before anything else."""
    return (run_dir / "train" / "config.json").is_file()


def clear_run(run_dir: Path) -> None:
    """Delete a previous run's checkpoints (set-aside ones too) and, in a folder train.py has run in, its
    outputs (`RUN_OUTPUTS`), leaving other files (the original project's, the user's) alone."""
    train_dir = run_dir / "train"
    for _, old in list_checkpoints(train_dir):
        delete_checkpoint(old)
    for leftover in incomplete_checkpoints(train_dir):  # a crash's half-written or half-deleted ones
        shutil.rmtree(leftover)
    shutil.rmtree(train_dir / ABANDONED_DIR, ignore_errors=True)
    if not is_train_run(run_dir):  # e.g. the user's own train/logs/ beside an original project's run
        return
    for pattern in RUN_OUTPUTS:
        for path in run_dir.glob(pattern):
            remove_path(path)


def resumes_here(run_dir: Path, resumed: Path | None) -> bool:
    """Whether `resumed` is one of `run_dir`'s own checkpoints (in train/, or set aside in train/abandoned/)."""
    return resumed is not None and (run_dir / "train").resolve() in resumed.resolve().parents


#: The config fields that say which data a run trained on (the default run folder names only the data's stem,
#: the subset and a split other than train, so two sources can share one).
DATA_FIELDS = ("train_data", "latent_key", "train_split", "dataset_config_name")


def _data_of(config: dict) -> dict:
    """`config`'s `DATA_FIELDS`, with an existing path resolved (the same file named two ways is the same data)."""
    out = {key: config[key] for key in DATA_FIELDS if key in config}
    # A recorded name too long for this file system, or under a folder this user may not enter: as written.
    with suppress(OSError, ValueError):
        if isinstance(out.get("train_data"), str) and Path(out["train_data"]).exists():
            out["train_data"] = str(Path(out["train_data"]).resolve())
    return out


def _describe_data(config: dict) -> str:
    parts = [str(config.get("train_data") or "the demo set")]
    if config.get("latent_key", "X") != "X":
        parts.append(f"--latent_key {config['latent_key']}")
    if config.get("dataset_config_name"):
        parts.append(f"subset {config['dataset_config_name']}")
    if config.get("train_split", "train") != "train":
        parts.append(f"split {config['train_split']}")
    return ", ".join(parts)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # no record, or an unreadable one: nothing to compare
        return None


def _same_stats(recorded: object, stats: dict) -> bool:
    """Whether `recorded` (a train/latent_stats.json) holds `stats` as a resume's data check compares them
    (`LatentStats.fingerprint`). "scale" and "none" statistics are the same for any data: they never match."""
    from .feeding import LatentStats  # here, not at the top: run_folder is imported without the data stack

    if not isinstance(recorded, dict) or stats.get("mode") not in ("channel", "global"):
        return False
    try:
        return LatentStats.from_dict(recorded).fingerprint() == LatentStats.from_dict(stats).fingerprint()
    except (KeyError, TypeError, ValueError, OverflowError):  # a malformed record (an integer beyond any float)
        return False


def other_data(run_dir: Path, config: dict | None, stats: dict | None = None) -> str | None:
    """When the run recorded in `run_dir` (train/config.json) trained on other data than `config` (a resolved
    config's dict) names, both described ("theirs; this run's: ours"); None when the same, or unknown. With
    `stats` (the data's `LatentStats.to_dict()`), data named otherwise but with the recorded statistics
    (train/latent_stats.json) is the same data, moved or renamed."""
    recorded = _read_json(run_dir / "train" / "config.json")
    if config is None or not isinstance(recorded, dict):
        return None
    theirs, ours = _data_of(recorded), _data_of(config)
    if all(theirs[key] == ours[key] for key in theirs.keys() & ours.keys()):
        return None
    if stats is not None and _same_stats(_read_json(run_dir / "train" / "latent_stats.json"), stats):
        return None
    return f"{_describe_data(recorded)}; this run's: {_describe_data(config)}"


def run_folder_conflict(run_dir: Path, resume: str | None, overwrite: bool, resumed: Path | None = None,
                        config: dict | None = None, stats: dict | None = None) -> str | None:
    """Why a new run may not start in `run_dir` (it holds a run, ours or the original project's, and neither
    `resume` nor `overwrite` was asked for), as a one-line message naming the flags; None when it may. A
    pipeline/ train.py did not write there is never replaced, unless the run resumes one of this folder's own
    checkpoints. Otherwise resuming (`resumed`, the checkpoint `resume` resolved to) is allowed (a run of ours
    beside the original's files was started with `overwrite`), except another folder's checkpoint into a
    finished run, whose pipeline/ it would replace, without `overwrite`. `resume` that finds no checkpoint starts from
    scratch, which an empty or crashed folder allows but a finished run's (its pipeline/ would be replaced)
    does not. With `config` and `stats` (the new run's config and data statistics, as dicts; `other_data`), a
    folder holding a run on other data says so: resuming it is no way out, and the default run folders of two
    sources can coincide."""
    train_dir, pipeline = run_dir / "train", run_dir / PIPELINE_SUBDIR
    resumed_here = resumes_here(run_dir, resumed)
    if not resumed_here and pipeline.exists() and not is_train_run(run_dir):
        return (f"{pipeline} was not written by train.py here (no train/config.json beside it: a "
                "converted checkpoint, or its train/ was removed) and a run there would replace it; move it "
                "elsewhere, or choose another --output_dir")
    if resume is not None and resumed is None and not overwrite and pipeline.exists():
        return (f"{run_dir} holds a finished run (pipeline/) and no complete checkpoint to resume, so training "
                "would start from scratch and replace it; start fresh with --overwrite_output_dir, or choose "
                "another --output_dir")
    if (list_checkpoints(train_dir) or pipeline.exists()) and resume is None and not overwrite:
        if theirs := other_data(run_dir, config, stats):
            return (f"{run_dir} already holds a run on other data ({theirs}); choose another --output_dir, or "
                    "replace that run with --overwrite_output_dir")
        return (f"{run_dir} already holds a run; continue it with --resume_from_checkpoint latest, start fresh with "
                "--overwrite_output_dir, or choose another --output_dir")
    if resumed is not None and not resumed_here and pipeline.exists() and not overwrite:
        return (f"{run_dir} holds a finished run (pipeline/), which resuming another run's checkpoint ({resumed}) "
                "would replace; choose another --output_dir, or clear it first with --overwrite_output_dir")
    if (old_files := original_run_files(train_dir)) and resumed is None and not overwrite:
        return (f"{run_dir} holds a run of the original project (train/{old_files[0]}); choose another --output_dir "
                "(convert its weights with python -m latent_ddpm.convert_original), or train beside them with "
                "--overwrite_output_dir")
    return None


def prepare_run_folder(run_dir: Path, lock: RunLock, resume_spec: str | None, resumed: Path | None, overwrite: bool,
                       files: dict[str, str]) -> str | None:
    """The main process's part of starting a run in `run_dir`: refuse a conflict (`run_folder_conflict`), take
    `lock`, clear the previous run (`overwrite`, unless it resumes one of its own checkpoints), set aside the
    checkpoints the resumed one does not lead to, and write `files` (name -> text) into train/. Returns the one-
    line error every rank is to raise (the lock released), or None."""
    train_dir = run_dir / "train"
    try:
        config, stats = (json.loads(files[name]) if name in files else None
                         for name in ("config.json", "latent_stats.json"))
        if conflict := run_folder_conflict(run_dir, resume_spec, overwrite, resumed, config, stats):
            raise UserInputError(conflict)
        lock.acquire()
        if overwrite and not resumes_here(run_dir, resumed):  # a fresh start, or another run's checkpoint
            clear_run(run_dir)
        if resume_spec is not None and (moved := set_aside_newer_checkpoints(train_dir, resumed)):
            logger.warning("resuming %s: moved %d checkpoint(s) it does not lead to (%s) to %s",
                           resumed or "from scratch", len(moved), ", ".join(p.name for p in moved), moved[0].parent)
        train_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (train_dir / name).write_text(text)
        return None
    except (UserInputError, OSError) as err:
        lock.release()  # now, not at exit: a caller of train.main() in this process may start another run
        if isinstance(err, UserInputError):
            return str(err)
        return f"cannot prepare the run folder {train_dir} ({type(err).__name__}: {first_line(err)})"  # disk full


class RunLock(OutputLock):
    """An exclusive lock on a run folder: a second run on the same folder refuses to start; a stale
    lock (its process is gone) is taken over."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir / LOCK_FILE, "another training run", "wait for it, or use another --output_dir")

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserInputError(f"cannot create the run folder {self.path.parent} ({err.strerror or err}); "
                                 "choose another --output_dir (its parents must be folders you can write)") from None
        super().acquire()


# ---------------------------------------------------------------- finding a run's folders from sample.py's side

def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def locate_run(latent: str | os.PathLike, runs_dir: str | os.PathLike = "runs", n_dim: int | None = None,
               n_steps: int | None = None, lbeta: float | None = None, ubeta: float | None = None) -> Path:
    """Find the run folder of the original's flags: `<runs_dir>/<stem>_ddpm_<n_dim>_<n_steps>_<lbeta>_<ubeta>/`.

    Folders must hold a `pipeline/` subfolder. Given flags must match (numerically, so 1e-4 matches
    0.0001); `n_steps` filters only when some folder matches it, since it is also the number of
    sampling steps. Exactly one folder must remain, else a `UserInputError` says what was looked for.
    """
    runs_dir, stem = Path(runs_dir), Path(latent).stem
    # n_steps only narrows among matches (it is also the sampling step count): the pattern leaves it open
    pattern = "_".join([f"{stem}_ddpm"] + ["*" if v is None else str(v) for v in (n_dim, None, lbeta, ubeta)])
    found = []
    for path in sorted(runs_dir.glob(f"{glob.escape(stem)}_ddpm_*")) if runs_dir.is_dir() else []:
        fields = path.name[len(stem) + len("_ddpm_"):].split("_")
        if len(fields) != 4 or not (path / PIPELINE_SUBDIR).is_dir():
            continue
        dim, steps, lo, hi = (_num(f) for f in fields)
        if all(want is None or got == want for want, got in ((n_dim, dim), (lbeta, lo), (ubeta, hi))):
            found.append((steps, path))
    if n_steps is not None and any(steps == n_steps for steps, _ in found):
        found = [(steps, path) for steps, path in found if steps == n_steps]
    where = f"{runs_dir / pattern}/{PIPELINE_SUBDIR}"
    if not found:
        # A subset's run, or a split's other than train, is <stem>_<subset or split>_ddpm_...: name them.
        named = re.compile(rf"{re.escape(stem)}_.+_ddpm(_[^_]+){{4}}")
        others = sorted(path.name for path in (runs_dir.iterdir() if runs_dir.is_dir() else [])
                        if named.fullmatch(path.name) and (path / PIPELINE_SUBDIR).is_dir())
        hint = (f"; runs named {stem}_* (its subsets or splits, or other data): {', '.join(others)} (pass --model "
                f"{runs_dir / others[0] / PIPELINE_SUBDIR})" if others else "")
        raise UserInputError(f"no trained run for --latent {latent}: looked for {where}; train first, or pass "
                             f"--model DIR (or --runs_dir, --n_dim, --lbeta, --ubeta){hint}")
    if len(found) > 1:
        names = ", ".join(path.name for _, path in found)
        raise UserInputError(f"--latent {latent} matches several runs ({names}) under {runs_dir}; pick one with "
                             "--n_dim/--n_steps/--lbeta/--ubeta or pass --model DIR")
    return found[0][1]


def checkpoint_of(model: str) -> str | None:
    """`checkpoint-N` when `model` is a training checkpoint's pipeline (`<run>/train/checkpoint-N/pipeline`,
    written by --push_checkpoints), else None."""
    path = Path(model)
    is_checkpoint = re.fullmatch(r"checkpoint-\d+", path.parent.name) and path.parent.parent.name == "train"
    return path.parent.name if path.name == PIPELINE_SUBDIR and is_checkpoint and path.is_dir() else None


def pipeline_of(model: str) -> str:
    """`model` itself, or for a folder that holds a pipeline in `pipeline/` (a train.py run folder, a checkpoint
    uploaded with --push_checkpoints) that pipeline: where the samples go follows from it (`run_dir_of`)."""
    path = Path(model)
    if not (path / "model_index.json").is_file() and (path / PIPELINE_SUBDIR / "model_index.json").is_file():
        return str(path / PIPELINE_SUBDIR)
    return model


def run_dir_of(model: str) -> Path:
    """The run folder that owns a pipeline: `<run>/pipeline` and `<run>/train/checkpoint-N/pipeline` ->
    `<run>`; a hub id -> `runs/<owner>--<name>`."""
    path = Path(model)
    if checkpoint_of(model):
        return path.parents[2]
    if path.is_dir():
        return path.parent if path.name == PIPELINE_SUBDIR else path
    return Path("runs") / model.replace("/", "--")


def recorded_train_data(run_dir: Path) -> str | None:
    """The `--train_data` that train.py recorded in `run_dir`/train/config.json (absolute for local data since the
    fifteenth session; an older run's relative path is relative to where it started), or None (no such file,
    the demo set, unreadable)."""
    try:
        value = json.loads((run_dir / "train" / "config.json").read_text()).get("train_data")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def default_output(run_dir: Path, seed: int, num_samples: int, checkpoint: str | None = None) -> Path:
    """The original's output path: `<run>/generated/seed_<seed>/samples_<seed>_<n>.npz`; a checkpoint's samples
    go to `<run>/generated/checkpoint-N/seed_<seed>/...`, outside the checkpoint, which rotation deletes."""
    folder = run_dir / GENERATED_SUBDIR / (checkpoint or "")
    return folder / f"seed_{seed}" / f"samples_{seed}_{num_samples}.npz"
