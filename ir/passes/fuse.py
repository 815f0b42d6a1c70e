"""Fusion: group the graph into kernels (`kernel @k{n}_{family}_{tag}` blocks + `call`s).

Families (what codegen/lower.py accepts):
  gemm       one linear/matmul, or two linears sharing x (SwiGLU), plus a pointwise epilogue
  reduction  a pointwise prologue, one last-dim reduction (rms_norm, softmax, sum, ...), an epilogue
  attention  one attention op
  pointwise  a connected chain of pointwise ops (layout ops allowed on kernel inputs)
`reshape` stays outside kernels: buffers are contiguous, so it is a free view at run time.

Legality: a node joins a group only if no path leaves the group and comes back to it
(no cycle in the graph of kernels), and every value a group makes that someone else
reads becomes a kernel output. Every refusal is logged as "cannot fuse X into Y: why".
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from ..graph import Graph, Kernel, Node, Value
from ..ops import ATTENTION, GEMM, LAYOUT, OPS, POINTWISE, REDUCTION, SOURCE
from ..types import TensorType
from .manager import PassContext

LAST_DIM_REDUCTIONS = ("rms_norm", "softmax", "log_softmax", "sum", "mean", "amax")
INDEX_MAP_OPS = ("permute", "expand", "slice", "reshape")
VIEW_OPS = ("permute", "expand", "slice")   # index maps a kernel can apply to an input (reshape stays a free view)

# Grouping rules of other kernel families (e.g. FP8, ir/passes/fuse_fp8.py), run in order before
# the generic ones; a rule claims nodes with `new_group`/`add`/`can_join`, the generic steps skip them.
GROUP_RULES: list = []
# family -> fn(ops of the group) -> kernel name tag, for families registered by such modules.
TAGGERS: dict = {}


def _same_shape(a: TensorType, b: TensorType) -> bool:
    return a.rank == b.rank and all(sympy.simplify(x - y) == 0 for x, y in zip(a.shape, b.shape))


@dataclass
class _Group:
    family: str
    members: list[int] = field(default_factory=list)  # node indices
    anchor: int = -1


class _Fuser:
    def __init__(self, g: Graph, ctx: PassContext):
        self.g, self.ctx = g, ctx
        self.nodes = list(g.nodes)
        self.index_of = {o.name: i for i, n in enumerate(self.nodes) for o in n.outputs}
        self.users: dict[int, set[int]] = {i: set() for i in range(len(self.nodes))}
        for i, n in enumerate(self.nodes):
            for inp in n.inputs:
                j = self.index_of.get(inp)
                if j is not None:
                    self.users[j].add(i)
        self.group_of: dict[int, _Group] = {}
        self.groups: list[_Group] = []
        self.graph_outputs = set(g.outputs)

    # --- helpers
    def op_kind(self, i: int) -> str:
        return OPS[self.nodes[i].op].kind

    def name(self, i: int) -> str:
        n = self.nodes[i]
        return f"%{n.outputs[0].name} = {n.op}" if n.outputs else n.op

    def preds(self, i: int) -> set[int]:
        return {self.index_of[x] for x in self.nodes[i].inputs if x in self.index_of}

    def _reaches_via_outside(self, members: set[int], target: int, own: _Group | None = None) -> bool:
        """Is there a path members -> (node outside members) -> ... -> target?

        Another group runs as one kernel, so reaching any of its members reaches all of them
        (kernel-level edges, not only node-level ones, can close a cycle)."""
        stack = [u for m in members for u in self.users[m] if u not in members and u != target]
        seen: set[int] = set()
        while stack:
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            other = self.group_of.get(x)
            if other is not None and other is not own:
                stack.extend(m for m in other.members if m not in seen and m not in members and m != target)
            # No pruning of nodes after `target` in graph order: a later node can feed a group one of
            # whose members comes before `target`, and reaching one member of a kernel reaches them all
            # (found by the random-graph fuzz: three gemm/reduction kernels in a cycle).
            if target in self.users[x]:
                return True
            stack.extend(u for u in self.users[x] if u not in members)
        return False

    def can_join(self, grp: _Group, i: int, why_prefix: str) -> bool:
        if i in self.group_of:
            return False
        members = set(grp.members)
        # cycle check both ways: group -> outside -> i, and i -> outside -> group
        if self._reaches_via_outside(members, i, grp):
            self.ctx.note(f"cannot fuse {self.name(i)} into {why_prefix}: a value it needs is computed "
                          f"outside the kernel from the kernel's own results (would create a cycle)")
            return False
        for m in members:
            if self._reaches_via_outside({i}, m, grp):
                self.ctx.note(f"cannot fuse {self.name(i)} into {why_prefix}: the kernel needs a value computed "
                              f"outside it from this node's result (would create a cycle)")
                return False
        return True

    def add(self, grp: _Group, i: int) -> None:
        grp.members.append(i)
        self.group_of[i] = grp

    def new_group(self, family: str, anchor: int) -> _Group:
        grp = _Group(family, [], anchor)
        self.groups.append(grp)
        self.add(grp, anchor)
        return grp

    # --- fusion rules
    def pointwise_ok(self, i: int, shape_of: TensorType, what: str, also: TensorType | None = None) -> bool:
        n = self.nodes[i]
        if self.op_kind(i) not in (POINTWISE, SOURCE):
            return False
        if also is not None and n.outputs and _same_shape(n.outputs[0].type, also):
            return True  # a per-row value in a reduction kernel (e.g. rsqrt(mean + eps))
        if n.outputs and n.outputs[0].type.rank and not _same_shape(n.outputs[0].type, shape_of):
            self.ctx.note(f"cannot fuse {self.name(i)} into {what}: its shape {n.outputs[0].type} differs from "
                          f"the kernel's iteration shape {shape_of}")
            return False
        return True

    def absorb_epilogue(self, grp: _Group, out_type: TensorType, what: str, also: TensorType | None = None) -> None:
        """Greedily pull pointwise consumers of group values into the group."""
        changed = True
        while changed:
            changed = False
            frontier = sorted({u for m in grp.members for u in self.users[m]} - set(grp.members))
            for u in frontier:
                # rope reads its input's pair partner, so its x must come from memory (a kernel input,
                # possibly through an index map such as a permute of a kernel input): else it starts a kernel
                if u in self.group_of or (self.nodes[u].op == "rope" and not self._rope_x_from_memory(grp, u)):
                    continue
                if not self.pointwise_ok(u, out_type, what, also):
                    continue
                if not self.can_join(grp, u, what):
                    continue
                self.add(grp, u)
                changed = True

    def absorb_operand_views(self, grp: _Group, i: int, what: str) -> None:
        """Pull the index-map producers (slice/permute/expand, transitively) of node i's operands into
        the group when only the group reads them: the family's lowering reads its inputs through
        strided views, so the view needs no copy kernel (e.g. a per-head weight slice of a matmul)."""
        stack = list(self.nodes[i].inputs)
        while stack:
            j = self.index_of.get(stack.pop())
            if j is None or j in self.group_of or self.nodes[j].op not in VIEW_OPS:
                continue
            n = self.nodes[j]
            if n.out.name in self.graph_outputs or not self.users[j] <= set(grp.members):
                continue  # another kernel reads the view too: it stays a copy kernel
            # only the group reads j, so the one cycle to rule out is group -> outside -> j
            if self._reaches_via_outside(set(grp.members), j, grp):
                self.ctx.note(f"cannot fuse {self.name(j)} into {what} as an operand view: it reads a value "
                              "computed outside the kernel from the kernel's own results (would create a cycle)")
                continue
            self.add(grp, j)
            stack.extend(n.inputs)

    def _rope_x_from_memory(self, grp: _Group, u: int) -> bool:
        j = self.index_of.get(self.nodes[u].inputs[0])
        if j is None or j not in grp.members or self.nodes[j].op not in INDEX_MAP_OPS:
            return False
        src = self.index_of.get(self.nodes[j].inputs[0])
        return src is None or src not in grp.members

    def absorb_prologue(self, grp: _Group, start: str, row_type: TensorType, what: str) -> None:
        """Pull the pointwise producers of the reduction input (with the row's shape) into the group."""
        stack = [start]
        while stack:
            v = stack.pop()
            j = self.index_of.get(v)
            if j is None or j in self.group_of:
                continue
            if self.op_kind(j) != POINTWISE or self.nodes[j].op == "rope":
                if self.op_kind(j) not in (SOURCE,):
                    self.ctx.note(f"cannot fuse {self.name(j)} into {what} as prologue: "
                                  f"{self.nodes[j].op} is not pointwise")
                continue
            if not _same_shape(self.nodes[j].outputs[0].type, row_type):
                self.ctx.note(f"cannot fuse {self.name(j)} into {what} as prologue: shape "
                              f"{self.nodes[j].outputs[0].type} differs from the row {row_type}")
                continue
            if not self.can_join(grp, j, what):
                continue
            self.add(grp, j)
            stack.extend(self.nodes[j].inputs)

    def run(self) -> None:
        nodes = self.nodes
        for rule in GROUP_RULES:
            rule(self)
        # 1. GEMMs (dual-B SwiGLU first), with epilogues
        for i, n in enumerate(nodes):
            if n.op not in ("linear", "matmul") or i in self.group_of:
                continue
            grp = self.new_group("gemm", i)
            what = f"gemm kernel of {self.name(i)}"
            if n.op == "linear" and len(n.inputs) == 2:
                partner = self._swiglu_partner(i)
                if partner is not None and self.can_join(grp, partner, what):
                    self.add(grp, partner)
            for m in list(grp.members):
                self.absorb_operand_views(grp, m, what)
            self.absorb_epilogue(grp, n.outputs[0].type, what)
        # 2. reductions, with prologue and epilogue
        for i, n in enumerate(nodes):
            if i in self.group_of or OPS[n.op].kind != REDUCTION:
                continue
            x = n.inputs[0]
            xt = self._type(x)
            dim = n.attr("dim", -1)
            if n.op in LAST_DIM_REDUCTIONS and dim % max(xt.rank, 1) == xt.rank - 1:
                grp = self.new_group("reduction", i)
                what = f"reduction kernel of {self.name(i)}"
                self.absorb_prologue(grp, x, xt, what)
                red = n.outputs[0].type
                self.absorb_epilogue(grp, xt, what, also=None if _same_shape(red, xt) else red)
            else:
                self.ctx.note(f"cannot make a reduction kernel of {self.name(i)}: only last-dim reductions are supported")
        # 3. attention
        for i, n in enumerate(nodes):
            if i not in self.group_of and OPS[n.op].kind == ATTENTION:
                self.absorb_operand_views(self.new_group("attention", i), i, f"attention kernel of {self.name(i)}")
        # 4. remaining pointwise chains (and layout ops other than reshape)
        for i, n in enumerate(nodes):
            if i in self.group_of or n.op == "reshape":
                continue
            kind = OPS[n.op].kind
            if kind == SOURCE:
                continue  # constants are copied into the kernels that use them
            if kind in (POINTWISE, LAYOUT):
                grp = self.new_group("pointwise", i)
                what = f"pointwise kernel of {self.name(i)}"
                self.absorb_epilogue(grp, n.outputs[0].type, what)
            else:
                self.new_group(kind, i)  # no fusion family: lowering reports it clearly

    def _type(self, name: str) -> TensorType:
        j = self.index_of.get(name)
        if j is not None:
            for o in self.nodes[j].outputs:
                if o.name == name:
                    return o.type
        for v in self.g.inputs:
            if v.name == name:
                return v.type
        raise KeyError(name)

    def _swiglu_partner(self, i: int) -> int | None:
        """The other linear of silu(x @ w1.T) * (x @ w3.T) sharing x, whichever of the two `i` is."""
        n = self.nodes[i]

        def compatible(j: int | None) -> bool:
            if j is None or j == i or j in self.group_of:
                return False
            jn = self.nodes[j]
            return (jn.op == "linear" and len(jn.inputs) == 2 and jn.inputs[0] == n.inputs[0]
                    and _same_shape(jn.outputs[0].type, n.outputs[0].type)
                    and jn.outputs[0].type.dtype == n.outputs[0].type.dtype)

        def other_operand(mul: Node, mine: str) -> str:
            return mul.inputs[1] if mul.inputs[0] == mine else mul.inputs[0]

        for u in sorted(self.users[i]):
            un = self.nodes[u]
            if un.op == "silu":  # i is the gate: mul(silu(i), j)
                for m in sorted(self.users[u]):
                    if self.nodes[m].op == "mul":
                        j = self.index_of.get(other_operand(self.nodes[m], un.outputs[0].name))
                        if compatible(j):
                            return j
            elif un.op == "mul":  # i is the up projection: mul(silu(j), i)
                s = self.index_of.get(other_operand(un, n.outputs[0].name))
                if s is not None and self.nodes[s].op == "silu":
                    j = self.index_of.get(self.nodes[s].inputs[0])
                    if compatible(j):
                        return j
        return None


def _tag(family: str, ops: list[str]) -> str:
    if family in TAGGERS:
        return TAGGERS[family](ops)
    if family == "gemm" and ops.count("linear") == 2 and "silu" in ops and "mul" in ops:
        return "swiglu"
    seen: list[str] = []
    for o in ops:
        if family != "pointwise" and o in VIEW_OPS:
            continue  # operand views of a gemm/attention kernel say nothing about what it computes
        if o not in seen and o != "const":
            seen.append(o)
    return "_".join(seen[:3]) or family


def fuse(g: Graph, ctx: PassContext) -> Graph:
    """Group nodes into kernels; the result's top level holds only `call` and `reshape` nodes."""
    if g.kernels:
        return g  # already fused
    f = _Fuser(g, ctx)
    f.run()
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
        return u.members if isinstance(u, _Group) else [u]

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
    import heapq
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
        if not isinstance(u, _Group):
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
                    body_inputs.append(Value(inp, f._type(inp)))
        outs: list[Value] = []
        for m in u.members:
            for o in nodes[m].outputs:
                ext = any(x not in mset for x in f.users[m] if o.name in nodes[x].inputs)
                if ext or o.name in f.graph_outputs:
                    outs.append(o)
        if not outs:
            continue  # nothing reads the group's results: dead code (the pipeline runs dce first)
        ops = [nodes[m].op for m in u.members]
        kname = f"k{len(kernels) + 1}_{u.family}_{_tag(u.family, ops)}"
        body = Graph(kname, tuple(body_inputs), tuple(body_consts) + tuple(nodes[m] for m in u.members),
                     tuple(o.name for o in outs))
        kernels.append(Kernel(kname, u.family, body))
        origin = nodes[u.anchor].origin
        new_nodes.append(Node(tuple(outs), "call", tuple(v.name for v in body_inputs), {"kernel": kname}, origin))
    ctx.count("fuse.kernels", len(kernels))
    return g.replace(nodes=tuple(new_nodes), kernels=tuple(kernels))
