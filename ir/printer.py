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
"""
from __future__ import annotations

from typing import Any

import sympy

from .graph import Graph, Kernel, Node
from .ops import float_repr
from .types import DType, dim_str

IR_VERSION = 1


def format_attr(v: Any) -> str:
    if v is None or isinstance(v, bool):
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return float_repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, DType):
        return v.value
    if isinstance(v, sympy.Expr):
        return dim_str(v)
    if isinstance(v, tuple):
        inner = ", ".join(format_attr(x) for x in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    raise TypeError(f"cannot print attribute {v!r}")


def format_node(n: Node) -> str:
    lhs = ", ".join(f"%{o.name}" for o in n.outputs)
    types = ", ".join(str(o.type) for o in n.outputs)
    args = [f"%{i}" for i in n.inputs]
    attrs = list(n.attrs)
    if n.op == "call":
        kname = dict(attrs)["kernel"]
        rest = [f"{k}={format_attr(v)}" for k, v in attrs if k != "kernel"]
        rhs = f"call @{kname}({', '.join(args + rest)})"
    else:
        rhs = f"{n.op}({', '.join(args + [f'{k}={format_attr(v)}' for k, v in attrs])})"
    line = f"{lhs} : {types} = {rhs}" if n.outputs else rhs
    if n.origin:
        line += f"  # {n.origin}"
    return line


def _signature(g: Graph) -> str:
    ps = set(g.params)
    parts = [("param " if v.name in ps else "") + f"%{v.name} : {v.type}" for v in g.inputs]
    return ", ".join(parts)


def _body(g: Graph, indent: str = "  ") -> list[str]:
    lines = [indent + format_node(n) for n in g.nodes]
    lines.append(indent + "return " + ", ".join(f"%{o}" for o in g.outputs))
    return lines


def format_kernel(k: Kernel) -> list[str]:
    attrs = [f'family={format_attr(k.family)}'] + [f"{a}={format_attr(v)}" for a, v in k.attrs]
    lines = [f"kernel @{k.name}({_signature(k.body)}) {' '.join(attrs)} {{"]
    lines += _body(k.body)
    lines.append("}")
    return lines


def print_graph(g: Graph, header: str | None = None) -> str:
    lines: list[str] = []
    if header is not None:
        lines.append(header)
    for k in g.kernels:
        lines += format_kernel(k)
        lines.append("")
    lines.append(f"graph {g.name}({_signature(g)}) {{")
    lines += _body(g)
    lines.append("}")
    return "\n".join(lines) + "\n"


def header_line(g: Graph, index: int | None = None, total: int | None = None, pass_name: str | None = None,
                ms: float | None = None, verified: bool = True) -> str:
    parts = [f"# dsr-ir {IR_VERSION}", f"graph {g.name}"]
    if pass_name is not None:
        t = f" ({ms:.1f} ms)" if ms is not None else ""
        parts.append(f"after {index}/{total} {pass_name}{t}")
    parts.append("verify ok" if verified else "verify FAILED")
    return " | ".join(parts)
