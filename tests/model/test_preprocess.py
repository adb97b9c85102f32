"""Image decode: clear errors for bad input, the towers' eval transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from iqray.model.images import CropViews
from iqray.model.preprocess import ImageDecodeError, ImageTransform, open_image


def jpeg_bytes(size=(64, 48), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_truncated_jpeg_is_a_decode_error():
    data = jpeg_bytes((256, 256))
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        open_image(data[: len(data) // 2])


def test_empty_and_non_image_bytes_are_decode_errors(tmp_path):
    with pytest.raises(ImageDecodeError, match="empty image bytes"):
        open_image(b"")
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        open_image(b"this is a text file, not a picture")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty file"):
        open_image(empty)
    with pytest.raises(ImageDecodeError, match="no such image file"):
        open_image(tmp_path / "missing.jpg")


def test_images_above_the_pixel_limit_are_refused():
    with pytest.raises(ImageDecodeError, match="above the limit"):
        open_image(jpeg_bytes((400, 300)), max_pixels=100_000)


def test_palette_grayscale_and_alpha_images_become_rgb():
    for mode in ("P", "L", "RGBA", "CMYK"):
        buffer = io.BytesIO()
        Image.new(mode, (32, 16)).save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
        assert open_image(buffer.getvalue()).mode == "RGB"


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    assert open_image(buffer.getvalue()).size == (20, 60)


def test_transform_resizes_the_short_side_and_centre_crops():
    # A wide image whose centre column band is white and edges black: after the short-side
    # resize and centre crop, the crop is mostly the white band.
    array = np.zeros((100, 300, 3), np.uint8)
    array[:, 100:200] = 255
    transform = ImageTransform(50, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    pixels = transform(Image.fromarray(array))
    assert pixels.shape == (3, 50, 50) and pixels.dtype == torch.float32
    assert pixels[:, :, 5:45].min() > 0.95
    normalised = ImageTransform(50, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(Image.fromarray(array))
    torch.testing.assert_close(normalised, (pixels - 0.5) / 0.25)


def test_a_fine_view_crops_detail_at_a_higher_resolution():
    # A 200 px checkerboard of 2 px squares: the coarse view (whole image at 50 px) blurs it
    # to grey, the fine view (centre 50 px of the image resized to 200) keeps full contrast.
    yy, xx = np.mgrid[0:200, 0:200]
    array = np.repeat((((yy // 2 + xx // 2) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)
    transform = ImageTransform(50, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), fine_resize=200)
    crop = transform.crop(Image.fromarray(array))
    assert transform.channels == 6 and crop.shape == (6, 50, 50) and crop.dtype == torch.uint8
    coarse, fine = crop[:3].float(), crop[3:].float()
    assert coarse.std() < 40 and fine.std() > 120
    torch.testing.assert_close(fine, torch.from_numpy(array[75:125, 75:125]).permute(2, 0, 1)
                               .float())
    normalised = transform.normalize(crop)
    torch.testing.assert_close(normalised[3:], (fine / 255 - 0.5) / 0.25)
    # Training draws random fine crops from the fine area; its centre is the fine view.
    area = transform.fine_area(Image.fromarray(array))
    assert area.shape == (3, 200, 200)
    torch.testing.assert_close(area[:, 75:125, 75:125], crop[3:])
    with pytest.raises(ValueError, match="no fine view"):
        ImageTransform(50, (0.5,) * 3, (0.25,) * 3).fine_area(Image.fromarray(array))


@pytest.mark.parametrize("width,height", [(300, 100), (100, 300), (64, 64), (97, 131),
                                          (40, 33), (1, 9), (513, 512)])
def test_crops_equal_torchvision_resize_and_centre_crop_to_the_bit(width, height):
    # open_clip's eval transform is torchvision's Resize(size, BICUBIC) + CenterCrop on PIL;
    # the numpy crops must be exactly that, including odd sizes, a short side already at
    # the size (no resize), and views larger than the resized image (zero padding).
    from torchvision.transforms import v2

    rng = np.random.default_rng(width * 1000 + height)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    for size, fine_resize in [(32, None), (32, 96), (64, 64), (48, 41), (33, 511)]:
        reference = [v2.functional.pil_to_tensor(v2.CenterCrop(size)(
            v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC)(image)))
            for resize in (size, fine_resize) if resize is not None]
        views = CropViews(size, fine_resize)(image)
        assert views.dtype == np.uint8 and views.flags.c_contiguous
        np.testing.assert_array_equal(views, torch.cat(reference).numpy())
        if fine_resize is not None:
            area = v2.functional.pil_to_tensor(v2.CenterCrop(fine_resize)(
                v2.Resize(fine_resize, interpolation=v2.InterpolationMode.BICUBIC)(image)))
            np.testing.assert_array_equal(CropViews(size, fine_resize).fine_area(image),
                                          area.numpy())


def test_decoding_for_the_pipeline_never_imports_torch(tmp_path):
    # Decode tasks run in their own worker processes; torch there would cost each one about
    # 6 s of start-up and 800 MB. A fresh interpreter decodes a batch and checks.
    import subprocess
    import sys

    image = tmp_path / "image.jpg"
    image.write_bytes(jpeg_bytes((80, 60)))
    program = f"""
import sys
import numpy as np
from iqray.pipeline.decode import decode_batch
batch = {{"source_file": np.array(["x"], dtype=object), "source_row": np.array([0]),
         "_image": np.array([open({str(image)!r}, "rb").read()], dtype=object),
         "_error": np.array([None], dtype=object), "_error_kind": np.array([None], dtype=object)}}
out = decode_batch(batch, image_size=32, max_pixels=10**6, timeout_s=5,
                   keep_image_bytes=False, fine_resize=48)
assert out["pixels"].shape == (1, 6, 32, 32) and out["_error"][0] is None, out["_error"]
print(sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "torchvision")))
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_two_view_models_feed_each_tower_its_own_view(sample_rows):
    import iqray.model

    model = iqray.model.load("mst-clipiqa-small-scratch")
    pixels = model.transform.load(sample_rows[0]["path"])[None]
    coarse, fine = model.encode_images(pixels)
    with torch.inference_mode():
        assert torch.allclose(coarse, model.coarse.encode_image(pixels[:, :3]))
        assert torch.allclose(fine, model.fine_visual(pixels[:, 3:]))
        assert not torch.allclose(fine, model.fine_visual(pixels[:, :3]))
    with pytest.raises(ValueError, match="expected 6-channel input"):
        model.encode_images(pixels[:, :3])
