"""The op table's definitions: `OpDef`, `register`, the op kinds, and the helpers the op modules share.

Where it sits: the bottom of `ir/ops/` (it imports `ir/types.py`, and `ir/graph.py` for type hints); `core.py`, `fp8.py`,
`moe.py`, `mla.py` and `loss.py` declare ops with `register(OpDef(...))`, and `ir/ops/__init__.py`
imports them in one listed order. Every fact about an op lives on its one `OpDef`: type rule,
eager reference, attributes, kind (which fusion families may take it), and the facts passes and
codegen ask about (`commutative`, `flops`, `index_map`, `last_dim_reduction`, `vjp`). The query
helpers at the end answer from the table, so no pass keeps its own list of op names.

`dims_equal`, the IR's one "same dims" test, is defined in `ir/types.py` (broadcasting needs it
below the op table) and re-exported here with the other helpers the op modules use.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from ..types import DType, TensorType, dims_equal

if TYPE_CHECKING:
    from ..graph import Node

POINTWISE = "pointwise"
REDUCTION = "reduction"
GEMM = "gemm"
ATTENTION = "attention"
LAYOUT = "layout"
SOURCE = "source"
CALL = "call"
COLLECTIVE = "collective"      # no kernel family takes it: the runtime runs it between kernels (all_to_all)


class TypeRuleError(Exception):
    """A type rule rejected its inputs; the verifier wraps it with the IR window."""


@dataclass(frozen=True)
class AttrSpec:
    types: tuple[type, ...]
    required: bool = True
    default: Any = None
    doc: str = ""


class GradBuilder(Protocol):
    """What a derivative rule (`OpDef.vjp`) may use of the `differentiate` pass (ir/passes/autodiff.py)."""

    types: dict[str, TensorType]         # value name -> type, forward and emitted gradient values
    prod: dict[str, "Node"]              # value name -> the forward node that makes it
    needed: set[str]                     # forward values whose gradient reaches a grad_wrt input

    def emit(self, op: str, ins: Sequence[str], attrs: dict | None = None, hint: str = "grad") -> str: ...

    def const(self, value: float, dtype: DType) -> str: ...

    def to_type(self, grad: str, target: TensorType, hint: str) -> str: ...


# (builder, forward node, one gradient per output or None) -> (input, gradient contribution) pairs;
# a contribution has the input's type (`fit` sums broadcast dims and casts).
Vjp = Callable[[GradBuilder, "Node", Sequence["str | None"]], list[tuple[str, "str | None"]]]


@dataclass(frozen=True)
class OpDef:
    name: str
    kind: str
    arity: tuple[int, int]                       # (min inputs, max inputs)
    type_rule: Callable[[Sequence[TensorType], Mapping[str, Any]], tuple[TensorType, ...]]
    reference: Callable[..., Any]
    attrs: Mapping[str, AttrSpec] = field(default_factory=dict)
    doc: str = ""
    n_outputs: int = 1
    commutative: bool = False                    # f(a, b) == f(b, a): cse keys sort the inputs
    flops: int = 1                               # per output element when computed pointwise in a kernel
    index_map: bool = False                      # output element = one input element (a view a kernel can index)
    last_dim_reduction: bool = False             # the fusion pass's `reduction` family can take it over dim -1
    vjp: Vjp | None = None                       # derivative rule of the `differentiate` pass (None: none)

    def infer(self, in_types: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[TensorType, ...]:
        lo, hi = self.arity
        if not lo <= len(in_types) <= hi:
            want = str(lo) if lo == hi else f"{lo}..{hi}"
            raise TypeRuleError(f"{self.name} takes {want} inputs, got {len(in_types)}")
        for k in attrs:
            if k not in self.attrs:
                raise TypeRuleError(f"{self.name} has no attribute {k!r} (known: {', '.join(self.attrs) or 'none'})")
        full = self.with_defaults(attrs)
        for k, spec in self.attrs.items():
            if k not in full:
                raise TypeRuleError(f"{self.name} needs attribute {k!r}")
            v = full[k]
            if not (v is None and not spec.required) and not isinstance(v, spec.types):
                raise TypeRuleError(f"{self.name}: attribute {k}={v!r} should be {'/'.join(t.__name__ for t in spec.types)}")
        return self.type_rule(in_types, full)

    def with_defaults(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        full = {k: s.default for k, s in self.attrs.items() if not s.required}
        full.update(attrs)
        return full


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} registered twice")
    OPS[op.name] = op
    return op


def get_op(name: str) -> OpDef:
    return OPS[name]


# ----------------------------------------------------------------------------- shared helpers

def norm_dim(dim: int, rank: int, op: str) -> int:
    """`dim` (negative counts from the end) as an index into a rank-`rank` shape; TypeRuleError if out of range."""
    if not -rank <= dim < max(rank, 1):
        raise TypeRuleError(f"{op}: dim {dim} out of range for rank {rank}")
    return dim % rank if rank else 0


def fit(b: GradBuilder, n: "Node", i: int, grad: str) -> tuple[str, str]:
    """The pair (input i of n, grad reduced over broadcast dims and cast to that input's type)."""
    inp = n.inputs[i]
    return inp, b.to_type(grad, b.types[inp], f"{inp}.grad")


def single_output_vjp(rule: Callable[[GradBuilder, "Node", str, str], list[tuple[str, "str | None"]]]) -> Vjp:
    """A `vjp` from a rule of a one-output op, called as rule(builder, node, g, zero) with g the output's
    gradient and zero a 0-d constant of g's dtype; an output without gradient gives no contributions."""
    def vjp(b: GradBuilder, n: "Node", gs: Sequence[str | None]) -> list[tuple[str, str | None]]:
        g = gs[0]
        if g is None:
            return []
        zero = b.const(0.0, b.types[g].dtype)
        return rule(b, n, g, zero)
    vjp.__name__ = vjp.__qualname__ = rule.__name__
    vjp.__doc__ = rule.__doc__
    return vjp


# ----------------------------------------------------------------------------- queries

def is_commutative(op: str) -> bool:
    return OPS[op].commutative if op in OPS else False


def flops_per_element(op: str) -> int:
    """FLOPs per output element of a pointwise op inside a kernel (codegen's cost model)."""
    return OPS[op].flops


def index_map_ops() -> tuple[str, ...]:
    """Ops whose output element is one input element at a computed index (permute, expand, slice, reshape)."""
    return tuple(n for n, op in OPS.items() if op.index_map)


def last_dim_reductions() -> tuple[str, ...]:
    """Reductions the `reduction` kernel family takes over the last dim."""
    return tuple(n for n, op in OPS.items() if op.last_dim_reduction)


def differentiable_ops() -> tuple[str, ...]:
    """Ops with a derivative rule (`vjp`), in table order."""
    return tuple(n for n, op in OPS.items() if op.vjp is not None)


__all__ = ["ATTENTION", "CALL", "GEMM", "LAYOUT", "OPS", "POINTWISE", "REDUCTION", "SOURCE", "AttrSpec",
           "GradBuilder", "OpDef", "TypeRuleError", "Vjp", "differentiable_ops", "dims_equal", "fit",
           "flops_per_element", "get_op", "index_map_ops", "is_commutative", "last_dim_reductions",
           "norm_dim", "register", "single_output_vjp"]
