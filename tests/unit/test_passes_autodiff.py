"""The `differentiate` pass (ir/passes/autodiff.py): every derivative rule against torch autograd,
on traced modules run by the reference interpreter (no kernels), and its refusals."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dsr_compiler.ir import print_graph, run_graph
from dsr_compiler.ir.passes import (
    GradError,
    PassContext,
    differentiate,
    rewrite_vocab_loss,
)
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.errors import DsrError
from tests.tolerances import assert_close


def grads_via_ir(module: nn.Module, inputs: tuple, wrt: tuple[str, ...]):
    g = dsr.trace(module, inputs)
    ctx = PassContext(options={"grad_wrt": wrt})
    out = differentiate(rewrite_vocab_loss(g, ctx), ctx)
    assert "stop_gradient" not in print_graph(out)
    res = run_graph(out, [x for x in inputs if isinstance(x, torch.Tensor)])
    return res[0], dict(zip(wrt, res[1:])), out


def grads_via_torch(module: nn.Module, inputs: tuple, wrt: tuple[str, ...]):
    from dsr_compiler.grads import eager_loss_and_grads
    return eager_loss_and_grads(module, inputs, wrt)


def check(module: nn.Module, inputs: tuple, wrt: tuple[str, ...]):
    loss, grads, g = grads_via_ir(module, inputs, wrt)
    ref, ref_grads = grads_via_torch(module, inputs, wrt)
    assert_close(loss, ref)
    for n in wrt:
        assert grads[n].dtype == ref_grads[n].dtype and grads[n].shape == ref_grads[n].shape, n
        assert_close(grads[n], ref_grads[n])
    return g


class Pointwise(nn.Module):
    def forward(self, x, y):
        a = torch.exp(x) * y - torch.log(y) / torch.sqrt(y)
        b = torch.sigmoid(x) + torch.tanh(y) * torch.reciprocal(y) - x ** 3
        c = torch.where(x > 0, a, b) - (-x)
        return (c / (1.0 + y * y)).sum()


class MaxMinClamp(nn.Module):
    def forward(self, x, y):
        # ties on purpose: x == y where y was copied from x; clamp bounds hit exactly
        m = torch.maximum(x, y) * 2.0 + torch.minimum(x, y)
        c = torch.clamp(x, -0.5, 0.5) + torch.clamp(y, min=0.0) + x.clamp_max(1.0)
        return (m * c).sum()


class Broadcast(nn.Module):
    def forward(self, x, y):           # x [4, 1], y [4, 5]: x's gradient sums over the broadcast dim
        z = (x + y) * y - x
        return z.mean()


class Reductions(nn.Module):
    def forward(self, x):              # x [3, 4, 5]
        a = x.sum(dim=1, keepdim=True) * x
        b = x.permute(2, 0, 1).reshape(5, 12).mean(dim=0)
        c = x.mean(dim=-1).unsqueeze(-1).expand(3, 4, 5)
        return a.sum() + (b * b).sum() + (c * x).sum() + x.sum(dim=0).sum()


class Detach(nn.Module):
    def forward(self, x):              # d/dx [x * stop(x) + exp(x - stop(x))] = stop(x) + 1
        return (x * x.detach() + torch.exp(x - x.detach())).sum()


class Casts(nn.Module):
    def forward(self, x):
        return (x.to(torch.bfloat16).float() * x).sum()


def test_pointwise_rules():
    x = torch.randn(4, 6)
    y = torch.rand(4, 6) + 0.5
    check(Pointwise(), (x, y), ("x", "y"))


def test_max_min_ties_and_clamp_bounds_follow_torch():
    x = torch.tensor([[-0.5, 0.5, 1.0, 0.2, -2.0, 0.0]])
    y = x.clone()
    y[0, 3] = 0.7
    check(MaxMinClamp(), (x, y), ("x", "y"))


def test_broadcast_grads_are_summed():
    check(Broadcast(), (torch.randn(4, 1), torch.randn(4, 5)), ("x", "y"))


def test_reduction_and_layout_rules():
    check(Reductions(), (torch.randn(3, 4, 5),), ("x",))


def test_detach_has_zero_derivative():
    g = check(Detach(), (torch.randn(5),), ("x",))
    assert "stop_gradient" not in print_graph(g)


def test_casts_send_the_gradient_back_in_the_input_dtype():
    check(Casts(), (torch.randn(8),), ("x",))


def test_input_the_loss_ignores_gets_zeros():
    class M(nn.Module):
        def forward(self, x, y):
            return (x * 2.0).sum() + y.sum() * 0.0 + (y > 0).sum().float()
    _loss, grads, _ = grads_via_ir(M(), (torch.randn(3), torch.randn(3)), ("x", "y"))
    assert torch.equal(grads["x"], torch.full((3,), 2.0))

    assert torch.equal(grads["y"], torch.zeros(3))

    class Unused(nn.Module):
        def forward(self, x, y=None):
            return (x * 2.0).sum()
    _, grads, _ = grads_via_ir(Unused(), (torch.randn(3), torch.randn(3)), ("y",))
    assert torch.equal(grads["y"], torch.zeros(3))
    with pytest.raises(DsrError, match="is not a tensor input"):
        dsr.compile(Unused(), (torch.randn(3), None), grad_wrt=("y",), backend="interpret")


def test_no_stop_gradient_left_without_grad_wrt():
    g = dsr.trace(Detach(), (torch.randn(5),))
    out = differentiate(g, PassContext())
    assert "stop_gradient" in print_graph(g) and "stop_gradient" not in print_graph(out)
    x = torch.randn(5)
    assert_close(run_graph(out, [x])[0], Detach()(x))


def test_refusals():
    class Soft(nn.Module):
        def forward(self, x):
            return torch.softmax(x, dim=-1).sum()

    class Vector(nn.Module):
        def forward(self, x):
            return x * 2.0

    class Ints(nn.Module):
        def forward(self, x, n):
            return (x * n).sum()

    ctx = PassContext(options={"grad_wrt": ("x",)})
    with pytest.raises(GradError, match="no derivative rule for `softmax`"):
        differentiate(dsr.trace(Soft(), (torch.randn(2, 3),)), ctx)
    with pytest.raises(GradError, match="0-d float loss"):
        differentiate(dsr.trace(Vector(), (torch.randn(3),)), ctx)
    for names, match in ((("nope",), "is not a parameter of Ints.forward"), (("n",), "not a float tensor"),
                         (("x", "x"), "named twice")):
        with pytest.raises(DsrError, match=match):
            dsr.compile(Ints(), (torch.randn(3), torch.ones(3, dtype=torch.int64)), grad_wrt=names,
                        backend="interpret")


def test_plain_cross_entropy_differentiates_through_token_logprobs():
    class CE(nn.Module):
        def forward(self, hidden, lm_head_weight, ids):
            return F.cross_entropy(hidden @ lm_head_weight.T, ids)
    h, w = torch.randn(6, 8), torch.randn(11, 8)
    ids = torch.tensor([1, 0, 10, -100, 3, 3])
    g = check(CE(), (h, w, ids), ("hidden", "lm_head_weight"))
    ops = {n.op for n in g.nodes}
    assert {"token_logprobs", "token_logprobs_grad_hidden", "token_logprobs_grad_weight"} <= ops
    assert not ops & {"log_softmax", "matmul", "linear", "gather"}


def test_grpo_workload_ir_parses_back_after_every_pass():
    from dsr_compiler.ir import parse
    from dsr_compiler.ir.passes import PIPELINE, run_passes
    from dsr_compiler.models import ModelConfig
    from dsr_compiler.workloads import build
    wl = build(ModelConfig.named("deepseek-v3-tiny"), "grpo", 1, 4)
    g = dsr.trace(wl.module, wl.example_inputs)
    records = run_passes(g, PIPELINE, PassContext(options={"grad_wrt": wl.grad_wrt}))
    for r in records:
        assert parse(print_graph(r.graph)) == r.graph, r.name
    final = records[-1].graph
    assert len(final.outputs) == 3
    fams = [k.family for k in final.kernels]
    assert fams[0] == "vocab_logprobs" and fams.count("vocab_grad_hidden") == fams.count("vocab_grad_weight") == 1
