"""A small headless-Chromium driver over the DevTools protocol (``websockets``), for the viewer's tests.

Debian's ``chromium`` is started with a fresh profile and ``--remote-debugging-port=0``; the port it
picked is read from ``DevToolsActivePort`` in the profile. Only what the tests need: navigate, evaluate
JavaScript (awaiting promises), wait for a condition, screenshot as an array.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--force-device-scale-factor=1", "--remote-debugging-port=0",
)  # fmt: skip


class BrowserError(RuntimeError):
    """Chromium did not start, or the page did not do what was waited for."""


class Chromium:
    """One headless Chromium with one page of ``width`` × ``height`` CSS px; use as a context manager."""

    def __init__(self, width: int = 1280, height: int = 800, timeout: float = 30.0) -> None:
        from websockets.sync.client import connect

        self.profile = Path(tempfile.mkdtemp(prefix="wsikit-chromium-"))
        self.proc = subprocess.Popen(
            [
                str(CHROMIUM),
                *FLAGS,
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file, deadline = self.profile / "DevToolsActivePort", time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BrowserError(f"{CHROMIUM} did not start (exit code {self.proc.returncode})")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(
            connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout)
        )
        self._id = 0
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_stack", None) is not None:
            self._stack.close()
            self._stack = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a DevTools method and return its result (events in between are dropped)."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg["result"]

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited); a thrown error raises :class:`BrowserError`."""
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise BrowserError(
                f"{expression}: {res['exceptionDetails'].get('exception', {}).get('description')}"
            )
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> float:
        """Poll until ``expression`` is truthy; returns the seconds it took."""
        t0 = time.monotonic()
        while True:
            try:
                if self.evaluate(expression):
                    return time.monotonic() - t0
            except BrowserError:
                pass  # the page is still loading (e.g. wsikitView not defined yet)
            if time.monotonic() - t0 > timeout:
                raise BrowserError(f"timed out after {timeout:.0f} s waiting for {expression}")
            time.sleep(0.05)

    def screenshot(self, path: Path | None = None) -> np.ndarray:
        """The page as an (H, W, 3) uint8 array, also saved as PNG to ``path`` when given."""
        from PIL import Image

        png = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        if path is not None:
            Path(path).write_bytes(png)
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
