"""Ray Data stages for batch DPT annotation.

list (``listing``) → read (``read``, ``shards``) → decode (``decode``) → infer
(``infer``) → encode (``encode``) / write (``write``) → Parquet, composed in ``run``.
"""

from pipeline.decode import decode_batch, decode_image
from pipeline.encode import decode_depth_png, decode_segmentation_png
from pipeline.infer import InferenceActor
from pipeline.listing import list_input
from pipeline.predictions import read_predictions
from pipeline.read import read_batch, read_shard
from pipeline.run import RunSummary, run_annotation
from pipeline.write import write_maps_batch

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
