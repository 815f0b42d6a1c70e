"""IR verifier: SSA well-formedness and the op table's type rules, checked everywhere.

Run by the pass manager after every pass. A failure raises `VerifyError` showing the bad
statement inside a window of the printed IR, marked with `>>`.
"""
from __future__ import annotations

from .errors import VerifyError

from .graph import Graph, Node
from .ops import CALL, OPS, TypeRuleError
from .printer import format_node
from .types import TensorType, dims_equal

# The kernel families that codegen can lower, one per `KernelFamily` record (codegen/families/).
# The list lives here because `ir` never imports `codegen` (imports run one way); instead codegen's
# `validate()` refuses its records if their names differ from this tuple, so the two cannot drift,
# and the verifier can refuse an unknown family in parsed or hand-built IR before any lowering.
KERNEL_FAMILIES: tuple[str, ...] = (
    "pointwise", "reduction", "gemm", "attention",                       # the fusion pass's core four
    "gemm_fp8", "quant_fp8",                                             # FP8 recipe
    "moe_router", "moe_dispatch", "moe_gemm", "moe_gemm_fp8", "moe_combine",
    "rope_table", "index_copy", "mla_attention", "mla_decode", "mla_combine",
    "vocab_logprobs", "vocab_grad_hidden", "vocab_grad_weight", "gather",
    "ep_route", "gather_rows",                                           # expert parallelism
    "cumsum", "index",                                                   # scans, advanced indexing
)


def _same_type(a: TensorType, b: TensorType) -> bool:
    return a.dtype == b.dtype and dims_equal(a.shape, b.shape)


def ir_window(g: Graph, index: int, radius: int = 3) -> str:
    lo, hi = max(0, index - radius), min(len(g.nodes), index + radius + 1)
    lines = []
    for i in range(lo, hi):
        mark = ">> " if i == index else "   "
        lines.append(f"    {mark}{format_node(g.nodes[i])}")
    return f"  in graph {g.name}, statement {index}:\n" + "\n".join(lines)


def _fail(g: Graph, index: int, what: str, hint: str = "") -> VerifyError:
    return VerifyError(f"verify: {what}", where=ir_window(g, index), hint=hint)


def verify(g: Graph, _kernels: dict | None = None) -> Graph:
    """Check `g`; return it unchanged so calls can be chained. Raises VerifyError."""
    kernels = {k.name: k for k in g.kernels} if _kernels is None else _kernels
    if _kernels is None:
        seen_k: set[str] = set()
        for k in g.kernels:
            if k.name in seen_k:
                raise VerifyError(f"verify: kernel @{k.name} defined twice")
            seen_k.add(k.name)
            if k.family not in KERNEL_FAMILIES:
                raise VerifyError(f"verify: kernel @{k.name} has unknown family {k.family!r}",
                                  hint="known families: " + ", ".join(KERNEL_FAMILIES))
            if k.body.kernels:
                raise VerifyError(f"verify: kernel @{k.name} defines nested kernels")
            try:
                verify(k.body, kernels)
            except VerifyError as e:
                raise VerifyError(f"{e.what} (inside kernel @{k.name})", e.where, e.hint) from None
    defined: dict[str, TensorType] = {}
    for v in g.inputs:
        if v.name in defined:
            raise VerifyError(f"verify: input %{v.name} declared twice", where=f"graph {g.name}")
        defined[v.name] = v.type
    names = set(defined)
    for p in g.params:
        if p not in names:
            raise VerifyError(f"verify: param %{p} is not an input", where=f"graph {g.name}")
    for i, n in enumerate(g.nodes):
        _verify_node(g, i, n, defined, kernels)
        for o in n.outputs:
            if o.name in defined:
                raise _fail(g, i, f"%{o.name} is defined twice", "SSA: every value is assigned once")
            defined[o.name] = o.type
    if not g.outputs:
        raise VerifyError(f"verify: graph {g.name} returns nothing")
    for o in g.outputs:
        if o not in defined:
            raise VerifyError(f"verify: graph {g.name} returns undefined %{o}")
    return g


def _verify_node(g: Graph, i: int, n: Node, defined: dict[str, TensorType], kernels: dict) -> None:
    op = OPS.get(n.op)
    if op is None:
        raise _fail(g, i, f"unknown op {n.op!r}", "ops are declared in ir/ops/")
    for inp in n.inputs:
        if inp not in defined:
            raise _fail(g, i, f"%{inp} is used before it is defined")
    in_types = [defined[x] for x in n.inputs]
    if op.kind == CALL:
        kname = n.attr("kernel")
        k = kernels.get(kname)
        if k is None:
            raise _fail(g, i, f"call to undefined kernel @{kname}")
        want_in = [v.type for v in k.body.inputs]
        if len(want_in) != len(in_types) or not all(_same_type(a, b) for a, b in zip(in_types, want_in)):
            raise _fail(g, i, f"call @{kname}: argument types {[str(t) for t in in_types]} "
                              f"do not match the kernel's {[str(t) for t in want_in]}")
        expected = tuple(v.type for v in k.body.output_values())
    else:
        try:
            expected = op.infer(in_types, n.attr_dict)
        except TypeRuleError as e:
            raise _fail(g, i, str(e)) from None
    got = tuple(o.type for o in n.outputs)
    if len(got) != len(expected) or not all(_same_type(a, b) for a, b in zip(got, expected)):
        raise _fail(g, i, f"{n.op} declares {', '.join(map(str, got))} but its type rule gives "
                          f"{', '.join(map(str, expected))}")
