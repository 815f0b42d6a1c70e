"""Expert-parallel ops of the op table: the send plan, row gathers and the all-to-all exchange.

Where it sits: in the one op table (`ir/ops/__init__.py` imports it after `moe.py`). The
`expert_parallel` pass (ir/passes/expert_parallel.py) rewrites the MoE's dispatch + grouped GEMMs
into these ops when a compile is given `ep=` (N ranks, this one `r`, each holding the contiguous
expert range [r*El, (r+1)*El), El = E/N). `codegen/families/ep.py` lowers `ep_route` and
`gather_rows` to one kernel each; `all_to_all` is no kernel: it stays at the top level of the fused
graph and the runtime calls `torch.distributed.all_to_all_single` for it (runtime/collective.py).

    %send, %eid, %pos, %counts : i32[N*C], i32[N*C], i32[T*k], i32[N] = ep_route(%ids, n_ranks=N, local_experts=El)
    %xs               : f32[N*C,H]                    = gather_rows(%x, %send, div=k)
    %rx, %reid, ...   : f32[N*C,H], i32[N*C], ...     = all_to_all(%xs, %eid, ..., n_ranks=N, group="ep")
    (moe_dispatch + grouped GEMMs of the El local experts over the N*C received rows, k = 1)
    %back             : f32[N*C,H]                    = all_to_all(%y_recv, n_ranks=N, group="ep")
    %y_slots          : f32[T*k,H]                    = gather_rows(%back, %pos, div=1)

Fixed capacity, no host sync: the send buffer holds C = T*min(k, El) rows per destination rank,
the most slots of T tokens that El experts can take (a token's k experts are distinct), so no
slot is ever dropped and every size is a sympy expression of the local token count T. Layout
contract shared by the ops and checked by the tests:

* a *slot* is one (token, choice) pair `t*k + j`; its destination is rank `ids[t, j] // El`;
* rows `d*C .. d*C+C-1` of the send buffer go to rank d: its slots in ascending slot order, then
  pads (-1 in `send`, -1 in `eid`); `eid` is the expert's index on rank d (`ids - d*El`);
* `pos[s]` is the send row of slot s (-1 for an id outside 0..N*El-1: that slot gets zeros);
* the exchange sends rows `d*C ..` to rank d and receives rank s's rows at `s*C ..`, so the second
  exchange brings each slot's expert output back to the row it was sent from.

Exact size (`ep_mode="exact"`): `all_to_all(..., split="counts")` takes the rows to send per rank
(`%counts`, the rows used of each run) as its last input and returns the rows received per rank as an
extra output; only those rows move, after the counts, which the host reads (one sync per exchange).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sympy
import torch

from ..types import DType, TensorType, to_expr
from ._def import COLLECTIVE, AttrSpec, OpDef, TypeRuleError, dims_equal, register

EP_ROUTE = "ep_route"
GATHER_ROWS = "gather_rows"

# The process groups an `all_to_all` names (attr `group`), registered by the front door when a
# compile is given `ep=` (dsr_compiler/ep.py); the reference and the runtime look them up here.
PROCESS_GROUPS: dict[str, Any] = {}


def ep_capacity(tokens: sympy.Expr | int, topk: int, local_experts: int) -> sympy.Expr:
    """C: send rows per destination rank, T*min(k, El) (every slot fits, none is dropped)."""
    return to_expr(tokens) * min(topk, local_experts)


def _route_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    (ids,) = ts
    op = EP_ROUTE
    if ids.rank != 2 or ids.dtype not in (DType.i32, DType.i64):
        raise TypeRuleError(f"{op}: ids must be integer [T, k], got {ids}")
    n, el = a["n_ranks"], a["local_experts"]
    if n < 1 or el < 1:
        raise TypeRuleError(f"{op}: n_ranks and local_experts must be >= 1, got {n} and {el}")
    k = ids.shape[1]
    if not k.is_Integer:
        raise TypeRuleError(f"{op}: k (ids.shape[1]) must be static, got {k}")
    c = ep_capacity(ids.shape[0], int(k), el)
    return (TensorType(DType.i32, (n * c,)), TensorType(DType.i32, (n * c,)),
            TensorType(DType.i32, (ids.shape[0] * k,)), TensorType(DType.i32, (n,)))


def ep_route_ref(ids: torch.Tensor, *, n_ranks: int, local_experts: int):
    t, k = ids.shape
    c = t * min(k, local_experts)
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < n_ranks * local_experts)
    dest = torch.where(valid, flat // local_experts, n_ranks)
    send = torch.full((n_ranks * c,), -1, dtype=torch.int32)
    eid = torch.full((n_ranks * c,), -1, dtype=torch.int32)
    pos = torch.full((t * k,), -1, dtype=torch.int32)
    counts = torch.zeros(n_ranks, dtype=torch.int32)
    for d in range(n_ranks):
        slots = torch.nonzero(dest == d).flatten()            # ascending slot ids
        rows = d * c + torch.arange(slots.numel())
        send[rows] = slots.to(torch.int32)
        eid[rows] = (flat[slots] - d * local_experts).to(torch.int32)
        pos[slots] = rows.to(torch.int32)
        counts[d] = slots.numel()
    return send, eid, pos, counts


register(OpDef(
    EP_ROUTE, EP_ROUTE, (1, 1), _route_rule, ep_route_ref, n_outputs=4,
    attrs={"n_ranks": AttrSpec((int,), doc="ranks of the expert-parallel group"),
           "local_experts": AttrSpec((int,), doc="experts per rank (contiguous ranges)")},
    doc="send plan of the slots: per destination rank C = T*min(k, El) rows of slot ids (ascending, -1 pads), "
        "the expert index on that rank, each slot's send row, and the rows used per rank"))


def _gather_rows_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    src, index = ts
    op = GATHER_ROWS
    if src.rank != 2:
        raise TypeRuleError(f"{op}: source must be [M, W], got {src}")
    if index.rank != 1 or index.dtype is not DType.i32:
        raise TypeRuleError(f"{op}: index must be i32[P], got {index}")
    if a["div"] < 1:
        raise TypeRuleError(f"{op}: div must be >= 1, got {a['div']}")
    return (TensorType(src.dtype, (index.shape[0], src.shape[1])),)


def gather_rows_ref(src: torch.Tensor, index: torch.Tensor, *, div: int) -> torch.Tensor:
    idx = index.long()
    ok = (idx >= 0) & (idx < src.shape[0] * div)
    raw = src.view(torch.uint8) if src.element_size() == 1 else src      # fp8: copy the bits
    if src.shape[0] == 0:
        return raw.new_zeros(index.shape[0], src.shape[1]).view(src.dtype)
    out = raw[torch.where(ok, idx // div, 0)]
    out[~ok] = 0
    return out.view(src.dtype)


register(OpDef(
    GATHER_ROWS, GATHER_ROWS, (2, 2), _gather_rows_rule, gather_rows_ref, attrs={"div": AttrSpec((int,))},
    doc="out[p] = src[index[p] // div] for 0 <= index[p] < M*div, else a row of zeros (any dtype, bits copied)"))


SPLITS = ("even", "counts")


def _a2a_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    op = "all_to_all"
    n, split = a["n_ranks"], a["split"]
    if n < 1:
        raise TypeRuleError(f"{op}: n_ranks must be >= 1, got {n}")
    if split not in SPLITS:
        raise TypeRuleError(f"{op}: split must be one of {SPLITS}, got {split!r}")
    data = ts
    if split == "counts":
        c = ts[-1]
        if len(ts) < 2 or c.rank != 1 or c.dtype is not DType.i32 or not dims_equal(c.shape[0], n):
            raise TypeRuleError(f"{op}: split='counts' takes the rows to send per rank last, as i32[{n}], got "
                                f"{ts[-1]}")
        data = ts[:-1]
    rows = data[0].shape[0] if data[0].rank else None
    for t in data:
        if t.rank < 1 or not dims_equal(t.shape[0], rows):
            raise TypeRuleError(f"{op}: every tensor must have the same first dim {rows} (N*C rows), got {t}")
    if sympy.simplify(to_expr(rows) / n).is_integer is not True:
        raise TypeRuleError(f"{op}: {rows} rows are not a multiple of n_ranks={n}")
    return tuple(data) + ((TensorType(DType.i32, (n,)),) if split == "counts" else ())


def exchange(xs: Sequence[torch.Tensor], group: Any, n_ranks: int, send_counts: torch.Tensor | None = None
             ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The exchange of `all_to_all` (the reference and the runtime both call it): every tensor viewed as
    N blocks of C rows of bytes, the blocks side by side in one uint8 buffer, one all_to_all_single.
    Without counts the whole buffer moves (equal splits: nothing read back). With `send_counts` only the
    first send_counts[d] rows of block d go to rank d, after a first exchange of the counts, which the
    host reads (the one synchronisation); rows not received are zeros (-1 in integer tensors).
    Returns the received tensors and, with counts, the rows received from each rank (i32[N])."""
    from torch import distributed as dist
    n = n_ranks
    rows = xs[0].shape[0]
    cap = rows // n
    recv_counts = None
    if send_counts is not None:
        sc_t = send_counts.to(torch.int64)
        rc_t = torch.empty_like(sc_t)
        dist.all_to_all_single(rc_t, sc_t, group=group)
        sc, rc = sc_t.tolist(), rc_t.tolist()             # the host reads the counts: exact mode's sync
        bad = [c for c in sc + rc if not 0 <= c <= cap]
        if bad:
            raise ValueError(f"row count {bad[0]} outside 0..{cap} (the capacity per rank)")
        recv_counts = rc_t.to(torch.int32)
    if cap == 0:                                         # no token on any rank (the sizes agree)
        return [torch.empty_like(x) for x in xs], recv_counts
    parts = [x.contiguous().reshape(n, cap, -1).view(torch.uint8) for x in xs]
    widths = [p.shape[2] for p in parts]
    full = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    if send_counts is None:
        got = torch.empty_like(full)
        dist.all_to_all_single(got, full, group=group)
    else:
        send = torch.cat([full[d, :sc[d]] for d in range(n)])
        recv = full.new_empty((sum(rc), full.shape[2]))
        dist.all_to_all_single(recv, send, output_split_sizes=rc, input_split_sizes=sc, group=group)
        got = torch.zeros_like(full)
        at = 0
        for x, w in zip(xs, widths):                      # pads of integer tensors: -1 (no expert)
            if not x.dtype.is_floating_point:
                got[:, :, at:at + w] = 255
            at += w
        at = 0
        for s in range(n):
            got[s, :rc[s]] = recv[at:at + rc[s]]
            at += rc[s]
    out, at = [], 0
    for x, w in zip(xs, widths):
        out.append(got[:, :, at:at + w].contiguous().view(x.dtype).reshape(x.shape))
        at += w
    return out, recv_counts


def all_to_all_ref(*xs: torch.Tensor, n_ranks: int, group: str, split: str = "even"):
    pg = PROCESS_GROUPS.get(group)
    if pg is None:
        raise RuntimeError(f"all_to_all: no process group {group!r} is registered in this process")
    if split == "counts":
        out, rc = exchange(xs[:-1], pg, n_ranks, xs[-1])
        return (*out, rc)
    return tuple(exchange(xs, pg, n_ranks)[0])


register(OpDef(
    "all_to_all", COLLECTIVE, (1, 17), _a2a_rule, all_to_all_ref,
    attrs={"n_ranks": AttrSpec((int,)), "group": AttrSpec((str,), doc="the process group's name (PROCESS_GROUPS)"),
           "split": AttrSpec((str,), required=False, default="even",
                             doc="even: every block of C rows moves (no host sync); counts: the last input holds "
                                 "the rows to send per rank, the rows received per rank are an extra output")},
    doc="rows i*C .. i*C+C-1 of every tensor go to rank i; rank j's rows arrive at j*C ..; one exchange for all "
        "the tensors (torch.distributed.all_to_all_single)"))

__all__ = ["EP_ROUTE", "GATHER_ROWS", "PROCESS_GROUPS", "SPLITS", "all_to_all_ref", "ep_capacity", "ep_route_ref",
           "exchange", "gather_rows_ref"]
