"""What every workload shares: the `Workload` a builder returns, the `WorkloadKind` record of the
table in `__init__.py`, seeded weights and the host-byte arithmetic of the footprints."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Workload:
    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    dynamic: dict[str, dict[int, str]]
    make_inputs: Callable[[int, int], tuple[torch.Tensor, ...]]   # (tokens, seed) -> inputs
    grad_wrt: tuple[str, ...] = ()    # forward inputs to differentiate the (scalar) output w.r.t.


def init_weights(module: nn.Module, seed: int) -> None:
    """Deterministic weights scaled like a trained model (rows ~ unit RMS after the matmul)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


@dataclass(frozen=True)
class WorkloadKind:
    """One `--module`: its builder, its host-byte footprint and the phases it has.

    build(cfg, batch, seq, dtype, seed[, phase=...]) -> Workload (phase only when `phases` is not
    empty; the first phase is the default); footprint(cfg, batch, seq, itemsize, phase) ->
    {"params" | "example inputs" | "caches" | ...: host bytes}, computed before anything is built."""

    name: str
    build: Callable[..., Workload]
    footprint: Callable[..., dict[str, int]]
    phases: tuple[str, ...] = ()


def param_bytes(elements: int, isz: int) -> int:
    """Host bytes of materialized weights: built in fp32, seeded, then cast to the dtype."""
    return elements * (4 + (isz if isz != 4 else 0))


__all__ = ["DTYPES", "Workload", "WorkloadKind", "init_weights", "param_bytes"]
