import signal
import time

import pytest

from pipeline.progress import JobStalledError, ProgressBeacon, StallWatchdog

HANG_S = 12


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


def test_progress_keeps_the_watchdog_quiet(ray_cluster):
    ray = ray_cluster
    beacon = ray.remote(num_cpus=0)(ProgressBeacon).remote()
    with StallWatchdog(beacon, stall_timeout_s=1.5):
        for _ in range(8):
            beacon.add.remote(1)
            time.sleep(0.4)
    assert ray.get(beacon.state.remote())[0] == 8


def test_the_watchdog_interrupts_even_when_sigint_was_replaced(ray_cluster):
    """A library that ignores SIGINT must not leave a stalled job running forever."""
    ray = ray_cluster
    beacon = ray.remote(num_cpus=0)(ProgressBeacon).remote()
    ray.get(beacon.state.remote())
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(JobStalledError), StallWatchdog(beacon, stall_timeout_s=1):
            for _ in range(HANG_S * 10):  # short sleeps: the interrupt lands between them
                time.sleep(0.1)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # restored
    finally:
        signal.signal(signal.SIGINT, previous)
