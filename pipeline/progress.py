"""Progress of a running job, and a watchdog that stops a job that has stalled.

Storage calls have timeouts, so a read or write cannot wait forever; a stuck
actor (a hung GPU, a deadlocked library) still could. The last stage reports
each finished batch to a tiny actor; the driver checks it, and when nothing has
finished for ``stall_timeout_s`` it stops the run with a message that says so.
Committed rows stay committed, so the next run picks up what is left.
"""

from __future__ import annotations

import _thread
import array
import collections
import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.output.done import done_key

logger = logging.getLogger(__name__)


class JobStalledError(RuntimeError):
    """No batch finished for longer than the stall timeout."""


class ProgressBeacon:
    """Counts finished rows; a Ray actor (``ray.remote(ProgressBeacon)``) in a job.

    Read tasks also tell it what they left out of each shard they read, which
    only they can know (:class:`ShardReadTeller`): 24 bytes a shard, for jobs
    of a million shards.
    """

    def __init__(self) -> None:
        self.rows = 0
        self.last_progress = time.monotonic()
        # One entry per finished shard read (a retried read adds another; the
        # last counts): done_key(URI, version), images left out as done, and
        # under input.limit those left out for errors of their bytes.
        self.shard_keys = array.array("Q")
        self.shard_done = array.array("q")
        self.shard_errors_left = array.array("q")
        self.shards_reading: collections.Counter[int] = collections.Counter()

    def add(self, rows: int) -> None:
        self.rows += rows
        self.last_progress = time.monotonic()

    def state(self) -> tuple[int, float]:
        """(rows finished, seconds since the last finished batch)."""
        return self.rows, time.monotonic() - self.last_progress

    def shard_read_started(self, key: int) -> None:
        self.shards_reading[key] += 1

    def shard_read(self, key: int, images_done: int, errors_left: int) -> None:
        self.shards_reading[key] -= 1
        if self.shards_reading[key] <= 0:
            del self.shards_reading[key]
        self.shard_keys.append(key)
        self.shard_done.append(images_done)
        self.shard_errors_left.append(errors_left)

    def reads_in_flight(self) -> int:
        """Shards whose reads began and have not told (also one whose first attempt
        died and whose retry told: a miss the driver waits out, then reports)."""
        return len(self.shards_reading)

    def shard_reads(self) -> ShardReads:
        return ShardReads(
            np.frombuffer(self.shard_keys, dtype=np.uint64).copy(),
            np.frombuffer(self.shard_done, dtype=np.int64).copy(),
            np.frombuffer(self.shard_errors_left, dtype=np.int64).copy(),
            len(self.shards_reading),
        )


@dataclass(frozen=True)
class ShardReads:
    """What the beacon heard of shard reads: per read (a shard's key may repeat,
    the last entry counting) and how many reads began but have not told yet."""

    keys: np.ndarray
    images_done: np.ndarray
    errors_left: np.ndarray
    still_reading: int

    @classmethod
    def none(cls) -> ShardReads:
        empty = np.empty(0, dtype=np.int64)
        return cls(np.empty(0, dtype=np.uint64), empty, empty, 0)

    def last_per_shard(self) -> ShardReads:
        """One entry per shard: its last read's."""
        _, last_first = np.unique(self.keys[::-1], return_index=True)
        keep = len(self.keys) - 1 - last_first
        return ShardReads(
            self.keys[keep], self.images_done[keep], self.errors_left[keep], self.still_reading
        )


class ShardReadTeller:
    """What :func:`~pipeline.read.read_shard` calls to tell the beacon of its reads.

    The end of a read is told and waited for: the task ends only after that, so
    once the dataset has run, every read that ended normally has told. Reads
    that ``input.limit`` cut off are cancelled, maybe after the dataset ends,
    and tell as they stop: :func:`wait_for_shard_reads`.
    """

    def __init__(self, beacon: Any) -> None:
        self.beacon = beacon

    def started(self, shard: tuple[str, str]) -> None:
        self.beacon.shard_read_started.remote(done_key(*shard))

    def finished(self, shard: tuple[str, str], images_done: int, errors_left: int) -> None:
        import ray

        told = self.beacon.shard_read.remote(done_key(*shard), images_done, errors_left)
        ray.get(told, timeout=TELL_TIMEOUT_S)


TELL_TIMEOUT_S = 30.0


def wait_for_shard_reads(beacon: Any, wait_s: float) -> ShardReads:
    """The beacon's :class:`ShardReads`, one entry a shard, once no read is still
    to tell or ``wait_s`` has passed (a read task killed outright never tells).

    Only reads that ``input.limit`` cut off can tell after the dataset has run;
    without a limit, wait 0.
    """
    import ray

    deadline = time.monotonic() + wait_s
    while (
        time.monotonic() < deadline
        and ray.get(beacon.reads_in_flight.remote(), timeout=TELL_TIMEOUT_S) > 0
    ):
        time.sleep(0.1)
    return ray.get(beacon.shard_reads.remote(), timeout=TELL_TIMEOUT_S).last_per_shard()


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
