"""`--module moe`: the zoo's routed MoE (router, experts, shared experts) on tokens `x [T, H]`.

Listed in `workloads.TABLE`. Weights are seeded
like a trained model (gate logits ~ N(0, 1), a small e_score_correction_bias so that the bias
really shifts the selection). Configs whose routed experts exceed `MAX_REAL_EXPERT_ELEMENTS`
(deepseek-v2-lite: 0.55 G weights, deepseek-v3: 11 G) are built on the meta device: they compile
(shapes are all the compiler needs; derived params are stacked on meta too) but cannot run.
"""
from __future__ import annotations

import torch

from dsr_compiler.models import ModelConfig
from .base import Workload, init_weights, param_bytes

MAX_REAL_EXPERT_ELEMENTS = 1 << 27


def expert_elements(cfg: ModelConfig) -> int:
    return 3 * cfg.n_routed_experts * cfg.moe_intermediate_size * cfg.hidden_size


def build_moe(cfg: ModelConfig, batch: int, seq: int, dtype: torch.dtype, seed: int) -> Workload:
    from dsr_compiler.models.deepseek import MoE
    if expert_elements(cfg) > MAX_REAL_EXPERT_ELEMENTS:
        with torch.device("meta"):
            m = MoE(cfg)
    else:
        m = MoE(cfg)
        init_weights(m, seed)
        bias = m.gate.e_score_correction_bias
        if bias is not None:
            g = torch.Generator().manual_seed(seed + 1)
            bias.copy_(0.05 * torch.randn(bias.shape, generator=g))
    m = m.to(dtype).eval()

    def make(tokens: int, s: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(s)
        return (torch.randn(tokens, cfg.hidden_size, generator=g).to(dtype),)
    return Workload("moe", m, make(batch * seq, seed), {"x": {0: "T"}}, make)


def moe_bytes(cfg: ModelConfig, batch: int, seq: int, isz: int, phase: str | None) -> dict[str, int]:
    h = cfg.hidden_size
    params = 0
    if expert_elements(cfg) <= MAX_REAL_EXPERT_ELEMENTS:     # else built on the meta device
        params = param_bytes(expert_elements(cfg) + 3 * h * cfg.n_shared_experts * cfg.moe_intermediate_size
                             + cfg.n_routed_experts * (h + 1), isz)
    return {"params": params, "example inputs": batch * seq * h * isz}


__all__ = ["MAX_REAL_EXPERT_ELEMENTS", "build_moe", "expert_elements", "moe_bytes"]
