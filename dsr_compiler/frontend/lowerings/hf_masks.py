"""Frontend: transformers' `create_causal_mask` (masking_utils) traced by what it means, not by its code.

Where it sits: one of `frontend/lowerings/` (listed in its `__init__`); registers a trace-time replacement
(`registry.replaces`) that the tracer puts in place of `transformers.masking_utils.create_causal_mask`
wherever a traced forward's globals name it (and takes out after the trace). Its own code detects
packed sequences with `cumsum` and a data-dependent check and builds masks with advanced indexing,
none of which a trace can take; its result depends on values only through `position_ids`.

The replacement takes the case it can prove and refuses the others:

* no `attention_mask`, no cache (`use_cache=False`), no extra mask functions, and `position_ids` that the
  trace itself built as `arange(T)` (the model's default, so no packed sequences): a plain causal mask.
  With the `sdpa` attention implementation that is `None` (SDPA then runs `is_causal`, as transformers
  does when it can skip the mask); with `eager` it is the additive `[1, 1, T, T]` mask (0 where key <=
  query, the dtype's minimum elsewhere) built from `arange`;
* anything else (a padding mask, a cache, position ids passed in, flex or flash attention) is a
  TraceError naming what to change.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx

from ..context import TensorRef, TraceContext, same
from ..registry import replaces

_PASS_THROUGH = ("reshape", "expand", "cast")


def _is_arange(cx: TraceContext, v: TensorRef, n: sympy.Expr) -> bool:
    """`v` is arange(n) (through reshapes/expands/casts and + 0) as the trace built it."""
    name = v.name
    for _ in range(64):
        node, _ = cx.producer(name)
        if node is None:
            return False
        if node.op == "iota":
            return same(node.attr("n"), n)
        if node.op in _PASS_THROUGH:
            name = node.inputs[0]
            continue
        if node.op == "add" and len(node.inputs) == 2:
            zero = [i for i in node.inputs if (c := cx.producer(i)[0]) is not None and c.op == "const"
                    and c.attr("value") == 0]
            if zero:
                name = node.inputs[1] if zero[0] == node.inputs[0] else node.inputs[0]
                continue
        return False
    return False


def _ref(cx: TraceContext, v: Any) -> Any:
    return cx.env.get(v.node) if isinstance(v, fx.Proxy) else v


@replaces("transformers.masking_utils", "create_causal_mask")
def causal_mask_replacement(cx: TraceContext, original: Callable) -> Callable:
    sig = inspect.signature(original)

    def create_causal_mask(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise cx.fail(f"create_causal_mask: {e}") from None
        bound.apply_defaults()
        a = dict(bound.arguments)
        a.update(a.pop("kwargs", {}) or {})
        embeds = _ref(cx, a.get("inputs_embeds"))
        if not isinstance(embeds, TensorRef):
            raise cx.fail("create_causal_mask: inputs_embeds is not a traced tensor")
        why = []
        if a.get("attention_mask") is not None:
            why.append("an attention_mask is passed")
        if a.get("cache", a.get("past_key_values")) is not None:
            why.append("a cache is passed (call with use_cache=False)")
        for k in ("or_mask_function", "and_mask_function", "block_sequence_ids"):
            if a.get(k) is not None:
                why.append(f"{k} is set")
        q = embeds.type.shape[1]
        pos = _ref(cx, a.get("position_ids"))
        if pos is not None and not (isinstance(pos, TensorRef) and _is_arange(cx, pos, q)):
            why.append("position_ids are not the model's own arange (they may pack several sequences)")
        impl = getattr(a.get("config"), "_attn_implementation", None)
        if impl not in ("sdpa", "eager"):
            why.append(f"the attention implementation is {impl!r}")
        if why:
            raise cx.fail("transformers' create_causal_mask is compiled only for a plain causal mask: "
                          + "; ".join(why),
                          hint="call the model with input_ids only, use_cache=False, and attn_implementation "
                               "'sdpa' or 'eager'")
        if impl == "sdpa":
            return None
        x = a["inputs_embeds"]
        i = torch.arange(x.shape[1])
        masked = (i.unsqueeze(0) > i.unsqueeze(1)).to(x.dtype) * torch.finfo(embeds.type.dtype.torch).min
        return masked.unsqueeze(0).unsqueeze(0)
    return create_causal_mask
