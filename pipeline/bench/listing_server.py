"""A loopback S3 endpoint that lists a generated bucket of N keys and stores nothing.

Measuring a listing of a million keys should not need a million uploads: this
server answers ListObjectsV2 (and the HeadBucket/HeadObject probes s3fs makes
before listing) for keys computed from their index, ``<prefix><i:09d>.jpg``.
The keys form a virtual sorted sequence, so a start point is found by bisection
and no key list is ever held: the server stays small however large N is.
Object bodies are not served (GET of an object answers 501).
"""

from __future__ import annotations

import bisect
import collections
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.sax.saxutils import escape

S3_PAGE_KEYS = 1000  # S3's own cap on MaxKeys
_LAST_MODIFIED = datetime(2026, 1, 1, tzinfo=UTC)


class GeneratedKeys(Sequence[str]):
    """``count`` sorted keys ``<prefix><i:09d>.jpg``, made on demand from the index."""

    def __init__(self, prefix: str, count: int) -> None:
        self.prefix, self.count = prefix, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if not 0 <= index < self.count:
            raise IndexError(index)
        return f"{self.prefix}{index:09d}.jpg"

    def index_of(self, key: str) -> int | None:
        position = bisect.bisect_left(self, key)
        return position if position < self.count and self[position] == key else None

    @staticmethod
    def size(index: int) -> int:
        # Varied but deterministic, like real image sizes (20-120 KB).
        return 20_000 + (index * 7919) % 100_000

    @staticmethod
    def etag(index: int) -> str:
        return f'"{index:032x}"'


class _ListingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection per client, as with S3
    server: _ListingServer

    def log_message(self, format: str, *args: object) -> None:
        pass  # a million-key listing is a thousand requests; keep the bench output readable

    def do_HEAD(self) -> None:
        bucket, key, _ = self._target()
        self.server.requests[f"HEAD {'object' if key else 'bucket'}"] += 1
        if bucket != self.server.bucket:
            self._reply(404, b"")
        elif not key:
            self._reply(200, b"")
        elif (index := self.server.keys.index_of(key)) is not None:
            self._reply(
                200,
                b"",
                length=GeneratedKeys.size(index),
                headers={
                    "ETag": GeneratedKeys.etag(index),
                    "Last-Modified": format_datetime(_LAST_MODIFIED, usegmt=True),
                },
            )
        else:
            self._reply(404, b"")

    def do_GET(self) -> None:
        bucket, key, query = self._target()
        operation = "object" if key else "list-type=2" if "list-type" in query else "bucket"
        self.server.requests[f"GET {operation}"] += 1
        if bucket != self.server.bucket:
            self._error(404, "NoSuchBucket")
        elif key:
            self._error(501, "NotImplemented")  # listing only: no object bodies
        elif "location" in query:
            self._reply(200, b'<?xml version="1.0" encoding="UTF-8"?><LocationConstraint/>')
        elif query.get("list-type") == "2":
            self._reply(200, self._list_objects_v2(query).encode())
        else:
            self._error(501, "NotImplemented")

    def _list_objects_v2(self, query: dict[str, str]) -> str:
        keys = self.server.keys
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        max_keys = min(int(query.get("max-keys", S3_PAGE_KEYS)), S3_PAGE_KEYS)
        token = query.get("continuation-token")
        if token is not None:
            position = int(token)
        else:
            position = bisect.bisect_right(keys, query.get("start-after", ""))
            position = max(position, bisect.bisect_left(keys, prefix))
        url_encoded = query.get("encoding-type") == "url"

        def name(key: str) -> str:
            return escape(quote(key, safe="/") if url_encoded else key)

        contents, common_prefixes = [], []
        while position < len(keys) and len(contents) + len(common_prefixes) < max_keys:
            key = keys[position]
            if not key.startswith(prefix):
                position = len(keys)  # sorted: nothing further can match
                break
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                rolled_up = prefix + rest[: rest.index(delimiter) + len(delimiter)]
                common_prefixes.append(f"<CommonPrefixes><Prefix>{name(rolled_up)}</Prefix>")
                common_prefixes[-1] += "</CommonPrefixes>"
                # Skip every key under the rolled-up prefix ("\x7f" sorts after ASCII names).
                position = bisect.bisect_left(keys, rolled_up + "\x7f")
                continue
            contents.append(
                f"<Contents><Key>{name(key)}</Key>"
                f"<LastModified>{_LAST_MODIFIED:%Y-%m-%dT%H:%M:%S.000Z}</LastModified>"
                f"<ETag>{escape(GeneratedKeys.etag(position))}</ETag>"
                f"<Size>{GeneratedKeys.size(position)}</Size>"
                "<StorageClass>STANDARD</StorageClass></Contents>"
            )
            position += 1
        truncated = position < len(keys) and keys[position].startswith(prefix)
        parts = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
            f"<Name>{self.server.bucket}</Name><Prefix>{name(prefix)}</Prefix>",
            f"<KeyCount>{len(contents) + len(common_prefixes)}</KeyCount>",
            f"<MaxKeys>{max_keys}</MaxKeys>",
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>",
        ]
        if delimiter:
            parts.append(f"<Delimiter>{escape(delimiter)}</Delimiter>")
        if url_encoded:
            parts.append("<EncodingType>url</EncodingType>")
        if token is not None:
            parts.append(f"<ContinuationToken>{token}</ContinuationToken>")
        if truncated:
            parts.append(f"<NextContinuationToken>{position}</NextContinuationToken>")
        parts += [*contents, *common_prefixes, "</ListBucketResult>"]
        return "".join(parts)

    def _target(self) -> tuple[str, str, dict[str, str]]:
        url = urlsplit(self.path)
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        query = {name: values[0] for name, values in parse_qs(url.query, True).items()}
        return bucket, key, query

    def _error(self, status: int, code: str) -> None:
        self._reply(status, f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode())

    def _reply(
        self, status: int, body: bytes, length: int | None = None, headers: dict | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for header, value in (headers or {}).items():
            self.send_header(header, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _ListingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, bucket: str, keys: GeneratedKeys) -> None:
        super().__init__(("127.0.0.1", 0), _ListingHandler)
        self.bucket, self.keys = bucket, keys
        # Requests by kind: shows which probes and how many list pages a client made.
        self.requests: collections.Counter[str] = collections.Counter()


@contextmanager
def listing_server(bucket: str, prefix: str, count: int) -> Iterator[_ListingServer]:
    """Serve ``count`` generated keys under ``s3://<bucket>/<prefix>`` on a free loopback port.

    Yields the server; its endpoint URL is ``endpoint_of(server)``.
    """
    server = _ListingServer(bucket, GeneratedKeys(prefix, count))
    thread = threading.Thread(target=server.serve_forever, name="listing-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def endpoint_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"
