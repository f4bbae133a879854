"""Progress of a running job, and a watchdog that stops a job that has stalled.

Storage calls have timeouts, so a read or write cannot wait forever; a stuck
actor (a hung GPU, a deadlocked library) still could. The last stage reports
each finished batch to a tiny actor; the driver checks it, and when nothing has
finished for ``stall_timeout_s`` it stops the run with a message that says so.
Committed rows stay committed, so the next run picks up what is left.
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import pyarrow as pa

logger = logging.getLogger(__name__)


class JobStalledError(RuntimeError):
    """No batch finished for longer than the stall timeout."""


class ProgressBeacon:
    """Counts finished rows; a Ray actor (``ray.remote(ProgressBeacon)``) in a job.

    Read tasks also tell it what they left out of each shard they read, which
    only they can know (:meth:`shard_read`).
    """

    def __init__(self) -> None:
        self.rows = 0
        self.last_progress = time.monotonic()
        self.shards: dict[tuple[str, str], tuple[int, int]] = {}

    def add(self, rows: int) -> None:
        self.rows += rows
        self.last_progress = time.monotonic()

    def state(self) -> tuple[int, float]:
        """(rows finished, seconds since the last finished batch)."""
        return self.rows, time.monotonic() - self.last_progress

    def shard_read(self, shard: tuple[str, str], images_done: int, errors_left: int) -> None:
        """Of shard (URI, version): images left out as done, and under ``input.limit``
        those left for a run without one. Keyed by shard, so a retried read task
        counts once."""
        self.shards[shard] = (images_done, errors_left)

    def shards_read(self) -> dict[tuple[str, str], tuple[int, int]]:
        return self.shards


def shard_read_teller(beacon: Any) -> Callable[[tuple[str, str], int, int], None]:
    """For :func:`~pipeline.read.read_shard`: tells ``beacon`` of a shard read and
    waits for it to have heard. The read task ends only after that, and the
    dataset only after its tasks, so every count is in when the driver asks."""
    return functools.partial(_tell_shard_read, beacon)


def _tell_shard_read(
    beacon: Any, shard: tuple[str, str], images_done: int, errors_left: int
) -> None:
    import ray

    ray.get(beacon.shard_read.remote(shard, images_done, errors_left))


def report_progress(batch: pa.Table, beacon: Any) -> pa.Table:
    """Tell the beacon that ``batch``'s rows are done (fire and forget); returns ``batch``."""
    beacon.add.remote(batch.num_rows)
    return batch


class StallWatchdog:
    """Within ``with``: interrupts the main thread when the beacon goes quiet.

    ``_thread.interrupt_main`` raises KeyboardInterrupt in the driver's main
    thread, which Ray Data handles by shutting the execution down;
    :meth:`__exit__` turns it into :class:`JobStalledError`.
    """

    def __init__(self, beacon: Any, stall_timeout_s: float | None) -> None:
        self.beacon = beacon
        self.stall_timeout_s = stall_timeout_s
        self.stalled_after_rows: int | None = None
        self._stop = threading.Event()
        self._stop_lock = threading.Lock()  # no interrupt once __exit__ has begun
        self._previous_handler: Any = None
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)

    def __enter__(self) -> StallWatchdog:
        if self.stall_timeout_s is None:
            return self
        if threading.current_thread() is not threading.main_thread():
            # interrupt_main would stop the main thread, not the job's.
            logger.warning("stall_timeout_s is not watched: the job runs outside the main thread")
            return self
        # interrupt_main does nothing unless SIGINT has Python's own handler, and a
        # library may have replaced it (some ignore it or merely log): within the
        # watch, a stall must raise KeyboardInterrupt.
        self._previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with self._stop_lock:
            self._stop.set()
        if kind is None and self.stalled_after_rows is not None:
            # The run ended as the watchdog fired: take its interrupt here, not
            # in whatever the caller does next.
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(0.05)
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None
        if kind is KeyboardInterrupt and self.stalled_after_rows is not None:
            raise JobStalledError(
                f"no batch finished for {self.stall_timeout_s:g} s (stall_timeout_s) after "
                f"{self.stalled_after_rows} rows; the run was stopped. Rows already written "
                "are kept: run the job again to annotate the rest"
            ) from None

    def _watch(self) -> None:
        import ray

        interval = min(30.0, max(0.5, self.stall_timeout_s / 10))
        unanswered_since: float | None = None
        while not self._stop.wait(interval):
            try:
                rows, idle_s = ray.get(self.beacon.state.remote(), timeout=interval)
            except Exception as error:  # the beacon is busy or gone; judge on the next tick
                now = time.monotonic()
                unanswered_since = unanswered_since or now
                if now - unanswered_since > self.stall_timeout_s:
                    logger.warning(
                        "the stall watchdog has had no answer for %.0f s (%s); "
                        "stalls are not detected",
                        now - unanswered_since,
                        type(error).__name__,
                    )
                    unanswered_since = now  # once per stall_timeout_s, not per tick
                continue
            unanswered_since = None
            if idle_s > self.stall_timeout_s:
                with self._stop_lock:
                    # The run may have ended while the beacon was asked.
                    if self._stop.is_set():
                        return
                    logger.error("no progress for %.0f s after %d rows; stopping", idle_s, rows)
                    self.stalled_after_rows = rows
                    _thread.interrupt_main()
                return
