"""The `rewrite_vocab_loss` pass: plain LM-head log-probs / cross-entropy become `token_logprobs`
(outputs unchanged), and forms whose logits are needed elsewhere are left alone with a note."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from dsr_compiler.ir import run_graph
from dsr_compiler.ir.passes import PassContext, rewrite_vocab_loss
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.frontend import param_tensors
from dsr_compiler.models.grpo import per_token_logps
from tests.tolerances import assert_close

H, V = 8, 13


def rewrite(module: nn.Module, inputs: tuple):
    g = dsr.trace(module, inputs)
    ctx = PassContext()
    out = rewrite_vocab_loss(g, ctx)
    args = [x for x in inputs if isinstance(x, torch.Tensor)] + [p.detach() for p in param_tensors(module, g)]
    for a, b in zip(run_graph(out, args), run_graph(g, args)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b)
    return g, out, ctx


def ops(g) -> list[str]:
    return [n.op for n in g.nodes]


class LogSoftmaxGather(nn.Module):
    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def forward(self, hidden, lm_head_weight, ids):
        logits = (hidden @ lm_head_weight.T).float() / self.t
        return torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


class HeadCE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lm_head = nn.Linear(H, V, bias=False)

    def forward(self, hidden, ids):
        return F.cross_entropy(self.lm_head(hidden) * 2.0, ids, reduction="none")


def test_log_softmax_gather_becomes_token_logprobs_with_its_temperature():
    h, w, ids = torch.randn(2, 3, H), torch.randn(V, H), torch.randint(0, V, (2, 3))
    _, out, ctx = rewrite(LogSoftmaxGather(0.5), (h, w, ids))
    assert "token_logprobs" in ops(out) and not {"log_softmax", "matmul", "gather"} & set(ops(out))
    (n,) = [n for n in out.nodes if n.op == "token_logprobs"]
    assert n.attr("temperature") == 0.5
    assert ctx.counts["rewrite_vocab_loss.token_logprobs"] == 1
    # the same op as the zoo's wrapped per_token_logps
    assert_close(run_graph(out, [h, w, ids])[0], per_token_logps(h, w, ids, 0.5))


def test_cross_entropy_with_an_lm_head_module_and_a_scale():
    m = HeadCE()
    h, ids = torch.randn(5, H), torch.tensor([0, 12, -100, 4, 4])
    _, out, _ = rewrite(m, (h, ids))
    (n,) = [n for n in out.nodes if n.op == "token_logprobs"]
    assert n.attr("temperature") == 0.5            # logits * 2 == logits / 0.5
    assert_close(run_graph(out, [h, ids, m.lm_head.weight.detach()])[0],
                 F.cross_entropy(m.lm_head(h) * 2.0, ids, reduction="none").detach())


def test_bf16_log_softmax_result_is_cast_back():
    h, w, ids = torch.randn(4, H).bfloat16(), torch.randn(V, H).bfloat16(), torch.randint(0, V, (4,))

    class M(nn.Module):
        def forward(self, hidden, lm_head_weight, ids):
            return F.log_softmax(F.linear(hidden, lm_head_weight), -1).gather(-1, ids.unsqueeze(-1))
    g, out, _ = rewrite(M(), (h, w, ids))
    assert ops(out)[-1] == "cast" and out.output_values()[0].type == g.output_values()[0].type


def test_logits_needed_elsewhere_are_left_alone():
    class Entropy(nn.Module):   # the log-softmax is read whole: the logits must exist
        def forward(self, hidden, lm_head_weight, ids):
            lsm = torch.log_softmax(hidden @ lm_head_weight.T, dim=-1)
            return lsm.gather(-1, ids.unsqueeze(-1)).sum() + (lsm.exp() * lsm).sum()

    class Both(nn.Module):      # the logits are returned too
        def forward(self, hidden, lm_head_weight, ids):
            logits = hidden @ lm_head_weight.T
            return torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)), logits

    h, w, ids = torch.randn(3, H), torch.randn(V, H), torch.randint(0, V, (3,))
    for m in (Entropy(), Both()):
        g, out, ctx = rewrite(m, (h, w, ids))
        assert ops(out) == ops(g)
        assert any("cannot rewrite" in note for note in ctx.notes)


def test_compiled_fallback_uses_the_gather_kernel():
    class Both(nn.Module):
        def forward(self, hidden, lm_head_weight, ids):
            lsm = torch.log_softmax(hidden @ lm_head_weight.T, dim=-1)
            return lsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * lsm.amax(dim=-1)
    h, w, ids = torch.randn(6, H), torch.randn(V, H), torch.randint(0, V, (6,))
    cm = dsr.compile(Both(), (h, w, ids), backend="interpret", fp8=False)
    assert "gather" in [k.spec.family for k in cm.kernels]
    assert_close(cm(h, w, ids), Both()(h, w, ids))
