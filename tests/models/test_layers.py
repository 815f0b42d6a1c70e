"""Eager building blocks: numerics against fp64/complex references, dtypes, and FX traceability."""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx
from torch import nn

from dsr_compiler.errors import ConfigError
from dsr_compiler.models import layers
from dsr_compiler.models.config import ModelConfig, RopeScaling
from dsr_compiler.models.layers import (MLP, MLPBlock, RMSNorm, apply_rope, precompute_rope, rope_cos_sin,
                                        rope_inv_freq, rotate_pairs)

TINY = ModelConfig.named("deepseek-v3-tiny")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- RMSNorm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_fp64(dtype):
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=_gen(1)))
    norm = norm.to(dtype)
    x = (torch.randn(3, 5, 64, generator=_gen(2)) * 3).to(dtype)
    y = norm(x)
    assert y.dtype == dtype and y.shape == x.shape
    x64, w64 = x.double(), norm.weight.double()
    ref = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    else:
        # one rounding at the end: equal to the fp64 result rounded to bf16 (up to 1 ulp at ties)
        torch.testing.assert_close(y, ref.to(dtype), rtol=8e-3, atol=0)


def test_rmsnorm_single_cast_in_bf16():
    """The weight multiply happens in fp32 before the one cast (not after a bf16 rounding)."""
    norm = RMSNorm(128).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(128, generator=_gen(3)).to(torch.bfloat16))
    x = torch.randn(4, 128, generator=_gen(4)).to(torch.bfloat16)
    xf = x.float()
    expect = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.float()).to(torch.bfloat16)
    assert torch.equal(norm(x), expect)


# ---- MLP / MLPBlock -----------------------------------------------------------------------------
def test_mlp_swiglu():
    mlp = MLP(32, 48)
    x = torch.randn(2, 7, 32, generator=_gen(5))
    ref = mlp.w2.weight @ (torch.nn.functional.silu(mlp.w1.weight @ x[..., None]) * (mlp.w3.weight @ x[..., None]))
    torch.testing.assert_close(mlp(x), ref[..., 0], rtol=1e-5, atol=1e-5)
    assert all(getattr(mlp, n).bias is None for n in ("w1", "w2", "w3"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_block(dtype):
    block = MLPBlock(TINY).to(dtype)
    assert block.mlp.w1.weight.shape == (512, 256) and block.norm.eps == TINY.rms_norm_eps
    x = torch.randn(3, 256, generator=_gen(6)).to(dtype)
    y = block(x)
    assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()
    ref = x.double() + block.mlp.double()(block.norm.double()(x.double()))
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


def test_mlp_block_fx_traces():
    block = MLPBlock(TINY)
    gm = torch.fx.symbolic_trace(block)
    # the default tracer keeps torch.nn modules (the Linears) as leaves and traces through RMSNorm
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["mlp.w1", "mlp.w3", "mlp.w2"]
    assert torch.rsqrt in [n.target for n in gm.graph.nodes if n.op == "call_function"]
    x = torch.randn(5, 256, generator=_gen(7))
    assert torch.equal(gm(x), block(x))


# ---- RoPE ---------------------------------------------------------------------------------------
def _reference_freqs_cis(dim: int, seqlen: int, theta: float, rs: RopeScaling | None) -> torch.Tensor:
    """``precompute_freqs_cis`` of the DeepSeek-V3 reference (inference/model.py), verbatim in spirit."""
    def find_correction_dim(num_rotations, dim, base, max_seq_len):
        return dim * math.log(max_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    def find_correction_range(low_rot, high_rot, dim, base, max_seq_len):
        low = math.floor(find_correction_dim(low_rot, dim, base, max_seq_len))
        high = math.ceil(find_correction_dim(high_rot, dim, base, max_seq_len))
        return max(low, 0), min(high, dim - 1)

    def linear_ramp_factor(min, max, dim):
        if min == max:
            max += 0.001
        linear_func = (torch.arange(dim, dtype=torch.float32) - min) / (max - min)
        return torch.clamp(linear_func, 0, 1)

    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if rs is not None:
        low, high = find_correction_range(rs.beta_fast, rs.beta_slow, dim, theta, rs.original_max_position_embeddings)
        smooth = 1 - linear_ramp_factor(low, high, dim // 2)
        freqs = freqs / rs.factor * (1 - smooth) + freqs * smooth
    t = torch.arange(seqlen)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def _reference_apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    xc = torch.view_as_complex(x.float().view(*x.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xc.size(1), 1, xc.size(-1))
    return torch.view_as_real(xc * freqs_cis).flatten(3).to(dtype)


@pytest.mark.parametrize("yarn", [False, True])
def test_precompute_rope_matches_reference(yarn):
    cfg = ModelConfig.named("deepseek-v3")
    rs = cfg.rope_scaling if yarn else None
    cos, sin = precompute_rope(64, cfg.rope_theta, 300, rs)
    ref = _reference_freqs_cis(64, 300, cfg.rope_theta, rs)
    assert cos.shape == sin.shape == (300, 64) and cos.dtype == torch.float32
    torch.testing.assert_close(cos[:, 0::2], ref.real, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, 1::2], ref.imag, rtol=0, atol=1e-6)
    assert torch.equal(cos[:, 0::2], cos[:, 1::2]) and torch.equal(sin[:, 0::2], sin[:, 1::2])


def test_precompute_rope_from_config():
    cos, sin = precompute_rope(TINY, seqlen=16)
    c2, s2 = precompute_rope(32, TINY.rope_theta, 16, TINY.rope_scaling)
    assert torch.equal(cos, c2) and torch.equal(sin, s2) and cos.shape == (16, 32)
    # YaRN changes the low frequencies only; the fastest pair is untouched
    plain = rope_inv_freq(32, TINY.rope_theta)
    yarn = rope_inv_freq(32, TINY.rope_theta, TINY.rope_scaling)
    assert yarn[0] == plain[0] and yarn[-1] < plain[-1]
    pos = torch.tensor([3, 7])
    cp, sp = precompute_rope(TINY, positions=pos)
    torch.testing.assert_close(cp, cos[[3, 7]], rtol=0, atol=0)


def test_precompute_rope_bad_dim():
    with pytest.raises(ConfigError, match="RoPE dim"):
        precompute_rope(63, 10000.0, 8)
    with pytest.raises(ConfigError, match="seqlen"):
        precompute_rope(64, 10000.0)


def test_rotate_pairs():
    x = torch.arange(6.0)
    assert rotate_pairs(x).tolist() == [-1.0, 0.0, -3.0, 2.0, -5.0, 4.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_equals_complex_form(dtype):
    B, S, H, R = 2, 9, 3, 32
    cfg = TINY
    x = torch.randn(B, S, H, R, generator=_gen(8)).to(dtype)
    cos, sin = precompute_rope(cfg, seqlen=S)
    y = apply_rope(x, cos[:, None, :], sin[:, None, :])
    ref = _reference_apply_rotary_emb(x, _reference_freqs_cis(R, S, cfg.rope_theta, cfg.rope_scaling))
    assert y.dtype == dtype and y.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=0, atol=2e-6)
    else:
        torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_apply_rope_head_first_layout():
    x = torch.randn(2, 3, 5, 16, generator=_gen(9))  # [B, H, S, R]
    cos, sin = precompute_rope(16, 10000.0, 5)
    y = apply_rope(x, cos, sin)
    expect = apply_rope(x.transpose(1, 2), cos[:, None], sin[:, None]).transpose(1, 2)
    assert torch.equal(y, expect)


class _RopeWrapper(nn.Module):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return layers.apply_rope(x, cos, sin) * 2


class _RopeTableWrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(16), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = layers.rope_cos_sin(positions, self.inv_freq)
        return layers.apply_rope(x, cos, sin)


def test_apply_rope_is_one_fx_node():
    gm = torch.fx.symbolic_trace(_RopeWrapper())
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls].count(apply_rope) == 1
    assert not any(n.target in (torch.stack, torch.Tensor.unflatten) for n in calls)
    x = torch.randn(4, 16, generator=_gen(10))
    cos, sin = precompute_rope(16, 10000.0, 4)
    assert torch.equal(gm(x, cos, sin), _RopeWrapper()(x, cos, sin))


def test_rope_cos_sin_is_one_fx_node():
    m = _RopeTableWrapper()
    gm = torch.fx.symbolic_trace(m)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(rope_cos_sin) == 1 and targets.count(apply_rope) == 1
    x, pos = torch.randn(6, 16, generator=_gen(11)), torch.arange(6)
    assert torch.equal(gm(x, pos), m(x, pos))
