"""Modules people already have (transformers 5, plain nn), through dsr_compiler, in one table:

    module | trace | compile | max rel. error T=1/8/16 (f32) | torch.compile | kernels vs eager ATen ops | FP8

- trace / compile: `dsr.compile` with the token dim symbolic (one compile for 1, 8, 16 tokens), interpreter;
- error: max |compiled - eager| / max |eager| over the three sizes, f32 (issue 13's bound: 1e-5);
- torch.compile: `torch.compile(module, backend="dsr")` at 8, 16, 1 tokens, the same error measure (MoE
  modules with transformers' default `grouped_mm` experts: its `eager` loop breaks Dynamo's graph);
- kernels: launches of the compiled plan at T=16 vs the ATen ops eager PyTorch dispatches for the same call
  (a TorchDispatchMode count);
- FP8: the same module at widths that are multiples of 128, bf16, `fp8=True`: DeepGEMM's calc_diff vs eager
  bf16 at T=16 and the number of FP8 kernels.

    python bench/thirdparty_table.py [--only NAME ...]

Needs the `test` extra (transformers); builds the modules of tests/thirdparty/hf_modules.py (tiny configs in
code, no downloads). Minutes on a CPU.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "thirdparty"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
warnings.filterwarnings("ignore")


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def row(name: str) -> dict:
    import dsr_compiler as dsr
    from dsr_compiler.ir.ops.fp8 import calc_diff
    from dispatch_recorder import DispatchRecorder
    from hf_modules import build
    out: dict = {"module": name}
    m, inputs, dyn = build(name)
    t0 = time.perf_counter()
    try:
        cm = dsr.compile(m, inputs(8), dynamic=dyn, backend="interpret")
        out["compile"] = f"yes ({time.perf_counter() - t0:.1f} s)"
        errs = []
        for t in (1, 8, 16):
            x = inputs(t, seed=t)
            with torch.no_grad():
                errs.append(rel(cm(*x), m(*x)))
        out["error"] = " / ".join(f"{e:.1e}" for e in errs)
        x = inputs(16, seed=16)
        with torch.no_grad(), DispatchRecorder() as c:
            m(*x)
        out["kernels"] = f"{len(cm.kernels)} vs {sum(c.ops.values())}"
    except Exception as e:                                  # noqa: BLE001  (a table cell)
        out["compile"] = f"no: {str(e).splitlines()[0][:90]}"
    torch._dynamo.reset()
    try:           # transformers' default experts implementation for models (its eager loop breaks Dynamo's graph)
        dm, dinputs, _ = build(name, experts="grouped_mm")
        f = torch.compile(dm, backend="dsr")
        errs = []
        for t in (8, 16, 1):
            x = dinputs(t, seed=t)
            with torch.no_grad():
                errs.append(rel(f(*x), dm(*x)))
        out["dynamo"] = "yes, " + " / ".join(f"{e:.1e}" for e in errs)
    except Exception as e:                                  # noqa: BLE001
        first = [ln for ln in str(e).splitlines() if "trace:" in ln or "Error" in ln]
        out["dynamo"] = f"no: {(first[0] if first else str(e).splitlines()[0])[:90]}"
    torch._dynamo.reset()
    try:
        wm, winputs, wdyn = build(name, wide=True)
        wm = wm.to(torch.bfloat16)

        def cast(xs: tuple) -> tuple:
            return tuple(x.bfloat16() if x.is_floating_point() else x for x in xs)
        fcm = dsr.compile(wm, cast(winputs(16)), dynamic=wdyn, fp8=True, backend="interpret")
        x = cast(winputs(16, seed=5))
        with torch.no_grad():
            ref = wm(*x)
        fams = [k.spec.family for k in fcm.kernels]
        n8 = sum(f.endswith("fp8") for f in fams)
        out["fp8"] = f"calc_diff {calc_diff(fcm(*x).float(), ref.float()):.1e}, {n8} FP8 kernels"
    except Exception as e:                                  # noqa: BLE001
        out["fp8"] = f"no: {str(e).splitlines()[0][:90]}"
    return out


def main() -> None:
    from hf_modules import MODULES
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="module names (default: all)")
    args = ap.parse_args()
    names = args.only or MODULES
    cols = ("module", "compile", "error", "dynamo", "kernels", "fp8")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for n in names:
        r = row(n)
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
