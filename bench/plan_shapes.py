"""Plan shapes without a GPU: kernels per module and programs launched per kernel at V3 width.

    python bench/plan_shapes.py [--batches 1,64]

For each module (tiny config, and the full-width DeepSeek-V3 decoder layer on meta weights): the
kernel count of the fused plan and its modeled DRAM bytes; then, for the V3 decoder decode step
(FP8, bf16) at each batch size, every GEMM-like kernel's launched programs (its grid evaluated at
B) against the H200's 132 SMs. Figures come from the compiler's own lowered specs (trace, passes,
lowering; no Triton compile), so the script runs in seconds on a CPU.
"""
from __future__ import annotations

import argparse

from dsr_compiler.codegen.lower import lower_kernel
from dsr_compiler.codegen.spec import eval_expr
from dsr_compiler.frontend import trace
from dsr_compiler.grads import check_grad_wrt
from dsr_compiler.ir.passes import PIPELINE, PassContext, run_passes
from dsr_compiler.models.config import ModelConfig
from dsr_compiler.options import CompileOptions
from dsr_compiler.workloads import build

SMS = 132
MODULES = (("decoder", "decode", True), ("decoder", "prefill", False), ("model", "decode", True),
           ("mla", "decode", True), ("moe", None, True), ("grpo", None, False))
GEMMS = ("gemm", "gemm_fp8", "moe_gemm_fp8", "moe_gemm", "mla_decode", "mla_attention", "vocab_logprobs")


def plan(model: str, module: str, phase: str | None, fp8: bool, dtype: str, seq: int = 16):
    cfg = ModelConfig.named(model)
    wl = build(cfg, module, 1, seq, dtype, 0, **({"phase": phase} if phase else {}))
    g = trace(wl.module, wl.example_inputs, dynamic=wl.dynamic)
    ctx = PassContext(options=CompileOptions.make(fp8=fp8).pass_options())
    wrt = check_grad_wrt(wl.module, g, wl.grad_wrt or None)
    if wrt:
        ctx.options["grad_wrt"] = wrt
    final = run_passes(g, list(PIPELINE), ctx)[-1].graph
    return [lower_kernel(k, i) for i, k in enumerate(final.kernels, start=1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,64", help="batch sizes of the V3 decode step (default 1,64)")
    batches = [int(b) for b in ap.parse_args().batches.split(",")]
    print("kernels per module (deepseek-v3-tiny, seq 16; prefill 64):")
    for module, phase, fp8 in MODULES:
        specs = plan("deepseek-v3-tiny", module, phase, fp8, "f32", 64 if phase == "prefill" else 16)
        print(f"  {module:8s} {phase or '-':8s} fp8={str(fp8):5s} {len(specs):3d} kernels")
    specs = plan("deepseek-v3", "decoder", "decode", True, "bf16")
    print(f"V3 decoder decode (FP8, bf16): {len(specs)} kernels; programs per GEMM-like kernel vs {SMS} SMs:")
    for s in specs:
        if s.family not in GEMMS:
            continue
        progs = [eval_expr(s.grid[0], {"B": b}) for b in batches]
        for d in s.grid[1:]:
            progs = [p * eval_expr(d, {"B": b}) for p, b in zip(progs, batches)]
        shown = ", ".join(f"B={b}: {p:,}{'' if p >= SMS else ' (< SMs)'}" for b, p in zip(batches, progs))
        print(f"  {s.name:36s} {s.family:14s} {shown}")


if __name__ == "__main__":
    main()
