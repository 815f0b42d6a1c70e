"""A wrapped function's FX call is a proxy in the user's code, whatever its lowering computes: a lowering that
returns None (or a number) would make `mask is None` false while the graph has no mask. Refused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.errors import TraceError
from dsr_compiler.frontend import registry


def maybe_mask(x):
    return None


class UsesWrapped(nn.Module):
    def forward(self, x):
        m = maybe_mask(x)
        return x if m is None else x + m


def test_a_wrapped_function_lowered_to_none_is_refused(monkeypatch):
    monkeypatch.setitem(registry.WRAPPED_FUNCTIONS, (__name__, "maybe_mask"), "test_none")
    monkeypatch.setitem(registry.FUNCTION_LOWERINGS, "test_none", lambda cx, fn, args, kwargs: None)
    with pytest.raises(TraceError, match="returned None: a wrapped function's call is a tensor"):
        dsr.trace(UsesWrapped(), (torch.randn(3, 4),))
