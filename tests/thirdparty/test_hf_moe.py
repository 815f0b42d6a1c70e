"""transformers' MoE blocks (DeepSeek-V3, Qwen3-MoE, Mixtral) compile to the zoo's MoE kernels: the router
and the stacked experts are recognised by structure and a probe (frontend/lowerings/moe_patterns.py), under
each of transformers' experts implementations, with one symbolic token dimension, and match eager."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.errors import TraceError
from dsr_compiler.tolerance import compare_fp8
from hf_modules import build

MOE_BLOCKS = ("deepseek_moe", "qwen3_moe_block", "mixtral_moe_block")
MOE_FAMILIES = ["moe_router", "moe_dispatch", "moe_gemm", "moe_gemm", "moe_combine"]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("experts", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("name", MOE_BLOCKS)
def test_moe_block_compiles_to_grouped_gemms(name, experts):
    m, inputs, dyn = build(name, experts)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cm = dsr.compile(m, inputs(8), dynamic=dyn, backend="interpret")
    fams = [k.spec.family for k in cm.kernels]
    assert [f for f in fams if f.startswith("moe")] == MOE_FAMILIES, fams
    assert fams.count("gemm") == (2 if name == "deepseek_moe" else 0), fams     # the shared expert (gate+up, down)
    ops = [n.op for n in dsr.trace(m, inputs(8), dynamic=dyn).nodes]
    assert ops.count("moe_router") == ops.count("moe_dispatch") == ops.count("moe_combine") == 1, ops
    for t in (1, 8, 16):
        x = inputs(t, seed=t)
        with torch.no_grad():
            ref = m(*x)
        assert rel_err(cm(*x), ref) <= 1e-5
    for k, v in m.state_dict().items():                  # the probe put its own tensors in, never the module's
        assert torch.equal(v, before[k]), k


def test_recognised_router_keeps_its_outputs():
    """The router alone: logits, weights and indices (int64, as transformers returns them) like eager."""
    m, inputs, _ = build("deepseek_moe")
    gate = m.gate
    cm = dsr.compile(gate, (inputs(8)[0].view(8, -1),), dynamic={"hidden_states": {0: "T"}}, backend="interpret")
    for t in (1, 5):
        x = inputs(t, seed=t)[0].view(t, -1)
        with torch.no_grad():
            logits, w, ids = gate(x)
        cl, cw, cids = cm(x)
        assert cids.dtype == ids.dtype == torch.int64 and cw.dtype == w.dtype and cl.dtype == logits.dtype
        torch.testing.assert_close(cl, logits, rtol=1e-6, atol=1e-6)
        order, corder = ids.sort(-1), cids.sort(-1)
        assert torch.equal(order.values, corder.values)
        torch.testing.assert_close(cw.gather(-1, corder.indices), w.gather(-1, order.indices), rtol=1e-6, atol=1e-7)


def test_moe_block_fp8():
    """FP8 on (bf16 model): the recognised experts take the FP8 grouped GEMMs like the zoo's MoE."""
    m, inputs, dyn = build("deepseek_moe", hidden_size=128, moe_intermediate_size=128)   # 128-multiples: FP8 blocks
    m = m.to(torch.bfloat16)
    cm = dsr.compile(m, tuple(t.bfloat16() for t in inputs(8)), dynamic=dyn, fp8=True, backend="interpret")
    fams = [k.spec.family for k in cm.kernels]
    assert fams.count("moe_gemm_fp8") == 2 and "moe_gemm" not in fams, fams
    x = tuple(t.bfloat16() for t in inputs(16, seed=3))
    with torch.no_grad():
        ref = m(*x)
    r = compare_fp8(cm(*x), ref, "fp8")
    assert r["ok"] and r["calc_diff"] > 1e-6, r       # quantized (not bitwise bf16), and within the fp8 bound


def test_experts_with_another_activation_are_not_recognised():
    """Same tensors, different function (GELU experts): the probe refuses the rewrite, the trace stops at the
    data-dependent code and its error says why the MoE rewrite did not fire."""
    m, inputs, dyn = build("mixtral_moe_block")
    m.experts.act_fn = nn.GELU()
    with pytest.raises(TraceError) as e:
        dsr.compile(m, inputs(8), dynamic=dyn, backend="interpret")
    assert "MoE experts `experts` (MixtralExperts) not recognised" in str(e.value)
    assert "another activation" in str(e.value)


class SoftplusRouter(nn.Module):
    """A router with the structure of transformers' (weight, top_k) but another score function."""

    def __init__(self, e: int = 8, h: int = 64, k: int = 2) -> None:
        super().__init__()
        self.top_k = k
        self.weight = nn.Parameter(torch.randn(e, h) * 0.1)

    def forward(self, x):
        logits = x @ self.weight.T
        w, i = torch.nn.functional.softplus(logits).topk(self.top_k, dim=-1)
        return logits, w, i


def test_router_with_another_score_is_not_recognised():
    with pytest.raises(TraceError) as e:
        dsr.compile(SoftplusRouter(), (torch.randn(8, 64),), dynamic={"x": {0: "T"}}, backend="interpret")
    assert "MoE router the top-level module (SoftplusRouter) not recognised: no candidate routing matches" \
        in str(e.value)
