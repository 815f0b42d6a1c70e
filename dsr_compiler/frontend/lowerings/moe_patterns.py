"""Frontend: MoE routers and stacked experts of other libraries (transformers' DeepSeek-V3, Qwen-MoE,
Mixtral, ...) recognised as the zoo's MoE ops.

Where it sits: one of `frontend/lowerings/` (listed in its `__init__`); registers two recognizers
(`registry.recognizes`), which `TraceContext.recognize` runs on every submodule before the trace. A
recognised module is not traced through (its forward has `topk`, `one_hot`, a data-dependent loop over
the hit experts, `index_add_`): it is lowered like the zoo's MoE leaf (`lowerings/moe.py`), so a
third-party MoE block compiles to the same kernels (router, dispatch, grouped GEMMs, combine: no
per-expert loop, no host sync, FP8-able by `quantize_fp8`).

Recognition is by structure, then by behaviour, never by class name:

* **router** (`moe_router`): a module whose submodules hold no tensors, whose tensors are a `weight [E, H]` and
  optionally an `e_score_correction_bias [E]`, with an int `top_k` (or `num_experts_per_tok`) attribute,
  whose forward takes one tensor and returns `(router_logits [T, E], weights [T, k], indices [T, k])`.
  Candidate routings (sigmoid | softmax scores, normalised or not, the module's `n_group` / `topk_group`
  group limit and `routed_scaling_factor`) are each compared with the module run eagerly on a probe:
  random weights and bias put in with `torch.func.functional_call` (the module's own tensors are neither
  read nor changed), 64 random tokens; the selected experts must be the same sets and the weights and
  logits equal to 1e-5. The first candidate that matches is the lowering; the output dtypes are those of
  the module run on 2 tokens in each float dtype it accepts.
* **experts** (`moe_gemm_*`): a module whose submodules hold no tensors (an `act_fn`), whose tensors are exactly
  `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]` (transformers' stacked layout: gate rows first),
  whose forward takes `(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`. The probe runs it
  on small random weights of the same expert count (H=24, I=8), 12 tokens, k=2 distinct experts each,
  against `sum_j w_j * down_e(silu(gate_e(x)) * up_e(x))` to 1e-5. Whichever experts implementation the
  module dispatches to (transformers' `eager`, `batched_mm`, `grouped_mm`) is what the probe runs.

* **block** (`moe_block`): a user's loop over experts (transformers v4's Mixtral shape): a bias-free `gate`
  Linear [E, H], an `experts` ModuleList of E bias-free SwiGLU MLPs named (w1, w3, w2) or (gate_proj,
  up_proj, down_proj), an int `top_k`, no other tensor, forward(x) -> y or (y, router_logits). Probed with
  random weights on 12 tokens against top-k softmax | sigmoid routing, normalised or not; the experts'
  weights become stacked `[E, 2I, H]` / `[E, H, I]` params at compile time (`stack_experts`).

A module that has the structure but fails its probe is traced through as usual (and usually stops at
`topk`); the reason is kept as a trace note and added to that error's hint, e.g. "MoE router
`mlp.gate` (MyRouter) not recognised: no candidate routing matches its output (selected experts
differ)".

Numerics: the router computes its gate GEMM and scores in fp32 whatever the input dtype (the zoo's
`moe_router`); a router that computes its logits in bf16 (Qwen-MoE, Mixtral in bf16) may therefore pick
a different expert where two scores tie within bf16 rounding. The indices come out sorted by
descending score (ties: lower index first), as `torch.topk(sorted=True)` gives them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsr_compiler.ir.types import DType, to_expr

from ..context import TensorRef, TraceContext
from ..registry import ParamDerivation, derive_param, recognizes
from .moe import BLOCK_M, expert_weights

PROBE_TOKENS = 64                     # router probe
PROBE_EXPERT_TOKENS = 12              # experts probe
PROBE_H, PROBE_I = 24, 8              # experts probe widths (H != 2I: a transposed layout cannot pass)
PROBE_RTOL = 1e-5
MAX_PROBE_ELEMENTS = 1 << 24          # router weight [E, H] probed at full size up to this


def _leafish(m: nn.Module) -> bool:
    """No submodule holds a tensor (an activation module such as `act_fn` is fine)."""
    return all(not c._parameters and not c._buffers for _, c in m.named_modules() if c is not m)


def _own_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p for n, p in m._parameters.items() if p is not None}
    out.update((n, b) for n, b in m._buffers.items() if b is not None)
    return out


def _int_attr(m: nn.Module, *names: str) -> int | None:
    for n in names:
        v = m.__dict__.get(n)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _float_attr(m: nn.Module, name: str, default: float) -> float:
    v = m.__dict__.get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def _run(m: nn.Module, tensors: dict[str, torch.Tensor], args: tuple) -> Any:
    with torch.no_grad():
        return torch.func.functional_call(m, tensors, args, strict=True)


def _same_weights(ids_a: torch.Tensor, w_a: torch.Tensor, ids_b: torch.Tensor, w_b: torch.Tensor) -> str | None:
    """None when (ids, weights) pairs agree per token up to the order of the k choices, else why not."""
    sa, ia = ids_a.long().sort(dim=-1)
    sb, ib = ids_b.long().sort(dim=-1)
    if not torch.equal(sa, sb):
        return "selected experts differ"
    wa, wb = w_a.float().gather(-1, ia), w_b.float().gather(-1, ib)
    if not torch.allclose(wa, wb, rtol=PROBE_RTOL, atol=PROBE_RTOL):
        return f"routing weights differ by {(wa - wb).abs().max().item():.2e}"
    return None


# ----------------------------------------------------------------------------- router

@dataclass(frozen=True)
class RouterMatch:
    attrs: dict                                   # moe_router attributes
    has_bias: bool
    logits_dtype: dict                            # input float dtype -> logits dtype
    weights_dtype: dict                           # input float dtype -> routing weights dtype
    index_dtype: torch.dtype


def _router_candidates(m: nn.Module, n_exp: int, k: int, has_bias: bool) -> list[dict]:
    ng = _int_attr(m, "n_group", "num_group", "num_groups") or 1
    kg = _int_attr(m, "topk_group", "num_topk_group") or 1
    scale = _float_attr(m, "routed_scaling_factor", 1.0)
    norm_attr = m.__dict__.get("norm_topk_prob")
    norms = (bool(norm_attr), not norm_attr) if isinstance(norm_attr, bool) else (True, False)
    group = ng > 1 and n_exp % ng == 0 and 1 <= kg <= ng
    out = []
    for scoring in ("sigmoid", "softmax"):
        for norm in norms:
            for gs in (("top2_sum", "max") if group else ("top2_sum",)):
                out.append({"topk": k, "n_group": ng if group else 1, "topk_group": kg if group else 1,
                            "scoring": scoring, "group_score": gs, "route_scale": scale, "norm_topk": norm})
    return out


def _router_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, attrs: dict):
    from dsr_compiler.ir.ops import OPS
    return OPS["moe_router"].reference(x, w, *([bias] if bias is not None else []), **attrs)


def match_router(m: nn.Module) -> RouterMatch | str | None:
    own = _own_tensors(m)
    w = own.get("weight")
    k = _int_attr(m, "top_k", "num_experts_per_tok")
    if w is None or w.dim() != 2 or k is None or not w.dtype.is_floating_point or not _leafish(m):
        return None
    if set(own) - {"weight", "e_score_correction_bias"}:
        return None
    n_exp, h = int(w.shape[0]), int(w.shape[1])
    if not 1 <= k <= n_exp or n_exp * h > MAX_PROBE_ELEMENTS:
        return None if not 1 <= k <= n_exp else f"its weight [{n_exp}, {h}] is too large to probe"
    bias_t = own.get("e_score_correction_bias")
    has_bias = bias_t is not None
    if has_bias and (bias_t.dim() != 1 or int(bias_t.shape[0]) != n_exp):
        return f"e_score_correction_bias has shape {tuple(bias_t.shape)}, expected [{n_exp}]"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_TOKENS, h, generator=g)
    pw = torch.randn(n_exp, h, generator=g) * (2.0 / math.sqrt(h))
    pb = 0.3 * torch.randn(n_exp, generator=g)
    probe = {"weight": pw, **({"e_score_correction_bias": pb} if has_bias else {})}
    try:
        out = _run(m, probe, (x,))
    except Exception as e:                                    # noqa: BLE001  (the module's own code failed)
        return f"its forward failed on a probe ({type(e).__name__}: {e})"
    if not (isinstance(out, tuple) and len(out) == 3 and all(isinstance(t, torch.Tensor) for t in out)):
        return "its forward does not return (router_logits, weights, indices)"
    logits, weights, ids = out
    if tuple(logits.shape) != (PROBE_TOKENS, n_exp) or tuple(weights.shape) != (PROBE_TOKENS, k) \
            or tuple(ids.shape) != (PROBE_TOKENS, k) or ids.dtype.is_floating_point:
        return (f"its outputs have shapes {[tuple(t.shape) for t in out]}, expected "
                f"[({PROBE_TOKENS}, {n_exp}), ({PROBE_TOKENS}, {k}), ({PROBE_TOKENS}, {k})]")
    if not torch.allclose(logits.float(), x @ pw.T, rtol=PROBE_RTOL, atol=PROBE_RTOL):
        return "its router_logits are not x @ weight^T"
    why = "no candidate routing"
    for attrs in _router_candidates(m, n_exp, k, has_bias):
        rw, rids = _router_ref(x, pw, pb if has_bias else None, attrs)
        diff = _same_weights(ids, weights, rids, rw)
        if diff is None:
            logits_dt, weights_dt = {}, {}
            real = {"weight": pw.to(w.dtype), **({"e_score_correction_bias": pb.to(bias_t.dtype)} if has_bias else {})}
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                try:
                    lo, wo, _ = _run(m, real, (x[:2].to(dt),))
                except Exception:                             # noqa: BLE001  (this input dtype is not one it takes)
                    continue
                logits_dt[dt], weights_dt[dt] = lo.dtype, wo.dtype
            return RouterMatch(attrs, has_bias, logits_dt, weights_dt, ids.dtype)
        why = f"no candidate routing matches its output ({diff})"
    return why


def _router_io(m: nn.Module, spec: RouterMatch) -> tuple[list, list]:
    """(hidden [..., H]) -> (router_logits [T, E], weights [T, k], indices [T, k])."""
    n_exp, h = (int(s) for s in m._parameters["weight"].shape)
    return [(True, h)], [(True, n_exp), (True, spec.attrs["topk"]), (False, spec.attrs["topk"])]


def _hidden(cx: TraceContext, m: nn.Module, args: tuple, kwargs: dict, kind: str, h: int) -> tuple[TensorRef, TensorRef]:
    """The one argument of a recognised router / block, float [..., h], and its rows [tokens, h]."""
    name = type(m).__name__
    if len(args) + len(kwargs) != 1:
        raise cx.fail(f"{name} (recognised {kind}) takes one input, got {len(args) + len(kwargs)}")
    x = cx.tensor(args[0] if args else next(iter(kwargs.values())), f"{name}: hidden_states")
    if x.type.rank < 1 or not x.type.dtype.is_float or to_expr(x.type.shape[-1]) != h:
        raise cx.fail(f"{name}: expected float hidden_states [..., {h}], got {x.type}")
    tokens = to_expr(1)
    for d in x.type.shape[:-1]:
        tokens = tokens * d
    return x, cx.reshape(x, (tokens, h))


@recognizes("moe_router", match_router, kind="MoE router", io=_router_io)
def _lower_router(cx: TraceContext, m: nn.Module, spec: RouterMatch, args: tuple, kwargs: dict) -> tuple:
    name = type(m).__name__
    w = m._parameters["weight"]
    x, flat = _hidden(cx, m, args, kwargs, "MoE router", int(w.shape[1]))
    gate_w = cx.param(w)
    ins = [flat, gate_w]
    if spec.has_bias:
        ins.append(cx.param(_own_tensors(m)["e_score_correction_bias"]))
    xt = x.type.dtype.torch
    if xt not in spec.logits_dtype:
        raise cx.fail(f"{name}: the router fails eagerly on {x.type.dtype.value} input with its {w.dtype} weight "
                      f"(it takes {', '.join(str(d).removeprefix('torch.') for d in spec.logits_dtype) or 'none'})",
                      hint="cast the module and its input to one dtype")
    weights, ids = cx.emit_multi("moe_router", ins, spec.attrs)
    logits_dt = cx.dtype(spec.logits_dtype[xt])
    wx = flat if flat.type.dtype is DType.from_torch(torch.promote_types(xt, w.dtype)) \
        else cx.cast(flat, DType.from_torch(torch.promote_types(xt, w.dtype)))
    wg = cx.cast(gate_w, wx.type.dtype)
    logits = cx.cast(cx.emit("linear", [wx, wg]), logits_dt)
    weights = cx.cast(weights, cx.dtype(spec.weights_dtype[xt]))
    return logits, weights, cx.cast(ids, cx.dtype(spec.index_dtype))


# ----------------------------------------------------------------------------- experts

@dataclass(frozen=True)
class ExpertsMatch:
    n_experts: int
    inter: int


def _experts_ref(x, ids, wts, gate_up, down):
    inter = down.shape[2]
    out = torch.zeros(x.shape[0], down.shape[1])
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = gate_up[e] @ x[t]
            out[t] += float(wts[t, j]) * (down[e] @ (F.silu(gu[:inter]) * gu[inter:]))
    return out


def match_experts(m: nn.Module) -> ExpertsMatch | str | None:
    own = _own_tensors(m)
    gu, dn = own.get("gate_up_proj"), own.get("down_proj")
    if gu is None or dn is None or not _leafish(m):
        return None
    if set(own) != {"gate_up_proj", "down_proj"}:
        return f"it has tensors {sorted(own)}, expected exactly gate_up_proj and down_proj (no biases)"
    if gu.dim() != 3 or dn.dim() != 3:
        return f"gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dn.shape)} must be stacked [E, ., .]"
    e, h, i = int(dn.shape[0]), int(dn.shape[1]), int(dn.shape[2])
    if tuple(gu.shape) != (e, 2 * i, h):
        return (f"gate_up_proj {tuple(gu.shape)} / down_proj {tuple(dn.shape)} are not the [E, 2I, H] / [E, H, I] "
                "layout (transposed expert weights are not supported)")
    if gu.dtype != dn.dtype or not gu.dtype.is_floating_point:
        return f"gate_up_proj ({gu.dtype}) and down_proj ({dn.dtype}) must share one float dtype"
    if e < 2:
        return None
    g = torch.Generator().manual_seed(1)
    t, k = PROBE_EXPERT_TOKENS, 2
    x = torch.randn(t, PROBE_H, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    wts = torch.rand(t, k, generator=g) + 0.1
    pgu = torch.randn(e, 2 * PROBE_I, PROBE_H, generator=g) / math.sqrt(PROBE_H)
    pdn = torch.randn(e, PROBE_H, PROBE_I, generator=g) / math.sqrt(PROBE_I)
    try:
        y = _run(m, {"gate_up_proj": pgu, "down_proj": pdn}, (x, ids, wts))
    except Exception as ex:                                   # noqa: BLE001
        return f"its forward failed on a probe ({type(ex).__name__}: {ex})"
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (t, PROBE_H):
        return f"its forward returned {type(y).__name__} {tuple(getattr(y, 'shape', ()))}, expected [{t}, {PROBE_H}]"
    ref = _experts_ref(x, ids, wts, pgu, pdn)
    if not torch.allclose(y.float(), ref, rtol=PROBE_RTOL, atol=PROBE_RTOL):
        return (f"its output is not sum_j w_j * down(silu(gate(x)) * up(x)) (differs by "
                f"{(y.float() - ref).abs().max().item():.2e}: another activation or weight layout)")
    return ExpertsMatch(e, i)


def _uncast_ids(cx: TraceContext, ids: TensorRef) -> TensorRef:
    """The router's i32 ids when `ids` is their cast to i64 (the router's output dtype): the dispatch takes
    either, and the widening copy would be a kernel of its own."""
    n, _ = cx.producer(ids.name)
    if n is not None and n.op == "cast" and len(n.inputs) == 1:
        _, src = cx.producer(n.inputs[0])
        if src is not None and src.type.dtype is DType.i32:
            return TensorRef(src.name, src.type)
    return ids


def _experts_io(m: nn.Module, spec: ExpertsMatch) -> tuple[list, list]:
    """(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]."""
    h = int(m._parameters["down_proj"].shape[1])
    return [(True, h), (False, None), (True, None)], [(True, h)]


@recognizes("moe_experts", match_experts, kind="MoE experts", io=_experts_io)
def _lower_experts(cx: TraceContext, m: nn.Module, spec: ExpertsMatch, args: tuple, kwargs: dict) -> TensorRef:
    name = type(m).__name__
    vals = list(args) + list(kwargs.values())
    if len(vals) != 3:
        raise cx.fail(f"{name} (recognised MoE experts) takes (hidden_states, top_k_index, top_k_weights), "
                      f"got {len(vals)} arguments")
    x, ids, wts = (cx.tensor(v, f"{name}: {n}") for v, n in zip(vals, ("hidden_states", "top_k_index",
                                                                      "top_k_weights")))
    gu, dn = m._parameters["gate_up_proj"], m._parameters["down_proj"]
    h = int(dn.shape[1])
    if x.type.rank != 2 or not x.type.dtype.is_float or to_expr(x.type.shape[1]) != h:
        raise cx.fail(f"{name}: hidden_states must be float [T, {h}], got {x.type}")
    if ids.type.rank != 2 or ids.type.dtype not in (DType.i32, DType.i64) or wts.type.rank != 2 \
            or not wts.type.dtype.is_float:
        raise cx.fail(f"{name}: expected integer top_k_index [T, k] and float top_k_weights [T, k], "
                      f"got {ids.type} and {wts.type}")
    if DType.from_torch(gu.dtype) is not x.type.dtype:
        raise cx.fail(f"{name}: expert weights are {gu.dtype} but hidden_states is {x.type.dtype.value}",
                      hint="cast the module and its input to one dtype")
    k = cx.static_int(ids.type.shape[1], f"{name}: k (top_k_index.shape[1])")
    ids = _uncast_ids(cx, ids)
    bm = BLOCK_M.get(x.type.dtype, 64)
    rows, blocks = cx.emit_multi("moe_dispatch", [ids], {"n_experts": spec.n_experts, "block_m": bm})
    (act,) = cx.emit_multi("moe_gemm_gate_up", [x, rows, blocks, cx.param(gu)], {"topk": k, "block_m": bm})
    (ys,) = cx.emit_multi("moe_gemm_down", [act, rows, blocks, cx.param(dn), cx.cast(wts, DType.f32)],
                          {"block_m": bm})
    return cx.emit("moe_combine", [ys], {"topk": k, "dtype": x.type.dtype})


# ----------------------------------------------------------------------------- a block with a loop over experts

#: expert naming -> (gate, up, down) Linear names of each expert; the derived-param keys of its stacked weights
EXPERT_NAMES = {("w1", "w3", "w2"): ("experts.w13", "experts.w2"),                 # Mixtral v4, the zoo
                ("gate_proj", "up_proj", "down_proj"): ("experts.gate_up_stack", "experts.down_stack")}


@dataclass(frozen=True)
class BlockMatch:
    attrs: dict                                   # moe_router attributes
    names: tuple[str, str, str]                   # (gate, up, down) of each expert
    returns_logits: bool                          # forward -> (y, router_logits)


def _expert_linears(ex: nn.Module) -> tuple[tuple[str, str, str], list[torch.Tensor]] | None:
    for names in EXPERT_NAMES:
        lins = [ex._modules.get(n) for n in names]
        if all(isinstance(li, nn.Linear) and li.bias is None for li in lins):
            return names, [li.weight for li in lins]
    return None


def _block_ref(x: torch.Tensor, gate_w: torch.Tensor, ws: list[list[torch.Tensor]], attrs: dict) -> torch.Tensor:
    rw, rids = _router_ref(x, gate_w, None, attrs)
    out = torch.zeros_like(x)
    for j in range(rids.shape[1]):
        for e, (wg, wu, wd) in enumerate(ws):
            hit = rids[:, j] == e
            if hit.any():
                xe = x[hit]
                out[hit] += rw[hit, j, None] * (F.silu(xe @ wg.T) * (xe @ wu.T)) @ wd.T
    return out


def match_block(m: nn.Module) -> BlockMatch | str | None:
    """A module with a bias-free `gate` Linear [E, H], an `experts` ModuleList of E bias-free SwiGLU experts
    ((w1, w3, w2) or (gate_proj, up_proj, down_proj)), an int top_k, and no other tensor: the shape of a
    user's (or transformers v4's) loop over experts. Probed like the router and experts above."""
    gate, experts = m._modules.get("gate"), m._modules.get("experts")
    k = _int_attr(m, "top_k", "num_experts_per_tok")
    if not isinstance(gate, nn.Linear) or gate.bias is not None or not isinstance(experts, nn.ModuleList) or k is None:
        return None
    n_exp, h = (int(s) for s in gate.weight.shape)
    if len(experts) != n_exp or n_exp < 2 or not 1 <= k <= n_exp:
        return None
    found = [_expert_linears(ex) for ex in experts]
    if any(f is None for f in found) or len({f[0] for f in found}) != 1:     # type: ignore[index]
        return None
    names = found[0][0]                                                     # type: ignore[index]
    ws = [f[1] for f in found]                                              # type: ignore[index]
    shapes = {tuple(tuple(w.shape) for w in row) for row in ws}
    if len(shapes) != 1:
        return "its experts differ in shape"
    (gs, us, ds), = shapes
    inter = gs[0]
    if gs != (inter, h) or us != (inter, h) or ds != (h, inter):
        return f"its experts are not SwiGLU MLPs of the gate's width {h} (got {gs}, {us}, {ds})"
    tensors = {n for n, _ in m.named_parameters()} | {n for n, _ in m.named_buffers()}
    expected = {"gate.weight"} | {f"experts.{e}.{n}.weight" for e in range(n_exp) for n in names}
    if tensors != expected:
        return f"it holds other tensors than its gate and experts: {sorted(tensors - expected)[:4]}"
    if n_exp * (h + 3 * inter * h) > MAX_PROBE_ELEMENTS:
        return f"its {n_exp} experts are too large to probe"
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, PROBE_EXPERT_TOKENS, h, generator=g)
    pg = torch.randn(n_exp, h, generator=g) * (2.0 / math.sqrt(h))
    pws = [[torch.randn(inter, h, generator=g) / math.sqrt(h), torch.randn(inter, h, generator=g) / math.sqrt(h),
            torch.randn(h, inter, generator=g) / math.sqrt(inter)] for _ in range(n_exp)]
    probe = {"gate.weight": pg}
    for e, row in enumerate(pws):
        probe.update({f"experts.{e}.{n}.weight": w for n, w in zip(names, row)})
    try:
        out = _run(m, probe, (x,))
    except Exception as ex:                                   # noqa: BLE001
        return f"its forward failed on a probe ({type(ex).__name__}: {ex})"
    y, logits = (out, None) if isinstance(out, torch.Tensor) else (out[0], out[1]) \
        if isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out) else (None, None)
    if y is None or tuple(y.shape) != tuple(x.shape):
        return "its forward does not return y (or (y, router_logits)) shaped like its input"
    if logits is not None and not torch.allclose(logits.float().reshape(-1, n_exp), x[0] @ pg.T,
                                                 rtol=PROBE_RTOL, atol=PROBE_RTOL):
        return "its second result is not the router logits x @ gate.weight^T"
    why = "no candidate routing"
    for scoring in ("softmax", "sigmoid"):
        for norm in (True, False):
            attrs = {"topk": k, "n_group": 1, "topk_group": 1, "scoring": scoring, "group_score": "top2_sum",
                     "route_scale": 1.0, "norm_topk": norm}
            ref = _block_ref(x[0], pg, pws, attrs)
            if torch.allclose(y[0].float(), ref, rtol=PROBE_RTOL, atol=PROBE_RTOL):
                return BlockMatch(attrs, names, logits is not None)
            why = (f"its output is no top-{k} {scoring} routing over sum_j w_j * down(silu(gate(x)) * up(x)) "
                   f"(differs by {(y[0].float() - ref).abs().max().item():.2e})")
    return why


def _block_io(m: nn.Module, spec: BlockMatch) -> tuple[list, list]:
    n_exp, h = (int(s) for s in m._modules["gate"]._parameters["weight"].shape)
    return [(True, h)], [(True, h)] + ([(True, n_exp)] if spec.returns_logits else [])


def _stacked(names: tuple[str, ...]):
    def type_of(owner: nn.Module) -> tuple[torch.dtype, tuple[int, ...]]:
        ws = expert_weights(owner, names)
        w = ws[0][0]
        return w.dtype, (len(ws), len(names) * w.shape[0], w.shape[1])
    return type_of


def _count(owner: nn.Module) -> int:
    return len(owner._modules["experts"])


derive_param("experts.gate_up_stack", ParamDerivation(
    "stack_experts", ("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight"), _stacked(("gate_proj", "up_proj")),
    _count, "[E, 2I, H] = stack over e of cat(experts.{e}.gate_proj.weight, experts.{e}.up_proj.weight)"))
derive_param("experts.down_stack", ParamDerivation(
    "stack_experts", ("experts.{e}.down_proj.weight",), _stacked(("down_proj",)), _count,
    "[E, H, I] = stack over e of experts.{e}.down_proj.weight"))


@recognizes("moe_block", match_block, kind="MoE block", io=_block_io)
def _lower_block(cx: TraceContext, m: nn.Module, spec: BlockMatch, args: tuple, kwargs: dict) -> Any:
    gate_w = m._modules["gate"]._parameters["weight"]
    n_exp, h = (int(s) for s in gate_w.shape)
    x, flat = _hidden(cx, m, args, kwargs, "MoE block", h)
    if DType.from_torch(gate_w.dtype) is not x.type.dtype:
        raise cx.fail(f"{type(m).__name__}: its weights are {gate_w.dtype} but hidden_states is {x.type.dtype.value}",
                      hint="cast the module and its input to one dtype")
    gw = cx.param(gate_w)
    weights, ids = cx.emit_multi("moe_router", [flat, gw], spec.attrs)
    k, bm = spec.attrs["topk"], BLOCK_M.get(x.type.dtype, 64)
    gate_up_key, down_key = EXPERT_NAMES[spec.names]
    rows, blocks = cx.emit_multi("moe_dispatch", [ids], {"n_experts": n_exp, "block_m": bm})
    (act,) = cx.emit_multi("moe_gemm_gate_up", [flat, rows, blocks, cx.derived_param(m, gate_up_key)],
                           {"topk": k, "block_m": bm})
    (ys,) = cx.emit_multi("moe_gemm_down", [act, rows, blocks, cx.derived_param(m, down_key), weights],
                          {"block_m": bm})
    y = cx.reshape(cx.emit("moe_combine", [ys], {"topk": k, "dtype": x.type.dtype}), x.type.shape)
    if not spec.returns_logits:
        return y
    return y, cx.emit("linear", [flat, gw])
