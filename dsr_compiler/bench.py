"""Measurements of DESIGN §8 that run without a GPU, printed as ratios against eager.

- kernel launches and modeled DRAM bytes: compiled plan vs eager PyTorch, where eager is
  counted per ATen op with a TorchDispatchMode summing each op's input and output bytes;
- compile time: cold (empty artifact cache) and warm (cache hit), and `torch.compile`
  (inductor, CPU) of the same module in the same run.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dsr_compiler import knobs

_FREE_OPS = {"aten.view.default", "aten._unsafe_view.default", "aten.t.default", "aten.transpose.int",
             "aten.permute.default", "aten.expand.default", "aten.unsqueeze.default", "aten.squeeze.dim",
             "aten.detach.default", "aten.alias.default", "aten.slice.Tensor", "aten.select.int",
             "aten.reshape.default", "aten.as_strided.default", "aten.split.Tensor", "aten.unbind.int"}


@dataclass
class EagerCount:
    ops: int = 0
    view_ops: int = 0
    bytes: int = 0
    names: dict | None = None


class CountingMode(TorchDispatchMode):
    """Counts ATen ops that launch work (views excluded) and the bytes they touch."""

    def __init__(self):
        super().__init__()
        self.c = EagerCount(names={})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name in _FREE_OPS:
            self.c.view_ops += 1
            return out
        self.c.ops += 1
        self.c.names[name] = self.c.names.get(name, 0) + 1
        seen = set()
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                self.c.bytes += t.numel() * t.element_size()
        return out


def count_eager(module, inputs) -> EagerCount:
    with torch.no_grad(), CountingMode() as m:
        module(*inputs)
    return m.c


def bench_workload(wl, fp8: bool = False, target: str = "sm_90a", progress=None) -> str:
    """The figures as text. `progress` (dsr_compiler/progress.py) gets a part per measurement."""
    import dsr_compiler as dsr

    def part(label: str) -> None:
        if progress is not None:
            progress.part(label)

    part("eager ATen count")
    eager = count_eager(wl.module, wl.example_inputs)
    with tempfile.TemporaryDirectory() as d, knobs.scoped(DSR_CACHE_DIR=d):
        part("cold compile")
        t0 = time.perf_counter()
        cm = dsr.compile(wl.module, wl.example_inputs, fp8=fp8, target=target, dynamic=wl.dynamic, name=wl.name,
                         progress=progress)
        cold = time.perf_counter() - t0
        part("warm compile")
        t0 = time.perf_counter()
        dsr.compile(wl.module, wl.example_inputs, fp8=fp8, target=target, dynamic=wl.dynamic, name=wl.name,
                    progress=progress)
        warm = time.perf_counter() - t0
    rep = cm.report()
    kbytes = rep["totals"]["bytes"]
    lines = [
        f"workload {wl.name}: example sizes {rep['example_sizes']}",
        f"  launches: compiled {len(cm.kernels)} kernels vs eager {eager.ops} ATen ops "
        f"(+{eager.view_ops} free views): ratio {len(cm.kernels) / max(eager.ops, 1):.2f}",
        f"  modeled DRAM bytes: compiled {kbytes} vs eager {eager.bytes}: ratio {kbytes / max(eager.bytes, 1):.2f}",
        f"  compile time: cold {cold * 1e3:.0f} ms, warm (cache) {warm * 1e3:.0f} ms: warm/cold {warm / cold:.2f}",
    ]
    part("torch.compile (inductor)")
    try:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        fn = torch.compile(wl.module)
        with torch.no_grad():
            fn(*wl.example_inputs)
        tc = time.perf_counter() - t0
        lines.append(f"  torch.compile (inductor, CPU) first call: {tc * 1e3:.0f} ms: dsrc cold / torch.compile {cold / tc:.2f}")
    except Exception as e:  # a missing C++ toolchain must not hide our own figures
        lines.append(f"  torch.compile unavailable here: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    lines.append("  eager ATen ops: " + ", ".join(f"{k.replace('aten.', '')}x{v}" for k, v in sorted(eager.names.items())))
    return "\n".join(lines)
