"""Workloads for the CLI: a (module, example inputs, dynamic dims) triple per `--module`.

Each builder constructs a zoo module from a ModelConfig with seeded weights, and example
inputs whose token dimension is symbolic (`T`), so one compile serves every token count.
Before anything is built, `check_footprint` adds up the host bytes the workload will allocate
(each `--module`'s footprint in `TABLE`) and refuses, naming the bytes, what the machine cannot
hold (knob DSR_MAX_HOST_BYTES) or what the kernels' 32-bit token index cannot reach.

`TABLE` lists every `--module` once, in CLI order: its builder (dense.py, moe.py, loss.py, mla.py),
its footprint and its phases (decode | prefill for mla, decoder and model). Adding one is a builder
module plus one row here (docs/architecture.md).
"""
from __future__ import annotations

import os

import torch

from dsr_compiler import knobs
from dsr_compiler.errors import ConfigError, DsrError
from dsr_compiler.models import ModelConfig

from . import dense, loss, mla, moe
from .base import DTYPES, Workload, WorkloadKind, init_weights, param_bytes

TABLE: tuple[WorkloadKind, ...] = (
    WorkloadKind("mlp", dense.build_mlp, dense.mlp_bytes),
    WorkloadKind("moe", moe.build_moe, moe.moe_bytes),
    WorkloadKind("grpo", loss.build_grpo, loss.grpo_bytes),
    WorkloadKind("mtp", loss.build_mtp, loss.mtp_bytes),
    WorkloadKind("mla", mla.build_mla, mla.mla_bytes, mla.PHASES),
    WorkloadKind("decoder", mla.build_decoder, mla.decoder_bytes, mla.PHASES),
    WorkloadKind("model", mla.build_model, mla.model_bytes, mla.PHASES),
)
WORKLOADS: dict[str, WorkloadKind] = {k.name: k for k in TABLE}
MAX_TOKENS = (1 << 31) - 1      # batch x seq: kernels index token rows with 32-bit offsets


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
    parts = WORKLOADS[module].footprint(cfg, batch, seq, isz, phase)
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
    if module not in WORKLOADS:
        raise DsrError(f"unknown --module {module!r}", hint=f"use one of {', '.join(WORKLOADS)}")
    if dtype not in DTYPES:
        raise DsrError(f"unknown --dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    if batch < 1 or seq < 1:
        raise DsrError(f"--batch and --seq must be >= 1, got {batch} and {seq}")
    check_footprint(cfg, module, batch, seq, DTYPES[dtype], phase)     # before anything is allocated
    kind = WORKLOADS[module]
    if not kind.phases:
        if phase is not None:
            names = [k.name for k in TABLE if k.phases]
            with_phases = ", ".join(names[:-1]) + " and " + names[-1]
            raise DsrError(f"--phase {phase}: --module {module} has no decode/prefill phases",
                           where=f"--module {module}", hint=f"--phase applies to --module {with_phases}")
        return kind.build(cfg, batch, seq, DTYPES[dtype], seed)
    return kind.build(cfg, batch, seq, DTYPES[dtype], seed, phase=phase or kind.phases[0])


__all__ = ["DTYPES", "MAX_TOKENS", "TABLE", "WORKLOADS", "Workload", "WorkloadKind", "build", "check_footprint",
           "host_limit", "init_weights", "param_bytes"]
