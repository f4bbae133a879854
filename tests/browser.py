"""Headless Chromium driven over the DevTools protocol on a pipe (no extra packages).

Chromium's ``--remote-debugging-pipe`` reads protocol messages on fd 3 and
writes them on fd 4, each JSON message ended by a NUL byte; this is what
Puppeteer and Playwright use under the hood. Enough of it to load a page, wait
for it, run a script in it and take a screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

# Without these Chromium stalls on network look-ups, first-run and sync set-up.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
]
INSTALL_HINT = (
    "Chromium is needed for the report's browser test: on Debian or Ubuntu "
    "`sudo apt-get install chromium` (or chromium-browser), or set CHROMIUM to its path"
)


def find_chromium() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless browser with one page; use as a context manager."""

    def __init__(self, executable: str, timeout_s: float = 60.0) -> None:
        self.executable = executable
        self.timeout_s = timeout_s
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._buffer = b""
        self._closing = False

    def __enter__(self) -> Chromium:
        self._cleanup = contextlib.ExitStack()
        try:
            self._start()
        except BaseException:
            self._cleanup.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        with contextlib.suppress(BrowserError, OSError):
            self.call("Browser.close")
            self._closing = True
        self._cleanup.close()

    def _start(self) -> None:
        profile = self._cleanup.enter_context(
            tempfile.TemporaryDirectory(prefix="chromium-profile-")
        )
        # Chromium's log goes to a file: a pipe nobody drains would block it.
        self._log = self._cleanup.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
        to_browser_read, self._to_browser = os.pipe()
        self._cleanup.callback(os.close, self._to_browser)
        self._from_browser, from_browser_write = os.pipe()
        self._cleanup.callback(os.close, self._from_browser)
        # The shell moves the pipe ends to fds 3 and 4, where Chromium looks for them.
        redirects = f"3<&{to_browser_read} 4>&{from_browser_write}"
        for fd in {to_browser_read, from_browser_write} - {3, 4}:
            redirects += f" {fd}>&-"
        command = [
            "bash",
            "-c",
            f'exec "$0" "$@" {redirects}',
            self.executable,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        try:
            self._process = subprocess.Popen(
                command,
                pass_fds=(to_browser_read, from_browser_write),
                stdout=subprocess.DEVNULL,
                stderr=self._log,
                start_new_session=True,
            )
        finally:
            # The browser holds its own copies now; ours would keep the pipe open.
            os.close(to_browser_read)
            os.close(from_browser_write)
        # Registered after the profile, so it runs first: the browser's whole
        # process group goes before its profile folder is removed.
        self._cleanup.callback(self._stop)
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        self._session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable", session=True)

    def _stop(self) -> None:
        # A browser asked to close gets a moment to; one that failed to start does not.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=10 if self._closing else 0)
        # Renderer and GPU helpers share the session Chromium started in.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait()

    def call(self, method: str, params: dict | None = None, session: bool = False) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while True:
            for index, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(index)
            self.events.append(self._receive(deadline))

    def load(self, url: str) -> None:
        """Navigate and wait for the load event (every image loaded or failed)."""
        self.events.clear()
        result = self.call("Page.navigate", {"url": url}, session=True)
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")
        self.wait_for_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        data = self.call(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True},
            session=True,
        )["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_browser], [], [], max(0.0, remaining))
            if not ready:
                raise BrowserError(f"no answer from Chromium within {self.timeout_s} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                self._log.seek(0)
                log = self._log.read().decode(errors="replace")[-2000:]
                raise BrowserError(f"Chromium closed the pipe; its log ends:\n{log}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)
