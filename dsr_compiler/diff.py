"""`dsrc diff DIR_A DIR_B`: what changed between two compiles, read from their dumps (DESIGN §3 layout).

Compared: the options, the pass list (rewrite counts, notes, whether the IR after the pass changed,
with its line counts), the kernels matched by name (added, removed, and for the common ones the
fields below, `source` when the generated code differs), and the totals. Timings are not compared
(they vary from run to run). Dumps are read as untrusted input: only folders carrying the dump
marker, JSON and text files of bounded size, no symlinks followed, nothing evaluated.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsr_compiler.dump import MARKER, is_dump
from dsr_compiler.dump_files import MAX_TEXT_BYTES, DumpReadError, ir_files, kernels_by_name, read_report, read_text

#: kernel fields compared, in the order they are printed
KERNEL_FIELDS = ("family", "backend", "template", "grid", "num_warps", "registers", "spills", "shared_mem",
                 "bytes_read", "bytes_written", "flops", "roofline_us_h200", "roofline_peak")


class DiffError(DumpReadError):
    """A folder given to `dsrc diff` / `dsrc report` is not a dump."""


@dataclass
class DumpDiff:
    """The differences between dump `a` and dump `b` (empty lists: nothing changed there)."""

    a: str
    b: str
    options: list[tuple[str, Any, Any]] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)
    kernels_added: list[str] = field(default_factory=list)
    kernels_removed: list[str] = field(default_factory=list)
    kernels_changed: list[tuple[str, list[tuple[str, Any, Any]]]] = field(default_factory=list)
    totals: list[tuple[str, Any, Any]] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not (self.options or self.passes or self.kernels_added or self.kernels_removed
                    or self.kernels_changed or self.totals)

    def text(self) -> str:
        lines = [f"dsrc diff {self.a} {self.b}"]
        if self.same:
            return "\n".join(lines + ["no differences (options, passes, IR, kernels, totals)"]) + "\n"
        if self.options:
            lines.append("options:")
            lines += [f"  {k}: {_show(x)} -> {_show(y)}" for k, x, y in self.options]
        if self.passes:
            lines.append("passes:")
            lines += [f"  {p}" for p in self.passes]
        if self.kernels_added or self.kernels_removed or self.kernels_changed:
            lines.append("kernels:")
            lines += [f"  + {k}" for k in self.kernels_added]
            lines += [f"  - {k}" for k in self.kernels_removed]
            for name, changes in self.kernels_changed:
                lines.append(f"  ~ {name}: " + ", ".join(f"{f} {_show(x)} -> {_show(y)}" if f != "source" else "source"
                                                          for f, x, y in changes))
        if self.totals:
            lines.append("totals:")
            lines += [f"  {k}: {_show(x)} -> {_show(y)}{_ratio(x, y)}" for k, x, y in self.totals]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        """The same differences as one self-contained page (every text escaped)."""
        import html as h

        def e(x: Any) -> str:
            return h.escape(str(x), quote=True)
        body = [f"<h1>dsrc diff {e(self.a)} {e(self.b)}</h1>"]
        if self.same:
            body.append("<p>no differences (options, passes, IR, kernels, totals)</p>")

        def table(title: str, rows: list[tuple[str, Any, Any]]) -> None:
            if rows:
                cells = "".join(f"<tr><td>{e(k)}</td><td>{e(_show(x))}</td><td>{e(_show(y))}</td></tr>" for k, x, y in rows)
                body.append(f"<h2>{title}</h2><table><tr><th></th><th>A</th><th>B</th></tr>{cells}</table>")
        table("options", self.options)
        if self.passes:
            body.append("<h2>passes</h2><ul>" + "".join(f"<li><code>{e(p)}</code></li>" for p in self.passes) + "</ul>")
        if self.kernels_added or self.kernels_removed or self.kernels_changed:
            items = [f'<li class="add">+ {e(k)}</li>' for k in self.kernels_added]
            items += [f'<li class="del">- {e(k)}</li>' for k in self.kernels_removed]
            items += [f"<li>~ {e(n)}: " + ", ".join("source" if f == "source" else f"{e(f)} {e(_show(x))} → {e(_show(y))}"
                                                   for f, x, y in ch) + "</li>" for n, ch in self.kernels_changed]
            body.append("<h2>kernels</h2><ul>" + "".join(items) + "</ul>")
        table("totals", self.totals)
        css = ("body{font:14px/1.4 system-ui,sans-serif;margin:1.5em}td,th{border:1px solid #ccc;padding:2px 6px}"
               "table{border-collapse:collapse}.add{color:#116611}.del{color:#aa1111}")
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>dsrc diff</title>'
                f"<style>{css}</style></head><body>{''.join(body)}</body></html>\n")


def diff_dumps(a: str | os.PathLike, b: str | os.PathLike) -> DumpDiff:
    """Compare two dump folders; DiffError if either is not a readable dump."""
    ra, rb = _report(Path(a)), _report(Path(b))
    d = DumpDiff(str(a), str(b))
    d.options = _dict_changes(ra.get("options"), rb.get("options"))
    d.passes = _pass_changes(Path(a), Path(b), ra, rb)
    ka, kb = kernels_by_name(ra, a), kernels_by_name(rb, b)
    d.kernels_added = [k for k in kb if k not in ka]
    d.kernels_removed = [k for k in ka if k not in kb]
    for name in (k for k in ka if k in kb):
        x, y = ka[name], kb[name]
        changes = [(f, x.get(f), y.get(f)) for f in KERNEL_FIELDS if x.get(f) != y.get(f)]
        if x.get("spec_hash") != y.get("spec_hash") or _source(Path(a), name) != _source(Path(b), name):
            changes.append(("source", None, None))
        if changes:
            d.kernels_changed.append((name, changes))
    d.totals = _dict_changes(ra.get("totals"), rb.get("totals"))
    return d


# ----------------------------------------------------------------------------- reading a dump

def _report(path: Path) -> dict:
    if not is_dump(path):
        raise DiffError(f"{path} is not a dsr dump (a folder with the {MARKER} marker that `dsrc compile --out` "
                        "writes last)", hint="pass folders written by `dsrc compile --out DIR` or `cm.dump(DIR)`")
    return read_report(path)


def _source(dump: Path, kernel: str) -> str | None:
    """The generated Triton source of `kernel` in the dump, or None if absent."""
    p = dump / "kernels" / f"{kernel}.py"
    if p.is_symlink() or not p.is_file():
        return None
    return read_text(p, MAX_TEXT_BYTES, dump)


# ----------------------------------------------------------------------------- comparing

def _dict_changes(x: Any, y: Any) -> list[tuple[str, Any, Any]]:
    x = x if isinstance(x, dict) else {}
    y = y if isinstance(y, dict) else {}
    return [(k, x.get(k), y.get(k)) for k in dict.fromkeys([*x, *y]) if x.get(k) != y.get(k)]


def _pass_changes(a: Path, b: Path, ra: dict, rb: dict) -> list[str]:
    pa = {p.get("name"): p for p in ra.get("passes", []) if isinstance(p, dict)}
    pb = {p.get("name"): p for p in rb.get("passes", []) if isinstance(p, dict)}
    ia, ib = ir_files(a), ir_files(b)
    out = []
    for name in dict.fromkeys([*pa, *pb]):
        if name not in pb:
            out.append(f"- {name} (only in A)")
            continue
        if name not in pa:
            out.append(f"+ {name} (only in B)")
            continue
        what = []
        if pa[name].get("rewrites") != pb[name].get("rewrites"):
            what.append(f"rewrites {_show(pa[name].get('rewrites'))} -> {_show(pb[name].get('rewrites'))}")
        na, nb = pa[name].get("notes") or [], pb[name].get("notes") or []
        added = [n for n in nb if n not in na]
        removed = [n for n in na if n not in nb]
        if added or removed:
            what.append(f"notes +{len(added)} -{len(removed)}")
        if name in ia and name in ib:
            ta, tb = read_text(ia[name], MAX_TEXT_BYTES, a), read_text(ib[name], MAX_TEXT_BYTES, b)
            if ta != tb:
                plus = minus = 0
                for line in difflib.unified_diff(ta.splitlines(), tb.splitlines(), lineterm="", n=0):
                    if line.startswith("+") and not line.startswith("+++"):
                        plus += 1
                    elif line.startswith("-") and not line.startswith("---"):
                        minus += 1
                what.append(f"IR +{plus} -{minus} lines")
        if what:
            out.append(f"~ {name}: " + "; ".join(what))
    return out


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        s = json.dumps(v, sort_keys=True)
        return s if len(s) <= 120 else s[:117] + "..."
    return "(absent)" if v is None else str(v)


def _ratio(x: Any, y: Any) -> str:
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool) and x:
        return f" ({y / x:.3g}x)"
    return ""


__all__ = ["DiffError", "DumpDiff", "KERNEL_FIELDS", "diff_dumps"]
