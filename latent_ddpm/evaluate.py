"""Evaluation of generated latents against a reference set: `Evaluator` (reference side computed once, for
training previews), `evaluate` (one-off, with a real-vs-real baseline), and the command

    python -m latent_ddpm.evaluate --samples samples_42_1000.npz --reference latents.npz --out metrics.json

The feature space and the metrics (Frechet distance, precision/recall) are in `metrics.py` (docs/sampling.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .errors import ArgumentParser, UserInputError, first_line, run_cli, stderr_line
from .metrics import (  # noqa: F401 - re-exported: the metrics were defined here before
    K_NEIGHBOURS,
    MAX_PR_SAMPLES,
    MAX_PROJECTIONS,
    MAX_REFERENCE,
    NUM_PROJECTIONS,
    POOL_GRID,
    PROJECTION_SEED,
    SPLIT_SEED,
    STD_FLOOR,
    FeatureSpace,
    _subsample,
    channel_stats,
    fd_from_features,
    feature_stats,
    frechet_distance,
    knn_radii,
    precision_recall,
)
from .paths import check_replaceable, unwritable_folder, write_text_atomically


class Evaluator:
    """Reference-side state, computed once (feature space, features, statistics): call it on samples.

    For preview metrics during training, build it once and call it on a few hundred samples.
    """

    def __init__(self, reference: np.ndarray, labels: np.ndarray | None = None, k: int = K_NEIGHBOURS,
                 max_reference: int = MAX_REFERENCE, max_pr_samples: int = MAX_PR_SAMPLES,
                 num_projections: int = NUM_PROJECTIONS, pool_grid: int = POOL_GRID):
        keep = _subsample(len(reference), max_reference)
        self.reference = np.asarray(reference[keep] if len(keep) < len(reference) else reference, dtype=np.float32)
        self.labels = None if labels is None else np.asarray(labels).reshape(-1)[keep]
        self.k, self.max_pr_samples = k, max_pr_samples
        self.space = FeatureSpace(self.reference, num_projections, pool_grid)
        self.features = self.space(self.reference)
        self.stats = feature_stats(self.features)
        self.radii = knn_radii(self.features[_subsample(len(self.features), max_pr_samples)], k)

    def describe(self) -> dict:
        """The feature space's definition, for the JSON report."""
        return {"num_projections": self.space.num_projections, "projection_seed": PROJECTION_SEED,
                "pool_grid": list(self.space.grid), "dim": self.space.dim,
                "standardised_by": "reference per-channel mean/std",
                "reference_channel_mean": self.space.mean.tolist(), "reference_channel_std": self.space.std.tolist()}

    def _compare(self, feats: np.ndarray, ref_feats: np.ndarray, labels, ref_labels, stats=None, radii=None) -> dict:
        fd = frechet_distance(*feature_stats(feats), *(stats or feature_stats(ref_feats)))
        precision, recall = precision_recall(ref_feats, feats, self.k, self.max_pr_samples, radii)
        out = {"fd": fd, "precision": precision, "recall": recall}
        if labels is not None and ref_labels is not None:
            per_class = {}
            for c in sorted(set(np.unique(labels).tolist()) & set(np.unique(ref_labels).tolist())):
                a, b = feats[labels == c], ref_feats[ref_labels == c]
                if len(a) >= 2 and len(b) >= 2:
                    per_class[str(c)] = {"fd": fd_from_features(a, b), "num_samples": len(a), "num_reference": len(b)}
            out["per_class"] = per_class
            out["class_fd_mean"] = float(np.mean([v["fd"] for v in per_class.values()])) if per_class else None
        return out

    def __call__(self, samples: np.ndarray, labels: np.ndarray | None = None) -> dict:
        """Metrics of `samples` (N, C, H, W) in the data's scale, with optional labels (N,)."""
        samples = np.asarray(samples)
        if samples.ndim != 4 or len(samples) == 0:
            raise UserInputError(f"samples must be (N, C, H, W) with N >= 1, got shape {samples.shape}")
        labels = None if labels is None else np.asarray(labels)
        if labels is not None and labels.size != len(samples):
            raise UserInputError(f"labels must be one class id per sample ({len(samples)}), got shape {labels.shape}")
        finite = np.isfinite(samples.reshape(len(samples), -1)).all(axis=1)
        labels = None if labels is None else labels.reshape(-1)[finite]
        samples = samples[finite]
        out = {"num_samples": int(len(samples)), "num_nonfinite_samples": int((~finite).sum()),
               "num_reference": int(len(self.reference))}
        out.update(self._compare(self.space(samples), self.features, labels, self.labels, self.stats, self.radii))
        s_mean, s_std = channel_stats(samples)
        r_mean, r_std = self.space.mean, self.space.std
        out["channel"] = {"mean_error": (s_mean - r_mean).tolist(), "std_error": (s_std - r_std).tolist(),
                          "max_abs_mean_error_in_std": float(np.max(np.abs(s_mean - r_mean) / r_std)),
                          "max_abs_log_std_ratio": float(np.max(np.abs(np.log(np.maximum(s_std, STD_FLOOR) / r_std))))}
        return out

    def baseline(self) -> dict:
        """The same metrics between two random halves of the reference: the real-vs-real level of each number.

        Each half holds N/2 latents; FD grows as sample sizes shrink, so compare with samples of a similar count.
        """
        if len(self.features) // 2 <= self.k:
            raise UserInputError(f"{len(self.features)} reference latents are too few for the real-vs-real baseline "
                                 f"(two halves of more than k={self.k}); pass more, or baseline=False")
        perm = np.random.default_rng(SPLIT_SEED).permutation(len(self.features))
        a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
        labels = (None, None) if self.labels is None else (self.labels[a], self.labels[b])
        out = {"num_per_half": int(len(a))}
        out.update(self._compare(self.features[a], self.features[b], *labels))
        return out


def evaluate(samples: np.ndarray, reference: np.ndarray, sample_labels: np.ndarray | None = None,
             reference_labels: np.ndarray | None = None, baseline: bool = True, **kwargs) -> dict:
    """All metrics of `samples` against `reference` (both (N, C, H, W)); `kwargs` go to `Evaluator`.

    With `baseline`, adds the reference-vs-reference figures and `fd_ratio` = fd / baseline fd.
    """
    ev = Evaluator(reference, reference_labels, **kwargs)
    out = {"feature_space": ev.describe(), **ev(samples, sample_labels)}
    if baseline:
        out["baseline"] = ev.baseline()
        out["fd_ratio"] = out["fd"] / out["baseline"]["fd"] if out["baseline"]["fd"] > 0 else None
    return out


def reference_baseline(reference: np.ndarray, labels: np.ndarray | None = None, **kwargs) -> dict:
    """FD, precision and recall between two random halves of `reference` (see `Evaluator.baseline`)."""
    return Evaluator(reference, labels, **kwargs).baseline()


def load_samples(path: str | Path, key: str = "samples",
                 label_key: str = "labels") -> tuple[np.ndarray, np.ndarray | None]:
    """A sample.py output (or any .npz/.npy of (N, C, H, W)) -> (samples, labels or None); never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such file; pass the .npz written by sample.py")
    try:
        loaded = np.load(path, allow_pickle=False)  # .npy or .npz by the file's content, whatever its name
        if isinstance(loaded, np.ndarray):
            return loaded, None
        with loaded as f:
            if key not in f.files:
                raise UserInputError(f"{path}: no array '{key}' (it has {', '.join(f.files)}); pass --samples_key")
            return f[key], (f[label_key] if label_key in f.files else None)
    except UserInputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise UserInputError(f"{path}: not a readable .npz/.npy file ({first_line(err)}); pass the .npz written by "
                             "sample.py") from err


def load_reference(source: str, latent_key: str = "X", label_key: str | None = "y", limit: int = MAX_REFERENCE,
                   optional_labels: bool = False, split: str = "train", subset: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference latents from any source `latent_ddpm.data.load_latents` reads (its `split` and `subset`, where it
    has them), subsampled (seeded) to `limit`. With `optional_labels`, labels that are not class ids (the original's
    `y` need not be) are left out with a note instead of refused."""
    from .data import LABEL_COLUMNS, DataError, load_latents, source_names
    from .validation import pick_column

    where = {"split": split, "subset": subset}
    try:
        ds = load_latents(source, latent_key=latent_key, label_key=label_key, **where)
    except DataError:
        if not optional_labels or label_key is None:
            raise
        ds = load_latents(source, latent_key=latent_key, label_key=None, **where)  # a latents' problem raises again
        held = pick_column(source_names(source) or [], label_key, LABEL_COLUMNS)  # maybe a fallback; None: unknown
        stderr_line(f"note: {source}: its {f'{held!r} ' if held else ''}labels are not class ids, so there are no "
                    "per-class figures; pass --no_labels to skip them, or --label_key to name the class ids")
    return reference_rows(ds, limit)


def reference_rows(ds, limit: int = MAX_REFERENCE, with_labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """At most `limit` rows of a latents `Dataset` as (latents float32, labels or None): a seeded subsample spread
    over the whole set, not its first rows (data stored class by class would lose its last classes). What
    `load_reference` and train.py's quality figures (`reporting.quality_figures`) compare against."""
    from .data import iter_chunks

    if len(ds) > limit:
        ds = ds.select(_subsample(len(ds), limit))
    chunks = list(iter_chunks(ds, with_labels=with_labels))
    labels = np.concatenate([y for _, _, y in chunks]) if with_labels and "labels" in ds.column_names else None
    return np.concatenate([x for _, x, _ in chunks]).astype(np.float32, copy=False), labels


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m latent_ddpm.evaluate", description="FD, precision/recall and channel "
                       "statistics of generated latents against a reference set; JSON on stdout.")
    p.add_argument("--samples", required=True, help=".npz from sample.py (array 'samples', optional 'labels')")
    p.add_argument("--reference", required=True, help="reference latents: any source latent_ddpm.data reads")
    p.add_argument("--out", help="also write the JSON to this file")
    p.add_argument("--split", default="train", help="the reference's split, where it has splits (a folder of .parquet "
                   "shards, a saved DatasetDict, a hub dataset; default train), e.g. test for held-out latents")
    p.add_argument("--subset", default=None, help="the reference's subset (config), where it has several")
    p.add_argument("--latent_key", default="X", help="array of latents in a reference .npz (default X)")
    p.add_argument("--label_key", default=None, help="array or column of labels in the reference (default: y, else "
                   "labels or label, when it has one)")
    p.add_argument("--no_labels", action="store_true", help="ignore the reference's labels (no per-class figures)")
    p.add_argument("--samples_key", default="samples", help="array of latents in the samples file (default samples)")
    p.add_argument("--k", type=int, default=K_NEIGHBOURS, help="k of the k-NN radii (default 3)")
    p.add_argument("--max_reference", type=int, default=MAX_REFERENCE,
                   help=f"reference subsample size (default {MAX_REFERENCE})")
    p.add_argument("--max_pr_samples", type=int, default=MAX_PR_SAMPLES,
                   help=f"precision/recall subsample size (default {MAX_PR_SAMPLES})")
    p.add_argument("--num_projections", type=int, default=NUM_PROJECTIONS, help="projection width (default 256)")
    p.add_argument("--no_baseline", action="store_true", help="skip the reference-vs-reference baseline")
    args = p.parse_args(argv)
    for flag in ("k", "max_reference", "max_pr_samples", "num_projections"):
        if getattr(args, flag) < 1:
            raise UserInputError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.num_projections > MAX_PROJECTIONS:
        raise UserInputError(f"--num_projections must be at most {MAX_PROJECTIONS}, got {args.num_projections}")
    for flag in ("max_reference", "max_pr_samples"):  # each k-NN radius needs k other points
        if getattr(args, flag) <= args.k:
            raise UserInputError(f"--{flag} must be more than --k ({args.k}), got {getattr(args, flag)}")
    if not args.no_baseline and args.max_reference // 2 <= args.k:
        raise UserInputError(f"--max_reference {args.max_reference}: the real-vs-real baseline needs two halves of "
                             f"more than --k {args.k}; pass at least {2 * args.k + 2}, or --no_baseline")
    if args.out is not None:
        if Path(args.out).is_dir():  # before the inputs' check: a folder holding them is not "the input"
            raise UserInputError(f"--out {args.out}: name a .json file to write")
        check_replaceable(args.out, "--out", (args.samples, args.reference))
        if Path(args.out).suffix != ".json":
            raise UserInputError(f"--out {args.out}: name a .json file to write")
        if problem := unwritable_folder(Path(args.out).parent):
            raise UserInputError(f"--out {args.out}: {problem}; choose another --out")
    for flag in ("split", "subset"):  # as train.py's --train_split and --dataset_config_name
        if getattr(args, flag) is not None and not getattr(args, flag).strip():
            raise UserInputError(f"--{flag}: is empty; name one, or leave the flag out for the default")
    if args.no_labels and args.label_key is not None:
        raise UserInputError("--no_labels: it ignores the labels; drop it or --label_key")
    samples, labels = load_samples(args.samples, args.samples_key)
    if args.label_key is not None:  # named, it must be there: a usual name ('labels') the file lacks would fall
        # back to another it holds ('y'); where the names are known only once loaded, the check after loading
        from .data import source_names

        if (names := source_names(args.reference)) is not None and args.label_key not in names:
            raise UserInputError(f"--label_key {args.label_key}: {args.reference} has no such labels (it has "
                                 f"{names}); name its labels array or column, or leave --label_key out")
    label_key = None if args.no_labels else args.label_key or "y"
    reference, ref_labels = load_reference(args.reference, args.latent_key, label_key, args.max_reference,
                                           optional_labels=args.label_key is None, split=args.split,
                                           subset=args.subset)
    if args.label_key is not None and ref_labels is None:  # a typo gave no per-class figures, with exit status 0
        raise UserInputError(f"--label_key {args.label_key}: {args.reference} has no such labels; name its labels "
                             "array or column, or leave --label_key out")
    check_inputs(args, samples, labels, reference)
    try:
        with np.errstate(all="ignore"):  # values that overflow the features: the one error line below says it
            report = evaluate(samples, reference, labels, ref_labels, baseline=not args.no_baseline, k=args.k,
                              max_reference=args.max_reference, max_pr_samples=args.max_pr_samples,
                              num_projections=args.num_projections)
    except np.linalg.LinAlgError as err:  # finite values so large that the features overflow
        raise UserInputError(f"--samples {args.samples}: the metrics cannot be computed ({err}); the samples are "
                             f"far outside the reference's range (largest |value| {np.nanmax(np.abs(samples)):.3g})"
                             ) from None
    report = {"samples": str(args.samples), "reference": str(args.reference), **report}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.out, text + "\n")
    sys.stdout.write(text + "\n")
    return 0


def check_inputs(args: argparse.Namespace, samples: np.ndarray, labels: np.ndarray | None,
                 reference: np.ndarray) -> None:
    """One line naming the flag for inputs the metrics cannot use: wrong shape or dtype, labels that do not
    match the samples, fewer usable samples than the k-NN radii need, a reference too small for its baseline."""
    if samples.ndim != 4 or samples.shape[1:] != reference.shape[1:]:
        raise UserInputError(f"--samples {args.samples}: shape {samples.shape} does not match the reference latents "
                             f"{reference.shape[1:]}")
    if samples.dtype.kind != "f":
        raise UserInputError(f"--samples {args.samples}: latents must be floating point, got dtype {samples.dtype}")
    if labels is not None and (labels.dtype.kind not in "iu" or labels.shape != (len(samples),)):
        raise UserInputError(f"--samples {args.samples}: 'labels' must be {len(samples)} integer class ids (one per "
                             f"sample), got dtype {labels.dtype} and shape {labels.shape}")
    usable = int(np.isfinite(samples).all(axis=(1, 2, 3)).sum())  # 4-D (checked above), also with 0 samples
    if usable <= args.k:
        dropped = f" ({len(samples) - usable} with NaN/Inf left out)" if usable < len(samples) else ""
        raise UserInputError(f"--samples {args.samples}: {usable} usable samples{dropped}; the metrics need more than "
                             f"--k {args.k}; sample more")
    if len(reference) <= args.k:  # first: --no_baseline would not help
        raise UserInputError(f"--reference {args.reference}: {len(reference)} latents; the metrics need more than "
                             f"--k {args.k}; pass a larger reference")
    if not args.no_baseline and len(reference) // 2 <= args.k:
        raise UserInputError(f"--reference {args.reference}: {len(reference)} latents are too few for the "
                             f"real-vs-real baseline (two halves of more than --k {args.k}); pass a larger reference "
                             "or --no_baseline")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
