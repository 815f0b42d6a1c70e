"""Tests read the package's one tolerance table (dsr_compiler/tolerance.py)."""
import torch

from dsr_compiler.tolerance import TOLERANCES, compare, tol  # noqa: F401


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    r = compare(actual, expected, dtype)
    assert r["ok"], f"max abs {r['max_abs']:.3g}, max rel {r['max_rel']:.3g} beyond atol {r['atol']:.3g} rtol {r['rtol']:.3g} {r.get('reason', '')}"
