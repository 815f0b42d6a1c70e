"""Example: `torch.compile(module, backend="dsr")` on a small module of your own.

    python examples/torch_compile_backend.py

`TinyClassifier` is ordinary PyTorch written for this example (not from the model zoo): torch's
`nn.RMSNorm`, a gated GELU feed-forward with biases, a residual, and a softmax classifier head.
`torch.compile(..., backend="dsr")` hands TorchDynamo's FX graph to the same pipeline as
`dsr.compile` (trace -> passes -> Triton kernels) with static shapes; on a machine without CUDA
the kernels run on the CPU through Triton's interpreter (DSR_BACKEND=auto; with CUDA, on the GPU).

Prints the output shape and the error against the eager module for two batches of the same shape
(the second call reuses the compiled graph). Checks (exit 1 otherwise): both outputs within
dsr_compiler.tolerance.compare's f32 tolerance of eager's, and rows of probabilities summing to 1.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed

from dsr_compiler.errors import CheckFailed, DsrError
from dsr_compiler.tolerance import compare


class TinyClassifier(nn.Module):
    """softmax(head(x + down(gelu(gate(norm(x))) * up(norm(x))))): a user's module, biases included."""

    def __init__(self, dim: int = 64, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.gate = nn.Linear(dim, hidden)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        h = x + self.down(F.gelu(self.gate(h)) * self.up(h))
        return torch.softmax(self.head(h), dim=-1)


def main(batch: int = 8, dim: int = 64) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"      # DSR_BACKEND=auto follows it
    torch.manual_seed(0)
    model = TinyClassifier(dim).to(device).eval()
    compiled = torch.compile(model, backend="dsr", dynamic=False)
    results = []
    for seed in (1, 2):                          # same shape: the second call reuses the compiled graph
        x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed)).to(device)
        with torch.no_grad():
            got, want = compiled(x), model(x)
        r = compare(got, want)
        rows = float((got.sum(-1) - 1).abs().max())
        results.append((r, rows))
        print(f"batch {seed}: output {tuple(got.shape)}; max abs err vs eager {r['max_abs']:.2e} "
              f"(tolerance atol {r['atol']:.1e}); |sum(p) - 1| <= {rows:.1e}")
    if not all(r["ok"] and rows < 1e-5 for r, rows in results):
        raise CheckFailed("torch.compile(backend='dsr') output differs from eager beyond tolerance")
    print("check passed: torch.compile(backend='dsr') matches eager")
    return {"max_abs": max(r["max_abs"] for r, _ in results), "calls": len(results)}


if __name__ == "__main__":
    try:
        main()
    except (DsrError, BackendCompilerFailed) as e:      # TorchDynamo wraps the backend's DsrError
        err = getattr(e, "inner_exception", e)
        if not isinstance(err, DsrError):
            raise
        sys.stderr.write(f"torch_compile_backend.py: {err}\n")
        sys.exit(err.exit_code)
