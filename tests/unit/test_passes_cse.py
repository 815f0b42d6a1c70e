"""cse: Before/Expected text pairs and properties over random graphs."""
from __future__ import annotations

import torch
from dsr_compiler.ir import parse, print_graph, run_graph, verify
from dsr_compiler.ir.passes import PassContext, cse
from hypothesis import given
from strategies import apply_pass, assert_same_outputs, graphs_with_inputs, ir_text

BEFORE = """
    graph g(%x : f32[T,8], %y : f32[T,8]) {
      %a : f32[T,8] = add(%x, %y)  # first
      %b : f32[T,8] = add(%y, %x)  # commuted
      %c : f32[T,8] = sub(%x, %y)
      %d : f32[T,8] = sub(%y, %x)
      %e : f32[T,8] = mul(%a, %b)
      %n1 : f32[T,8] = neg(%e)
      %n2 : f32[T,8] = neg(%e)
      %x1 : f32[T,8] = exp(%n1)
      %x2 : f32[T,8] = exp(%n2)
      %s1 : f32[T] = sum(%x1, dim=-1)
      %s2 : f32[T,1] = sum(%x2, dim=-1, keepdim=True)
      %f : f32[T,8] = mul(%c, %d)
      %c1 : f32[] = const(value=1.0, dtype=f32)
      %c2 : f32[] = const(value=1.0, dtype=f32)
      %c3 : bf16[] = const(value=1.0, dtype=bf16)
      %o1 : f32[T,8] = add(%f, %c1)
      %o2 : f32[T,8] = add(%f, %c2)
      %o3 : bf16[T,8] = cast(%o1, dtype=bf16)
      %o4 : bf16[T,8] = add(%o3, %c3)
      return %s1, %s2, %o1, %o2, %o4
    }
"""

EXPECTED = """
    graph g(%x : f32[T,8], %y : f32[T,8]) {
      %a : f32[T,8] = add(%x, %y)  # first
      %c : f32[T,8] = sub(%x, %y)
      %d : f32[T,8] = sub(%y, %x)
      %e : f32[T,8] = mul(%a, %a)
      %n1 : f32[T,8] = neg(%e)
      %x1 : f32[T,8] = exp(%n1)
      %s1 : f32[T] = sum(%x1, dim=-1)
      %s2 : f32[T,1] = sum(%x1, dim=-1, keepdim=True)
      %f : f32[T,8] = mul(%c, %d)
      %c1 : f32[] = const(value=1.0, dtype=f32)
      %c3 : bf16[] = const(value=1.0, dtype=bf16)
      %o1 : f32[T,8] = add(%f, %c1)
      %o2 : f32[T,8] = add(%f, %c1)
      %o3 : bf16[T,8] = cast(%o1, dtype=bf16)
      %o4 : bf16[T,8] = add(%o3, %c3)
      return %s1, %s2, %o1, %o2, %o4
    }
"""


def test_cse_before_after():
    """Commutative ops match in either order, merges chain through users, attributes and
    types (const dtype, keepdim) keep nodes apart, and returned values keep their names."""
    ctx = PassContext()
    after = apply_pass(BEFORE, "cse", cse, ctx)
    assert print_graph(after) == ir_text(EXPECTED)
    assert ctx.counts == {"cse.merged": 4}


def test_cse_keeps_signed_zero_constants_apart():
    # 0.0 == -0.0 in Python, but x/0.0 and x/-0.0 differ
    before = parse(ir_text("""
        graph g(%x : f32[4]) {
          %z : f32[] = const(value=0.0, dtype=f32)
          %n : f32[] = const(value=-0.0, dtype=f32)
          %a : f32[4] = div(%x, %z)
          %b : f32[4] = div(%x, %n)
          return %a, %b
        }
    """))
    after = apply_pass(before, "cse", cse)
    assert after == before
    a, b = run_graph(after, [torch.ones(4)])
    assert (a == float("inf")).all() and (b == float("-inf")).all()


def test_cse_leaves_call_nodes_alone_when_kernels_differ():
    before = ir_text("""
        kernel @k1_pointwise_exp(%x : f32[4]) family="pointwise" {
          %e : f32[4] = exp(%x)
          return %e
        }

        kernel @k2_pointwise_neg(%x : f32[4]) family="pointwise" {
          %e : f32[4] = neg(%x)
          return %e
        }

        graph g(%x : f32[4]) {
          %a : f32[4] = call @k1_pointwise_exp(%x)
          %b : f32[4] = call @k2_pointwise_neg(%x)
          %c : f32[4] = call @k1_pointwise_exp(%x)
          %d : f32[4] = add(%a, %b)
          %e : f32[4] = add(%d, %c)
          return %e
        }
    """)
    after = apply_pass(before, "cse", cse)
    assert print_graph(after) == before.replace("  %c : f32[4] = call @k1_pointwise_exp(%x)\n", "").replace(
        "add(%d, %c)", "add(%d, %a)")


@given(graphs_with_inputs())
def test_cse_verifies_preserves_outputs_and_is_idempotent(gi):
    g, args = gi
    once = cse(g, PassContext())
    verify(once)
    assert once.outputs == g.outputs and once.inputs == g.inputs
    assert len(once.nodes) <= len(g.nodes)
    assert_same_outputs(g, once, args)
    assert cse(once, PassContext()) == once


@given(graphs_with_inputs())
def test_cse_leaves_no_mergeable_pair(gi):
    g, _ = gi
    once = cse(g, PassContext())
    outputs = set(once.outputs)
    seen = set()
    for n in once.nodes:
        ins = tuple(sorted(n.inputs)) if n.op in ("add", "mul", "maximum", "minimum", "eq") else n.inputs
        key = (n.op, ins, repr(n.attrs), tuple(o.type for o in n.outputs))
        assert key not in seen or any(o.name in outputs for o in n.outputs), f"unmerged {n}"
        seen.add(key)
