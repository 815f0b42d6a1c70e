"""The fusion pass's grouping state: `Fuser` (nodes, users, groups) and its legality checks.

Where it sits: the bottom of `ir/passes/fuse/`. The grouping rules (`core.py`, `fp8.py`, `mla.py`,
listed in order in `rules.py`) claim nodes through `new_group`, `add` and `can_join`; `kernels.py`
turns the groups into `kernel` blocks. Legality: a node joins a group only if no path leaves the
group and comes back to it (no cycle in the graph of kernels). Every refusal is noted as
"cannot fuse X into Y: why".
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...graph import Graph
from ...ops import OPS, POINTWISE, SOURCE, index_map_ops
from ...types import TensorType, dims_equal
from ..manager import PassContext

INDEX_MAP_OPS = index_map_ops()     # ops whose element is one input element (permute, expand, slice, reshape)
VIEW_OPS = tuple(o for o in INDEX_MAP_OPS if o != "reshape")  # index maps a kernel can apply to an input
                                                               # (reshape stays a free view between kernels)


@dataclass
class Group:
    """One future kernel: its family, its member nodes (indices into the graph) and its anchor node."""

    family: str
    members: list[int] = field(default_factory=list)  # node indices
    anchor: int = -1


class Fuser:
    """The graph being grouped: nodes, their users, and the groups made so far (see the module doc)."""

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
        self.group_of: dict[int, Group] = {}
        self.groups: list[Group] = []
        self.graph_outputs = set(g.outputs)

    # --- helpers
    def op_kind(self, i: int) -> str:
        return OPS[self.nodes[i].op].kind

    def name(self, i: int) -> str:
        n = self.nodes[i]
        return f"%{n.outputs[0].name} = {n.op}" if n.outputs else n.op

    def preds(self, i: int) -> set[int]:
        return {self.index_of[x] for x in self.nodes[i].inputs if x in self.index_of}

    def _reaches_via_outside(self, members: set[int], target: int, own: Group | None = None,
                             start: set[int] | None = None) -> bool:
        """Is there a path members -> (node outside members) -> ... -> target? (`start`: leave from
        these members only; the others still count as inside.)

        Another group runs as one kernel, so reaching any of its members reaches all of them
        (kernel-level edges, not only node-level ones, can close a cycle)."""
        stack = [u for m in (members if start is None else start) for u in self.users[m]
                 if u not in members and u != target]
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

    def can_join(self, grp: Group, i: int, why_prefix: str) -> bool:
        if i in self.group_of:
            return False
        members = set(grp.members)
        # cycle check both ways: group -> outside -> i, and i -> outside -> group
        if self._reaches_via_outside(members, i, grp):
            self.ctx.note(f"cannot fuse {self.name(i)} into {why_prefix}: a value it needs is computed "
                          f"outside the kernel from the kernel's own results (would create a cycle)")
            return False
        for m in members:
            # from i to a member through nodes outside the group (i's own users in the group are inside)
            if self._reaches_via_outside({i} | members, m, grp, start={i}):
                self.ctx.note(f"cannot fuse {self.name(i)} into {why_prefix}: the kernel needs a value computed "
                              f"outside it from this node's result (would create a cycle)")
                return False
        return True

    def add(self, grp: Group, i: int) -> None:
        grp.members.append(i)
        self.group_of[i] = grp

    def new_group(self, family: str, anchor: int) -> Group:
        grp = Group(family, [], anchor)
        self.groups.append(grp)
        self.add(grp, anchor)
        return grp

    # --- fusion rules
    def pointwise_ok(self, i: int, shape_of: TensorType, what: str, also: TensorType | None = None) -> bool:
        n = self.nodes[i]
        if self.op_kind(i) not in (POINTWISE, SOURCE):
            return False
        if also is not None and n.outputs and dims_equal(n.outputs[0].type.shape, also.shape):
            return True  # a per-row value in a reduction kernel (e.g. rsqrt(mean + eps))
        if n.outputs and n.outputs[0].type.rank and not dims_equal(n.outputs[0].type.shape, shape_of.shape):
            self.ctx.note(f"cannot fuse {self.name(i)} into {what}: its shape {n.outputs[0].type} differs from "
                          f"the kernel's iteration shape {shape_of}")
            return False
        return True

    def absorb_epilogue(self, grp: Group, out_type: TensorType, what: str, also: TensorType | None = None) -> None:
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

    def absorb_operand_views(self, grp: Group, i: int, what: str) -> None:
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

    def _rope_x_from_memory(self, grp: Group, u: int) -> bool:
        j = self.index_of.get(self.nodes[u].inputs[0])
        if j is None or j not in grp.members or self.nodes[j].op not in INDEX_MAP_OPS:
            return False
        src = self.index_of.get(self.nodes[j].inputs[0])
        return src is None or src not in grp.members

    def absorb_prologue(self, grp: Group, start: str, row_type: TensorType, what: str) -> None:
        """Pull the pointwise producers of the reduction input (with the row's shape) into the group,
        and views (slice/permute/expand) of values that stay in memory: the kernel reads those
        through strides (e.g. the KV latent, a slice of the wkv_a GEMM's output, is normalized in
        place instead of being copied out first)."""
        stack = [start]
        from_memory: set[str] = set()      # values read through a view: they must stay outside the group
        while stack:
            v = stack.pop()
            j = self.index_of.get(v)
            if j is None or j in self.group_of:
                continue
            n = self.nodes[j]
            if n.op in VIEW_OPS and dims_equal(n.out.type.shape, row_type.shape) \
                    and self.index_of.get(n.inputs[0]) not in grp.members and self.can_join(grp, j, what):
                self.add(grp, j)
                from_memory.add(n.inputs[0])
                continue
            if v in from_memory:
                continue
            if self.op_kind(j) != POINTWISE or self.nodes[j].op == "rope":
                if self.op_kind(j) not in (SOURCE,):
                    self.ctx.note(f"cannot fuse {self.name(j)} into {what} as prologue: "
                                  f"{self.nodes[j].op} is not pointwise")
                continue
            if not dims_equal(self.nodes[j].outputs[0].type.shape, row_type.shape):
                self.ctx.note(f"cannot fuse {self.name(j)} into {what} as prologue: shape "
                              f"{self.nodes[j].outputs[0].type} differs from the row {row_type}")
                continue
            if not self.can_join(grp, j, what):
                continue
            self.add(grp, j)
            stack.extend(self.nodes[j].inputs)

    def type_of(self, name: str) -> TensorType:
        j = self.index_of.get(name)
        if j is not None:
            for o in self.nodes[j].outputs:
                if o.name == name:
                    return o.type
        for v in self.g.inputs:
            if v.name == name:
                return v.type
        raise KeyError(name)
