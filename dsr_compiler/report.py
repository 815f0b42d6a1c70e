"""The kernel report of a compiled module: report.json's content, the H200 roofline, the summary
table `dsrc compile` prints, and the DSR_DEBUG ladder written to stderr.

Sits beside the front door (api.py): `CompiledModule.report()` is `build_report(cm)`, the dump
(dump.py) writes it, the CLI prints `summary(cm.report())`. Modeled bytes and FLOPs are the
KernelSpec's sympy expressions evaluated at the example's sizes.
"""
from __future__ import annotations

from typing import Any

import sympy

from dsr_compiler import knobs
from dsr_compiler.codegen.families import family
from dsr_compiler.ir.printer import header_line, print_graph

H200 = {"bytes_per_s": 4.8e12, "flops_bf16": 989e12, "flops_fp8": 1979e12, "flops_f32": 67e12}


def build_report(cm: Any) -> dict[str, Any]:
    """report.json of a CompiledModule (DESIGN §3): graph, options, pass timings and notes, and per
    kernel its template, source nodes, backend, grid, registers, spills, shared memory, modeled bytes,
    FLOPs and H200 roofline."""
    env = {sympy.Symbol(k, integer=True, positive=True): v for k, v in cm.example_env.items()}
    kernels = []
    for k in cm.kernels:
        s, c = k.spec, k.compiled
        br = _eval(s.bytes_read, env)
        bw = _eval(s.bytes_written, env)
        fl = _eval(s.flops, env)
        peak_key = "flops_" + family(s.family).peak_of(s)
        roof = max((br + bw) / H200["bytes_per_s"], fl / H200[peak_key]) * 1e6
        p = k.ptx
        kernels.append({
            "name": s.name, "template": s.template, "family": s.family, "backend": k.backend,
            "source_nodes": list(s.source_nodes), "grid": list(s.grid),
            "grid_at_example": [_eval(x, env) for x in s.grid],
            "num_warps": s.num_warps, "registers": (p or c).registers, "spills": (p or c).spills,
            "shared_mem": (p or c).shared_mem, "bytes_read": br, "bytes_written": bw, "flops": fl,
            **({"ptx_template": _ptx_template(s.family),
                "triton_twin": {"template": s.template, "registers": c.registers, "spills": c.spills,
                                "shared_mem": c.shared_mem},
                "interpret_runs": "the Triton twin (same KernelSpec): the interpreter cannot run PTX"}
               if p is not None else {}),
            **({"ptx_fallback": k.ptx_note} if k.ptx_note else {}),
            "bytes_read_expr": s.bytes_read, "bytes_written_expr": s.bytes_written, "flops_expr": s.flops,
            "roofline_us_h200": roof, "roofline_peak": peak_key, "compile_ms": round(k.compile_ms, 1), "cached": k.cached,
            "spec_hash": s.hash(),
        })
    return {
        "graph": cm.graph.name,
        "options": cm.options,
        "example_sizes": cm.example_env,
        "passes": [{"index": r.index, "name": r.name, "ms": round(r.ms, 3), "notes": list(r.notes),
                    "rewrites": dict(r.counts)} for r in cm.passes],
        "compile_ms": {k: round(v, 1) for k, v in cm.compile_ms.items()},
        "kernels": kernels,
        "totals": {"kernels": len(kernels), "bytes": sum(k["bytes_read"] + k["bytes_written"] for k in kernels),
                   "flops": sum(k["flops"] for k in kernels),
                   "roofline_us_h200": sum(k["roofline_us_h200"] for k in kernels)},
        "h200": H200,
        "derived_params": cm.derived_params,
        **_collectives(cm),
    }


def _collectives(cm: Any) -> dict[str, Any]:
    """report.json's `collectives` (expert parallelism: dsr_compiler/ep.py `exchanges`), when there are any."""
    if not any(n.op == "all_to_all" for n in cm.graph.nodes):
        return {}
    from dsr_compiler.ep import exchanges
    ex = exchanges(cm.graph, cm.example_env)
    return {"collectives": ex,
            "collective_totals": {"exchanges": len(ex), "buffer_bytes": sum(e["buffer_bytes"] for e in ex),
                                  "sent_bytes": sum(e["sent_bytes"] for e in ex),
                                  "payload_bytes": sum(e.get("payload_bytes", 0) for e in ex),
                                  "mode": ("exact size: the row counts first, one host sync per exchange"
                                           if any(e.get("mode") == "exact" for e in ex) else
                                           "fixed capacity (no host sync): every exchange moves its whole buffer")}}


def _ptx_template(name: str) -> str:
    return family(name).ptx.template


def _eval(expr: Any, env: dict) -> int | float:
    from dsr_compiler.ir.types import to_expr
    e = to_expr(expr)
    v = e.subs({sympy.Symbol(s.name, integer=True, positive=True): val for s, val in env.items()}) if e.free_symbols else e
    return int(v) if v.is_Integer else float(v)


def debug_log(cm: Any) -> None:
    """The DSR_DEBUG ladder (STYLE.md): 1 summary, 2 timings, 3 fusion decisions, 4 generated source,
    5 IR per pass, 6 rewrite matches, 7 PTX. Written to stderr."""
    import sys
    level = knobs.get("DSR_DEBUG")
    w = sys.stderr.write
    w(f"[dsr] {cm.graph.name}: {len(cm.kernels)} kernels "
      f"({', '.join(k.spec.name for k in cm.kernels)}); compile {cm.compile_ms['total']:.0f} ms\n")
    total = len(cm.passes) - 1
    for r in cm.passes:
        if level >= 2:
            w(f"[dsr] pass {r.index}/{total} {r.name}: {r.ms:.2f} ms\n")
        if level >= 3 and r.index > 0:          # trace notes were printed at trace time (level 1)
            for note in r.notes:
                w(f"[dsr]   {note}\n")
        if level >= 6:
            for rule, n in r.counts:
                w(f"[dsr]   rewrite {rule}: {n} match(es)\n")
        if level >= 5:
            w(print_graph(r.graph, header_line(r.graph, r.index, total, r.name, r.ms)))
    for k in cm.kernels:
        if level >= 2:
            w(f"[dsr] kernel {k.spec.name}: {k.compile_ms:.0f} ms{' (cache hit)' if k.cached else ''}\n")
        if level >= 4:
            w(f"[dsr] ---- {k.spec.name} source ----\n{k.source}\n")
        if level >= 7:
            w(f"[dsr] ---- {k.spec.name} PTX ----\n{k.compiled.ptx}\n")


def summary(rep: dict[str, Any]) -> str:
    """The kernel table `dsrc compile` prints: one row per kernel, then the totals."""
    rows = [("kernel", "family", "backend", "ops", "regs", "spills", "smem", "bytes", "MFLOP", "roof us")]
    for k in rep["kernels"]:
        rows.append((k["name"], k["family"], k.get("backend", "triton"), str(len(k["source_nodes"])),
                     str(k["registers"]), str(k["spills"]),
                     str(k["shared_mem"]), str(k["bytes_read"] + k["bytes_written"]), f"{k['flops'] / 1e6:.2f}",
                     f"{k['roofline_us_h200']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    t = rep["totals"]
    lines.append(f"{t['kernels']} kernels, {t['bytes']} bytes, {t['flops'] / 1e6:.2f} MFLOP, "
                 f"roofline {t['roofline_us_h200']:.2f} us on H200 (sizes {rep['example_sizes']}); "
                 f"compile {rep['compile_ms']['total']:.0f} ms")
    for e in rep.get("collectives", ()):
        pay = f", payload {e['payload_bytes']} bytes ({e['payload_rows']} slot rows)" if "payload_bytes" in e else ""
        lines.append(f"exchange {e['direction']} over {e['group']} ({e['n_ranks']} ranks): buffer {e['buffer_bytes']} bytes "
                     f"({e['n_ranks']} x C={e['capacity']} rows of {e['row_bytes']} B), this rank sends {e['sent_bytes']} "
                     f"bytes per step{pay}")
    return "\n".join(lines)


__all__ = ["H200", "build_report", "debug_log", "summary"]
