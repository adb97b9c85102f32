"""Image decode and the towers' input transform, shared by ``model.score`` and the pipeline.

Both towers get the same tensor: EXIF transpose, RGB, bicubic resize of the short side,
centre crop, CLIP mean/std -- the eval transform open_clip uses for its CLIP towers.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from iqray.model.config import DEFAULT_MAX_PIXELS

ImageSource = Image.Image | bytes | bytearray | memoryview | str | os.PathLike | np.ndarray


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image; the message says which and why."""


def open_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``source`` (PIL image, encoded bytes, file path, or HxWx3 uint8 array) to RGB."""
    if isinstance(source, Image.Image):
        image = source
        where = "PIL image"
    elif isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] not in (3, 4) or source.dtype != np.uint8:
            raise ImageDecodeError(
                f"array images must be HxWx3 (or 4) uint8, got shape {source.shape} "
                f"dtype {source.dtype}"
            )
        image = Image.fromarray(source)
        where = "array"
    elif isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ImageDecodeError("empty image bytes")
        where = f"{len(source)} bytes"
        image = _open_encoded(io.BytesIO(bytes(source)), where, max_pixels)
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ImageDecodeError(f"{path}: no such image file")
        if path.stat().st_size == 0:
            raise ImageDecodeError(f"{path}: empty file")
        image = _open_encoded(path, where, max_pixels)
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


def _open_encoded(fp: Any, where: str, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(fp)  # reads the header only
        _check_pixels(image, where, max_pixels)  # before any pixel is decoded
        image.load()  # decodes; truncation errors surface here
        return image
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{where}: above the limit of PIL's bomb check: {exc}") from exc
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as exc:
        raise ImageDecodeError(f"{where}: cannot decode image: {exc}") from exc


@dataclass(frozen=True)
class ImageTransform:
    """Eval transform: PIL RGB image -> float32 tensor (3, size, size).

    With ``fine_resize`` set the output has 6 channels: the coarse view (whole image resized
    to ``size``) and the fine view (centre ``size`` crop of the image resized to
    ``fine_resize``, i.e. detail at a higher resolution: blur, noise, upscaling artefacts).
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fine_resize: int | None = None

    @property
    def channels(self) -> int:
        return 3 if self.fine_resize is None else 6

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.crop(image))

    def crop(self, image: Image.Image) -> torch.Tensor:
        """Resize + centre crop, kept as uint8 (channels, size, size).

        The pipeline ships this between its decode and model stages: 4x smaller than the
        float tensor, so decoded images do not flood the object store.
        """
        return self._views(self._view, image)

    def crop_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """:meth:`crop` for an already decoded uint8 (3, H, W) tensor on any device (images
        decoded on a GPU stay there). Bicubic with antialiasing, as PIL resizes; the two
        differ by rounding, which the pipeline's fidelity check measures."""
        return self._views(self._tensor_view, image)

    def _views(self, view, image) -> torch.Tensor:
        """The coarse view, then the fine one if this transform has it, channel-stacked."""
        views = [view(image, self.size)]
        if self.fine_resize is not None:
            views.append(view(image, self.fine_resize))
        return torch.cat(views) if len(views) > 1 else views[0]

    def _tensor_view(self, image: torch.Tensor, resize: int) -> torch.Tensor:
        if image.device.type != "cpu":  # bicubic on uint8 is a CPU kernel only
            resized = TF.resize(image.float(), resize, interpolation=InterpolationMode.BICUBIC,
                                antialias=True).round_().clamp_(0, 255).to(torch.uint8)
        else:
            resized = TF.resize(image, resize, interpolation=InterpolationMode.BICUBIC,
                                antialias=True)
        return TF.center_crop(resized, [self.size, self.size])

    def fine_area(self, image: Image.Image) -> torch.Tensor:
        """uint8 (3, fine_resize, fine_resize): the square the fine view is the centre of.
        Training draws random ``size`` crops from it; ``crop`` takes its centre."""
        if self.fine_resize is None:
            raise ValueError("this transform has no fine view (fine_resize is None)")
        resized = TF.resize(image, self.fine_resize, interpolation=InterpolationMode.BICUBIC)
        return TF.pil_to_tensor(TF.center_crop(resized, [self.fine_resize, self.fine_resize]))

    def _view(self, image: Image.Image, resize: int) -> torch.Tensor:
        resized = TF.resize(image, resize, interpolation=InterpolationMode.BICUBIC)
        return TF.pil_to_tensor(TF.center_crop(resized, [self.size, self.size]))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., channels, H, W) -> float32 with the towers' mean/std."""
        pixels = TF.to_dtype(pixels, torch.float32, scale=True)
        repeat = pixels.shape[-3] // 3
        return TF.normalize(pixels, list(self.mean) * repeat, list(self.std) * repeat)

    def load(self, source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        return self(open_image(source, max_pixels=max_pixels))
