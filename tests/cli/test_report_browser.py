"""report.html (dsr_compiler/report_html.py) in a real browser: headless Chromium driven over the
DevTools protocol (tools/cdp.py, standard library only). The page loads from disk without a single
JavaScript error, console error or request beyond the file itself, its screenshot is not blank,
<details> sections open and close on a click, and a click on a header sorts the table by that column
(a second click reverses it). tests/cli/test_report_html.py checks the page's content as text.

Skipped when Chromium is not installed (`apt-get install chromium`; .ci/run installs it when it can);
once it is installed, a browser that fails to start or answer is a failure, not a skip.
"""
from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from dsr_compiler import cli

_spec = importlib.util.spec_from_file_location("dsr_tools_cdp", Path(__file__).resolve().parents[2] / "tools" / "cdp.py")
cdp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cdp)

CHROMIUM = cdp.find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="report.html browser tests need headless Chromium, and neither `chromium` on PATH nor "
    f"/usr/bin/chromium exists; {cdp.INSTALL_HINT}, which .ci/run does when it can")

WIDTH, HEIGHT = 1280, 900
ROWS = "Array.from(document.querySelectorAll({table} + ' tbody tr'))"


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    assert cli.main(["compile", "--seq", "4", "--quiet", "--out", str(root / "decoder")]) == 0
    assert cli.main(["compile", "--module", "grpo", "--seq", "4", "--quiet", "--out", str(root / "grpo")]) == 0
    return root


@pytest.fixture
def browser():
    with cdp.Browser(CHROMIUM, width=WIDTH, height=HEIGHT, timeout=20) as b:
        yield b


def _column(b, table: str, col: int) -> list[str]:
    """The sort keys of one column, top to bottom (data-v where present, else the cell's text)."""
    return b.evaluate(ROWS.format(table=json.dumps(table))
                      + f".map(function(r){{var c=r.cells[{col}]; return c.getAttribute('data-v')||c.textContent;}})")


def _names(b) -> list[str]:
    return _column(b, "#kernel-table", 0)


def _header(b, table: str, title: str) -> int:
    heads = b.evaluate(f"Array.from(document.querySelectorAll({json.dumps(table + ' thead th')}))"
                       ".map(function(h){return h.textContent;})")
    return heads.index(title)


def _click_header(b, table: str, col: int) -> None:
    b.click(f"{table} thead th:nth-child({col + 1})")


@pytest.mark.parametrize("name", ["decoder", "grpo"])
def test_page_loads_without_errors_and_renders(dumps, browser, name):
    rep = json.loads((dumps / name / "report.json").read_text())
    page = dumps / name / "report.html"
    browser.open(page)
    assert browser.evaluate("document.title") == f"dsr report: {rep['graph']}"
    assert browser.evaluate("document.querySelectorAll('#kernel-table tbody tr').length") == len(rep["kernels"])
    # both SVG pictures (graph, roofline) laid out with a size
    sizes = browser.evaluate("Array.from(document.querySelectorAll('svg')).map(function(s){"
                             "var r=s.getBoundingClientRect(); return [r.width, r.height];})")
    assert len(sizes) == 2 and all(w > 100 and h > 100 for w, h in sizes), sizes
    png = browser.screenshot()
    w, h, ch, rows = cdp.decode_png(png)
    assert (w, h) == (WIDTH, HEIGHT)
    pixels = Counter(r[i:i + ch] for r in rows for i in range(0, w * ch, ch))
    background, count = pixels.most_common(1)[0]
    # a blank page is 1 colour; a page with one line of text ~40 colours and 0.004% ink
    assert len(pixels) >= 100, f"screenshot has only {len(pixels)} colours"
    assert 1 - count / (w * h) >= 0.02, f"screenshot is {count / (w * h):.1%} background {background.hex()}"
    assert browser.requests() == [page.resolve().as_uri()]         # nothing loaded but the page itself
    assert browser.errors() == []


def test_details_open_and_close_on_click(dumps, browser):
    browser.open(dumps / "decoder" / "report.html")
    state = "(function(){var d=document.getElementById('pass-fuse');" \
            "return [d.open, d.getBoundingClientRect().height, d.querySelector('pre').checkVisibility()];})()"
    opened0, h0, pre0 = browser.evaluate(state)
    assert opened0 is False and pre0 is False and h0 > 0             # collapsed: the summary line only
    browser.click("#pass-fuse > summary")
    opened1, h1, pre1 = browser.evaluate(state)
    assert opened1 is True and pre1 is True and h1 > h0 + 200         # the fuse pass's diff is shown
    browser.click("#pass-fuse > summary")
    assert browser.evaluate(state) == [False, h0, False]
    assert browser.errors() == []


def test_kernel_table_sorts_by_the_clicked_column(dumps, browser):
    rep = json.loads((dumps / "decoder" / "report.json").read_text())
    read = {k["name"]: k["bytes_read"] for k in rep["kernels"]}
    browser.open(dumps / "decoder" / "report.html")
    t = "#kernel-table"
    start = _names(browser)
    assert sorted(start) == sorted(read)
    col = _header(browser, t, "bytes read")
    ascending = sorted(start, key=read.__getitem__)                # stable, like Array.prototype.sort
    assert ascending != start                                      # else the click would prove nothing
    _click_header(browser, t, col)
    assert _names(browser) == ascending
    assert [float(v) for v in _column(browser, t, col)] == sorted(read.values())
    _click_header(browser, t, col)                                 # second click: descending
    assert _names(browser) == sorted(start, key=read.__getitem__, reverse=True)
    # text column: kernel names in natural order (k2 before k10)
    _click_header(browser, t, 0)
    assert _names(browser) == sorted(start, key=lambda n: int(n[1:].split("_", 1)[0]))
    # every header of both tables sorts without an error (the passes table comes first on the page)
    for table in ("#kernel-table", "h2#passes + table"):
        n = browser.evaluate(f"document.querySelectorAll({json.dumps(table + ' thead th')}).length")
        for c in range(n):
            _click_header(browser, table, c)
    ms = _header(browser, "h2#passes + table", "ms")
    _click_header(browser, "h2#passes + table", ms)
    got = [float(v) for v in _column(browser, "h2#passes + table", ms)]
    assert got == sorted(got) and len(got) == len(rep["passes"])
    assert browser.errors() == []
