"""Tuple / list / dict forward arguments (transformers' `position_embeddings=(cos, sin)`): each tensor leaf is
a graph input named `<param>_<i>`, the other leaves are baked in; a call must pass the same structure
(dsr_compiler/signature.py `tree_leaves`, frontend/tracer.py `_make_root`)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.errors import DsrError


class Rotate(nn.Module):
    def forward(self, x, pe, extra):
        cos, sin = pe
        return x * cos + x * sin * extra["scale"] + extra["bias"]


def args(t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, 8, generator=g), (torch.randn(t, 8, generator=g), torch.randn(t, 8, generator=g)),
            {"scale": 0.5, "bias": torch.randn(8, generator=g)})


def test_tree_arguments_bind_leaf_by_leaf():
    m = Rotate()
    dyn = {"x": {0: "T"}, "pe_0": {0: "T"}, "pe_1": {0: "T"}}
    g = dsr.trace(m, args(4), dynamic=dyn)
    assert [v.name for v in g.data_inputs] == ["x", "pe_0", "pe_1", "extra_1"]
    cm = dsr.compile(m, args(4), dynamic=dyn, backend="interpret")
    for t in (1, 6):
        a = args(t, t)
        torch.testing.assert_close(cm(*a), m(*a))


def test_tree_arguments_must_keep_their_structure_and_baked_leaves():
    m = Rotate()
    cm = dsr.compile(m, args(4), backend="interpret")
    x, (c, s), extra = args(4)
    with pytest.raises(DsrError, match="`pe` is a list of 2 leaves, the compiled module was traced with a tuple"):
        cm(x, [c, s], extra)
    with pytest.raises(DsrError, match=r"extra\[leaf 0\]` was baked in as 0.5"):
        cm(x, (c, s), {"scale": 2.0, "bias": extra["bias"]})
