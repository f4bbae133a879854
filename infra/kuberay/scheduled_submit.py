"""Submit one scheduled run to a Ray cluster, unless the last one is still going.

The CronJob in cronjob.yaml runs this (the image has it at
/home/ray/dpt-annotate/infra/kuberay/scheduled_submit.py):

    python scheduled_submit.py --address http://<head-svc>:8265 -- python -m jobs.run ...

1. It lists the cluster's jobs (Ray's Jobs REST API, through JobSubmissionClient)
   and, if one whose submission id starts with --prefix, or whose entrypoint
   sets the same output.uri (a run submitted by hand), is PENDING or RUNNING,
   says so and exits 0: that run is still going, so this schedule is skipped.
   (The CronJob's concurrencyPolicy: Forbid only covers this pod; a Ray job
   outlives the pod that submitted it.)
2. Otherwise it submits the entrypoint as `<prefix><UTC time>`, follows its
   logs, then polls the job's status until it is terminal (a log stream that
   closes early does not end the wait), and exits 0 on SUCCEEDED, 1 on FAILED
   or STOPPED.

Token auth: with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN set (the CronJob takes
the token from the secret KubeRay makes), the client sends the token on every
request, as `ray job submit` does.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

ACTIVE = {"PENDING", "RUNNING"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
DEFAULT_PREFIX = "dpt-annotate-scheduled-"


def log(message: str) -> None:
    print(f"[scheduled_submit] {message}", flush=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the dashboard, http://<head>:8265")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="submission id prefix")
    parser.add_argument("--poll-seconds", type=float, default=30.0)
    parser.add_argument(
        "--max-poll-errors",
        type=int,
        default=20,
        help="consecutive failed status requests before giving up (the job runs on)",
    )
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    if args.entrypoint[:1] == ["--"]:
        args.entrypoint = args.entrypoint[1:]
    if not args.entrypoint:
        parser.error("no entrypoint: give it after --")
    return args


def status_name(status: Any) -> str:
    # JobStatus is a str Enum; str() of it is its value ("RUNNING").
    return str(getattr(status, "value", status))


def active_runs(
    jobs: Sequence[Any], prefix: str, entrypoint: Sequence[str]
) -> list[tuple[str, str]]:
    """(submission id, status) of the jobs that have not ended and would share this
    run's output: submitted under ``prefix``, or with the same ``output.uri=…``."""
    output_setting = next((a for a in entrypoint if a.startswith("output.uri=")), None)

    def same_output(job: Any) -> bool:
        if output_setting is None:
            return False
        return output_setting in shlex.split(getattr(job, "entrypoint", None) or "")

    return [
        (job.submission_id or "(no id)", status_name(job.status))
        for job in jobs
        if status_name(job.status) in ACTIVE
        and ((job.submission_id or "").startswith(prefix) or same_output(job))
    ]


def submission_id(prefix: str, now: datetime) -> str:
    return prefix + now.astimezone(UTC).strftime("%Y%m%d-%H%M%S")


def follow_logs(client: Any, job_id: str) -> None:
    """Print the job's logs as they come; return when the stream ends, however it ends."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as error:  # the stream is a convenience; the status decides
        log(f"log stream for {job_id} ended: {error!r}")


def wait_until_terminal(
    client: Any,
    job_id: str,
    poll_seconds: float,
    max_errors: int,
    sleep: Callable[[float], None],
) -> str:
    errors = 0
    while True:
        try:
            status = status_name(client.get_job_status(job_id))
            errors = 0
        except Exception as error:
            errors += 1
            if errors >= max_errors:
                raise
            log(f"could not read the status of {job_id} ({error!r}); retrying")
        else:
            if status in TERMINAL:
                return status
        sleep(poll_seconds)


def main(
    argv: Sequence[str] | None = None,
    client_factory: Callable[[str], Any] | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if client_factory is None:
        from ray.job_submission import JobSubmissionClient

        client_factory = JobSubmissionClient
    client = client_factory(args.address)

    running = active_runs(client.list_jobs(), args.prefix, args.entrypoint)
    if running:
        described = ", ".join(f"{job_id} ({status})" for job_id, status in running)
        log(f"skipped: a run on this output is still going: {described}")
        return 0

    job_id = client.submit_job(
        entrypoint=shlex.join(args.entrypoint), submission_id=submission_id(args.prefix, now())
    )
    log(f"submitted {job_id}: {shlex.join(args.entrypoint)}")
    follow_logs(client, job_id)
    status = wait_until_terminal(client, job_id, args.poll_seconds, args.max_poll_errors, sleep)
    log(f"{job_id} ended: {status}")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
