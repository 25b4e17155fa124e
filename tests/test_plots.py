import numpy as np
import pytest
import torch

from latent_ddpm.plots import ema, latents_to_images, save_latent_grid, save_loss_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC


def test_loss_curve_with_epochs(tmp_path):
    steps = np.arange(1, 61)
    losses = 1.0 / steps + 0.01 * np.random.default_rng(0).random(60)
    out = save_loss_curve(tmp_path / "sub" / "loss.png", steps, losses, epoch_ends=[20, 40, 60],
                          epoch_means=[0.2, 0.05, 0.03])
    assert _is_png(out)


def test_loss_curve_edge_cases(tmp_path):
    assert _is_png(save_loss_curve(tmp_path / "one.png", [1], [0.5]))
    assert _is_png(save_loss_curve(tmp_path / "nan.png", [1, 2, 3], [float("nan"), 1.0, -0.5]))
    assert _is_png(save_loss_curve(tmp_path / "empty.png", [], []))
    with pytest.raises(ValueError):
        save_loss_curve(tmp_path / "bad.png", [1, 2], [1.0])


def test_ema_is_bias_corrected():
    np.testing.assert_allclose(ema([3.0, 3.0, 3.0]), [3.0, 3.0, 3.0])


@pytest.mark.parametrize("channels", [1, 3, 4, 8])
def test_latent_grid_channels(tmp_path, channels):
    x = np.random.default_rng(channels).normal(size=(5, channels, 6, 6)).astype(np.float32)
    out = save_latent_grid(tmp_path / f"grid{channels}.png", x, labels=[0, 1, 2, 3, 4], title="t")
    assert _is_png(out)


def test_latent_grid_torch_and_nrow(tmp_path):
    x = torch.randn(7, 2, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    assert _is_png(save_latent_grid(tmp_path / "g.png", x, nrow=3))
    with pytest.raises(ValueError):
        save_latent_grid(tmp_path / "none.png", np.zeros((0, 3, 4, 4)))


def test_latents_to_images_range_and_shape():
    x = np.random.default_rng(0).normal(size=(3, 4, 5, 6)) * 100
    img = latents_to_images(x)
    assert img.shape == (3, 5, 6, 3)
    assert img.min() >= 0 and img.max() <= 1
    gray = latents_to_images(x[:, :2])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


@pytest.mark.parametrize("n", [4, 256])
def test_a_grid_s_title_and_captions_stay_clear_of_the_cells(tmp_path, monkeypatch, n):
    # tight_layout ignored the title: in a 16-row grid (a full --num_preview_samples 256 preview) the first row's
    # captions ran into it.
    from latent_ddpm import plots

    shown, close = [], plots.plt.close
    monkeypatch.setattr(plots.plt, "close", lambda fig: (shown.append(fig), close(fig)))
    x = np.random.default_rng(0).standard_normal((n, 4, 8, 8))
    plots.save_latent_grid(tmp_path / "grid.png", x, labels=np.arange(n) % 10, title="samples")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = shown[0]
    canvas = FigureCanvasAgg(fig)  # closed figures keep a bare canvas: draw it again as it was saved
    canvas.draw()
    renderer = canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    cells = [ax for ax in fig.axes if ax.images]
    assert len(cells) == n
    for ax in cells:
        assert not title.overlaps(ax.get_tightbbox(renderer))  # the cell with its caption
    boxes = [ax.get_window_extent(renderer) for ax in cells]  # a caption never runs into the cell above it
    captions = [ax.title.get_window_extent(renderer) for ax in cells]
    assert not any(c.overlaps(b) for i, c in enumerate(captions) for j, b in enumerate(boxes) if i != j)
