"""An inference actor killed mid-run is restarted and its batch retried."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from jobs.config import load_config
from jobs.sample_images import encoded, synthetic_photo
from pipeline import read_predictions
from tests.corpus import write_files

IMAGES = 80


def inference_actor_pids() -> list[int]:
    """Ray titles each actor's process after its class; find ours in /proc.

    Only descendants of this process count: the test's Ray instance (started by
    ``ray.init`` here) is, and another job on the same machine is not.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue  # the process ended meanwhile
        if "InferenceActor" in command and _descends_from(int(entry.name), os.getpid()):
            found.append(int(entry.name))
    return found


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            # The parent is the field after the parenthesised command name.
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == ancestor:
            return True
    return False


def test_a_killed_inference_actor_is_replaced_and_no_image_is_lost(
    ray_cluster, checkpoints, tmp_path
):
    corpus, output = tmp_path / "images", tmp_path / "output"
    write_files(
        corpus,
        {f"{i:03d}.jpg": encoded(synthetic_photo(480, 360, seed=i), "JPEG") for i in range(IMAGES)},
    )
    config = load_config(
        None,
        [
            f"input.uri={corpus}",
            f"output.uri={output}",
            f"models.depth={checkpoints['depth-vit']}",
            "inference.batch_size=1",
            "output.rows_per_part=4",
        ],
    )
    from pipeline.run import run_annotation

    result = {}
    job = threading.Thread(target=lambda: result.update(summary=run_annotation(config)))
    job.start()
    killed = []
    deadline = time.monotonic() + 240
    # Kill the actor once it has done some work: after its first results are written.
    while job.is_alive() and not killed and time.monotonic() < deadline:
        written = any((output / "depth").glob("*.png")) if (output / "depth").is_dir() else False
        pids = inference_actor_pids()
        if written and pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        time.sleep(0.1)
    job.join(timeout=300)
    assert not job.is_alive(), "the job did not finish within 300 s"
    assert killed, "the job finished before an actor could be killed; give it more images"
    assert "summary" in result, "the job did not finish after its actor was killed"
    summary = result["summary"]
    assert (summary.images_ok, summary.images_error) == (IMAGES, 0)
    view = read_predictions(str(output))
    assert view.num_rows == IMAGES == len(set(view["image_id"].to_pylist()))
    # A retried batch whose first attempt never reached the writer adds no row.
    assert pq.read_table(output / "predictions").num_rows == IMAGES
