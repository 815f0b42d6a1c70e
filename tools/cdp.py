"""A small headless-Chromium driver over the DevTools protocol, standard library only.

Chromium is started with `--remote-debugging-pipe`: it reads protocol commands on file descriptor 3
and writes results and events on file descriptor 4, each message one JSON object ended by a NUL
byte. Every wait is bounded (a deadline per call), and `close()` (also on leaving a `with` block)
ends the browser's whole process group, so a hung or crashed browser cannot hang the caller.

    with Browser(width=1280, height=900) as b:
        b.open(Path("out/demo/report.html"))
        png = b.screenshot()
        assert b.errors() == []

Used by tests/cli/test_report_browser.py (report.html in a real browser) and
tools/report_screenshot.py (the README's picture). `decode_png` reads the PNGs Chromium writes
(8-bit RGB/RGBA, not interlaced) back into pixel rows.
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--mute-audio", "--hide-scrollbars", "--remote-debugging-pipe")
INSTALL_HINT = "install Debian's Chromium with `apt-get install chromium` (as root)"


class BrowserError(RuntimeError):
    """The browser did not start, answered with a protocol error, died, or did not answer in time."""


def _ready(fd: int, event: int, seconds: float) -> bool:
    """Whether `fd` is ready for `event` (or hung up / in error) within `seconds` (poll: any fd number)."""
    p = select.poll()
    p.register(fd, event)
    return bool(p.poll(max(1, int(seconds * 1000))))


def find_chromium() -> str | None:
    """The `chromium` executable: on PATH, else /usr/bin/chromium; None when there is none."""
    for cand in (shutil.which("chromium"), "/usr/bin/chromium"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


class Browser:
    """One headless Chromium with one page (tab) attached in flat session mode."""

    def __init__(self, exe: str | None = None, *, width: int = 1280, height: int = 900,
                 timeout: float = 30.0) -> None:
        self.exe = exe or find_chromium()
        if self.exe is None:
            raise BrowserError(f"no chromium executable found; {INSTALL_HINT}")
        self.width, self.height, self.timeout = width, height, timeout
        self.events: list[dict] = []
        self._next_id = 0
        self._buf = b""
        self._proc: subprocess.Popen | None = None
        self._w: int | None = None      # our end of the command pipe
        self._r: int | None = None      # our end of the result pipe
        self._profile = tempfile.mkdtemp(prefix="dsr-chromium-")
        self._log = open(os.path.join(self._profile, "chromium.log"), "wb")
        self.session: str | None = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ process and pipes

    def _start(self) -> None:
        cmd_r, cmd_w = os.pipe()        # we write commands -> the browser's fd 3
        res_r, res_w = os.pipe()        # the browser's fd 4 -> we read results and events
        self._w, self._r = cmd_w, res_r  # closed by close()

        def child_fds() -> None:        # runs in the child between fork and exec
            a, b = os.dup(cmd_r), os.dup(res_w)   # (cmd_r or res_w may itself be 3 or 4)
            os.dup2(a, 3)                         # dup2 leaves 3 and 4 inheritable across exec
            os.dup2(b, 4)

        args = [self.exe, *FLAGS, f"--user-data-dir={self._profile}",
                f"--window-size={self.width},{self.height}", "about:blank"]
        try:
            # close_fds=False: Python's own descriptors are non-inheritable (PEP 446), so only 0-4 pass
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                          close_fds=False, preexec_fn=child_fds, start_new_session=True)
        finally:
            os.close(cmd_r)
            os.close(res_w)
        os.set_blocking(self._w, False)
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next((t["targetId"] for t in targets if t.get("type") == "page"), None)
        if page is None:
            page = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": page, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                          "deviceScaleFactor": 1, "mobile": False}, session=True)

    def log_tail(self, n: int = 2000) -> str:
        """The end of the browser's stderr (for failure messages)."""
        try:
            self._log.flush()
            return Path(self._profile, "chromium.log").read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def close(self) -> None:
        """End the browser (politely, then its process group by force) and remove its profile."""
        p, self._proc = self._proc, None
        if p is not None:
            if p.poll() is None:
                try:
                    self._write({"id": -1, "method": "Browser.close"}, time.monotonic() + 2)
                except (BrowserError, OSError):
                    pass
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(p.pid, signal.SIGKILL)   # its renderer/GPU/zygote children too (own session)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for fd in (self._w, self._r):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._w = self._r = None
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ protocol

    def _write(self, msg: dict, deadline: float) -> None:
        data = json.dumps(msg).encode() + b"\0"
        while data:
            left = deadline - time.monotonic()
            if left <= 0 or not _ready(self._w, select.POLLOUT, left):
                raise BrowserError(f"timed out sending {msg.get('method')}")
            try:
                data = data[os.write(self._w, data):]
            except BlockingIOError:
                continue
            except BrokenPipeError as e:
                raise BrowserError(f"the browser closed its command pipe; its log ends:\n{self.log_tail()}") from e

    def _read(self, deadline: float, what: str = "the browser") -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not _ready(self._r, select.POLLIN, left):
                raise BrowserError(f"timed out waiting for {what}")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise BrowserError(f"the browser exited (code {self._proc and self._proc.poll()}); "
                                   f"its log ends:\n{self.log_tail()}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, *, session: bool = False,
             timeout: float | None = None) -> dict:
        """Run one command (on the page when `session`) and return its result; events seen meanwhile
        are appended to `self.events`."""
        if self._proc is None:
            raise BrowserError("the browser is closed")
        deadline = time.monotonic() + (timeout or self.timeout)
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self._write(msg, deadline)
        while True:
            m = self._read(deadline, f"the answer to {method}")
            if m.get("id") == msg["id"]:
                if "error" in m:
                    raise BrowserError(f"{method}: {m['error']}")
                return m.get("result", {})
            if "method" in m:
                self.events.append(m)

    def wait_event(self, method: str, timeout: float | None = None, since: int = 0) -> dict:
        """The first event named `method` at or after index `since` of `self.events`, waiting for it."""
        deadline = time.monotonic() + (timeout or self.timeout)
        for e in self.events[since:]:
            if e.get("method") == method:
                return e
        while True:
            m = self._read(deadline, f"the event {method}")
            if "method" in m:
                self.events.append(m)
                if m["method"] == method:
                    return m

    # ------------------------------------------------------------------ page helpers

    def open(self, path_or_url: str | Path, timeout: float | None = None) -> None:
        """Navigate the page and wait for its load event."""
        url = path_or_url if isinstance(path_or_url, str) and "://" in path_or_url else \
            Path(path_or_url).resolve().as_uri()
        mark = len(self.events)
        r = self.send("Page.navigate", {"url": url}, session=True, timeout=timeout)
        if r.get("errorText"):
            raise BrowserError(f"cannot open {url}: {r['errorText']}")
        self.wait_event("Page.loadEventFired", timeout=timeout, since=mark)

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """The value of a JavaScript expression in the page (promises awaited); a thrown error raises."""
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": True}, session=True, timeout=timeout)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise BrowserError(f"JavaScript error: {d.get('exception', {}).get('description') or d.get('text')}")
        return r.get("result", {}).get("value")

    def click(self, selector: str) -> None:
        """A real left click (mouse events through the input pipeline) at the centre of the element."""
        box = self.evaluate(f"(function(){{var e=document.querySelector({json.dumps(selector)});"
                            "if(!e) return null; e.scrollIntoView({block:'center'});"
                            "var r=e.getBoundingClientRect(); return [r.x+r.width/2, r.y+r.height/2];})()")
        if box is None:
            raise BrowserError(f"no element matches {selector!r}")
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                   "clickCount": 1}, session=True)
        self.evaluate("new Promise(function(r){requestAnimationFrame(function(){requestAnimationFrame(r);});})")

    def errors(self) -> list[str]:
        """Every uncaught exception, console.error/assert and error-level log entry seen so far."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description")))
                                                               for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log ({p['entry'].get('source')}): {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def requests(self) -> list[str]:
        """The URLs of every request the page made (Network.requestWillBeSent)."""
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, *, full_page: bool = False, height: int | None = None, scale: float = 1.0) -> bytes:
        """A PNG of the viewport, of its top `height` CSS pixels, or of the whole page; `scale` < 1 shrinks it."""
        params: dict[str, Any] = {"format": "png"}
        if full_page or height or scale != 1.0:
            size = self.send("Page.getLayoutMetrics", session=True)["cssContentSize"]
            h = size["height"] if full_page else min(height or self.height, size["height"])
            params["clip"] = {"x": 0, "y": 0, "width": self.width, "height": h, "scale": scale}
            params["captureBeyondViewport"] = True
        return base64.b64decode(self.send("Page.captureScreenshot", params, session=True)["data"])


def decode_png(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """(width, height, channels, rows) of an 8-bit RGB or RGBA, non-interlaced PNG; each row holds
    width * channels bytes. Anything else raises ValueError."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if ihdr is None:
        raise ValueError("PNG without IHDR")
    w, h, depth, ctype, _, _, interlace = ihdr
    if depth != 8 or ctype not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG: bit depth {depth}, colour type {ctype}, interlace {interlace}")
    ch = 3 if ctype == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = w * ch
    if len(raw) != h * (stride + 1):
        raise ValueError("PNG data has the wrong length")
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        cur = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:                                        # Sub
            for i in range(ch, stride):
                cur[i] = (cur[i] + cur[i - ch]) & 255
        elif f == 2:                                      # Up
            cur = bytearray((a + b) & 255 for a, b in zip(cur, prev))
        elif f == 3:                                      # Average
            for i in range(stride):
                left = cur[i - ch] if i >= ch else 0
                cur[i] = (cur[i] + ((left + prev[i]) >> 1)) & 255
        elif f == 4:                                      # Paeth
            for i in range(stride):
                a = cur[i - ch] if i >= ch else 0
                b = prev[i]
                c = prev[i - ch] if i >= ch else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        elif f != 0:
            raise ValueError(f"bad PNG filter {f}")
        rows.append(bytes(cur))
        prev = cur
    return w, h, ch, rows
