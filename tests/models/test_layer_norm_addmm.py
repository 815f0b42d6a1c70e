"""nn.LayerNorm / F.layer_norm and torch.addmm (GPT-2's Conv1D) traced as existing ops and compiled on the
interpreter, vs eager, with a symbolic token dimension (issue 13's plain-nn modules)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.errors import TraceError
from tolerances import assert_close


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D: y = addmm(bias, x.view(-1, nx), weight)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.05)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.LayerNorm(64))
        self.conv = Conv1D(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.seq(x)
        h = F.layer_norm(h, (64,), None, None, 1e-6) + h
        return self.conv(h) + 0.5 * torch.addmm(self.conv.bias, h, self.conv.weight, beta=2.0, alpha=0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequential_layer_norm_and_addmm(dtype):
    torch.manual_seed(0)
    m = Block().to(dtype).eval()
    with torch.no_grad():
        m.seq[3].weight.uniform_(0.5, 1.5)
        m.seq[3].bias.uniform_(-0.2, 0.2)
    cm = dsr.compile(m, (torch.randn(8, 64, dtype=dtype),), dynamic={"x": {0: "T"}}, backend="interpret")
    for t in (1, 8, 16):
        x = torch.randn(t, 64, dtype=dtype) * 3 + 1
        with torch.no_grad():
            assert_close(cm(x), m(x), dtype)


def test_layer_norm_over_two_dims_is_refused():
    m = nn.LayerNorm((4, 16))
    with pytest.raises(TraceError, match="normalize the last dim only"):
        dsr.trace(m, (torch.randn(3, 4, 16),), dynamic={"input": {0: "T"}})


class GqaAttention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def test_sdpa_with_grouped_query_heads():
    """enable_gqa=True: 8 query heads over 2 key/value heads (head h reads kv head h // 4)."""
    m = GqaAttention()

    def inputs(s: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(1, 8, s, 16, generator=g), torch.randn(1, 2, s, 16, generator=g),
                torch.randn(1, 2, s, 16, generator=g))
    dyn = {n: {2: "S"} for n in ("q", "k", "v")}
    cm = dsr.compile(m, inputs(8, 0), dynamic=dyn, backend="interpret")
    for s in (1, 8, 13):
        args = inputs(s, s)
        assert_close(cm(*args), m(*args))


class MaskedAttention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_sdpa_with_attn_mask(kind):
    """A padding mask over keys (boolean: True = attend; additive: 0 / -1e4) broadcast over heads and queries."""
    m = MaskedAttention()

    def inputs(s: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        keep = torch.rand(1, 1, 1, s, generator=g) > 0.3
        keep[..., 0] = True                                   # every query row keeps a key
        mask = keep if kind == "bool" else torch.where(keep, 0.0, -1e4)
        return (torch.randn(1, 4, s, 16, generator=g), torch.randn(1, 4, s, 16, generator=g),
                torch.randn(1, 4, s, 16, generator=g), mask)
    dyn = {"q": {2: "S"}, "k": {2: "S"}, "v": {2: "S"}, "mask": {3: "S"}}
    cm = dsr.compile(m, inputs(8, 0), dynamic=dyn, backend="interpret")
    for s in (1, 8, 13):
        args = inputs(s, s)
        assert_close(cm(*args), m(*args))


class Diffs(nn.Module):
    def forward(self, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.diff(x, dim=-1), torch.diff(x, n=2, dim=-1, prepend=p), x.diff(append=p)


def test_diff():
    m = Diffs()
    cm = dsr.compile(m, (torch.randn(8, 6), torch.randn(8, 2)), dynamic={"x": {0: "T"}, "p": {0: "T"}},
                     backend="interpret")
    for t in (2, 5):
        x, p = torch.randn(t, 6), torch.randn(t, 2)
        for a, b in zip(cm(x, p), m(x, p)):
            assert_close(a, b)
    with pytest.raises(TraceError, match="diff along the symbolic dim T .*may be empty"):
        dsr.trace(lambda_module(lambda x: torch.diff(x, dim=0)), (torch.randn(4, 3),), dynamic={"x": {0: "T"}})


def test_diff_along_the_symbolic_dim_with_prepend():
    """transformers' packed-sequence check: diff(position_ids, prepend=position_ids[:, :1] - 1) along T; the
    slice x[:-1] of the T + 1 long cat keeps the size symbolic (a negative slice end), T = 1 included."""
    m = lambda_module(lambda x: torch.diff(x, prepend=x[:, :1] - 1, dim=-1))
    cm = dsr.compile(m, (torch.randn(2, 8),), dynamic={"x": {1: "T"}}, backend="interpret")
    for t in (1, 2, 9):
        x = torch.randn(2, t)
        assert_close(cm(x), m(x))


def lambda_module(fn):
    class M(nn.Module):
        def forward(self, x):
            return fn(x)
    return M()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_tanh_approximation(dtype):
    m = nn.Sequential(nn.Linear(32, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 32)).to(dtype).eval()
    cm = dsr.compile(m, (torch.randn(4, 32, dtype=dtype),), dynamic={"input": {0: "T"}}, backend="interpret")
    for t in (1, 9):
        x = torch.randn(t, 32, dtype=dtype) * 3
        with torch.no_grad():
            assert_close(cm(x), m(x), dtype)
            assert_close(cm(x).float(), F.gelu(m[0](x).float(), approximate="tanh") @ m[2].weight.float().T +
                         m[2].bias.float(), dtype)
