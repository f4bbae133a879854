"""Run records under ``<output>/_runs``: a run's start (renewed while it goes), its
finish or its end, and which runs are going."""

from __future__ import annotations

import itertools
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import fsspec

from pipeline.storage import filesystem_for, forget_listing, join, modified_time

logger = logging.getLogger(__name__)

RUNS_FOLDER = "_runs"
# Written when a run starts, and renewed while it goes (RunHeartbeat).
STARTED_RECORD_SUFFIX = ".started.json"

# A going run rewrites its start record this often; one not rewritten for three
# times as long has stopped (crashed, killed) even without a finish record.
RUN_HEARTBEAT_S = 300
RUN_GOING_WITHIN_S = 3 * RUN_HEARTBEAT_S

# Beside a run's start record when the run ended on an error or was stopped
# (Ctrl-C, SIGTERM from `ray job stop` or Kubernetes): it is not going, so a
# later run does not warn of it and jobs.compact does not wait for it.
ENDED_RECORD_SUFFIX = ".ended.json"

# Written when a run finishes: the run record, with its summary and config.
FINISHED_RECORD_SUFFIX = ".json"


def start_record_path(root: str, run_id: str) -> str:
    return join(root, f"{RUNS_FOLDER}/{run_id}{STARTED_RECORD_SUFFIX}")


def finish_record_path(root: str, run_id: str) -> str:
    return join(root, f"{RUNS_FOLDER}/{run_id}{FINISHED_RECORD_SUFFIX}")


def ended_record_path(root: str, run_id: str) -> str:
    return join(root, f"{RUNS_FOLDER}/{run_id}{ENDED_RECORD_SUFFIX}")


def run_records(
    output_uri: str, storage_options: dict[str, Any] | None = None, newest: int | None = None
) -> list[dict[str, Any]]:
    """The records of finished runs (``_runs/<run_id>.json``), newest first.

    ``newest`` reads only that many, picked by the files' modification times, so
    an output of years of scheduled runs is not read whole.
    """
    records = list(itertools.islice(iter_run_records(output_uri, storage_options), newest))
    # Run ids are the user's to choose, so finish times, not names, give the order.
    return sorted(records, key=lambda record: str(record.get("finished_at") or ""), reverse=True)


def iter_run_records(
    output_uri: str, storage_options: dict[str, Any] | None = None, batch: int = 20
) -> Iterator[dict[str, Any]]:
    """The records of finished runs, newest file first, read ``batch`` at a time as
    the caller goes on: a caller that stops early reads few of years of records."""
    fs, root = filesystem_for(output_uri, storage_options or {})
    folder = forget_listing(fs, join(root, RUNS_FOLDER))
    if not fs.exists(folder):
        return
    files = [
        info
        for info in fs.ls(folder, detail=True)
        if info["name"].endswith(".json")
        and not info["name"].endswith((STARTED_RECORD_SUFFIX, ENDED_RECORD_SUFFIX))
    ]
    files.sort(key=modified_time, reverse=True)
    paths = [info["name"] for info in files]
    for first in range(0, len(paths), batch):
        chunk = paths[first : first + batch]
        # cat_ranges, not cat: cat would expand glob characters in paths and run ids.
        contents = fs.cat_ranges(chunk, None, None, on_error="return")
        for path, content in zip(chunk, contents, strict=True):
            try:
                if isinstance(content, Exception):
                    raise content
                record = json.loads(content)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                yield record
            except (OSError, ValueError) as problem:  # an unreadable record hides only itself
                logger.warning("skipping run record %s: %s", path, problem)


def is_stop(error: BaseException) -> bool:
    """Whether ``error`` is a run being stopped rather than failing: Ctrl-C, or
    SIGTERM, which ray.init's handler raises as ``SystemExit(SIGTERM)``."""
    return isinstance(error, KeyboardInterrupt) or (
        isinstance(error, SystemExit) and error.code == signal.SIGTERM
    )


class RunHeartbeat:
    """Within ``with``: rewrites a run's start record every ``every_s`` seconds.

    Left by an exception (an interrupt included), it writes the run's end record,
    ``ended_path``, naming the outcome and the exception's type. A run calls
    :meth:`stop_renewing` before it writes its finish record: a renewal after
    that would make the finished run look going again for 15 minutes.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        path: str,
        data: bytes,
        every_s: float = RUN_HEARTBEAT_S,
        ended_path: str | None = None,
    ) -> None:
        self._fs, self._path, self._data, self._every_s = fs, path, data, every_s
        self._ended_path = ended_path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-heartbeat", daemon=True)

    def __enter__(self) -> RunHeartbeat:
        self._thread.start()
        return self

    def stop_renewing(self) -> None:
        """Renew no more; returns once a renewal under way is written."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: object
    ) -> None:
        self.stop_renewing()
        if kind is None or self._ended_path is None:
            return
        stopped = error is not None and is_stop(error)
        record = {
            # The start record's own time: what ties this record to that run where
            # file times cannot (a copied output's are all the copy's).
            "started_at": _started_at(self._data),
            "ended_at": datetime.now(UTC).isoformat(),
            "outcome": "stopped" if stopped else "failed",
            # The type only: messages can quote URIs.
            "error_type": kind.__name__,
        }
        try:
            self._fs.pipe_file(self._ended_path, json.dumps(record).encode())
        except Exception as problem:  # the run's own error is the one to report
            logger.warning("could not write the run's end record: %s", problem)

    def _beat(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                self._fs.pipe_file(self._path, self._data)
            except OSError as error:  # the run goes on; others may take it for stopped
                logger.warning("could not renew the run's start record: %s", error)


def renewed_ago(age_s: float) -> str:
    """How long ago a going run's start record was renewed, and what that can mean:
    for messages about runs going, since a run killed with SIGKILL counts as
    going until its record is too old."""
    minutes, seconds = divmod(int(age_s), 60)
    return (
        f"renewed {minutes} min {seconds} s ago; a run renews it every "
        f"{RUN_HEARTBEAT_S // 60} min, and one that was killed counts as going for "
        f"{RUN_GOING_WITHIN_S // 60} min after"
    )


def runs_going(
    fs: fsspec.AbstractFileSystem, root: str, within_s: float, now_s: float
) -> list[tuple[str, float]]:
    """(run id, seconds since its start record was last written) of the runs going:
    a start record written within ``within_s`` and newer than any finish or end
    record of that id (a run id may be used again)."""
    try:
        listed = fs.ls(forget_listing(fs, join(root, RUNS_FOLDER)), detail=True)
    except FileNotFoundError:
        return []
    names = {info["name"].rsplit("/", 1)[-1]: info for info in listed}
    going = []
    for name, info in names.items():
        run_id = name.removesuffix(STARTED_RECORD_SUFFIX)
        if run_id == name:
            continue
        renewed_s = modified_time(info)
        if now_s - renewed_s >= within_s:
            continue
        ends = [
            names[end]
            for end in (run_id + FINISHED_RECORD_SUFFIX, run_id + ENDED_RECORD_SUFFIX)
            if end in names
        ]
        if not any(_closes(fs, info, end) for end in ends):
            going.append((run_id, now_s - renewed_s))
    return sorted(going, key=lambda run: run[1])


def unfinished_runs(
    output_uri: str, storage_options: dict[str, Any] | None = None, newest: int = 20
) -> list[dict[str, Any]]:
    """Of the ``newest`` runs started (by their start records' times), those without a
    finish record: ``{"run_id", "outcome", "error_type", "at"}``, newest first.

    ``outcome`` is the end record's (``stopped``, ``failed``), else ``going``
    (renewed lately) or ``did not finish`` (killed, or its machine lost); ``at``
    is when it ended, or its start record's last renewal (ISO 8601, UTC).
    """
    fs, root = filesystem_for(output_uri, storage_options or {})
    try:
        listed = fs.ls(forget_listing(fs, join(root, RUNS_FOLDER)), detail=True)
    except FileNotFoundError:
        return []
    names = {info["name"].rsplit("/", 1)[-1]: info for info in listed}
    starts = sorted(
        (info for name, info in names.items() if name.endswith(STARTED_RECORD_SUFFIX)),
        key=modified_time,
        reverse=True,
    )[:newest]
    runs = []
    for start in starts:
        run_id = start["name"].rsplit("/", 1)[-1].removesuffix(STARTED_RECORD_SUFFIX)
        finish = names.get(run_id + FINISHED_RECORD_SUFFIX)
        if finish is not None and _closes(fs, start, finish):
            continue
        renewed_at = datetime.fromtimestamp(modified_time(start), UTC).isoformat()
        run = {"run_id": run_id, "outcome": "did not finish", "error_type": None, "at": renewed_at}
        end = names.get(run_id + ENDED_RECORD_SUFFIX)
        if end is not None and _closes(fs, start, end):
            record = _record(fs, end["name"])
            run["outcome"] = str(record.get("outcome") or "ended")
            run["error_type"] = record.get("error_type")
            run["at"] = str(record.get("ended_at") or renewed_at)
        elif time.time() - modified_time(start) < RUN_GOING_WITHIN_S:
            run["outcome"] = "going"
        runs.append(run)
    return runs


def _closes(fs: fsspec.AbstractFileSystem, start: dict[str, Any], end: dict[str, Any]) -> bool:
    """Whether the finish or end record ``end`` (a listing entry) ends the run of the
    start record ``start``. It ends the start it names (started_at): not another
    use of the run id, earlier or at the same time, whatever the file times (a
    copy's, cp -r or a sync). One without started_at (an older release's) ends
    the start if it is newer."""
    same = _ends_that_start(fs, start["name"], end["name"])
    return bool(same) or (same is None and modified_time(end) >= modified_time(start))


def _record(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    try:
        record = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _ends_that_start(fs: fsspec.AbstractFileSystem, start_path: str, end_path: str) -> bool | None:
    """Whether the finish or end record at ``end_path`` is of the run that wrote the
    start record at ``start_path`` (a run id used again starts at another time);
    None where the end record does not say (an older release's, or unreadable)."""
    try:
        started = _started_at(fs.cat_file(end_path))
        return None if started is None else started == _started_at(fs.cat_file(start_path))
    except OSError:
        return None


def _started_at(record: bytes) -> str | None:
    try:
        value = json.loads(record)
    except ValueError:
        return None
    return value.get("started_at") if isinstance(value, dict) else None
