"""The one script of a GPU session: correctness on the device first, then measurements, printed as a
summary for the README (and written as JSON). Every step runs in its own process under a time limit,
so one hung or failed step still leaves the others' results.

    python bench/gpu_check.py                 # all steps (~6-9 min on an H200 with cold caches)
    python bench/gpu_check.py --quick         # correctness only (tests/gpu and `dsrc run --check`)
    python bench/gpu_check.py --json FILE     # also write the results (default: $OUT/gpu_check.json if $OUT is set)

Steps:
1. `pytest tests/gpu`: compiled kernels on the GPU vs eager PyTorch, PTX kernels vs their Triton
   twins, e4m3 codes at every rounding edge vs torch's cast (Triton and PTX paths).
2. `dsrc run --backend cuda --check`: the default decoder layer (FP8 recipe), the MoE and MLA modules,
   each compared with eager PyTorch through the tolerance table.
3. `bench/gpu.py`: time per compiled module vs eager PyTorch and torch.compile measured in the same
   run (CUDA events), achieved TB/s of the modeled bytes.

Exit status: 0 if every step passed, 1 if a step failed or timed out, 2 without a CUDA GPU (nothing
is run then).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAIL = 3000          # characters of each step's output kept in the results


def steps(quick: bool) -> list[tuple[str, list[str], int]]:
    """(name, argv, time limit in seconds) of each step, in order."""
    py = sys.executable
    dsrc = [py, "-m", "dsr_compiler"]
    out = [
        ("pytest tests/gpu", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"], 300),
        ("check decoder (fp8)", dsrc + ["run", "--backend", "cuda", "--check", "--seq", "16"], 150),
        ("check moe", dsrc + ["run", "--backend", "cuda", "--check", "--module", "moe", "--seq", "64"], 120),
        ("check mla prefill", dsrc + ["run", "--backend", "cuda", "--check", "--module", "mla", "--phase", "prefill",
                                      "--seq", "64"], 120),
    ]
    if not quick:
        bench = [py, str(ROOT / "bench" / "gpu.py")]
        out += [
            ("bench mlp V3 bf16 T=4096", bench + ["--module", "mlp", "--tokens", "4096"], 180),
            ("bench moe tiny bf16 T=4096", bench + ["--model", "deepseek-v3-tiny", "--module", "moe",
                                                    "--tokens", "4096"], 180),
        ]
    return out


def run_step(name: str, argv: list[str], limit: int) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        status, rc, text = ("passed" if p.returncode == 0 else "failed"), p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout or b""
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        status, rc = "timed out", None
    return {"step": name, "argv": argv[1:], "status": status, "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "output_tail": text[-TAIL:]}


def environment() -> dict:
    import torch
    import triton
    return {"torch": torch.__version__, "triton": triton.__version__, "device": torch.cuda.get_device_name(0),
            "capability": list(torch.cuda.get_device_capability(0))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="correctness steps only")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    a = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run",
              file=sys.stderr)
        return 2
    dest = a.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    res = {"environment": environment(), "steps": []}
    print(f"gpu_check on {res['environment']['device']} (torch {res['environment']['torch']}, "
          f"triton {res['environment']['triton']})", flush=True)
    for name, args, limit in steps(a.quick):
        r = run_step(name, args, limit)
        res["steps"].append(r)
        print(f"\n== {name}: {r['status']} in {r['seconds']} s", flush=True)
        lines = r["output_tail"].strip().splitlines()
        keep = lines if name.startswith("bench") else lines[-12:]
        print("\n".join(keep), flush=True)
        if dest is not None:                # written after every step: a later hang keeps what is done
            dest.write_text(json.dumps(res, indent=2))
    bad = [r["step"] for r in res["steps"] if r["status"] != "passed"]
    print(f"\n{len(res['steps']) - len(bad)}/{len(res['steps'])} steps passed" + (f"; not passed: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
