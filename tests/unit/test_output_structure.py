"""forward's result comes back with its structure: nested tuples, dicts, namedtuples, None and numbers kept as
they are (context.OutputStructure); a bare tensor and a flat tuple of tensors stay what they always were."""
from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.errors import TraceError

Pair = namedtuple("Pair", "a b")


class Nested(nn.Module):
    def forward(self, x):
        return {"y": x * 2, "parts": (x + 1, [x - 1, None]), "pair": Pair(x.sum(-1), 3), "n": 7}


def test_nested_result_is_rebuilt():
    m = Nested()
    cm = dsr.compile(m, (torch.randn(4, 8),), dynamic={"x": {0: "T"}}, backend="interpret")
    x = torch.randn(5, 8)
    got, ref = cm(x), m(x)
    assert type(got) is dict and list(got) == ["y", "parts", "pair", "n"]
    assert got["n"] == 7 and got["parts"][1][1] is None and isinstance(got["pair"], Pair) and got["pair"].b == 3
    torch.testing.assert_close(got["y"], ref["y"])
    torch.testing.assert_close(got["parts"][1][0], ref["parts"][1][0])
    torch.testing.assert_close(got["pair"].a, ref["pair"].a)


def test_plain_results_unchanged():
    class Two(nn.Module):
        def forward(self, x):
            return x + 1, x * 2

    cm = dsr.compile(Two(), (torch.randn(3, 4),), backend="interpret")
    out = cm(torch.randn(3, 4))
    assert type(out) is tuple and len(out) == 2


def test_an_object_in_the_result_is_refused():
    class Odd(nn.Module):
        def forward(self, x):
            return x, object()

    with pytest.raises(TraceError, match="argument of type: <class .object.>"):
        dsr.trace(Odd(), (torch.randn(2, 2),))
