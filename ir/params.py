"""Derived parameters: graph params computed ONCE at compile time from the module's own tensors.

Where it sits: the one mechanism for params that are not a module tensor as it is. Two kinds of
declarations, one rule table:
- the frontend's (a leaf lowering's `cx.derived_param`, e.g. the MoE's experts stacked into one
  `[E, 2I, H]` tensor: rule `stack_experts`, declared by `frontend.registry.derive_param`);
- a pass's (`ctx.derive`, e.g. FP8 codes + block scales of a weight: rule `fp8_block_quant`).
Passes never see tensor values: the front door (`dsr_compiler/params.py`) evaluates every
declaration from the module's tensors after the pipeline has run, so `dsrc ir` stays value-free and
the compiled plan never recomputes a weight per call. The declarations are listed in report.json
(`derived_params`).

A rule is a pure torch function `rule(*sources, **attrs) -> tensor | tuple of tensors`, one result
per declared output, registered once in `PARAM_RULES`. A source is a tensor name, or a pattern
with `{e}` that stands for the list of tensors `{e}` = 0 .. attrs["count"] - 1 (the rule then gets
that list): `experts.{e}.w1.weight` names every expert's weight without listing 65,536 names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from .errors import DsrError
from .graph import canon_attr
from .ops.fp8 import quant_weight_ref


@dataclass(frozen=True)
class DerivedParam:
    """`outputs` (new graph params) = PARAM_RULES[rule](*sources, **attrs); sources are module tensors."""

    outputs: tuple[str, ...]
    rule: str
    sources: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...] = ()
    origin: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "sources", tuple(self.sources))
        attrs = self.attrs.items() if isinstance(self.attrs, Mapping) else self.attrs
        object.__setattr__(self, "attrs", tuple((str(k), canon_attr(v)) for k, v in attrs))
        if self.rule not in PARAM_RULES:
            raise ValueError(f"derived param {self.outputs}: unknown rule {self.rule!r} (known: {sorted(PARAM_RULES)})")

    @property
    def attr_dict(self) -> dict[str, Any]:
        return dict(self.attrs)

    def expanded_sources(self) -> tuple[str | tuple[str, ...], ...]:
        """The sources with each `{e}` pattern expanded to its tuple of names (attrs["count"] long)."""
        out: list[str | tuple[str, ...]] = []
        for s in self.sources:
            if "{e}" not in s:
                out.append(s)
                continue
            count = self.attr_dict.get("count")
            if not isinstance(count, int) or count < 1:
                raise DsrError(f"derived param {', '.join(self.outputs)}: source pattern {s!r} needs an int attr "
                               f"'count' >= 1, got {count!r}", hint="a compiler bug in what declared it")
            out.append(tuple(s.replace("{e}", str(e)) for e in range(count)))
        return tuple(out)

    def source_names(self) -> list[str]:
        """Every module tensor name the declaration reads, patterns expanded, in order."""
        return [n for s in self.expanded_sources() for n in ((s,) if isinstance(s, str) else s)]

    def __str__(self) -> str:
        lhs = ", ".join("%" + o for o in self.outputs)
        args = [f"%{s}" for s in self.sources] + [f"{k}={v!r}" for k, v in self.attrs]
        return f"{lhs} = {self.rule}({', '.join(args)})" + (f"  # {self.origin}" if self.origin else "")

    def to_json(self) -> dict[str, Any]:
        return {"outputs": list(self.outputs), "rule": self.rule, "sources": list(self.sources),
                "attrs": {k: (v.value if hasattr(v, "value") else v) for k, v in self.attrs}, "origin": self.origin}


PARAM_RULES: dict[str, Callable[..., Any]] = {}


def register_rule(name: str, fn: Callable[..., Any]) -> None:
    if name in PARAM_RULES:
        raise ValueError(f"derived-param rule {name!r} registered twice")
    PARAM_RULES[name] = fn


def evaluate(d: DerivedParam, sources: Sequence[torch.Tensor | Sequence[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Run one declaration's rule on its sources (one tensor per plain source, a list per `{e}`
    pattern, as `expanded_sources` orders them); returns one tensor per output."""
    args = [s.detach() if isinstance(s, torch.Tensor) else [t.detach() for t in s] for s in sources]
    attrs = {k: v for k, v in d.attr_dict.items() if k != "count"}
    with torch.no_grad():
        out = PARAM_RULES[d.rule](*args, **attrs)
    out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if len(out) != len(d.outputs):
        raise DsrError(f"derived param {', '.join(d.outputs)}: rule {d.rule} gave {len(out)} tensors, "
                       f"declared {len(d.outputs)}", hint="a compiler bug in the pass that declared it")
    return tuple(t.contiguous() for t in out)


def stack_experts(*per_source: Sequence[torch.Tensor]) -> torch.Tensor:
    """[E, ...] = stack over e of cat(source_0[e], source_1[e], ...) along dim 0 (the MoE's w13 is
    stack_e(cat(w1_e, w3_e)), its w2 stack_e(w2_e))."""
    n = len(per_source[0])
    if any(len(s) != n for s in per_source):
        raise DsrError(f"stack_experts: sources of {[len(s) for s in per_source]} tensors; every source lists each expert",
                       hint="a compiler bug in the MoE lowering")
    # = stack_e(cat_i(source_i[e])) written as cat_i(stack_e(source_i[e])) along dim 1: two stacks and one
    # cat instead of one cat per expert (65,536 experts: seconds instead of tens of seconds)
    stacked = [torch.stack(list(s)) for s in per_source]
    return stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=1)


# `block` x `block` FP8 weight quantization (DeepSeek `weight_scale_inv` semantics: w ~ q * s).
register_rule("fp8_block_quant", lambda w, block=128, scale_fmt=None: quant_weight_ref(w, block, scale_fmt))
# the same, of a weight stored [K, N] (a matmul's right operand, GPT-2's Conv1D): the codes of its transpose
register_rule("fp8_block_quant_t",
              lambda w, block=128, scale_fmt=None: quant_weight_ref(w.t().contiguous(), block, scale_fmt))
register_rule("stack_experts", stack_experts)
# the experts [start, stop) of a stacked [E, ...] tensor: one expert-parallel rank's share (passes/expert_parallel.py)
register_rule("expert_slice", lambda w, start, stop: w[start:stop])

__all__ = ["DerivedParam", "PARAM_RULES", "evaluate", "register_rule", "stack_experts"]
