"""The compiled routed MoE vs the eager zoo MoE (DESIGN.md §4 "MoE"), on the interpreter backend.

The frontend lowers `models.deepseek.MoE` to router -> dispatch -> grouped GEMMs -> combine
(plus the shared expert's GEMMs); these tests check outputs against eager within the tolerance
table, routing ids against eager *exactly* (inputs are continuous random draws, so ties have
probability ~0; `test_routing_ties_follow_the_eager_rule` makes exact ties on purpose), one
compile serving several token counts, no host synchronization, and an IR whose size does not
depend on the number of experts.

Hypothesis examples run the pipeline up to the interpreter without the sm_90a compile (it is the
slow part and is covered once by `test_full_compile_*` and by tests/codegen/test_moe_kernels.py).
"""
from __future__ import annotations

import math

import pytest
import torch
from dsr_compiler.codegen import lower_kernel, render
from dsr_compiler.ir.passes import PIPELINE, PassContext, run_passes
from dsr_compiler.runtime.launch import build_plan
from hypothesis import given, settings
from hypothesis import strategies as st
from dispatch_recorder import SYNC_METHODS, DispatchRecorder
from strategies import examples  # noqa: E402  per-test budget from the active profile

import dsr_compiler as dsr
from dsr_compiler.codegen.build import KernelArtifact
from dsr_compiler.errors import TraceError
from dsr_compiler.frontend import param_tensors
from dsr_compiler.models import MLP, ModelConfig, MoE
from tests.tolerances import assert_close

TINY = ModelConfig.named("deepseek-v3-tiny")
DT = {"f32": torch.float32, "bf16": torch.bfloat16}
MOE_FAMILIES = ["moe_router", "moe_dispatch", "moe_gemm", "moe_gemm", "moe_combine"]


def _moe(cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> MoE:
    """Weights like a trained model: gate logits ~ N(0, 1), a bias that really moves the selection."""
    g = torch.Generator().manual_seed(seed)
    m = MoE(cfg)
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        if m.gate.e_score_correction_bias is not None:
            m.gate.e_score_correction_bias.copy_(0.05 * torch.randn(cfg.n_routed_experts, generator=g))
    return m.to(dtype).eval()


def _x(tokens: int, h: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(tokens, h, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _interpreted(m: MoE, x0: torch.Tensor):
    """Trace once (T symbolic), run the pipeline, render every kernel and run it interpreted.
    The graph also returns the router's ids and weights, so routing can be compared with eager."""
    g = dsr.trace(m, (x0,), dynamic={"x": {0: "T"}})
    router = next(n for n in g.nodes if n.op == "moe_router")
    g = g.replace(outputs=g.outputs + (router.outputs[1].name, router.outputs[0].name))
    final = run_passes(g, list(PIPELINE), PassContext())[-1].graph
    specs = [lower_kernel(k, i) for i, k in enumerate(final.kernels, 1)]
    plan = build_plan(final, [KernelArtifact(s, render(s), None, 0.0, False) for s in specs], "interpret")
    params = [p.detach().contiguous() for p in param_tensors(m, g)]
    return (lambda x: plan.run([x] + params)), final


def _check(run, m: MoE, x: torch.Tensor) -> None:
    y, ids, weights = run(x)
    with torch.no_grad():
        ref = m(x)
        ref_w, ref_ids = m.gate(x)
    assert torch.equal(ids.long(), ref_ids), f"routing differs from eager:\n{ids}\nvs\n{ref_ids}"
    assert_close(weights, ref_w)
    assert_close(y, ref)


@st.composite
def moe_configs(draw) -> ModelConfig:
    n_group = draw(st.sampled_from([1, 2, 4]))
    epg = draw(st.sampled_from([2, 4]) if n_group > 1 else st.sampled_from([4, 6, 8]))
    e = n_group * epg
    topk_group = draw(st.integers(1, n_group))
    topk = draw(st.integers(1, min(6, topk_group * epg if n_group > 1 else e)))
    scoring = draw(st.sampled_from(["sigmoid", "softmax"]))
    return TINY.replace(
        hidden_size=64, moe_intermediate_size=32, n_routed_experts=e, n_group=n_group, topk_group=topk_group,
        num_experts_per_tok=topk, n_shared_experts=draw(st.integers(0, 2)), scoring_func=scoring,
        topk_method="noaux_tc" if scoring == "sigmoid" else "group_limited_greedy",
        norm_topk_prob=draw(st.booleans()), routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])))


@settings(max_examples=examples(8))
@given(cfg=moe_configs(), dtype=st.sampled_from(["f32", "bf16"]), seed=st.integers(0, 2**16),
       tokens=st.lists(st.integers(1, 40), min_size=1, max_size=2))
def test_compiled_moe_matches_eager(cfg, dtype, seed, tokens):
    dt = DT[dtype]
    m = _moe(cfg, dt, seed)
    run, final = _interpreted(m, _x(8, cfg.hidden_size, dt, seed))
    assert [k.family for k in final.kernels if k.family.startswith("moe")] == MOE_FAMILIES
    for t in [1] + tokens:        # 1 token: at most k experts busy, the rest empty
        _check(run, m, _x(t, cfg.hidden_size, dt, seed + t))


def test_empty_experts_and_one_hot_routing():
    """A bias that sends every token to the same experts leaves all others empty."""
    cfg = TINY.replace(hidden_size=64, moe_intermediate_size=32)
    m = _moe(cfg, seed=5)
    with torch.no_grad():
        m.gate.e_score_correction_bias.copy_(torch.tensor([0.0] * 12 + [5.0, 5.0, 6.0, 7.0]))
    run, _ = _interpreted(m, _x(4, 64, torch.float32, 0))
    for t in (1, 2, 33):
        x = _x(t, 64, torch.float32, t)
        _check(run, m, x)
        assert set(run(x)[1].flatten().tolist()) == {12, 13, 14, 15}


def test_routing_ties_follow_the_eager_rule():
    """Exact ties (duplicated gate rows): the lower expert index wins, as in eager's stable sort."""
    cfg = TINY.replace(hidden_size=64, moe_intermediate_size=32, n_shared_experts=0)
    m = _moe(cfg, seed=1)
    with torch.no_grad():
        m.gate.e_score_correction_bias.zero_()
        w = m.gate.weight
        w[9] = w[6]           # group 2 and group 1 hold identical experts
        w[10] = w[5]
        w[14] = w[4]          # group 3 ties with group 1's best expert
    run, _ = _interpreted(m, _x(4, 64, torch.float32, 0))
    x = 3.0 * w[6] / w[6].dot(w[6]) + 0.1 * _x(5, 64, torch.float32, 9)      # logit of expert 6 ~ 3
    _check(run, m, x)
    ids = run(x)[1]
    assert (ids[:, 0] == 6).all() and (ids[:, 1] == 9).all(), ids   # 6 and 9 tie: 6 first


def test_full_compile_runs_every_token_count():
    """dsr.compile (PTX + cubin for sm_90a) once; the same artifact runs T = 1, 3, 17, 64."""
    m = _moe(TINY, torch.bfloat16, seed=2)
    cm = dsr.compile(m, (_x(16, TINY.hidden_size, torch.bfloat16, 0),), dynamic={"x": {0: "T"}}, backend="interpret")
    fams = [k.spec.family for k in cm.kernels]
    assert [f for f in fams if f.startswith("moe")] == MOE_FAMILIES and fams.count("gemm") == 2
    for k in cm.kernels:
        assert k.compiled.cubin and k.compiled.spills == 0, k.spec.name
        assert "T" in "".join(k.spec.grid) or k.spec.family == "moe_dispatch"   # grids are sizes of T
    for t in (1, 3, 17, 64):
        x = _x(t, TINY.hidden_size, torch.bfloat16, 100 + t)
        with torch.no_grad():
            ref = m(x)
        assert_close(cm(x), ref)
    rep = cm.report()
    assert rep["totals"]["kernels"] == 7


def test_no_host_sync(monkeypatch):
    """The compiled call reads nothing back from device memory: no .item()/.tolist()/bool()/.cpu(),
    and the only ATen ops it issues are buffer allocation and the interpreter's argument staging
    (grids and sizes come from input shapes, routing stays on the device)."""
    m = _moe(TINY, seed=3)
    cm = dsr.compile(m, (_x(8, TINY.hidden_size, torch.float32, 0),), dynamic={"x": {0: "T"}}, backend="interpret")
    x = _x(11, TINY.hidden_size, torch.float32, 1)
    cm(x)                                    # warm: kernels imported, plan built

    def sync(*a, **k):
        raise AssertionError("host sync inside the compiled MoE")
    with monkeypatch.context() as mp:
        for name in SYNC_METHODS:
            mp.setattr(torch.Tensor, name, sync)
        with DispatchRecorder() as rec:
            y = cm(x)
    allowed = {"aten.empty.memory_format", "aten.new_empty.default", "aten.set_.source_Storage",
               "aten.set_.source_Storage_storage_offset", "aten.copy_.default", "aten.view.default"}
    assert set(rec.ops) <= allowed, set(rec.ops) - allowed
    with torch.no_grad():
        assert_close(y, m(x))


def test_ir_has_no_per_expert_loop():
    """The traced and fused IR are the same size whatever the expert count."""
    shapes = {}
    for e in (8, 16, 64):
        cfg = TINY.replace(hidden_size=64, moe_intermediate_size=32, n_routed_experts=e, n_group=4, topk_group=2,
                           num_experts_per_tok=4)
        m = MoE(cfg)
        g = dsr.trace(m, (torch.randn(3, 64),), dynamic={"x": {0: "T"}})
        final = run_passes(g, list(PIPELINE), PassContext())[-1].graph
        shapes[e] = ([n.op for n in g.nodes], len(g.inputs), [k.family for k in final.kernels])
        assert {str(s) for v in g.inputs for s in v.type.free_symbols()} == {"T"}
    assert shapes[8] == shapes[16] == shapes[64]


def test_derived_expert_params():
    m = _moe(TINY.replace(hidden_size=64, moe_intermediate_size=32), seed=4)
    outer = torch.nn.Sequential(torch.nn.Identity(), m)         # the MoE at path "1"
    g = dsr.trace(outer, (torch.randn(2, 64),), dynamic={"input": {0: "T"}})
    assert {"1.experts.w13", "1.experts.w2"} <= set(g.params)
    got = dict(zip(g.params, param_tensors(outer, g)))
    e0, e7 = m.experts[0], m.experts[7]
    assert got["1.experts.w13"].shape == (16, 64, 64)
    assert torch.equal(got["1.experts.w13"][7], torch.cat([e7.w1.weight, e7.w3.weight]))
    assert torch.equal(got["1.experts.w2"][0], e0.w2.weight)
    text = str(g)
    assert "1.experts.{0..15}.w1+w3" in text and "1.experts.{0..15}.w2" in text   # per-expert names in the origin
    assert dsr.ir.parse(text) == g
    m.experts[2] = MLP(64, 16)                                   # the module changed after tracing
    with pytest.raises(TraceError, match="cannot compute derived parameter `1.experts.w13`"):
        param_tensors(outer, g)


def test_trace_errors_are_clear():
    m = _moe(TINY.replace(hidden_size=64, moe_intermediate_size=32))
    m.experts[3] = torch.nn.Linear(64, 64)
    with pytest.raises(TraceError, match="experts.3.w1 must be a bias-free nn.Linear"):
        dsr.trace(m, (torch.randn(2, 64),))
    m2 = _moe(TINY.replace(hidden_size=64, moe_intermediate_size=32))
    m2.experts[1] = MLP(64, 16)
    with pytest.raises(TraceError, match="experts must share one shape"):
        dsr.trace(m2, (torch.randn(2, 64),))
    with pytest.raises(TraceError, match=r"expected float x \[\.\.\., 64\]"):
        dsr.trace(_moe(TINY.replace(hidden_size=64, moe_intermediate_size=32)), (torch.randn(2, 32),))


def test_cli_moe(capsys):
    from dsr_compiler.cli import main
    assert main(["run", "--module", "moe", "--backend", "interpret", "--check", "--seq", "5", "--no-fp8"]) == 0
    assert "check passed" in capsys.readouterr().out
    assert main(["run", "--module", "moe", "--model", "deepseek-v3", "--no-fp8"]) == 2   # meta weights: compile-only
    assert "compile-only" in capsys.readouterr().err
