"""GPU measurements (DESIGN §8): time per compiled module vs eager PyTorch and torch.compile,
measured in the same run with CUDA events, printed as ratios; achieved TB/s against the H200
ceiling from the modeled bytes of the report. Run on a machine with a CUDA GPU:

    python bench/gpu.py [--model deepseek-v3] [--tokens 4096] [--dtype bf16]
"""
from __future__ import annotations

import argparse

import torch

import dsr_compiler as dsr
from dsr_compiler.models import ModelConfig
from dsr_compiler.workloads import DTYPES, build


def cuda_time(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e-3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deepseek-v3")
    ap.add_argument("--module", default="mlp")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    wl = build(ModelConfig.named(a.model), a.module, 1, a.tokens, a.dtype, 0)
    m = wl.module.cuda()
    xs = tuple(x.cuda() for x in wl.example_inputs)
    cm = dsr.compile(m, xs, dynamic=wl.dynamic, backend="cuda", name=wl.name)
    with torch.no_grad():
        t_eager = cuda_time(lambda: m(*xs))
        t_dsr = cuda_time(lambda: cm(*xs))
        tc = torch.compile(m)
        t_tc = cuda_time(lambda: tc(*xs))
    rep = cm.report()
    by = rep["totals"]["bytes"]
    print(f"{a.model} {a.module} T={a.tokens} {a.dtype}: eager {t_eager * 1e6:.1f} us, dsr {t_dsr * 1e6:.1f} us, "
          f"torch.compile {t_tc * 1e6:.1f} us")
    print(f"  speedup vs eager {t_eager / t_dsr:.2f}x, vs torch.compile {t_tc / t_dsr:.2f}x; "
          f"achieved {by / t_dsr / 1e12:.2f} TB/s of modeled bytes (H200 4.8), "
          f"{rep['totals']['flops'] / t_dsr / 1e12:.1f} TFLOP/s (H200 bf16 989)")


if __name__ == "__main__":
    main()
