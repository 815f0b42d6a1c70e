"""`--module mlp`: the zoo's RMSNorm + SwiGLU MLP + residual block on tokens `x [T, H]`."""
from __future__ import annotations

import torch

from dsr_compiler.models import ModelConfig

from .base import Workload, init_weights, param_bytes


def build_mlp(cfg: ModelConfig, batch: int, seq: int, dtype: torch.dtype, seed: int) -> Workload:
    from dsr_compiler.models.layers import MLPBlock
    m = MLPBlock(cfg)
    init_weights(m, seed)
    m = m.to(dtype).eval()

    def make(tokens: int, s: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(s)
        return (torch.randn(tokens, cfg.hidden_size, generator=g).to(dtype),)
    return Workload("mlp", m, make(batch * seq, seed), {"x": {0: "T"}}, make)


def mlp_bytes(cfg: ModelConfig, batch: int, seq: int, isz: int, phase: str | None) -> dict[str, int]:
    return {"params": param_bytes(3 * cfg.hidden_size * cfg.intermediate_size + cfg.hidden_size, isz),
            "example inputs": batch * seq * cfg.hidden_size * isz}


__all__ = ["build_mlp", "mlp_bytes"]
