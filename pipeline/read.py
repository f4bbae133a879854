"""Read: fetch each listed object's bytes; a failed read becomes an error row."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.schema import error_reason
from pipeline.storage import filesystem_for


def read_batch(
    batch: dict[str, np.ndarray], storage_options: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Add ``image_bytes``, ``status`` and ``error`` columns.

    One ``fs.cat`` call per batch: on object stores fsspec issues the requests
    concurrently instead of one at a time.
    """
    uris = [str(uri) for uri in batch["source_uri"]]
    count = len(uris)
    image_bytes = np.empty(count, dtype=object)
    status = np.full(count, "ok", dtype=object)
    # "" means no error: Ray turns an all-None column into floats.
    error = np.full(count, "", dtype=object)
    if count:
        fs, _ = filesystem_for(uris[0], storage_options)
        paths = [fs._strip_protocol(uri) for uri in uris]
        contents = fs.cat(paths, on_error="return")
        for index, path in enumerate(paths):
            content = contents.get(path) if isinstance(contents, dict) else contents
            if isinstance(content, bytes):
                image_bytes[index] = content
            else:
                image_bytes[index] = b""
                status[index] = "error"
                problem = content if isinstance(content, BaseException) else "no data returned"
                error[index] = error_reason("read", problem)
    return {**batch, "image_bytes": image_bytes, "status": status, "error": error}
