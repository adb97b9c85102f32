"""Decode stage (CPU tasks): encoded bytes -> uint8 crops at the towers' input size.

Work per image is bounded: a pixel-count limit stops decompression bombs before decoding,
and a wall-clock limit stops a pathological file from stalling the stage: images decode in a
child process that is killed past the limit, wherever the decoder is stuck (C included; see
:mod:`iqray.pipeline.decode_process`). Failures become error rows.

Decode tasks never import torch (about 6 s and 800 MB per worker process): the crops come
from :mod:`iqray.model.images` (PIL + numpy); torch is imported only by the helpers the
model actors and in-process training use.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from iqray.model.images import CropViews, ImageDecodeError, open_image
from iqray.pipeline import rows as R
from iqray.pipeline.decode_process import DecodeProcessDied, DecodeTimeout, decode_process

if TYPE_CHECKING:
    from iqray.model.preprocess import ImageTransform


def crop_image(source: Any, crop: CropViews, max_pixels: int, min_short_side: int | None,
               timeout_s: float | None) -> np.ndarray:
    """``crop(open_image(source))``; with a time limit, done in this thread's decode child,
    which is killed past the limit (:mod:`iqray.pipeline.decode_process`)."""
    if timeout_s and isinstance(source, bytes | bytearray | memoryview | np.ndarray):
        return decode_process().crop(source, crop, max_pixels, min_short_side, timeout_s)
    return crop(open_image(source, max_pixels=max_pixels, min_short_side=min_short_side))


def row_label(batch: dict[str, Any], i: int) -> str:
    """Which row: its input file and row, and key; rows of a user's own dataset
    (:func:`~iqray.pipeline.score_dataset`), which have no input file, by image hash."""
    if R.SOURCE_FILE not in batch:
        sha = batch.get(R.IMAGE_SHA256)
        known = sha is not None and sha[i] is not None
        return f"image sha256 {sha[i][:16]}" if known else f"row {i} of its batch"
    source, row = batch[R.SOURCE_FILE][i], int(batch[R.SOURCE_ROW][i])
    key = batch.get("key")
    label = f"{source} row {row}"
    if key is not None and key[i] is not None:
        label += f" (key {key[i]})"
    return label


def crop_transform(image_size: int, fine_resize: int | None = None) -> ImageTransform:
    """The decode stage's crops as a torch transform (model actors that decode on their
    device): uint8, so mean/std are the actor's business."""
    from iqray.model.preprocess import ImageTransform

    return ImageTransform(image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), fine_resize)


def decoded_channels(image_size: int, fine_resize: int | None, references: bool) -> int:
    """Channels of a decoded row: the model's views, then the reference's in FR reads."""
    return CropViews(image_size, fine_resize).channels * (2 if references else 1)


def iter_crops(shard, read, storage, transform: ImageTransform
               ) -> Iterator[tuple[int, bytes | None, str | None, Any, Any]]:
    """One shard's rows decoded in this process (training, eval, the precision check), not
    in the pipeline: (source_row, image bytes, prompt, decoded PIL image, uint8 crop). In a
    full-reference read the reference's crop follows the image's in the channel axis.
    Unreadable rows come with image and crop None."""
    import torch

    from iqray.pipeline.io.read import read_shard

    for batch in read_shard(shard, read, storage, []):
        references = batch.get(R.REFERENCE, [None] * len(batch[R.SOURCE_ROW]))
        for row, image, prompt, reference in zip(batch[R.SOURCE_ROW], batch[R.IMAGE],
                                                 batch[R.PROMPT], references, strict=True):
            try:
                decoded = open_image(image)
                crop = transform.crop(decoded)
                if R.REFERENCE in batch:
                    crop = torch.cat([crop, transform.crop(open_image(reference))])
            except (ImageDecodeError, TypeError):
                yield row, image, prompt, None, None
                continue
            yield row, image, prompt, decoded, crop


JPEG_MAGIC = b"\xff\xd8\xff"


def device_decodable(data: Any, max_pixels: int) -> bool:
    """Whether the model actor can decode these bytes on its device (torchvision's
    ``decode_jpeg``, nvJPEG on a GPU): a JPEG whose header PIL reads, RGB or greyscale
    (CMYK and YCCK stay with PIL), within the pixel limit. Only the header is parsed."""
    if not isinstance(data, bytes) or not data.startswith(JPEG_MAGIC):
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            return image.format == "JPEG" and image.mode in ("RGB", "L") and \
                width * height <= max_pixels
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False  # PIL's own decode then reports the error row


def decode_jpegs(encoded: list[bytes], device) -> list:
    """JPEG bytes -> uint8 (3, H, W) tensors on ``device``, in one batched torchvision
    ``decode_jpeg`` call (nvJPEG on a GPU), EXIF orientation applied as PIL's path does.
    Raises RuntimeError when any of them cannot be decoded."""
    # torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which is not
    # installable here; decode_jpeg still works and is the pinned version's nvJPEG path.
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg([torch.frombuffer(bytearray(data), dtype=torch.uint8)
                        for data in encoded], mode=ImageReadMode.RGB, device=device,
                       apply_exif_orientation=True)


def batch_where(batch: dict[str, Any]) -> str:
    """Which rows a batch holds, for a bug's one line: its input files, or (a user's own
    dataset) how many rows."""
    files = batch.get(R.SOURCE_FILE)
    if files is None or not len(files):
        count = len(next(iter(batch.values()), ()))
        return f"a batch of {count} rows of the dataset"
    unique = list(dict.fromkeys(str(f) for f in files))
    more = f" and {len(unique) - 2} more" if len(unique) > 2 else ""
    return f"rows of {', '.join(unique[:2])}{more}"


def decode_batch(batch: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
    """:func:`_decode_batch`; an exception it does not expect of an image (a bug, not a bad
    file) stops the run as a :class:`~iqray.pipeline.failures.StageBug`."""
    try:
        return _decode_batch(batch, **options)
    except Exception as exc:
        from iqray.pipeline.failures import StageBug

        raise StageBug.of("decode", batch_where(batch), exc) from exc


def array_sha256(array: np.ndarray) -> str:
    """Content hash of a decoded image (its shape, then its pixels): what the hash of the
    encoded bytes is for other rows (duplicates, the embedding cache's key)."""
    digest = hashlib.sha256(f"uint8 array {array.shape}\0".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _decode_batch(batch: dict[str, np.ndarray], image_size: int, max_pixels: int,
                  timeout_s: float | None, keep_image_bytes: bool,
                  fine_resize: int | None = None, references: bool = False,
                  jpeg_on_device: bool = False, reduced: bool = False,
                  arrays: list[np.ndarray | None] | None = None
                  ) -> dict[str, np.ndarray]:
    """Crops of every readable row; with ``references`` (full-reference models) each row's
    reference is cropped the same way and follows its image in the channel axis.

    With ``jpeg_on_device`` JPEG rows are not decoded here: their bytes travel on in
    ``_encoded`` (:data:`rows.ENCODED`) and the model actor decodes them on its device (see
    :meth:`ModelStage.decode_on_device`); this task then only hashes and checks headers."""
    started = time.perf_counter()
    count = len(batch[R.IMAGE])
    crop = CropViews(image_size, fine_resize)
    # --decode fast: JPEGs at least twice the largest view decode at a reduced DCT scale
    least = max(crop.resizes) if reduced else None
    channels = decoded_channels(image_size, fine_resize, references)
    pixels = np.zeros((count, channels, image_size, image_size), np.uint8)
    # Content hash of the encoded bytes: exact-duplicate detection and embedding-cache key.
    images = batch[R.IMAGE]
    # Rows of a user's dataset may come decoded already (ray.data.read_images): HxWx3 uint8
    # arrays, cropped here as model.score crops them, without an encode/decode round trip.
    arrays = arrays if arrays is not None else [None] * count
    batch[R.IMAGE_SHA256] = np.array(
        [hashlib.sha256(b).hexdigest() if isinstance(b, bytes) else
         array_sha256(a) if a is not None else None for b, a in zip(images, arrays,
                                                                     strict=True)],
        dtype=object)
    errors = list(batch[R.ERROR])
    kinds = list(batch[R.ERROR_KIND])
    encoded = np.full(count, None, dtype=object)
    for i in range(count):
        if errors[i] is not None:
            continue
        if jpeg_on_device and not references and device_decodable(images[i], max_pixels):
            encoded[i] = images[i]
            continue
        try:
            source = arrays[i] if arrays[i] is not None else images[i]
            pixels[i, :crop.channels] = crop_image(source, crop, max_pixels, least, timeout_s)
        except (ImageDecodeError, DecodeProcessDied) as exc:
            errors[i], kinds[i] = f"{row_label(batch, i)}: {exc}", "decode"
            continue
        except DecodeTimeout as exc:
            errors[i], kinds[i] = f"{row_label(batch, i)}: {exc}", "timeout"
            continue
        if references:
            try:
                pixels[i, crop.channels:] = crop_image(batch[R.REFERENCE][i], crop, max_pixels,
                                                       least, timeout_s)
            except (ImageDecodeError, DecodeProcessDied) as exc:
                errors[i] = f"{row_label(batch, i)}: reference: {exc}"
                kinds[i] = "reference_decode"
            except DecodeTimeout as exc:
                errors[i], kinds[i] = f"{row_label(batch, i)}: reference: {exc}", "timeout"
    batch[R.PIXELS] = pixels
    if jpeg_on_device:
        batch[R.ENCODED] = encoded
    batch[R.ERROR] = np.array(errors, dtype=object)
    batch[R.ERROR_KIND] = np.array(kinds, dtype=object)
    if keep_image_bytes:
        batch[R.IMAGE_BYTES] = images
    del batch[R.IMAGE]
    batch.pop(R.REFERENCE, None)
    batch[R.DECODE_S] = np.full(count, (time.perf_counter() - started) / max(count, 1))
    batch[R.DECODE_NODE] = np.full(count, node_id(), dtype=object)
    return batch


def node_id() -> str | None:
    """The Ray node this runs on (per-node row counts in the run summary); None outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


def decode_user_batch(batch: dict[str, np.ndarray], image_column: str,
                      reference_column: str | None, storage, image_root: str | None,
                      taken: tuple[str, ...], **decode_kwargs) -> dict[str, np.ndarray]:
    """:func:`decode_batch` for rows of a user's own dataset
    (:func:`~iqray.pipeline.score_dataset`): their image column (bytes, a path/URL, or a
    Hugging Face ``Image`` struct) becomes the readers' columns here, in the decode task,
    so encoded bytes cross the object store once. The user's columns pass through."""
    from iqray.pipeline.io.shards import image_cell, read_bytes, resolve_ref

    clash = [name for name in taken if name in batch]
    if clash:
        raise ValueError(f"the dataset already has column(s) {', '.join(clash)}, which "
                         "score_dataset adds; rename or drop them first")
    if image_column not in batch:
        raise ValueError(f"no image column {image_column!r} in the dataset; columns: "
                         f"{', '.join(batch)}")

    def read_path(ref: str) -> bytes:
        if image_root is None and "://" not in ref and not ref.startswith("/"):
            raise ValueError("a relative path needs image_root (Ray workers do not share "
                             "the driver's working directory)")
        return read_bytes(resolve_ref("", ref, image_root), storage)

    def cells(column: str, what: str):
        return [(None, None, None) if isinstance(value, np.ndarray) else
                image_cell(value, f"{what} column {column!r}", read_path, paths=True)
                for value in batch[column]]

    # decoded images (Ray's tensor columns: one HxWxC array per row) skip the decode
    arrays = [value if isinstance(value, np.ndarray) else None
              for value in batch[image_column]]
    images = cells(image_column, "image")
    count = len(images)
    errors = [error for _, error, _ in images]
    kinds = [kind for _, _, kind in images]
    if reference_column is not None:
        references = cells(reference_column, "reference")
        for i, (_, error, _) in enumerate(references):
            if errors[i] is None and error is not None:
                errors[i], kinds[i] = f"reference: {error}", "read_reference"
        decoded_refs = np.empty(count, dtype=object)  # arrays stay arrays: open_image takes them
        for i, (value, (data, _, _)) in enumerate(zip(batch[reference_column], references,
                                                      strict=True)):
            decoded_refs[i] = value if isinstance(value, np.ndarray) else data
        batch[R.REFERENCE] = decoded_refs
    batch[R.IMAGE] = R.column([data for data, _, _ in images])
    batch[R.ERROR] = R.column(errors)
    batch[R.ERROR_KIND] = R.column(kinds)
    return decode_batch(batch, arrays=arrays, **decode_kwargs)
