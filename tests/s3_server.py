"""A real S3 HTTP endpoint on loopback: moto's server mode on a free port."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

# moto accepts any credentials; s3fs and Ray workers find these in the
# environment through the standard AWS chain, as they would real ones.
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """Start moto on 127.0.0.1 and yield its endpoint URL."""
    from pipeline.bench.storage import moto_server

    for key, value in TEST_CREDENTIALS.items():
        os.environ.setdefault(key, value)
    with moto_server() as endpoint:
        yield endpoint
