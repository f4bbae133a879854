"""A loopback HTTP proxy that fails a seeded share of requests, or delays every one.

Used by the tests (S3 fault injection) and the storage benchmark (per-request
latency, which loopback lacks and real object stores have).

Why: the pipeline's claim that it survives a flaky object store is only worth something if a
test makes the store flaky. ``FaultInjectingProxy`` sits between a client (s3fs/aiobotocore)
and moto's S3 server, both on 127.0.0.1, and for each request whose method is in ``methods``
draws from a seeded ``random.Random``: with probability ``fail_share`` it injects one of
``modes`` instead of forwarding:

* ``"503"``: an S3-style ``SlowDown`` error, what S3 sends when throttling;
* ``"500"``: an S3-style ``InternalError``;
* ``"reset"``: the connection is closed with a TCP RST (``SO_LINGER`` 0) and no response.

Every other request is forwarded unchanged (method, path and query, headers including
``Host`` so SigV4 signatures still match, body) and the response is relayed back. Faults are
injected *before* the request reaches the server, so an injected fault never changes stored
state: a test that writes through the proxy and then reads back byte-exact data proves the
client retried every failed request and lost no write, and ``injected`` proves the faults
really happened. There is deliberately no cap on consecutive faults for one path: with a
seeded draw the outcome of a test is reproducible, and a client that gives up after its retry
budget is a finding, not noise.

The request body is read in full before deciding, whether it is framed by ``Content-Length``
or by ``Transfer-Encoding: chunked`` (which is decoded; HTTP trailers are forwarded as
headers), and it is forwarded with a ``Content-Length``. ``aws-chunked`` is a
``Content-Encoding`` of the payload, not a transfer coding, so it passes through untouched.
The draw order is fixed by the seed; which request gets which draw still depends on the order
in which concurrent requests take the lock, which is good enough for tests.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

# RFC 9110 §7.6.1 hop-by-hop fields, plus the framing fields the proxy recomputes itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "content-length",
    }
)

MODES = ("503", "500", "reset")

_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
}


def _error_body(code: str, message: str, resource: str, request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()


def _dropped_fields(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Hop-by-hop fields, including any the ``Connection`` field names for this hop only."""
    dropped = set(HOP_BY_HOP)
    for name, value in headers:
        if name.lower() == "connection":
            dropped.update(token.strip().lower() for token in value.split(",") if token.strip())
    return dropped


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, proxy: FaultInjectingProxy) -> None:
        self.proxy = proxy
        # Port 0: the kernel picks a free port at bind time, so no other process can take it
        # between choosing and binding.
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the S3 clients expect
    server: _ProxyServer

    def setup(self) -> None:
        super().setup()
        self.server.proxy._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: test output should show test failures, not access logs."""

    def _handle(self) -> None:
        try:
            body, trailers = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            self.send_error(400, "Malformed request body")
            return
        proxy = self.server.proxy
        if proxy.delay_s:
            time.sleep(proxy.delay_s)  # a store's time to first byte, which loopback lacks
        mode = proxy._draw(self.command)
        if mode == "reset":
            self._reset()
        elif mode is not None:
            self._send_s3_error(mode)
        else:
            self._forward(body, trailers)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_OPTIONS = do_PATCH = _handle

    def _read_body(self) -> tuple[bytes, list[tuple[str, str]]]:
        """The whole request body, de-chunked, and any HTTP trailer fields."""
        transfer_encoding = self.headers.get("Transfer-Encoding", "")
        if transfer_encoding:
            codings = [c.strip().lower() for c in transfer_encoding.split(",")]
            if codings[-1] != "chunked":
                raise ValueError(f"unsupported Transfer-Encoding {transfer_encoding!r}")
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b"", []  # HTTP/1.1: no framing field means no body
        size = int(length)
        if size < 0:
            raise ValueError("negative Content-Length")
        body = self.rfile.read(size)
        if len(body) != size:
            raise ValueError("request body shorter than its Content-Length")
        return body, []

    def _read_chunked(self) -> tuple[bytes, list[tuple[str, str]]]:
        parts = []
        while True:
            line = self.rfile.readline(65537)
            if not line.endswith(b"\n"):
                raise ValueError("truncated chunk size line")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise ValueError("truncated chunk")
            parts.append(chunk)
        trailers = []
        while True:
            line = self.rfile.readline(65537)
            if not line.endswith(b"\n"):
                raise ValueError("truncated chunked trailer")
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode("latin-1").partition(":")
            trailers.append((name.strip(), value.strip()))
        return b"".join(parts), trailers

    def _reset(self) -> None:
        """Abort with a TCP RST: close the socket with a zero linger timeout, send nothing."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # socket.close() would wait for rfile and wfile, which the base class still uses; closing
        # the detached descriptor releases the connection now, and with it sends the RST.
        os.close(self.connection.detach())

    def _send_s3_error(self, mode: str) -> None:
        status, code, message = _ERRORS[mode]
        request_id = f"fault-proxy-{id(self):x}"
        body = _error_body(code, message, self.path.split("?", 1)[0], request_id)
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", request_id)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes, trailers: list[tuple[str, str]]) -> None:
        proxy = self.server.proxy
        request_fields = list(self.headers.items())
        dropped = _dropped_fields(request_fields)
        headers = [(k, v) for k, v in request_fields + trailers if k.lower() not in dropped]
        had_body = (
            "Content-Length" in self.headers
            or "Transfer-Encoding" in self.headers
            or self.command in ("PUT", "POST", "PATCH")
        )
        if had_body:
            headers.append(("Content-Length", str(len(body))))
        upstream = http.client.HTTPConnection(proxy._host, proxy._port, timeout=proxy.timeout)
        try:
            # Host and Accept-Encoding are relayed as the client sent them: SigV4 signs Host.
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                upstream.putheader(name, value)
            upstream.endheaders(body if had_body else None)
            response = upstream.getresponse()
            payload = response.read()  # de-chunks; nothing to read for HEAD, 204 and 304
            response_fields = response.getheaders()
        except (OSError, http.client.HTTPException) as error:
            upstream.close()
            self.close_connection = True
            self.send_error(502, f"upstream failed: {error!r}")
            return
        upstream.close()
        with proxy._lock:
            proxy.forwarded += 1
            proxy.requests[(self.command, urlsplit(self.path).path)] += 1
            proxy.bytes_relayed[(self.command, urlsplit(self.path).path)] += len(payload)

        bodyless = self.command == "HEAD" or response.status in (204, 304) or response.status < 200
        dropped = _dropped_fields(response_fields)
        if bodyless:
            # A HEAD response's Content-Length is the size of the object it describes.
            dropped.discard("content-length")
        self.send_response_only(response.status, response.reason)
        for name, value in response_fields:
            if name.lower() not in dropped:
                self.send_header(name, value)
        if not bodyless:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not bodyless:
            self.wfile.write(payload)


class FaultInjectingProxy:
    """Forward HTTP to ``target``, failing a seeded ``fail_share`` of requests in ``methods``.

    Use as a context manager; ``endpoint`` is the URL to give the client, ``injected`` counts
    faults by ``(method, mode)``, ``forwarded`` counts requests relayed to the target and
    ``requests`` counts them by ``(method, path)`` and ``bytes_relayed`` their response bytes.
    """

    def __init__(
        self,
        target: str,
        fail_share: float = 0.0,
        seed: int = 0,
        methods: Iterable[str] = ("GET", "PUT", "POST", "HEAD"),
        modes: Iterable[str] = MODES,
        timeout: float = 30.0,
        delay_s: float = 0.0,
    ) -> None:
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"target must be an http:// URL, got {target!r}")
        if not 0.0 <= fail_share <= 1.0:
            raise ValueError(f"fail_share must be within [0, 1], got {fail_share}")
        self.modes = tuple(modes)
        unknown = set(self.modes) - set(MODES)
        if unknown or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
        self.target = target
        self.fail_share = fail_share
        self.methods = frozenset(method.upper() for method in methods)
        self.timeout = timeout
        self.delay_s = delay_s
        self.injected: Counter[tuple[str, str]] = Counter()
        self.forwarded = 0
        # Requests relayed, by (method, path): shows which objects were fetched how often.
        self.requests: Counter[tuple[str, str]] = Counter()
        # Response body bytes relayed, by (method, path): a whole object or a range of it.
        self.bytes_relayed: Counter[tuple[str, str]] = Counter()
        self._host = parts.hostname
        self._port = parts.port or 80
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: _ProxyServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The proxy's URL, to use as the client's ``endpoint_url``."""
        if self._server is None:
            raise RuntimeError("the proxy is not running; use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _draw(self, method: str) -> str | None:
        """The fault to inject for this request, or None; one seeded draw per eligible request."""
        if method.upper() not in self.methods:
            return None
        with self._lock:
            fail = self._rng.random() < self.fail_share
            mode = self._rng.choice(self.modes)
            if fail:
                self.injected[(method.upper(), mode)] += 1
        return mode if fail else None

    def _track(self, connection: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def start(self) -> FaultInjectingProxy:
        """Bind a free loopback port and serve on a daemon thread."""
        if self._server is not None:
            raise RuntimeError("the proxy is already running")
        self._server = _ProxyServer(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, and end idle keep-alive connections so no handler thread lingers."""
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                connection.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> FaultInjectingProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
