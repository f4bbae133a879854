"""Processes of one Unix session: what a test started with start_new_session=True."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


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
    for sig, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        for pid in session_processes(session_id):
            with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while session_processes(session_id) and time.monotonic() < deadline:
            time.sleep(0.2)
