"""Tensors allocated in forward and filled by slice assignment (transformers' DeepSeek MLA `expand_kv`) as
functional updates (frontend/lowerings/alloc.py), vs eager; and the writes that are refused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.errors import TraceError
from tolerances import assert_close


class ExpandKv(nn.Module):
    def forward(self, a, b):
        k = a.new_empty(*a.shape[:-1], 24)
        k[..., :16].copy_(a)
        k[..., 16:].copy_(b.expand(-1, a.shape[1], -1))
        z = torch.zeros_like(a)
        z[..., 2:5] = 1.5
        z[:1, ..., :1] = a[:1, :, 3:4]
        o = a.new_ones(2, 3)
        o[1:, 1:] = 7
        return k * 2, z + a, o


def test_allocation_and_slice_writes_match_eager():
    m = ExpandKv()
    b = torch.randn(2, 1, 8)
    cm = dsr.compile(m, (torch.randn(2, 8, 16), b), dynamic={"a": {1: "T"}}, backend="interpret")
    for t in (1, 5, 8):
        a = torch.randn(2, t, 16)
        for y, r in zip(cm(a, b), m(a, b)):
            assert_close(y, r)


def test_writes_covering_the_allocation_leave_only_a_cat():
    """k is written whole (nope then rope): no constant survives, the value is cat(a, b)."""
    class Keys(nn.Module):
        def forward(self, a, b):
            k = a.new_empty(*a.shape[:-1], 24)
            k[..., :16].copy_(a)
            k[..., 16:].copy_(b)
            return k
    cm = dsr.compile(Keys(), (torch.randn(3, 16), torch.randn(3, 8)), dynamic={"a": {0: "T"}, "b": {0: "T"}},
                     backend="interpret")
    after_dce = next(r.graph for r in cm.passes if r.name == "dce")
    assert [n.op for n in after_dce.nodes] == ["cat"]
    a, b = torch.randn(5, 16), torch.randn(5, 8)
    assert torch.equal(cm(a, b), torch.cat([a, b], -1))


@pytest.mark.parametrize("body, match", [
    (lambda x: x.__setitem__((Ellipsis, slice(0, 2)), 0.0) or x, "did not allocate"),
    (lambda x: x.new_zeros(x.shape).__setitem__(0, 1.0), "only slices"),
    (lambda x: x.new_zeros(x.shape).__setitem__(slice(0, 2), 1.0), "part of the symbolic dim T"),
])
def test_refused_writes(body, match):
    class M(nn.Module):
        def forward(self, x):
            return body(x) if body(x) is not None else x
    with pytest.raises(TraceError, match=match):
        dsr.trace(M(), (torch.randn(4, 8),), dynamic={"x": {0: "T"}})


def test_a_view_taken_before_a_write_is_not_read_after_it():
    class Stale(nn.Module):
        def forward(self, x):
            z = x.new_zeros(x.shape)
            v = z.transpose(0, 1)
            z[..., :2] = 1.0
            return v + 1
    with pytest.raises(TraceError, match="taken before an in-place write"):
        dsr.trace(Stale(), (torch.randn(4, 8),), dynamic={"x": {0: "T"}})
