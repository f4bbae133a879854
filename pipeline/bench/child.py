"""Measurements in a fresh interpreter, so each peak RSS and import cost is its own."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from typing import Any


def run_in_child(module: str, measurement: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run ``module``'s measurement in a fresh interpreter, so its peak RSS is its own.

    The child is ``python -m <module> <measurement> <params JSON> <result path>``;
    its result comes back through the file.
    """
    with tempfile.TemporaryDirectory() as folder:
        result_path = os.path.join(folder, "result.json")
        command = [sys.executable, "-m", module, measurement, json.dumps(params), result_path]
        child = subprocess.run(command, capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise RuntimeError(
                f"{measurement} measurement failed ({child.returncode}):\n{child.stderr[-4000:]}"
            )
        with open(result_path) as result:
            return json.load(result)


def peak_rss_mib() -> float:
    """This process's peak resident memory.

    Linux's ``VmHWM`` belongs to the process's own address space; ``ru_maxrss``
    can carry the RSS a forked parent had when the child was started.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes there, KiB here
