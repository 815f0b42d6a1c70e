"""`--module mla|decoder|model`: MLA attention, a decoder layer, the whole model; decode or prefill.

Listed in `workloads.TABLE` with phases `PHASES`. `--phase` picks what
is compiled (default `decode`, the step that `--mla naive|absorb` is about):

  decode   one new token per sequence against a KV cache of `--seq` positions, `--batch` sequences
           (symbol B); the caches and `start_pos` are inputs, the updated caches outputs:
             mla / decoder: (x [B, 1, H], kv_cache [B, S, kv_lora], pe_cache [B, S, rope], start_pos)
                            -> (out [B, 1, H], kv_cache, pe_cache)        (models.steps.DecodeStep)
             model:         (tokens [B, 1], kv_caches [L, B, S, kv_lora], pe_caches [L, B, S, rope], start_pos)
                            -> (logits [B, 1, V], kv_caches, pe_caches)   (models.steps.ModelDecodeStep)
           make_inputs draws random caches (every position filled; the position mask hides those
           past start_pos) and start_pos in [0, S).
  prefill  causal self-attention over `--seq` tokens (symbol S), `--batch` sequences:
             mla / decoder: x [B, S, H] -> [B, S, H];  model: tokens [B, S] -> logits [B, S, V]

`decoder` is the last layer of the config (a MoE layer when the config has routed experts).
Configs whose weights exceed `MAX_REAL_ELEMENTS` are built on the meta device: compile-only.
"""
from __future__ import annotations

import torch
from torch import nn

from dsr_compiler.errors import DsrError
from dsr_compiler.models import ModelConfig
from .base import Workload, init_weights, param_bytes

MAX_REAL_ELEMENTS = 1 << 27
PHASES = ("decode", "prefill")


def _build(make_module, cfg: ModelConfig, dtype: torch.dtype, seed: int, elements: int) -> nn.Module:
    if elements > MAX_REAL_ELEMENTS:
        with torch.device("meta"):
            m = make_module()
    else:
        m = make_module()
        init_weights(m, seed)
    return m.to(dtype).eval()


def mla_elements(cfg: ModelConfig) -> int:
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    q = h * nh * cfg.qk_head_dim if cfg.q_lora_rank == 0 else cfg.q_lora_rank * (h + nh * cfg.qk_head_dim)
    kv = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + nh * cfg.v_head_dim * h


def layer_elements(cfg: ModelConfig, layer_id: int) -> int:
    if cfg.is_moe_layer(layer_id):
        ffn = 3 * cfg.hidden_size * cfg.moe_intermediate_size * (cfg.n_routed_experts + cfg.n_shared_experts)
    else:
        ffn = 3 * cfg.hidden_size * cfg.intermediate_size
    return mla_elements(cfg) + ffn


def _check_phase(phase: str, module: str) -> None:
    if phase not in PHASES:
        raise DsrError(f"unknown --phase {phase!r}", where=f"--module {module}", hint="use decode or prefill")


def _decode_inputs(cfg: ModelConfig, batch: int, seq: int, dtype: torch.dtype, s: int, layers: int | None):
    """(x or tokens, kv caches, pe caches, start_pos), seeded; layers=None: one layer's caches [B, S, .]."""
    g = torch.Generator().manual_seed(s)
    lead = (batch, seq) if layers is None else (layers, batch, seq)
    kv = torch.randn(lead + (cfg.kv_lora_rank,), generator=g).to(dtype)
    pe = torch.randn(lead + (cfg.qk_rope_head_dim,), generator=g).to(dtype)
    start = torch.randint(0, seq, (), generator=g, dtype=torch.int64)
    if layers is None:
        x = torch.randn(batch, 1, cfg.hidden_size, generator=g).to(dtype)
    else:
        x = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g, dtype=torch.int64)
    return x, kv, pe, start


def _block(name: str, make_module, elements, cfg: ModelConfig, batch: int, seq: int, dtype: torch.dtype, seed: int,
           phase: str) -> Workload:
    """mla / decoder: one block with the decode or prefill interface."""
    from dsr_compiler.models.steps import DecodeStep
    _check_phase(phase, name)
    m = _build(make_module, cfg, dtype, seed, elements)
    if phase == "prefill":
        def make(tokens: int, s: int) -> tuple[torch.Tensor, ...]:
            g = torch.Generator().manual_seed(s)
            return (torch.randn(batch, seq, cfg.hidden_size, generator=g).to(dtype),)
        return Workload(name, m, make(batch * seq, seed), {"x": {1: "S"}}, make)

    def make_decode(tokens: int, s: int) -> tuple[torch.Tensor, ...]:
        return _decode_inputs(cfg, batch, seq, dtype, s, None)
    dyn = {"x": {0: "B"}, "kv_cache": {0: "B"}, "pe_cache": {0: "B"}}
    return Workload(name, DecodeStep(m).eval(), make_decode(batch * seq, seed), dyn, make_decode)


def build_mla(cfg: ModelConfig, batch: int, seq: int, dtype: torch.dtype, seed: int, phase: str = "decode") -> Workload:
    from dsr_compiler.models.deepseek import MLA
    return _block("mla", lambda: MLA(cfg), mla_elements(cfg), cfg, batch, seq, dtype, seed, phase)


def build_decoder(cfg: ModelConfig, batch: int, seq: int, dtype: torch.dtype, seed: int,
             phase: str = "decode") -> Workload:
    from dsr_compiler.models.deepseek import DecoderLayer
    layer = cfg.num_hidden_layers - 1
    return _block("decoder", lambda: DecoderLayer(cfg, layer), layer_elements(cfg, layer), cfg, batch, seq, dtype,
                  seed, phase)


def build_model(cfg: ModelConfig, batch: int, seq: int, dtype: torch.dtype, seed: int, phase: str = "decode") -> Workload:
    from dsr_compiler.models.deepseek import DeepSeekModel
    from dsr_compiler.models.steps import ModelDecodeStep
    _check_phase(phase, "model")
    elements = model_elements(cfg)
    m = _build(lambda: DeepSeekModel(cfg), cfg, dtype, seed, elements)
    if phase == "prefill":
        def make(tokens: int, s: int) -> tuple[torch.Tensor, ...]:
            g = torch.Generator().manual_seed(s)
            return (torch.randint(0, cfg.vocab_size, (batch, seq), generator=g, dtype=torch.int64),)
        return Workload("model", m, make(batch * seq, seed), {"tokens": {1: "S"}}, make)

    def make_decode(tokens: int, s: int) -> tuple[torch.Tensor, ...]:
        return _decode_inputs(cfg, batch, seq, dtype, s, cfg.num_hidden_layers)
    dyn = {"tokens": {0: "B"}, "kv_caches": {1: "B"}, "pe_caches": {1: "B"}}
    return Workload("model", ModelDecodeStep(m).eval(), make_decode(batch * seq, seed), dyn, make_decode)


def model_elements(cfg: ModelConfig) -> int:
    return sum(layer_elements(cfg, i) for i in range(cfg.num_hidden_layers)) + 2 * cfg.vocab_size * cfg.hidden_size


def _step_bytes(cfg: ModelConfig, batch: int, seq: int, isz: int, phase: str | None, elements: int,
                layers: int | None) -> dict[str, int]:
    """mla / decoder (layers None) and model: weights unless on meta, then the phase's inputs and caches."""
    params = param_bytes(elements, isz) if elements <= MAX_REAL_ELEMENTS else 0
    if phase == "prefill":
        per_token = 8 if layers is not None else cfg.hidden_size * isz      # token ids (int64) or x
        return {"params": params, "example inputs": batch * seq * per_token}
    x = batch * (8 if layers is not None else cfg.hidden_size * isz)
    caches = (layers or 1) * batch * seq * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * isz
    return {"params": params, "example inputs": x + 8, "caches": caches}


def mla_bytes(cfg: ModelConfig, batch: int, seq: int, isz: int, phase: str | None) -> dict[str, int]:
    return _step_bytes(cfg, batch, seq, isz, phase or "decode", mla_elements(cfg), None)


def decoder_bytes(cfg: ModelConfig, batch: int, seq: int, isz: int, phase: str | None) -> dict[str, int]:
    return _step_bytes(cfg, batch, seq, isz, phase or "decode", layer_elements(cfg, cfg.num_hidden_layers - 1), None)


def model_bytes(cfg: ModelConfig, batch: int, seq: int, isz: int, phase: str | None) -> dict[str, int]:
    return _step_bytes(cfg, batch, seq, isz, phase or "decode", model_elements(cfg), cfg.num_hidden_layers)


__all__ = ["MAX_REAL_ELEMENTS", "PHASES", "build_decoder", "build_mla", "build_model", "decoder_bytes",
           "layer_elements", "mla_bytes", "mla_elements", "model_bytes", "model_elements"]
