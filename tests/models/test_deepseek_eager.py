"""Eager DeepSeek modules against independent references, and safetensors checkpoint loading."""
from __future__ import annotations

import pytest
import torch
import torch.fx

from dsr_compiler.errors import DsrError
from dsr_compiler.models import (MLA, MLP, DecoderLayer, DeepSeekModel, ModelConfig, MoE, apply_rope,
                                 load_state_dict_safetensors, rope_cos_sin, save_safetensors)
from dsr_compiler.models.layers import precompute_rope
from dsr_compiler.models.weights import dequantize_fp8_blocks, hf_to_ours, ours_to_hf, quantize_fp8_blocks

TINY = ModelConfig.named("deepseek-v3-tiny")
# V2-style routing on the tiny shapes: softmax scores, group max, no renormalization, no bias.
TINY_SOFTMAX = TINY.replace(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False,
                            routed_scaling_factor=1.0)
# V2-Lite-style attention: queries from one projection.
TINY_NO_QLORA = TINY.replace(q_lora_rank=0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)) * scale


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- routing ------------------------------------------------------------------------------------
def _hf_route(cfg: ModelConfig, weight, bias, x):
    """The HF DeepseekV3 MoEGate (noaux_tc) / V2 group_limited_greedy, with torch.topk."""
    t = x.shape[0]
    scores = (x.float() @ weight.float().T)
    scores = scores.sigmoid() if cfg.scoring_func == "sigmoid" else scores.softmax(-1)
    choice = scores + bias if bias is not None else scores
    if cfg.uses_group_limit:
        g = choice.view(t, cfg.n_group, -1)
        gs = g.topk(2, dim=-1)[0].sum(-1) if bias is not None else g.max(-1).values
        gidx = gs.topk(cfg.topk_group, dim=-1, sorted=False)[1]
        gmask = torch.zeros_like(gs).scatter_(1, gidx, 1)
        smask = gmask.unsqueeze(-1).expand(t, cfg.n_group, cfg.experts_per_group).reshape(t, -1)
        choice = choice.masked_fill(~smask.bool(), float("-inf"))
    idx = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * cfg.routed_scaling_factor, idx


def _by_index(w, idx):
    order = idx.argsort(dim=-1)
    return w.gather(1, order), idx.gather(1, order)


@pytest.mark.parametrize("cfg", [TINY, TINY_SOFTMAX], ids=["sigmoid", "softmax"])
def test_route_matches_hf_reference(cfg):
    moe = MoE(cfg)
    if moe.gate.e_score_correction_bias is not None:
        moe.gate.e_score_correction_bias.copy_(_randn(16, seed=1, scale=0.1))
    x = _randn(64, 256, seed=2)
    w, idx = moe.route(x)
    assert w.dtype == torch.float32 and idx.dtype == torch.int64 and w.shape == idx.shape == (64, 4)
    rw, ridx = _hf_route(cfg, moe.gate.weight, moe.gate.e_score_correction_bias, x)
    w, idx = _by_index(w, idx)
    rw, ridx = _by_index(rw, ridx)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)
    if cfg.norm_topk_prob:
        torch.testing.assert_close(w.sum(-1), torch.full((64,), 2.5), rtol=1e-5, atol=1e-5)


def test_route_slot_order_and_groups():
    moe = MoE(TINY)
    moe.gate.e_score_correction_bias.copy_(_randn(16, seed=3, scale=0.2))
    x = _randn(32, 256, seed=4)
    w, idx = moe.route(x)
    logits = x @ moe.gate.weight.T
    biased = logits.sigmoid() + moe.gate.e_score_correction_bias
    sel = biased.gather(1, idx)
    assert (sel[:, :-1] >= sel[:, 1:]).all(), "slots are ordered by biased score"
    groups = (idx // TINY.experts_per_group)
    assert all(len(set(row.tolist())) <= TINY.topk_group for row in groups)
    # the bias moves selection but not the weights
    picked = logits.sigmoid().gather(1, idx)
    torch.testing.assert_close(w, picked / picked.sum(-1, keepdim=True) * 2.5, rtol=1e-5, atol=1e-6)


def test_route_ties_go_to_lower_index():
    moe = MoE(TINY)
    with torch.no_grad():
        moe.gate.weight.zero_()  # every score 0.5: all experts and groups tie
    w, idx = moe.route(_randn(3, 256, seed=5))
    assert idx.tolist() == [[0, 1, 2, 3]] * 3
    torch.testing.assert_close(w, torch.full((3, 4), 0.625))
    # softmax scoring: same tie rule, weights 1/16 each, no renormalization
    moe2 = MoE(TINY_SOFTMAX)
    with torch.no_grad():
        moe2.gate.weight.zero_()
    w2, idx2 = moe2.route(_randn(2, 256, seed=6))
    assert idx2.tolist() == [[0, 1, 2, 3]] * 2 and moe2.gate.e_score_correction_bias is None
    torch.testing.assert_close(w2, torch.full((2, 4), 1 / 16))


# ---- MoE forward --------------------------------------------------------------------------------
def _dense_moe(moe: MoE, x):
    """Every expert on every token, combined with a dense [T, E] routing matrix."""
    flat = x.reshape(-1, x.shape[-1]).double()
    w, idx = moe.route(x)
    dense = torch.zeros(flat.shape[0], len(moe.experts), dtype=torch.float64).scatter(1, idx, w.double())
    outs = torch.stack([e.double()(flat) for e in moe.experts], dim=1)  # [T, E, H]
    y = (dense.unsqueeze(-1) * outs).sum(1)
    if moe.shared_experts is not None:
        y = y + moe.shared_experts.double()(flat)
    return y.reshape(x.shape)


@pytest.mark.parametrize("cfg", [TINY, TINY_SOFTMAX, TINY.replace(n_shared_experts=0)],
                         ids=["sigmoid", "softmax", "no-shared"])
def test_moe_matches_dense_reference(cfg):
    moe = MoE(cfg)
    x = _randn(2, 5, 256, seed=7)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    ref = _dense_moe(moe, x)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
    assert (moe.shared_experts is None) == (cfg.n_shared_experts == 0)
    if moe.shared_experts is not None:
        assert moe.shared_experts.w1.weight.shape == (cfg.n_shared_experts * 128, 256)


def test_moe_bf16():
    moe = MoE(TINY).to(torch.bfloat16)
    x = _randn(7, 256, seed=8).to(torch.bfloat16)
    y = moe(x)
    assert y.dtype == torch.bfloat16
    # routing runs in fp32 on the same (bf16-valued) inputs and weights, so it picks the same experts
    ref = MoE(TINY)
    ref.load_state_dict({k: v.float() for k, v in moe.state_dict().items()})
    assert torch.equal(moe.route(x)[1], ref.route(x.float())[1])
    torch.testing.assert_close(y.float(), ref(x.float()), rtol=3e-2, atol=3e-2)


# ---- MLA ----------------------------------------------------------------------------------------
def _reference_mla(mla: MLA, x, start_pos: int = 0):
    """The DeepSeek-V3 reference MLA (inference/model.py, attn_impl="naive"), complex RoPE, fp32."""
    cfg = mla.cfg
    bsz, seqlen, _ = x.shape
    cos, sin = precompute_rope(cfg, positions=torch.arange(start_pos, start_pos + seqlen))
    freqs_cis = torch.complex(cos[:, 0::2], sin[:, 0::2])

    def rot(t):
        tc = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
        return torch.view_as_real(tc * freqs_cis.view(1, seqlen, 1, -1)).flatten(3).to(t.dtype)

    q = mla.wq(x) if cfg.q_lora_rank == 0 else mla.wq_b(mla.q_norm(mla.wq_a(x)))
    q = q.view(bsz, seqlen, cfg.num_attention_heads, cfg.qk_head_dim)
    q_nope, q_pe = torch.split(q, [cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
    q_pe = rot(q_pe)
    kv, k_pe = torch.split(mla.wkv_a(x), [cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
    k_pe = rot(k_pe.unsqueeze(2))
    q = torch.cat([q_nope, q_pe], dim=-1)
    kv = mla.wkv_b(mla.kv_norm(kv)).view(bsz, seqlen, cfg.num_attention_heads, -1)
    k_nope, v = torch.split(kv, [cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
    k = torch.cat([k_nope, k_pe.expand(-1, -1, cfg.num_attention_heads, -1)], dim=-1)
    scores = torch.einsum("bshd,bthd->bsht", q, k) * cfg.softmax_scale
    mask = torch.full((seqlen, seqlen), float("-inf")).triu_(1)
    scores = (scores + mask.unsqueeze(1)).softmax(dim=-1, dtype=torch.float32)
    return mla.wo(torch.einsum("bsht,bthd->bshd", scores, v).flatten(2))


@pytest.mark.parametrize("cfg", [TINY, TINY_NO_QLORA], ids=["q_lora", "no_q_lora"])
@pytest.mark.parametrize("absorb", [False, True])
def test_mla_matches_reference(cfg, absorb):
    mla = MLA(cfg, absorb=absorb)
    x = _randn(2, 6, 256, seed=9)
    for start_pos in (0, 11):
        torch.testing.assert_close(mla(x, start_pos), _reference_mla(mla, x, start_pos), rtol=1e-5, atol=2e-6)
    assert hasattr(mla, "wq") == (cfg.q_lora_rank == 0) and hasattr(mla, "wq_a") == (cfg.q_lora_rank > 0)
    assert mla.wkv_a.weight.shape == (128 + 32, 256) and mla.wkv_b.weight.shape == (4 * 64, 128)


def test_mla_decode_matches_prefill():
    mla = MLA(TINY)
    x = _randn(2, 9, 256, seed=10)
    full = mla(x)
    kv, pe = mla.init_cache(2, 12)
    outs = []
    for absorb in (False, True):
        kv_c, pe_c = kv, pe
        o1, kv_c, pe_c = mla.decode(x[:, :4], kv_c, pe_c, 0, absorb=absorb)
        o2, kv_c, pe_c = mla.decode(x[:, 4:8], kv_c, pe_c, torch.tensor(4), absorb=absorb)
        o3, kv_c, pe_c = mla.decode(x[:, 8:], kv_c, pe_c, 8, absorb=absorb)
        outs.append(torch.cat([o1, o2, o3], dim=1))
        assert torch.equal(kv_c[:, 9:], torch.zeros(2, 3, 128)), "only positions < 9 written"
    assert torch.equal(kv, torch.zeros_like(kv)), "decode works on copies of the cache"
    for out in outs:
        torch.testing.assert_close(out, full, rtol=1e-5, atol=2e-6)


def test_mla_naive_absorb_agree_bf16():
    mla = MLA(TINY).to(torch.bfloat16)
    assert mla.inv_freq.dtype == torch.float32, "RoPE frequencies stay fp32 under .to(bf16)"
    x = _randn(1, 8, 256, seed=11).to(torch.bfloat16)
    naive = mla(x)
    mla.absorb = True
    absorbed = mla(x)
    assert naive.dtype == absorbed.dtype == torch.bfloat16
    torch.testing.assert_close(naive.float(), absorbed.float(), rtol=3e-2, atol=3e-2)
    ref = MLA(TINY)
    ref.load_state_dict({k: v.float() for k, v in mla.state_dict().items()})
    torch.testing.assert_close(naive.float(), ref(x.float()), rtol=5e-2, atol=5e-2)


def test_mla_fx_trace_keeps_rope_calls():
    mla = MLA(TINY)
    gm = torch.fx.symbolic_trace(mla)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(apply_rope) == 2 and targets.count(rope_cos_sin) == 1
    x = _randn(2, 5, 256, seed=12)
    assert torch.equal(gm(x), mla(x))


def test_mla_decode_bad_inputs():
    mla = MLA(TINY)
    kv, pe = mla.init_cache(1, 4)
    x = _randn(1, 2, 256, seed=13)
    with pytest.raises(DsrError, match="cache overflow"):
        mla.decode(x, kv, pe, 3)
    with pytest.raises(DsrError, match="kv_cache"):
        mla.decode(x, kv[..., :64], pe, 0)
    with pytest.raises(DsrError, match="start_pos"):
        mla.decode(x, kv, pe, -1)
    with pytest.raises(DsrError, match="shape"):
        mla(_randn(2, 256, seed=14))


# ---- layer and model ----------------------------------------------------------------------------
def test_decoder_layers_dense_then_moe():
    dense, moe = DecoderLayer(TINY, 0), DecoderLayer(TINY, 1)
    assert isinstance(dense.ffn, MLP) and isinstance(moe.ffn, MoE)
    x = _randn(2, 4, 256, seed=15)
    for layer in (dense, moe):
        h = x + layer.attn(layer.attn_norm(x))
        torch.testing.assert_close(layer(x), h + layer.ffn(layer.ffn_norm(h)))


def test_model_forward_and_decode():
    model = DeepSeekModel(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (2, 7), generator=_gen(16))
    logits = model(tokens)
    assert logits.shape == (2, 7, TINY.vocab_size) and torch.isfinite(logits).all()
    caches = model.init_cache(2, 8)
    l1, caches = model.decode(tokens[:, :5], caches, 0)
    l2, caches = model.decode(tokens[:, 5:], caches, 5, absorb=True)
    torch.testing.assert_close(torch.cat([l1, l2], dim=1), logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(DsrError, match="integer tokens"):
        model(tokens.float())


def test_model_bf16_runs():
    model = DeepSeekModel(TINY).to(torch.bfloat16)
    logits = model(torch.randint(0, TINY.vocab_size, (1, 4), generator=_gen(17)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


# ---- checkpoints --------------------------------------------------------------------------------
def test_name_mapping():
    cases = {
        "model.embed_tokens.weight": "embed.weight",
        "lm_head.weight": "head.weight",
        "model.norm.weight": "norm.weight",
        "model.layers.0.input_layernorm.weight": "layers.0.attn_norm.weight",
        "model.layers.0.post_attention_layernorm.weight": "layers.0.ffn_norm.weight",
        "model.layers.0.self_attn.q_a_proj.weight": "layers.0.attn.wq_a.weight",
        "model.layers.0.self_attn.q_a_layernorm.weight": "layers.0.attn.q_norm.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": "layers.0.attn.wkv_a.weight",
        "model.layers.0.self_attn.o_proj.weight": "layers.0.attn.wo.weight",
        "model.layers.0.mlp.gate_proj.weight": "layers.0.ffn.w1.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias": "layers.1.ffn.gate.e_score_correction_bias",
        "model.layers.1.mlp.experts.15.up_proj.weight": "layers.1.ffn.experts.15.w3.weight",
        "model.layers.1.mlp.shared_experts.down_proj.weight": "layers.1.ffn.shared_experts.w2.weight",
    }
    for hf, ours in cases.items():
        assert hf_to_ours(hf) == ours and ours_to_hf(ours) == hf


def _hf_checkpoint(model: DeepSeekModel, fp8_names=()) -> dict[str, torch.Tensor]:
    """HF-named tensors of ``model``; the named weights become FP8 + scale (model updated to match)."""
    out = {}
    for name, t in model.state_dict().items():
        hf = ours_to_hf(name)
        if name in fp8_names:
            q, s = quantize_fp8_blocks(t)
            with torch.no_grad():
                t.copy_(dequantize_fp8_blocks(q, s))
            out[hf], out[hf + "_scale_inv"] = q, s
        else:
            out[hf] = t.to(torch.bfloat16) if t.dim() == 2 and "gate" not in name else t.clone()
    return out


FP8_NAMES = ("layers.0.attn.wkv_a.weight", "layers.1.ffn.experts.3.w1.weight", "layers.0.attn.wq_b.weight")


def test_checkpoint_roundtrip_with_fp8(tmp_path):
    src = DeepSeekModel(TINY)
    tensors = _hf_checkpoint(src, FP8_NAMES)
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)  # 160 rows: ragged
    # stored bf16 weights: the source model holds the same rounded values
    with torch.no_grad():
        for name, t in src.state_dict().items():
            if name not in FP8_NAMES:
                t.copy_(tensors[ours_to_hf(name)].float())
    path = tmp_path / "model.safetensors"
    save_safetensors(tensors, path)
    dst = load_state_dict_safetensors(DeepSeekModel(TINY), path)
    for name, t in src.state_dict().items():
        assert torch.equal(dst.state_dict()[name], t), name
    tokens = torch.randint(0, TINY.vocab_size, (1, 5), generator=_gen(18))
    assert torch.equal(dst(tokens), src(tokens))


def test_fp8_block_quantization_error_small():
    w = _randn(300, 200, seed=19)
    q, s = quantize_fp8_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    torch.testing.assert_close(dequantize_fp8_blocks(q, s), w, rtol=0.07, atol=1e-2)


def test_checkpoint_sharded_dir_and_prefix(tmp_path):
    src = DeepSeekModel(TINY)
    tensors = {ours_to_hf(k): v for k, v in src.state_dict().items()}
    names = sorted(tensors)
    save_safetensors({k: tensors[k] for k in names[::2]}, tmp_path / "model-00001.safetensors")
    save_safetensors({k: tensors[k] for k in names[1::2]}, tmp_path / "model-00002.safetensors")
    dst = load_state_dict_safetensors(DeepSeekModel(TINY), tmp_path)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    moe = load_state_dict_safetensors(MoE(TINY), tmp_path, prefix="model.layers.1.mlp.")
    assert torch.equal(moe.experts[5].w3.weight, src.layers[1].ffn.experts[5].w3.weight)
    assert torch.equal(moe.gate.e_score_correction_bias, src.layers[1].ffn.gate.e_score_correction_bias)


def test_checkpoint_mismatches_reported_together(tmp_path):
    src = DeepSeekModel(TINY)
    tensors = {ours_to_hf(k): v for k, v in src.state_dict().items()}
    del tensors["model.layers.1.mlp.experts.7.down_proj.weight"]                   # missing
    del tensors["model.norm.weight"]                                              # missing
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)         # mis-shaped
    tensors["model.layers.2.self_attn.o_proj.weight"] = torch.zeros(3, 3)         # unknown (an MTP-like layer)
    q, _ = quantize_fp8_blocks(torch.ones(256, 256))
    tensors["model.layers.0.self_attn.q_a_proj.weight"] = q[:128]                 # FP8 without scale
    path = tmp_path / "bad.safetensors"
    save_safetensors(tensors, path)
    with pytest.raises(DsrError) as e:
        load_state_dict_safetensors(DeepSeekModel(TINY), path)
    msg = str(e.value)
    for needle in ("experts.7.down_proj", "model.norm.weight", "shape (3, 3), expected (256, 128)",
                   "model.layers.2.self_attn.o_proj.weight", "q_a_proj.weight: FP8 weight without",
                   "2 missing", "1 mis-shaped", "1 invalid", "1 unknown", str(path)):
        assert needle in msg, (needle, msg)
    assert msg.count("q_a_proj") == 1, "an invalid tensor is not also listed as missing"


def test_checkpoint_strict_false_ignores_unknown(tmp_path):
    src = DeepSeekModel(TINY)
    tensors = {ours_to_hf(k): v for k, v in src.state_dict().items()}
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(4, 4)
    save_safetensors(tensors, tmp_path / "m.safetensors")
    with pytest.raises(DsrError, match="unknown"):
        load_state_dict_safetensors(DeepSeekModel(TINY), tmp_path / "m.safetensors")
    load_state_dict_safetensors(DeepSeekModel(TINY), tmp_path / "m.safetensors", strict=False)


def test_checkpoint_bad_fp8_scale_shape(tmp_path):
    prefix = "model.layers.0.self_attn."
    tensors = {ours_to_hf(k, prefix): v for k, v in MLA(TINY).state_dict().items()}
    q, s = quantize_fp8_blocks(tensors[prefix + "o_proj.weight"])  # [256, 128] -> scale (2, 1)
    tensors[prefix + "o_proj.weight"], tensors[prefix + "o_proj.weight_scale_inv"] = q, s[:1]
    save_safetensors(tensors, tmp_path / "a.safetensors")
    with pytest.raises(DsrError, match=r"o_proj.weight_scale_inv: shape \(1, 1\), expected \(2, 1\)"):
        load_state_dict_safetensors(MLA(TINY), tmp_path / "a.safetensors", prefix=prefix)


def test_checkpoint_unreadable(tmp_path):
    with pytest.raises(DsrError, match="not found"):
        load_state_dict_safetensors(MLP(4, 8), tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(DsrError, match="cannot read"):
        load_state_dict_safetensors(MLP(4, 8), junk)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(DsrError, match="no .safetensors"):
        load_state_dict_safetensors(MLP(4, 8), empty)
