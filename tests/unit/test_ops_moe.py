"""MoE ops of the op table (ir/ops/moe.py): symbolic type rules, refusals, references vs the zoo."""
from __future__ import annotations

import math

import pytest
import sympy
import torch
from dsr_compiler.ir import OPS, DType, GraphBuilder, Node, TensorType, Value, verify
from dsr_compiler.ir.errors import VerifyError
from dsr_compiler.ir.ops import TypeRuleError
from dsr_compiler.ir.types import sym

from dsr_compiler.models import ModelConfig, MoE

T = sym("T")
f32, bf16, i32 = DType.f32, DType.bf16, DType.i32
ROUTER = {"topk": 8, "n_group": 8, "topk_group": 4, "scoring": "sigmoid", "group_score": "top2_sum",
          "route_scale": 2.5, "norm_topk": True}


def _t(dt: DType, *shape) -> TensorType:
    return TensorType(dt, shape)


def test_shapes_are_expressions_of_T():
    w, ids = OPS["moe_router"].infer([_t(bf16, T, 7168), _t(bf16, 256, 7168), _t(f32, 256)], ROUTER)
    assert (str(w), str(ids)) == ("f32[T,8]", "i32[T,8]")
    rows, blocks = OPS["moe_dispatch"].infer([ids], {"n_experts": 256, "block_m": 64})
    assert str(rows) == "i32[8*T+16128]" and blocks.shape[0] == sympy.ceiling((8 * T + 16128) / 64)
    (act,) = OPS["moe_gemm_gate_up"].infer([_t(bf16, T, 7168), rows, blocks, _t(bf16, 256, 4096, 7168)],
                                           {"topk": 8, "block_m": 64})
    assert str(act) == "bf16[8*T+16128,2048]"
    (ys,) = OPS["moe_gemm_down"].infer([act, rows, blocks, _t(bf16, 256, 7168, 2048), w], {"block_m": 64})
    assert str(ys) == "f32[8*T,7168]"
    (y,) = OPS["moe_combine"].infer([ys, _t(bf16, T, 7168)], {"topk": 8, "dtype": bf16})
    assert str(y) == "bf16[T,7168]"


@pytest.mark.parametrize("op, ins, attrs, match", [
    ("moe_router", [_t(f32, T, 64), _t(f32, 16, 32)], dict(ROUTER, topk=2, n_group=4, topk_group=2), "gate weight"),
    ("moe_router", [_t(f32, T, 64), _t(f32, 16, 64)], dict(ROUTER, topk=2, n_group=3), "must divide"),
    ("moe_router", [_t(f32, T, 64), _t(f32, 16, 64)], dict(ROUTER, topk=5, n_group=4, topk_group=1), "exceeds"),
    ("moe_router", [_t(f32, T, 64), _t(f32, 16, 64)], dict(ROUTER, topk=2, n_group=4, scoring="relu"), "scoring"),
    ("moe_router", [_t(f32, T, 64), _t(f32, T, 64)], dict(ROUTER, topk=2, n_group=1), "expert count must be static"),
    ("moe_dispatch", [_t(f32, T, 4)], {"n_experts": 8, "block_m": 16}, "integer"),
    ("moe_gemm_gate_up", [_t(f32, T, 32), _t(i32, 4 * T), _t(i32, T), _t(f32, 4, 64, 32)],
     {"topk": 2, "block_m": 16}, "sorted slots must be i32"),
    ("moe_gemm_gate_up", [_t(f32, T, 32), _t(i32, 2 * T + 60), _t(i32, sympy.ceiling((2 * T + 60) / 16)),
                          _t(bf16, 4, 64, 32)], {"topk": 2, "block_m": 16}, "w13 must be"),
    ("moe_combine", [_t(f32, 3 * T + 1, 8)], {"topk": 3, "dtype": f32}, "not a multiple"),
    ("moe_combine", [_t(f32, 2 * T, 8), _t(f32, T, 4)], {"topk": 2, "dtype": f32}, "shared-expert"),
])
def test_bad_inputs_are_refused(op, ins, attrs, match):
    with pytest.raises(TypeRuleError, match=match):
        OPS[op].infer(ins, attrs)


def test_verifier_reports_a_bad_moe_node():
    b = GraphBuilder("g")
    b.add_input("ids", _t(i32, T, 4))
    bad_rows = Value("rows", _t(i32, 4 * T))                       # missing the E*(BM-1) pad rows
    b.add(Node((bad_rows, Value("blk", _t(i32, T))), "moe_dispatch", ("ids",), {"n_experts": 8, "block_m": 16}))
    with pytest.raises(VerifyError, match="moe_dispatch declares"):
        verify(b.build(["rows"]))


def test_router_reference_is_the_zoo_gate():
    cfg = ModelConfig.named("deepseek-v3-tiny")
    for c in (cfg, cfg.replace(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False)):
        m = MoE(c)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            m.gate.weight.copy_(torch.randn(m.gate.weight.shape, generator=g) / math.sqrt(c.hidden_size))
        x = torch.randn(9, c.hidden_size, generator=g)
        bias = m.gate.e_score_correction_bias
        attrs = {"topk": c.num_experts_per_tok, "n_group": c.n_group, "topk_group": c.topk_group,
                 "scoring": c.scoring_func, "group_score": "top2_sum" if bias is not None else "max",
                 "route_scale": c.routed_scaling_factor, "norm_topk": c.norm_topk_prob}
        args = [x, m.gate.weight] + ([bias] if bias is not None else [])
        w, ids = OPS["moe_router"].reference(*args, **attrs)
        ref_w, ref_ids = m.gate(x)
        assert torch.equal(ids.long(), ref_ids) and torch.equal(w, ref_w)
