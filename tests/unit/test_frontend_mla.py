"""Frontend for MLA: torch.arange -> iota, index_copy, rope_cos_sin -> rope_table, the wrapped
attention cores -> mla_attention (causal form for prefill, position form for decode); the traced
graph reproduces eager bit for bit in the reference interpreter; bad inputs are TraceErrors."""
from __future__ import annotations

import pytest
import torch
from dsr_compiler.ir import parse, print_graph, run_graph
from dsr_compiler.ir.errors import TraceError
from torch import nn

from dsr_compiler.frontend import param_tensors, trace
from dsr_compiler.models import MLA, ModelConfig
from dsr_compiler.models.steps import DecodeStep
from dsr_compiler.tolerance import TOLERANCES

CFG = ModelConfig.named("deepseek-v3-tiny").replace(hidden_size=64, num_attention_heads=2)


def _ops(g) -> list[str]:
    return [n.op for n in g.nodes]


@pytest.mark.parametrize("absorb", [False, True])
def test_prefill_traces_to_causal_mla_attention(absorb):
    m = MLA(CFG, absorb=absorb).eval()
    x = torch.randn(2, 5, 64)
    g = trace(m, (x,), dynamic={"x": {1: "S"}})
    ops = _ops(g)
    assert ops.count("iota") == 1 and ops.count("rope_table") == 1 and ops.count("rope") == 2
    (att,) = [n for n in g.nodes if n.op == "mla_attention"]
    assert len(att.inputs) == 5, "one arange position value for q and k: the causal form"
    assert parse(print_graph(g)) == g
    for s in (1, 7):
        xs = torch.randn(2, s, 64)
        (got,) = run_graph(g, [xs] + param_tensors(m, g))
        if absorb:   # the absorbed eager core lowers to the expanded form: same function, other rounding
            torch.testing.assert_close(got, m(xs), **TOLERANCES[torch.float32])
        else:
            assert torch.equal(got, m(xs)), "the IR references repeat eager op for op"


def test_decode_traces_cache_writes_and_position_mask():
    step = DecodeStep(MLA(CFG)).eval()
    args = (torch.randn(2, 2, 64), torch.randn(2, 9, CFG.kv_lora_rank), torch.randn(2, 9, CFG.qk_rope_head_dim),
            torch.tensor(4))
    g = trace(step, args, dynamic={"x": {0: "B"}, "kv_cache": {0: "B"}, "pe_cache": {0: "B"}})
    ops = _ops(g)
    assert ops.count("index_copy") == 2 and ops.count("iota") == 2
    (att,) = [n for n in g.nodes if n.op == "mla_attention"]
    assert len(att.inputs) == 7
    assert len(g.outputs) == 3
    for start in (0, 7):
        a = (args[0], args[1], args[2], torch.tensor(start))
        got = run_graph(g, list(a) + param_tensors(step, g))
        for x, y in zip(got, step(*a)):
            assert torch.equal(x, y)


class _Arange(nn.Module):
    def forward(self, x):
        return x * (torch.arange(2, x.size(0) * 3 + 2, 3) + 1).float()


def test_arange_with_start_and_step():
    g = trace(_Arange(), (torch.randn(4),), dynamic={"x": {0: "T"}})
    assert _ops(g)[0] == "iota"
    x = torch.randn(6)
    (got,) = run_graph(g, [x])
    torch.testing.assert_close(got, _Arange()(x))


class _FloatArange(nn.Module):
    def forward(self, x):
        return x + torch.arange(0.5, x.size(0) + 0.5)


class _FloatIndexCopy(nn.Module):
    def forward(self, x, idx, src):
        return x.index_copy(0, idx, src)


def test_bad_inputs_are_trace_errors():
    with pytest.raises(TraceError, match="torch.arange: float start 0.5"):
        trace(_FloatArange(), (torch.randn(3),))
    with pytest.raises(TraceError, match="index_copy: index must be an i32/i64 tensor"):
        trace(_FloatIndexCopy(), (torch.randn(4, 2), torch.zeros(1), torch.randn(1, 2)))
    with pytest.raises(TraceError, match="op `index_copy` rejects its inputs"):
        trace(_FloatIndexCopy(), (torch.randn(4, 2), torch.zeros(2, dtype=torch.int64), torch.randn(1, 2)))
