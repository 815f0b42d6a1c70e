"""Eager DeepSeek-V2/V3 modules: MoE routing and experts, MLA attention, decoder layer, full model.

Where it sits: the eager reference for ``--module moe|mla|decoder|model`` and what the frontend
traces. Names follow the DeepSeek-V3 reference inference code (``wq_a``, ``wkv_b``, ``experts``,
``attn_norm``...); ``weights.py`` maps HF checkpoint names onto them.

Numerics (the reference for DESIGN.md §4/§5):

* Routing runs in fp32 (gate GEMM included). Top-k is a *stable* descending sort: equal scores
  go to the lower expert (or group) index, and slots are ordered by score, then index.
* Expert outputs are produced in the module dtype, weighted in fp32 and summed in fp32 over the
  k slots in slot order, the shared expert added last, one cast at the end.
* Attention scores, softmax and the probability-weighted sum run in fp32; the result is cast to
  the module dtype before ``wo``. The naive form computes ``q·k`` as two dots (nope + rope), like
  the flash template; the absorbed form never expands the latent cache.
"""
from __future__ import annotations

import math

import torch
import torch.fx
from torch import nn

from dsr_compiler.errors import DsrError
from dsr_compiler.models.config import ModelConfig
from dsr_compiler.models.layers import MLP, RMSNorm, apply_rope, rope_attn_factor, rope_cos_sin, rope_inv_freq

__all__ = ["Gate", "MoE", "MLA", "DecoderLayer", "DeepSeekModel", "mla_attention", "mla_attention_absorbed"]

# FX patches wrapped functions per module globals: repeat the wrap so that calls made from this
# file stay single call_function nodes too.
torch.fx.wrap("apply_rope")
torch.fx.wrap("rope_cos_sin")


def _stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim with a defined tie order: by value descending, then index ascending."""
    values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


# ---- MoE ----------------------------------------------------------------------------------------
class Gate(nn.Module):
    """The router: ``weight [E, H]`` and, for sigmoid scoring, ``e_score_correction_bias [E]``.

    The bias shifts scores for *selection* only (DeepSeek-V3 auxiliary-loss-free balancing); the
    returned weights come from the unbiased scores.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bias = torch.zeros(cfg.n_routed_experts) if cfg.scoring_func == "sigmoid" else None
        self.register_buffer("e_score_correction_bias", bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, H]`` -> ``(weights [T, k] fp32, indices [T, k] int64)``."""
        cfg = self.cfg
        logits = nn.functional.linear(x.float(), self.weight.float())
        if cfg.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        original = scores
        if self.e_score_correction_bias is not None:
            scores = scores + self.e_score_correction_bias.float()
        if cfg.uses_group_limit:
            grouped = scores.unflatten(-1, (cfg.n_group, cfg.experts_per_group))
            if self.e_score_correction_bias is not None:
                top2 = min(2, cfg.experts_per_group)
                group_scores = _stable_topk(grouped, top2)[0].sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            kept = _stable_topk(group_scores, cfg.topk_group)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, kept, True)
            scores = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)
        indices = _stable_topk(scores, cfg.num_experts_per_tok)[1]
        weights = original.gather(-1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, indices


class MoE(nn.Module):
    """Routed experts (``experts``, top-k of ``n_routed_experts``) plus ``shared_experts``.

    The eager forward loops over experts: it is the reference, not the fast path.
    """

    dsr_op = "moe"  # traced as one leaf: router, dispatch, grouped GEMMs, combine (frontend/lowerings/moe.py)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = (MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
                               if cfg.n_shared_experts > 0 else None)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [..., H]`` -> ``(weights [T, k] fp32, indices [T, k] int64)`` with ``T = x[..., 0].numel()``."""
        return self.gate(x.reshape(-1, self.cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        flat = x.reshape(-1, cfg.hidden_size)
        weights, indices = self.gate(flat)
        per_slot = flat.new_zeros(flat.shape[0], cfg.num_experts_per_tok, cfg.hidden_size, dtype=torch.float32)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(indices == e)
            per_slot[tok, slot] = expert(flat[tok]).float() * weights[tok, slot].unsqueeze(-1)
        y = per_slot[:, 0]
        for s in range(1, cfg.num_experts_per_tok):
            y = y + per_slot[:, s]
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat).float()
        return y.to(x.dtype).reshape(x.shape)


# ---- MLA ----------------------------------------------------------------------------------------
class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3) with interleaved-pair RoPE.

    ``forward(x [B, S, H], start_pos=0)``: causal self-attention over the S tokens (prefill),
    RoPE positions ``start_pos + arange(S)``. ``decode(...)`` attends through a latent cache.
    ``absorb`` (constructor or per decode call) selects the absorbed form as the computation.
    """

    def __init__(self, cfg: ModelConfig, absorb: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.absorb = absorb
        h, nh = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads = nh
        if cfg.q_lora_rank == 0:
            self.wq = nn.Linear(h, nh * cfg.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(nh * cfg.v_head_dim, h, bias=False)
        self.softmax_scale = cfg.softmax_scale
        self.rope_attn_factor = rope_attn_factor(cfg.rope_scaling)
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        return rope_inv_freq(self.cfg.qk_rope_head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # `.to(bfloat16)` would round the RoPE frequencies; they are config constants: keep them fp32.
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)
        return self

    def init_cache(self, batch: int, max_seq: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed ``(kv_cache [B, S_max, kv_lora], pe_cache [B, S_max, rope])`` for :meth:`decode`."""
        dtype = dtype or self.wkv_a.weight.dtype
        device = device or self.wkv_a.weight.device
        return (torch.zeros(batch, max_seq, self.cfg.kv_lora_rank, dtype=dtype, device=device),
                torch.zeros(batch, max_seq, self.cfg.qk_rope_head_dim, dtype=dtype, device=device))

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """Queries (nope, roped pe) per head, normalized latent and roped shared key pe per token."""
        cfg = self.cfg
        b, s = x.size(0), x.size(1)
        q = self.wq(x) if cfg.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(b, s, self.n_heads, cfg.qk_head_dim)
        q_nope, q_pe = torch.split(q, [cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_attn_factor)
        q_pe = apply_rope(q_pe, cos.unsqueeze(1), sin.unsqueeze(1))  # [B, S, nh, rope]
        kv, k_pe = torch.split(self.wkv_a(x), [cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe, cos, sin)  # [B, S, rope], shared by all heads
        return q_nope, q_pe, self.kv_norm(kv), k_pe

    def _attend(self, q_nope, q_pe, latent, k_pe, q_pos, k_pos, absorb: bool, out_dtype: torch.dtype):
        """Softmax attention of queries at ``q_pos`` over keys at ``k_pos`` (key allowed iff k <= q)."""
        cfg = self.cfg
        nope, vd = cfg.qk_nope_head_dim, cfg.v_head_dim
        if absorb:
            o = mla_attention_absorbed(q_nope, q_pe, latent, k_pe, self.wkv_b.weight, q_pos, k_pos,
                                       self.softmax_scale, out_dtype)
        else:
            kvb = self.wkv_b(latent).view(latent.size(0), latent.size(1), self.n_heads, nope + vd)
            k_nope, v = torch.split(kvb, [nope, vd], dim=-1)
            o = mla_attention(q_nope, q_pe, k_nope, k_pe, v, q_pos, k_pos, self.softmax_scale, out_dtype)
        return self.wo(o.flatten(2))

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        if not isinstance(x, torch.fx.Proxy):
            _check_x(x, self.cfg.hidden_size, "MLA.forward")
        positions = torch.arange(x.size(1), device=x.device) + start_pos
        q_nope, q_pe, latent, k_pe = self._project(x, positions)
        return self._attend(q_nope, q_pe, latent, k_pe, positions, positions, self.absorb, x.dtype)

    def decode(self, x: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
               start_pos: int | torch.Tensor = 0,
               absorb: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attend ``x [B, S_new, H]`` (positions ``start_pos + arange(S_new)``) through a latent cache.

        Writes the new normalized latents and roped key pe into *copies* of ``kv_cache
        [B, S_max, kv_lora]`` / ``pe_cache [B, S_max, rope]``; token ``start_pos + i`` sees cache
        positions ``<= start_pos + i``. The whole ``S_max`` is scored under that mask, so shapes do
        not depend on ``start_pos`` (an int or an int64 scalar tensor). Returns
        ``(out [B, S_new, H], new_kv_cache, new_pe_cache)``.
        """
        if not isinstance(x, torch.fx.Proxy):
            _check_decode(self.cfg, x, kv_cache, pe_cache, start_pos)
        positions = torch.arange(x.size(1), device=x.device) + start_pos
        q_nope, q_pe, latent, k_pe = self._project(x, positions)
        kv_cache = kv_cache.index_copy(1, positions, latent.to(kv_cache.dtype))
        pe_cache = pe_cache.index_copy(1, positions, k_pe.to(pe_cache.dtype))
        k_pos = torch.arange(kv_cache.size(1), device=x.device)
        out = self._attend(q_nope, q_pe, kv_cache, pe_cache, positions, k_pos,
                           self.absorb if absorb is None else absorb, x.dtype)
        return out, kv_cache, pe_cache


@torch.fx.wrap
def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                  v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """The naive MLA attention core: ``q [B, S, H, nope|rope]``, per-head ``k_nope [B, T, H, nope]``,
    ``v [B, T, H, v]``, the head-shared ``k_pe [B, T, rope]``; key t allowed for query s iff
    ``k_pos[t] <= q_pos[s]``. Scores = two dots (nope + rope) in fp32, softmax fp32; ``[B, S, H, v]``
    cast to ``out_dtype``. Wrapped for FX: the frontend maps it to the IR op ``mla_attention``.
    """
    allowed = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # [S, T]
    scores = (torch.einsum("bshd,bthd->bsht", q_nope.float(), k_nope.float())
              + torch.einsum("bshr,btr->bsht", q_pe.float(), k_pe.float()))
    scores = scores * scale
    scores = scores.masked_fill(~allowed.unsqueeze(0).unsqueeze(2), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bsht,bthd->bshd", probs, v.float()).to(out_dtype)


mla_attention.dsr_op = "mla_attention"  # type: ignore[attr-defined]  # the IR op it maps to


@torch.fx.wrap
def mla_attention_absorbed(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                           wkv_b: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
                           out_dtype: torch.dtype) -> torch.Tensor:
    """The absorbed MLA attention core (same function as :func:`mla_attention` of the expanded
    ``wkv_b(latent)``): ``q_nope·W_UK`` per head, scores against the latent ``[B, T, kv_lora]`` plus
    ``k_pe``, output in latent space, then ``·W_UV``; all fp32. ``wkv_b [H·(nope+v), kv_lora]``.
    The frontend maps it to the expanded form; the ``absorb_mla`` pass absorbs it again for decode.
    """
    heads, nope = q_nope.size(2), q_nope.size(3)
    w = wkv_b.float().view(heads, -1, latent.size(-1))
    w_uk, w_uv = w[:, :nope], w[:, nope:]
    allowed = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # [S, T]
    q_lat = torch.einsum("bshd,hdc->bshc", q_nope.float(), w_uk)
    scores = (torch.einsum("bshc,btc->bsht", q_lat, latent.float())
              + torch.einsum("bshr,btr->bsht", q_pe.float(), k_pe.float()))
    scores = scores * scale
    scores = scores.masked_fill(~allowed.unsqueeze(0).unsqueeze(2), float("-inf"))
    probs = scores.softmax(dim=-1)
    o = torch.einsum("bshc,hdc->bshd", torch.einsum("bsht,btc->bshc", probs, latent.float()), w_uv)
    return o.to(out_dtype)


mla_attention_absorbed.dsr_op = "mla_attention_absorbed"  # type: ignore[attr-defined]


def _check_x(x: torch.Tensor, hidden: int, where: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.size(-1) != hidden:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DsrError(f"bad input to {where}: expected x of shape [B, S, {hidden}], got {got}",
                       where=where, hint="pass hidden states [batch, seq, hidden_size]")


def _check_decode(cfg: ModelConfig, x, kv_cache, pe_cache, start_pos) -> None:
    _check_x(x, cfg.hidden_size, "MLA.decode")
    b, s = x.shape[:2]
    for name, cache, width in (("kv_cache", kv_cache, cfg.kv_lora_rank), ("pe_cache", pe_cache, cfg.qk_rope_head_dim)):
        if not isinstance(cache, torch.Tensor) or cache.dim() != 3 or cache.size(0) != b or cache.size(2) != width:
            got = tuple(cache.shape) if isinstance(cache, torch.Tensor) else type(cache).__name__
            raise DsrError(f"bad {name} for MLA.decode: expected [{b}, S_max, {width}], got {got}",
                           where="MLA.decode", hint="make the caches with MLA.init_cache(batch, max_seq)")
    if kv_cache.size(1) != pe_cache.size(1):
        raise DsrError(f"kv_cache and pe_cache disagree on S_max: {kv_cache.size(1)} vs {pe_cache.size(1)}",
                       where="MLA.decode", hint="make the caches with MLA.init_cache(batch, max_seq)")
    if isinstance(start_pos, torch.Tensor):
        if start_pos.numel() != 1 or start_pos.dtype.is_floating_point:
            raise DsrError(f"start_pos must be an int or a one-element integer tensor, got {start_pos!r}",
                           where="MLA.decode", hint="pass the number of tokens already in the cache")
        return
    if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
        raise DsrError(f"start_pos must be a non-negative int, got {start_pos!r}", where="MLA.decode",
                       hint="pass the number of tokens already in the cache")
    if start_pos + s > kv_cache.size(1):
        raise DsrError(f"cache overflow: start_pos {start_pos} + {s} new tokens > cache length {kv_cache.size(1)}",
                       where="MLA.decode", hint="allocate a longer cache with MLA.init_cache")


# ---- decoder layer and model --------------------------------------------------------------------
class DecoderLayer(nn.Module):
    """``x + attn(attn_norm(x))`` then ``+ ffn(ffn_norm(x))``; ffn is a dense MLP before ``first_k_dense_replace``."""

    def __init__(self, cfg: ModelConfig, layer_id: int, absorb: bool = False) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg, absorb=absorb)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn: nn.Module = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), start_pos)
        return x + self.ffn(self.ffn_norm(x))

    def decode(self, x: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
               start_pos: int | torch.Tensor = 0, absorb: bool | None = None):
        a, kv_cache, pe_cache = self.attn.decode(self.attn_norm(x), kv_cache, pe_cache, start_pos, absorb)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), kv_cache, pe_cache


class DeepSeekModel(nn.Module):
    """``embed -> layers -> norm -> head``; ``forward(tokens [B, S])`` returns logits ``[B, S, vocab]``."""

    def __init__(self, cfg: ModelConfig, absorb: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, absorb) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def _check_tokens(self, tokens) -> None:
        if (not isinstance(tokens, torch.Tensor) or tokens.dim() != 2
                or tokens.dtype not in (torch.int64, torch.int32)):
            got = (f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor)
                   else type(tokens).__name__)
            raise DsrError(f"bad input to DeepSeekModel: expected integer tokens [B, S], got {got}",
                           where="DeepSeekModel", hint="pass token ids as an int64 tensor [batch, seq]")

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        if not isinstance(tokens, torch.fx.Proxy):
            self._check_tokens(tokens)
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, start_pos)
        return self.head(self.norm(h))

    def init_cache(self, batch: int, max_seq: int, dtype: torch.dtype | None = None):
        """One ``(kv_cache, pe_cache)`` pair per layer, zeroed, for :meth:`decode`."""
        return [layer.attn.init_cache(batch, max_seq, dtype) for layer in self.layers]

    def decode(self, tokens: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]],
               start_pos: int | torch.Tensor = 0, absorb: bool | None = None):
        """Logits for ``tokens`` at ``start_pos...`` through per-layer caches; returns ``(logits, new_caches)``."""
        if not isinstance(tokens, torch.fx.Proxy):
            self._check_tokens(tokens)
        if len(caches) != len(self.layers):
            raise DsrError(f"expected {len(self.layers)} (kv_cache, pe_cache) pairs, got {len(caches)}",
                           where="DeepSeekModel.decode", hint="make them with DeepSeekModel.init_cache")
        h = self.embed(tokens)
        new = []
        for layer, (kv, pe) in zip(self.layers, caches):
            h, kv, pe = layer.decode(h, kv, pe, start_pos, absorb)
            new.append((kv, pe))
        return self.head(self.norm(h)), new
