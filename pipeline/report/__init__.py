"""The quality report: ``<output>/report/index.html``, for a person to look at a run.

``stats`` summarises the predictions, ``thumbnails`` draws the sampled images,
``page`` renders HTML, ``build`` reads and writes. The job calls
``write_quality_report`` after every run; ``python -m jobs.report`` rebuilds it.
"""

from pipeline.read import ShardInput  # how write_quality_report finds images in shards
from pipeline.report.build import REPORT_FOLDER, class_names_or_ids, write_quality_report

__all__ = ["REPORT_FOLDER", "ShardInput", "class_names_or_ids", "write_quality_report"]
