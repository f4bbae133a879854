import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import arrow_filesystem


def test_local_parquet_parts_are_invisible_until_closed(tmp_path):
    folder = tmp_path / "predictions"
    filesystem = arrow_filesystem(fsspec.filesystem("file"))
    pq.write_table(pa.table({"n": [1]}), str(folder / "done.parquet"), filesystem=filesystem)

    stream = filesystem.open_output_stream(str(folder / "half.parquet"))
    writer = pq.ParquetWriter(stream, pa.schema([("n", pa.int64())]))
    writer.write_table(pa.table({"n": [2, 3]}))
    # Mid-write, as a crash would leave it: a hidden temporary file, which
    # Parquet readers skip, and no part under its final name.
    [hidden, done] = sorted(os.listdir(folder))
    assert done == "done.parquet" and hidden.startswith(".half.parquet.")
    assert pq.read_table(str(folder))["n"].to_pylist() == [1]

    writer.close()
    stream.close()
    assert sorted(os.listdir(folder)) == ["done.parquet", "half.parquet"]
    assert sorted(pq.read_table(str(folder))["n"].to_pylist()) == [1, 2, 3]
