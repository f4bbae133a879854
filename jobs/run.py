"""``python -m jobs.run --config FILE [--set dotted.key=value ...]``.

Parses and validates the config, calls ``pipeline.run_annotation`` and prints a
summary. Exit codes: 0 done (error rows included), 2 bad config, 1 the job
could not start or finish (the message says why), 130 stopped by Ctrl-C or
SIGTERM (rerun to go on).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import traceback
from typing import TYPE_CHECKING

from jobs.config import ConfigError, add_override_argument, load_config

if TYPE_CHECKING:
    from pipeline.run import RunSummary

EXIT_CONFIG_ERROR = 2
EXIT_JOB_FAILED = 1
EXIT_STOPPED = 130  # as a shell reports a process stopped by Ctrl-C


def stop_on_sigterm() -> None:
    """Make SIGTERM stop the job as Ctrl-C does.

    ``ray job stop`` and Kubernetes stop a job's driver with SIGTERM (and SIGKILL
    after a grace period). By default Python dies on it at once; raised as
    KeyboardInterrupt, it lets the run record that it stopped and Ray Data shut
    its actors down. This holds until ``ray.init``, which installs a handler of
    its own that raises ``SystemExit(SIGTERM)``; ``main`` takes that as a stop too.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.run", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML job config (only what differs from defaults)")
    add_override_argument(parser, "inference.batch_size=16")
    parser.add_argument(
        "--force",
        action="store_true",
        help="annotate every image again, even those an earlier run did (same as "
        "--set mode=force); new rows supersede old ones",
    )
    return parser.parse_args(argv)


def format_summary(summary: RunSummary) -> str:
    """The end-of-run report for a terminal or a job's log: counts, speed, where time went."""
    hardware = f"up to {summary.gpus_requested:g} GPUs" if summary.gpus_requested else "on CPUs"
    limit = (
        " (input.limit reached: the rest waits for a later run)" if summary.limit_reached else ""
    )
    lines = [
        f"run {summary.run_id}: {summary.images_ok} ok, {summary.images_error} errors, "
        f"{summary.images_skipped_done} already done, of {summary.images_listed} images{limit} "
        f"in {summary.elapsed_s:.1f} s ({summary.images_per_s:.2f} images/s over the whole "
        f"run, {hardware})",
        f"  predictions: {summary.predictions_uri}",
        f"  run report:  {summary.report_uri}",
    ]
    if summary.quality_report_uri:
        lines.append(f"  quality report: {summary.quality_report_uri}")
    for reason, count in summary.error_reasons.items():
        lines.append(f"  {count:>6} × {reason}")
    phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in summary.timings_s.items())
    if phases:
        # The run's time above ends with its count; the report comes after it.
        total_s = sum(summary.timings_s.values())
        lines.append(f"  phases: {phases} (in all {total_s:.1f} s)")
    if summary.stage_timings_s:
        lines.append(
            f"  {'stage (stages fused by Ray share a line)':<56} {'wall s':>8} {'CPU s':>8}"
            f" {'tasks':>7}"
        )
        for stage, times in summary.stage_timings_s.items():
            # "MapBatches(read_batch)->MapBatches(decode_batch)" → "read_batch → decode_batch"
            name = re.sub(r"MapBatches\((\w+)\)", r"\1", stage).replace("->", " → ")
            cpu, tasks = times.get("task_cpu_s"), times.get("tasks")
            lines.append(
                f"  {name:<56} {times['operator_wall_s']:>8.1f} "
                f"{'' if cpu is None else format(cpu, '.1f'):>8} "
                f"{'' if tasks is None else format(tasks, 'd'):>7}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # httpx logs every request's URL at INFO, credentials in it included (an
    # HF_ENDPOINT with user:password@): its warnings are enough.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # "Found credentials in environment variables.", once per S3 client made.
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
    try:
        overrides = [*args.overrides, *(["mode=force"] if args.force else [])]
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    from dpt_model import ModelLoadError
    from pipeline.listing import InputNotFoundError
    from pipeline.output.runs import is_stop
    from pipeline.progress import JobStalledError
    from pipeline.run import ClusterTooSmallError, OutputNotWritableError, run_annotation
    from pipeline.schema import strip_url_secrets
    from pipeline.storage import StorageUnreachableError

    foreseen = (
        ModelLoadError,
        InputNotFoundError,
        OutputNotWritableError,
        ClusterTooSmallError,
        JobStalledError,
        StorageUnreachableError,
    )
    try:
        summary = run_annotation(config)
    except (KeyboardInterrupt, SystemExit) as stop:
        if not is_stop(stop):
            raise
        print(
            "stopped: the rows committed so far are kept; "
            "run the same command again to go on from there",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    except Exception as error:
        if (known := _first_of(error, foreseen)) or (known := _actor_model_error(error)):
            print(f"error: {strip_url_secrets(str(known))}", file=sys.stderr)
            return EXIT_JOB_FAILED
        # A traceback, for a failure nobody foresaw, without the signatures of
        # presigned URLs it may quote.
        print(strip_url_secrets(traceback.format_exc()), file=sys.stderr)
        return EXIT_JOB_FAILED
    print(format_summary(summary))
    return 0


def _first_of(error: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """``error``, or the error it wraps, that is one of ``kinds``.

    An actor's failure (a model that fails to load there) reaches the driver
    wrapped by Ray: its cause is kept as ``cause`` or ``__cause__``.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return current
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__
    return None


def _actor_model_error(error: BaseException) -> str | None:
    """The message of a ModelLoadError raised in an actor's ``__init__``.

    Ray keeps only the text of an actor's creation error (ActorDiedError,
    ``actor_init_failed``), ending in the traceback's last line.
    """
    from ray.exceptions import RayActorError

    current: BaseException | None = error
    while current is not None and not isinstance(current, RayActorError):
        current = current.__cause__
    if current is None or not current.actor_init_failed:
        return None
    found = re.findall(r"^\S*ModelLoadError: (.+)$", str(current), re.MULTILINE)
    return found[-1] if found else None


def exit_after_stop(code: int) -> None:
    """Leave at once after a stop, once what was said is flushed.

    After Ray's SIGTERM handler has run, ``ray.shutdown`` (or the interpreter's
    teardown, which calls it) aborts in Ray's core worker: exit 134 and a native
    stack, though the run wrote its end record. The run needs nothing more: the
    processes of a local Ray go with the driver that started them, and a
    cluster's GCS sees the driver go.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    stop_on_sigterm()
    exit_code = main()
    if exit_code == EXIT_STOPPED:
        exit_after_stop(exit_code)
    sys.exit(exit_code)
