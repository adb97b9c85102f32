"""Graded synthetic distortions, for a full-reference training set built from clean images.

Five kinds, five levels each (1 = mild, 5 = severe), all deterministic given a seed. Level 0
is the reference itself. The target a model learns is the level, inverted (``quality = 5 -
level``), so higher is better as everywhere else in iqray.

The levels are spaced so each step is visible at 224-256 px (the scale a tower sees): blur
sigma and noise std roughly double per level, JPEG quality falls geometrically, contrast and
saturation shrink linearly toward grey.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

LEVELS = 5

# Per kind: the parameter at levels 1..5.
BLUR_RADIUS = (0.6, 1.2, 2.0, 3.2, 5.0)  # Gaussian blur radius in px
NOISE_STD = (6.0, 12.0, 20.0, 32.0, 48.0)  # additive Gaussian noise, 8-bit units
JPEG_QUALITY = (50, 30, 18, 10, 5)
CONTRAST = (0.75, 0.55, 0.4, 0.28, 0.18)  # PIL contrast factor (1 = unchanged)
COLOR_SHIFT = (0.06, 0.12, 0.2, 0.3, 0.42)  # red gain up, blue gain down by this fraction

KINDS = ("blur", "noise", "jpeg", "contrast", "color")


def distort(image: Image.Image, kind: str, level: int, seed: int = 0) -> Image.Image:
    """``image`` (RGB) with distortion ``kind`` at ``level`` (0 = unchanged, 1..5)."""
    if kind not in KINDS:
        raise ValueError(f"unknown distortion {kind!r}; known: {', '.join(KINDS)}")
    if not 0 <= level <= LEVELS:
        raise ValueError(f"level must be 0..{LEVELS}, got {level}")
    if level == 0:
        return image.copy()
    i = level - 1
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(BLUR_RADIUS[i]))
    if kind == "noise":
        rng = np.random.default_rng(seed)
        pixels = np.asarray(image, dtype=np.float32)
        noisy = pixels + rng.normal(0.0, NOISE_STD[i], pixels.shape)
        return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY[i])
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "contrast":
        return ImageEnhance.Contrast(image).enhance(CONTRAST[i])
    shift = COLOR_SHIFT[i]  # color: a white-balance error
    pixels = np.asarray(image, dtype=np.float32) * np.array([1 + shift, 1.0, 1 - shift])
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def square(image: Image.Image, size: int) -> Image.Image:
    """Short side resized to ``size`` (bicubic), centre square crop."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                           Image.BICUBIC)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))
