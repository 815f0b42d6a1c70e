"""MLA compiled vs eager on the interpreter backend: prefill (naive flash form) and decode (naive and
absorbed split-KV forms) over drawn MLA configs (q LoRA or not, head dims, YaRN on/off), prefill
lengths 1 and non-powers of two, decode positions; and the zoo's `--module mla|decoder|model`.

Numerics run the whole pipeline (trace, passes, lowering, rendering, Triton interpreter) without
the sm_90a compile, which tests/codegen/test_mla_compile.py covers; `dsrc run` does both.
"""
from __future__ import annotations

import pytest
import torch
from dsr_compiler.codegen import lower_kernel, render
from dsr_compiler.ir.passes import PIPELINE, PassContext, run_passes
from dsr_compiler.runtime.launch import build_plan
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples  # noqa: E402  per-test budget from the active profile

import dsr_compiler as dsr
from dsr_compiler.codegen.build import KernelArtifact
from dsr_compiler.frontend import param_tensors
from dsr_compiler.models import MLA, ModelConfig, RopeScaling
from dsr_compiler.models.steps import DecodeStep
from dsr_compiler.workloads import init_weights
from tests.tolerances import assert_close

TINY = ModelConfig.named("deepseek-v3-tiny")
YARN = RopeScaling(factor=40.0, original_max_position_embeddings=4096)


def compile_interpreted(module, inputs, dynamic, mla: str = "absorb"):
    """dsr.compile's pipeline for the interpret backend, minus the PTX/cubin step: (run, fused graph)."""
    g = dsr.trace(module, inputs, dynamic=dynamic)
    final = run_passes(g, list(PIPELINE), PassContext(options={"fp8": False, "mla": mla}))[-1].graph
    arts = []
    for i, k in enumerate(final.kernels, start=1):
        spec = lower_kernel(k, i)
        arts.append(KernelArtifact(spec, render(spec), None, 0.0, False))
    plan = build_plan(final, arts, "interpret")
    params = param_tensors(module, g)

    def run(*xs):
        outs = plan.run(list(xs) + params)
        return outs[0] if len(outs) == 1 else tuple(outs)
    return run, final


@st.composite
def mla_configs(draw) -> ModelConfig:
    return TINY.replace(
        hidden_size=64, num_attention_heads=draw(st.integers(1, 3)),
        q_lora_rank=draw(st.sampled_from([0, 32])), kv_lora_rank=draw(st.sampled_from([32, 48])),
        qk_nope_head_dim=draw(st.sampled_from([16, 24])), qk_rope_head_dim=draw(st.sampled_from([8, 16])),
        v_head_dim=draw(st.sampled_from([16, 24])), rope_scaling=draw(st.sampled_from([None, YARN])))


def _mla(cfg: ModelConfig, seed: int, dtype=torch.float32) -> MLA:
    m = MLA(cfg)
    init_weights(m, seed)
    return m.to(dtype).eval()


def _x(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@settings(max_examples=examples(5), deadline=None)
@given(cfg=mla_configs(), lengths=st.lists(st.integers(2, 9), min_size=1, max_size=1), seed=st.integers(0, 999))
def test_prefill_matches_eager(cfg, lengths, seed):
    m = _mla(cfg, seed)
    run, g = compile_interpreted(m, (_x(2, 4, 64, seed=seed),), {"x": {1: "S"}})
    fams = [k.family for k in g.kernels]
    assert fams.count("mla_attention") == 1 and "mla_decode" not in fams
    att = next(n for k in g.kernels for n in k.body.nodes if n.op == "mla_attention")
    assert len(att.inputs) == 5, "prefill positions fold into the causal mask (no position inputs)"
    for s in [1] + lengths:          # one compile serves every length, 1 and non-powers of two included
        x = _x(2, s, 64, seed=seed + s)
        with torch.no_grad():
            assert_close(run(x), m(x))


def _decode_args(cfg: ModelConfig, b: int, s_new: int, t: int, start: int, seed: int, dtype=torch.float32):
    return (_x(b, s_new, cfg.hidden_size, seed=seed, dtype=dtype), _x(b, t, cfg.kv_lora_rank, seed=seed + 1, dtype=dtype),
            _x(b, t, cfg.qk_rope_head_dim, seed=seed + 2, dtype=dtype), torch.tensor(start))


@settings(max_examples=examples(5), deadline=None)
@given(cfg=mla_configs(), t=st.integers(5, 40), s_new=st.sampled_from([1, 2]), data=st.data(), seed=st.integers(0, 999))
def test_decode_naive_and_absorbed_match_eager(cfg, t, s_new, data, seed):
    step = DecodeStep(_mla(cfg, seed)).eval()
    dyn = {"x": {0: "B"}, "kv_cache": {0: "B"}, "pe_cache": {0: "B"}}
    example = _decode_args(cfg, 2, s_new, t, 0, seed)
    naive, gn = compile_interpreted(step, example, dyn, mla="naive")
    absorbed, ga = compile_interpreted(step, example, dyn, mla="absorb")
    assert "mla_attention" in [k.family for k in gn.kernels]
    assert {"mla_decode", "mla_combine"} <= {k.family for k in ga.kernels}
    assert "mla_attention" not in [k.family for k in ga.kernels]
    for start in data.draw(st.lists(st.integers(0, t - s_new), min_size=2, max_size=2, unique=True)):
        args = _decode_args(cfg, data.draw(st.integers(1, 2)), s_new, t, start, seed + start)
        with torch.no_grad():
            ref = step(*args)
        got_n, got_a = naive(*args), absorbed(*args)
        for a, n, r in zip(got_a, got_n, ref):
            assert_close(n, r)
            assert_close(a, r)
            assert_close(a, n)


def test_decode_bf16_absorbed():
    cfg = TINY.replace(hidden_size=64, num_attention_heads=2)
    step = DecodeStep(_mla(cfg, 3, torch.bfloat16)).eval()
    args = _decode_args(cfg, 2, 1, 24, 17, 5, torch.bfloat16)
    run, _ = compile_interpreted(step, args, {"x": {0: "B"}, "kv_cache": {0: "B"}, "pe_cache": {0: "B"}})
    with torch.no_grad():
        ref = step(*args)
    for a, r in zip(run(*args), ref):
        assert_close(a, r)


def test_absorbed_decode_never_expands_the_cache():
    """The absorbed graph has no wkv_b linear over the cache: the latent is scored directly."""
    step = DecodeStep(_mla(TINY, 0)).eval()
    args = _decode_args(TINY, 1, 1, 16, 3, 0)
    _, g = compile_interpreted(step, args, {"x": {0: "B"}, "kv_cache": {0: "B"}, "pe_cache": {0: "B"}})
    linears = [n for k in g.kernels for n in k.body.nodes if n.op == "linear"]
    assert all("wkv_b" not in n.inputs[1] for n in linears)
    dec = next(k for k in g.kernels if k.family == "mla_decode")
    assert [v.type.shape[-1] for v in dec.body.inputs[2:4]] == [TINY.kv_lora_rank, TINY.qk_rope_head_dim]


@pytest.mark.parametrize("module", ["decoder", "model"])
def test_decoder_and_model_workloads_decode_and_prefill(module):
    """--module decoder|model: the MLA + MoE layer and the whole model, decode (absorbed) and prefill."""
    from dsr_compiler.workloads import build
    cfg = TINY.replace(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, vocab_size=96,
                       n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, num_attention_heads=2,
                       q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
    for phase in ("decode", "prefill"):
        wl = build(cfg, module, batch=2, seq=6, seed=1, phase=phase)
        run, g = compile_interpreted(wl.module, wl.example_inputs, wl.dynamic)
        fams = {k.family for k in g.kernels}
        assert ({"mla_decode", "mla_combine", "index_copy"} if phase == "decode" else {"mla_attention"}) <= fams
        assert "moe_router" in fams
        args = wl.make_inputs(0, 7)
        with torch.no_grad():
            ref = wl.module(*args)
        got = run(*args)
        for a, r in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
            assert_close(a, r)


@pytest.mark.parametrize("form", ["naive", "absorb"])
def test_cli_run_mla_check(form, capsys):
    """`dsrc run --module mla --backend interpret --check` (decode step, FP8 recipe on) exits 0 for both forms."""
    from dsr_compiler.cli import main
    assert main(["run", "--module", "mla", "--backend", "interpret", "--check", "--mla", form]) == 0
    out = capsys.readouterr().out
    assert "check passed" in out and all(f"check output {i} " in out for i in range(3))   # out, both caches
