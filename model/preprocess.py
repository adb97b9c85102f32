"""The towers' input transform as tensors, shared by ``model.score`` and the pipeline.

Both towers get the same tensor: EXIF transpose, RGB, bicubic resize of the short side,
centre crop, CLIP mean/std -- the eval transform open_clip uses for its CLIP towers. Decode
and the uint8 crops themselves live in :mod:`iqray.model.images` (no torch), so the
pipeline's decode tasks never import torch; their names are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from iqray.model.config import DEFAULT_MAX_PIXELS
from iqray.model.images import CropViews, ImageDecodeError, ImageSource, open_image

__all__ = ["CropViews", "ImageDecodeError", "ImageSource", "ImageTransform", "open_image"]


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
        return self.views.channels

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.crop(image))

    @property
    def views(self) -> CropViews:
        """The uint8 crops without torch (what the pipeline's decode tasks run)."""
        return CropViews(self.size, self.fine_resize)

    def crop(self, image: Image.Image) -> torch.Tensor:
        """Resize + centre crop, kept as uint8 (channels, size, size)."""
        return torch.from_numpy(self.views(image))

    def crop_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """:meth:`crop` for an already decoded uint8 (3, H, W) tensor on any device (images
        decoded on a GPU stay there). Bicubic with antialiasing, as PIL resizes; the two
        differ by rounding, which the pipeline's fidelity check measures."""
        return torch.cat([self._tensor_view(image, resize) for resize in self.views.resizes])

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
        return torch.from_numpy(self.views.fine_area(image))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., channels, H, W) -> float32 with the towers' mean/std."""
        pixels = TF.to_dtype(pixels, torch.float32, scale=True)
        repeat = pixels.shape[-3] // 3
        return TF.normalize(pixels, list(self.mean) * repeat, list(self.std) * repeat)

    def load(self, source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        return self(open_image(source, max_pixels=max_pixels))


def image_batch(images, crop_channels: int, size: int):
    """What a user passed to ``model.score`` as a list of single images, or as a tensor of
    crops the model takes as they are.

    One image (path, bytes, PIL, HxWx3 array, CHW tensor) becomes a list of one; a list
    stays a list (tensors in it become arrays); an NCHW tensor at the model's crop shape
    (``crop_channels`` x ``size`` x ``size``: uint8 crops, or floats already normalised) is
    returned as is; any other NCHW tensor or NHWC array is a batch of images."""
    import os

    import numpy as np

    single = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)
    if isinstance(images, single):
        return [images]
    if isinstance(images, np.ndarray):
        return [images] if images.ndim == 3 else list(images)
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            return [_tensor_image(images)]
        if images.ndim != 4:
            raise ValueError(f"image tensors are CHW or NCHW, got shape {tuple(images.shape)}")
        if tuple(images.shape[1:]) == (crop_channels, size, size):
            return images
        return [_tensor_image(image) for image in images]
    return [_tensor_image(i) if isinstance(i, torch.Tensor) else i for i in images]


def _tensor_image(image: torch.Tensor):
    """A CHW image tensor (uint8, or floats in [0, 1]) as an HxWx3 uint8 array."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"an image tensor is (3, H, W) or (1, H, W), got {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return image.expand(3, -1, -1).permute(1, 2, 0).contiguous().cpu().numpy()


def prompt_list(prompts, count: int) -> list:
    """Prompts for ``count`` images: None (none), one string (the same prompt for every
    image), or one per image; a ValueError naming both counts else."""
    if prompts is None:
        return [None] * count
    if isinstance(prompts, str):
        return [prompts] * count
    prompts = list(prompts)
    if len(prompts) != count:
        raise ValueError(f"got {count} images but {len(prompts)} prompts")
    return prompts
