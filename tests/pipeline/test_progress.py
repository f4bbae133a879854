"""The stall watchdog and its beacon.

The watchdog's judgement (when to stop, what it says, a beacon that does not
answer, SIGINT replaced) is tested without Ray: a scripted beacon answers
``state.remote()`` with a value, and ``ray.get`` hands it back. Counting the
beacon's checks, not seconds, is what makes those tests hold on a loaded
machine. Two tests keep the real thing: a Ray Data job stopped mid-task, and an
actor's progress keeping the watchdog quiet, with wide margins.
"""

import signal
import time
from types import SimpleNamespace

import pyarrow as pa
import pytest

from pipeline import progress
from pipeline.progress import JobStalledError, ProgressBeacon, StallWatchdog, report_progress

HANG_S = 12
# Ray-free watchdog tests: a timeout of 1 s means a check every 0.5 s.
TIMEOUT_S = 1.0
PATIENCE_S = 30  # how long a test waits for checks that take ~0.5 s each when idle


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_beacon_counts_rows_and_measures_idle_time_from_the_last_batch(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=clock.monotonic))
    beacon = ProgressBeacon()
    clock.now += 4.0
    assert beacon.state() == (0, 4.0)  # idle since it started
    beacon.add(3)
    clock.now += 1.5
    beacon.add(2)
    clock.now += 0.25
    assert beacon.state() == (5, 0.25)  # the clock restarts at each batch


def test_report_progress_tells_the_beacon_the_rows_and_returns_the_batch():
    told = []
    beacon = SimpleNamespace(add=SimpleNamespace(remote=told.append))
    batch = pa.table({"image_id": ["a", "b", "c"]})
    assert report_progress(batch, beacon) is batch
    assert told == [3]


class ScriptedBeacon:
    """Answers the watchdog's ``state.remote()`` with scripted (rows, idle_s)
    values, the last repeated; an exception in the script is raised instead."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.checks = 0
        self.state = SimpleNamespace(remote=self._state)

    def _state(self):
        answer = self.answers[min(self.checks, len(self.answers) - 1)]
        self.checks += 1
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def local_ray_get(monkeypatch):
    """``ray.get`` that hands back a ScriptedBeacon's answer: no Ray needed."""
    import ray

    monkeypatch.setattr(ray, "get", lambda value, timeout=None: value)


def wait_for_checks(beacon: ScriptedBeacon, checks: int) -> None:
    """Sleep in short steps (where an interrupt lands) until the watchdog asked enough."""
    deadline = time.monotonic() + PATIENCE_S
    while beacon.checks < checks:
        assert time.monotonic() < deadline, f"only {beacon.checks} checks in {PATIENCE_S} s"
        time.sleep(0.05)


def finished(watchdog: StallWatchdog) -> bool:
    """The watch thread has ended (before the test's ray.get patch is undone)."""
    watchdog._thread.join(timeout=PATIENCE_S)
    return not watchdog._thread.is_alive()


def test_the_watchdog_stays_quiet_while_batches_finish_within_the_timeout(local_ray_get):
    # Idle up to the timeout itself is not a stall: only longer is.
    beacon = ScriptedBeacon((1, 0.1), (2, 0.9), (3, TIMEOUT_S))
    watchdog = StallWatchdog(beacon, stall_timeout_s=TIMEOUT_S)
    with watchdog:
        wait_for_checks(beacon, 3)  # every scripted answer heard
    assert watchdog.stalled_after_rows is None
    assert finished(watchdog)


def test_the_watchdog_stops_the_run_once_the_beacon_is_idle_past_the_timeout(local_ray_get):
    beacon = ScriptedBeacon((5, 0.2), (7, TIMEOUT_S + 0.01), (9, 0.0))
    watchdog = StallWatchdog(beacon, stall_timeout_s=TIMEOUT_S)
    stalled = pytest.raises(JobStalledError, match=r"^no batch finished for 1 s .* after 7 rows")
    with stalled, watchdog:
        wait_for_checks(beacon, 3)  # never reached: the second check stops the run
    assert beacon.checks == 2 and watchdog.stalled_after_rows == 7
    assert finished(watchdog)


def test_a_beacon_that_does_not_answer_is_asked_again_on_the_next_tick(local_ray_get):
    # A busy or restarting beacon is no evidence of a stall either way.
    beacon = ScriptedBeacon(TimeoutError("busy"), RuntimeError("actor died"), (4, 60.0))
    stalled = pytest.raises(JobStalledError, match=r"after 4 rows")
    with stalled, StallWatchdog(beacon, stall_timeout_s=TIMEOUT_S):
        wait_for_checks(beacon, 4)
    assert beacon.checks == 3


def test_a_beacon_silent_for_the_whole_timeout_is_reported_not_taken_for_a_stall(
    local_ray_get, caplog
):
    beacon = ScriptedBeacon(ConnectionError("its node is gone"))
    watchdog = StallWatchdog(beacon, stall_timeout_s=TIMEOUT_S)
    with caplog.at_level("WARNING", logger="pipeline.progress"), watchdog:
        wait_for_checks(beacon, 5)  # past the timeout: 0.5 s per check
    assert watchdog.stalled_after_rows is None
    warnings = [r.getMessage() for r in caplog.records if "no answer" in r.getMessage()]
    assert warnings and "stalls are not detected" in warnings[0]
    assert "ConnectionError" in warnings[0]
    assert finished(watchdog)


def test_off_the_main_thread_the_watchdog_says_it_does_not_watch(local_ray_get, caplog):
    """interrupt_main would interrupt the main thread, not the thread running the job."""
    import threading

    beacon = ScriptedBeacon((0, 1e9))
    watchdogs = []

    def run_job() -> None:
        with StallWatchdog(beacon, stall_timeout_s=TIMEOUT_S) as watchdog:
            watchdogs.append(watchdog)
            time.sleep(2 * TIMEOUT_S)  # stalled all along: the main thread must not be hit

    with caplog.at_level("WARNING", logger="pipeline.progress"):
        job = threading.Thread(target=run_job)
        job.start()
        job.join()
    assert beacon.checks == 0 and not watchdogs[0]._thread.is_alive()
    assert any("not watched" in record.getMessage() for record in caplog.records)


def test_without_a_timeout_nothing_is_watched(local_ray_get):
    beacon = ScriptedBeacon((0, 1e9))
    handler = signal.getsignal(signal.SIGINT)
    watchdog = StallWatchdog(beacon, stall_timeout_s=None)
    with watchdog:
        assert signal.getsignal(signal.SIGINT) is handler
        time.sleep(0.6)  # longer than the shortest check interval
    assert beacon.checks == 0 and not watchdog._thread.is_alive()


def test_the_watchdog_interrupts_even_when_sigint_was_replaced(local_ray_get):
    """A library that ignores SIGINT must not leave a stalled job running forever."""
    beacon = ScriptedBeacon((0, 60.0))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(JobStalledError), StallWatchdog(beacon, stall_timeout_s=TIMEOUT_S):
            wait_for_checks(beacon, 2)  # the first check stops the run
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # restored
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_stalled_ray_data_job_is_stopped_with_a_clear_reason(ray_cluster):
    ray = ray_cluster
    beacon = ray.remote(num_cpus=0)(ProgressBeacon).remote()
    # Its idle clock starts when its process does: on a busy machine that can be
    # seconds later, so start the clock before the stuck task, not during it.
    ray.get(beacon.state.remote())

    def hang(batch):
        time.sleep(HANG_S)  # bounded, so the shared test cluster gets its CPU back
        return batch

    dataset = ray.data.range(4, override_num_blocks=1).map_batches(hang)
    started = time.monotonic()
    stalled = pytest.raises(JobStalledError, match=r"no batch finished for 2 s .* after 0 rows")
    with stalled, StallWatchdog(beacon, stall_timeout_s=2):
        dataset.materialize()
    assert time.monotonic() - started < HANG_S - 2  # stopped long before the task ended
    # Ray Data does not cancel the stuck task; in a job the driver exits next,
    # which ends it. Here, wait for it so later tests get the CPU back.
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, "the stalled task still holds its CPU"
        time.sleep(0.5)


def test_progress_through_the_actor_keeps_the_watchdog_quiet(ray_cluster):
    ray = ray_cluster
    beacon = ray.remote(num_cpus=0)(ProgressBeacon).remote()
    ray.get(beacon.state.remote())  # the actor is up: its idle clock has started
    # Batches every 0.2 s against a 3 s timeout (15× apart); the watch lasts
    # 5 s, so without the batches resetting the clock it would fire.
    started = time.monotonic()
    with StallWatchdog(beacon, stall_timeout_s=3) as watchdog:
        for _ in range(25):
            beacon.add.remote(1)
            time.sleep(0.2)
    assert time.monotonic() - started > 3 + 0.5  # watched past the timeout and one check
    assert watchdog.stalled_after_rows is None
    assert ray.get(beacon.state.remote())[0] == 25


def test_the_driver_waits_for_shard_reads_still_to_tell_and_no_longer_than_its_timeout(
    ray_cluster,
):
    """Ray cancels the reads input.limit cut off without waiting for them; each
    tells the beacon as it stops, maybe after the dataset has ended."""
    import threading

    from pipeline.progress import ShardReadTeller, wait_for_shard_reads

    ray = ray_cluster
    beacon = ray.remote(num_cpus=0)(ProgressBeacon).remote()
    teller = ShardReadTeller(beacon)
    teller.started(("s3://b/a.tar", "v1"))
    teller.finished(("s3://b/a.tar", "v1"), 5, 0)
    teller.started(("s3://b/b.tar", "v1"))  # cut off: tells 0.5 s from now
    late = threading.Timer(0.5, teller.finished, (("s3://b/b.tar", "v1"), 2, 1))
    late.start()
    started = time.monotonic()
    reads = wait_for_shard_reads(beacon, wait_s=20)
    assert time.monotonic() - started < 10
    assert (reads.still_reading, sorted(reads.images_done.tolist())) == (0, [2, 5])
    assert reads.errors_left.tolist().count(1) == 1
    # c.tar's first read was killed outright and never told; its retry did.
    teller.started(("s3://b/c.tar", "v1"))
    teller.started(("s3://b/c.tar", "v1"))
    teller.finished(("s3://b/c.tar", "v1"), 0, 0)
    started = time.monotonic()
    reads = wait_for_shard_reads(beacon, wait_s=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert reads.still_reading == 1 and len(reads.keys) == 3
    started = time.monotonic()
    assert wait_for_shard_reads(beacon, wait_s=0).still_reading == 1  # no limit: no wait
    assert time.monotonic() - started < 5
