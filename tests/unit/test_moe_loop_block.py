"""A user's MoE block with a loop over an `nn.ModuleList` of SwiGLU experts (transformers v4's Mixtral shape:
gate Linear, top-k softmax routing, `torch.where` per expert, `index_add_`) is recognised by structure and a
probe (frontend/lowerings/moe_patterns.py `match_block`) and compiles to the grouped-GEMM MoE kernels with the
experts' weights stacked at compile time; a block that routes or activates differently is traced through."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.errors import TraceError

MOE_FAMILIES = ["moe_router", "moe_dispatch", "moe_gemm", "moe_gemm", "moe_combine"]


class SwiGLU(nn.Module):
    def __init__(self, h: int, i: int, names=("gate_proj", "up_proj", "down_proj"), act=F.silu) -> None:
        super().__init__()
        self.names, self.act = names, act
        for n, shape in zip(names, ((i, h), (i, h), (h, i))):
            setattr(self, n, nn.Linear(shape[1], shape[0], bias=False))

    def forward(self, x):
        g, u, d = (getattr(self, n) for n in self.names)
        return d(self.act(g(x)) * u(x))


class LoopMoE(nn.Module):
    def __init__(self, h=32, i=16, e=4, k=2, norm=True, names=("gate_proj", "up_proj", "down_proj"), act=F.silu,
                 logits=False) -> None:
        super().__init__()
        self.top_k, self.norm, self.logits = k, norm, logits
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList([SwiGLU(h, i, names, act) for _ in range(e)])

    def forward(self, x):
        b, t, h = x.shape
        x2 = x.view(-1, h)
        logits = self.gate(x2)
        w, idx = logits.softmax(-1).topk(self.top_k, dim=-1)
        if self.norm:
            w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x2)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x2[tok]) * w[tok, slot, None])
        y = out.view(b, t, h)
        return (y, logits) if self.logits else y


def _init(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return m.eval()


def _x(t: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, t, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", [{}, {"names": ("w1", "w3", "w2"), "norm": False}, {"logits": True}])
def test_loop_block_compiles_to_grouped_gemms(kw):
    m = _init(LoopMoE(**kw), 0)
    cm = dsr.compile(m, (_x(8),), dynamic={"x": {1: "T"}}, backend="interpret")
    fams = [k.spec.family for k in cm.kernels]
    assert [f for f in fams if f.startswith("moe")] == MOE_FAMILIES, fams
    for t in (1, 8, 16):
        x = _x(t, t)
        with torch.no_grad():
            ref = m(x)
        out = cm(x)
        for o, r in zip(out if kw.get("logits") else (out,), ref if kw.get("logits") else (ref,)):
            assert ((o - r).abs().max() / r.abs().max()).item() <= 1e-5, t


def test_loop_block_with_another_activation_is_not_recognised():
    m = _init(LoopMoE(act=F.gelu), 0)
    with pytest.raises(TraceError) as e:
        dsr.compile(m, (_x(8),), backend="interpret")
    assert "MoE block the top-level module (LoopMoE) not recognised" in str(e.value)
    assert "top-2 softmax routing" in str(e.value) or "routing" in str(e.value)


def test_loop_block_fp8():
    """fp8=True (bf16 block, 128-multiples): the stacked experts take the FP8 grouped GEMMs like the zoo's MoE."""
    from dsr_compiler.tolerance import compare_fp8
    m = _init(LoopMoE(h=128, i=128), 0).to(torch.bfloat16)
    x = torch.randn(1, 16, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    cm = dsr.compile(m, (x,), dynamic={"x": {1: "T"}}, fp8=True, backend="interpret")
    fams = [k.spec.family for k in cm.kernels]
    assert fams.count("moe_gemm_fp8") == 2 and "moe_gemm" not in fams, fams
    with torch.no_grad():
        ref = m(x)
    r = compare_fp8(cm(x), ref, "fp8")
    assert r["ok"] and r["calc_diff"] > 1e-6, r


class TwoBlocks(nn.Module):
    """Two blocks of one class, the second with GELU experts: each gets its own verdict (no shared probe)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _init(LoopMoE(), 0), _init(LoopMoE(act=F.gelu), 1)

    def forward(self, x):
        return self.b(self.a(x))


def test_blocks_of_one_class_with_other_activations_do_not_share_a_verdict():
    with pytest.raises(TraceError) as e:
        dsr.compile(TwoBlocks().eval(), (_x(8),), backend="interpret")
    assert "MoE block `b` (LoopMoE) not recognised" in str(e.value)
