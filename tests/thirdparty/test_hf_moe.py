"""transformers' MoE blocks (DeepSeek-V3, Qwen3-MoE, Mixtral) compile to the zoo's MoE kernels: the router
and the stacked experts are recognised by structure and a probe (frontend/lowerings/moe_patterns.py), under
each of transformers' experts implementations, with one symbolic token dimension, and match eager."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.errors import TraceError
from dsr_compiler.tolerance import compare_fp8
from hf_modules import build

MOE_BLOCKS = ("deepseek_moe", "qwen3_moe_block", "mixtral_moe_block")
MOE_FAMILIES = ["moe_router", "moe_dispatch", "moe_gemm", "moe_gemm", "moe_combine"]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("experts", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("name", MOE_BLOCKS)
def test_moe_block_compiles_to_grouped_gemms(name, experts):
    m, inputs, dyn = build(name, experts)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cm = dsr.compile(m, inputs(8), dynamic=dyn, backend="interpret")
    fams = [k.spec.family for k in cm.kernels]
    assert [f for f in fams if f.startswith("moe")] == MOE_FAMILIES, fams
    assert fams.count("gemm") == (2 if name == "deepseek_moe" else 0), fams     # the shared expert (gate+up, down)
    ops = [n.op for n in dsr.trace(m, inputs(8), dynamic=dyn).nodes]
    assert ops.count("moe_router") == ops.count("moe_dispatch") == ops.count("moe_combine") == 1, ops
    for t in (1, 8, 16):
        x = inputs(t, seed=t)
        with torch.no_grad():
            ref = m(*x)
        assert rel_err(cm(*x), ref) <= 1e-5
    for k, v in m.state_dict().items():                  # the probe put its own tensors in, never the module's
        assert torch.equal(v, before[k]), k


def test_recognised_router_keeps_its_outputs():
    """The router alone: logits, weights and indices (int64, as transformers returns them) like eager."""
    m, inputs, _ = build("deepseek_moe")
    gate = m.gate
    cm = dsr.compile(gate, (inputs(8)[0].view(8, -1),), dynamic={"hidden_states": {0: "T"}}, backend="interpret")
    for t in (1, 5):
        x = inputs(t, seed=t)[0].view(t, -1)
        with torch.no_grad():
            logits, w, ids = gate(x)
        cl, cw, cids = cm(x)
        assert cids.dtype == ids.dtype == torch.int64 and cw.dtype == w.dtype and cl.dtype == logits.dtype
        torch.testing.assert_close(cl, logits, rtol=1e-6, atol=1e-6)
        order, corder = ids.sort(-1), cids.sort(-1)
        assert torch.equal(order.values, corder.values)
        torch.testing.assert_close(cw.gather(-1, corder.indices), w.gather(-1, order.indices), rtol=1e-6, atol=1e-7)


def test_moe_block_fp8():
    """FP8 on (bf16 model): the recognised experts take the FP8 grouped GEMMs like the zoo's MoE."""
    m, inputs, dyn = build("deepseek_moe", hidden_size=128, moe_intermediate_size=128)   # 128-multiples: FP8 blocks
    m = m.to(torch.bfloat16)
    cm = dsr.compile(m, tuple(t.bfloat16() for t in inputs(8)), dynamic=dyn, fp8=True, backend="interpret")
    fams = [k.spec.family for k in cm.kernels]
    assert fams.count("moe_gemm_fp8") == 2 and "moe_gemm" not in fams, fams
    x = tuple(t.bfloat16() for t in inputs(16, seed=3))
    with torch.no_grad():
        ref = m(*x)
    r = compare_fp8(cm(*x), ref, "fp8")
    assert r["ok"] and r["calc_diff"] > 1e-6, r       # quantized (not bitwise bf16), and within the fp8 bound


def test_experts_with_another_activation_are_not_recognised():
    """Same tensors, different function (GELU experts): the probe refuses the rewrite, the trace stops at the
    data-dependent code and its error says why the MoE rewrite did not fire."""
    m, inputs, dyn = build("mixtral_moe_block")
    m.experts.act_fn = nn.GELU()
    with pytest.raises(TraceError) as e:
        dsr.compile(m, inputs(8), dynamic=dyn, backend="interpret")
    assert "MoE experts `experts` (MixtralExperts) not recognised" in str(e.value)
    assert "another activation" in str(e.value)


class SoftplusRouter(nn.Module):
    """A router with the structure of transformers' (weight, top_k) but another score function."""

    def __init__(self, e: int = 8, h: int = 64, k: int = 2) -> None:
        super().__init__()
        self.top_k = k
        self.weight = nn.Parameter(torch.randn(e, h) * 0.1)

    def forward(self, x):
        logits = x @ self.weight.T
        w, i = torch.nn.functional.softplus(logits).topk(self.top_k, dim=-1)
        return logits, w, i


def test_router_with_another_score_is_not_recognised():
    with pytest.raises(TraceError) as e:
        dsr.compile(SoftplusRouter(), (torch.randn(8, 64),), dynamic={"x": {0: "T"}}, backend="interpret")
    assert "MoE router the top-level module (SoftplusRouter) not recognised: no candidate routing matches" \
        in str(e.value)


def _recording_compiles(monkeypatch) -> list:
    """The CompiledModules that torch.compile(backend="dsr") builds, in order."""
    from dsr_compiler import api
    built: list = []
    real = api.compile

    def recording(module, inputs, **kw):
        built.append(real(module, inputs, **kw))
        return built[-1]
    monkeypatch.setattr(api, "compile", recording)
    return built


@pytest.mark.parametrize("name,experts", [("deepseek_moe", "grouped_mm"), ("deepseek_moe", "batched_mm"),
                                          ("qwen3_moe_block", "grouped_mm"), ("mixtral_moe_block", "grouped_mm")])
def test_moe_block_under_torch_compile(name, experts, monkeypatch):
    """torch.compile(backend="dsr"): Dynamo inlines the router and the experts; the backend cuts each call
    back out of its graph (dynamo_recognize.py) and lowers it as dsr.compile does: the grouped-GEMM kernels,
    one compile per Dynamo graph (static 8, then the dynamic token dim, then Dynamo's own size-1 graph)."""
    built = _recording_compiles(monkeypatch)
    m, inputs, _ = build(name, experts)
    torch._dynamo.reset()
    cm = torch.compile(m, backend="dsr")
    for t in (8, 16, 1, 32):
        x = inputs(t, seed=t)
        with torch.no_grad():
            ref = m(*x)
            out = cm(*x)
        out, ref = (out[0], ref[0]) if isinstance(ref, tuple) else (out, ref)
        assert rel_err(out, ref) <= 1e-5, t
    assert 2 <= len(built) <= 3, len(built)
    for c in built:
        fams = [k.spec.family for k in c.kernels]
        assert [f for f in fams if f.startswith("moe")] == MOE_FAMILIES, fams
    torch._dynamo.reset()


def test_decoder_layer_under_torch_compile(monkeypatch):
    """DeepSeek's MoE decoder layer (attention + MoE, transformers' default grouped_mm experts) under
    torch.compile: one graph per size class, each with the recognised MoE kernels and the attention."""
    built = _recording_compiles(monkeypatch)
    m, inputs, _ = build("deepseek_decoder_layer", "grouped_mm")
    torch._dynamo.reset()
    cm = torch.compile(m, backend="dsr")
    for t in (8, 16):
        x = inputs(t, seed=t)
        with torch.no_grad():
            assert rel_err(cm(*x), m(*x)) <= 1e-5, t
    fams = [k.spec.family for k in built[-1].kernels]
    assert [f for f in fams if f.startswith("moe")] == MOE_FAMILIES and "attention" in fams, fams
    torch._dynamo.reset()


def test_eager_experts_under_torch_compile_say_why():
    """transformers' eager experts loop breaks Dynamo's graph at `nonzero`: the piece Dynamo hands over is
    refused, and the error says what to do (another experts implementation, or dsr.compile)."""
    from torch._dynamo.exc import BackendCompilerFailed
    from dsr_compiler.errors import DsrError
    m, inputs, _ = build("deepseek_moe", "eager")
    torch._dynamo.reset()
    with pytest.raises(BackendCompilerFailed) as e:
        torch.compile(m, backend="dsr")(*inputs(8))
    err = e.value.inner_exception
    assert isinstance(err, DsrError)
    assert "MoE experts DeepseekV3Experts is compiled by Dynamo as a frame of its own" in str(err)
    assert '"grouped_mm"' in str(err) and "dsr.compile" in str(err)
    torch._dynamo.reset()


def test_cut_refuses_a_module_split_by_a_graph_break():
    """Not every inlined call can be cut back: a graph holding only part of a recognised module's arguments
    is left as it is, with the reason (the unit behind the torch.compile path)."""
    from dsr_compiler import dynamo_recognize as dr
    from dsr_compiler.frontend.registry import RECOGNIZERS
    m, inputs, _ = build("deepseek_moe", "grouped_mm")
    experts = m.experts
    spec = RECOGNIZERS["moe_experts"].match(experts)
    key = str(id(experts))
    stack = {key: ("L['self'].experts", type(experts))}
    g = torch.fx.Graph()
    ids = g.placeholder("ids")
    ids.meta["example_value"] = torch.zeros(4, 2, dtype=torch.long)
    w = g.call_function(torch.ones_like, (ids,))
    w.meta.update(nn_module_stack=stack, example_value=torch.ones(4, 2))
    g.output(w)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    why = dr._cut(gm, [torch.zeros(4, 2, dtype=torch.long)], key, experts,
                  RECOGNIZERS["moe_experts"].io(experts, spec), "_x")
    assert why is not None and "holds 1 of its 3 tensor arguments" in why
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_function", "output"]   # left as it was


def test_causal_lm_under_torch_compile(monkeypatch):
    """DeepseekV3ForCausalLM (one MoE layer, default sdpa attention and grouped_mm experts) under torch.compile:
    Dynamo inlines transformers' mask code (packed-sequence `cumsum`, position ids indexed by broadcast
    aranges, a boolean SDPA mask) and the MoE modules; the logits match eager at 8, 16 (the dynamic
    recompile) and 1 token (Dynamo's own graph, where the masked softmax has one key)."""
    built = _recording_compiles(monkeypatch)
    m, inputs, _ = build("deepseek_causal_lm", "grouped_mm", num_hidden_layers=1, first_k_dense_replace=0)
    torch._dynamo.reset()
    cm = torch.compile(m, backend="dsr")
    for t in (8, 16, 1):
        x = inputs(t, seed=t)
        with torch.no_grad():
            assert rel_err(cm(*x), m(*x)) <= 1e-5, t
    for c in built:
        fams = [k.spec.family for k in c.kernels]
        assert [f for f in fams if f.startswith("moe")] == MOE_FAMILIES, fams
        assert {"cumsum", "index"} <= set(fams), fams
    torch._dynamo.reset()


def test_a_misread_boundary_is_caught_by_running_the_cut(monkeypatch):
    """Each cut is checked by calling the module on the values its arguments have in the graph run on the
    example inputs: a boundary read wrong (here: the router's results given each other's roles) is not cut,
    and the note says why; the experts, read right, are still cut."""
    from dsr_compiler import dynamo_recognize as dr
    real = dr._assign

    def swapped(values, roles):
        out = real(values, roles)
        if isinstance(out, list) and len(roles) == 3 and roles[2][0] is False and len(out) > 1:
            return out[::-1]                         # the router's results: roles exchanged
        return out
    monkeypatch.setattr(dr, "_assign", swapped)
    seen: list = []

    def backend(gm, example_inputs):
        seen.append(dr.recognize_in_graph(gm, example_inputs))
        seen.append([n.target for n in gm.graph.nodes if n.op == "call_module"])
        return gm.forward
    m, inputs, _ = build("deepseek_moe", "grouped_mm")
    torch._dynamo.reset()
    x = inputs(8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend=backend)(*x), m(*x))
    notes, calls = seen
    assert any("MoE router" in n and "the boundary was misread" in n for n in notes), notes
    assert calls == ["_dsr_recognized0"]               # only the experts were cut
    torch._dynamo.reset()
