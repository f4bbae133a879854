"""infra/kuberay/scheduled_submit.py, the CronJob's submitter, against a fake Jobs API:
skip while a scheduled run is still going, otherwise submit under a time-stamped
id and wait for the run's own end, whatever the log stream does."""

from __future__ import annotations

import importlib.util
import shlex
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "kuberay" / "scheduled_submit.py"
_spec = importlib.util.spec_from_file_location("scheduled_submit", SCRIPT)
scheduled_submit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scheduled_submit)

PREFIX = "dpt-annotate-scheduled-"
ENTRYPOINT = [
    "python",
    "-m",
    "jobs.run",
    "--set",
    "input.uri=s3://b/images with space/",
    "--set",
    "output.uri=s3://b/out/",
]
NOW = datetime(2030, 1, 2, 6, 0, 5, tzinfo=UTC)


class FakeJobs:
    """Stands in for ray.job_submission.JobSubmissionClient."""

    def __init__(
        self, jobs=(), statuses=("RUNNING", "SUCCEEDED"), log_lines=("a\n",), log_error=None
    ):
        self.jobs = [
            SimpleNamespace(submission_id=job[0], status=job[1], entrypoint=(job[2:] or [""])[0])
            for job in jobs
        ]
        self.statuses = list(statuses)
        self.log_lines = log_lines
        self.log_error = log_error
        self.address = None
        self.submitted = []
        self.status_calls = 0

    def __call__(self, address):  # the client factory
        self.address = address
        return self

    def list_jobs(self):
        return self.jobs

    def submit_job(self, *, entrypoint, submission_id):
        self.submitted.append((entrypoint, submission_id))
        return submission_id

    async def tail_job_logs(self, job_id):
        for line in self.log_lines:
            yield line
        if self.log_error:
            raise self.log_error

    def get_job_status(self, job_id):
        self.status_calls += 1
        status = self.statuses.pop(0)
        if isinstance(status, Exception):
            raise status
        return status


def run(fake, *extra):
    argv = ["--address", "http://head:8265", "--prefix", PREFIX, *extra, "--", *ENTRYPOINT]
    return scheduled_submit.main(argv, client_factory=fake, now=lambda: NOW, sleep=lambda s: None)


@pytest.mark.parametrize("status", ["PENDING", "RUNNING"])
def test_a_scheduled_run_still_going_skips_this_schedule(status, capsys):
    fake = FakeJobs(jobs=[(PREFIX + "20300102-000005", status)])
    assert run(fake) == 0
    assert fake.submitted == []
    assert "skipped" in capsys.readouterr().out
    assert fake.address == "http://head:8265"


def test_other_jobs_and_ended_scheduled_runs_do_not_block_a_new_run():
    fake = FakeJobs(
        jobs=[
            ("someone-elses-job", "RUNNING"),  # not ours
            (None, "RUNNING"),  # a driver run without a submission id
            (PREFIX + "20300101-180005", "FAILED"),
            (PREFIX + "20300101-120005", "SUCCEEDED"),
            (PREFIX + "20300101-060005", "STOPPED"),
        ]
    )
    assert run(fake) == 0
    ((entrypoint, submission_id),) = fake.submitted
    assert submission_id == PREFIX + "20300102-060005"
    assert shlex.split(entrypoint) == ENTRYPOINT


def test_a_run_submitted_by_hand_on_the_same_output_skips_this_schedule(capsys):
    by_hand = "python -m jobs.run --config c.yaml --set output.uri=s3://b/out/"
    elsewhere = "python -m jobs.run --set output.uri=s3://b/out/other/"
    fake = FakeJobs(
        jobs=[("raysubmit_1", "RUNNING", by_hand), ("raysubmit_2", "RUNNING", elsewhere)]
    )
    assert run(fake) == 0 and fake.submitted == []
    out = capsys.readouterr().out
    assert "raysubmit_1 (RUNNING)" in out and "raysubmit_2" not in out
    # The other output alone does not hold the schedule back.
    fake = FakeJobs(jobs=[("raysubmit_2", "RUNNING", elsewhere)])
    assert run(fake) == 0 and len(fake.submitted) == 1


def test_the_run_is_followed_past_a_log_stream_that_closes_early(capsys):
    # The stream ends (here with an error) while the job still runs: the
    # submitter keeps polling and reports the run's real end.
    fake = FakeJobs(
        statuses=["RUNNING", "RUNNING", ConnectionError("blip"), "FAILED"],
        log_error=ConnectionError("stream closed"),
    )
    assert run(fake) == 1
    assert fake.status_calls == 4
    out = capsys.readouterr().out
    assert "a\n" in out and "ended: FAILED" in out


@pytest.mark.parametrize(("end", "code"), [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_the_exit_code_is_the_runs_outcome(end, code):
    assert run(FakeJobs(statuses=["PENDING", end])) == code


def test_status_errors_in_a_row_give_up_with_an_error():
    fake = FakeJobs(statuses=[ConnectionError("down")] * 3)
    with pytest.raises(ConnectionError):
        run(fake, "--max-poll-errors", "3")


def test_real_job_status_values_are_read_by_value():
    from ray.job_submission import JobStatus

    fake = FakeJobs(
        jobs=[(PREFIX + "x", JobStatus.RUNNING)], statuses=[JobStatus.RUNNING, JobStatus.SUCCEEDED]
    )
    assert run(fake) == 0 and fake.submitted == []
    assert scheduled_submit.status_name(JobStatus.STOPPED) == "STOPPED"


def test_an_entrypoint_is_required():
    with pytest.raises(SystemExit):
        scheduled_submit.parse_args(["--address", "http://head:8265"])
