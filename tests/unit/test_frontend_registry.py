"""Frontend registry: every lowering module is listed once, and registering a target, op or key a
second time is an error at import (so the order of `lowerings.MODULES` carries no meaning)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dsr_compiler.frontend import lowerings, registry


def test_every_lowering_module_is_listed_once():
    files = {p.stem for p in Path(lowerings.__file__).parent.glob("*.py") if p.stem != "__init__"}
    names = [m.__name__.rsplit(".", 1)[-1] for m in lowerings.MODULES]
    assert sorted(names) == sorted(files) and len(names) == len(set(names))


@pytest.mark.parametrize("register", [
    lambda: registry.lowers(torch.add)(lambda cx, input, other: None),
    lambda: registry.lowers("view")(lambda cx, input, *shape: None),
    lambda: registry.lowers_module(nn.Linear)(lambda cx, m, input: None),
    lambda: registry.lowers_leaf("moe")(lambda cx, m, args, kwargs: None),
    lambda: registry.lowers_function("rope")(lambda cx, fn, args, kwargs: None),
    lambda: registry.derive_param("experts.w13", registry.DERIVED_PARAMS["experts.w13"]),
], ids=["function", "method", "module", "leaf", "wrapped", "derived"])
def test_registering_twice_is_an_error(register):
    tables = (registry.FUNCTION_HANDLERS, registry.METHOD_HANDLERS, registry.MODULE_HANDLERS,
              registry.LEAF_LOWERINGS, registry.FUNCTION_LOWERINGS, registry.WRAPPED_FUNCTIONS,
              registry.DERIVED_PARAMS)
    before = [dict(t) for t in tables]
    with pytest.raises(ValueError, match="registered twice"):
        register()
    assert [dict(t) for t in tables] == before          # nothing replaced


def test_wrapping_a_function_name_twice_is_an_error():
    key = ("tests.unit.nowhere", "helper")
    registry.wrap_function(*key, "rope")
    try:
        with pytest.raises(ValueError, match="registered twice"):
            registry.wrap_function(*key, "rope")
        assert registry.WRAPPED_FUNCTIONS[key] == "rope"
    finally:
        del registry.WRAPPED_FUNCTIONS[key]


def test_zoo_functions_carry_their_op():
    """The zoo's wrapped functions name their IR op (`fn.dsr_op`); none is matched by a string path."""
    from dsr_compiler.models import deepseek, grpo, layers
    zoo = {layers.apply_rope: "rope", layers.rope_cos_sin: "rope_table", deepseek.mla_attention: "mla_attention",
           deepseek.mla_attention_absorbed: "mla_attention_absorbed", grpo.per_token_logps: "token_logprobs"}
    for fn, op in zoo.items():
        assert fn.dsr_op == op and registry.function_op(fn) == op and op in registry.FUNCTION_LOWERINGS
    assert not [k for k in registry.WRAPPED_FUNCTIONS if k[0].startswith("dsr_compiler.")]


def test_a_zoo_function_imported_by_name_stays_one_node():
    """User code that imports `apply_rope` by name (without repeating torch.fx.wrap) still gets one
    `rope` op: the tracer finds functions carrying `dsr_op` in the traced forwards' globals."""
    from dsr_compiler.frontend import trace
    from dsr_compiler.frontend.tracer import dsr_op_functions
    from dsr_compiler.models import layers

    class UsesRope(nn.Module):
        def forward(self, x, cos, sin):
            return apply_rope(x, cos, sin) * 2.0

    x, cos, sin = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    assert layers.apply_rope in dsr_op_functions(UsesRope())
    g = trace(UsesRope(), (x, cos, sin))
    assert [n.op for n in g.nodes] == ["rope", "const", "mul"]      # traced through: slices, cat, ...


from dsr_compiler.models.layers import apply_rope  # noqa: E402  (by name, as user code would)


@pytest.mark.parametrize("fp8", [False, True])
def test_derived_expert_weights_are_computed_once_per_compile(monkeypatch, fp8):
    """The stacked expert weights are a param (bf16/f32 path) or the source of the FP8 codes
    (FP8 path): either way each is computed once, by the one rule table of ir/params.py, and listed
    in report.json with the passes' derived params; binding symbolic sizes reads only their type."""
    import dsr_compiler as dsr
    from dsr_compiler.ir import params as ir_params
    from dsr_compiler.models import ModelConfig
    from dsr_compiler.workloads import build

    calls: list[int] = []
    stack = ir_params.PARAM_RULES["stack_experts"]

    def counted(*per_source):
        calls.append(len(per_source))
        return stack(*per_source)
    monkeypatch.setitem(ir_params.PARAM_RULES, "stack_experts", counted)
    wl = build(ModelConfig.named("deepseek-v3-tiny"), "moe", 1, 4, "f32", 0)
    cm = dsr.compile(wl.module, wl.example_inputs, fp8=fp8, backend="interpret", name="moe")
    assert sorted(calls) == [1, 2]                     # w2 (one source list), w13 (w1 and w3 lists)
    rules = [d["rule"] for d in cm.report()["derived_params"]]
    assert rules.count("stack_experts") == 2 and (("fp8_block_quant" in rules) == fp8)
    w13 = next(d for d in cm.report()["derived_params"] if d["outputs"] == ["experts.w13"])
    assert w13["sources"] == ["experts.{e}.w1.weight", "experts.{e}.w3.weight"]
    assert w13["attrs"]["count"] == len(wl.module.experts) and w13["source"] == "compile-time"
    out = cm(*wl.example_inputs)
    assert out is not None


def test_stacked_experts_match_the_eager_weights():
    from dsr_compiler.frontend import derived_declarations, param_tensors, trace
    from dsr_compiler.models import ModelConfig
    from dsr_compiler.workloads import build

    wl = build(ModelConfig.named("deepseek-v3-tiny"), "moe", 1, 4, "f32", 0)
    g = trace(wl.module, wl.example_inputs)
    decls = {d.outputs[0]: d for d in derived_declarations(wl.module, g)}
    assert set(decls) == {"experts.w13", "experts.w2"}
    got = dict(zip(g.params, param_tensors(wl.module, g)))
    ex = wl.module.experts
    for e in (0, len(ex) - 1):
        assert torch.equal(got["experts.w13"][e], torch.cat([ex[e].w1.weight, ex[e].w3.weight]))
        assert torch.equal(got["experts.w2"][e], ex[e].w2.weight)
    meta = dict(zip(g.params, param_tensors(wl.module, g, meta=True)))
    assert meta["experts.w13"].device.type == "meta" and meta["experts.w13"].shape == got["experts.w13"].shape
