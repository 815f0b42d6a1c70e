"""The runtime's collectives: `all_to_all` nodes of an expert-parallel plan, run on torch.distributed.

Where it sits: a LaunchPlan step (runtime/plan.py) between kernel launches; the op and its layout
are ir/ops/ep.py, the front door's group handling dsr_compiler/ep.py. One node is one exchange
(`ir/ops/ep.py` `exchange`): every input is viewed as N blocks of C rows of bytes, the blocks are put
side by side (one uint8 buffer [N, C, row bytes]), and `torch.distributed.all_to_all_single` sends
block i to rank i. Split "even" (fixed capacity): equal splits, the sizes are known from the shapes
alone and nothing is read back from device memory. Split "counts" (`ep_mode="exact"`): the rows to
send per rank travel first and the host reads them (one synchronisation per exchange), then only those
rows move. On CUDA the NCCL collectives run on the current stream.

Every rank must call with the same symbol values (the same token count T): the buffers have T in
their size. The first call with new sizes checks that across the ranks (`agree`, one small
all_gather of the sizes, which the plan knows on the host; with NCCL this is one synchronisation per
new shape); a mismatch is a RuntimeLaunchError on every rank instead of a hang or a garbled
exchange. A failed or timed-out exchange (a rank that died, the group's timeout) is a
RuntimeLaunchError naming the rank, the node and the group.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from dsr_compiler.ir.errors import RuntimeLaunchError
from dsr_compiler.ir.graph import Node

HINT = ("another rank failed or stopped calling the compiled module, or the group's timeout passed; "
        "see the other ranks' errors (the first failure is the cause)")


class CollectiveStep:
    def __init__(self, node: Node, ep: Any, graph_name: str):
        self.node = node
        self.ep = ep                      # dsr_compiler.ep.ExpertParallel
        self.graph_name = graph_name
        self.n_ranks = int(node.attr("n_ranks"))

    def where(self) -> str:
        outs = ", ".join("%" + o.name for o in self.node.outputs)
        return f"{outs} = all_to_all(...) over group {self.node.attr('group')!r} ({self.n_ranks} ranks)"

    def _group(self):
        ep = self.ep
        if ep is None or ep.group is None:
            raise RuntimeLaunchError(
                f"{self.graph_name}: this plan was compiled for rank {getattr(ep, 'rank', '?')} of "
                f"{self.n_ranks} without a process group; it cannot exchange tokens",
                where=self.where(), hint="compile with ep=<ProcessGroup> or ep=N inside an initialised group "
                                         "(dsr_compiler.ep.EpPlan is for inspection only)")
        if ep.n_ranks != self.n_ranks or ep.name != self.node.attr("group"):
            raise RuntimeLaunchError(f"{self.graph_name}: the plan's group {self.node.attr('group')!r} is not the "
                                     f"compiled module's ({ep.name})", where=self.where())
        return ep.group

    def run(self, ins: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        from dsr_compiler.ir.ops.ep import exchange
        group = self._group()
        n = self.n_ranks
        counts = self.node.attr("split", "even") == "counts"
        data = ins[:-1] if counts else ins
        rows = data[0].shape[0]
        if rows % n:
            raise RuntimeLaunchError(f"{self.graph_name}: {rows} rows do not split over {n} ranks", where=self.where())
        try:
            out, recv_counts = exchange(data, group, n, ins[-1] if counts else None)
        except ValueError as e:            # a row count outside the capacity: a corrupted plan, not a peer's failure
            raise RuntimeLaunchError(f"{self.graph_name}: rank {self.ep.rank} of {n}: {e}", where=self.where()) from None
        except Exception as e:             # gloo/NCCL errors: connection closed, timeout, ...
            raise RuntimeLaunchError(f"{self.graph_name}: rank {self.ep.rank} of {n}: the token exchange failed: "
                                     f"{_first_line(e)}", where=self.where(), hint=HINT) from None
        return [*out, recv_counts] if counts else out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def agree(ep: Any, env: Mapping[str, int], graph_name: str) -> None:
    """Check that every rank runs this call with the same symbol values (one all_gather of them)."""
    from torch import distributed as dist
    names = sorted(env)
    if ep is None or ep.group is None or not names:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if ep.backend == "nccl" else torch.device("cpu")
    mine = torch.tensor([int(env[k]) for k in names], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(ep.n_ranks)]
    try:
        dist.all_gather(every, mine, group=ep.group)
    except Exception as e:
        raise RuntimeLaunchError(f"{graph_name}: rank {ep.rank} of {ep.n_ranks}: the size check before the token "
                                 f"exchange failed: {_first_line(e)}", where=f"group {ep.name}", hint=HINT) from None
    values = [t.tolist() for t in every]          # the one read-back: once per new shape
    if any(v != values[0] for v in values):
        shown = "; ".join(f"rank {r}: " + ", ".join(f"{k}={x}" for k, x in zip(names, v)) for r, v in enumerate(values))
        raise RuntimeLaunchError(f"{graph_name}: the ranks of group {ep.name} called with different sizes ({shown})",
                                 where=f"rank {ep.rank} of {ep.n_ranks}",
                                 hint="expert parallelism exchanges fixed-capacity buffers sized by the token count: "
                                      "every rank must pass the same number of tokens per step (pad the batch)")


__all__ = ["CollectiveStep", "agree"]
