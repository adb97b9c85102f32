"""Image decode in a child process that is killed when an image takes too long.

A signal handler cannot stop a decoder that is stuck inside C (libjpeg, zlib, a resize): the
handler runs only when the call returns. So each decode worker keeps one child process (PIL
and numpy, no torch) that decodes and crops one image at a time; the worker waits for the
answer with a deadline and, past it, kills the child and starts another for the next image.
A child that dies on a file (a crash in a native decoder) costs that row, not the worker.

The two processes talk over pipes with length-prefixed JSON headers and raw bytes (never
pickle): a request is the crop settings and the encoded bytes (or a uint8 array's shape and
pixels); an answer is the crop's shape and pixels, or the decode error's message.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO

import numpy as np

from iqray.model.images import CropViews, ImageDecodeError, open_image

_LENGTH = struct.Struct("<I")


class DecodeTimeout(Exception):
    """An image's decode ran past the time limit; the child doing it was killed."""


class DecodeProcessDied(Exception):
    """The child died while decoding an image (a native decoder crashed on it)."""


def _frame(header: dict[str, Any], payload: bytes | memoryview) -> bytes:
    encoded = json.dumps(header).encode()
    return b"".join((_LENGTH.pack(len(encoded)), encoded, _LENGTH.pack(len(payload)), payload))


def _read_exactly(stream: BinaryIO, count: int) -> bytes:
    data = stream.read(count)
    if data is None or len(data) != count:
        raise EOFError(f"expected {count} bytes, got {0 if data is None else len(data)}")
    return data


def _receive(stream: BinaryIO) -> tuple[dict[str, Any], bytes]:
    header = json.loads(_read_exactly(stream, _LENGTH.unpack(_read_exactly(stream, 4))[0]))
    return header, _read_exactly(stream, _LENGTH.unpack(_read_exactly(stream, 4))[0])


class DecodeProcess:
    """One child decoding for this thread of a worker; started on first use, replaced after a
    timeout or a crash."""

    def __init__(self) -> None:
        self._child: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return None if self._child is None else self._child.pid

    def crop(self, source: bytes | np.ndarray, crop: CropViews, max_pixels: int,
             min_short_side: int | None, timeout_s: float) -> np.ndarray:
        """``crop(open_image(source, ...))`` done in the child within ``timeout_s`` seconds
        (raises :class:`DecodeTimeout`), its own errors raised as :class:`ImageDecodeError`."""
        header: dict[str, Any] = {"size": crop.size, "fine_resize": crop.fine_resize,
                                  "max_pixels": max_pixels, "min_short_side": min_short_side}
        if isinstance(source, np.ndarray):
            array = np.ascontiguousarray(source)
            header |= {"shape": list(array.shape), "dtype": str(array.dtype)}
            payload: bytes | memoryview = memoryview(array).cast("B")
        else:
            payload = source
        request = _frame(header, payload)
        child = self._running()
        deadline = time.monotonic() + timeout_s
        if not self._sent_before(request, deadline) or not self._answer_before(deadline):
            self.close()
            raise DecodeTimeout(f"decode took longer than {timeout_s:g} s")
        try:
            answer, pixels = _receive(child.stdout)
        except (EOFError, ValueError) as exc:
            self.close()
            raise DecodeProcessDied(f"the decoder process died on this image (exit status "
                                    f"{child.returncode})") from exc
        if "error" in answer:
            raise ImageDecodeError(answer["error"])
        if "bug" in answer:
            raise RuntimeError(f"decoder process: {answer['bug']}")
        return np.frombuffer(pixels, np.uint8).reshape(answer["shape"])

    def _sent_before(self, request: bytes, deadline: float) -> bool:
        """Write the request (the child's stdin is non-blocking), or False at the deadline."""
        poller = select.poll()
        poller.register(self._child.stdin, select.POLLOUT)
        view, fd = memoryview(request), self._child.stdin.fileno()
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                if poller.poll(remaining * 1000):
                    view = view[os.write(fd, view):]
            except BlockingIOError:
                continue
            except BrokenPipeError:  # died since its last answer; the read reports it
                return True
        return True

    def _answer_before(self, deadline: float) -> bool:
        poller = select.poll()
        poller.register(self._child.stdout, select.POLLIN | select.POLLHUP)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if poller.poll(remaining * 1000):
                return True

    def _running(self) -> subprocess.Popen:
        """The child, started (and ready: imports done, which no image's time limit counts)
        if there is none or it has died."""
        if self._child is not None and self._child.poll() is None:
            return self._child
        self.close()
        self._child = subprocess.Popen(
            [sys.executable, "-m", "iqray.pipeline.decode_process", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        os.set_blocking(self._child.stdin.fileno(), False)
        try:
            ready, _ = _receive(self._child.stdout)
        except (EOFError, ValueError) as exc:
            code = self._child.wait()
            self._child = None
            raise RuntimeError(f"the decoder process did not start (exit status {code}; its "
                               f"error is in the worker's log)") from exc
        if ready != {"ready": True}:
            raise RuntimeError(f"the decoder process started with {ready!r}, not ready")
        return self._child

    def close(self) -> None:
        """Kill the child (it may be stuck in C, where nothing else reaches it) and reap it."""
        child, self._child = self._child, None
        if child is None:
            return
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout):
            with contextlib.suppress(OSError):
                stream.close()


_per_thread = threading.local()


def decode_process() -> DecodeProcess:
    """This thread's decode child (one per thread: a child decodes one image at a time)."""
    if not hasattr(_per_thread, "process"):
        _per_thread.process = DecodeProcess()
    return _per_thread.process


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the worker that started this child dies, however it dies (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(0)


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """The child's loop: one request, one answer, until the worker closes the pipe."""
    answers.write(_frame({"ready": True}, b""))
    answers.flush()
    while True:
        try:
            header, payload = _receive(requests)
        except EOFError:
            return
        try:
            source: bytes | np.ndarray = payload
            if "shape" in header:
                source = np.frombuffer(payload, header["dtype"]).reshape(header["shape"])
            crop = CropViews(header["size"], header["fine_resize"])
            pixels = crop(open_image(source, max_pixels=header["max_pixels"],
                                     min_short_side=header["min_short_side"]))
            answer = _frame({"shape": list(pixels.shape)}, memoryview(pixels).cast("B"))
        except ImageDecodeError as exc:
            answer = _frame({"error": str(exc)}, b"")
        except Exception as exc:  # a bug: the worker raises it, which stops the run
            answer = _frame({"bug": f"{type(exc).__name__}: {exc}"}, b"")
        answers.write(answer)
        answers.flush()


if __name__ == "__main__":
    _die_with_parent(int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the driver's to handle
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print (a library's) goes to the log, not into an answer
    serve(sys.stdin.buffer, answers)
