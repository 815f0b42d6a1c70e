"""Shared lowering helpers: what every family's lowering (codegen/families/*.py) builds a KernelSpec with.

Sits under the per-family lowerings and the statement emitter (`codegen/lower_body.py`); it knows no
family. The calling convention it implements is spec.py's: tensor args are the body inputs in order,
then the body outputs in order (`tensor_args`, names from `arg_names`), then int scalars (a
`views.ScalarPool`'s args). Errors are CodegenErrors that name the kernel and mark the offending
statement (`fail`).
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import sympy
from dsr_compiler.ir.errors import CodegenError
from dsr_compiler.ir.graph import Graph, Kernel, Node
from dsr_compiler.ir.ops import OPS, POINTWISE, SOURCE, flops_per_element, index_map_ops
from dsr_compiler.ir.types import dim_str, to_expr
from dsr_compiler.ir.verifier import ir_window

from .spec import ArgSpec, KernelSpec, Stmt, comment_text, ident

# Layout ops that a kernel folds into the index map of the input they re-index (`OpDef.index_map`).
INDEX_MAP_OPS = index_map_ops()
# An identifier inside an index expression (which tile axes an access uses).
TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME_RE = re.compile(r"^k\d+_[a-z]+_[A-Za-z0-9_]+$")


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def static_int(e: sympy.Expr) -> int | None:
    """The value of a size expression that is a constant, else None (a symbolic dim)."""
    e = to_expr(e)
    return int(e) if e.is_Integer else None


def arg_names(g: Graph) -> dict[tuple[str, Any], str]:
    """Pointer argument names: ("in", value name) and ("out", output index) -> identifier."""
    names: dict[tuple[str, Any], str] = {}
    used: set[str] = set()

    def pick(base: str) -> str:
        name, n = base, 0
        while name in used:
            n += 1
            name = f"{base}{n}"
        used.add(name)
        return name
    for v in g.inputs:
        names[("in", v.name)] = pick(ident(v.name) + "_ptr")
    for i, o in enumerate(g.outputs):
        names[("out", i)] = pick(ident(o) + "_out")
    return names


def tensor_args(g: Graph) -> list[ArgSpec]:
    """The tensor arguments of a kernel body: its inputs (role "in"), then its outputs (role "out")."""
    names = arg_names(g)
    vals = g.values()
    out = [ArgSpec(names[("in", v.name)], "tensor", value=v.name, dtype=v.type.dtype, role="in", index=i,
                   shape=tuple(dim_str(d) for d in v.type.shape)) for i, v in enumerate(g.inputs)]
    for i, o in enumerate(g.outputs):
        t = vals[o].type
        out.append(ArgSpec(names[("out", i)], "tensor", value=o, dtype=t.dtype, role="out", index=i,
                           shape=tuple(dim_str(d) for d in t.shape)))
    return out


def source_nodes(g: Graph) -> tuple[str, ...]:
    """One comment line per computing node of the body (`%y = op @ origin`), for the kernel header."""
    out = []
    for n in g.nodes:
        if OPS[n.op].kind == SOURCE:
            continue
        lhs = ", ".join("%" + o.name for o in n.outputs)
        out.append(comment_text(f"{lhs} = {n.op}" + (f" @ {n.origin}" if n.origin else "")))
    return tuple(out)


def kernel_bytes(g: Graph) -> tuple[str, str]:
    """Modeled DRAM bytes (read, written) of a body that reads each input and writes each output once."""
    vals = g.values()
    r = sum((v.type.nbytes for v in g.inputs), sympy.Integer(0))
    w = sum((vals[o].type.nbytes for o in g.outputs), sympy.Integer(0))
    return dim_str(sympy.expand(r)), dim_str(sympy.expand(w))


def pointwise_flops(g: Graph, numel: sympy.Expr, skip: Iterable[Node] = ()) -> sympy.Expr:
    """Modeled FLOPs of the body's pointwise ops over `numel` elements (`skip`: nodes counted elsewhere)."""
    skip_ids = {id(n) for n in skip}
    n_ops = sum(flops_per_element(n.op) for n in g.nodes if OPS[n.op].kind == POINTWISE and id(n) not in skip_ids)
    return numel * n_ops


def kernel_name(k: Kernel, index: int) -> str:
    """The kernel's own name when it already reads k{n}_{family}_{tag}, else k{index}_{family}_{name}."""
    if _NAME_RE.match(k.name):
        return k.name
    return f"k{index}_{k.family}_{ident(k.name)}"


def fail(k: Kernel, what: str, node: Node | None = None, hint: str = "") -> CodegenError:
    """The CodegenError to raise for kernel `k`: `what`, the IR window around `node` (else the kernel's
    name), and a hint."""
    where = ir_window(k.body, k.body.nodes.index(node)) if node is not None else f"  kernel @{k.name}"
    return CodegenError(f"codegen: kernel @{k.name} ({k.family}): {what}", where, hint)


def attr_int(k: Kernel, key: str, default: int) -> int:
    """An int kernel attribute (a tile size or warp count override), else `default`."""
    v = k.attr(key)
    return int(v) if v is not None else default


def closure(stmts: Sequence[Stmt], roots: Iterable[int], have: set[str]) -> list[int]:
    """Indices of the statements needed for `roots` (in program order), skipping vars in `have`."""
    defs = {s.out: i for i, s in enumerate(stmts) if s.out}
    need: set[int] = set()
    stack = list(roots)
    while stack:
        i = stack.pop()
        if i in need:
            continue
        need.add(i)
        for a in stmts[i].args:
            j = defs.get(a)
            if j is not None and a not in have:
                stack.append(j)
    return sorted(need)


def single_op(k: Kernel, op: str, only_output: bool = True) -> Node:
    """The one op of a kernel that holds exactly one `op` (consts aside) whose operands are all kernel inputs and
    (with `only_output`) whose result is the kernel's only output: the one-op families (cumsum, index, gather,
    the vocabulary kernels)."""
    ops = [n for n in k.body.nodes if n.op != "const"]
    if len(ops) != 1 or ops[0].op != op:
        raise fail(k, f"a {k.family} kernel holds exactly one {op} op, got {[n.op for n in ops]}",
                   ops[1] if len(ops) > 1 else None)
    n = ops[0]
    inputs = {v.name for v in k.body.inputs}
    for v in n.inputs:
        if v not in inputs:
            raise fail(k, f"{op} operand %{v} is computed inside the kernel; operands must be kernel inputs", n)
    if only_output and list(k.body.outputs) != [n.out.name]:
        raise fail(k, f"must return only %{n.out.name}", n)
    return n


def flat_spec(k: Kernel, index: int, family: str, template: str, pool: Any, params: tuple, numel: sympy.Expr,
              block: int, bytes_read: sympy.Expr, bytes_written: sympy.Expr) -> KernelSpec:
    """The spec of a copy kernel over `numel` outputs, one program per `block` of them (gather, index)."""
    g = k.body
    return KernelSpec(
        name=kernel_name(k, index), family=family, template=template,
        args=tuple(tensor_args(g)) + tuple(pool.args), grid=(dim_str(sympy.ceiling(numel / block)),),
        num_warps=attr_int(k, "num_warps", 4), num_stages=1, params=params, body=(), source_nodes=source_nodes(g),
        flops="0", bytes_read=dim_str(sympy.expand(bytes_read)), bytes_written=dim_str(sympy.expand(bytes_written)))


__all__ = ["INDEX_MAP_OPS", "TOKEN", "arg_names", "attr_int", "closure", "fail", "flat_spec", "kernel_bytes", "kernel_name",
           "next_pow2", "pointwise_flops", "single_op", "source_nodes", "static_int", "tensor_args"]
