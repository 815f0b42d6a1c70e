"""Eager building blocks shared by the zoo: RMSNorm, the SwiGLU MLP, and interleaved-pair RoPE.

Where it sits: these modules are both the eager reference that compiled kernels are checked
against and what the frontend traces with ``torch.fx``. So they are written as plain tensor code
with no data-dependent control flow, and the numerics follow the FP8 contract of DESIGN.md §5
(RMSNorm in fp32 including the weight multiply, one cast at the end; RoPE in fp32).

``apply_rope`` and ``rope_cos_sin`` are ``torch.fx.wrap``-ed: a trace keeps each as ONE
``call_function`` node, which the frontend maps to the IR op named by its ``dsr_op`` attribute
(instead of a dozen view/stack ops).
A module in another file that calls them by bare name must repeat ``torch.fx.wrap("apply_rope")``
at its own top level (FX patches per module globals); ``deepseek.py`` does.
"""
from __future__ import annotations

import math

import torch
import torch.fx
from torch import nn

from dsr_compiler.errors import ConfigError
from dsr_compiler.models.config import ModelConfig, RopeScaling

__all__ = ["RMSNorm", "MLP", "MLPBlock", "rope_inv_freq", "rope_attn_factor", "rope_cos_sin",
           "precompute_rope", "rotate_pairs", "apply_rope"]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` computed in fp32 (weight multiply included), cast back once.

    `dsr_op` makes the frontend keep it as one `rms_norm` IR op (a DeepSeek building block).
    """

    dsr_op = "rms_norm"

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class MLP(nn.Module):
    """DeepSeek SwiGLU feed-forward: ``w2(silu(w1(x)) * w3(x))`` (HF: gate_proj=w1, up_proj=w3, down_proj=w2)."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class MLPBlock(nn.Module):
    """``x + mlp(norm(x))``: RMSNorm + SwiGLU MLP + residual (``dsrc --module mlp``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


# ---- RoPE ---------------------------------------------------------------------------------------
def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dim: int, theta: float = 10000.0, rope_scaling: RopeScaling | None = None) -> torch.Tensor:
    """Per-pair rotation frequencies ``[dim // 2]`` (fp32), YaRN-corrected when scaling stretches.

    Follows ``precompute_freqs_cis`` of the DeepSeek-V3 reference, op for op in fp32: correction
    range from beta_fast/beta_slow at the original context, a linear ramp between, and
    ``freqs / factor * (1 - smooth) + freqs * smooth``.
    """
    if dim <= 0 or dim % 2:
        raise ConfigError(f"invalid RoPE dim {dim}: must be a positive even number",
                          where="precompute_rope", hint="qk_rope_head_dim rotates pairs (DeepSeek: 64)")
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if rope_scaling is None or not rope_scaling.active:
        return freqs
    orig = rope_scaling.original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(rope_scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope_scaling.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    smooth = 1 - ramp
    return freqs / rope_scaling.factor * (1 - smooth) + freqs * smooth


def rope_attn_factor(rope_scaling: RopeScaling | None) -> float:
    """HF's YaRN cos/sin multiplier ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``.

    1.0 for every DeepSeek release (mscale == mscale_all_dim), as in the reference, which has no
    such multiplier; kept so that an HF config that sets them apart is not silently misread.
    """
    if rope_scaling is None or not rope_scaling.active:
        return 1.0
    return (_yarn_mscale(rope_scaling.factor, rope_scaling.mscale)
            / _yarn_mscale(rope_scaling.factor, rope_scaling.mscale_all_dim))


@torch.fx.wrap
def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 attn_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` each ``[len(positions), 2 * len(inv_freq)]`` fp32, pair j's angle at 2j and 2j+1."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(device=positions.device, dtype=torch.float32)[None, :]
    cos, sin = angles.cos(), angles.sin()
    if attn_factor != 1.0:
        cos, sin = cos * attn_factor, sin * attn_factor
    return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)


rope_cos_sin.dsr_op = "rope_table"  # type: ignore[attr-defined]  # the IR op the frontend maps it to


def precompute_rope(cfg_or_dim: ModelConfig | int, theta: float | None = None, seqlen: int | None = None,
                    rope_scaling: RopeScaling | None = None, *,
                    positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables ``(cos, sin)``, each ``[seqlen, rope_dim]`` fp32 (interleaved-pair layout).

    ``precompute_rope(cfg, seqlen=S)`` takes dim, theta and YaRN from the config (``seqlen``
    defaults to ``cfg.max_position_embeddings``); ``precompute_rope(dim, theta, seqlen, rope_scaling)``
    gives them directly. ``positions`` (int tensor) replaces ``arange(seqlen)``.
    """
    if isinstance(cfg_or_dim, ModelConfig):
        cfg = cfg_or_dim
        dim = cfg.qk_rope_head_dim
        theta = cfg.rope_theta if theta is None else theta
        rope_scaling = cfg.rope_scaling if rope_scaling is None else rope_scaling
        seqlen = cfg.max_position_embeddings if seqlen is None and positions is None else seqlen
    else:
        dim = cfg_or_dim
        theta = 10000.0 if theta is None else theta
    if positions is None:
        if seqlen is None or seqlen <= 0:
            raise ConfigError(f"precompute_rope needs a positive seqlen, got {seqlen!r}", where="precompute_rope",
                              hint="pass seqlen=S or positions=tensor")
        positions = torch.arange(seqlen)
    return rope_cos_sin(positions, rope_inv_freq(dim, theta, rope_scaling), rope_attn_factor(rope_scaling))


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``out[2j] = -x[2j+1]``, ``out[2j+1] = x[2j]`` along the last dim (multiplication by i per pair)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


@torch.fx.wrap
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE ``x*cos + rotate_pairs(x)*sin`` in fp32, cast back to ``x.dtype``.

    ``x`` is ``[..., S, rope_dim]`` (or anything that broadcasts with ``cos``/``sin``, e.g.
    ``[B, S, H, rope_dim]`` against ``[S, 1, rope_dim]``). Equals the reference's complex form
    ``view_as_complex(x.float().view(..., -1, 2)) * freqs_cis``.
    """
    xf = x.float()
    return (xf * cos.float() + rotate_pairs(xf) * sin.float()).to(x.dtype)


apply_rope.dsr_op = "rope"  # type: ignore[attr-defined]  # the IR op the frontend maps it to
