"""Example: a dense causal multi-head attention block, compiled and checked on the interpreter.

    python examples/dense_attention.py

Prints the kernels, the error against eager PyTorch and the kernel count vs eager ATen ops, in f32
and in bf16. Checks (exit 1 otherwise): the output within dsr_compiler.tolerance.compare's tolerance.
The block is also the test subject of tests/models/test_compiled_spine.py.
"""
from __future__ import annotations

import math
import sys

import torch
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.bench import count_eager
from dsr_compiler.errors import CheckFailed, DsrError
from dsr_compiler.models.layers import RMSNorm, apply_rope, precompute_rope
from dsr_compiler.tolerance import compare


class DenseAttentionBlock(nn.Module):
    """x + wo(attention(rope(wq(norm(x))), rope(wk(norm(x))), wv(norm(x)))), causal, multi-head."""

    def __init__(self, dim: int, heads: int, head_dim: int, max_seq: int = 64):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = RMSNorm(dim)
        self.wq = nn.Linear(dim, heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, heads * head_dim, bias=False)
        self.wo = nn.Linear(heads * head_dim, dim, bias=False)
        cos, sin = precompute_rope(head_dim, 10000.0, max_seq)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm(x)
        q = self.wq(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = self.wv(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.wo(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


def init_weights(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return m


DYNAMIC = {"x": {1: "S"}, "cos": {0: "S"}, "sin": {0: "S"}}


def main(dim: int = 256, heads: int = 4, head_dim: int = 64, seq: int = 16, dtype: torch.dtype = torch.float32) -> dict:
    m = init_weights(DenseAttentionBlock(dim, heads, head_dim), 0).to(dtype).eval()
    x = torch.randn(2, seq, dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    args = (x, m.cos[:seq].to(dtype), m.sin[:seq].to(dtype))
    cm = dsr.compile(m, args, dynamic=DYNAMIC, backend="interpret")
    with torch.no_grad():
        ref = m(*args)
    r = compare(cm(*args), ref)
    eager = count_eager(m, args)
    print(f"dense attention block {str(dtype).replace('torch.', '')}: {len(cm.kernels)} kernels "
          f"({', '.join(k.spec.name for k in cm.kernels)}) vs {eager.ops} eager ATen ops; "
          f"max abs err {r['max_abs']:.2e}, max rel err {r['max_rel']:.2e}, within tolerance: {r['ok']}")
    if not r["ok"]:
        raise CheckFailed(f"dense attention block ({dtype}): compiled output differs from eager beyond tolerance")
    return {"kernels": len(cm.kernels), "aten_ops": eager.ops, **r}


if __name__ == "__main__":
    try:
        main()
        main(dtype=torch.bfloat16)
    except DsrError as e:
        sys.stderr.write(f"dense_attention.py: {e}\n")
        sys.exit(e.exit_code)
