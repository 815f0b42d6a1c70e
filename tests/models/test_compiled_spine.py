"""End to end on the interpreter backend: compiled zoo modules vs eager PyTorch.

The MLP block (RMSNorm + SwiGLU MLP + residual) and a dense causal multi-head attention block
(RMSNorm, q/k/v projections, interleaved RoPE, causal softmax attention, output projection,
residual) are compiled once with a symbolic token dimension and run at several token counts.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples  # noqa: E402  per-test budget from the active profile
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.models import ModelConfig
from dsr_compiler.models.layers import MLPBlock
from examples.dense_attention import DenseAttentionBlock
from tests.tolerances import assert_close

DT = {"f32": torch.float32, "bf16": torch.bfloat16}


def _init(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return m


def _mlp_block(hidden: int, inter: int, dtype: torch.dtype, seed: int) -> MLPBlock:
    cfg = ModelConfig.named("deepseek-v3-tiny").replace(hidden_size=hidden, intermediate_size=inter)
    return _init(MLPBlock(cfg), seed).to(dtype).eval()


@settings(max_examples=examples(6))
@given(hidden=st.sampled_from([32, 64, 96, 256]), inter=st.sampled_from([32, 48, 128]),
       dtype=st.sampled_from(["f32", "bf16"]), tokens=st.lists(st.integers(1, 40), min_size=2, max_size=3),
       seed=st.integers(0, 2**16))
def test_mlp_block_matches_eager(hidden, inter, dtype, tokens, seed):
    dt = DT[dtype]
    m = _mlp_block(hidden, inter, dt, seed)
    x0 = torch.randn(8, hidden).to(dt)
    cm = dsr.compile(m, (x0,), dynamic={"x": {0: "T"}}, backend="interpret")
    assert [k.spec.family for k in cm.kernels] == ["reduction", "gemm", "gemm"]
    for t in tokens:  # one compile serves every token count, powers of two or not
        x = torch.randn(t, hidden, generator=torch.Generator().manual_seed(seed + t)).to(dt)
        with torch.no_grad():
            ref = m(x)
        assert_close(cm(x), ref)


@settings(max_examples=examples(4))
@given(heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([16, 32]), dtype=st.sampled_from(["f32", "bf16"]),
       seqs=st.lists(st.integers(1, 24), min_size=2, max_size=3), seed=st.integers(0, 2**16))
def test_dense_attention_block_matches_eager(heads, head_dim, dtype, seqs, seed):
    dt = DT[dtype]
    dim = 64
    m = _init(DenseAttentionBlock(dim, heads, head_dim), seed).to(dt).eval()
    cos, sin = m.cos, m.sin

    def inputs(s: int, b: int = 2):
        x = torch.randn(b, s, dim, generator=torch.Generator().manual_seed(seed + s)).to(dt)
        return x, cos[:s].to(dt), sin[:s].to(dt)

    cm = dsr.compile(m, inputs(8), dynamic={"x": {1: "S"}, "cos": {0: "S"}, "sin": {0: "S"}}, backend="interpret")
    families = sorted(k.spec.family for k in cm.kernels)
    assert "attention" in families and families.count("reduction") == 1
    for s in seqs:
        args = inputs(s)
        with torch.no_grad():
            ref = m(*args)
        assert_close(cm(*args), ref)


def test_compiled_report_and_dump(tmp_path):
    m = _mlp_block(64, 128, torch.float32, 0)
    cm = dsr.compile(m, (torch.randn(4, 64),), dynamic={"x": {0: "T"}}, backend="interpret")
    rep = cm.report()
    assert rep["totals"]["kernels"] == 3
    for k in rep["kernels"]:
        assert k["registers"] > 0 and k["spills"] == 0 and k["bytes_read"] > 0
        assert k["roofline_peak"] == "flops_f32"   # f32 operands: the fp32 CUDA-core ceiling bounds it
        bound = max((k["bytes_read"] + k["bytes_written"]) / rep["h200"]["bytes_per_s"],
                    k["flops"] / rep["h200"]["flops_f32"]) * 1e6
        assert abs(k["roofline_us_h200"] - bound) <= 1e-9 * max(bound, 1.0)
    out = cm.dump(tmp_path / "d")
    names = sorted(p.name for p in (out / "ir").iterdir())
    assert names[0] == "00_trace.diff" and names[1] == "00_trace.ir"
    for p in (out / "ir").glob("*.ir"):
        g = dsr.ir.parse(p.read_text())
        dsr.ir.verify(g)
    for k in cm.kernels:
        for ext in ("py", "ptx", "cubin"):
            assert (out / "kernels" / f"{k.spec.name}.{ext}").stat().st_size > 0


def test_wrong_inputs_are_user_errors():
    m = _mlp_block(64, 128, torch.float32, 0)
    cm = dsr.compile(m, (torch.randn(4, 64),), dynamic={"x": {0: "T"}}, backend="interpret")
    with pytest.raises(dsr.DsrError, match="expected"):
        cm(torch.randn(4, 32))
    with pytest.raises(dsr.DsrError, match="dtype"):
        cm(torch.randn(4, 64, dtype=torch.bfloat16))
    with pytest.raises(dsr.DsrError, match="expected 1 inputs"):
        cm(torch.randn(4, 64), torch.randn(4, 64))
