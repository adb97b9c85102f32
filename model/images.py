"""Image decode and the towers' uint8 crops, in PIL and numpy only.

The pipeline's decode tasks run this: without torch a decode worker skips about 6 s of
imports and peaked at 218 MB instead of 860 MB (local Ray, the shipped sample). The crops are
torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop`` on PIL images (open_clip's eval
transform) to the bit; :class:`iqray.model.preprocess.ImageTransform` wraps them as tensors.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from iqray.model.config import DEFAULT_MAX_PIXELS

ImageSource = Image.Image | bytes | bytearray | memoryview | str | os.PathLike | np.ndarray


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image; the message says which and why."""


def open_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_short_side: int | None = None) -> Image.Image:
    """Decode ``source`` (PIL image, encoded bytes, file path, or HxWx3 uint8 array) to RGB.

    ``min_short_side`` (``--decode fast``): a JPEG whose short side is at least twice this is
    decoded at a reduced DCT scale (PIL's ``draft``: 1/2, 1/4 or 1/8, the smallest that keeps
    the short side at or above it), which skips most of the decode; other formats and
    smaller JPEGs decode in full."""
    if isinstance(source, Image.Image):
        image = source
        where = "PIL image"
    elif isinstance(source, np.ndarray):
        if source.ndim == 3 and source.shape[2] == 1:  # greyscale with a channel axis
            source = source[:, :, 0]
        if source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (3, 4)) \
                or source.dtype != np.uint8:
            raise ImageDecodeError(
                f"array images must be HxWx3 (or 4, or HxW greyscale) uint8, got shape "
                f"{source.shape} dtype {source.dtype}"
            )
        image = Image.fromarray(np.ascontiguousarray(source))
        where = "array"
    elif isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ImageDecodeError("empty image bytes")
        where = f"{len(source)} bytes"
        image = _open_encoded(io.BytesIO(bytes(source)), where, max_pixels, min_short_side)
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ImageDecodeError(f"{path}: no such image file")
        if path.stat().st_size == 0:
            raise ImageDecodeError(f"{path}: empty file")
        image = _open_encoded(path, where, max_pixels, min_short_side)
    else:
        raise ImageDecodeError(f"unsupported image input type {type(source).__name__}")

    _check_pixels(image, where, max_pixels)
    try:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"{where}: cannot decode image: {exc}") from exc


def _check_pixels(image: Image.Image, where: str, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"{where}: {width}x{height} = {width * height} pixels is above the limit of "
            f"{max_pixels} (possible decompression bomb)"
        )


def _open_encoded(fp: Any, where: str, max_pixels: int,
                  min_short_side: int | None = None) -> Image.Image:
    try:
        image = Image.open(fp)  # reads the header only
        _check_pixels(image, where, max_pixels)  # before any pixel is decoded
        if min_short_side is not None:
            reduced_scale(image, min_short_side)
        image.load()  # decodes; truncation errors surface here
        return image
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{where}: above the limit of PIL's bomb check: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        # PIL's message names the buffer object's address: the same file would give a
        # different error row on every run.
        raise ImageDecodeError(f"{where}: cannot decode image: not in a format PIL "
                               "reads") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"{where}: cannot decode image: {exc}") from exc


def decodes_reduced(image: Image.Image | bytes, min_short_side: int) -> bool:
    """Whether ``--decode fast`` shrinks this image (an opened, not yet decoded one, or its
    encoded bytes): a JPEG whose short side is at least twice ``min_short_side``."""
    if isinstance(image, bytes | bytearray):
        image = Image.open(io.BytesIO(image))  # the header only
    return image.format == "JPEG" and min(image.size) >= 2 * min_short_side


def reduced_scale(image: Image.Image, min_short_side: int) -> bool:
    """Ask a not yet decoded JPEG for its largest DCT reduction that keeps the short side at
    or above ``min_short_side`` (only where that is at least 1/2); True when it will."""
    if not decodes_reduced(image, min_short_side):
        return False
    width, height = image.size
    scale = min_short_side / min(width, height)  # PIL keeps the size >= the one requested
    image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
    return True


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of the short side to ``size``, the long side to ``int(size * long /
    short)`` (torchvision's ``Resize(int)`` on PIL; an image already that size is returned
    as is)."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size == (width, height):
        return image
    return image.resize(new_size, resample=Image.Resampling.BICUBIC)


def _crop_offset(length: int, crop: int) -> int:
    # torchvision centres a crop larger than the image by zero padding, (crop - length) // 2
    # before; PIL's crop fills outside the image with zeros, so a negative offset is that.
    return -((crop - length) // 2) if crop > length else int(round((length - crop) / 2.0))


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    """The centre ``size`` x ``size`` square (torchvision's ``CenterCrop`` on PIL)."""
    width, height = image.size
    left, top = _crop_offset(width, size), _crop_offset(height, size)
    return image.crop((left, top, left + size, top + size))


def to_channels_first(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> uint8 (3, H, W)."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


@dataclass(frozen=True)
class CropViews:
    """RGB image -> the towers' uint8 input views, channel-stacked: the whole image resized
    to ``size`` and centre-cropped; with ``fine_resize`` also the centre ``size`` crop of the
    image resized to ``fine_resize`` (detail at a higher resolution: blur, noise, upscaling
    artefacts). uint8 is what the pipeline ships between decode and model stages: 4x smaller
    than float, so decoded images do not flood the object store."""

    size: int
    fine_resize: int | None = None

    @property
    def resizes(self) -> tuple[int, ...]:
        """The short side each view is resized to before its centre crop, in channel order."""
        return (self.size,) if self.fine_resize is None else (self.size, self.fine_resize)

    @property
    def channels(self) -> int:
        return 3 * len(self.resizes)

    def __call__(self, image: Image.Image) -> np.ndarray:
        return np.concatenate([self.view(image, resize) for resize in self.resizes])

    def view(self, image: Image.Image, resize: int) -> np.ndarray:
        """uint8 (3, size, size): the centre of ``image`` with its short side at ``resize``."""
        return to_channels_first(centre_crop(resize_short_side(image, resize), self.size))

    def fine_area(self, image: Image.Image) -> np.ndarray:
        """uint8 (3, fine_resize, fine_resize): the square the fine view is the centre of.
        Training draws random ``size`` crops from it; the fine view is its centre."""
        if self.fine_resize is None:
            raise ValueError("this transform has no fine view (fine_resize is None)")
        resized = resize_short_side(image, self.fine_resize)
        return to_channels_first(centre_crop(resized, self.fine_resize))
