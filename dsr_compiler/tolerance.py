"""The one tolerance table. Every numeric check (tests, `dsrc run --check`) reads it.

Why these numbers:
- f32: compiled kernels fuse ops (one rounding at the store instead of one per op) and
  accumulate GEMMs in a different order (tiles, fp32 FMA). Errors grow like sqrt(K)*eps32
  relative to the magnitude of the summands; 1e-4 abs/rel covers K up to a few thousand.
- bf16: eager rounds every intermediate to bf16 (8 mantissa bits, eps 2^-8 = 3.9e-3) while
  compiled code keeps fp32 inside a kernel and rounds at its stores. Two to three roundings
  apart on values of magnitude ~1-4 gives a few ulp: 2e-2 rel and 3e-2 abs (scaled by the
  output's magnitude for large outputs).
"""
import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict[str, float]:
    """Tolerance for comparing outputs of `dtype`; `scale` = typical output magnitude (>= 1)."""
    t = TOLERANCES[dtype]
    return {"atol": t["atol"] * max(1.0, scale), "rtol": t["rtol"]}


def compare(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> dict:
    """Max abs/rel error of `actual` vs `expected` and whether it is within the table's tolerance."""
    dtype = dtype or expected.dtype
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    scale = float(e.abs().max()) if e.numel() else 1.0
    t = tol(dtype, scale)
    if a.shape != e.shape:
        return {"ok": False, "max_abs": float("inf"), "max_rel": float("inf"), **t, "reason": f"shape {tuple(a.shape)} != {tuple(e.shape)}"}
    diff = (a - e).abs()
    finite = torch.isfinite(a) == torch.isfinite(e)
    max_abs = float(diff.nan_to_num(0.0).max()) if diff.numel() else 0.0
    max_rel = float((diff / e.abs().clamp_min(1e-6)).nan_to_num(0.0).max()) if diff.numel() else 0.0
    ok = bool(finite.all()) and bool((diff <= t["atol"] + t["rtol"] * e.abs()).nan_to_num(True).all()) if diff.numel() else True
    return {"ok": ok, "max_abs": max_abs, "max_rel": max_rel, **t}
