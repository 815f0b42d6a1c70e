"""Advanced indexing `x[i0, ..., ik-1]` (the `index` op and kernel, frontend/lowerings/shape.py) and softmax over
a size-1 dim (the `softmax_single` fold): what transformers' mask code and a masked one-token SDPA are made of
under torch.compile, vs eager, from one compile with a symbolic dim."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.errors import TraceError


class Indexing(nn.Module):
    """transformers' sdpa_mask without vmap (position ids indexed by broadcast aranges), row gathers by a tensor
    (negative ids count from the end), a tensor with an int, and a bool table."""

    def forward(self, pos, h, ids, table):
        b = torch.arange(pos.shape[0])[:, None, None, None]
        q = torch.arange(pos.shape[1])[None, None, :, None]
        kv = torch.arange(pos.shape[1])[None, None, None, :]
        return pos[b, q] >= pos[b, kv], h[ids], h[ids, -1], table[ids, :], h[ids[:, :1], ids[0]]


def _inputs(t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(t)[None].repeat(2, 1)
    pos[1, t // 2:] -= t // 2
    ids = torch.randint(-t, t, (3, 2), generator=g)
    return pos, torch.randn(t, 5, generator=g), ids, torch.rand(t, 3, generator=g) > 0.5


@pytest.mark.parametrize("t", [8, 5, 1])
def test_advanced_indexing_matches_torch(t):
    cm = dsr.compile(Indexing(), _inputs(8), dynamic={"pos": {1: "T"}, "h": {0: "T"}, "table": {0: "T"}},
                     backend="interpret")
    x = _inputs(t, seed=t)
    out, ref = cm(*x), Indexing()(*x)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.dtype == r.dtype and torch.equal(o, r), i      # a copy: bit for bit
    assert [k.spec.family for k in cm.kernels].count("index") == 6


@pytest.mark.parametrize("bad,msg", [
    (lambda x, i: x[x > 0], "bool mask: the result's size depends"),
    (lambda x, i: x[:, i], "mixing tensors with slices"),
    (lambda x, i: x[[0, 1]], "with a Python list"),
    (lambda x, i: x[i.float()], "with a float tensor"),
])
def test_unsupported_advanced_indexing_is_refused(bad, msg):
    class M(nn.Module):
        def forward(self, x, i):
            return bad(x, i)
    with pytest.raises(TraceError) as e:
        dsr.compile(M(), (torch.randn(4, 3), torch.zeros(2, dtype=torch.int64)), backend="interpret")
    assert msg in str(e.value)


class OneKey(nn.Module):
    def forward(self, s):
        return s.softmax(-1), torch.log_softmax(s, dim=-1), s.transpose(1, 2).softmax(1)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # inf - inf in the interpreter
def test_softmax_over_one_element_is_pointwise():
    """A row of one element: 1 (log: 0), NaN where the score is -inf / inf / NaN, like torch; no row kernel."""
    s = torch.tensor([[[0.5], [-float("inf")], [float("nan")], [3e38]], [[float("inf")], [-2.0], [0.0], [1.0]]])
    cm = dsr.compile(OneKey(), (s,), backend="interpret")
    out, ref = cm(s), OneKey()(s)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, equal_nan=True, rtol=0, atol=0)
    assert "reduction" not in [k.spec.family for k in cm.kernels]
