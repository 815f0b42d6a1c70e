"""Pass manager: runs the PIPELINE of pure Graph -> Graph passes.

After each pass it verifies the graph, times the pass, and hands the result to an
optional dump callback (the CLI writes `ir/NN_<pass>.ir` and `.diff`). Passes receive a
`PassContext` for options and for what they want to say (fusion refusals, rule counts).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import VerifyError
from ..graph import Graph
from ..verifier import verify


@dataclass
class PassContext:
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)           # e.g. "cannot fuse X into Y: ..."
    counts: dict[str, int] = field(default_factory=dict)     # rewrite-rule matches
    derived: list[Any] = field(default_factory=list)         # ir.params.DerivedParam: params computed once
                                                             # at compile time (e.g. FP8 weight codes)

    def note(self, msg: str) -> None:
        self.notes.append(msg)

    def derive(self, d: Any) -> None:
        """Declare new graph params computed from module tensors (see ir/params.py)."""
        self.derived.append(d)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n


PassFn = Callable[[Graph, PassContext], Graph]


@dataclass(frozen=True)
class PassRecord:
    index: int
    name: str
    graph: Graph
    ms: float
    notes: tuple[str, ...]
    counts: tuple[tuple[str, int], ...]


def run_passes(g: Graph, passes: list[tuple[str, PassFn]], ctx: PassContext | None = None,
               on_pass: Callable[[PassRecord], None] | None = None) -> list[PassRecord]:
    """Run `passes` in order; verify after each. Returns one record per pass (index 0 = input)."""
    ctx = ctx or PassContext()
    verify(g)
    records = [PassRecord(0, "trace", g, 0.0, (), ())]
    if on_pass:
        on_pass(records[0])
    for i, (name, fn) in enumerate(passes, start=1):
        n_notes = len(ctx.notes)
        before = dict(ctx.counts)
        t0 = time.perf_counter()
        out = fn(g, ctx)
        ms = (time.perf_counter() - t0) * 1e3
        try:
            verify(out)
        except VerifyError as e:
            raise VerifyError(f"{e.what} (after pass {name})", e.where,
                              "this is a compiler bug in the pass; DSR_DEBUG=5 dumps the IR after each pass") from None
        counts = tuple(sorted((k, v - before.get(k, 0)) for k, v in ctx.counts.items() if v != before.get(k, 0)))
        rec = PassRecord(i, name, out, ms, tuple(ctx.notes[n_notes:]), counts)
        records.append(rec)
        if on_pass:
            on_pass(rec)
        g = out
    return records
