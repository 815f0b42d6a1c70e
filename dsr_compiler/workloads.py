"""Workloads for the CLI: a (module, example inputs, dynamic dims) triple per `--module`.

Each builder constructs a zoo module from a ModelConfig with seeded weights, and example
inputs whose token dimension is symbolic (`T`), so one compile serves every token count.
Before anything is built, `check_footprint` adds up the host bytes the workload will allocate
(each `--module` registers its count in `FOOTPRINTS`) and refuses, naming the bytes, what the
machine cannot hold (knob DSR_MAX_HOST_BYTES) or what the kernels' 32-bit token index cannot reach.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dsr_compiler import knobs
from dsr_compiler.errors import ConfigError, DsrError
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


def _mlp_bytes(cfg: ModelConfig, batch: int, seq: int, isz: int, phase: str | None) -> dict[str, int]:
    return {"params": param_bytes(3 * cfg.hidden_size * cfg.intermediate_size + cfg.hidden_size, isz),
            "example inputs": batch * seq * cfg.hidden_size * isz}


BUILDERS: dict[str, Callable[..., Workload]] = {"mlp": _mlp}
# --module -> (cfg, batch, seq, itemsize, phase) -> {"params" | "example inputs" | "caches" | ...: host bytes}
FOOTPRINTS: dict[str, Callable[..., dict[str, int]]] = {"mlp": _mlp_bytes}
MAX_TOKENS = (1 << 31) - 1      # batch x seq: kernels index token rows with 32-bit offsets


def param_bytes(elements: int, isz: int) -> int:
    """Host bytes of materialized weights: built in fp32, seeded, then cast to the dtype."""
    return elements * (4 + (isz if isz != 4 else 0))


def host_limit() -> int:
    """DSR_MAX_HOST_BYTES, or the machine's physical memory."""
    limit = knobs.get("DSR_MAX_HOST_BYTES")
    if limit:
        return limit
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):   # no sysconf: no host bound beyond the allocator's
        return 1 << 62


def check_footprint(cfg: ModelConfig, module: str, batch: int, seq: int, dtype: torch.dtype,
                    phase: str | None = None) -> dict[str, int]:
    """The host bytes of the workload, by part; a ConfigError naming them when they cannot fit."""
    where = f"--module {module} --batch {batch} --seq {seq} ({cfg.name})"
    if batch * seq > MAX_TOKENS:
        raise ConfigError(f"--batch x --seq = {batch * seq:,} tokens: more than the {MAX_TOKENS:,} the kernels "
                          "index with 32-bit offsets", where=where, hint="lower --batch or --seq")
    isz = torch.empty((), dtype=dtype).element_size()
    parts = FOOTPRINTS[module](cfg, batch, seq, isz, phase)
    total, limit = sum(parts.values()), host_limit()
    if total > limit:
        shown = ", ".join(f"{k} {v:,}" for k, v in parts.items() if v)
        raise ConfigError(f"the workload needs {total:,} bytes of host memory ({shown}), more than the {limit:,} "
                          "available", where=where,
                          hint="lower --seq or --batch, or use a smaller config; the limit is the machine's memory "
                               "or DSR_MAX_HOST_BYTES")
    return parts


def build(cfg: ModelConfig, module: str, batch: int = 1, seq: int = 16, dtype: str = "f32", seed: int = 0,
          phase: str | None = None) -> Workload:
    """The workload of `--module`; `phase` (decode | prefill) for the modules that have both (mla, decoder, model)."""
    if module not in BUILDERS:
        raise DsrError(f"unknown --module {module!r}", hint=f"use one of {', '.join(BUILDERS)}")
    if dtype not in DTYPES:
        raise DsrError(f"unknown --dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    if batch < 1 or seq < 1:
        raise DsrError(f"--batch and --seq must be >= 1, got {batch} and {seq}")
    check_footprint(cfg, module, batch, seq, DTYPES[dtype], phase)     # before anything is allocated
    if phase is not None:
        if "phase" not in inspect.signature(BUILDERS[module]).parameters:
            raise DsrError(f"--phase {phase}: --module {module} has no decode/prefill phases",
                           where=f"--module {module}", hint="--phase applies to --module mla, decoder and model")
        return BUILDERS[module](cfg, batch, seq, DTYPES[dtype], seed, phase=phase)
    return BUILDERS[module](cfg, batch, seq, DTYPES[dtype], seed)


from dsr_compiler import workloads_moe  # noqa: E402,F401  (registers BUILDERS["moe"])
from dsr_compiler import workloads_loss  # noqa: E402,F401  (registers BUILDERS["grpo"], BUILDERS["mtp"])
from dsr_compiler import workloads_mla  # noqa: E402,F401  (registers BUILDERS["mla", "decoder", "model"])
