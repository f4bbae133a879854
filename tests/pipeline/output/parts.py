"""Rows and parts of an output, written by hand for the tests of what reads them."""

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import PREDICTION_SCHEMA

T0 = datetime(2026, 11, 25, tzinfo=UTC)


def row(image_id, status, minutes, version="v1", config="c1", run="r"):
    return {
        "image_id": image_id,
        "source_uri": f"s3://b/{image_id}.jpg",
        "status": status,
        "error": None if status == "ok" else "read: SlowDown",
        "run_id": run,
        "source_version": version,
        "config_hash": config,
        "written_at": T0 + timedelta(minutes=minutes),
    }


def write_part(output, name, rows):
    folder = output / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    full = [{field.name: r.get(field.name) for field in PREDICTION_SCHEMA} for r in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=PREDICTION_SCHEMA), folder / name)
