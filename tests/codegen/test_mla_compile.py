"""The MLA kernel families (rope_table, index_copy, mla_attention, mla_decode, mla_combine) render,
compile to PTX + cubin for sm_90a without spills, at the tiny config (fp32) and at DeepSeek-V3's
full width (bf16, modules on the meta device: shapes are all the compiler needs)."""
from __future__ import annotations

import pytest
import torch
from dsr_compiler.codegen import compile_triton, lower_kernel, render
from dsr_compiler.ir.errors import CodegenError
from dsr_compiler.ir.passes import PIPELINE, PassContext, run_passes

import dsr_compiler as dsr
from dsr_compiler.models import MLA, ModelConfig
from dsr_compiler.models.steps import DecodeStep

MLA_FAMILIES = {"rope_table", "index_copy", "mla_attention", "mla_decode", "mla_combine"}


def _mla_kernels(name: str, dtype: torch.dtype) -> list:
    cfg = ModelConfig.named(name)
    with torch.device("meta"):
        m = MLA(cfg).to(dtype).eval()
    dev = {"dtype": dtype, "device": "meta"}
    decode = (torch.empty(1, 1, cfg.hidden_size, **dev), torch.empty(1, 64, cfg.kv_lora_rank, **dev),
              torch.empty(1, 64, cfg.qk_rope_head_dim, **dev), torch.tensor(3))
    graphs = [dsr.trace(m, (torch.empty(1, 16, cfg.hidden_size, **dev),), dynamic={"x": {1: "S"}}),
              dsr.trace(DecodeStep(m), decode, dynamic={"x": {0: "B"}, "kv_cache": {0: "B"}, "pe_cache": {0: "B"}})]
    out = []
    for g in graphs:
        fused = run_passes(g, list(PIPELINE), PassContext(options={"fp8": False, "mla": "absorb"}))[-1].graph
        out += [k for k in fused.kernels if k.family in MLA_FAMILIES]
    return out


@pytest.mark.parametrize("name,dtype", [("deepseek-v3-tiny", torch.float32), ("deepseek-v3", torch.bfloat16)])
def test_mla_kernels_compile_for_sm90a_without_spills(name, dtype):
    kernels = _mla_kernels(name, dtype)
    assert {k.family for k in kernels} == MLA_FAMILIES
    for i, k in enumerate(kernels, start=1):
        spec = lower_kernel(k, i)
        ck = compile_triton(spec, render(spec))
        assert ck.registers > 0 and ck.spills == 0, (spec.name, ck.registers, ck.spills)
        assert len(ck.cubin) > 0 and ".target sm_90a" in ck.ptx


def test_mla_attention_needs_static_head_dims():
    from dsr_compiler.ir import GraphBuilder, Kernel, Node, TensorType, Value, sym
    from dsr_compiler.ir.ops import OPS
    from dsr_compiler.ir.types import DType
    b = GraphBuilder("k1_mla_attention_flash")
    S, D = sym("S"), sym("D")
    types = [TensorType(DType.f32, s) for s in ((1, S, 2, D), (1, S, 2, 8), (1, S, 2, D), (1, S, 8), (1, S, 2, 16))]
    for n, t in zip(("qn", "qp", "kn", "kp", "v"), types):
        b.add_input(n, t)
    attrs = {"scale": 0.5, "dtype": DType.f32}
    (ot,) = OPS["mla_attention"].infer(types, attrs)
    b.add(Node((Value("o", ot),), "mla_attention", ("qn", "qp", "kn", "kp", "v"), attrs))
    with pytest.raises(CodegenError, match="the nope head dim must be static"):
        lower_kernel(Kernel("k1_mla_attention_flash", "mla_attention", b.build(["o"])), 1)
