"""Launch plans (runtime/plan.py, runtime/launch.py): one step per top-level node of the fused graph,
symbols bound once per call, empty problems not launched, inputs checked before any launch, and
device-side check flags raised (and cleared) by `check()`."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dsr_compiler as dsr
from dsr_compiler.ir.errors import RuntimeLaunchError
from dsr_compiler.runtime.plan import ConstStep, KernelStep, ViewStep


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        y = self.lin(x)
        return y.reshape(-1), torch.sigmoid(y).sum(-1)


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    m = Head()
    cm = dsr.compile(m, (torch.randn(4, 32),), dynamic={"x": {0: "T"}}, backend="interpret")
    return m, cm


def test_one_step_per_top_level_node(compiled):
    _m, cm = compiled
    _be, plan = cm.plan("interpret")
    kinds = {ViewStep: "reshape", KernelStep: "call"}
    assert len(plan.steps) == len(cm.graph.nodes)
    for step, node in zip(plan.steps, cm.graph.nodes):
        if isinstance(step, ConstStep):
            assert step.node is node
        else:
            assert node.op == kinds[type(step)], (node.op, type(step).__name__)
    calls = [s for s in plan.steps if isinstance(s, KernelStep)]
    assert [s.name for s in calls] == [n.attr("kernel") for n in cm.graph.nodes if n.op == "call"]
    assert {s.name for s in calls} == {k.spec.name for k in cm.kernels}
    assert [s.name for s in plan.symbols] == ["T"]


@pytest.mark.parametrize("t", [1, 7, 33])
def test_symbols_are_bound_per_call(compiled, t):
    m, cm = compiled
    x = torch.randn(t, 32)
    flat, s = cm(x)
    with torch.no_grad():
        y = m.lin(x)
    assert flat.shape == (t * 16,) and s.shape == (t,)
    torch.testing.assert_close(flat, y.reshape(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, torch.sigmoid(y).sum(-1), rtol=1e-5, atol=1e-5)


def test_zero_tokens_launch_nothing_and_give_empty_outputs(compiled, monkeypatch):
    _m, cm = compiled
    _be, plan = cm.plan("interpret")
    launched = []
    for step in plan.steps:
        if isinstance(step, KernelStep):
            class Spy:
                def __init__(self, fn, name):
                    self.fn, self.name = fn, name

                def __getitem__(self, grid):
                    launched.append(self.name)
                    return self.fn[grid]
            monkeypatch.setattr(step, "fn", Spy(step.fn, step.name))
    flat, s = cm(torch.randn(0, 32))
    assert flat.shape == (0,) and s.shape == (0,)
    assert launched == []
    cm(torch.randn(2, 32))
    assert launched, "the spy sees launches of a non-empty problem"


def test_inputs_are_checked_before_any_launch(compiled):
    _m, cm = compiled
    _be, plan = cm.plan("interpret")
    with pytest.raises(RuntimeLaunchError, match="expected"):
        plan.run([])
    with pytest.raises(RuntimeLaunchError, match="must be a tensor"):
        plan.run([1.0] * len(cm.graph.inputs))
    meta = [torch.empty(3, 32, device="meta")] + [torch.empty(1, device="meta")] * (len(cm.graph.inputs) - 1)
    with pytest.raises(RuntimeLaunchError, match="the plan runs on cpu"):
        plan.run(meta)


def test_a_flagged_check_is_raised_once_and_cleared():
    """The device error flag of an index_copy with a position outside the cache (the decode-cache
    write of MLA): check() raises naming the kernel and the bound, and the flag is cleared."""

    class Cache(nn.Module):
        def forward(self, cache, pos, new):
            return cache.index_copy(0, pos, new)

    cache, new = torch.zeros(8, 4), torch.ones(1, 4)
    cm = dsr.compile(Cache(), (cache, torch.tensor([2]), new), backend="interpret")
    out = cm(cache, torch.tensor([3]), new)
    cm.check()
    assert torch.equal(out[3], torch.ones(4))
    cm(cache, torch.tensor([8]), new)
    with pytest.raises(RuntimeLaunchError, match=r"got index 8, outside the valid range \[0, 8\)"):
        cm.check()
    cm.check()                              # cleared: a later check sees nothing
