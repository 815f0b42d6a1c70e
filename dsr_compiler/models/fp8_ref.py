"""The FP8 recipe in eager PyTorch: the independent reference of `dsrc run --check` ("fp8_sim").

Where it sits: beside the model zoo (models/). It shares nothing with the compiler's numerics: no
op table, no IR, no trace. Only the *policy* (which linears quantize: ir.passes.quantize_fp8's
Fp8Policy and classify) is read, so that the reference quantizes what the compiled plan quantizes.

    ref = fp8_reference(module, policy)      # a deep copy; eligible nn.Linear -> FP8Linear
    with torch.no_grad():
        y_ref = ref(*inputs)                 # the zoo's own forward/decode, FP8 GEMMs in plain torch

The recipe (DeepSeek-V3 block FP8, DESIGN.md section 5), written out with torch's own operations:
- activations: 1 x 128 tiles along K, s = max(amax|tile|, 1e-4) / 448 in fp32 ("ue8m0": s rounded
  up to a power of two), codes = torch's cast `clamp(x / s, -448, 448).to(torch.float8_e4m3fn)`;
- weights: 128 x 128 blocks, the same scale rule, quantized once when the copy is made;
- GEMM: per 128-wide K block an fp32 product of the decoded codes, scaled by sA * sB and summed
  in fp32; the result is rounded to bf16 (DeepGEMM's output type) and then to the activation dtype;
  a bias is added after that rounding, as the quantize_fp8 pass adds it.

Which linears: the quantize_fp8 pass's policy, mirrored from the module side. A linear is
quantized when its op class (from its module path: attention, dense MLP, experts, shared experts,
other) is on in the policy, or it is forced, and its K is a multiple of the block; the LM head,
the router gate and embeddings stay high precision. Routed experts quantize as a pair (w1/w3 and
w2 of every expert) only when H and the expert width are both multiples of the block.

MLA: the absorb_mla pass rewrites decode attention (keys from a cache: key length != query length)
to the absorbed form, where wkv_b is read as a high-precision weight, not a GEMM; prefill keeps the
expanded form, where wkv_b is a quantized GEMM. The copy's MLA modules follow the same rule
(`mla="absorb"`, the compile's default) or never absorb (`mla="naive"`).

The MoE router is the zoo's own Gate: it reads the values this FP8 path computes (the normalized
output of FP8 attention in a decoder layer), as the compiled router does, so routing decisions are
the quantized path's own.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from dsr_compiler.ir.ops.fp8 import E4M3_MAX
from dsr_compiler.ir.ops.fp8 import SCALE_FLOOR as AMAX_FLOOR
from dsr_compiler.ir.passes.quantize_fp8 import HIGH_PRECISION, Fp8Policy, classify

from .deepseek import MLA, Gate, MoE


__all__ = ["FP8Linear", "fp8_reference", "pinned_routing", "quantized_paths"]


def _scales(amax: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    """fp32 scales from tile maxima; "ue8m0": the power of two at or above, exactly (frexp, no log)."""
    s = amax.float().clamp(min=AMAX_FLOOR) / E4M3_MAX
    if scale_fmt == "ue8m0":
        mant, exp = torch.frexp(s)                       # s = mant * 2^exp, mant in [0.5, 1)
        s = torch.ldexp(torch.ones_like(s), torch.where(mant == 0.5, exp - 1, exp))
    return s


def _codes(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_activation(x: torch.Tensor, block: int, scale_fmt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K % block == 0) -> (codes [M, K/block, block], scales [M, K/block])."""
    tiles = x.float().reshape(x.shape[0], x.shape[1] // block, block)
    s = _scales(tiles.abs().amax(dim=-1), scale_fmt)
    return _codes(tiles / s[..., None]), s


def quantize_weight(w: torch.Tensor, block: int, scale_fmt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes [N, K], scales [ceil(N/block), K/block]); rows past N pad with zeros."""
    n, k = w.shape
    nb = -(-n // block)
    wf = torch.zeros(nb * block, k, dtype=torch.float32, device=w.device)
    wf[:n] = w.float()
    t = wf.reshape(nb, block, k // block, block)
    s = _scales(t.abs().amax(dim=(1, 3)), scale_fmt)
    q = _codes(t / s[:, None, :, None]).reshape(nb * block, k)[:n]
    return q, s


class FP8Linear(nn.Module):
    """An nn.Linear running the FP8 block recipe. `weight` stays the high-precision parameter (code
    that reads it directly, like absorbed MLA attention reading wkv_b, sees what the compiler sees)."""

    def __init__(self, linear: nn.Linear, block: int = 128, scale_fmt: str | None = None) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block, self.scale_fmt = block, scale_fmt
        with torch.no_grad():
            q, s = quantize_weight(linear.weight.detach(), block, scale_fmt)
        self.register_buffer("weight_codes", q, persistent=False)
        self.register_buffer("weight_scales", s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k, b = x.shape[:-1], x.shape[-1], self.block
        xq, xs = quantize_activation(x.reshape(-1, k), b, self.scale_fmt)
        wq = self.weight_codes.float().reshape(self.out_features, k // b, b)
        ws = self.weight_scales.repeat_interleave(b, dim=0)[: self.out_features]       # [N, K/b]
        acc = torch.zeros(xq.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        for kb in range(k // b):          # one fp32 product per K block, scaled, summed in fp32
            acc = acc + (xq[:, kb].float() @ wq[:, kb].T) * (xs[:, kb, None] * ws[None, :, kb])
        y = acc.to(torch.bfloat16).to(x.dtype).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, block={self.block}, scale_fmt={self.scale_fmt}"


def _forced(policy: Fp8Policy, path: str) -> bool:
    return any(path == f or path.startswith(f + ".") for f in policy.force)


def _eligible(path: str, lin: nn.Linear, policy: Fp8Policy, experts_ok: bool) -> bool:
    """The quantize_fp8 pass's decision for the linear at module path `path`."""
    cls = classify(path)
    if cls in HIGH_PRECISION or not lin.weight.dtype.is_floating_point or lin.weight.dtype.itemsize < 2:
        return False
    if cls == "experts":                    # a routed expert: quantized as a pair, by the class switch
        return experts_ok
    if not (getattr(policy, cls) or _forced(policy, path)):
        return False
    return lin.in_features % policy.block == 0


def _experts_ok(moe: MoE, policy: Fp8Policy) -> bool:
    e = moe.experts[0]
    return policy.experts and e.w1.in_features % policy.block == 0 and e.w2.in_features % policy.block == 0


def quantized_paths(module: nn.Module, policy: Fp8Policy | None = None) -> list[str]:
    """Module paths of the linears the recipe quantizes (the policy applied from the module side)."""
    policy = policy or Fp8Policy()
    experts = {p: _experts_ok(m, policy) for p, m in module.named_modules() if isinstance(m, MoE)}
    out = []
    for path, m in module.named_modules():
        if isinstance(m, nn.Linear):
            moe = next((p for p in experts if path.startswith(f"{p}.experts." if p else "experts.")), None)
            if _eligible(path, m, policy, experts.get(moe, False) if moe is not None else False):
                out.append(path)
    return out


class _FP8MLA(MLA):
    """MLA whose attention form follows the absorb_mla pass: absorbed (wkv_b high precision) when keys
    come from a cache (key length != query length) and the compile absorbs, else expanded (wkv_b FP8)."""

    fp8_absorb_decode = True

    def _attend(self, q_nope, q_pe, latent, k_pe, q_pos, k_pos, absorb: bool, out_dtype: torch.dtype):
        absorbed = self.fp8_absorb_decode and k_pos.numel() != q_pos.numel()
        return super()._attend(q_nope, q_pe, latent, k_pe, q_pos, k_pos, absorbed, out_dtype)


def fp8_reference(module: nn.Module, policy: Fp8Policy | dict | bool | None = True, mla: str = "absorb"
                  ) -> nn.Module:
    """A deep copy of `module` running the FP8 recipe in plain torch (see the module docstring)."""
    pol = Fp8Policy.from_option(policy) if not isinstance(policy, Fp8Policy) else policy
    if pol is None:
        raise ValueError("fp8_reference: FP8 is off in this policy (nothing to simulate)")
    if mla not in ("absorb", "naive"):
        raise ValueError(f"fp8_reference: mla must be 'absorb' or 'naive', got {mla!r}")
    ref = copy.deepcopy(module)
    paths = set(quantized_paths(ref, pol))
    for path, m in list(ref.named_modules()):
        if isinstance(m, MLA):
            m.__class__ = _FP8MLA
            m.fp8_absorb_decode = mla == "absorb"
        for name, child in list(m.named_children()):
            full = f"{path}.{name}" if path else name
            if full in paths and isinstance(child, nn.Linear):
                setattr(m, name, FP8Linear(child, pol.block, pol.scale_fmt))
    return ref.eval()


# ----------------------------------------------------------------------------- routing pinned to the FP8 path

class _PinnedGate(Gate):
    """A Gate that scores as the zoo's Gate but takes its expert choice from `pinned` (the FP8 path's
    choice for the same tokens). The scoring lines are Gate.forward's own, minus the selection."""

    pinned: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pinned is None or self.pinned.shape[0] != x.shape[0]:
            raise RuntimeError("pinned_routing: run the FP8 reference on the same inputs first")
        cfg = self.cfg
        logits = nn.functional.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        weights = scores.gather(-1, self.pinned)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, self.pinned


def pinned_routing(module: nn.Module, fp8_ref: nn.Module) -> tuple[nn.Module, Callable[[], None]]:
    """(a deep copy of the unquantized `module` whose MoE gates take the experts that `fp8_ref`'s gates
    chose, a function that removes the recording hooks). Run `fp8_ref(*x)` then `copy(*x)`.

    Why: a top-k router reading FP8-perturbed values may pick another expert for a token near a tie,
    a discrete change the "fp8" tolerance cannot bound (dsr_compiler/tolerance.py). With the choice
    pinned, what is left between the FP8 path and unquantized eager is the continuous FP8 error the
    "fp8" tolerance is derived for, so that comparison can be enforced for routed modules too."""
    pinned = copy.deepcopy(module)
    gates = {p: m for p, m in pinned.named_modules() if isinstance(m, Gate)}
    hooks = []
    for path, m in fp8_ref.named_modules():
        if isinstance(m, Gate) and path in gates:
            gates[path].__class__ = _PinnedGate

            def record(_mod, _inp, out, target=gates[path]) -> None:
                target.pinned = out[1]
            hooks.append(m.register_forward_hook(record))

    def remove() -> None:
        for h in hooks:
            h.remove()
    return pinned.eval(), remove
