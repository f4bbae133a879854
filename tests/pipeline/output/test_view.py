import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.output.view import iter_predictions, latest_rows, read_committed, read_predictions
from pipeline.schema import PREDICTION_SCHEMA
from pipeline.storage import filesystem_for
from tests.pipeline.output.parts import T0, row, write_part


def test_the_view_has_one_row_per_image_latest_first_but_errors_never_hide_ok(tmp_path):
    write_part(tmp_path, "a.parquet", [row("x", "ok", 0), row("y", "ok", 0), row("z", "error", 0)])
    write_part(
        tmp_path,
        "b.parquet",
        [
            row("x", "error", 5),  # same source and config: the ok row stays
            row("y", "error", 5, version="v2"),  # the source changed: the new row wins
            row("z", "ok", 5),
        ],
    )
    # A crashed writer's hidden part is not committed.
    (tmp_path / "predictions" / ".c.parquet.tmp").write_bytes(b"PAR1 half")
    view = {r["image_id"]: r for r in read_predictions(str(tmp_path)).to_pylist()}
    assert {key: (r["status"], r["source_version"]) for key, r in view.items()} == {
        "x": ("ok", "v1"),
        "y": ("error", "v2"),
        "z": ("ok", "v1"),
    }


def test_an_output_without_predictions_reads_as_empty(tmp_path):
    assert read_predictions(str(tmp_path / "nothing")).num_rows == 0


def test_parts_written_before_a_column_was_added_still_read(tmp_path):
    # Outputs grow by runs of different versions; a part without the
    # pseudo-label columns reads with those columns null.
    write_part(tmp_path, "new.parquet", [row("x", "ok", 1)])
    older_schema = pa.schema(
        [f for f in PREDICTION_SCHEMA if f.name not in ("label_coverage", "entropy_mean", "kept")]
    )
    old_rows = [{f.name: row("y", "ok", 0).get(f.name) for f in older_schema}]
    pq.write_table(
        pa.Table.from_pylist(old_rows, schema=older_schema),
        tmp_path / "predictions" / "old.parquet",
    )
    view = read_predictions(str(tmp_path)).to_pylist()
    assert sorted(r["image_id"] for r in view) == ["x", "y"]
    assert all(r["kept"] is None and r["label_coverage"] is None for r in view)


def _latest_rows_one_by_one(rows: list[dict]) -> list[int]:
    """The view's rule applied row by row in written order: the reference for latest_rows."""
    chosen: dict[str, int] = {}
    order = sorted(
        range(len(rows)),
        key=lambda i: (rows[i]["written_at"] is None, rows[i]["written_at"] or T0),
    )
    for index in order:
        current, previous = rows[index], chosen.get(rows[index]["image_id"])
        if (
            previous is not None
            and current["status"] != "ok"
            and rows[previous]["status"] == "ok"
            and (current["source_version"], current["config_hash"])
            == (rows[previous]["source_version"], rows[previous]["config_hash"])
        ):
            continue
        chosen[current["image_id"]] = index
    return sorted(chosen.values())


def test_the_vectorised_view_agrees_with_the_rule_row_by_row():
    generator = np.random.default_rng(7)
    for trial in range(200):
        rows = [
            row(
                f"i{generator.integers(4)}",
                "ok" if generator.random() < 0.5 else "error",
                int(generator.integers(6)),  # ties in written_at on purpose
                version=f"v{generator.integers(2)}",
                config=f"c{generator.integers(2)}",
            )
            for _ in range(int(generator.integers(1, 12)))
        ]
        for item in rows:
            if generator.random() < 0.1:
                item["written_at"] = None  # parts from before the column counted as newest
        table = pa.Table.from_pylist(
            [{f.name: r.get(f.name) for f in PREDICTION_SCHEMA} for r in rows],
            schema=PREDICTION_SCHEMA,
        )
        assert latest_rows(table).tolist() == _latest_rows_one_by_one(rows), (trial, rows)


def test_the_view_of_chosen_images_reads_only_their_rows(tmp_path):
    write_part(tmp_path, "a.parquet", [row("x", "ok", 0), row("y", "ok", 0)])
    write_part(tmp_path, "b.parquet", [row("x", "error", 5, version="v2")])
    view = read_predictions(str(tmp_path), image_ids=["x"]).to_pylist()
    assert [(r["image_id"], r["status"]) for r in view] == [("x", "error")]


def test_an_empty_choice_of_images_reads_nothing(tmp_path):
    write_part(tmp_path, "a.parquet", [row("x", "ok", 0)])
    assert read_predictions(str(tmp_path), image_ids=[]).num_rows == 0


def test_chosen_images_can_be_read_without_their_id_column(tmp_path):
    write_part(tmp_path, "a.parquet", [row("x", "ok", 0), row("y", "error", 0)])
    fs, root = filesystem_for(str(tmp_path), {})
    table = read_committed(fs, root, ["status"], image_ids=["y"])
    assert table.column_names == ["status"] and table["status"].to_pylist() == ["error"]


@pytest.mark.parametrize("parts_per_scan", [1, 256])
def test_the_streamed_view_is_the_view(tmp_path, monkeypatch, parts_per_scan):
    import pipeline.output.view

    monkeypatch.setattr(pipeline.output.view, "_PARTS_PER_SCAN", parts_per_scan)
    write_part(tmp_path, "a.parquet", [row("x", "ok", 0), row("y", "ok", 0), row("z", "error", 0)])
    write_part(tmp_path, "b.parquet", [row("w", "ok", 1)])
    write_part(
        tmp_path,
        "c.parquet",
        [row("x", "error", 5), row("y", "error", 5, version="v2"), row("z", "ok", 5)],
    )
    columns = ["image_id", "status", "source_version", "written_at"]
    expected = read_predictions(str(tmp_path), columns=columns).to_pylist()
    streamed = [r for batch in iter_predictions(str(tmp_path), columns) for r in batch.to_pylist()]
    assert streamed == expected and len(expected) == 4
    assert list(iter_predictions(str(tmp_path / "none"), columns)) == []


def test_the_streamed_view_stops_if_a_part_changes_between_its_passes(tmp_path, monkeypatch):
    import pipeline.output.view

    write_part(tmp_path, "a.parquet", [row("x", "ok", 0), row("x", "error", 5, version="v2")])
    scans = []
    real_scan = pipeline.output.view._scan_parts

    def scan_growing(fs, parts, columns, rows=None):
        scans.append(columns)
        yield from real_scan(fs, parts, columns, rows)
        if len(scans) == 2:  # the second pass finds a row more, as if a part was rewritten
            yield from real_scan(fs, parts, columns, rows)

    monkeypatch.setattr(pipeline.output.view, "_scan_parts", scan_growing)
    with pytest.raises(RuntimeError, match="changed while being read"):
        list(iter_predictions(str(tmp_path), ["image_id"]))


def test_read_predictions_reads_again_when_a_compaction_deleted_a_part_it_listed(
    tmp_path, monkeypatch
):
    from pipeline.output import view
    from pipeline.output.compaction import compact_predictions
    from tests.pipeline.output.parts import row, write_part

    for index in range(3):
        write_part(tmp_path, f"r{index}_a.parquet", [row(f"x{index}", "ok", index)])
    scans = []
    real_scan = view._scan_parts

    def scan_then_compact(fs, parts, *args, **kwargs):
        scans.append(len(parts))
        if len(scans) == 1:
            monkeypatch.setattr(view, "_scan_parts", real_scan)  # for the compaction's own
            compact_predictions(str(tmp_path))  # between the listing and the reads
            monkeypatch.setattr(view, "_scan_parts", scan_then_compact)
        return real_scan(fs, parts, *args, **kwargs)

    monkeypatch.setattr(view, "_scan_parts", scan_then_compact)
    shown = view.read_predictions(str(tmp_path)).to_pylist()
    assert scans == [3, 1]
    assert sorted(r["image_id"] for r in shown) == ["x0", "x1", "x2"]
