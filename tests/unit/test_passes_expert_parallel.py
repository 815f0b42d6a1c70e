"""The expert_parallel pass and the front door's `ep=` (ir/passes/expert_parallel.py, dsr_compiler/ep.py).

Compiled here without other processes: `EpPlan(N, rank)` builds one rank's plan (IR, kernels, report)
and a one-rank gloo group runs the exchange for real. The multi-process runs are tests/dist.
"""
from __future__ import annotations

import datetime

import pytest
import torch

import dsr_compiler as dsr
from dsr_compiler.ep import EpPlan
from dsr_compiler.errors import DsrError
from dsr_compiler.ir.errors import RuntimeLaunchError
from dsr_compiler.models import ModelConfig
from dsr_compiler.workloads import build

CFG = ModelConfig.named("deepseek-v3-tiny")       # 16 experts, top-4


def _moe():
    return build(CFG, "moe", 1, 8, "f32", 0)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("n,rank", [(2, 1), (4, 0), (16, 15)])
def test_plan_of_one_rank(n, rank, fp8):
    wl = _moe()
    cm = dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, fp8=fp8, backend="interpret",
                     ep=EpPlan(n, rank))
    g = cm.graph
    top = [nd.op for nd in g.nodes]
    assert top.count("all_to_all") == 2                      # dispatch and combine, between kernels
    fams = [k.spec.family for k in cm.kernels]
    assert fams.count("ep_route") == 1 and fams.count("gather_rows") == (4 if fp8 else 3)   # x (codes + scales), weights, back
    el = 16 // n
    shapes = dict(zip(g.params, (tuple(p.shape) for p in cm.params)))
    w13 = "experts.w13.q.local" if fp8 else "experts.w13.local"
    assert shapes[w13][0] == el and not any(p in shapes for p in ("experts.w13", "experts.w13.q"))
    slices = [d for d in cm.derived_params if d["rule"] == "expert_slice"]
    assert len(slices) == (4 if fp8 else 2)
    assert all(d["attrs"] == {"start": rank * el, "stop": (rank + 1) * el} for d in slices)
    disp = next(nd for k in g.kernels for nd in k.body.nodes if nd.op == "moe_dispatch")
    assert disp.attr("n_experts") == el
    rep = cm.report()
    assert rep["options"]["ep"] == {"n_ranks": n, "rank": rank, "group": f"ep{n}", "backend": None, "mode": "fixed"}
    assert dsr.ir.parse(str(g)) == g                       # the plan's text IR reads back
    # the slice really is this rank's experts of the full stacked weight
    full = dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, fp8=fp8, backend="interpret")
    fshapes = dict(zip(full.graph.params, full.params))
    assert torch.equal(dict(zip(g.params, cm.params))[w13], fshapes[w13.removesuffix(".local")][rank * el:(rank + 1) * el])
    with pytest.raises(RuntimeLaunchError, match="without a process group"):
        cm(wl.make_inputs(3, 1)[0])


def test_exact_mode_sends_the_counts_along():
    wl = _moe()
    cm = dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, backend="interpret", ep=EpPlan(4, 1),
                     ep_mode="exact")
    ex = [nd for nd in cm.graph.nodes if nd.op == "all_to_all"]
    assert [nd.attr("split") for nd in ex] == ["counts", "counts"]
    assert ex[0].inputs[-1].startswith("ep.counts") and ex[1].inputs[-1] == ex[0].outputs[-1].name
    route = next(k for k in cm.kernels if k.spec.family == "ep_route")
    assert "COUNTS" in dict(route.spec.params) and dict(route.spec.params)["COUNTS"]
    rep = cm.report()
    assert {e["mode"] for e in rep["collectives"]} == {"exact"} and "one host sync" in rep["collective_totals"]["mode"]
    fixed = dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, backend="interpret", ep=EpPlan(4, 1))
    assert rep["collective_totals"]["sent_bytes"] < fixed.report()["collective_totals"]["sent_bytes"]
    assert dsr.ir.parse(str(cm.graph)) == cm.graph
    with pytest.raises(DsrError, match="ep_mode: expected one of fixed, exact"):
        dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, ep=EpPlan(4, 1), ep_mode="fast")


def test_decoder_plan_keeps_attention_replicated():
    wl = build(CFG, "decoder", 1, 8, "f32", 0, phase="decode")
    cm = dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, backend="interpret", ep=EpPlan(2, 0))
    fams = [k.spec.family for k in cm.kernels]
    assert "mla_decode" in fams and fams.count("ep_route") == 1
    assert [nd.op for nd in cm.graph.nodes].count("all_to_all") == 2


@pytest.mark.parametrize("ep,match", [
    (EpPlan(3, 0), "16 routed experts do not divide over 3 ranks"),
    (EpPlan(2, 2), "rank 2 is not one of the 2 ranks"),
    (EpPlan(0, 0), "rank count must be an int >= 1"),
    ("4", "expected an int, a torch.distributed ProcessGroup or EpPlan"),
    (True, "expected an int"),
    (2, "torch.distributed is not initialised"),
])
def test_bad_ep_is_a_clear_error(ep, match):
    wl = _moe()
    with pytest.raises(DsrError, match=match):
        dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, backend="interpret", ep=ep)


def test_module_without_moe_is_refused():
    wl = build(CFG, "mlp", 1, 8, "f32", 0)
    with pytest.raises(DsrError, match="no routed MoE layer"):
        dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, backend="interpret", ep=EpPlan(2, 0))


def test_one_rank_group_runs_the_exchange(tmp_path):
    """ep=1 on a real one-process gloo group: the exchange runs and the output is bitwise the plain plan's."""
    from torch import distributed as dist
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        wl = _moe()
        cm = dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, backend="interpret", ep=1)
        one = dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, backend="interpret")
        exact = dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, backend="interpret", ep=1,
                            ep_mode="exact")
        for t in (5, 0, 9):
            x = wl.make_inputs(t, 3)[0]
            assert torch.equal(cm(x), one(x)) and torch.equal(exact(x), one(x))
        with pytest.raises(DsrError, match="the default process group has 1 ranks"):
            dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, backend="interpret", ep=2)
    finally:
        dist.destroy_process_group()
