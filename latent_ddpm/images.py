"""Images in and out of autoencoders, with PIL and numpy only: read and check an image, resize + center
crop, pixels <-> [-1, 1] arrays, and a PNG grid. See docs/encode.md for the rules on bad images.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Resampling filter of the resize: bicubic, smooth for both up- and downscaling.
RESAMPLE = Image.Resampling.BICUBIC
#: Colour that transparent pixels are composited onto when RGBA / LA / palette images become RGB.
BACKGROUND = (255, 255, 255)
#: 16/32-bit integer modes: their values are rescaled from this range to 8 bits before conversion.
WIDE_INT_MODES, WIDE_INT_MAX = ("I", "I;16", "I;16B", "I;16L"), 65535.0
#: Pixels between grid cells in `save_image_grid`.
GRID_PAD = 2


class ImageReadError(Exception):
    """An image cannot be read (corrupt, truncated, not an image); the message says why."""


@dataclass
class PreparedImage:
    """One image ready for the encoder: `pixels` (H, W, 3) uint8, or None with a `skip` reason; `notes`
    are the adjustments made (kind, message) e.g. ("converted", "grayscale (L) converted to RGB")."""

    pixels: np.ndarray | None
    skip: str | None = None
    notes: list[tuple[str, str]] = field(default_factory=list)


def open_image(source: dict | str | bytes | os.PathLike) -> Image.Image:
    """Open and fully decode an image from a path, bytes, or a `datasets` Image dict {"bytes", "path"}."""
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if source is None:
        raise ImageReadError("empty image entry")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"{type(err).__name__}: {err}") from None


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any mode to RGB (transparency onto `BACKGROUND`); returns the image and a note, None if already RGB."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in WIDE_INT_MODES:
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(wide * (255.0 / WIDE_INT_MAX), 0, 255).round().astype(np.uint8), "L")
    elif mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img) * 255.0, 0, 255).round().astype(np.uint8), "L")
    if mode in ("P", "PA"):  # palette (maybe with a transparent index): through RGBA
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, BACKGROUND + (255,))
        img = Image.alpha_composite(background, img)
    kind = {"L": "grayscale", "1": "black-and-white", "P": "palette", "RGBA": "RGBA", "LA": "grayscale + alpha",
            "CMYK": "CMYK"}.get(mode, "mode")
    alpha = ", transparency onto white" if mode in ("RGBA", "LA", "PA", "P") else ""
    return img.convert("RGB"), f"{kind} ({mode}) image converted to RGB{alpha}"


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` (bicubic), then crop the centre square `resolution` x `resolution`."""
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), RESAMPLE)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def prepare_image(source: dict | str | bytes | os.PathLike, resolution: int, min_size: int = 0) -> PreparedImage:
    """Read one image and make it `resolution` square RGB, or say why it is skipped.

    Corrupt -> skipped ("corrupt"). Not RGB -> converted (note "converted"). Shorter side below
    `min_size` -> skipped ("too_small"); below `resolution` -> upscaled (note "upscaled").
    """
    try:
        img = open_image(source)
    except ImageReadError as err:
        return PreparedImage(None, skip=f"corrupt: not a readable image ({err})")
    notes = []
    w, h = img.size
    if min(w, h) < min_size:
        return PreparedImage(None, skip=f"too_small: {w}x{h} is below --min_size {min_size}")
    img, note = to_rgb(img)
    if note:
        notes.append(("converted", note))
    if min(w, h) < resolution:
        notes.append(("upscaled", f"{w}x{h} is smaller than --resolution {resolution}: upscaled"))
    return PreparedImage(np.asarray(resize_center_crop(img, resolution), dtype=np.uint8), notes=notes)


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 images (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], the range diffusers autoencoders take."""
    return (pixels.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (any shape) -> uint8 (values clipped, rounded)."""
    return (np.clip(np.asarray(images, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)


def save_image_grid(path: str | os.PathLike, images: np.ndarray | list[Image.Image], ncols: int | None = None
                    ) -> Path:
    """Write images ((N, H, W, 3) floats in [0, 1], uint8, or a list of PIL images) as one PNG grid."""
    if isinstance(images, list):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    images = np.asarray(images)
    images = images if images.dtype == np.uint8 else to_uint8(images)
    n, h, w = images.shape[:3]
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + GRID_PAD) + GRID_PAD, ncols * (w + GRID_PAD) + GRID_PAD, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        top, left = GRID_PAD + r * (h + GRID_PAD), GRID_PAD + c * (w + GRID_PAD)
        grid[top:top + h, left:left + w] = image[..., :3] if image.ndim == 3 else image[..., None]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
