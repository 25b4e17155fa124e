import json

import numpy as np
import pytest

from latent_ddpm.errors import run_cli
from latent_ddpm.evaluate import (
    Evaluator,
    FeatureSpace,
    evaluate,
    fd_from_features,
    feature_stats,
    frechet_distance,
    knn_radii,
    main,
    precision_recall,
    reference_baseline,
)


def _latents(n, shape=(4, 8, 8), seed=0, scale=2.0, shift=1.0):
    return (np.random.default_rng(seed).normal(size=(n, *shape)) * scale + shift).astype(np.float32)


def test_fd_identical_sets_is_zero():
    f = np.random.default_rng(0).normal(size=(200, 12))
    assert fd_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    x = _latents(60)
    out = evaluate(x, x, baseline=False, num_projections=16)
    assert out["fd"] == pytest.approx(0.0, abs=1e-6)
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    assert max(map(abs, out["channel"]["mean_error"] + out["channel"]["std_error"])) < 1e-5


def test_fd_closed_forms():
    # 1-D by hand: N(0, 1) vs N(3, 4): (0 - 3)^2 + (1 - 2)^2 = 10.
    assert frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0)
    # Diagonal covariances: |dmu|^2 + sum (sqrt a - sqrt b)^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    assert frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(3 + 1 + 1)
    # Non-commuting covariances: Tr sqrt(S1 S2) from the eigenvalues of the (non-symmetric) product.
    s1, s2 = np.array([[2.0, 0.9], [0.9, 1.0]]), np.array([[1.0, -0.3], [-0.3, 3.0]])
    cross = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    assert frechet_distance([1, 2], s1, [0, 0], s2) == pytest.approx(5 + np.trace(s1 + s2) - 2 * cross)


def test_feature_covariance_is_unbiased():
    # Two 1-D points 0 and 2: unbiased variance 2 (the biased one, 1, would lower every FD by a 1/N share).
    mean, cov = feature_stats(np.array([[0.0], [2.0]]))
    assert mean.tolist() == [1.0] and cov.tolist() == [[2.0]]


def test_fd_of_sampled_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, 0.0])
    l1, l2 = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    s1, s2 = l1 @ l1.T + 0.1 * np.eye(3), l2 @ l2.T + 0.1 * np.eye(3)
    f1 = rng.multivariate_normal(mu1, s1, size=40_000)
    f2 = rng.multivariate_normal(mu2, s2, size=40_000)
    assert fd_from_features(f1, f2) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=0.05)


def test_precision_recall_extremes():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(100, 5))
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 1000.0) == (0.0, 0.0)
    # Subsampling keeps the identical-sets answer.
    assert precision_recall(real, real, max_samples=50)[0] > 0.9


def test_precision_recall_by_hand():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii: all 1
    fake = np.array([[0.5], [10.0], [3.9]])  # k=1 radii: 3.4, 6.1, 3.4
    np.testing.assert_allclose(knn_radii(real, 1), [1, 1, 1, 1])
    np.testing.assert_allclose(knn_radii(fake, 1), [3.4**2, 6.1**2, 3.4**2])
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(2 / 3) and recall == 1.0
    # Two tight fake pairs: 0, 0.3 (radius 0.3) and 10, 10.4 (radius 0.4); only real 0 is covered.
    precision, recall = precision_recall(real, np.array([[0.0], [0.3], [10.0], [10.4]]), k=1)
    assert precision == 0.5 and recall == 0.25


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 4, 4), (4, 8, 8), (8, 2, 6)])
def test_feature_space_any_shape(shape):
    ref = _latents(30, shape)
    space = FeatureSpace(ref, num_projections=32)
    f = space(ref)
    grid = (min(4, shape[1]), min(4, shape[2]))
    assert f.shape == (30, 32 + shape[0] * (grid[0] * grid[1] + 2)) == (30, space.dim)
    assert f.dtype == np.float64
    np.testing.assert_array_equal(f, FeatureSpace(ref, num_projections=32)(ref))  # fixed, deterministic
    # Standardised by the reference: the channel-mean features average to ~0.
    c = shape[0]
    assert np.abs(f[:, -2 * c:-c].mean(0)).max() < 1e-6


def test_channel_errors_by_hand():
    ref = _latents(50, (2, 4, 4), scale=1.0, shift=0.0)
    ev = Evaluator(ref, num_projections=8)
    out = ev(ref * 2 + 1)
    mean, std = ref.mean(axis=(0, 2, 3)), ref.std(axis=(0, 2, 3))
    np.testing.assert_allclose(out["channel"]["mean_error"], mean + 1, atol=1e-5)
    np.testing.assert_allclose(out["channel"]["std_error"], std, rtol=1e-4)
    assert out["channel"]["max_abs_log_std_ratio"] == pytest.approx(np.log(2), rel=1e-4)
    assert out["fd"] > 1.0


def test_per_class_baseline_and_nonfinite():
    ref, labels = _latents(80), np.arange(80) % 2
    samples, s_labels = _latents(40, seed=5), np.arange(40) % 2
    samples[3] = np.nan
    out = evaluate(samples, ref, s_labels, labels, num_projections=16)
    assert out["num_nonfinite_samples"] == 1 and out["num_samples"] == 39
    assert set(out["per_class"]) == {"0", "1"} and np.isfinite(out["class_fd_mean"])
    base = out["baseline"]
    assert base["num_per_half"] == 40 and set(base["per_class"]) == {"0", "1"}
    assert out["fd_ratio"] == pytest.approx(out["fd"] / base["fd"])
    assert reference_baseline(ref, labels, num_projections=16)["fd"] == pytest.approx(base["fd"])
    assert "per_class" not in evaluate(samples, ref, baseline=False, num_projections=16)
    json.dumps(out)  # JSON-serialisable as is


def test_cli_json(tmp_path, capsys):
    ref, samples = _latents(40), _latents(20, seed=3)
    np.savez(tmp_path / "ref.npz", X=ref, y=np.arange(40) % 2)
    np.savez(tmp_path / "s.npz", samples=samples, labels=np.arange(20) % 2)
    out = tmp_path / "m" / "metrics.json"
    assert main(["--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "ref.npz"), "--out", str(out),
                 "--num_projections", "16"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    keys = {"fd", "precision", "recall", "channel", "per_class", "baseline", "fd_ratio", "feature_space"}
    assert keys <= set(printed)


def test_reference_from_saved_dataset(tmp_path):
    from latent_ddpm.data import dataset_from_arrays
    from latent_ddpm.evaluate import load_reference

    ref = _latents(30)
    dataset_from_arrays(ref, np.arange(30) % 3).save_to_disk(str(tmp_path / "ds"))
    x, y = load_reference(str(tmp_path / "ds"), limit=20)
    assert x.shape == (20, 4, 8, 8) and x.dtype == np.float32 and y.shape == (20,)
    assert all(any(np.array_equal(row, r) for r in ref) for row in x)


@pytest.mark.parametrize("samples, message", [("missing.npz", "no such file"), ("bad_key.npz", "no array 'samples'"),
                                              ("wrong_shape.npz", "does not match the reference")])
def test_cli_errors_one_line(tmp_path, capsys, samples, message):
    np.savez(tmp_path / "ref.npz", X=_latents(10))
    np.savez(tmp_path / "bad_key.npz", X=_latents(10))
    np.savez(tmp_path / "wrong_shape.npz", samples=_latents(10, (3, 8, 8)))
    with pytest.raises(SystemExit) as err:
        run_cli(main, ["--samples", str(tmp_path / samples), "--reference", str(tmp_path / "ref.npz")])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "not a readable" not in lines[0], lines


def test_the_python_api_names_bad_inputs():
    # The command line checked these; evaluate() and Evaluator() raised numpy's IndexError ("boolean index did not
    # match"), a reshape ValueError for 0 samples, and a k-NN error that did not say it came from the baseline.
    from latent_ddpm.errors import UserInputError
    from latent_ddpm.evaluate import evaluate

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((200, 4, 8, 8)).astype(np.float32)
    samples, labels = ref[:50] + 0.1, rng.integers(0, 3, 200)
    with pytest.raises(UserInputError, match=r"labels must be one class id per sample \(50\)"):
        evaluate(samples, ref, labels[:10], labels)
    with pytest.raises(UserInputError, match="N >= 1"):
        evaluate(samples[:0], ref)
    with pytest.raises(UserInputError, match="too few for the real-vs-real baseline.*baseline=False"):
        evaluate(samples, ref[:7])
    assert "baseline" not in evaluate(samples, ref[:7], baseline=False)


def test_train_quality_figures_take_their_reference_from_the_whole_data_set(tmp_path):
    # Beyond reporting.MAX_REFERENCE latents, train.py's figures took the first rows: of data stored class by class
    # (as encode writes an image folder) the last classes had few reference latents or none, and vanished from the
    # per-class figures. They now take the seeded subsample `python -m latent_ddpm.evaluate` takes.
    from types import SimpleNamespace

    from latent_ddpm.data import dataset_from_arrays
    from latent_ddpm.evaluate import load_reference
    from latent_ddpm.reporting import MAX_REFERENCE, quality_figures

    classes = 5
    labels = np.repeat(np.arange(classes), 2 * MAX_REFERENCE // classes)  # twice the reference, class by class
    x = _latents(len(labels), shape=(2, 4, 4)) + labels[:, None, None, None].astype(np.float32)
    np.savez(tmp_path / "d.npz", X=x, y=labels)
    pick = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(classes)])  # two samples of each class
    samples, sample_labels = x[pick], labels[pick]
    out = quality_figures(samples, sample_labels, dataset_from_arrays(x, labels),
                          SimpleNamespace(train_data=str(tmp_path / "d.npz")))["evaluation"]
    assert sorted(out["per_class"]) == [str(c) for c in range(classes)]
    ref_x, ref_y = load_reference(str(tmp_path / "d.npz"), limit=MAX_REFERENCE)
    assert out == evaluate(samples, ref_x, sample_labels, ref_y, baseline=True)
