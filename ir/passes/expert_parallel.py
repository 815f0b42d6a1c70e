"""expert_parallel: spread a routed MoE's experts over the ranks of a process group (README "Expert parallelism").

Where it sits: in the pipeline after quantize_fp8 and before fuse, only when a compile is given
`ep=` (option `ep`: {"n_ranks": N, "rank": r, "group": name}); the front door inserts it
(dsr_compiler/ep.py). Each rank keeps the experts [r*El, (r+1)*El), El = E/N, and runs the router
on its own tokens. Pattern (the MoE lowering, after quantize_fp8 in its FP8 form):

    %rows, %blk = moe_dispatch(%ids, n_experts=E, block_m=BM)
    %act        = moe_gemm_gate_up[_fp8](%x [, %x.s], %rows, %blk, %w13 [, %w13.s], topk=k, ...)
    %y_slots    = moe_gemm_down[_fp8](%act [, %act.s], %rows, %blk, %w2 [, %w2.s], %w, ...)

Rewritten (ops and layout: ir/ops/ep.py):

    %send, %eid, %pos = ep_route(%ids, n_ranks=N, local_experts=El)     # C = T*min(k, El) rows per rank
    %sx [, %sxs]      = gather_rows(%x [, %x.s], %send, div=k)          # the token row of each slot
    %sw               = gather_rows(reshape(%w, [T*k, 1]), %send, div=1)
    %rx.., %reid, %rw = all_to_all(%sx.., %eid, %sw, n_ranks=N, group=g)  # one exchange
    %rows, %blk       = moe_dispatch(reshape(%reid, [N*C, 1]), n_experts=El, block_m=BM)
    %act              = moe_gemm_gate_up[_fp8](%rx.., %rows, %blk, %w13.local.., topk=1, ...)
    %y_recv           = moe_gemm_down[_fp8](%act.., %rows, %blk, %w2.local.., reshape(%rw, [N*C, 1]))
    %back             = all_to_all(%y_recv, n_ranks=N, group=g)         # each row back to its sender
    %y_slots          = gather_rows(%back, %pos, div=1)                  # same name, same [T*k, H] rows

With option mode "exact", `ep_route` also gives the rows used per rank (`%counts`, i32[N]) and both
exchanges take split="counts": only the used rows move, after the counts (one host sync each).

The weights `%w13.local` etc. are derived params (`expert_slice` of the stacked tensors). Every
value a received row meets is the one it meets on one process (same row, same expert weights,
same routing weight, the same kernels), and the combine still sums the k slots in order: the output
is bitwise equal to the single-process compiled MoE.
"""
from __future__ import annotations

from ..errors import DsrError
from ..graph import Graph, Node, Value
from ..ops.ep import ep_capacity
from ..ops.moe import moe_blocks, moe_rows
from ..params import DerivedParam
from ..types import DType, TensorType
from .manager import PassContext

GATE_UP = ("moe_gemm_gate_up", "moe_gemm_gate_up_fp8")
MODES = ("fixed", "exact")
DOWN = ("moe_gemm_down", "moe_gemm_down_fp8")


class _Rewriter:
    """The state of one run of the pass: names in use, the graph's lookups, this rank's weight slices."""

    def __init__(self, g: Graph, ctx: PassContext, n_ranks: int, rank: int, group: str, mode: str):
        self.g, self.ctx, self.n_ranks, self.rank, self.group = g, ctx, n_ranks, rank, group
        self.split = "counts" if mode == "exact" else "even"
        self.vals, self.producers, self.users = g.values(), g.producers(), g.users()
        self.names = set(self.vals)
        self.params = set(g.params)
        self.local: dict[str, Value] = {}           # stacked expert param -> this rank's slice
        self.out: list[Node] = []                   # the nodes of the layer being rewritten
        self.origin = ""

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}.{i}"
        self.names.add(name)
        return name

    def t(self, name: str) -> TensorType:
        return self.vals[name].type

    def node(self, op: str, ins, outs: list[tuple[str, TensorType]], attrs=None) -> list[str]:
        vs = tuple(Value(self.fresh(nm), ty) for nm, ty in outs)
        self.out.append(Node(vs, op, tuple(ins), attrs or {}, self.origin))
        return [v.name for v in vs]

    def slice_param(self, p: str, e: int, el: int, where: str) -> str:
        """This rank's experts [rank*El, (rank+1)*El) of the stacked [E, ...] weight param p (a derived param)."""
        t = self.t(p)
        if p not in self.params or t.rank < 1 or t.shape[0] != e:
            raise DsrError(f"expert parallelism: expert weight %{p} is not a stacked [{e}, ...] parameter",
                           where=where, hint="a compiler bug: the MoE lowering stacks the expert weights")
        if p not in self.local:
            v = Value(self.fresh(f"{p}.local"), TensorType(t.dtype, (el,) + tuple(t.shape[1:])))
            self.local[p] = v
            self.ctx.derive(DerivedParam((v.name,), "expert_slice", (p,),
                                         {"start": self.rank * el, "stop": (self.rank + 1) * el}, self.origin))
        return self.local[p].name

    def layer(self, dn: Node) -> tuple[list[Node], Node, Node]:
        """The replacement of one MoE's down GEMM, and the dispatch and gate_up nodes it makes dead."""
        t, node, n_ranks = self.t, self.node, self.n_ranks
        fp8 = dn.op == "moe_gemm_down_fp8"
        na = 2 if fp8 else 1                   # activation tensors (codes + scales in FP8)
        gu = self.producers.get(dn.inputs[0])
        rows, blk = dn.inputs[na], dn.inputs[na + 1]
        dp = self.producers.get(rows)
        where = f"MoE at {dn.origin or dn.outputs[0].name}"
        if gu is None or gu.op not in GATE_UP or dp is None or dp.op != "moe_dispatch" or \
                tuple(gu.inputs[na:na + 2]) != (rows, blk) or dp.outputs[1].name != blk:
            raise DsrError("expert parallelism: the MoE's dispatch -> gate_up -> down chain is not in the expected form",
                           where=where, hint="a compiler bug: the MoE lowering and this pass disagree")
        others = [u for o in (*dp.outputs, *gu.outputs) for u in self.users.get(o.name, []) if u not in (gu, dn)]
        if others:
            raise DsrError(f"expert parallelism: %{others[0].outputs[0].name} reads the MoE's internal layout",
                           where=where, hint="only the routed experts may read the dispatch and gate_up results")
        e, bm = dp.attr("n_experts"), dp.attr("block_m")
        if e % n_ranks:
            raise DsrError(f"expert parallelism: {e} routed experts do not divide over {n_ranks} ranks",
                           where=where, hint=f"use a rank count that divides {e} (each rank holds E/N experts)")
        el = e // n_ranks
        ids = dp.inputs[0]
        tokens, k = t(ids).shape
        cap = ep_capacity(tokens, int(k), el)
        nrows = n_ranks * cap
        hidden = dn.outputs[0].type.shape[1]
        self.out, self.origin = [], dn.origin
        i32, f32 = DType.i32, DType.f32
        send, eid, pos, counts = node("ep_route", (ids,), [("ep.send", TensorType(i32, (nrows,))),
                                                           ("ep.eid", TensorType(i32, (nrows,))),
                                                           ("ep.pos", TensorType(i32, (tokens * k,))),
                                                           ("ep.counts", TensorType(i32, (n_ranks,)))],
                                      {"n_ranks": n_ranks, "local_experts": el})
        exact = self.split == "counts"      # exact-size exchanges: the counts go along, one host sync each
        acts = list(gu.inputs[:na])
        sent = [node("gather_rows", (a, send), [(f"{a}.send", TensorType(t(a).dtype, (nrows, t(a).shape[1])))],
                     {"div": int(k)})[0] for a in acts]
        w = dn.inputs[-1]
        (wflat,) = node("reshape", (w,), [(f"{w}.flat", TensorType(f32, (tokens * k, 1)))], {"shape": (tokens * k, 1)})
        (sw,) = node("gather_rows", (wflat, send), [(f"{w}.send", TensorType(f32, (nrows, 1)))], {"div": 1})
        ex_types = [*(TensorType(t(x).dtype, (nrows, t(x).shape[1])) for x in acts),
                    TensorType(i32, (nrows,)), TensorType(f32, (nrows, 1))]
        ins = (*sent, eid, sw) + ((counts,) if exact else ())
        outs = [(f"{x}.recv", ty) for x, ty in zip((*sent, eid, sw), ex_types)] + \
            ([(f"{counts}.recv", TensorType(i32, (n_ranks,)))] if exact else [])
        recv = node("all_to_all", ins, outs, {"n_ranks": n_ranks, "group": self.group, "split": self.split})
        rx, reid, rw = recv[:na], recv[na], recv[na + 1]
        (reid2,) = node("reshape", (reid,), [(f"{reid}.col", TensorType(i32, (nrows, 1)))], {"shape": (nrows, 1)})
        local_rows = moe_rows(nrows, 1, el, bm)
        lrows, lblk = node("moe_dispatch", (reid2,), [(f"{rows}.local", TensorType(i32, (local_rows,))),
                                                      (f"{blk}.local", TensorType(i32, (moe_blocks(local_rows, bm),)))],
                           {"n_experts": el, "block_m": bm})
        gw = [self.slice_param(p, e, el, where) for p in gu.inputs[na + 2:]]
        act_outs = [(o.name + ".local", TensorType(o.type.dtype, (local_rows,) + tuple(o.type.shape[1:])))
                    for o in gu.outputs]
        act = node(gu.op, (*rx, lrows, lblk, *gw), act_outs, {**gu.attr_dict, "topk": 1})
        dw = [self.slice_param(p, e, el, where) for p in dn.inputs[na + 2:-1]]
        (y_recv,) = node(dn.op, (*act, lrows, lblk, *dw, rw),
                         [(f"{dn.outputs[0].name}.recv", TensorType(f32, (nrows, hidden)))], dn.attr_dict)
        back = node("all_to_all", (y_recv,) + ((recv[-1],) if exact else ()),
                    [(f"{y_recv}.back", TensorType(f32, (nrows, hidden)))] +
                    ([(f"{counts}.back", TensorType(i32, (n_ranks,)))] if exact else []),
                    {"n_ranks": n_ranks, "group": self.group, "split": self.split})[0]
        y = dn.outputs[0]
        self.out.append(Node((y,), "gather_rows", (back, pos), {"div": 1}, dn.origin))
        self.ctx.count("expert_parallel.moe_layers")
        self.ctx.note(f"expert_parallel: {dn.origin or y.name}: rank {self.rank} of {n_ranks} holds experts "
                      f"{self.rank * el}..{(self.rank + 1) * el - 1} of {e}; send/receive buffers {n_ranks} x C rows, "
                      f"C = {cap} (T*min(k, E/N), no slot dropped); "
                      + ("exact-size exchanges: the row counts travel first, one host sync per exchange" if exact
                         else "fixed capacity: every exchange moves the whole buffer, no host sync"))
        return self.out, dp, gu


def expert_parallel(g: Graph, ctx: PassContext) -> Graph:
    """Rewrite every routed MoE of `g` into the expert-parallel plan of rank options["ep"]["rank"]."""
    ep = ctx.options.get("ep")
    if not ep or g.kernels:
        return g.replace()
    n_ranks, rank = int(ep["n_ranks"]), int(ep["rank"])
    mode = str(ep.get("mode", "fixed"))
    if mode not in MODES:
        raise DsrError(f"expert parallelism: unknown ep_mode {mode!r}", hint=f"use one of {', '.join(MODES)}")
    rw = _Rewriter(g, ctx, n_ranks, rank, str(ep["group"]), mode)
    downs = [n for n in g.nodes if n.op in DOWN]
    if not downs:
        raise DsrError(f"expert parallelism: graph {g.name} has no routed MoE layer (no moe_gemm_down)",
                       where=f"ep={n_ranks} ranks", hint="ep= applies to modules with a routed MoE (moe, decoder, model)")
    replaced: dict[int, list[Node]] = {}       # id(down node) -> its replacement nodes
    dropped: set[int] = set()                  # ids of the dispatch and gate_up nodes
    for dn in downs:
        nodes, dp, gu = rw.layer(dn)
        replaced[id(dn)] = nodes
        dropped.update((id(dp), id(gu)))
    nodes: list[Node] = []
    for n in g.nodes:
        if id(n) not in dropped:
            nodes.extend(replaced.get(id(n), [n]))
    used = {i for n in nodes for i in n.inputs} | set(g.outputs)
    inputs: list[Value] = []
    for v in g.inputs:
        if v.name in rw.local:
            if v.name in used:
                inputs.append(v)
            inputs.append(rw.local[v.name])
        elif v.name in used or v.name not in rw.params:
            inputs.append(v)
    is_param = rw.params | {v.name for v in rw.local.values()}
    return g.replace(inputs=tuple(inputs), nodes=tuple(nodes),
                     params=tuple(v.name for v in inputs if v.name in is_param))
