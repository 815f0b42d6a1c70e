"""Binding a compiled graph's params to tensors, derived params included (the front door's side of
ir/params.py).

`resolve_params(module, graph, derived)` returns one tensor per `graph.params`, in graph order:
plain params come from the module (the frontend's `param_tensors`); every derived param, the
frontend's (stacked MoE expert weights, `frontend.derived_declarations`) and the passes' (`ctx.derive`,
e.g. FP8 weight codes + block scales), is one `ir.params.DerivedParam` evaluated ONCE here by its
rule from its sources, never per call.

FP8 checkpoints: `load_state_dict_safetensors(..., keep_fp8=True)` leaves the checkpoint's own
codes and `weight_scale_inv` on the module next to the dequantized weight (non-persistent buffers
`<module>.weight_fp8` and `<module>.weight_scale_inv`). An `fp8_block_quant` declaration whose
source is `<module>.weight` then takes those tensors as they are (bit-exact to the checkpoint)
instead of re-quantizing the dequantized weight; its block must be the checkpoint's (128).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dsr_compiler.errors import DsrError
from dsr_compiler.ir import Graph
from dsr_compiler.ir.params import DerivedParam, evaluate

CHECKPOINT_CODES = "weight_fp8"
CHECKPOINT_SCALES = "weight_scale_inv"


def _module_tensors(module: nn.Module, names: Sequence[str], graph: Graph) -> list[torch.Tensor]:
    from dsr_compiler.frontend import param_tensors
    return param_tensors(module, graph.replace(params=tuple(names))) if names else []


def checkpoint_fp8(module: nn.Module, source: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The FP8 checkpoint codes + scales kept for weight `source` (`a.b.weight`), or None."""
    if not source.endswith(".weight") and source != "weight":
        return None
    owner_path = source[: -len("weight")].rstrip(".")
    try:
        owner = module.get_submodule(owner_path) if owner_path else module
    except AttributeError:
        return None
    q = getattr(owner, CHECKPOINT_CODES, None)
    s = getattr(owner, CHECKPOINT_SCALES, None)
    if isinstance(q, torch.Tensor) and isinstance(s, torch.Tensor):
        return q, s
    return None


def derive_one(module: nn.Module, d: DerivedParam, graph: Graph,
               sources: Sequence[torch.Tensor] | None = None) -> tuple[tuple[torch.Tensor, ...], str]:
    """(tensors for d.outputs, where they came from: "checkpoint" or "compile-time"); `sources`,
    when the caller has them already, are the module tensors of `d.sources` in order."""
    if d.rule == "fp8_block_quant" and len(d.sources) == 1:
        kept = checkpoint_fp8(module, d.sources[0])
        if kept is not None:
            q, s = kept
            block = d.attr_dict.get("block", 128)
            want = (-(-q.shape[-2] // block), -(-q.shape[-1] // block))
            if q.dtype != torch.float8_e4m3fn or tuple(s.shape[-2:]) != want:
                raise DsrError(f"FP8 checkpoint tensors of {d.sources[0]} do not fit the fp8 policy: codes "
                               f"{q.dtype} {tuple(q.shape)}, scales {tuple(s.shape)}, policy block {block}",
                               f"derived params {', '.join(d.outputs)}",
                               "DeepSeek checkpoints use 128x128 blocks: compile with the default block=128")
            return (q.contiguous(), s.float().contiguous()), "checkpoint"
    if sources is None:
        sources = _module_tensors(module, d.sources, graph)
    return evaluate(d, sources), "compile-time"


def resolve_params(module: nn.Module, graph: Graph, derived: Sequence[DerivedParam] = ()
                   ) -> tuple[list[torch.Tensor], dict[str, str]]:
    """(one tensor per graph.params in order, {derived output name: "checkpoint" | "compile-time"}).

    `derived` lists every declaration in dependency order: the frontend's first (e.g. the stacked
    expert weights, `frontend.derived_declarations`), then the passes' (`ctx.derived`, e.g. FP8
    codes of those stacked weights). Each declaration a graph param needs, directly or as a source
    of another, is evaluated once; every plain module tensor is fetched once."""
    by_output = {o: d for d in derived for o in d.outputs}
    need = set(graph.params)
    used: list[DerivedParam] = []
    for d in reversed(list(derived)):                 # a declaration's sources come before it
        if any(o in need for o in d.outputs) and all(d is not u for u in used):
            used.append(d)
            need.update(d.source_names())
    used.reverse()
    plain = [p for p in dict.fromkeys([*graph.params, *(s for d in used for s in d.source_names())])
             if p not in by_output]
    found = dict(zip(plain, _module_tensors(module, plain, graph)))
    origin: dict[str, str] = {}
    for d in used:
        srcs = [found[s] if isinstance(s, str) else [found[n] for n in s] for s in d.expanded_sources()]
        tensors, where = derive_one(module, d, graph, srcs)
        for o, t in zip(d.outputs, tensors):
            found[o] = t
            origin[o] = where
    types = {v.name: v.type for v in graph.param_inputs}
    for p in graph.params:
        t, want = found[p], types[p]
        if t.dtype != want.dtype.torch or (want.is_static() and tuple(t.shape) != tuple(int(x) for x in want.shape)):
            raise DsrError(f"param %{p}: got {t.dtype} {tuple(t.shape)}, the graph wants {want}",
                           f"graph {graph.name}", "a compiler bug in the pass that declared it (or a stale module)")
    return [found[p] for p in graph.params], origin


__all__ = ["CHECKPOINT_CODES", "CHECKPOINT_SCALES", "checkpoint_fp8", "derive_one", "resolve_params"]
