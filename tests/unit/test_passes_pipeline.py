"""The PIPELINE and its manager: every pass keeps the graph valid and its outputs unchanged;
the manager verifies, times, and records notes and rule counts per pass."""
from __future__ import annotations

import pytest
from dsr_compiler.ir import Node, parse, print_graph, verify
from dsr_compiler.ir.errors import VerifyError
from dsr_compiler.ir.passes import PIPELINE, PassContext, PassRecord, run_passes
from hypothesis import given
from strategies import apply_pass, assert_same_outputs, graphs_with_inputs, ir_text

PASSES = dict(PIPELINE)
IDEMPOTENT = ("rewrite_vocab_loss", "differentiate", "cse", "fold_constants", "dce", "fuse")


def test_pipeline_order():
    assert [name for name, _ in PIPELINE] == ["rewrite_vocab_loss", "differentiate", "cse", "fold_constants", "dce",
                                              "absorb_mla", "quantize_fp8", "fuse"]


@pytest.mark.parametrize("name", [name for name, _ in PIPELINE])
@given(gi=graphs_with_inputs())
def test_each_pass_verifies_and_keeps_outputs(name, gi):
    g, args = gi
    out = apply_pass(g, name, PASSES[name])        # the manager verifies the result
    assert out.inputs == g.inputs and out.outputs == g.outputs and out.name == g.name
    assert_same_outputs(g, out, args)


@pytest.mark.parametrize("name", IDEMPOTENT)
@given(gi=graphs_with_inputs(max_steps=6))
def test_each_pass_is_idempotent(name, gi):
    g, _ = gi
    fn = PASSES[name]
    once = fn(g, PassContext())
    assert fn(once, PassContext()) == once


@given(graphs_with_inputs())
def test_full_pipeline(gi):
    g, args = gi
    ctx = PassContext()
    records = run_passes(g, PIPELINE, ctx)
    assert [r.name for r in records] == ["trace"] + [name for name, _ in PIPELINE]
    assert [r.index for r in records] == list(range(len(PIPELINE) + 1))
    assert records[0].graph is g
    for rec in records[1:]:
        verify(rec.graph)
        assert_same_outputs(g, rec.graph, args)
        assert rec.ms >= 0
    final = records[-1].graph
    assert all(n.op in ("call", "reshape", "const") for n in final.nodes)
    assert sum(len(r.notes) for r in records) == len(ctx.notes)


def test_records_carry_notes_and_counts_per_pass():
    seen: list[PassRecord] = []
    records = run_passes(parse(ir_text("""
        graph g(%x : f32[T,8], %cos : f32[T,8], %sin : f32[T,8], param %w : f32[8,8]) {
          %one : f32[] = const(value=1.0, dtype=f32)
          %q : f32[T,8] = linear(%x, %w)
          %q2 : f32[T,8] = linear(%x, %w)
          %r : f32[T,8] = rope(%q, %cos, %sin)
          %s : f32[T,8] = mul(%r, %q2)
          %t : f32[T,8] = mul(%s, %one)
          %u : f32[T,8] = neg(%t)
          %dead : f32[T,8] = exp(%t)
          return %u
        }
    """)), PIPELINE, on_pass=seen.append)
    assert seen == records
    by_name = {r.name: r for r in records}
    assert by_name["cse"].counts == (("cse.merged", 1),)
    assert by_name["fold_constants"].counts == (("fold.neutral_element", 1),)
    assert by_name["dce"].counts == ()          # fold_constants already ends with a (silent) dce
    assert "dead" not in print_graph(by_name["fold_constants"].graph)
    assert by_name["fuse"].counts == (("fuse.kernels", 2),)
    assert by_name["fuse"].notes and all(n.startswith("cannot fuse") for n in by_name["fuse"].notes)
    assert by_name["cse"].notes == ()
    assert print_graph(records[-1].graph).count("call @") == 2


def _broken_pass(g, ctx):
    n = g.nodes[0]
    return g.replace(nodes=(n.replace(op="frobnicate"),) + g.nodes[1:])


def test_manager_verifies_after_each_pass():
    g = parse("graph g(%x : f32[4]) {\n  %y : f32[4] = neg(%x)\n  return %y\n}\n")
    with pytest.raises(VerifyError) as ei:
        run_passes(g, [("cse", PASSES["cse"]), ("broken", _broken_pass)])
    msg = str(ei.value)
    assert "unknown op 'frobnicate' (after pass broken)" in msg
    assert ">> %y : f32[4] = frobnicate(%x)" in msg
    assert "compiler bug in the pass" in msg


def test_manager_verifies_its_input():
    g = parse("graph g(%x : f32[4]) {\n  %y : f32[4] = neg(%z)\n  return %y\n}\n", verify=False)
    with pytest.raises(VerifyError, match="used before it is defined"):
        run_passes(g, PIPELINE)


def test_passes_do_not_mutate_their_input():
    text = ir_text("""
        graph g(%x : f32[T,8], param %w : f32[8]) {
          %a : f32[T,8] = neg(%x)
          %b : f32[T,8] = neg(%x)
          %c : f32[T,8] = add(%a, %b)
          %n : f32[T,8] = rms_norm(%c, %w, eps=1e-06)
          return %n
        }
    """)
    g = parse(text)
    records = run_passes(g, PIPELINE)
    assert print_graph(g) == text
    assert all(isinstance(n, Node) for r in records for n in r.graph.nodes)
    assert len({id(r.graph) for r in records}) == len(records)
