"""Example: look inside a compile: the IR after a pass, the kernel report, and a dump with report.html.

    python examples/inspect_ir.py [--after fuse] [--out DIR]

Compiles the MLP block of deepseek-v3-tiny (RMSNorm + SwiGLU MLP + residual, f32, the default FP8
recipe, `T` tokens symbolic) as `dsrc ir --module mlp --after NAME` and `dsrc compile --out DIR`
do, then:

- prints the IR after the pass `--after` (trace, rewrite_vocab_loss, differentiate, cse,
  fold_constants, dce, absorb_mla, quantize_fp8, fuse) with its header line, and that pass's notes;
- prints the kernel report (`cm.report()`: per kernel its family, registers from ptxas for sm_90a,
  modeled DRAM bytes, FLOPs, H200 roofline) and the kernel families;
- writes the dump with `cm.dump(DIR)` (default: a new folder under the system temp dir, kept) and
  prints the path of DIR/report.html, one self-contained page to open in a browser.

Checks (exit 1 otherwise): the printed IR parses back to the same graph (`dsr.ir.parse(str(ir))`),
and so does every pass's IR file in the dump; the pass is in the report; every kernel of the report
has ptxas registers; report.html and report.json are in the dump; and the compiled block run on the
interpreter matches eager PyTorch running the same FP8 recipe (models/fp8_ref.py, tolerance fp8_sim).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

import dsr_compiler as dsr
from dsr_compiler.dump import check_out_dir
from dsr_compiler.errors import CheckFailed, DsrError
from dsr_compiler.ir.passes import PIPELINE
from dsr_compiler.ir.passes.quantize_fp8 import fp8_stages
from dsr_compiler.ir.printer import header_line, print_graph
from dsr_compiler.models import ModelConfig
from dsr_compiler.models.fp8_ref import fp8_reference
from dsr_compiler.models.layers import MLPBlock
from dsr_compiler.report import summary
from dsr_compiler.tolerance import compare_fp8
from dsr_compiler.workloads import init_weights

PASSES = ["trace"] + [name for name, _ in PIPELINE]


def main(after: str = "fuse", out: str | None = None, tokens: int = 16) -> dict:
    if after not in PASSES:
        raise DsrError(f"unknown pass {after!r} for --after", hint=f"passes: {', '.join(PASSES)}")
    if out is not None:                 # refuse a folder holding other data before any compile work
        check_out_dir(out)
    cfg = ModelConfig.named("deepseek-v3-tiny")
    block = MLPBlock(cfg)
    init_weights(block, 0)
    block.eval()
    x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    cm = dsr.compile(block, (x,), dynamic={"x": {0: "T"}}, fp8=True, backend="interpret", name="mlp")

    failures = []
    record = next(r for r in cm.passes if r.name == after)
    text = print_graph(record.graph, header_line(record.graph, record.index, len(cm.passes) - 1, record.name, record.ms))
    print(text)
    for note in record.notes:
        print(f"  note: {note}")
    if dsr.ir.parse(text) != record.graph:
        failures.append(f"the IR after {after} does not parse back to the same graph")

    rep = cm.report()
    print(summary(rep))
    families = Counter(k["family"] for k in rep["kernels"])
    print("kernel families: " + ", ".join(f"{f} x{n}" for f, n in sorted(families.items())))
    if after not in [p["name"] for p in rep["passes"]]:
        failures.append(f"pass {after} is not in the report")
    if any(not isinstance(k["registers"], int) or k["registers"] <= 0 for k in rep["kernels"]):
        failures.append("a kernel of the report has no ptxas register count")

    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="dsr-inspect-"))
    dump = cm.dump(folder)
    html = dump / "report.html"
    print(f"dump written to {dump}/ (ir/, kernels/, report.json); open {html}")
    if not html.is_file() or not (dump / "report.json").is_file():
        failures.append("the dump lacks report.html or report.json")
    elif json.loads((dump / "report.json").read_text())["totals"]["kernels"] != len(cm.kernels):
        failures.append("report.json does not list the compiled kernels")
    for r in cm.passes:
        f = dump / "ir" / f"{r.index:02d}_{r.name}.ir"
        if not f.is_file() or dsr.ir.parse(f.read_text()) != r.graph:
            failures.append(f"{f} is missing or does not parse back to the graph after {r.name}")

    with torch.no_grad():
        got, want = cm(x), fp8_reference(block, cm.options["fp8"])(x)
    r = compare_fp8(got, want, "fp8_sim", fp8_stages(cm.graph)[0])
    print(f"compiled vs eager running the same FP8 recipe: max abs err {r['max_abs']:.2e}, calc_diff "
          f"{r['calc_diff']:.1e} (tolerance {r['atol']:.1e}, {r['calc_diff_max']:.0e})")
    if not r["ok"]:
        failures.append("the compiled block differs from eager (same FP8 recipe) beyond tolerance")
    if failures:
        raise CheckFailed("inspect_ir: " + "; ".join(failures))
    print(f"check passed: IR after {after} and the dump's IR files parse back, report and dump complete, "
          "output matches eager")
    return {"after": after, "kernels": len(cm.kernels), "families": dict(families), "dump": str(dump),
            "bytes": rep["totals"]["bytes"], "max_abs": r["max_abs"]}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--after", default="fuse", help=f"pass name: {', '.join(PASSES)}")
    p.add_argument("--out", default=None, help="dump folder (default: a new folder under the temp dir)")
    a = p.parse_args()
    try:
        main(a.after, a.out)
    except DsrError as e:
        sys.stderr.write(f"inspect_ir.py: {e}\n")
        sys.exit(e.exit_code)
