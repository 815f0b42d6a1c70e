"""The `fuse` pass: group the graph into kernels (`kernel @k{n}_{family}_{tag}` blocks + `call`s).

Where it sits: the last pass of the PIPELINE. It runs the grouping rules of `rules.py` in order
over one `Fuser` (fuser.py), then orders the groups topologically and writes each as a kernel
whose inputs are the values it reads and whose outputs are the values others read (or the graph
returns). Every refusal is noted as "cannot fuse X into Y: why".
"""
from __future__ import annotations

import heapq

from ...graph import Graph, Kernel, Node, Value
from ...ops import OPS, SOURCE
from ..manager import PassContext
from .fuser import Fuser, Group
from .rules import GROUP_RULES, kernel_tag


def fuse(g: Graph, ctx: PassContext) -> Graph:
    """Group nodes into kernels; the result's top level holds only `call` and `reshape` nodes."""
    if g.kernels:
        return g  # already fused
    f = Fuser(g, ctx)
    for rule in GROUP_RULES:
        rule(f)
    nodes = f.nodes
    const_nodes = {o.name: n for n in nodes if OPS[n.op].kind == SOURCE for o in n.outputs}
    graph_inputs = {v.name: v for v in g.inputs}
    # Order units (groups and loose nodes) topologically, stable by their last member.
    unit_of: dict[int, object] = {}
    units: list[object] = []
    for grp in f.groups:
        grp.members.sort()
        units.append(grp)
        for m in grp.members:
            unit_of[m] = grp
    for i, n in enumerate(nodes):
        returned = any(o.name in f.graph_outputs for o in n.outputs)  # a returned constant stays at top level
        if i not in unit_of and (OPS[n.op].kind != SOURCE or returned):
            unit_of[i] = i
            units.append(i)

    def members(u) -> list[int]:
        return u.members if isinstance(u, Group) else [u]

    deps: dict[int, set[int]] = {}
    uid = {id(u): k for k, u in enumerate(units)}
    for k, u in enumerate(units):
        d: set[int] = set()
        for m in members(u):
            for p in f.preds(m):
                pu = unit_of.get(p)
                if pu is not None and uid[id(pu)] != k:
                    d.add(uid[id(pu)])
        deps[k] = d
    order: list[int] = []
    done: set[int] = set()
    ready = sorted((max(members(u)), k) for k, u in enumerate(units) if not deps[k])
    heapq.heapify(ready)
    waiting = {k: set(v) for k, v in deps.items()}
    rev: dict[int, set[int]] = {}
    for k, d in deps.items():
        for x in d:
            rev.setdefault(x, set()).add(k)
    while ready:
        _, k = heapq.heappop(ready)
        order.append(k)
        done.add(k)
        for r in rev.get(k, ()):
            waiting[r].discard(k)
            if not waiting[r]:
                heapq.heappush(ready, (max(members(units[r])), r))
    if len(order) != len(units):
        raise AssertionError("fuse: kernel graph has a cycle")  # guarded by can_join; a bug if hit

    new_nodes: list[Node] = []
    kernels: list[Kernel] = []
    top_consts: set[str] = set()
    for k in order:
        u = units[k]
        if not isinstance(u, Group):
            n = nodes[u]
            if any(o.name in top_consts for o in n.outputs):
                continue  # a returned constant already emitted for a reshape
            for inp in n.inputs:  # a loose node (reshape) reading a constant keeps the constant
                if inp in const_nodes and inp not in top_consts:
                    new_nodes.append(const_nodes[inp])
                    top_consts.add(inp)
            new_nodes.append(n)
            top_consts.update(o.name for o in n.outputs if o.name in const_nodes)
            continue
        mset = set(u.members)
        produced = {o.name: o for m in u.members for o in nodes[m].outputs}
        body_inputs: list[Value] = []
        body_consts: list[Node] = []
        seen_in: set[str] = set()
        for m in u.members:
            for inp in nodes[m].inputs:
                if inp in produced or inp in seen_in:
                    continue
                seen_in.add(inp)
                if inp in const_nodes:
                    body_consts.append(const_nodes[inp])
                elif inp in graph_inputs:
                    body_inputs.append(graph_inputs[inp])
                else:
                    body_inputs.append(Value(inp, f.type_of(inp)))
        outs: list[Value] = []
        for m in u.members:
            for o in nodes[m].outputs:
                ext = any(x not in mset for x in f.users[m] if o.name in nodes[x].inputs)
                if ext or o.name in f.graph_outputs:
                    outs.append(o)
        if not outs:
            continue  # nothing reads the group's results: dead code (the pipeline runs dce first)
        ops = [nodes[m].op for m in u.members]
        kname = f"k{len(kernels) + 1}_{u.family}_{kernel_tag(u.family, ops)}"
        body = Graph(kname, tuple(body_inputs), tuple(body_consts) + tuple(nodes[m] for m in u.members),
                     tuple(o.name for o in outs))
        kernels.append(Kernel(kname, u.family, body))
        origin = nodes[u.anchor].origin
        new_nodes.append(Node(tuple(outs), "call", tuple(v.name for v in body_inputs), {"kernel": kname}, origin))
    ctx.count("fuse.kernels", len(kernels))
    return g.replace(nodes=tuple(new_nodes), kernels=tuple(kernels))
