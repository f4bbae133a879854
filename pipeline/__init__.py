"""Ray Data stages for batch DPT annotation.

list (``listing``) → read (``read``, ``shards``) → decode (``decode``) → infer
(``infer``) → encode (``encode``) / write (``write``) → Parquet, composed in ``run``.

Names resolve on first use: every Ray worker that runs a CPU stage imports its
module through this package, and importing all of them would load torch (about
a second and 130 MB) into processes that never run a model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "InferenceActor": "pipeline.infer",
    "RunSummary": "pipeline.run",
    "decode_batch": "pipeline.decode",
    "decode_depth_png": "pipeline.encode",
    "decode_image": "pipeline.decode",
    "decode_segmentation_png": "pipeline.encode",
    "list_input": "pipeline.listing",
    "read_batch": "pipeline.read",
    "read_predictions": "pipeline.output.view",
    "read_shard": "pipeline.read",
    "run_annotation": "pipeline.run",
    "write_maps_batch": "pipeline.write",
}
__all__ = [
    "InferenceActor",
    "RunSummary",
    "decode_batch",
    "decode_depth_png",
    "decode_image",
    "decode_segmentation_png",
    "list_input",
    "read_batch",
    "read_predictions",
    "read_shard",
    "run_annotation",
    "write_maps_batch",
]

if TYPE_CHECKING:
    from pipeline.decode import decode_batch, decode_image
    from pipeline.encode import decode_depth_png, decode_segmentation_png
    from pipeline.infer import InferenceActor
    from pipeline.listing import list_input
    from pipeline.output.view import read_predictions
    from pipeline.read import read_batch, read_shard
    from pipeline.run import RunSummary, run_annotation
    from pipeline.write import write_maps_batch


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
