"""The FP8 recipe on a whole decoder layer (MLA + MoE, deepseek-v3-tiny, prefill, interpreter):
every quantized GEMM stage of the layer, vs the eager layer running the FP8 recipe in plain torch
(models/fp8_ref.py, "fp8_sim" with the layer's stage count), and vs unquantized eager on the
attention half (the MoE router then reads FP8-perturbed values, so end to end that distance is
reported, not bounded; dsr_compiler/tolerance.py)."""
from __future__ import annotations

import torch
from dsr_compiler.ir.passes.quantize_fp8 import fp8_stages

import dsr_compiler as dsr
from dsr_compiler.models import ModelConfig
from dsr_compiler.models.fp8_ref import fp8_reference, pinned_routing
from dsr_compiler.tolerance import compare_fp8
from dsr_compiler.workloads import build


def test_fp8_decoder_layer_prefill():
    wl = build(ModelConfig.named("deepseek-v3-tiny"), "decoder", 1, 8, "bf16", 0, phase="prefill")
    cm = dsr.compile(wl.module, wl.example_inputs, fp8=True, backend="interpret", dynamic=wl.dynamic, name="decoder")
    stages, routed = fp8_stages(cm.graph)
    assert (stages, routed) == (6, True)       # wq_a -> wq_b -> attention -> wo -> experts gate_up -> down
    fams = [k.spec.family for k in cm.kernels]
    assert fams.count("gemm_fp8") >= 5 and fams.count("moe_gemm_fp8") == 2 and "gemm" not in fams
    assert sum(f == "quant_fp8" for f in fams) >= 4 and not any("dequant" in k.spec.name for k in cm.kernels)
    x = wl.example_inputs
    with torch.no_grad():
        y = cm(*x)
        ref = fp8_reference(wl.module)             # eager zoo modules, FP8 linears in plain torch
        pinned, unhook = pinned_routing(wl.module, ref)
        sim, pin = ref(*x), pinned(*x)             # unquantized, routers pinned to the FP8 path's experts
        unhook()
        eager = wl.module(*x)
    tight = compare_fp8(y, sim, "fp8_sim", stages)
    assert tight["ok"], tight
    assert compare_fp8(y, pin, "fp8", stages)["ok"]
    loose = compare_fp8(y, eager, "fp8", stages)
    assert loose["calc_diff"] < 0.05, loose    # reported bound-free (routing); a wrong kernel gives ~1


def test_fp8_stage_count_of_the_attention_half_bounds_its_error():
    wl = build(ModelConfig.named("deepseek-v3-tiny"), "mla", 1, 8, "bf16", 0, phase="prefill")
    cm = dsr.compile(wl.module, wl.example_inputs, fp8=True, backend="interpret", dynamic=wl.dynamic, name="mla")
    stages, routed = fp8_stages(cm.graph)
    assert (stages, routed) == (4, False)
    x = wl.example_inputs
    with torch.no_grad():
        out = compare_fp8(cm(*x), wl.module(*x), "fp8", stages)
    assert out["ok"], out
