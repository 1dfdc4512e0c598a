"""Open a run's report.html in headless Chromium, save a full-page screenshot, fail on console errors.

    apt-get install -y chromium                        # Debian's package; not needed by CI
    python benchmarks/report_browser_check.py runs/RUN/report.html --out shot.png

Chromium is driven through its DevTools protocol over a pipe (--remote-debugging-pipe), so no
extra Python package is needed. Every console message of level error, every script exception and
every resource that failed to load (a missing image, for instance) is printed, and the exit code is
1 if there was any. Not run in CI: it needs a browser.
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class DevTools:
    """The smallest DevTools-protocol client: JSON messages separated by NUL bytes over two pipes."""

    def __init__(self, browser: str, width: int):
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()
        # Chromium reads commands from fd 3 and writes to fd 4: copy the pipe ends above 10 first, so
        # that moving them to 3 and 4 in the child cannot overwrite one with the other.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_r, from_w)]
        self._profile = tempfile.mkdtemp(prefix="report_check_")
        self.proc = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={self._profile}", f"--window-size={width},800", "--remote-debugging-pipe",
             "about:blank"],
            close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=lambda: (os.dup2(high[0], 3), os.dup2(high[1], 4)))
        for fd in (to_r, from_w, *high):
            os.close(fd)
        self._buf, self._id, self.events = b"", 0, []

    def _read(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._from_r, 1 << 20)
            if not chunk:
                raise SystemExit("Chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise SystemExit(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> None:
        end = time.time() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.time() > end:
                raise SystemExit(f"timed out waiting for {method}")
            self.events.append(self._read())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)


def problems(events: list) -> list:
    """Console errors, script exceptions and failed loads among the recorded DevTools events."""
    out = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(f"{p['entry'].get('source')}: {p['entry']['text']} {p['entry'].get('url', '')}".strip())
        elif e.get("method") == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description")))
                                                              for a in p["args"]))
        elif e.get("method") == "Runtime.exceptionThrown":
            out.append("exception: " + p["exceptionDetails"].get("text", ""))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("page", type=Path, help="a report.html")
    ap.add_argument("--out", type=Path, default=Path("report_screenshot.png"), help="screenshot (PNG)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--max-height", type=int, default=6000, help="cut a very long page here")
    ap.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = ap.parse_args()
    if not args.browser:
        raise SystemExit("no chromium found: apt-get install -y chromium (or pass --browser)")
    if not args.page.is_file():
        raise SystemExit(f"{args.page} not found")
    dt = DevTools(args.browser, args.width)
    try:
        target = dt.call("Target.createTarget", url="about:blank")["targetId"]
        s = dt.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            dt.call(f"{domain}.enable", s)
        dt.call("Page.navigate", s, url=args.page.resolve().as_uri())
        dt.wait_for("Page.loadEventFired")
        height = min(args.max_height, int(dt.call("Page.getLayoutMetrics", s)["cssContentSize"]["height"]) + 1)
        dt.call("Emulation.setDeviceMetricsOverride", s, width=args.width, height=height, deviceScaleFactor=1,
                mobile=False)
        shot = dt.call("Page.captureScreenshot", s, format="png")["data"]
        args.out.write_bytes(base64.b64decode(shot))
        found = problems(dt.events)
    finally:
        dt.close()
    print(f"screenshot: {args.out} ({args.width} x {height} px)")
    for line in found:
        print(f"error: {line}")
    print(f"{len(found)} console error(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
