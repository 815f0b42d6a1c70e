"""Text IR printer: deterministic, typed, carries names and origins, parses back.

Format (one statement a line; `# origin` trails each node):

    # dsr-ir 1 | graph mlp | after 3/6 fuse (0.7 ms) | verify ok
    kernel @k1_reduction_rms_norm(%x : f32[T,256], %w : f32[256]) family="reduction" {
      %y : f32[T,256] = rms_norm(%x, %w, eps=1e-06)  # norm
      return %y
    }

    graph mlp(%x : f32[T,256], param %norm.weight : f32[256]) {
      %y : f32[T,256] = call @k1_reduction_rms_norm(%x, %norm.weight)  # norm
      return %y
    }

The formatting functions live in ir/graph.py (so `str(graph)` needs no import of this module) and
are re-exported here with the header line.
"""
from __future__ import annotations

from .graph import Graph, float_repr, format_attr, format_kernel, format_node, print_graph

IR_VERSION = 1


def header_line(g: Graph, index: int | None = None, total: int | None = None, pass_name: str | None = None,
                ms: float | None = None, verified: bool = True) -> str:
    parts = [f"# dsr-ir {IR_VERSION}", f"graph {g.name}"]
    if pass_name is not None:
        t = f" ({ms:.1f} ms)" if ms is not None else ""
        parts.append(f"after {index}/{total} {pass_name}{t}")
    parts.append("verify ok" if verified else "verify FAILED")
    return " | ".join(parts)


__all__ = ["IR_VERSION", "float_repr", "format_attr", "format_kernel", "format_node", "header_line", "print_graph"]
