"""Jobs that cannot work stop before Ray starts, with one message naming the URI and fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(env: dict[str, str], *settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.run", *(f"--set={s}" for s in settings)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_missing_credentials_name_the_uri_and_the_fix(s3_endpoint, checkpoints, tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AWS_") and key != "RAY_ADDRESS"
    }
    env |= {
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }
    result = run_cli(
        env,
        f"input.uri={tmp_path}",
        "output.uri=s3://some-bucket/out",
        f"models.depth={checkpoints['depth-vit']}",
        f"storage.endpoint_url={s3_endpoint}",
    )
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert "output.uri s3://some-bucket/out" in message
    assert "NoCredentialsError" in message and "set AWS credentials" in message
    assert "Started a local Ray instance" not in result.stderr  # failed before Ray


def test_a_missing_bucket_and_a_missing_model_fail_before_ray(s3_endpoint, checkpoints, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = run_cli(
        env,
        "input.uri=s3://no-such-bucket-here/images",
        f"output.uri={tmp_path / 'out'}",
        f"models.depth={checkpoints['depth-vit']}",
        f"storage.endpoint_url={s3_endpoint}",
    )
    assert result.returncode == 1
    assert "input.uri s3://no-such-bucket-here/images" in result.stderr
    assert "bucket no-such-bucket-here does not exist" in result.stderr
    result = run_cli(
        env,
        f"input.uri={tmp_path}",
        f"output.uri={tmp_path / 'out'}",
        "models.depth=s3://no-such-bucket-here/model",
        f"storage.endpoint_url={s3_endpoint}",
    )
    assert result.returncode == 1
    assert "cannot list model s3://no-such-bucket-here/model" in result.stderr
    assert "Started a local Ray instance" not in result.stderr


@pytest.mark.slow
def test_an_unreachable_endpoint_fails_in_seconds_not_after_retries(checkpoints, tmp_path):
    from tests.s3_server import free_port

    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env |= {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    started = time.monotonic()
    result = run_cli(
        env,
        "input.uri=s3://images/in",
        f"output.uri={tmp_path / 'out'}",
        f"models.depth={checkpoints['depth-vit']}",
        f"storage.endpoint_url=http://127.0.0.1:{free_port()}",  # nothing listens there
    )
    assert result.returncode == 1
    assert "cannot reach input.uri s3://images/in" in result.stderr
    assert "check storage.endpoint_url" in result.stderr
    # The job's own settings (10 attempts, backoff) would take minutes here.
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_weights_that_do_not_fit_their_config_end_the_job_before_ray(checkpoints, tmp_path):
    """transformers finds the misfit only as the actors load the weights, where
    Ray prints hundreds of lines of actor-death tracebacks first; the driver
    finds it in the safetensors header, in one line and no start record."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(checkpoints["depth-vit"], model)
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(config))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"not decoded before the model loads")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = run_cli(
        env,
        f"input.uri={tmp_path / 'images'}",
        f"output.uri={tmp_path / 'out'}",
        f"models.depth={model}",
        "report.enabled=false",
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: model {model}: its weights do not fit its config.json: "
        "dpt.encoder.layer.0.intermediate.dense.weight is [64, 32] in the weights and "
        "[128, 32] by config.json (and 11 more)"
    ]
    assert not (tmp_path / "out" / "_runs").exists()


@pytest.mark.slow
def test_a_run_that_fails_after_it_started_is_not_taken_for_going(checkpoints, tmp_path):
    """A mistyped input under a reachable parent fails once the run has its start
    record; its end record stops later runs warning of it and compaction waiting."""
    output = tmp_path / "out"
    not_a_folder = tmp_path / "images.txt"
    not_a_folder.write_text("")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = run_cli(
        env,
        f"input.uri={not_a_folder}",
        f"output.uri={output}",
        f"models.depth={checkpoints['depth-vit']}",
    )
    assert result.returncode == 1, result.stderr[-2000:]
    [started] = (output / "_runs").glob("*.started.json")
    ended = json.loads(started.with_name(started.name.replace(".started", ".ended")).read_text())
    assert ended["outcome"] == "failed" and ended["error_type"] == "InputNotFoundError"
    compacted = subprocess.run(
        [sys.executable, "-m", "jobs.compact", str(output)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "going" not in compacted.stderr, compacted.stderr
