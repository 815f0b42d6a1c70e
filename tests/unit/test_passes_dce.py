"""dce: Before/Expected text pairs and properties over random graphs."""
from __future__ import annotations

from dsr_compiler.ir import print_graph, verify
from dsr_compiler.ir.passes import PassContext, dce
from hypothesis import given
from strategies import apply_pass, assert_same_outputs, graphs_with_inputs, ir_text


def test_dce_before_after():
    ctx = PassContext()
    after = apply_pass("""
        graph g(%x : f32[T,8], %unused : f32[4], param %w : f32[8]) {
          %a : f32[T,8] = neg(%x)  # kept: feeds the output
          %b : f32[T,8] = exp(%a)  # dead
          %c : f32[T,8] = mul(%b, %b)  # dead (only feeds dead %d)
          %d : f32[T] = sum(%c, dim=-1)  # dead
          %e : f32[T,8] = rms_norm(%a, %w, eps=1e-06)
          %f : f32[] = const(value=2.0, dtype=f32)  # dead constant
          return %e, %a
        }
    """, "dce", dce, ctx)
    assert print_graph(after) == ir_text("""
        graph g(%x : f32[T,8], %unused : f32[4], param %w : f32[8]) {
          %a : f32[T,8] = neg(%x)  # kept: feeds the output
          %e : f32[T,8] = rms_norm(%a, %w, eps=1e-06)
          return %e, %a
        }
    """)
    assert ctx.counts == {"dce.removed": 4}


def test_dce_drops_unused_kernels_and_keeps_multi_output_calls():
    after = apply_pass("""
        kernel @k1_pointwise_neg_exp(%x : f32[4]) family="pointwise" {
          %n : f32[4] = neg(%x)
          %e : f32[4] = exp(%n)
          return %n, %e
        }

        kernel @k2_pointwise_abs(%x : f32[4]) family="pointwise" {
          %a : f32[4] = abs(%x)
          return %a
        }

        graph g(%x : f32[4]) {
          %n, %e : f32[4], f32[4] = call @k1_pointwise_neg_exp(%x)
          %a : f32[4] = call @k2_pointwise_abs(%x)
          return %e
        }
    """, "dce", dce)
    assert print_graph(after) == ir_text("""
        kernel @k1_pointwise_neg_exp(%x : f32[4]) family="pointwise" {
          %n : f32[4] = neg(%x)
          %e : f32[4] = exp(%n)
          return %n, %e
        }

        graph g(%x : f32[4]) {
          %n, %e : f32[4], f32[4] = call @k1_pointwise_neg_exp(%x)
          return %e
        }
    """)


def test_dce_returning_an_input_keeps_nothing():
    after = apply_pass("""
        graph g(%x : f32[4]) {
          %a : f32[4] = neg(%x)
          return %x
        }
    """, "dce", dce)
    assert print_graph(after) == "graph g(%x : f32[4]) {\n  return %x\n}\n"


@given(graphs_with_inputs())
def test_dce_verifies_preserves_outputs_and_is_idempotent(gi):
    g, args = gi
    once = dce(g, PassContext())
    verify(once)
    assert once.inputs == g.inputs and once.outputs == g.outputs
    assert_same_outputs(g, once, args)
    assert dce(once, PassContext()) == once
    # every kept node is live: some output is returned or read by a later node
    used = set(once.outputs) | {i for n in once.nodes for i in n.inputs}
    assert all(any(o.name in used for o in n.outputs) for n in once.nodes)
    # and kept nodes keep their order
    order = {id(n): i for i, n in enumerate(g.nodes)}
    idx = [order[id(n)] for n in once.nodes]
    assert idx == sorted(idx)
