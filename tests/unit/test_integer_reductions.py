"""Integer reductions: counts of bools are summed exactly (fp32 accumulation, at most 2^24 elements, a size guard
when the count is symbolic) and come back as int64 like torch's; other integer reductions are refused at trace
time with the line (not left to a codegen error)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.errors import TraceError
from dsr_compiler.frontend.lowerings.reduce import MAX_EXACT_COUNT


class Counts(nn.Module):
    def forward(self, x):
        m = x > 0
        return m.sum(-1), m.sum(), (x > 1).sum(dim=(0, 1), keepdim=True), m.int().sum(-1, dtype=torch.float32)


def test_bool_counts_are_exact_int64():
    cm = dsr.compile(Counts(), (torch.randn(3, 5, 7),), dynamic={"x": {0: "T"}}, backend="interpret")
    assert sorted(str(g.expr) for g in cm.size_guards) == ["35*T <= 16777216", "5*T <= 16777216"]
    for t in (3, 1, 9):
        x = torch.randn(t, 5, 7, generator=torch.Generator().manual_seed(t))
        for o, r in zip(cm(x), Counts()(x)):
            assert o.dtype == r.dtype and torch.equal(o, r)


def test_a_count_past_the_exact_bound_is_refused():
    class Wide(nn.Module):
        def forward(self, x):
            return (x > 0).sum()
    n = MAX_EXACT_COUNT + 1
    with pytest.raises(TraceError) as e:
        dsr.trace(Wide(), (torch.empty(n, device="meta"),))
    assert "fp32 counts are exact only up to 16,777,216" in str(e.value)


@pytest.mark.parametrize("expr,what", [(lambda x: x.long().sum(-1), "sum of a i64 tensor"),
                                       (lambda x: x.int().amax(-1), "amax of a i32 tensor")])
def test_other_integer_reductions_are_refused_with_the_line(expr, what):
    class M(nn.Module):
        def forward(self, x):
            return expr(x)
    with pytest.raises(TraceError) as e:
        dsr.compile(M(), (torch.randn(3, 4),), backend="interpret")
    assert what in str(e.value) and "test_integer_reductions.py" in str(e.value)
