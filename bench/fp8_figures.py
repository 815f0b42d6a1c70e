"""FP8 recipe figures, all measured or modeled in one run on this machine (no GPU needed):

1. errors: the FP8 MLP block (deepseek-v3-tiny widths, interpreter) vs eager without quantization
   and vs eager running the same recipe (models/fp8_ref.py); the compiled gemm_fp8 kernel (run alone
   on the interpreter) vs an fp32 GEMM of the dequantized operands (DeepGEMM's calc_diff), each next
   to its bound from dsr_compiler/tolerance.py; every error figure is of compiled kernels' output;
2. modeled DRAM bytes of the compiled plan with --fp8 vs --no-fp8 (bf16 activations and weights)
   for the full-width DeepSeek-V3 decoder layer (last layer: MLA + MoE), decode and prefill;
3. ptxas registers / spills / shared memory of every direct-PTX kernel next to its Triton twin.

    python bench/fp8_figures.py [--quick]
"""
from __future__ import annotations

import argparse
import time

import torch
from dsr_compiler.ir import Graph
from dsr_compiler.ir.ops.fp8 import (
    calc_diff,
    dequant_fp8_ref,
    dequant_weight_ref,
    quant_fp8_ref,
)
from dsr_compiler.runtime.launch import build_plan
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.models import ModelConfig
from dsr_compiler.models.fp8_ref import fp8_reference
from dsr_compiler.tolerance import FP8_TOLERANCES, compare_fp8
from dsr_compiler.workloads import build


class _Projection(nn.Module):
    """One linear layer: compiled with fp8=True it is a quant_fp8 kernel and a gemm_fp8 kernel."""

    def __init__(self, k: int, n: int, g: torch.Generator) -> None:
        super().__init__()
        self.proj = nn.Linear(k, n, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def compiled_gemm_fp8(m: int, k: int, n: int, g: torch.Generator) -> tuple[float, float]:
    """The compiled gemm_fp8 kernel (interpreter), run alone on activation codes and the weight codes
    its plan derived: (calc_diff vs an fp32 GEMM of the same dequantized operands, vs unquantized)."""
    mod = _Projection(k, n, g)
    x = torch.randn(m, k, generator=g)
    cm = dsr.compile(mod, (x,), fp8=True, backend="interpret", name="proj")
    call = next(nd for nd in cm.graph.nodes if nd.op == "call" and "gemm_fp8" in nd.attr("kernel"))
    kernel = next(kk for kk in cm.graph.kernels if kk.name == call.attr("kernel"))
    vals = cm.graph.values()
    sub = Graph("gemm_fp8_only", tuple(vals[i] for i in call.inputs), (call,), tuple(o.name for o in call.outputs),
                (), (kernel,))
    xq, xs = quant_fp8_ref(x)
    params = dict(zip(cm.graph.params, cm.params))
    wq, ws = (params[i] for i in call.inputs[2:4])
    (y,) = build_plan(sub, [a for a in cm.kernels if a.spec.name == kernel.name], "interpret").run([xq, xs, wq, ws])
    deq = dequant_fp8_ref(xq, xs) @ dequant_weight_ref(wq, ws).T
    return calc_diff(y.float(), deq), calc_diff(y.float(), x @ mod.proj.weight.detach().T)


def errors() -> None:
    print("== errors (deepseek-v3-tiny MLP block, 64 tokens, interpreter backend) ==")
    for dt in ("f32", "bf16"):
        wl = build(ModelConfig.named("deepseek-v3-tiny"), "mlp", 1, 16, dt)
        cm = dsr.compile(wl.module, wl.example_inputs, fp8=True, backend="interpret", dynamic=wl.dynamic, name="mlp")
        x = wl.make_inputs(64, 7)[0]
        with torch.no_grad():
            y, eager = cm(x), wl.module(x)
            sim = fp8_reference(wl.module)(x)       # the eager module running the recipe (models/fp8_ref.py)
        for what, ref, kind in (("eager, no quantization", eager, "fp8"), ("eager, same quantization", sim, "fp8_sim")):
            r = compare_fp8(y, ref, kind)
            t = FP8_TOLERANCES[kind]
            print(f"  {dt:4s} vs {what:26s} calc_diff {r['calc_diff']:.2e} (bound {t['calc_diff']:.0e})  "
                  f"max|err|/max|ref| {r['max_abs'] / max(float(ref.abs().max()), 1e-30):.2e} "
                  f"(bound {t['atol_frac']:.3g})")
    g = torch.Generator().manual_seed(0)
    for m, k, n in ((64, 7168, 2048), (16, 2048, 7168)):
        t = time.perf_counter()
        deq, unq = compiled_gemm_fp8(m, k, n, g)
        print(f"  compiled gemm_fp8 kernel {m}x{k}x{n} (interpreter): calc_diff vs fp32 GEMM of the dequantized "
              f"operands {deq:.2e} (bound 1e-3), vs unquantized {unq:.2e} [{time.perf_counter() - t:.0f} s]")


def dram(quick: bool) -> None:
    print("== modeled DRAM bytes, full-width deepseek-v3 decoder layer (MLA + MoE), bf16 ==")
    cfg = ModelConfig.named("deepseek-v3")
    phases = (("decode", 1, 1),) if quick else (("decode", 1, 1), ("decode", 64, 1), ("prefill", 1, 4096))
    for phase, batch, seq in phases:
        row = []
        for fp8 in (False, True):
            wl = build(cfg, "decoder", batch, seq, "bf16", 0, phase=phase)
            t = time.perf_counter()
            cm = dsr.compile(wl.module, wl.example_inputs, fp8=fp8, dynamic=wl.dynamic, name="decoder")
            rep = cm.report()
            by_fam: dict[str, int] = {}
            for k in rep["kernels"]:
                by_fam[k["family"]] = by_fam.get(k["family"], 0) + k["bytes_read"] + k["bytes_written"]
            row.append((rep["totals"]["bytes"], rep["totals"]["roofline_us_h200"], len(rep["kernels"]), by_fam,
                        time.perf_counter() - t))
        (b0, r0, k0, f0, _), (b1, r1, k1, f1, _) = row
        print(f"  {phase:7s} B={batch:<3d} S={seq:<5d} bf16 plan {b0 / 2**20:9.1f} MiB ({k0} kernels, roofline "
              f"{r0:8.1f} us) | fp8 plan {b1 / 2**20:9.1f} MiB ({k1} kernels, {r1:8.1f} us) | fp8/bf16 = {b1 / b0:.3f}")
        moe0 = sum(v for f, v in f0.items() if f.startswith("moe"))
        moe1 = sum(v for f, v in f1.items() if f.startswith("moe"))
        print(f"          everything but the MoE kernels (MLA, norms, shared expert, residuals): "
              f"{(b0 - moe0) / 2**20:.1f} -> {(b1 - moe1) / 2**20:.1f} MiB ({(b1 - moe1) / (b0 - moe0):.3f}); "
              f"MoE kernels: {moe0 / 2**20:.1f} -> {moe1 / 2**20:.1f} MiB (FP8 grouped GEMMs)")


def ptxas() -> None:
    print("== ptxas (sm_90a): direct-PTX kernels vs their Triton twins ==")
    for model, mod, dt, fp8 in (("deepseek-v3", "mlp", "bf16", True), ("deepseek-v3", "mlp", "f32", False),
                                ("deepseek-v3-tiny", "decoder", "bf16", True),
                                ("deepseek-v3-tiny", "decoder", "f32", False)):
        wl = build(ModelConfig.named(model), mod, 1, 16, dt, 0, **({"phase": "prefill"} if mod == "decoder" else {}))
        cm = dsr.compile(wl.module, wl.example_inputs, fp8=fp8, dynamic=wl.dynamic, name=mod, ptx_families=True)
        for k in cm.report()["kernels"]:
            if k.get("ptx_fallback"):
                print(f"  {model} {mod} {dt} fp8={fp8!s:5s} {k['name']:28s} stays on Triton: "
                      f"{k['ptx_fallback'].split(': ', 1)[-1][:60]}")
            if k["backend"] == "ptx":
                tw = k["triton_twin"]
                print(f"  {model} {mod} {dt} fp8={fp8!s:5s} {k['name']:28s} PTX regs {k['registers']:3d} spills {k['spills']} "
                      f"smem {k['shared_mem']:4d} | Triton regs {tw['registers']:3d} spills {tw['spills']} "
                      f"smem {tw['shared_mem']}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="decode only for the DRAM figure")
    ap.add_argument("--only", choices=("errors", "dram", "ptxas"), default=None)
    a = ap.parse_args()
    if a.only in (None, "errors"):
        errors()
    if a.only in (None, "dram"):
        dram(a.quick)
    if a.only in (None, "ptxas"):
        ptxas()
