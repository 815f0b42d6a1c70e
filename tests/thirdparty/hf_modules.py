"""Tiny transformers modules built in code (no downloads) for the third-party suite (issue 13).

Each factory returns (module, example_inputs, dynamic, call) where `call(T)` gives inputs with T tokens."""
from __future__ import annotations

import torch
from torch import nn

H = 64


def _init(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name or "layernorm" in name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p.shape[-1]) ** 0.5))
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return m.eval()


def deepseek_config(**kw):
    from transformers import DeepseekV3Config
    base = dict(vocab_size=128, hidden_size=H, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, n_group=2, topk_group=1, num_attention_heads=4, num_key_value_heads=4,
                q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                max_position_embeddings=256, routed_scaling_factor=2.5, norm_topk_prob=True)
    base.update(kw)
    cfg = DeepseekV3Config(**base)
    cfg._attn_implementation = "sdpa"
    return cfg


class WithRotary(nn.Module):
    """An attention or decoder layer called as a model calls it: positions 0..T-1, the model's rotary
    embedding, no mask (causal)."""

    def __init__(self, layer: nn.Module, rotary: nn.Module) -> None:
        super().__init__()
        self.layer, self.rotary = layer, rotary

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(hidden_states.size(1)).unsqueeze(0)
        out = self.layer(hidden_states, position_embeddings=self.rotary(hidden_states, pos), attention_mask=None)
        return out[0] if isinstance(out, tuple) else out


class Logits(nn.Module):
    """A causal LM's logits (no cache)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def _hidden_of(t: int, seed: int = 0, width: int = H) -> tuple:
    return (torch.randn(1, t, width, generator=torch.Generator().manual_seed(seed)),)


def _ids(t: int, seed: int = 0) -> tuple:
    return (torch.randint(0, 128, (1, t), generator=torch.Generator().manual_seed(seed)),)


def build(name: str, experts: str = "eager", attn: str = "sdpa", wide: bool = False, **config):
    """(module, make_inputs(T, seed), dynamic) of one of MODULES; `config` overrides DeepSeek config fields.
    `wide`: every width a multiple of 128 (hidden 128, intermediates 256 / 128), so FP8 blocks apply."""
    if wide:
        return _build_wide(name, experts, attn, **config)
    width = H

    def _hidden(t: int, seed: int = 0) -> tuple:                 # noqa: F811  (this build's width)
        return _hidden_of(t, seed, width)
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
    hid = {"hidden_states": {1: "T"}}
    if name.startswith("deepseek"):
        cfg = deepseek_config(**config)
        cfg._experts_implementation = experts
        cfg._attn_implementation = attn

        def hidden(t: int, seed: int = 0) -> tuple:
            return _hidden_of(t, seed, cfg.hidden_size)
        if name == "deepseek_mlp":
            return _init(ds.DeepseekV3MLP(cfg), 0), hidden, {"x": {1: "T"}}
        if name == "deepseek_moe":
            return _init(ds.DeepseekV3MoE(cfg), 1), hidden, hid
        if name == "deepseek_attention":
            return _init(WithRotary(ds.DeepseekV3Attention(cfg, 0), ds.DeepseekV3RotaryEmbedding(cfg)), 2), hidden, hid
        if name == "deepseek_decoder_layer":
            return _init(WithRotary(ds.DeepseekV3DecoderLayer(cfg, 1), ds.DeepseekV3RotaryEmbedding(cfg)), 3), \
                hidden, hid
        if name == "deepseek_causal_lm":
            return _init(Logits(ds.DeepseekV3ForCausalLM(cfg)), 4), _ids, {"input_ids": {1: "T"}}
    if name == "llama_decoder_layer":
        from transformers import LlamaConfig
        from transformers.models.llama import modeling_llama as ll
        cfg = LlamaConfig(hidden_size=H, intermediate_size=96 if H == 64 else 256, num_attention_heads=4, num_key_value_heads=2,
                          vocab_size=128, max_position_embeddings=256)
        cfg._attn_implementation = "sdpa"
        return _init(WithRotary(ll.LlamaDecoderLayer(cfg, 0), ll.LlamaRotaryEmbedding(cfg)), 5), _hidden, hid
    if name == "qwen3_moe_block":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe import modeling_qwen3_moe as qm
        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=32 if H == 64 else 128, num_experts=8, num_experts_per_tok=2,
                             norm_topk_prob=True, vocab_size=128)
        cfg._experts_implementation = experts
        return _init(qm.Qwen3MoeSparseMoeBlock(cfg), 6), _hidden, hid
    if name == "mixtral_moe_block":
        from transformers import MixtralConfig
        from transformers.models.mixtral import modeling_mixtral as mx
        cfg = MixtralConfig(hidden_size=H, intermediate_size=32 if H == 64 else 128, num_local_experts=4, num_experts_per_tok=2,
                            vocab_size=128)
        cfg._experts_implementation = experts
        return _init(mx.MixtralSparseMoeBlock(cfg), 7), _hidden, hid
    if name == "gpt2_block":
        from transformers import GPT2Config
        from transformers.models.gpt2 import modeling_gpt2 as g2
        cfg = GPT2Config(n_embd=H, n_head=4, n_layer=1, vocab_size=128, n_positions=256)
        cfg._attn_implementation = "sdpa"
        return _init(g2.GPT2Block(cfg), 8), _hidden, hid
    if name == "sequential":
        m = nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H), nn.LayerNorm(H))
        return _init(m, 9), _hidden, {"input": {1: "T"}}
    raise KeyError(name)


def _build_wide(name: str, experts: str, attn: str, **config):
    global H
    saved = H
    H = 128
    try:
        if name.startswith("deepseek"):
            config = {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128,
                      "q_lora_rank": 128, "kv_lora_rank": 128, **config}
        return build(name, experts, attn, **config)
    finally:
        H = saved


MODULES = ("deepseek_mlp", "deepseek_moe", "deepseek_attention", "deepseek_decoder_layer", "deepseek_causal_lm",
           "llama_decoder_layer", "qwen3_moe_block", "mixtral_moe_block", "gpt2_block", "sequential")
