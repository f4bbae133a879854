import json
import os
import time

import pytest

from pipeline.storage import filesystem_for


def test_runs_going_have_a_start_record_renewed_lately_and_no_newer_finish_record(tmp_path):
    from pipeline.output.runs import runs_going

    fs, root = filesystem_for(str(tmp_path), {})
    assert runs_going(fs, root, 900, time.time()) == []
    now = time.time()
    records = {
        "done.started.json": now - 100,
        "done.json": now - 50,
        "going.started.json": now - 60,
        "crashed.started.json": now - 7200,  # not renewed for two hours
        "again.json": now - 3600,  # an id used before, now going again
        "again.started.json": now - 30,
    }
    for name, stamp in records.items():
        fs.pipe_file(f"{root}/_runs/{name}", b"{}")
        os.utime(f"{root}/_runs/{name}", (stamp, stamp))
    found = runs_going(fs, root, 900, now)
    assert [run_id for run_id, _ in found] == ["again", "going"]
    assert 59 <= found[1][1] < 62


def test_runs_of_a_copied_output_are_told_by_their_records_not_their_file_times(tmp_path):
    """cp -r and aws s3 sync give every record the copy's time, in any order."""
    from pipeline.output.runs import RunHeartbeat, runs_going

    fs, root = filesystem_for(str(tmp_path), {})
    runs = tmp_path / "_runs"

    def start(run, at):
        return json.dumps({"run_id": run, "started_at": at}).encode()

    fs.pipe_file(f"{root}/_runs/a.started.json", start("a", "2026-01-01T00:00:00"))
    fs.pipe_file(f"{root}/_runs/a.json", json.dumps({"started_at": "2026-01-01T00:00:00"}).encode())
    # Ended by a stop: its end record names the same start.
    b_start = start("b", "2026-01-02T00:00:00")
    fs.pipe_file(f"{root}/_runs/b.started.json", b_start)
    with (
        pytest.raises(KeyboardInterrupt),
        RunHeartbeat(
            fs, f"{root}/_runs/b.started.json", b_start, ended_path=f"{root}/_runs/b.ended.json"
        ),
    ):
        raise KeyboardInterrupt
    # An id used again: its finish record is of an earlier start.
    fs.pipe_file(f"{root}/_runs/c.started.json", start("c", "2026-01-03T00:00:00"))
    fs.pipe_file(f"{root}/_runs/c.json", json.dumps({"started_at": "2025-12-01T00:00:00"}).encode())
    now = time.time()
    for name in ("a.json", "b.ended.json", "c.json"):  # the copy wrote finish records first
        os.utime(runs / name, (now - 20, now - 20))
    for name in ("a.started.json", "b.started.json", "c.started.json"):
        os.utime(runs / name, (now - 10, now - 10))
    assert [run_id for run_id, _ in runs_going(fs, root, 900, now)] == ["c"]


def test_a_going_run_renews_its_start_record(tmp_path):
    from pipeline.output.runs import RunHeartbeat

    fs, root = filesystem_for(str(tmp_path), {})
    path = f"{root}/_runs/r.started.json"
    fs.pipe_file(path, b"{}")
    os.utime(path, (1, 1))
    with RunHeartbeat(fs, path, b'{"run_id": "r"}', every_s=0.05):
        deadline = time.time() + 10
        while os.stat(path).st_mtime < 2:
            assert time.time() < deadline, "the start record was not renewed"
            time.sleep(0.02)
    assert (tmp_path / "_runs" / "r.started.json").read_bytes() == b'{"run_id": "r"}'


def test_a_run_that_stopped_renewing_is_not_renewed_after_its_finish_record(tmp_path):
    from pipeline.output.runs import RunHeartbeat, runs_going

    fs, root = filesystem_for(str(tmp_path), {})
    start, finish = f"{root}/_runs/r.started.json", f"{root}/_runs/r.json"
    fs.pipe_file(start, b"{}")
    with RunHeartbeat(fs, start, b"{}", every_s=0.01) as heartbeat:
        time.sleep(0.05)
        heartbeat.stop_renewing()
        fs.pipe_file(finish, b"{}")
        os.utime(finish, (time.time() + 1, time.time() + 1))  # past any coarse mtime tie
        renewed = os.stat(start).st_mtime_ns
        time.sleep(0.1)  # ten beats' time, inside the block
        assert os.stat(start).st_mtime_ns == renewed
    assert runs_going(fs, root, within_s=900, now_s=time.time()) == []


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (ValueError("bad"), "failed"),
        (KeyboardInterrupt(), "stopped"),  # Ctrl-C, and SIGTERM before Ray starts
        (SystemExit(15), "stopped"),  # SIGTERM once ray.init has put in its handler
        (SystemExit(3), "failed"),
    ],
)
def test_a_run_left_by_an_error_or_a_stop_records_its_end_and_is_not_going(
    tmp_path, error, outcome
):
    from pipeline.output.runs import RunHeartbeat, iter_run_records, runs_going

    fs, root = filesystem_for(str(tmp_path), {})
    start, ended = f"{root}/_runs/r.started.json", f"{root}/_runs/r.ended.json"
    fs.pipe_file(start, b"{}")
    with pytest.raises(type(error)), RunHeartbeat(fs, start, b"{}", ended_path=ended):
        raise error
    record = json.loads((tmp_path / "_runs" / "r.ended.json").read_text())
    assert record["outcome"] == outcome and record["error_type"] == type(error).__name__
    assert runs_going(fs, root, 900, time.time() + 1) == []
    assert list(iter_run_records(str(tmp_path))) == []  # not a finished run's record


def test_a_run_that_ends_without_an_error_writes_no_end_record(tmp_path):
    from pipeline.output.runs import RunHeartbeat, runs_going

    fs, root = filesystem_for(str(tmp_path), {})
    start, ended = f"{root}/_runs/r.started.json", f"{root}/_runs/r.ended.json"
    fs.pipe_file(start, b"{}")
    with RunHeartbeat(fs, start, b"{}", ended_path=ended):
        pass
    assert not (tmp_path / "_runs" / "r.ended.json").exists()
    assert [run_id for run_id, _ in runs_going(fs, root, 900, time.time())] == ["r"]


def test_two_runs_under_one_run_id_at_once_the_first_ending_does_not_end_the_second(tmp_path):
    from pipeline.output.runs import runs_going

    fs, root = filesystem_for(str(tmp_path), {})
    now = time.time()

    def record(name: str, started_at: str | None, stamp: float) -> None:
        body = {} if started_at is None else {"started_at": started_at}
        fs.pipe_file(f"{root}/_runs/{name}", json.dumps(body).encode())
        os.utime(f"{root}/_runs/{name}", (stamp, stamp))

    # The second start overwrote the first's start record; the first then finished.
    record("same.started.json", "2026-12-04T10:05:00+00:00", now - 60)
    record("same.json", "2026-12-04T10:00:00+00:00", now - 10)
    assert [run_id for run_id, _ in runs_going(fs, root, 900, now)] == ["same"]
    record("same.json", "2026-12-04T10:05:00+00:00", now - 5)  # the second finished
    assert runs_going(fs, root, 900, now) == []
    # An older release's record names no start: newer than the start, it ends it.
    record("old.started.json", "2026-12-04T10:05:00+00:00", now - 60)
    record("old.json", None, now - 10)
    assert runs_going(fs, root, 900, now) == []
    record("old.json", None, now - 100)
    assert [run_id for run_id, _ in runs_going(fs, root, 900, now)] == ["old"]
