"""Derived parameters: graph params computed ONCE at compile time from the module's own tensors.

Where it sits: a pass that needs a parameter in another form (FP8 codes + block scales of a
weight; MoE experts stacked into one `[E, ...]` tensor) adds new `param` inputs to the graph and
declares how to compute them with `ctx.derive(DerivedParam(...))`. Passes never see tensor
values: the front door (`dsr_compiler/params.py`) evaluates every declaration from the module's
tensors after the pipeline has run, so `dsrc ir` stays value-free and the compiled plan never
recomputes a weight per call. The declarations are listed in report.json (`derived_params`).

A rule is a pure torch function `rule(*source_tensors, **attrs) -> tensor | tuple of tensors`,
one result per declared output, registered once in `PARAM_RULES`.
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


def evaluate(d: DerivedParam, sources: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Run one declaration's rule; returns one tensor per output."""
    with torch.no_grad():
        out = PARAM_RULES[d.rule](*[s.detach() for s in sources], **d.attr_dict)
    out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if len(out) != len(d.outputs):
        raise DsrError(f"derived param {', '.join(d.outputs)}: rule {d.rule} gave {len(out)} tensors, "
                       f"declared {len(d.outputs)}", hint="a compiler bug in the pass that declared it")
    return tuple(t.contiguous() for t in out)


# `block` x `block` FP8 weight quantization (DeepSeek `weight_scale_inv` semantics: w ~ q * s).
register_rule("fp8_block_quant", lambda w, block=128, scale_fmt=None: quant_weight_ref(w, block, scale_fmt))

__all__ = ["DerivedParam", "PARAM_RULES", "evaluate", "register_rule"]
