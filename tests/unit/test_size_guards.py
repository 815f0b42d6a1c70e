"""Branches of forward on a symbolic size (transformers' `q_length > 1`): dsr.compile takes the branch the
example takes, records a size guard, and compiles another specialization on the first call whose sizes take
the other branch (dsr_compiler/api.py CompiledModule._specialized); plain `trace` still refuses them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dsr_compiler as dsr
from dsr_compiler import api
from dsr_compiler.errors import DsrError, TraceError


class OnSize(nn.Module):
    def forward(self, x):
        causal = x.size(0) > 1 and True          # a size condition handed on as a value when it is false
        y = x * 2 if x.size(0) > 1 else x - 1
        return torch.nn.functional.scaled_dot_product_attention(y[None], y[None], y[None], is_causal=causal)[0]


def eager(x):
    with torch.no_grad():
        return OnSize()(x)


def test_branch_on_symbolic_size_specializes_on_first_use():
    cm = dsr.compile(OnSize(), (torch.randn(4, 8),), dynamic={"x": {0: "T"}}, backend="interpret")
    assert [g.text().split(" (at")[0] for g in cm.size_guards] == ["`T > 1` is True"]
    notes = cm.passes[0].notes
    assert any(n.startswith("specialized: `T > 1` is True") for n in notes), notes
    for t in (4, 9, 1, 2, 1):
        x = torch.randn(t, 8)
        torch.testing.assert_close(cm(x), eager(x), rtol=1e-5, atol=1e-6)
    assert list(cm._specializations) == [(False,)]          # T = 1 compiled once, reused
    one = cm._specializations[(False,)]
    assert [(str(g.expr), g.value) for g in one.size_guards] == [("T > 1", False)]


def test_plain_trace_still_refuses_the_branch():
    with pytest.raises(TraceError, match=r"symbolic size condition `T > 1`"):
        dsr.trace(OnSize(), (torch.randn(4, 8),), dynamic={"x": {0: "T"}})


class Thresholds(nn.Module):
    def forward(self, x):
        for c in range(1, 12):
            if x.size(0) > c:
                x = x + c
        return x


def test_specializations_are_bounded(monkeypatch):
    monkeypatch.setattr(api, "MAX_SPECIALIZATIONS", 2)
    cm = dsr.compile(Thresholds(), (torch.randn(12, 4),), dynamic={"x": {0: "T"}}, backend="interpret")
    assert len(cm.size_guards) == 11
    for t in (12, 1, 2):
        x = torch.randn(t, 4)
        torch.testing.assert_close(cm(x), Thresholds()(x))
    with pytest.raises(DsrError, match="need another specialization .* 2 exist already"):
        cm(torch.randn(3, 4))
