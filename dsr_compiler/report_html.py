"""`report.html`: one self-contained page of a compile, rendered from a dump folder (DESIGN §3 layout).

Written by every dump (`dsrc compile --out DIR`, `cm.dump(DIR)`) next to report.json, and re-rendered
by `dsrc report DIR`. No network and no external file: inline CSS, a few lines of inline JS (table
sorting), SVG pictures. Sections: options and totals; passes with timings, notes and each pass's IR
diff against the previous one (collapsible, with the full IR); the fused graph (kernels as boxes,
tensors as edges, layered by networkx); the kernel table (sortable) with each kernel's template,
generated Triton source and PTX (collapsed); a roofline plot (one dot per kernel against the H200
limits); fusion refusals grouped by reason. Every text from the dump is HTML-escaped.
"""
from __future__ import annotations

import html
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from dsr_compiler.dump_files import MAX_TEXT_BYTES, ir_files, kernels_by_name, read_report, read_text

MAX_SOURCE_CHARS = 120_000       # per generated source or PTX shown; the dump holds the full file
MAX_PAGE_SOURCE_CHARS = 2_500_000  # all sources of one page (a full-width V3 layer stays under 5 MB)
_FAMILY_COLORS = ("#dbe9f6", "#fde2c8", "#d9f2d9", "#f6d5e5", "#e5dcf5", "#fff3bf", "#d7f0f0", "#eeeeee")
_FUSE_NOTE = re.compile(r"cannot fuse .*?: (?P<reason>.+)")

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
td:first-child,th:first-child,td.l{text-align:left}th{background:#f3f3f3;cursor:pointer;user-select:none}
pre{background:#f8f8f8;padding:6px;overflow:auto;max-height:40em;font-size:12px}
.add{color:#116611;background:#eaffea}.del{color:#aa1111;background:#ffecec}.hunk{color:#555}
details{margin:2px 0}summary{cursor:pointer}.muted{color:#777}svg text{font:10px monospace}
"""
_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.getAttribute('data-asc') !== '1';
    table.querySelectorAll('th').forEach(function(h){ h.removeAttribute('data-asc'); });
    if (asc) th.setAttribute('data-asc', '1');
    rows.sort(function(a, b){
      var x = a.cells[col].getAttribute('data-v') || a.cells[col].textContent;
      var y = b.cells[col].getAttribute('data-v') || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y, undefined, {numeric: true});
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return _e(v)


def render_dump_html(folder: str | Path) -> str:
    """The page of the dump in `folder` (its report.json, ir/ and kernels/)."""
    folder = Path(folder)
    rep = read_report(folder)
    kernels = list(kernels_by_name(rep, folder).values())
    budget = [MAX_PAGE_SOURCE_CHARS]
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>dsr report: "
             f"{_e(rep.get('graph', ''))}</title><style>{_CSS}</style></head><body>",
             f"<h1>dsr_compiler report: {_e(rep.get('graph', ''))}</h1>",
             _summary(rep), _passes(folder, rep), _graph_svg(folder, kernels), _kernel_table(kernels), _exchanges(rep),
             _kernel_sources(folder, kernels, budget), _roofline_svg(rep, kernels), _refusals(rep),
             f"<script>{_JS}</script></body></html>\n"]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- sections

def _summary(rep: dict) -> str:
    t = rep.get("totals") if isinstance(rep.get("totals"), dict) else {}
    rows = "".join(f"<tr><td>{_e(k)}</td><td class=l>{_e(v)}</td></tr>"
                   for k, v in (rep.get("options") or {}).items()) if isinstance(rep.get("options"), dict) else ""
    sizes = _e(rep.get("example_sizes", {}))
    return (f"<h2 id=options>Options and totals</h2><table><tbody>{rows}</tbody></table>"
            f"<p>example sizes {sizes}; {_num(t.get('kernels', 0))} kernels, {_num(t.get('bytes', 0))} modeled DRAM "
            f"bytes, {_num(t.get('flops', 0))} FLOPs, H200 roofline {_num(t.get('roofline_us_h200', 0.0))} us; "
            f"compile ms {_e(rep.get('compile_ms', {}))}</p>")


def _diff_html(text: str) -> str:
    out = []
    for line in text.splitlines():
        cls = ("hunk" if line.startswith("@@") else "add" if line.startswith("+") and not line.startswith("+++")
               else "del" if line.startswith("-") and not line.startswith("---") else "")
        out.append(f'<span class="{cls}">{_e(line)}</span>' if cls else _e(line))
    return "<pre>" + "\n".join(out) + "</pre>"


def _passes(folder: Path, rep: dict) -> str:
    files = ir_files(folder)
    rows, bodies = [], []
    for p in rep.get("passes", []):
        if not isinstance(p, dict):
            continue
        name = str(p.get("name", ""))
        notes = p.get("notes") or []
        rows.append(f"<tr><td class=l><a href=\"#pass-{_e(name)}\">{_e(p.get('index', ''))} {_e(name)}</a></td>"
                    f"<td>{_num(p.get('ms', 0.0))}</td><td class=l>{_e(p.get('rewrites') or '')}</td>"
                    f"<td>{len(notes)}</td></tr>")
        ir = files.get(name)
        diff_path = ir.with_suffix(".diff") if ir is not None else None
        diff = read_text(diff_path, MAX_TEXT_BYTES, folder) if diff_path is not None and diff_path.is_file() else ""
        full = read_text(ir, MAX_TEXT_BYTES, folder) if ir is not None else ""
        note_html = "".join(f"<li>{_e(n)}</li>" for n in notes)
        bodies.append(f"<details id=\"pass-{_e(name)}\"><summary>{_e(p.get('index', ''))} {_e(name)}: "
                      f"{len(diff.splitlines())} diff lines, {len(notes)} notes</summary>"
                      + (f"<ul>{note_html}</ul>" if note_html else "")
                      + f"<p>diff against the previous pass</p>{_diff_html(diff)}"
                      + f"<details><summary>IR after {_e(name)}</summary><pre>{_e(full)}</pre></details></details>")
    return ("<h2 id=passes>Passes</h2><table class=sortable><thead><tr><th>pass</th><th>ms</th><th>rewrites</th>"
            f"<th>notes</th></tr></thead><tbody>{''.join(rows)}</tbody></table>" + "".join(bodies))


def _graph_svg(folder: Path, kernels: list[dict]) -> str:
    """The fused graph (the last pass's IR top level) as layered boxes: one per kernel call / op."""
    import networkx as nx
    files = ir_files(folder)
    if not files:
        return ""
    from dsr_compiler.errors import DsrError
    from dsr_compiler.ir.parser import parse
    last = read_text(list(files.values())[-1], MAX_TEXT_BYTES, folder)
    try:
        ir = parse(last)                  # the project's own grammar: nothing in the text is evaluated
    except DsrError as e:
        return f"<h2 id=graph>Fused graph</h2><p>the last pass's IR does not parse: {_e(str(e)[:300])}</p>"
    g = nx.DiGraph()
    producer: dict[str, str] = {}
    for i, n in enumerate(ir.nodes):
        node = f"n{i}"
        call = n.op == "call"
        g.add_node(node, label=str(n.attr("kernel")) if call else n.op, call=call)
        for arg in n.inputs:
            if arg in producer:
                g.add_edge(producer[arg], node)
        for o in n.outputs:
            producer[o.name] = node
    if g.number_of_nodes() == 0:
        return ""
    families = {k.get("name"): k.get("family") for k in kernels}
    colors = {f: _FAMILY_COLORS[i % len(_FAMILY_COLORS)] for i, f in enumerate(sorted({str(v) for v in families.values()}))}
    layers = list(nx.topological_generations(g))
    w, h, gap_x, gap_y = 190, 34, 20, 30
    width = max(len(layer) for layer in layers) * (w + gap_x) + gap_x
    height = len(layers) * (h + gap_y) + gap_y
    pos = {n: (gap_x + j * (w + gap_x), gap_y + i * (h + gap_y)) for i, layer in enumerate(layers)
           for j, n in enumerate(layer)}
    items = []
    for a, b in g.edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        items.append(f'<line x1="{xa + w / 2}" y1="{ya + h}" x2="{xb + w / 2}" y2="{yb}" stroke="#888"/>')
    for n, (x, y) in pos.items():
        label = g.nodes[n]["label"]
        fam = families.get(label)
        fill = colors.get(str(fam), "#ffffff") if g.nodes[n]["call"] else "#ffffff"
        text = label if len(label) <= 30 else label[:29] + "…"
        items.append(f'<g><title>{_e(label)}{" (" + _e(fam) + ")" if fam else ""}</title>'
                     f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="4" fill="{fill}" stroke="#555"/>'
                     f'<text x="{x + 6}" y="{y + 14}">{_e(text)}</text>'
                     f'<text x="{x + 6}" y="{y + 27}" fill="#555">{_e(fam or "")}</text></g>')
    return (f"<h2 id=graph>Fused graph</h2><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" "
            f"height=\"{height}\" viewBox=\"0 0 {width} {height}\">{''.join(items)}</svg>")


_COLUMNS = (("name", "kernel"), ("family", "family"), ("backend", "backend"), ("grid_at_example", "grid"),
            ("num_warps", "warps"), ("registers", "regs"), ("spills", "spills"), ("shared_mem", "smem"),
            ("bytes_read", "bytes read"), ("bytes_written", "bytes written"), ("flops", "FLOPs"),
            ("roofline_us_h200", "roofline us"), ("roofline_peak", "peak"))


def _exchanges(rep: dict) -> str:
    """The expert-parallel exchanges (report.json `collectives`), when the plan has any."""
    ex = rep.get("collectives")
    if not isinstance(ex, list) or not ex:
        return ""
    cols = ("direction", "group", "n_ranks", "row_bytes", "capacity", "buffer_bytes", "sent_bytes", "payload_bytes")
    rows = []
    for e in ex:
        if not isinstance(e, dict):
            continue
        cells = "".join(f"<td data-v=\"{v}\">{_num(v)}</td>" if isinstance(v := e.get(c), (int, float))
                        and not isinstance(v, bool) else f"<td class=l>{_e(v if v is not None else '')}</td>"
                        for c in cols)
        rows.append(f"<tr>{cells}<td class=l>{_e(e.get('name', ''))}</td></tr>")
    head = "".join(f"<th>{_e(c)}</th>" for c in cols) + "<th>values</th>"
    return (f"<h2 id=exchanges>Expert-parallel exchanges</h2><table class=sortable><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table><p class=muted>fixed capacity: each exchange moves its whole "
            f"buffer (sent_bytes leave this rank); payload_bytes are the slot rows routing fills</p>")


def _kernel_table(kernels: list[dict]) -> str:
    head = "".join(f"<th>{_e(t)}</th>" for _, t in _COLUMNS) + "<th>source nodes</th>"
    rows = []
    for k in kernels:
        cells = []
        for f, _ in _COLUMNS:
            v = k.get(f)
            if f == "name":
                cells.append(f"<td class=l><a href=\"#kernel-{_e(v)}\">{_e(v)}</a></td>")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f"<td data-v=\"{v}\">{_num(v)}</td>")
            else:
                cells.append(f"<td class=l>{_e(v if v is not None else '')}</td>")
        nodes = ", ".join(str(s) for s in (k.get("source_nodes") or []))
        cells.append(f"<td class=l><a href=\"#pass-fuse\">{_e(nodes)}</a></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<h2 id=kernels>Kernels</h2><table class=sortable id=kernel-table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table><p class=muted>click a header to sort</p>")


def _source_block(folder: Path, file: str, what: str, budget: list[int]) -> str:
    p = folder / "kernels" / file
    if p.is_symlink() or not p.is_file():
        return ""
    text = read_text(p, MAX_TEXT_BYTES, folder)
    full = len(text)
    keep = max(0, min(full, MAX_SOURCE_CHARS, budget[0]))
    budget[0] -= keep
    cut = f" (first {keep:,} of {full:,} characters; the whole file is kernels/{_e(file)})" if keep < full else ""
    return f"<details><summary>{_e(what)}{cut}</summary><pre>{_e(text[:keep])}</pre></details>"


def _kernel_sources(folder: Path, kernels: list[dict], budget: list[int]) -> str:
    out = ["<h2 id=sources>Kernel sources</h2>"]
    for k in kernels:
        name = str(k.get("name"))
        out.append(f"<details id=\"kernel-{_e(name)}\"><summary>{_e(name)}: template {_e(k.get('template'))}"
                   + (f", PTX template {_e(k.get('ptx_template'))}" if k.get("ptx_template") else "") + "</summary>")
        out.append(_source_block(folder, f"{name}.py", "Triton source", budget))
        if k.get("ptx_template"):
            out.append(_source_block(folder, f"{name}.ptx", "PTX (from the PTX template)", budget))
            out.append(_source_block(folder, f"{name}.triton.ptx", "PTX of the Triton twin", budget))
        else:
            out.append(_source_block(folder, f"{name}.ptx", "PTX", budget))
        out.append("</details>")
    return "".join(out)


def _roofline_svg(rep: dict, kernels: list[dict]) -> str:
    """Arithmetic intensity (FLOP/byte) vs attainable TFLOP/s, log-log, H200 ceilings, a dot per kernel."""
    h200 = rep.get("h200") if isinstance(rep.get("h200"), dict) else {}
    bw = float(h200.get("bytes_per_s", 4.8e12))
    peaks = {k[len("flops_"):]: float(v) for k, v in h200.items() if k.startswith("flops_") and isinstance(v, (int, float))}
    w, h, m = 640, 360, 50
    x0, x1, y0, y1 = -3.0, 4.0, -3.0, 4.0          # log10 ranges: FLOP/byte, TFLOP/s

    def px(ai: float) -> float:
        return m + (math.log10(ai) - x0) / (x1 - x0) * (w - 2 * m)

    def py(tf: float) -> float:
        return h - m - (math.log10(tf) - y0) / (y1 - y0) * (h - 2 * m)

    items = [f'<rect x="{m}" y="{m}" width="{w - 2 * m}" height="{h - 2 * m}" fill="none" stroke="#999"/>']
    for e in range(int(x0), int(x1) + 1):
        items.append(f'<text x="{px(10.0 ** e) - 8}" y="{h - m + 14}">1e{e}</text>')
    for e in range(int(y0), int(y1) + 1):
        items.append(f'<text x="{m - 34}" y="{py(10.0 ** e) + 3}">1e{e}</text>')
    items.append(f'<text x="{w / 2 - 60}" y="{h - 12}">FLOP / DRAM byte</text>'
                 f'<text x="4" y="{m - 10}">TFLOP/s at the roofline</text>')
    for name, peak in sorted(peaks.items()):
        pts = []
        for i in range(71):
            ai = 10 ** (x0 + i * (x1 - x0) / 70)
            tf = min(bw * ai, peak) / 1e12
            if 10 ** y0 <= tf <= 10 ** y1:
                pts.append(f"{px(ai):.1f},{py(tf):.1f}")
        items.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="#bbb"/>'
                     f'<text x="{w - m - 70}" y="{py(min(peak / 1e12, 10 ** y1)) - 3}" fill="#888">{_e(name)} peak</text>')
    for k in kernels:
        b = (k.get("bytes_read") or 0) + (k.get("bytes_written") or 0)
        f, t = k.get("flops") or 0, k.get("roofline_us_h200") or 0
        if not all(isinstance(v, (int, float)) for v in (b, f, t)) or b <= 0 or f <= 0 or t <= 0:
            continue
        ai, tf = f / b, f / (t * 1e-6) / 1e12
        ai = min(max(ai, 10 ** x0), 10 ** x1)
        tf = min(max(tf, 10 ** y0), 10 ** y1)
        items.append(f'<circle cx="{px(ai):.1f}" cy="{py(tf):.1f}" r="4" fill="#3a78c2" fill-opacity="0.7">'
                     f'<title>{_e(k.get("name"))}: {ai:.3g} FLOP/B, {tf:.3g} TFLOP/s</title></circle>')
    return (f"<h2 id=roofline>Roofline (H200)</h2><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" "
            f"height=\"{h}\" viewBox=\"0 0 {w} {h}\">{''.join(items)}</svg>")


def _refusals(rep: dict) -> str:
    groups: dict[str, list[str]] = defaultdict(list)
    for p in rep.get("passes", []):
        if isinstance(p, dict) and p.get("name") == "fuse":
            for n in p.get("notes") or []:
                m = _FUSE_NOTE.match(str(n))
                if m:
                    groups[m.group("reason")].append(str(n))
    if not groups:
        return "<h2 id=refusals>Fusion refusals</h2><p>none</p>"
    out = ["<h2 id=refusals>Fusion refusals</h2>"]
    for reason, notes in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        items = "".join(f"<li>{_e(n)}</li>" for n in notes)
        out.append(f"<details><summary>{len(notes)} × {_e(reason)}</summary><ul>{items}</ul></details>")
    return "".join(out)


__all__ = ["render_dump_html"]
