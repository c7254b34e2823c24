"""Open a local HTML file in real headless Chromium and report what went wrong, plus a screenshot.

Speaks the DevTools protocol over ``--remote-debugging-pipe`` (JSON messages ending in NUL on
file descriptors 3 and 4), so it needs no websocket client and no free port, and reads events
rather than scraping log lines whose format changes between Chromium releases. It records
console errors, uncaught exceptions, error log entries (failed resource loads), requests to
anything but ``file:`` and ``data:`` URLs, and images that did not decode.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")


def find_chromium() -> str | None:
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


@dataclass
class PageCheck:
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    images: int = 0
    title: str = ""

    @property
    def problems(self) -> list[str]:
        return [*self.console_errors, *self.exceptions, *self.log_errors,
                *(f"external request: {u}" for u in self.external_requests),
                *(f"image did not load: {i}" for i in self.broken_images)]


class _Pipe:
    """One browser process and its DevTools pipe: send commands, wait for replies and events."""

    def __init__(self, binary: str, profile: str) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Move the child's ends above 9, so that placing them on 3 and 4 cannot clobber one another.
        to_browser_r, from_browser_w = (_above_nine(fd) for fd in (to_browser_r, from_browser_w))
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--hide-scrollbars",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        # bash (dash takes one-digit descriptors only) puts our pipe ends on the descriptors Chromium expects (3: commands in, 4: replies out).
        script = f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-'
        self.process = subprocess.Popen(["bash", "-c", script, binary, *args],
                                        pass_fds=(to_browser_r, from_browser_w),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        reply = self._wait(lambda m: m.get("id") == self._next_id, timeout, method)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        return self._wait(lambda m: m.get("method") == method, timeout, method)

    def _wait(self, done, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if done(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer {what} within {timeout:.0f} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.process.poll()}) while waiting for {what}")
            self._buffer += chunk

    def close(self) -> None:
        try:
            os.write(self._to_browser, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
        except OSError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def _above_nine(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


def check_page(page: Path, screenshot: Path | None = None, *, width: int = 1280, height: int = 900,
               full_page: bool = False, binary: str | None = None, settle_s: float = 0.5) -> PageCheck:
    """Load ``page`` in headless Chromium; list what failed; optionally save a PNG screenshot."""
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium binary on PATH")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        browser = _Pipe(binary, profile)
        try:
            target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Network", "Page"):
                browser.send(f"{domain}.enable", session=session)
            browser.send("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
            browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            browser.wait_event("Page.loadEventFired", timeout=60)
            time.sleep(settle_s)  # late console messages and failed loads arrive as events
            images = browser.send("Runtime.evaluate", {"returnByValue": True, "expression": (
                "({n: document.images.length, title: document.title, broken: Array.from(document.images)"
                ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 80))})")},
                session=session)["result"]["value"]
            if screenshot is not None:
                params: dict = {"format": "png"}
                if full_page:
                    size = browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
                    params.update(captureBeyondViewport=True,
                                  clip={"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1})
                import base64

                data = browser.send("Page.captureScreenshot", params, session=session)["data"]
                screenshot.write_bytes(base64.b64decode(data))
            browser.send("Runtime.evaluate", {"expression": "1"}, session=session)  # drain pending events
        finally:
            browser.close()
    return _collect(browser.events, images)


def _collect(events: list[dict], images: dict) -> PageCheck:
    check = PageCheck(images=images["n"], broken_images=images["broken"], title=images["title"])
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            check.console_errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            check.exceptions.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            check.log_errors.append(f"{entry.get('text', '')} {entry.get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            if not url.startswith(("file:", "data:", "about:")):
                check.external_requests.append(url)
    return check
