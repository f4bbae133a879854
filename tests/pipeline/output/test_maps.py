import json
import os
import time

import pytest

from dpt_model.loading import ModelLoadError


def test_the_latest_segmentation_classes_are_found_without_reading_every_run_record(
    tmp_path, caplog
):
    from pipeline.output.maps import segmentation_class_names

    runs = tmp_path / "_runs"
    runs.mkdir()
    now = time.time()
    for index in range(100):  # years of scheduled runs, unreadable if read at all
        path = runs / f"old-{index:03d}.json"
        path.write_text("{broken")
        os.utime(path, (now - 1000 + index, now - 1000 + index))
    records = [
        {"config": {"models": {"segmentation": "relative/seg-model"}}},  # nowhere from here
        {"config": {"models": {"segmentation": None}}},  # a depth-only run after it
    ]
    for index, record in enumerate(records):
        path = runs / f"new-{index}.json"
        path.write_text(json.dumps(record))
        os.utime(path, (now - 10 + index, now - 10 + index))
    with caplog.at_level("WARNING", logger="pipeline.output.runs"):
        with pytest.raises(ModelLoadError, match="relative/seg-model"):
            segmentation_class_names(str(tmp_path))  # a record written before classes were
        records[0]["segmentation_classes"] = {"0": "wall", "3": "sky"}
        (runs / "new-0.json").write_text(json.dumps(records[0]))
        assert segmentation_class_names(str(tmp_path)) == {0: "wall", 3: "sky"}
    assert not [record for record in caplog.records if "skipping run record" in record.message]


def test_map_files_are_found_in_an_output_copied_elsewhere(tmp_path):
    """The rows name the maps where they were written; in a copy (``aws s3 sync``
    down, ``cp -r``) the readers find them in the copy, also where the original
    output's own path holds a ``depth/`` folder."""
    import shutil

    from pipeline.output.maps import MapLocator

    original = tmp_path / "depth" / "out"
    for key in ("depth/a/depth/x.1.png", "segmentation/a/x.1.png"):
        (original / key).parent.mkdir(parents=True, exist_ok=True)
        (original / key).write_bytes(b"map")
    copy = tmp_path / "copies" / "out"
    shutil.copytree(original, copy)
    shutil.rmtree(tmp_path / "depth")

    maps = MapLocator(str(copy))
    assert maps(f"{original}/depth/a/depth/x.1.png", "depth") == f"{copy}/depth/a/depth/x.1.png"
    assert maps.earlier_roots == [str(original)]
    moved = maps(f"{original}/segmentation/a/x.1.png", "segmentation")
    assert moved == f"{copy}/segmentation/a/x.1.png"
    assert maps(f"{copy}/depth/a/depth/x.1.png", "depth") == f"{copy}/depth/a/depth/x.1.png"
    assert maps(None, "depth") is None
    # In neither place: left as written, for the reader's error to name it.
    assert maps("/elsewhere/out/depth/gone.png", "depth") == "/elsewhere/out/depth/gone.png"
    assert maps.earlier_roots == [str(original)]
