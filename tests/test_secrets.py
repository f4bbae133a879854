"""No credential or signature reaches logs, outputs, run reports or error rows."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import s3fs

from jobs.sample_images import encoded, synthetic_photo

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAQUITESECRETKEYID7",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMIsecretK7MDENGbPxRfiCYEXAMPLE",
    "AWS_SESSION_TOKEN": "IQoJb3JpZ2luX2VjEPTESTSESSIONTOKENSECRET",
}


def test_credentials_and_signed_urls_never_leak(s3_endpoint, checkpoints):
    client_env = {**os.environ, **SECRETS}
    fs = s3fs.S3FileSystem(
        key=SECRETS["AWS_ACCESS_KEY_ID"],
        secret=SECRETS["AWS_SECRET_ACCESS_KEY"],
        token=SECRETS["AWS_SESSION_TOKEN"],
        client_kwargs={"endpoint_url": s3_endpoint},
    )
    bucket = f"secrets-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.pipe_file(f"{bucket}/img/a.jpg", encoded(synthetic_photo(64, 48, seed=1), "JPEG"))
    fs.pipe_file(f"{bucket}/img/bad.jpg", b"<html>denied</html>")
    signed = [
        fs.url(f"{bucket}/img/{name}", expires=600) for name in ("a.jpg", "bad.jpg", "gone.jpg")
    ]
    assert all("Signature" in url or "X-Amz-Signature" in url for url in signed)
    fs.pipe_file(f"{bucket}/list.txt", "\n".join(signed).encode())
    fs.put(f"{checkpoints['depth-vit']}/", f"{bucket}/model/", recursive=True)

    ray_temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    env = {key: value for key, value in client_env.items() if key != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_temp
    try:
        result = subprocess.run(
            [
                sys.executable, "-m", "jobs.run",
                "--set", f"input.uri=s3://{bucket}/list.txt",
                "--set", f"output.uri=s3://{bucket}/out",
                "--set", f"models.depth=s3://{bucket}/model",
                "--set", f"storage.endpoint_url={s3_endpoint}",
            ],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert "1 ok, 2 errors" in result.stdout
        fs.invalidate_cache()
        written = {path: fs.cat_file(path) for path in fs.find(f"{bucket}/out")}
        assert any(path.endswith(".parquet") for path in written)
        logs = {
            str(path): path.read_bytes()
            for path in Path(ray_temp).rglob("*")
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000
        }
        places = {
            "stdout": result.stdout.encode(),
            "stderr": result.stderr.encode(),
            **written,
            **logs,
        }
        assert len(logs) > 5, "expected Ray's session logs to scan"
        forbidden = [*SECRETS.values(), "Signature=", "X-Amz-Credential", "AWSAccessKeyId="]
        for place, content in places.items():
            for secret in forbidden:
                assert secret.encode() not in content, f"{secret[:12]}… found in {place}"
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
        fs.rm(bucket, recursive=True)


@pytest.mark.slow
def test_a_signed_input_or_model_url_is_not_quoted_in_errors(checkpoints, tmp_path):
    signature = "X-Amz-Credential=AKIAQUITESECRETKEYID7&X-Amz-Signature=5ec7e75ec7e7"
    unreachable = f"https://127.0.0.1:9/bucket/list.txt?{signature}"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    for settings in (
        [f"input.uri={unreachable}", f"models.depth={checkpoints['depth-vit']}"],
        [f"input.uri={tmp_path}", f"models.depth={unreachable.replace('list.txt', 'model')}"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "jobs.run", f"--set=output.uri={tmp_path / 'out'}"]
            + [f"--set={setting}" for setting in settings],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 1
        assert "https://127.0.0.1:9/bucket/" in result.stderr  # it names the URI...
        assert "Signature" not in result.stderr and "AKIA" not in result.stderr  # ...unsigned
