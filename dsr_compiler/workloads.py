"""Workloads for the CLI: a (module, example inputs, dynamic dims) triple per `--module`.

Each builder constructs a zoo module from a ModelConfig with seeded weights, and example
inputs whose token dimension is symbolic (`T`), so one compile serves every token count.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dsr_compiler.errors import DsrError
from dsr_compiler.models import ModelConfig

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Workload:
    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    dynamic: dict[str, dict[int, str]]
    make_inputs: Callable[[int, int], tuple[torch.Tensor, ...]]   # (tokens, seed) -> inputs
    grad_wrt: tuple[str, ...] = ()    # forward inputs to differentiate the (scalar) output w.r.t.


def _init_(module: nn.Module, seed: int) -> None:
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


def _mlp(cfg: ModelConfig, batch: int, seq: int, dtype: torch.dtype, seed: int) -> Workload:
    from dsr_compiler.models.layers import MLPBlock
    m = MLPBlock(cfg)
    _init_(m, seed)
    m = m.to(dtype).eval()

    def make(tokens: int, s: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(s)
        return (torch.randn(tokens, cfg.hidden_size, generator=g).to(dtype),)
    return Workload("mlp", m, make(batch * seq, seed), {"x": {0: "T"}}, make)


BUILDERS: dict[str, Callable[..., Workload]] = {"mlp": _mlp}


def build(cfg: ModelConfig, module: str, batch: int = 1, seq: int = 16, dtype: str = "f32", seed: int = 0,
          phase: str | None = None) -> Workload:
    """The workload of `--module`; `phase` (decode | prefill) for the modules that have both (mla, decoder, model)."""
    if module not in BUILDERS:
        raise DsrError(f"unknown --module {module!r}", hint=f"use one of {', '.join(BUILDERS)}")
    if dtype not in DTYPES:
        raise DsrError(f"unknown --dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    if batch < 1 or seq < 1:
        raise DsrError(f"--batch and --seq must be >= 1, got {batch} and {seq}")
    if phase is not None:
        if "phase" not in inspect.signature(BUILDERS[module]).parameters:
            raise DsrError(f"--phase {phase}: --module {module} has no decode/prefill phases",
                           where=f"--module {module}", hint="--phase applies to --module mla, decoder and model")
        return BUILDERS[module](cfg, batch, seq, DTYPES[dtype], seed, phase=phase)
    return BUILDERS[module](cfg, batch, seq, DTYPES[dtype], seed)


from dsr_compiler import workloads_moe  # noqa: E402,F401  (registers BUILDERS["moe"])
from dsr_compiler import workloads_loss  # noqa: E402,F401  (registers BUILDERS["grpo"], BUILDERS["mtp"])
from dsr_compiler import workloads_mla  # noqa: E402,F401  (registers BUILDERS["mla", "decoder", "model"])
