"""s3fs against an S3 endpoint that fails a share of requests: retried, byte-exact, nothing lost.

The faults come from ``FaultInjectingProxy`` between s3fs and moto's server. Reads back go
straight to moto, not through the proxy, so a write the client believed done but the server
never stored would show up as a missing or different object.
"""

from __future__ import annotations

import http.client
import random
import socket
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import s3fs

from pipeline.bench.fault_proxy import MODES, FaultInjectingProxy

# The retry settings the pipeline gives s3fs (jobs.config.storage_options): botocore's
# "standard" mode; max_attempts counts retries, so a request is tried 11 times in all.
RETRIES = {"retries": {"max_attempts": 10, "mode": "standard"}}
MiB = 2**20


def s3_through(endpoint: str, **options: Any) -> s3fs.S3FileSystem:
    """A fresh s3fs client for ``endpoint``: no instance or listing cache shared across tests."""
    return s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True, **options
    )


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def direct(s3_endpoint) -> s3fs.S3FileSystem:
    """s3fs straight to moto: sets up buckets and checks what the server really stored."""
    return s3_through(s3_endpoint)


@pytest.fixture
def bucket(direct) -> Iterator[str]:
    name = f"faults-{uuid.uuid4().hex[:10]}"
    direct.mkdir(name)
    yield name
    direct.rm(name, recursive=True)


def raw_request(
    endpoint: str, method: str, path: str, body: bytes | None = None
) -> tuple[int, bytes]:
    """One request on a fresh connection, without any client-side retry."""
    parts = urlsplit(endpoint)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_without_faults_the_proxy_is_transparent(s3_endpoint, direct, bucket):
    objects = {
        f"{bucket}/empty": b"",
        f"{bucket}/text.txt": b"hello, proxy\n",
        f"{bucket}/nested dir/bin\x7f.dat": payload(1, 100_003),
        f"{bucket}/big.bin": payload(2, 3 * MiB + 17),
    }
    with FaultInjectingProxy(s3_endpoint, fail_share=0.0) as proxy:
        fs = s3_through(proxy.endpoint, config_kwargs=RETRIES)
        for path, data in objects.items():
            fs.pipe_file(path, data)
        for path, data in objects.items():
            assert fs.cat_file(path) == data
            assert fs.info(path)["size"] == len(data)  # HEAD keeps the object's Content-Length
        big = objects[f"{bucket}/big.bin"]
        assert fs.cat_file(f"{bucket}/big.bin", start=MiB, end=MiB + 10) == big[MiB : MiB + 10]
        assert sorted(fs.find(bucket)) == sorted(objects)
        assert proxy.injected == {}
        assert proxy.forwarded >= 3 * len(objects)
    for path, data in objects.items():
        assert direct.cat_file(path) == data


def test_retries_outlast_an_endpoint_that_fails_a_third_of_requests(s3_endpoint, direct, bucket):
    objects = {f"{bucket}/in/{i:02d}.bin": payload(i, 1000 + 997 * i) for i in range(20)}
    with FaultInjectingProxy(s3_endpoint, fail_share=0.3, seed=0) as proxy:
        fs = s3_through(proxy.endpoint, config_kwargs=RETRIES)
        # Concurrent, as the pipeline's reads and writes are: the backoffs overlap.
        fs.pipe(objects)
        assert fs.cat(list(objects)) == objects
        assert sorted(fs.ls(f"{bucket}/in", detail=False)) == sorted(objects)
        injected = dict(proxy.injected)
    assert sum(injected.values()) > 0
    assert {mode for _, mode in injected} == set(MODES), injected
    assert {method for method, _ in injected} >= {"PUT", "GET"}, injected
    # What moto holds, read without the proxy: every write landed, exactly once and whole.
    assert sorted(direct.find(bucket)) == sorted(objects)
    assert direct.cat(list(objects)) == objects


def test_multipart_uploads_survive_faults(s3_endpoint, direct, bucket):
    streamed, piped = payload(3, 6 * MiB + 5), payload(4, 10 * MiB + 7)
    with FaultInjectingProxy(s3_endpoint, fail_share=0.3, seed=1) as proxy:
        fs = s3_through(proxy.endpoint, config_kwargs=RETRIES)
        with fs.open(f"{bucket}/streamed.bin", "wb", block_size=5 * MiB) as file:
            for start in range(0, len(streamed), MiB):
                file.write(streamed[start : start + MiB])
        # pipe_file splits by chunksize (block_size is for open); concurrent part uploads.
        fs.pipe_file(f"{bucket}/piped.bin", piped, chunksize=5 * MiB)
        injected = dict(proxy.injected)
    assert sum(injected.values()) > 0
    assert direct.cat_file(f"{bucket}/streamed.bin") == streamed
    assert direct.cat_file(f"{bucket}/piped.bin") == piped
    # A multipart object's ETag ends in "-<number of parts>".
    assert direct.info(f"{bucket}/streamed.bin")["ETag"].strip('"').endswith("-2")
    assert direct.info(f"{bucket}/piped.bin")["ETag"].strip('"').endswith("-3")


def test_chunked_request_bodies_are_forwarded_whole(s3_endpoint, direct, bucket):
    """A Transfer-Encoding: chunked upload, with a chunk extension and a trailer field."""
    chunks = [b"hello ", b"chunked", b"", b" world" * 5000]
    body = b"".join(f"{len(c):x};ext=1\r\n".encode() + c + b"\r\n" for c in chunks if c)
    body += b"0\r\nx-amz-meta-origin: trailer\r\n\r\n"
    with FaultInjectingProxy(s3_endpoint, fail_share=0.0) as proxy:
        parts = urlsplit(proxy.endpoint)
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as conn:
            conn.sendall(
                f"PUT /{bucket}/chunked.txt HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            status_line = conn.makefile("rb").readline()
        assert status_line.split()[1] == b"200", status_line
    assert direct.cat_file(f"{bucket}/chunked.txt") == b"".join(chunks)
    metadata = direct.metadata(f"{bucket}/chunked.txt")
    assert metadata.get("origin") == "trailer", metadata


def test_when_every_get_fails_none_gets_through(s3_endpoint, direct, bucket):
    direct.pipe_file(f"{bucket}/there", b"present")
    outcomes = []
    with FaultInjectingProxy(s3_endpoint, fail_share=1.0, seed=0, methods=("GET",)) as proxy:
        for _ in range(12):
            try:
                status, body = raw_request(proxy.endpoint, "GET", f"/{bucket}/there")
            except ConnectionError:  # the reset mode; http.client's RemoteDisconnected too
                outcomes.append("reset")
                continue
            assert status in (500, 503), (status, body)
            code = b"<Code>InternalError</Code>" if status == 500 else b"<Code>SlowDown</Code>"
            assert code in body, body
            outcomes.append(str(status))
        # Methods not listed are never failed.
        assert raw_request(proxy.endpoint, "PUT", f"/{bucket}/put", b"x")[0] == 200
        assert proxy.forwarded == 1
        assert sum(proxy.injected.values()) == 12
    assert set(outcomes) == set(MODES)
    assert direct.cat_file(f"{bucket}/put") == b"x"


def test_the_same_seed_fails_the_same_requests(s3_endpoint, bucket):
    def outcomes(seed: int, run: str) -> list[str]:
        seen = []
        with FaultInjectingProxy(s3_endpoint, fail_share=0.5, seed=seed) as proxy:
            for i in range(16):
                # New keys each run: moto refuses an unsigned overwrite with a 403.
                try:
                    status, _ = raw_request(proxy.endpoint, "PUT", f"/{bucket}/{run}{i}", b"x")
                    seen.append(str(status))
                except ConnectionError:
                    seen.append("reset")
            assert proxy.forwarded == seen.count("200"), " ".join(seen)
        return seen

    first = outcomes(0, "first")
    assert outcomes(0, "again") == first
    assert outcomes(1, "other") != first
    assert {"200", "500", "503", "reset"} <= set(first), first
