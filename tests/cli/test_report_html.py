"""report.html (dsr_compiler/report_html.py), written into every dump and by `dsrc report DIR`:
one self-contained page with every pass and its IR diff, every kernel row, the fused graph and the
roofline as SVG, sources, fusion refusals; valid, escaped, no network."""
from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser

import pytest

from dsr_compiler import cli

VOID = {"meta", "br", "img", "input", "hr", "link", "wbr"}


class _Check(HTMLParser):
    """Tags balance (SVG elements included); collects ids, tag counts and attributes that load things."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: set[str] = set()
        self.tags: dict[str, int] = {}
        self.loads: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for k in ("src", "href"):
            if k in a and not str(a[k]).startswith("#"):
                self.loads.append((tag, a[k]))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()


def _page(path) -> tuple[str, _Check]:
    text = path.read_text(encoding="utf-8")
    c = _Check()
    c.feed(text)
    c.close()
    return text, c


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    assert cli.main(["compile", "--seq", "4", "--out", str(root / "decoder")]) == 0
    assert cli.main(["compile", "--module", "grpo", "--seq", "4", "--out", str(root / "grpo")]) == 0
    return root


@pytest.mark.parametrize("name", ["decoder", "grpo"])
def test_every_dump_has_a_complete_valid_page(dumps, name):
    rep = json.loads((dumps / name / "report.json").read_text())
    text, c = _page(dumps / name / "report.html")
    assert text.startswith("<!DOCTYPE html>") and c.errors == [] and c.stack == []
    assert c.loads == [] and "<link" not in text and "@import" not in text     # nothing loaded from anywhere
    for p in rep["passes"]:
        assert f"pass-{p['name']}" in c.ids, p["name"]
    rows = re.search(r'<table class=sortable id=kernel-table>.*?<tbody>(.*?)</tbody>', text, re.S).group(1)
    assert rows.count("<tr>") == len(rep["kernels"])
    for k in rep["kernels"]:
        assert f"kernel-{k['name']}" in c.ids and f'href="#kernel-{k["name"]}"' in text
    assert '<span class="add">' in text and '<span class="del">' in text        # the IR diffs
    assert c.tags.get("svg") == 2 and c.tags.get("circle", 0) >= 1             # graph + roofline
    assert c.tags.get("rect", 0) >= len(rep["kernels"])                        # a box per kernel (+ frame)
    assert "table.sortable th" in text                                         # the sorting script
    assert len(text.encode()) < 5 << 20


def test_refusals_are_grouped_by_reason(dumps):
    rep = json.loads((dumps / "decoder" / "report.json").read_text())
    notes = next(p["notes"] for p in rep["passes"] if p["name"] == "fuse")
    refusals = [n for n in notes if n.startswith("cannot fuse")]
    text, _ = _page(dumps / "decoder" / "report.html")
    section = text.split("<h2 id=refusals>", 1)[1]
    counts = [int(n) for n in re.findall(r"<summary>(\d+) × ", section)]
    assert sum(counts) == len(refusals) > 0 and counts == sorted(counts, reverse=True)


def test_dump_text_is_escaped(dumps, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(dumps / "decoder", d)
    r = json.loads((d / "report.json").read_text())
    r["options"]["mla"] = "<script>alert(1)</script>"
    (d / "report.json").write_text(json.dumps(r))
    assert cli.main(["report", str(d)]) == 0
    text, c = _page(d / "report.html")
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert c.tags.get("script") == 1 and c.errors == []


def test_report_command_rerenders_and_refuses_non_dumps(dumps, tmp_path, capsys):
    d = tmp_path / "d"
    shutil.copytree(dumps / "grpo", d)
    (d / "report.html").unlink()
    assert cli.main(["report", str(d), "--html", str(tmp_path / "page.html")]) == 0
    assert (tmp_path / "page.html").read_text() == (dumps / "grpo" / "report.html").read_text()
    assert not (d / "report.html").exists()
    assert cli.main(["report", str(d)]) == 0 and (d / "report.html").exists()
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "is not a dsr dump" in capsys.readouterr().err



def test_the_full_width_v3_decoder_page_stays_under_5_mb(tmp_path):
    """DeepSeek-V3's own widths (bf16, meta weights: compile-only): 29 kernels with their Triton
    source and PTX, every pass's IR and diff. The page must stay small enough to open (< 5 MB)."""
    out = tmp_path / "v3"
    assert cli.main(["compile", "--model", "deepseek-v3", "--module", "decoder", "--dtype", "bf16",
                     "--quiet", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    text, c = _page(out / "report.html")
    assert c.errors == [] and c.stack == []
    assert all(f"kernel-{k['name']}" in c.ids for k in rep["kernels"]) and len(rep["kernels"]) >= 20
    assert all(f"pass-{p['name']}" in c.ids for p in rep["passes"])
    size = len(text.encode())
    assert size < 5 << 20, f"report.html of the V3 decoder is {size / 2**20:.2f} MiB"
