"""A graph as Graphviz dot (`dsrc ir --dot`): kernels as boxes, other top-level ops as rounded boxes,
graph inputs as ellipses (parameters grey), outputs as double octagons; each edge is a tensor, labelled
with its type (`bf16[T,7168]`). Only names, op and family names and types reach the text, each quoted
and escaped, so the output is valid dot for any graph.
"""
from __future__ import annotations

from .graph import Graph
from .types import TensorType


def _q(text: str) -> str:
    """A dot double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(g: Graph) -> str:
    """The top level of `g` in dot (the kernels' bodies are not expanded)."""
    kernels = {k.name: k for k in g.kernels}
    params = set(g.params)
    lines = [f"digraph {_q(g.name)} {{", "  rankdir=TB;", '  node [fontname="monospace", fontsize=10];',
             '  edge [fontname="monospace", fontsize=9];']
    producer: dict[str, str] = {}
    types: dict[str, TensorType] = {}
    for v in g.inputs:
        node = f"in:{v.name}"
        style = ', style=filled, fillcolor="#e8e8e8"' if v.name in params else ""
        lines.append(f"  {_q(node)} [shape=ellipse, label={_q('%' + v.name)}{style}];")
        producer[v.name] = node
        types[v.name] = v.type
    for i, n in enumerate(g.nodes):
        node = f"n{i}"
        if n.op == "call":
            name = str(n.attr("kernel"))
            k = kernels.get(name)
            label = f"{name}\n{k.family} ({len(k.body.nodes)} ops)" if k is not None else name
            lines.append(f'  {_q(node)} [shape=box, style=filled, fillcolor="#dbe9f6", label={_q(label)}];')
        else:
            lines.append(f"  {_q(node)} [shape=box, style=rounded, label={_q(n.op)}];")
        for src in n.inputs:
            if src in producer:
                lines.append(f"  {_q(producer[src])} -> {_q(node)} [label={_q(str(types[src]))}];")
        for o in n.outputs:
            producer[o.name] = node
            types[o.name] = o.type
    for j, o in enumerate(g.outputs):
        node = f"out{j}"
        lines.append(f"  {_q(node)} [shape=doubleoctagon, label={_q('%' + o)}];")
        if o in producer:
            lines.append(f"  {_q(producer[o])} -> {_q(node)} [label={_q(str(types[o]))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


__all__ = ["to_dot"]
