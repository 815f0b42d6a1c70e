"""Frontend: the zoo's routed MoE (`models.deepseek.MoE`, `dsr_op = "moe"`) as five IR ops.

Where it sits: one of `frontend/lowerings/` (listed in its `__init__`), registers the leaf lowering `moe`
and two derived parameters. The lowering never loops over experts: it emits

    moe_router -> moe_dispatch -> moe_gemm_gate_up -> moe_gemm_down -> moe_combine

(see `ir/ops/moe.py` for their layout contract) plus the shared expert as ordinary `linear`/`silu`/
`mul` ops (the gemm family fuses them like any SwiGLU MLP), so the IR's size does not depend on
the number of experts and every shape is a sympy expression of the token count.

Derived parameters (rule `stack_experts` of ir/params.py, computed from the module's per-expert
weights once per compile with the passes' derived params; a later change to the module's weights
needs a new compile):

    <moe path>.experts.w13 : [E, 2I, H] = stack_e(cat(experts.{e}.w1.weight, experts.{e}.w3.weight))
    <moe path>.experts.w2  : [E, H, I]  = stack_e(experts.{e}.w2.weight)

The grouped GEMM nodes carry the per-expert names in their origin (`ffn.experts.{0..255}.w1+w3`).
"""
from __future__ import annotations

from typing import Any

import sympy
import torch
from torch import nn

from dsr_compiler.ir.types import DType, to_expr

from ..context import TensorRef, TraceContext, module_attr
from ..registry import ParamDerivation, derive_param, lowers_leaf

#: rows per grouped-GEMM block (= the padding unit of the dispatch layout), by activation dtype:
#: bf16/f16 use 64-row wgmma tiles; fp32 (exact FMA dots) 16, the smallest tl.dot M.
BLOCK_M = {DType.f32: 16, DType.bf16: 64, DType.f16: 64}


def _optional(obj: nn.Module, name: str) -> Any:
    """A submodule, parameter or buffer, or None. Never `hasattr`: under FX, touching a buffer
    through `nn.Module.__getattr__` records a node (and re-enters the tracer)."""
    try:
        return module_attr(obj, name)
    except AttributeError:
        return None


def _experts(owner: nn.Module) -> list[nn.Module]:
    experts = module_attr(owner, "experts")
    if not isinstance(experts, nn.ModuleList) or len(experts) == 0:
        raise TypeError(f"{type(owner).__name__}.experts must be a non-empty nn.ModuleList")
    return list(experts)


def expert_weights(owner: nn.Module, names: tuple[str, ...]) -> list[list[torch.Tensor]]:
    """[[w of each name] for each expert]; every expert must be a bias-free SwiGLU MLP of one shape."""
    out = []
    for e, ex in enumerate(_experts(owner)):
        row = []
        for n in names:
            lin = _optional(ex, n)
            if not isinstance(lin, nn.Linear) or module_attr(lin, "bias") is not None:
                raise TypeError(f"experts.{e}.{n} must be a bias-free nn.Linear (a SwiGLU MLP expert)")
            row.append(module_attr(lin, "weight"))
        out.append(row)
    first = [(w.shape, w.dtype) for w in out[0]]
    for e, row in enumerate(out):
        if [(w.shape, w.dtype) for w in row] != first:
            raise TypeError(f"experts.{e} has weights {[(tuple(w.shape), w.dtype) for w in row]}, expert 0 has "
                            f"{[(tuple(s), d) for s, d in first]}: experts must share one shape and dtype")
    return out


def _w13_type(owner: nn.Module) -> tuple[torch.dtype, tuple[int, ...]]:
    ws = expert_weights(owner, ("w1", "w3"))
    w1 = ws[0][0]
    return w1.dtype, (len(ws), 2 * w1.shape[0], w1.shape[1])


def _w2_type(owner: nn.Module) -> tuple[torch.dtype, tuple[int, ...]]:
    ws = expert_weights(owner, ("w2",))
    return ws[0][0].dtype, (len(ws),) + tuple(ws[0][0].shape)


def _n_experts(owner: nn.Module) -> int:
    return len(_experts(owner))


# rule `stack_experts` of ir/params.py; the lowering checks the experts' shapes (`_w13_type`, `_w2_type`)
derive_param("experts.w13", ParamDerivation(
    "stack_experts", ("experts.{e}.w1.weight", "experts.{e}.w3.weight"), _w13_type, _n_experts,
    "[E, 2I, H] = stack over e of cat(experts.{e}.w1.weight, experts.{e}.w3.weight)"))
derive_param("experts.w2", ParamDerivation(
    "stack_experts", ("experts.{e}.w2.weight",), _w2_type, _n_experts,
    "[E, H, I] = stack over e of experts.{e}.w2.weight"))


def _linear(cx: TraceContext, x: TensorRef, lin: nn.Module, origin: str) -> TensorRef:
    if not isinstance(lin, nn.Linear):
        raise cx.fail(f"{origin} must be an nn.Linear, got {type(lin).__name__}")
    ins = [x, cx.param(module_attr(lin, "weight"))]
    bias = module_attr(lin, "bias")
    if bias is not None:
        ins.append(cx.param(bias))
    return cx.emit_multi("linear", ins, origin=origin)[0]


def _shared_expert(cx: TraceContext, x: TensorRef, shared: nn.Module, path: str) -> TensorRef:
    """w2(silu(w1(x)) * w3(x)) of the shared MLP, as plain ops (fused by the gemm family)."""
    where = f"{path}.shared_experts" if path else "shared_experts"
    if any(_optional(shared, n) is None for n in ("w1", "w2", "w3")):
        raise cx.fail(f"{where} must be a SwiGLU MLP with w1, w2, w3 (got {type(shared).__name__})")
    h1 = _linear(cx, x, module_attr(shared, "w1"), f"{where}.w1")
    h3 = _linear(cx, x, module_attr(shared, "w3"), f"{where}.w3")
    act = cx.emit_multi("silu", [h1], origin=where)[0]
    act = cx.emit_multi("mul", [act, h3], origin=where)[0]
    return _linear(cx, act, module_attr(shared, "w2"), f"{where}.w2")


@lowers_leaf("moe")
def _leaf_moe(cx: TraceContext, module: nn.Module, args: tuple, kwargs: dict) -> TensorRef:
    name = type(module).__name__
    if len(args) + len(kwargs) != 1:
        raise cx.fail(f"{name} (moe leaf) takes one input x [..., H], got {len(args) + len(kwargs)}")
    x = cx.tensor(args[0] if args else next(iter(kwargs.values())), f"{name}: x")
    cfg = getattr(module, "cfg", None)
    gate = _optional(module, "gate")
    if cfg is None or gate is None:
        raise cx.fail(f"{name} (moe leaf) needs `cfg` (ModelConfig) and `gate` attributes like models.deepseek.MoE")
    path = cx._origin                                   # the MoE's module path ("" at the root)
    h = cfg.hidden_size
    if x.type.rank < 1 or not x.type.dtype.is_float or to_expr(x.type.shape[-1]) != h:
        raise cx.fail(f"{name}: expected float x [..., {h}], got {x.type}")
    try:
        n_exp = len(_experts(module))
        w13_dtype, _ = _w13_type(module)
        _w2_type(module)
    except TypeError as e:
        raise cx.fail(f"{name}: {e}", hint="experts must be models.layers.MLP (w1, w2, w3 without bias)") from None
    if w13_dtype != x.type.dtype.torch:
        raise cx.fail(f"{name}: experts are {w13_dtype} but x is {x.type.dtype.value}",
                      hint="cast the module and its input to one dtype")
    tokens = sympy.Integer(1)
    for d in x.type.shape[:-1]:
        tokens = tokens * d
    flat = cx.reshape(x, (tokens, h))
    gate_w = cx.param(module_attr(gate, "weight"))
    bias = _optional(gate, "e_score_correction_bias")
    grouped = bool(cfg.uses_group_limit)
    k = int(cfg.num_experts_per_tok)
    attrs: dict[str, Any] = {
        "topk": k, "n_group": int(cfg.n_group) if grouped else 1,
        "topk_group": int(cfg.topk_group) if grouped else 1, "scoring": cfg.scoring_func,
        # the zoo's Gate: a group's score is the sum of its top-2 biased scores when a bias exists, else its max
        "group_score": "top2_sum" if bias is not None else "max",
        "route_scale": float(cfg.routed_scaling_factor), "norm_topk": bool(cfg.norm_topk_prob)}
    router_in = [flat, gate_w] + ([cx.param(bias)] if bias is not None else [])
    gate_path = f"{path}.gate" if path else "gate"
    weights, ids = cx.emit_multi("moe_router", router_in, attrs, origin=gate_path)
    bm = BLOCK_M.get(x.type.dtype, 64)
    rows, blocks = cx.emit_multi("moe_dispatch", [ids], {"n_experts": n_exp, "block_m": bm})
    pre = f"{path}.experts" if path else "experts"
    w13 = cx.derived_param(module, "experts.w13")
    w2 = cx.derived_param(module, "experts.w2")
    span = f"{{0..{n_exp - 1}}}"
    (act,) = cx.emit_multi("moe_gemm_gate_up", [flat, rows, blocks, w13], {"topk": k, "block_m": bm},
                           origin=f"{pre}.{span}.w1+w3")
    (ys,) = cx.emit_multi("moe_gemm_down", [act, rows, blocks, w2, weights], {"block_m": bm},
                          origin=f"{pre}.{span}.w2")
    combine_in = [ys]
    shared = _optional(module, "shared_experts")
    if shared is not None:
        combine_in.append(_shared_expert(cx, flat, shared, path))
    (y,) = cx.emit_multi("moe_combine", combine_in, {"topk": k, "dtype": x.type.dtype})
    return cx.reshape(y, x.type.shape)
