"""Processes the tests start: a project command, and the Unix session of one started with
start_new_session=True."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def run_module(module: str, *arguments: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """``python -m module arguments…`` in this environment, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *arguments],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
    )


def session_processes(session_id: int) -> list[int]:
    """Live (not zombie) processes of one Unix session."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == session_id and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def stop_session(session_id: int) -> None:
    # A Ray head's GCS and autoscaler outlast SIGTERM by 15 s and more; what is
    # stopped here is thrown away, so a short grace is enough.
    for sig, grace_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        for pid in session_processes(session_id):
            with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while session_processes(session_id) and time.monotonic() < deadline:
            time.sleep(0.2)
