"""`ray job submit` for real: a head node on loopback, a tiny job, its status and
logs; and `ray job stop` in the middle of a job, then the same job submitted again.

The cluster is started with `ray start --head` in a new session and stopped by
signalling that session's processes only, so the test session's own Ray and
anything else on the machine are left alone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.sample_images import encoded, synthetic_photo
from tests.corpus import write_files
from tests.processes import session_processes, stop_session
from tests.s3_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES = 4


# Token auth stays on, as on a real cluster; the test cluster and its client
# share a token of their own rather than the user's ~/.ray/auth_token.
CLUSTER_TOKEN = secrets.token_hex(32)


def cluster_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_ADDRESS")}
    # The job's entrypoint runs the first `python` on the head's PATH: this one.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = CLUSTER_TOKEN
    # Workers hand metrics to the node's agent every 10 s by default; the job
    # here lasts seconds.
    env["RAY_metrics_report_interval_ms"] = "500"
    # `ray job stop` sends SIGTERM, then SIGKILL after this many seconds (3 by
    # default); room for a loaded machine, as the README advises for S3 outputs.
    env["RAY_JOB_STOP_WAIT_TIME_S"] = "30"
    return env


@dataclass(frozen=True)
class RayHead:
    dashboard: str
    metrics: str  # the node's Prometheus endpoint


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A one-node Ray cluster on loopback."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # Unix socket paths stay short
    dashboard = f"http://127.0.0.1:{(dashboard_port := free_port())}"
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard_port,
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": (metrics_port := free_port()),
    }
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]  # fmt: skip
    starter = subprocess.Popen(
        command,
        env=cluster_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = starter.communicate(timeout=120)
        assert starter.returncode == 0, output[-3000:]
        yield RayHead(dashboard, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        stop_session(starter.pid)
        left = session_processes(starter.pid)
        assert not left, f"processes of the test cluster still running: {left}"


def ray_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "ray"), *args],
        cwd=REPO_ROOT,
        env=cluster_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit(head: RayHead, job_id: str, job_args: list[str]) -> None:
    """``ray job submit --no-wait`` of ``python -m jobs.run`` as the README gives it."""
    command = [
        "job", "submit", "--address", head.dashboard, "--submission-id", job_id, "--no-wait",
        "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--",
        "python", "-m", "jobs.run", "--config", "jobs/configs/local.yaml", *job_args,
    ]  # fmt: skip
    # Right after `ray start` the job agent can answer "No available agent" for a while.
    deadline = time.monotonic() + 60
    while True:
        submitted = ray_cli(*command)
        if submitted.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]


def job_status(head: RayHead, job_id: str) -> str:
    answer = ray_cli("job", "status", "--address", head.dashboard, job_id)
    return (answer.stdout + answer.stderr).lower()


def wait_for_end(head: RayHead, job_id: str) -> tuple[str, str]:
    """The job's status once it has ended, and its logs."""
    deadline, status = time.monotonic() + 240, ""
    while time.monotonic() < deadline:
        status = job_status(head, job_id)
        if any(state in status for state in ("succeeded", "failed", "stopped")):
            break
        time.sleep(2)
    return status, ray_cli("job", "logs", "--address", head.dashboard, job_id).stdout


def job_args(corpus: Path, output: Path, depth_model: Path, *extra: str) -> list[str]:
    settings = [
        f"input.uri={corpus}", f"output.uri={output}", f"models.depth={depth_model}",
        "models.segmentation=null", "inference.cpu_threads=1", *extra,
    ]  # fmt: skip
    return [arg for setting in settings for arg in ("--set", setting)]


@pytest.mark.slow
def test_ray_job_submit_runs_the_job_on_a_cluster(ray_head, checkpoints, tmp_path):
    corpus, output = tmp_path / "images", tmp_path / "output"
    write_files(
        corpus,
        {f"{i}.jpg": encoded(synthetic_photo(320, 240, seed=i), "JPEG") for i in range(IMAGES)},
    )
    # The head's metrics count every job it ran: this job's are the difference.
    before = scrape(ray_head.metrics)
    job_id = f"dpt-test-{os.getpid()}"
    submit(ray_head, job_id, job_args(corpus, output, checkpoints["depth-vit"]))
    status, logs = wait_for_end(ray_head, job_id)
    assert "succeeded" in status, status[-2000:] + logs[-3000:]
    assert f"{IMAGES} ok, 0 errors" in logs
    table = pq.read_table(output / "predictions")
    assert table.num_rows == IMAGES and set(table["status"].to_pylist()) == {"ok"}

    # What a Prometheus scraping the node sees: the job's own metrics.
    depth_bytes = sum(path.stat().st_size for path in (output / "depth").rglob("*.png"))
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(ray_head.metrics, since=before)
        if samples.get(("ray_dpt_images_total", "ok")) == IMAGES or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert samples.get(("ray_dpt_images_total", "ok")) == IMAGES, samples
    assert samples[("ray_dpt_map_bytes_written_total", "depth")] == depth_bytes
    # An actor's records from its last export interval (1 s here) are lost when
    # the pool shuts down, so the inference metrics may miss the last batch.
    assert 1 <= samples[("ray_dpt_inference_batch_size_sum", "depth")] <= IMAGES
    assert samples[("ray_dpt_inference_batch_latency_seconds_count", "depth")] >= 1


def scrape(
    url: str, since: dict[tuple[str, str], float] | None = None
) -> dict[tuple[str, str], float]:
    """Prometheus text → {(metric, status or map or task label): value summed over
    workers}, less the values of an earlier scrape ``since``."""
    samples = {key: -value for key, value in (since or {}).items()}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        match = re.match(r"(ray_dpt_\w+)\{(.*)\} (\S+)$", line)
        if not match:
            continue
        name, labels, value = match.groups()
        label = re.search(r'\b(?:status|map|task)="([^"]*)"', labels)
        key = (name, label.group(1) if label else "")
        samples[key] = samples.get(key, 0.0) + float(value)
    return samples


@pytest.mark.slow
def test_ray_job_stop_keeps_what_was_committed_and_a_rerun_finishes(
    ray_head, checkpoints, tmp_path
):
    images = 36
    corpus, output = tmp_path / "images", tmp_path / "output"
    write_files(
        corpus,
        {f"{i:03d}.jpg": encoded(synthetic_photo(160, 120, seed=i), "JPEG") for i in range(images)},
    )
    args = job_args(corpus, output, checkpoints["depth-vit"], "output.rows_per_part=4")
    stopped_id = f"dpt-stop-{os.getpid()}"
    submit(ray_head, stopped_id, args)
    # Stop it once it has committed a part, long before it is through (it runs
    # at 1.5 to 3 images/s here).
    deadline = time.monotonic() + 180
    while not list((output / "predictions").glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "running" in job_status(ray_head, stopped_id), "the job ended before it was stopped"
    stop = ray_cli("job", "stop", "--address", ray_head.dashboard, stopped_id)
    status, logs = wait_for_end(ray_head, stopped_id)
    assert "stopped" in status, status[-2000:] + stop.stdout[-1000:] + logs[-3000:]
    # SIGTERM reaches a driver that ray.init has given a handler of its own.
    assert "stopped: the rows committed so far are kept" in logs, logs[-3000:]
    (ended,) = (output / "_runs").glob("*.ended.json")
    assert json.loads(ended.read_text())["outcome"] == "stopped"
    assert 0 < pq.read_table(output / "predictions").num_rows < images

    rerun_id = f"dpt-rerun-{os.getpid()}"
    submit(ray_head, rerun_id, args)
    status, logs = wait_for_end(ray_head, rerun_id)
    assert "succeeded" in status, status[-2000:] + logs[-3000:]
    # Counted by the rerun: a write task of the stopped job may still have
    # committed its part after the status said STOPPED.
    summary = re.search(r": (\d+) ok, 0 errors, (\d+) already done, of (\d+) images", logs)
    assert summary, logs[-3000:]
    ok, done, listed = map(int, summary.groups())
    assert listed == images and done > 0 and ok + done == images
    paths = pq.read_table(output / "predictions", columns=["source_uri"])["source_uri"]
    assert len(paths) == len(set(paths.to_pylist())) == images
