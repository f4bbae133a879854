"""List: image objects under an input URI, as rows with stable ids."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pipeline.keys import image_id_for
from pipeline.storage import filesystem_for, full_uri


class InputNotFoundError(FileNotFoundError):
    """The input URI cannot be listed or holds no images."""


def has_image_extension(path: str, extensions: Iterable[str]) -> bool:
    suffix = path.rsplit("/", 1)[-1].rsplit(".", 1)
    return len(suffix) == 2 and suffix[1].lower() in {ext.lower() for ext in extensions}


def list_images(
    input_uri: str,
    extensions: Iterable[str],
    storage_options: dict[str, Any],
    limit: int | None = None,
) -> Iterator[dict[str, str]]:
    """Yield ``{image_id, source_uri, source_key}`` for each image, in key order.

    ``source_key`` is the object's key relative to ``input_uri``; output keys are
    derived from it. Only names travel: the driver never holds image bytes.
    """
    fs, root = filesystem_for(input_uri, storage_options)
    root = root.rstrip("/")
    try:
        if not fs.isdir(root):
            raise InputNotFoundError(f"input.uri {input_uri} is not a folder or prefix")
        paths = fs.find(root, withdirs=False)
    except (OSError, PermissionError) as error:
        raise InputNotFoundError(f"cannot list input.uri {input_uri}: {error}") from None
    extensions = tuple(extensions)
    count = 0
    for path in sorted(paths):
        if not has_image_extension(path, extensions):
            continue
        source_uri = full_uri(fs, path)
        yield {
            "image_id": image_id_for(source_uri),
            "source_uri": source_uri,
            "source_key": path[len(root) + 1 :],
        }
        count += 1
        if limit is not None and count >= limit:
            return
