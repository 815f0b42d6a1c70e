"""The README's picture of report.html: the page in headless Chromium (tools/cdp.py), saved as a PNG.

    python tools/report_screenshot.py                  # compile the default decoder, write docs/report.png
    python tools/report_screenshot.py out/demo         # an existing dump (or a report.html file)
    python tools/report_screenshot.py --full-page --png /tmp/page.png

Without a dump argument it compiles the default decoder (`dsrc compile`, its default options) into a
temporary folder. The viewport is 1280x900 CSS pixels at scale 1; the picture is its top unless
--full-page. Needs Chromium (`apt-get install chromium`).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cdp import Browser, BrowserError, find_chromium  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dump", nargs="?", help="a dump folder (its report.html) or an HTML file; default: compile")
    ap.add_argument("--png", default=str(ROOT / "docs" / "report.png"), help="where to write (docs/report.png)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--full-page", action="store_true", help="the whole page, not only its top")
    a = ap.parse_args(argv)
    exe = find_chromium()
    if exe is None:
        print("report_screenshot: no chromium found; install it with `apt-get install chromium`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dsr-shot-") as tmp:
        if a.dump is None:
            from dsr_compiler import cli
            page = Path(tmp) / "decoder" / "report.html"
            with contextlib.redirect_stdout(io.StringIO()):      # the kernel table; errors go to stderr
                rc = cli.main(["compile", "--quiet", "--out", str(page.parent)])
            if rc != 0:
                return rc
        else:
            page = Path(a.dump)
            page = page / "report.html" if page.is_dir() else page
            if not page.is_file():
                print(f"report_screenshot: {page} does not exist (`dsrc report DIR` writes it)", file=sys.stderr)
                return 2
        try:
            with Browser(exe, width=a.width, height=a.height) as b:
                b.open(page)
                png = b.screenshot(full_page=a.full_page, height=None if a.full_page else a.height)
                errors = b.errors()
        except BrowserError as e:
            print(f"report_screenshot: {e}", file=sys.stderr)
            return 1
    for e in errors:
        print(f"report_screenshot: the page logged an error: {e}", file=sys.stderr)
    out = Path(a.png)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    print(f"{out}: {len(png):,} bytes ({a.width} px wide) from {page if a.dump else 'the default decoder'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
