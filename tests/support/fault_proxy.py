"""A fault-injecting HTTP proxy for the S3 test server: real sockets, real failures.

It listens on 127.0.0.1 and forwards every request to the upstream server (moto), except
that a fault may instead answer 500 InternalError or 503 SlowDown (S3's XML error bodies),
reset the connection before replying, send a body cut short under the full Content-Length,
or add latency. Faults are chosen per operation: GET (object reads), PUT (object writes),
LIST (bucket listings) and HEAD, and optionally only for keys containing a substring, so a
test can fail one shard past every retry.

Whether a request is hit depends on that request alone, never on the order in which
concurrent clients' requests arrive: the draw is a hash of the seed, the fault, the request's
identity (method, path and query, Range) and how many times that same request was seen
before (so a retry draws again). Random parts of names (the writer's temporary files, upload
ids) are left out of the identity, so a run draws the same faults every time.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

FaultKind = Literal["500", "503", "reset", "truncate", "latency"]
Operation = Literal["GET", "PUT", "LIST", "HEAD", "DELETE", "ANY"]

ERROR_BODIES = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
              "te", "trailer"}


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    operation: Operation = "ANY"
    rate: float = 1.0  # chance per matching request
    key: str | None = None  # only requests whose path contains this
    delay_s: float = 0.5  # for "latency"
    first: int = 0  # > 0: instead of by chance, the first n tries of each distinct request


def operation_of(method: str, path: str) -> str:
    """S3 operation of a path-style request: a GET on a bare bucket is a listing."""
    parts = urlsplit(path)
    bare_bucket = parts.path.strip("/").count("/") == 0
    if method == "GET" and bare_bucket:
        return "LIST"
    return method


# Parts of a request that differ from run to run: uuid-like hex in names, upload ids.
_RANDOM_HEX = re.compile(r"[0-9a-f]{32}")
_VOLATILE_QUERY = {"uploadId"}


def request_identity(method: str, path: str, byte_range: str | None) -> str:
    """What makes two requests the same request, across runs: method, path (random hex
    masked), the query without upload ids, and the Range asked for."""
    parts = urlsplit(path)
    query = sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                   if k not in _VOLATILE_QUERY)
    return "|".join((method, _RANDOM_HEX.sub("#", parts.path),
                     _RANDOM_HEX.sub("#", urlencode(query)), byte_range or ""))


def uniform(*parts: object) -> float:
    """A number in [0, 1) fixed by ``parts``: the same request always draws the same."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class FaultProxy:
    def __init__(self, upstream: str):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.faults: list[Fault] = []
        self.seed = 0
        self.lock = threading.Lock()
        self.seen: Counter = Counter()  # request identity -> times seen
        self.injected: Counter = Counter()  # (kind, operation) -> count
        self.matched: Counter = Counter()  # fault index -> matching requests seen
        self.requests: Counter = Counter()  # operation -> count
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def set(self, *faults: Fault, seed: int = 0) -> None:
        """Replace the faults (none: a transparent proxy) and the seed; counters restart."""
        with self.lock:
            self.faults = list(faults)
            self.seed = seed
            self.seen.clear()
            self.injected.clear()
            self.requests.clear()
            self.matched.clear()

    def _draw(self, operation: str, identity: str, path: str) -> Fault | None:
        with self.lock:
            self.requests[operation] += 1
            self.seen[identity] += 1
            tries = self.seen[identity]
            for index, fault in enumerate(self.faults):
                if fault.operation not in ("ANY", operation):
                    continue
                if fault.key is not None and fault.key not in path:
                    continue
                self.matched[index] += 1
                hit = (tries <= fault.first if fault.first
                       else uniform(self.seed, index, identity, tries) < fault.rate)
                if hit:
                    self.injected[(fault.kind, operation)] += 1
                    return fault
        return None

    # -- one request ------------------------------------------------------------------

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = _read_body(request)
        operation = operation_of(request.command, request.path)
        identity = request_identity(request.command, request.path,
                                    request.headers.get("Range"))
        fault = self._draw(operation, identity, request.path)
        if fault is not None and fault.kind in ERROR_BODIES:
            return _send_error(request, *ERROR_BODIES[fault.kind])
        if fault is not None and fault.kind == "reset":
            return _reset(request)
        if fault is not None and fault.kind == "latency":
            time.sleep(fault.delay_s)
        status, reason, headers, payload = self._forward(request, body)
        request.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                request.send_header(name, value)
        length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
        # A HEAD reply has no body but tells the object's length.
        request.send_header("Content-Length",
                            length if request.command == "HEAD" else str(len(payload)))
        if fault is not None and fault.kind == "truncate" and len(payload) > 1:
            request.send_header("Connection", "close")
            request.end_headers()
            request.wfile.write(payload[: len(payload) // 2])
            request.wfile.flush()
            request.close_connection = True
            _reset(request)
            return
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(payload)

    def _forward(self, request: BaseHTTPRequestHandler, body: bytes):
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() not in HOP_BY_HOP}
            if body or request.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            connection.request(request.command, request.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            return response.status, response.reason, response.getheaders(), payload
        finally:
            connection.close()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # the sockets this proxy breaks on purpose


def _read_body(request: BaseHTTPRequestHandler) -> bytes:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(request.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while request.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(request.rfile.read(size))
            request.rfile.readline()
    length = int(request.headers.get("Content-Length") or 0)
    return request.rfile.read(length) if length else b""


def _send_error(request: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>").encode()
    request.send_response(status)
    request.send_header("Content-Type", "application/xml")
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    if request.command != "HEAD":
        request.wfile.write(body)


def _reset(request: BaseHTTPRequestHandler) -> None:
    """Close with RST instead of FIN: what a client sees when a load balancer drops it."""
    sock = request.connection
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    request.close_connection = True
    sock.close()
