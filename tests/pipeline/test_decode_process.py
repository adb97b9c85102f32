"""The decode time limit holds wherever a decoder is stuck: images decode in a child process
that is killed past the limit. A stopped child (SIGSTOP: it runs no instruction, Python or
native) stands for a decoder stuck in C, which no signal handler in the worker can stop."""

from __future__ import annotations

import fcntl
import io
import os
import signal
import struct
import termios
import threading
import time

import numpy as np
import pytest
from PIL import Image

from iqray.model.images import CropViews, ImageDecodeError, open_image
from iqray.pipeline.decode import decode_batch
from iqray.pipeline.decode_process import DecodeProcess, DecodeProcessDied, DecodeTimeout

CROP = CropViews(32, 48)


def jpeg(size=(80, 60), colour=(200, 30, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "JPEG")
    return out.getvalue()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def decoder():
    process = DecodeProcess()
    yield process
    process.close()


def test_the_child_crops_as_the_worker_would_and_says_why_it_cannot(decoder):
    data = jpeg()
    np.testing.assert_array_equal(decoder.crop(data, CROP, 10**6, None, 30),
                                  CROP(open_image(data)))
    array = np.arange(50 * 40 * 3, dtype=np.uint8).reshape(50, 40, 3)
    np.testing.assert_array_equal(decoder.crop(array, CROP, 10**6, None, 30),
                                  CROP(open_image(array)))
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decoder.crop(b"not an image", CROP, 10**6, None, 30)
    with pytest.raises(ImageDecodeError, match="above the limit of 100"):
        decoder.crop(data, CROP, 100, None, 30)
    pid = decoder.pid
    decoder.crop(data, CROP, 10**6, None, 30)
    assert decoder.pid == pid  # one child serves image after image
    with open(f"/proc/{pid}/maps") as handle:  # decode workers never load torch
        assert "libtorch" not in handle.read()


def test_a_decoder_that_never_returns_is_killed_at_the_time_limit(decoder):
    data = jpeg((400, 300))
    decoder.crop(data, CROP, 10**6, None, 30)
    stuck = decoder.pid
    os.kill(stuck, signal.SIGSTOP)
    # If the limit does not hold, the call waits for the child; this lets it go on after 60 s
    # so that the test fails on the time taken instead of hanging.
    release = threading.Timer(60, os.kill, (stuck, signal.SIGCONT))
    release.start()
    try:
        started = time.monotonic()
        with pytest.raises(DecodeTimeout, match="longer than 0.5 s"):
            decoder.crop(data, CROP, 10**6, None, 0.5)
        taken = time.monotonic() - started
    finally:
        release.cancel()
    assert 0.5 <= taken < 10, f"a 0.5 s limit returned after {taken:.1f} s"
    assert not alive(stuck)  # killed and reaped, not left stopped
    np.testing.assert_array_equal(decoder.crop(data, CROP, 10**6, None, 30),
                                  CROP(open_image(data)))  # the next image, on a new child
    assert decoder.pid != stuck


def test_a_child_that_dies_on_an_image_costs_that_image_only(decoder):
    data = jpeg()
    decoder.crop(data, CROP, 10**6, None, 30)
    child = decoder._child
    os.kill(child.pid, signal.SIGSTOP)
    outcome: list[BaseException] = []

    def decode() -> None:
        try:
            decoder.crop(data, CROP, 10**6, None, 120)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    worker = threading.Thread(target=decode)
    worker.start()
    # Once the request is in the stopped child's pipe, the child "crashes" on it.
    deadline = time.monotonic() + 60
    while queued(child.stdin.fileno()) == 0:
        assert time.monotonic() < deadline, "the request never reached the child's pipe"
        time.sleep(0.01)  # polling interval of the pipe check
    os.kill(child.pid, signal.SIGKILL)
    worker.join(60)
    assert not worker.is_alive(), "the decode call did not return after its child died"
    assert len(outcome) == 1 and isinstance(outcome[0], DecodeProcessDied), outcome
    assert "died on this image (exit status -9)" in str(outcome[0])
    assert decoder.crop(data, CROP, 10**6, None, 30).shape == (6, 32, 32)


def queued(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD works on either end of a Linux pipe)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def test_a_row_past_the_time_limit_is_a_timeout_row_and_the_rest_decode():
    """Real native work: a 64-megapixel PNG of zeros (140 kB) takes about a second of zlib
    and resampling in C, three times a 0.3 s limit."""
    bomb = io.BytesIO()
    Image.new("L", (8000, 8000), 0).save(bomb, "PNG")
    images = [jpeg(), bomb.getvalue(), jpeg(colour=(10, 220, 30))]
    batch = {"source_file": np.array(["x"] * 3, dtype=object), "source_row": np.arange(3),
             "_image": np.array(images, dtype=object),
             "_error": np.array([None] * 3, dtype=object),
             "_error_kind": np.array([None] * 3, dtype=object)}
    fr_batch = {name: values.copy() for name, values in batch.items()}
    out = decode_batch(batch, image_size=32, max_pixels=10**8, timeout_s=0.3,
                       keep_image_bytes=False, fine_resize=48)
    assert list(out["_error_kind"]) == [None, "timeout", None]
    assert "x row 1" in out["_error"][1] and "longer than 0.3 s" in out["_error"][1]
    np.testing.assert_array_equal(out["pixels"][2], CROP(open_image(images[2])))

    # Full-reference rows: a reference past the limit is a timeout too, not a bad reference.
    fr_batch["_image"] = np.array([images[0]] * 3, dtype=object)
    fr_batch["_reference"] = np.array(images, dtype=object)
    out = decode_batch(fr_batch, image_size=32, max_pixels=10**8, timeout_s=0.3,
                       keep_image_bytes=False, fine_resize=48, references=True)
    assert list(out["_error_kind"]) == [None, "timeout", None]
    assert "reference: decode took longer than 0.3 s" in out["_error"][1]
    np.testing.assert_array_equal(out["pixels"][2][6:], CROP(open_image(images[2])))
