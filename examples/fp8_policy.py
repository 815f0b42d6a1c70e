"""Example: the FP8 policy: compile one module with the default DeepSeek FP8 recipe and with changed policies.

    python examples/fp8_policy.py

The module is one decode step of the first decoder layer of deepseek-v3-tiny (MLA attention with
its latent KV cache, then the dense SwiGLU MLP; f32 as `dsrc run --check` by default, 2
sequences, one new token each at position 5 of a 16-position cache), compiled three times:

  default           fp8=True: every eligible linear (attention projections, MLP) as quant_fp8 + gemm_fp8
  attn unquantized  fp8={"attn": False}: the attention projections (wq_a, wq_b, wkv_a, wo) stay in
                    high precision, the MLP stays FP8 (a policy is a dict of Fp8Policy fields; the
                    CLI takes the same as --fp8-policy '{"attn": false}')
  fp8 off           fp8=False: every GEMM in f32

Prints, per variant, the kernel families, the number of FP8 GEMM kernels, the modeled DRAM bytes
of the plan (report.json totals) and the error against its eager reference. Checks (exit 1
otherwise): each FP8 variant's outputs (hidden state and both updated caches) against eager
PyTorch running the same recipe and policy (models/fp8_ref.py, tolerance "fp8_sim") and against
unquantized eager (tolerance "fp8"); fp8 off against eager with dsr_compiler.tolerance.compare's
f32 tolerance; and the policy's effect (fewer FP8 GEMM kernels with attention unquantized, none
with fp8 off).
"""
from __future__ import annotations

import sys
from collections import Counter

import torch

import dsr_compiler as dsr
from dsr_compiler.errors import CheckFailed, DsrError
from dsr_compiler.ir.passes.quantize_fp8 import FP8_GEMMS, Fp8Policy, fp8_stages
from dsr_compiler.models import DecoderLayer, ModelConfig
from dsr_compiler.models.fp8_ref import fp8_reference
from dsr_compiler.models.steps import DecodeStep
from dsr_compiler.tolerance import compare, compare_fp8
from dsr_compiler.workloads import init_weights

DTYPE = torch.float32         # the activation dtype; FP8 GEMMs round their output to bf16, then cast back
VARIANTS = (("default", True), ("attn unquantized", {"attn": False}), ("fp8 off", False))


def fp8_gemm_kernels(cm) -> int:
    """Kernels whose body holds an FP8 GEMM (dense gemm_fp8 or an FP8 grouped expert GEMM)."""
    return sum(any(n.op in FP8_GEMMS for n in k.body.nodes) for k in cm.graph.kernels)


def check(fp8, cm, step, args, outs, eager) -> tuple[bool, str]:
    """Compare every output with the variant's eager reference(s); (ok, one line)."""
    if fp8 is False:
        rs = [compare(o, e) for o, e in zip(outs, eager)]
        return all(r["ok"] for r in rs), (f"vs eager: max abs err {rs[0]['max_abs']:.1e} (f32 tolerance atol "
                                          f"{rs[0]['atol']:.1e}; caches {max(r['max_abs'] for r in rs[1:]):.1e})")
    stages = fp8_stages(cm.graph)[0]
    with torch.no_grad():
        sim = fp8_reference(step, Fp8Policy.from_option(fp8))(*args)
    rs = [compare_fp8(o, e, "fp8_sim", stages) for o, e in zip(outs, sim)]
    ru = [compare_fp8(o, e, "fp8", stages) for o, e in zip(outs, eager)]
    line = (f"vs eager running the same recipe: calc_diff {max(r['calc_diff'] for r in rs):.1e} "
            f"(<= {rs[0]['calc_diff_max']:.0e}); vs unquantized eager: calc_diff "
            f"{max(r['calc_diff'] for r in ru):.1e} (<= {ru[0]['calc_diff_max']:.0e}); {stages} quantized stages")
    return all(r["ok"] for r in rs + ru), line


def main(batch: int = 2, cache: int = 16, start_pos: int = 5) -> dict:
    cfg = ModelConfig.named("deepseek-v3-tiny")
    layer = DecoderLayer(cfg, 0)                 # layer 0: MLA + the dense MLP (first_k_dense_replace = 1)
    init_weights(layer, 0)
    step = DecodeStep(layer.to(DTYPE).eval()).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, cfg.hidden_size, generator=g).to(DTYPE)
    kv = torch.randn(batch, cache, cfg.kv_lora_rank, generator=g).to(DTYPE)
    pe = torch.randn(batch, cache, cfg.qk_rope_head_dim, generator=g).to(DTYPE)
    args = (x, kv, pe, torch.tensor(start_pos, dtype=torch.int64))
    with torch.no_grad():
        eager = step(*args)

    rows, failures = {}, []
    for label, fp8 in VARIANTS:
        cm = dsr.compile(step, args, fp8=fp8, backend="interpret", name="decode_step")
        rep = cm.report()
        with torch.no_grad():
            outs = cm(*args)
        ok, line = check(fp8, cm, step, args, outs, eager)
        families = Counter(k["family"] for k in rep["kernels"])
        rows[label] = {"kernels": len(cm.kernels), "fp8_gemms": fp8_gemm_kernels(cm),
                       "bytes": rep["totals"]["bytes"], "families": dict(families), "ok": ok}
        print(f"{label}: {len(cm.kernels)} kernels ({', '.join(f'{f} x{n}' for f, n in sorted(families.items()))}); "
              f"{rows[label]['fp8_gemms']} FP8 GEMM kernels; modeled DRAM {rep['totals']['bytes']:,} bytes")
        print(f"  {line}{'' if ok else '  FAILED'}")
        if not ok:
            failures.append(f"{label}: compiled output differs from its eager reference beyond tolerance")
    d, a, off = rows["default"], rows["attn unquantized"], rows["fp8 off"]
    if not (0 < a["fp8_gemms"] < d["fp8_gemms"] and off["fp8_gemms"] == 0):
        failures.append(f"the policy did not change the plan as asked: FP8 GEMM kernels {d['fp8_gemms']} (default), "
                        f"{a['fp8_gemms']} (attn unquantized), {off['fp8_gemms']} (fp8 off)")
    print(f"modeled DRAM bytes vs fp8 off: default {d['bytes'] / off['bytes']:.2f}x, "
          f"attn unquantized {a['bytes'] / off['bytes']:.2f}x")
    if failures:
        raise CheckFailed("fp8_policy: " + "; ".join(failures))
    print("check passed: every variant matches its eager reference; the policy changed the plan")
    return rows


if __name__ == "__main__":
    try:
        main()
    except DsrError as e:
        sys.stderr.write(f"fp8_policy.py: {e}\n")
        sys.exit(e.exit_code)
