"""Rotary embeddings computed inside the graph (transformers' style: positions x inv_freq, then cos/sin),
compiled on the interpreter vs eager, and their gradient vs autograd (`cos`/`sin` ops, ir/ops/core.py)."""
from __future__ import annotations

import torch
from torch import nn

import dsr_compiler as dsr
from tolerances import assert_close


class Rotary(nn.Module):
    def __init__(self, dim: int = 32, base: float = 10000.0) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dim, 2).float() / dim))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:     # x [T, heads, dim], pos [T]
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None, :], torch.sin(emb)[:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class AngleLoss(nn.Module):
    """sum(w * (x * cos(pos * f) + x^2 * sin(pos * f))): the gradient runs through cos and sin to x and pos."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("f", 1.0 / 10000.0 ** (torch.arange(0, 32).float() / 32))
        self.register_buffer("w", torch.linspace(-1.0, 1.0, 32))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:     # x [T, 32], pos [T]
        ang = pos[:, None] * self.f[None, :]
        return ((x * torch.cos(ang) + x * x * ang.sin()) * self.w).sum()


def _inputs(t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, 4, 32, generator=g), torch.randint(0, 8192, (t,), generator=g).float()


def test_rotary_cos_sin_in_graph():
    m = Rotary().eval()
    cm = dsr.compile(m, _inputs(8, 0), dynamic={"x": {0: "T"}, "pos": {0: "T"}}, backend="interpret")
    assert any(n.op in ("cos", "sin") for k in cm.graph.kernels for n in k.body.nodes)
    for t in (1, 8, 16):                                  # one compile, several token counts
        x, pos = _inputs(t, t)
        with torch.no_grad():
            assert_close(cm(x, pos), m(x, pos))


def test_rotary_gradient_matches_autograd():
    m = AngleLoss().eval()
    g = torch.Generator().manual_seed(1)
    x, pos = torch.randn(6, 32, generator=g), torch.randint(0, 8192, (6,), generator=g).float()
    cm = dsr.compile(m, (x, pos), dynamic={"x": {0: "T"}, "pos": {0: "T"}}, backend="interpret",
                     grad_wrt=("x", "pos"))
    loss, grads = cm(x, pos)
    xr, pr = x.clone().requires_grad_(), pos.clone().requires_grad_()
    ref = m(xr, pr)
    ref.backward()
    assert_close(loss, ref.detach())
    assert_close(grads["x"], xr.grad)
    # d/dpos runs through cos/sin of angles up to ~8e3 rad: compared in f64 to keep eager's own rounding out
    m64 = AngleLoss().double()
    x64, p64 = x.double().requires_grad_(), pos.double().requires_grad_()
    m64(x64, p64).backward()
    torch.testing.assert_close(grads["pos"].double(), p64.grad, rtol=2e-3, atol=2e-3 * float(p64.grad.abs().max()))
