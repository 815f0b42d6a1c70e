"""Expert parallelism at the front door: what `dsr.compile(..., ep=...)` accepts (README "Expert parallelism").

`ep` is one of:
- a `torch.distributed` ProcessGroup: its ranks share the experts (this process is rank
  `dist.get_rank(group)` of `dist.get_world_size(group)`);
- an int N: the initialised default group, which must have N ranks;
- `EpPlan(n_ranks, rank)`: compile rank `rank`'s plan without any group (`dsrc compile --ep N`: IR,
  kernels and report of one rank on one machine); calling it is an error.

`ep_mode` is "fixed" (fixed-capacity exchanges: the whole buffers move, nothing is read back) or
"exact" (the row counts first, then only the routed rows: one host sync per exchange).

The result, `ExpertParallel`, names the group in the IR (`group="ep4"`; the all_to_all ops carry
it) and registers it where the reference interpreter and the runtime find it (ir/ops/ep.py
PROCESS_GROUPS). The rewrite itself is ir/passes/expert_parallel.py; the exchange is
runtime/collective.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsr_compiler.errors import DsrError

PASS = ("expert_parallel", "quantize_fp8")    # (the pass, the pass it follows in the pipeline)


@dataclass(frozen=True)
class EpPlan:
    """Rank `rank` of `n_ranks`, compiled without a process group (for inspection: IR, report, sizes)."""

    n_ranks: int
    rank: int = 0


@dataclass(frozen=True)
class ExpertParallel:
    n_ranks: int
    rank: int
    name: str            # the group's name in the IR
    group: Any = None    # the ProcessGroup, or None for a plan compiled without one
    backend: str = ""    # "gloo" | "nccl" | "" (no group)
    mode: str = "fixed"  # fixed (capacity buffers move whole, no host sync) | exact (counts first, one sync each)

    def pass_option(self) -> dict[str, Any]:
        return {"n_ranks": self.n_ranks, "rank": self.rank, "group": self.name, "mode": self.mode}

    def to_dict(self) -> dict[str, Any]:
        return {**self.pass_option(), "backend": self.backend or None}


def _check_int(v: Any, what: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise DsrError(f"ep: {what} must be an int >= {lo}, got {v!r}",
                       hint="ep=N (ranks of the initialised default group), a ProcessGroup, or EpPlan(N, rank)")
    return v


def resolve(ep: Any, mode: str = "fixed") -> ExpertParallel | None:
    """The ExpertParallel of a compile's `ep` and `ep_mode` arguments (None: one process holds every expert)."""
    from dsr_compiler.ir.passes.expert_parallel import MODES
    if mode not in MODES:
        raise DsrError(f"ep_mode: expected one of {', '.join(MODES)}, got {mode!r}",
                       hint="fixed: fixed-capacity buffers, no host sync; exact: only the routed rows move, one "
                            "host sync per exchange")
    if ep is None:
        return None
    import dataclasses
    info = _resolve(ep)
    return dataclasses.replace(info, mode=mode)


def _resolve(ep: Any) -> ExpertParallel:
    from torch import distributed as dist
    if isinstance(ep, EpPlan):
        n = _check_int(ep.n_ranks, "the rank count", 1)
        r = _check_int(ep.rank, "the rank", 0)
        if r >= n:
            raise DsrError(f"ep: rank {r} is not one of the {n} ranks", hint=f"use a rank in 0..{n - 1}")
        return ExpertParallel(n, r, f"ep{n}")
    if isinstance(ep, int) and not isinstance(ep, bool):
        n = _check_int(ep, "the rank count", 1)
        if not (dist.is_available() and dist.is_initialized()):
            raise DsrError(f"ep={n}: torch.distributed is not initialised in this process",
                           hint="call torch.distributed.init_process_group first (or run under torchrun / "
                                "`dsrc run --ep N`), pass a ProcessGroup, or EpPlan(N, rank) to compile without one")
        group = dist.group.WORLD
    elif dist.is_available() and isinstance(ep, dist.ProcessGroup):
        group, n = ep, None
    else:
        raise DsrError(f"ep: expected an int, a torch.distributed ProcessGroup or EpPlan, got {type(ep).__name__}",
                       hint="ep=N (ranks of the initialised default group), a ProcessGroup, or EpPlan(N, rank)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if n is not None and world != n:
        raise DsrError(f"ep={n}: the default process group has {world} ranks",
                       hint=f"use ep={world}, or pass the ProcessGroup of the {n} ranks that share the experts")
    if rank < 0:
        raise DsrError("ep: this process is not a member of the given process group")
    backend = str(dist.get_backend(group))
    from dsr_compiler.ir.ops.ep import PROCESS_GROUPS
    import re
    tag = re.sub(r"[^A-Za-z0-9_]", "_", str(getattr(group, "group_name", id(group))))[:40]
    name = f"ep{world}" if group is dist.group.WORLD else f"ep{world}.g{tag}"
    PROCESS_GROUPS[name] = group
    return ExpertParallel(world, rank, name, group, backend)


def pipeline(passes: list, ep: ExpertParallel | None) -> list:
    """The PIPELINE with expert_parallel inserted after quantize_fp8 when `ep` is set."""
    if ep is None:
        return list(passes)
    from dsr_compiler.ir.passes.expert_parallel import expert_parallel
    out = list(passes)
    at = [name for name, _ in out].index(PASS[1]) + 1
    out.insert(at, (PASS[0], expert_parallel))
    return out


def exchanges(graph: Any, env: dict[str, int]) -> list[dict[str, Any]]:
    """The expert-parallel exchanges of a graph (fused or not), with sizes at `env` (symbol name -> int).
    In exact mode (split="counts") `sent_bytes` is a model: the slot rows bound for other ranks under uniform
    routing, plus the counts.

    Per all_to_all: the tensors and bytes of one row, the capacity C (rows per destination rank), the
    buffer (N*C rows, the same size sent and received), `sent_bytes` = what leaves this rank in
    fixed-capacity mode ((N-1)*C rows: every block but its own), and `payload_rows` = the T*k slot rows
    routing actually fills (spread over the N ranks, own rank included)."""
    import sympy

    from dsr_compiler.ir.types import to_expr

    def ev(e: Any) -> int:
        e = to_expr(e)
        return int(round(float(e.subs({s: env[s.name] for s in e.free_symbols if s.name in env}))))
    routes = [n for n in graph.nodes if n.op == "ep_route"] + \
        [n for k in graph.kernels for n in k.body.nodes if n.op == "ep_route"]
    found = [n for n in graph.nodes if n.op == "all_to_all"]
    out = []
    for i, n in enumerate(found):
        ranks = int(n.attr("n_ranks"))
        rows = n.outputs[0].type.shape[0]
        cap = sympy.simplify(rows / ranks)
        data = n.outputs[:-1] if n.attr("split", "even") == "counts" else n.outputs   # not the received counts
        tensors = [{"name": o.name, "dtype": o.type.dtype.value,
                    "row_bytes": int(o.type.dtype.itemsize * sympy.Mul(*o.type.shape[1:]))} for o in data]
        row_bytes = sum(t["row_bytes"] for t in tensors)
        entry: dict[str, Any] = {
            "name": ", ".join("%" + o.name for o in data), "group": n.attr("group"), "n_ranks": ranks,
            "direction": "dispatch" if i % 2 == 0 else "combine", "origin": n.origin, "tensors": tensors,
            "row_bytes": row_bytes, "capacity_expr": str(cap), "capacity": ev(cap),
            "buffer_bytes_expr": str(sympy.expand(rows * row_bytes)), "buffer_bytes": ev(rows * row_bytes),
            "sent_bytes_expr": str(sympy.expand((ranks - 1) * cap * row_bytes)),
            "sent_bytes": ev((ranks - 1) * cap * row_bytes)}
        if len(routes) * 2 == len(found):        # the pass emits route, dispatch exchange, combine exchange per layer
            slots = routes[i // 2].outputs[2].type.shape[0]
            entry.update(payload_rows_expr=str(slots), payload_rows=ev(slots), payload_bytes=ev(slots * row_bytes))
        if n.attr("split", "even") == "counts":   # exact size: the counts, then only the routed rows
            entry["mode"] = "exact"
            if "payload_rows" in entry:           # rows that leave this rank under uniform routing: (N-1)/N of them
                sent = sympy.expand(slots * row_bytes * (ranks - 1) / ranks + 8 * ranks)
                entry.update(sent_bytes_expr=str(sent), sent_bytes=ev(sent),
                    sent_model="exact size: counts (8 B per rank) + the slot rows for other ranks, uniform routing")
        else:
            entry["mode"] = "fixed"
        out.append(entry)
    return out


__all__ = ["EpPlan", "ExpertParallel", "exchanges", "pipeline", "resolve"]
