"""Mutation tests: for every registered kernel family, a deliberately broken kernel fails its check.

A family's kernel is taken from a real compiled plan (the default `dsrc run` module, a decoder layer
with FP8, in its decode phase; the MLA prefill; an unquantized MoE; the GRPO loss with gradients) or,
for the families no one-process zoo plan uses (`attention`, `gather`, and the expert-parallel `ep_route`
and `gather_rows`), built by hand. Its rendered
Triton source is rewritten:
- "scale": every value a kernel stores is multiplied by 0.5 (converted back to the stored dtype, so
  integer outputs such as expert ids and slot maps change too);
- "drop": the first accumulation `acc += term` (not a pointer increment) is removed: a dropped term.
The mutated kernel runs on the interpreter through the normal runtime path (runtime.launch.build_plan
on a one-call graph) with the inputs the plan really gives it (the reference interpreter's values at
that call), and the project's comparison against the op table's reference (dsr_compiler.tolerance)
must report a failure. The unmutated kernel must pass the same comparison, so a harness that always
fails cannot make these tests pass.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import sympy
import torch

import dsr_compiler as dsr
from dsr_compiler.codegen import lower_kernel, render
from dsr_compiler.codegen.families import FAMILY_NAMES as FAMILIES
from dsr_compiler.ir import OPS, DType, Graph, GraphBuilder, Kernel, Node, TensorType, Value, run_graph, verify
from dsr_compiler.ir.interp import bind_symbols, concrete_attr
from dsr_compiler.models import ModelConfig
from dsr_compiler.runtime.launch import build_plan
from dsr_compiler.tolerance import compare, compare_fp8
from dsr_compiler.workloads import build

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
CFG = ModelConfig.named("deepseek-v3-tiny")
FP8 = {torch.float8_e4m3fn, torch.float8_e5m2}


@dataclass
class Case:
    kernel: Kernel                 # the ir.Kernel (its body is the op-table reference)
    spec: Any                      # codegen.spec.KernelSpec
    source: str                    # rendered Triton source
    inputs: list[torch.Tensor]     # the call's inputs, in the one-call graph's input order
    graph: Graph                   # a graph holding just this call


# ----------------------------------------------------------------------------- the cases

def _one_call_graph(g: Graph, node: Node, kernel: Kernel) -> Graph:
    vals = g.values()
    ins = tuple(vals[n] for n in dict.fromkeys(node.inputs))
    return Graph(f"mutant_{kernel.name}", ins, (node,), tuple(o.name for o in node.outputs), (), (kernel,))


def _weight(k: Kernel | None) -> int:
    """Which kernel of a family to mutate: one with float outputs, the most outputs (a mutation of a
    kernel whose only output is an index vector of zeros cannot be seen)."""
    if k is None:
        return -1
    outs = [k.body.values()[o] for o in k.body.outputs]
    return 10 * sum(v.type.dtype.is_float for v in outs) + len(outs)


def _plan_cases(module: str, fp8: bool, dtype: str = "f32", phase: str | None = None) -> dict[str, Case]:
    """The first kernel of each family in a compiled plan, with the inputs the plan gives it."""
    wl = build(CFG, module, 1, 8, dtype, 0, phase=phase) if phase else build(CFG, module, 1, 4, dtype, 0)
    cm = dsr.compile(wl.module, wl.example_inputs, fp8=fp8, backend="interpret", dynamic=wl.dynamic,
                     name=module, grad_wrt=wl.grad_wrt or None)
    g = cm.graph
    args = [x for x in wl.example_inputs if x is not None] + list(cm.params)
    sym_env = bind_symbols([v.type for v in g.inputs], args)
    env = {v.name: a for v, a in zip(g.inputs, args)}
    kernels = {k.name: k for k in g.kernels}
    arts = {a.spec.name: a for a in cm.kernels}
    cases: dict[str, Case] = {}
    for n in g.nodes:            # the reference interpreter's walk (ir.interp.run_graph), recording inputs
        ins = [env[i] for i in n.inputs]
        if n.op == "call":
            k = kernels[n.attr("kernel")]
            if _weight(k) > _weight(cases[k.family].kernel if k.family in cases else None):
                sub = _one_call_graph(g, n, k)
                art = arts[k.name]
                cases[k.family] = Case(k, art.spec, art.source, [env[v.name] for v in sub.inputs], sub)
            outs = run_graph(k.body, ins, sym_env)
        else:
            op = OPS[n.op]
            res = op.reference(*ins, **{a: concrete_attr(v, sym_env) for a, v in op.with_defaults(n.attr_dict).items()})
            outs = list(res) if isinstance(res, (tuple, list)) else [res]
        env.update({o.name: t for o, t in zip(n.outputs, outs)})
    return cases


def _hand_case(kernel: Kernel, inputs: list[torch.Tensor]) -> Case:
    spec = lower_kernel(kernel, 1)
    node = Node(tuple(kernel.body.values()[o] for o in kernel.body.outputs), "call",
                tuple(v.name for v in kernel.body.inputs), {"kernel": kernel.name}, origin="test")
    g = Graph(f"mutant_{kernel.name}", kernel.body.inputs, (node,), kernel.body.outputs, (), (kernel,))
    return Case(kernel, spec, render(spec), inputs, g)


def _attention_case() -> Case:
    f32, b = DType.f32, GraphBuilder("k1_attention_attention")
    s = sympy.Symbol("S", integer=True, positive=True)
    for n, d in (("q", 16), ("k", 16), ("v", 16)):
        b.add_input(n, TensorType(f32, (1, 2, s, d)))
    b.add(Node((Value("o", TensorType(f32, (1, 2, s, 16))),), "attention", ("q", "k", "v"),
               {"causal": True, "scale": 0.25}, "test"))
    k = Kernel("k1_attention_attention", "attention", verify(b.build(("o",))))
    gen = torch.Generator().manual_seed(0)
    return _hand_case(k, [torch.randn(1, 2, 9, 16, generator=gen) for _ in range(3)])


def _gather_case() -> Case:
    t = sympy.Symbol("T", integer=True, positive=True)
    b = GraphBuilder("k1_gather_gather")
    b.add_input("x", TensorType(DType.f32, (t, 30)))
    b.add_input("index", TensorType(DType.i64, (t, 3)))
    b.add(Node((Value("out", TensorType(DType.f32, (t, 3))),), "gather", ("x", "index"), {"dim": -1}, "test"))
    k = Kernel("k1_gather_gather", "gather", verify(b.build(("out",))))
    gen = torch.Generator().manual_seed(0)
    return _hand_case(k, [torch.randn(7, 30, generator=gen), torch.randint(0, 30, (7, 3), generator=gen)])


def _ep_route_case() -> Case:
    t = sympy.Symbol("T", integer=True, positive=True)
    b = GraphBuilder("k1_ep_route_ep_route")
    b.add_input("ids", TensorType(DType.i32, (t, 3)))
    outs = tuple(Value(n, ty) for n, ty in zip(("send", "eid", "pos", "counts"),
                                               OPS["ep_route"].infer([TensorType(DType.i32, (t, 3))],
                                                                     {"n_ranks": 4, "local_experts": 2})))
    b.add(Node(outs, "ep_route", ("ids",), {"n_ranks": 4, "local_experts": 2}, "test"))
    k = Kernel("k1_ep_route_ep_route", "ep_route", verify(b.build(tuple(o.name for o in outs))))
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(7)]).to(torch.int32)
    return _hand_case(k, [ids])


def _gather_rows_case() -> Case:
    t = sympy.Symbol("T", integer=True, positive=True)
    b = GraphBuilder("k1_gather_rows_gather_rows")
    b.add_input("src", TensorType(DType.f32, (t, 24)))
    b.add_input("index", TensorType(DType.i32, (9,)))
    b.add(Node((Value("out", TensorType(DType.f32, (9, 24))),), "gather_rows", ("src", "index"), {"div": 3}, "test"))
    k = Kernel("k1_gather_rows_gather_rows", "gather_rows", verify(b.build(("out",))))
    gen = torch.Generator().manual_seed(0)
    return _hand_case(k, [torch.randn(5, 24, generator=gen),
                          torch.tensor([0, 14, -1, 3, 7, 2, 13, -1, 9], dtype=torch.int32)])


def _cumsum_case() -> Case:
    t = sympy.Symbol("T", integer=True, positive=True)
    b = GraphBuilder("k1_cumsum_cumsum")
    b.add_input("x", TensorType(DType.f32, (3, t)))
    b.add(Node((Value("out", TensorType(DType.f32, (3, t))),), "cumsum", ("x",), {"dim": -1}, "test"))
    k = Kernel("k1_cumsum_cumsum", "cumsum", verify(b.build(("out",))))
    gen = torch.Generator().manual_seed(0)
    return _hand_case(k, [torch.randn(3, 1100, generator=gen)])     # two chunks: the carry is read


def _index_case() -> Case:
    t = sympy.Symbol("T", integer=True, positive=True)
    b = GraphBuilder("k1_index_index")
    b.add_input("x", TensorType(DType.f32, (t, 4, 6)))
    b.add_input("i", TensorType(DType.i64, (5,)))
    b.add_input("j", TensorType(DType.i32, (5,)))
    b.add(Node((Value("out", TensorType(DType.f32, (5, 6))),), "index", ("x", "i", "j"), {}, "test"))
    k = Kernel("k1_index_index", "index", verify(b.build(("out",))))
    gen = torch.Generator().manual_seed(0)
    return _hand_case(k, [torch.randn(7, 4, 6, generator=gen), torch.tensor([0, 6, -1, 3, 2]),
                          torch.tensor([3, 0, 1, -4, 2], dtype=torch.int32)])


# Where each family's case comes from; the default decoder plan first (those run in `make test`).
SOURCES: dict[str, Any] = {
    "decoder": lambda: _plan_cases("decoder", True, phase="decode"),
    "mla_prefill": lambda: _plan_cases("mla", True, phase="prefill"),
    "moe": lambda: _plan_cases("moe", False),
    "grpo": lambda: _plan_cases("grpo", False),
    "hand": lambda: {"attention": _attention_case(), "gather": _gather_case(), "ep_route": _ep_route_case(),
                     "gather_rows": _gather_rows_case(), "cumsum": _cumsum_case(),
                     "index": _index_case()},
}


# Which plan gives each family's case (a new family without an entry fails test_every_family_...).
SOURCE_OF: dict[str, str] = {
    **{f: "decoder" for f in ("pointwise", "reduction", "gemm", "gemm_fp8", "quant_fp8", "moe_router",
                              "moe_dispatch", "moe_gemm_fp8", "moe_combine", "rope_table", "index_copy",
                              "mla_decode", "mla_combine")},
    "mla_attention": "mla_prefill", "moe_gemm": "moe",
    **{f: "grpo" for f in ("vocab_logprobs", "vocab_grad_hidden", "vocab_grad_weight")},
    "attention": "hand", "gather": "hand", "ep_route": "hand", "gather_rows": "hand", "cumsum": "hand",
    "index": "hand",
}


@functools.cache
def _cases(source: str) -> dict[str, Case]:
    return SOURCES[source]()


def case_of(family: str) -> Case:
    assert family in SOURCE_OF, f"no mutation case for kernel family {family!r}: add it to SOURCE_OF"
    cases = _cases(SOURCE_OF[family])
    assert family in cases, f"the {SOURCE_OF[family]} plan has no {family} kernel any more"
    return cases[family]


# ----------------------------------------------------------------------------- mutations

def _is_tl_call(node: ast.AST, names: tuple[str, ...]) -> bool:
    f = getattr(node, "func", None)
    return isinstance(node, ast.Call) and isinstance(f, ast.Attribute) and f.attr in names \
        and isinstance(f.value, ast.Name) and f.value.id == "tl"


def _halved(v: ast.expr) -> ast.expr:
    """`(v * 0.5).to(v.dtype)`; for `x.to(fp8, bitcast=True)`, the bits `x` are halved instead."""
    if isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) and v.func.attr == "to" \
            and any(k.arg == "bitcast" for k in v.keywords):
        return ast.Call(ast.Attribute(_halved(v.func.value), "to", ast.Load()), v.args, v.keywords)
    scaled = ast.BinOp(v, ast.Mult(), ast.Constant(0.5))
    return ast.Call(ast.Attribute(scaled, "to", ast.Load()), [ast.Attribute(v, "dtype", ast.Load())], [])


class _Scale(ast.NodeTransformer):
    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if _is_tl_call(node, ("store", "atomic_add")) and len(node.args) >= 2:
            node.args[1] = _halved(node.args[1])
        return node


class _DropFirstAccumulation(ast.NodeTransformer):
    """Drops the first accumulated term: `acc += t` (not a pointer step), `acc = acc + t` -> `acc = acc`,
    or `tl.dot(a, b, acc=acc)` -> `acc` (the product this loop iteration adds)."""
    done = False

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        target = node.target.id if isinstance(node.target, ast.Name) else ""
        if self.done or not isinstance(node.op, ast.Add) or target.endswith(("ptr", "ptrs")) \
                or isinstance(node.value, ast.Constant):
            return node
        self.done = True
        return ast.Pass()

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        v, t = node.value, node.targets[0]
        if self.done or not isinstance(t, ast.Name) or t.id.endswith(("ptr", "ptrs")):
            return node
        if isinstance(v, ast.BinOp) and isinstance(v.op, ast.Add) and isinstance(v.left, ast.Name) \
                and v.left.id == t.id:
            node.value, self.done = v.left, True
        elif _is_tl_call(v, ("dot",)) and any(k.arg == "acc" for k in v.keywords):
            node.value, self.done = next(k.value for k in v.keywords if k.arg == "acc"), True
        return node


def mutate(source: str, how: str) -> str | None:
    """The rewritten source, or None when `how` finds nothing to rewrite in this kernel."""
    tree = ast.parse(source)
    if how == "scale":
        tree = _Scale().visit(tree)
    else:
        t = _DropFirstAccumulation()
        tree = t.visit(tree)
        if not t.done:
            return None
    out = ast.unparse(ast.fix_missing_locations(tree))
    assert out != ast.unparse(ast.parse(source)), f"mutation {how} left the source unchanged"
    return out


# ----------------------------------------------------------------------------- running and checking

def run_case(c: Case, source: str) -> list[torch.Tensor]:
    art = SimpleNamespace(spec=c.spec, source=source, ptx=None)
    plan = build_plan(c.graph, [art], "interpret")
    return plan.run([x.clone() for x in c.inputs])


def check(c: Case, got: list[torch.Tensor]) -> list[str]:
    """Failures of the project's comparison of each output with the op table's reference."""
    want = run_graph(c.graph, [x.clone() for x in c.inputs])
    bad = []
    for name, a, e in zip(c.graph.outputs, got, want):
        if a.dtype in FP8 or e.dtype in FP8:          # codes: compared as values, FP8 "fp8_sim" bounds
            r = compare_fp8(a.float(), e.float(), "fp8_sim", 1)
        elif not e.dtype.is_floating_point:
            r = {"ok": torch.equal(a, e)}
        else:
            r = compare(a, e)
        if not r["ok"]:
            bad.append(f"%{name}: {r}")
    return bad


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_a_case_that_passes_unmutated(family):
    c = case_of(family)
    assert c.kernel.family == family
    assert check(c, run_case(c, c.source)) == []


@pytest.mark.parametrize("how", ["scale", "drop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_broken_kernel_fails_its_check(family, how):
    c = case_of(family)
    src = mutate(c.source, how)
    if src is None:
        assert how == "drop", family
        pytest.skip(f"{family}: no accumulation to drop (the scale mutation covers it)")
    try:
        got = run_case(c, src)
    except Exception as e:              # a crash is also caught, but say which kind of failure it was
        pytest.fail(f"{family}/{how}: mutated kernel crashed instead of producing a wrong answer: {e!r}")
    assert check(c, got), f"{family}: kernel mutated by {how!r} passed its check"
