"""fold_constants: one Before/Expected text pair per FOLD_RULE, plus properties over random graphs."""
from __future__ import annotations

import pytest
from dsr_compiler.ir import parse, print_graph, verify
from dsr_compiler.ir.passes import FOLD_RULES, PassContext, cleanup, fold_constants
from hypothesis import given
from strategies import apply_pass, assert_same_outputs, graphs_with_inputs, ir_text

# rule name -> (before, expected, matches of that rule)
RULE_CASES = {
    "fold_const_pointwise": ("""
        graph g(%x : f32[T,8]) {
          %a : f32[] = const(value=2.0, dtype=f32)
          %b : f32[] = const(value=3.0, dtype=f32)
          %s : f32[] = add(%a, %b)
          %n : f32[] = neg(%s)  # chained: folds once %s is a constant
          %h : bf16[] = cast(%n, dtype=bf16)
          %lt : bool[] = lt(%a, %b)
          %i : i32[] = const(value=7, dtype=i32)
          %j : i32[] = mul(%i, %i)
          %y : f32[T,8] = mul(%x, %n)
          %z : bf16[T,8] = cast(%y, dtype=bf16)
          %w : bf16[T,8] = add(%z, %h)
          return %w, %lt, %j
        }
    """, """
        graph g(%x : f32[T,8]) {
          %n : f32[] = const(value=-5.0, dtype=f32)  # chained: folds once %s is a constant
          %h : bf16[] = const(value=-5.0, dtype=bf16)
          %lt : bool[] = const(value=True, dtype=bool)
          %j : i32[] = const(value=49, dtype=i32)
          %y : f32[T,8] = mul(%x, %n)
          %z : bf16[T,8] = cast(%y, dtype=bf16)
          %w : bf16[T,8] = add(%z, %h)
          return %w, %lt, %j
        }
    """, 5),
    "reduce_last_dim": ("""
        graph g(%x : f32[T,8,4]) {
          %s : f32[T,4] = sum(%x, dim=1)
          %m : f32[T,1,4] = amax(%x, dim=1, keepdim=True)
          %p : f32[T,8,4] = softmax(%x, dim=-2)
          %l : f32[T,8,4] = log_softmax(%x, dim=2)  # already last: kept
          return %s, %m, %p, %l
        }
    """, """
        graph g(%x : f32[T,8,4]) {
          %x.to_last : f32[T,4,8] = permute(%x, dims=(0, 2, 1))
          %s : f32[T,4] = sum(%x.to_last, dim=2)
          %m.last : f32[T,4,1] = amax(%x.to_last, dim=2, keepdim=True)
          %m : f32[T,1,4] = reshape(%m.last, shape=(T, 1, 4))
          %p.last : f32[T,4,8] = softmax(%x.to_last, dim=2)
          %p : f32[T,8,4] = permute(%p.last, dims=(0, 2, 1))
          %l : f32[T,8,4] = log_softmax(%x, dim=2)  # already last: kept
          return %s, %m, %p, %l
        }
    """, 3),
    "softmax_single": ("""
        graph g(%x : f32[T,4,1], %y : f32[T,4]) {
          %p : f32[T,4,1] = softmax(%x, dim=-1)
          %l : f32[T,4,1] = log_softmax(%x, dim=2)
          %q : f32[T,4] = softmax(%y, dim=-1)
          return %p, %l, %q
        }
    """, """
        graph g(%x : f32[T,4,1], %y : f32[T,4]) {
          %p.zero : f32[T,4,1] = sub(%x, %x)
          %p.one : f32[] = const(value=1.0, dtype=f32)
          %p : f32[T,4,1] = add(%p.zero, %p.one)
          %l : f32[T,4,1] = sub(%x, %x)
          %q : f32[T,4] = softmax(%y, dim=-1)
          return %p, %l, %q
        }
    """, 2),
    "cast_noop": ("""
        graph g(%x : f32[T,8]) {
          %a : f32[T,8] = cast(%x, dtype=f32)
          %b : f32[T,8] = exp(%a)
          return %b
        }
    """, """
        graph g(%x : f32[T,8]) {
          %b : f32[T,8] = exp(%x)
          return %b
        }
    """, 1),
    "cast_roundtrip": ("""
        graph g(%x : bf16[T,8], %y : f32[T,8]) {
          %a : f32[T,8] = cast(%x, dtype=f32)
          %b : bf16[T,8] = cast(%a, dtype=bf16)  # bf16 -> f32 -> bf16 is exact
          %c : bf16[T,8] = cast(%y, dtype=bf16)
          %d : f32[T,8] = cast(%c, dtype=f32)  # f32 -> bf16 -> f32 rounds: kept
          %e : bf16[T,8] = mul(%b, %b)
          %f : f32[T,8] = add(%d, %a)
          return %e, %f
        }
    """, """
        graph g(%x : bf16[T,8], %y : f32[T,8]) {
          %a : f32[T,8] = cast(%x, dtype=f32)
          %c : bf16[T,8] = cast(%y, dtype=bf16)
          %d : f32[T,8] = cast(%c, dtype=f32)  # f32 -> bf16 -> f32 rounds: kept
          %e : bf16[T,8] = mul(%x, %x)
          %f : f32[T,8] = add(%d, %a)
          return %e, %f
        }
    """, 1),
    "neutral_element": ("""
        graph g(%x : f32[T,8], %i : i32[T,8]) {
          %one : f32[] = const(value=1.0, dtype=f32)
          %zero : f32[] = const(value=0, dtype=f32)
          %a : f32[T,8] = mul(%x, %one)
          %b : f32[T,8] = mul(%one, %a)
          %c : f32[T,8] = div(%b, %one)
          %d : f32[T,8] = add(%zero, %c)
          %e : f32[T,8] = sub(%d, %zero)
          %f : f32[T,8] = sub(%zero, %e)  # 0 - x is not x
          %g : f32[T,8] = div(%one, %f)  # 1 / x is not x
          %h : f32[T,8] = mul(%i, %one)  # i32 * f32 changes the type: kept
          %k : f32[T,8] = add(%g, %h)
          return %k
        }
    """, """
        graph g(%x : f32[T,8], %i : i32[T,8]) {
          %one : f32[] = const(value=1.0, dtype=f32)
          %zero : f32[] = const(value=0, dtype=f32)
          %f : f32[T,8] = sub(%zero, %x)  # 0 - x is not x
          %g : f32[T,8] = div(%one, %f)  # 1 / x is not x
          %h : f32[T,8] = mul(%i, %one)  # i32 * f32 changes the type: kept
          %k : f32[T,8] = add(%g, %h)
          return %k
        }
    """, 5),
    "square": ("""
        graph g(%x : f32[T,8], %i : i32[T,8]) {
          %two : f32[] = const(value=2.0, dtype=f32)
          %three : f32[] = const(value=3.0, dtype=f32)
          %a : f32[T,8] = pow(%x, %two)
          %b : f32[T,8] = pow(%x, %three)
          %c : f32[T,8] = pow(%i, %two)  # i32 ** f32 is f32: kept
          %d : f32[T,8] = add(%a, %b)
          %e : f32[T,8] = add(%d, %c)
          return %e
        }
    """, """
        graph g(%x : f32[T,8], %i : i32[T,8]) {
          %two : f32[] = const(value=2.0, dtype=f32)
          %three : f32[] = const(value=3.0, dtype=f32)
          %a : f32[T,8] = mul(%x, %x)
          %b : f32[T,8] = pow(%x, %three)
          %c : f32[T,8] = pow(%i, %two)  # i32 ** f32 is f32: kept
          %d : f32[T,8] = add(%a, %b)
          %e : f32[T,8] = add(%d, %c)
          return %e
        }
    """, 1),
    "reshape_noop": ("""
        graph g(%x : f32[T,8]) {
          %a : f32[T,8] = reshape(%x, shape=(T, 8))
          %b : f32[T,2,4] = reshape(%a, shape=(T, 2, 4))
          %c : f32[2*T,4] = reshape(%b, shape=(2*T, 4))
          %d : f32[T,8] = reshape(%c, shape=(T, 8))
          %e : f32[T,8] = exp(%d)
          return %e, %c
        }
    """, """
        graph g(%x : f32[T,8]) {
          %c : f32[2*T,4] = reshape(%x, shape=(2*T, 4))
          %e : f32[T,8] = exp(%x)
          return %e, %c
        }
    """, 4),
    "permute_compose": ("""
        graph g(%x : f32[2,T,8]) {
          %a : f32[2,T,8] = permute(%x, dims=(0, 1, 2))
          %b : f32[T,8,2] = permute(%a, dims=(1, 2, 0))
          %c : f32[2,T,8] = permute(%b, dims=(2, 0, 1))
          %d : f32[8,T,2] = permute(%b, dims=(1, 0, 2))
          %e : f32[2,T,8] = exp(%c)
          return %e, %d
        }
    """, """
        graph g(%x : f32[2,T,8]) {
          %d : f32[8,T,2] = permute(%x, dims=(2, 1, 0))
          %e : f32[2,T,8] = exp(%x)
          return %e, %d
        }
    """, 4),
}


def test_every_rule_has_a_text_case():
    assert sorted(RULE_CASES) == sorted(name for name, _ in FOLD_RULES)


@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_fold_rule_before_after(rule):
    before, expected, matches = RULE_CASES[rule]
    ctx = PassContext()
    after = apply_pass(before, "fold_constants", fold_constants, ctx)
    assert print_graph(after) == ir_text(expected)
    assert ctx.counts == {f"fold.{rule}": matches}
    assert ctx.notes == []


def test_returned_values_keep_their_names():
    """A rule that would alias a returned value away is skipped, so output names stay stable."""
    text = ir_text("""
        graph g(%x : f32[T,8]) {
          %one : f32[] = const(value=1.0, dtype=f32)
          %a : f32[T,8] = mul(%x, %one)
          %b : f32[T,8] = cast(%a, dtype=f32)
          %c : f32[T,8] = reshape(%b, shape=(T, 8))
          return %c, %a
        }
    """)
    after = apply_pass(text, "fold_constants", fold_constants)
    assert after.outputs == ("c", "a")
    assert print_graph(after) == ir_text("""
        graph g(%x : f32[T,8]) {
          %one : f32[] = const(value=1.0, dtype=f32)
          %a : f32[T,8] = mul(%x, %one)
          %c : f32[T,8] = reshape(%a, shape=(T, 8))
          return %c, %a
        }
    """)


def test_rules_combine_to_a_fixed_point():
    ctx = PassContext()
    after = apply_pass("""
        graph g(%x : f32[T,8]) {
          %h : f32[] = const(value=0.5, dtype=f32)
          %two : f32[] = const(value=2.0, dtype=f32)
          %one : f32[] = mul(%h, %two)
          %a : f32[T,8] = mul(%x, %one)
          %p : f32[8,T] = permute(%a, dims=(1, 0))
          %q : f32[T,8] = permute(%p, dims=(1, 0))
          %s : f32[T,8] = pow(%q, %two)
          return %s
        }
    """, "fold_constants", fold_constants, ctx)
    assert print_graph(after) == ir_text("""
        graph g(%x : f32[T,8]) {
          %s : f32[T,8] = mul(%x, %x)
          return %s
        }
    """)
    assert ctx.counts == {"fold.fold_const_pointwise": 1, "fold.neutral_element": 1, "fold.permute_compose": 2,
                          "fold.square": 1}


def test_calls_are_not_rewritten():
    text = ir_text("""
        kernel @k1_pointwise_cast(%x : f32[4]) family="pointwise" {
          %c : f32[4] = cast(%x, dtype=f32)
          return %c
        }

        graph g(%x : f32[4]) {
          %c : f32[4] = call @k1_pointwise_cast(%x)
          return %c
        }
    """)
    assert print_graph(apply_pass(text, "fold_constants", fold_constants)) == text


def test_step_cap_is_reported(monkeypatch):
    monkeypatch.setattr(cleanup, "MAX_REWRITE_STEPS", 1)
    ctx = PassContext()
    after = apply_pass(RULE_CASES["reshape_noop"][0], "fold_constants", fold_constants, ctx)
    assert any(n.startswith("fold_constants: stopped after") and "(step cap)" in n for n in ctx.notes)
    verify(after)


@given(graphs_with_inputs())
def test_fold_verifies_preserves_outputs_and_is_idempotent(gi):
    g, args = gi
    ctx = PassContext()
    once = fold_constants(g, ctx)
    verify(once)
    assert once.inputs == g.inputs and once.outputs == g.outputs
    assert_same_outputs(g, once, args)
    again_ctx = PassContext()
    assert fold_constants(once, again_ctx) == once
    assert again_ctx.counts == {}


@given(graphs_with_inputs())
def test_fold_leaves_nothing_to_fold(gi):
    g, _ = gi
    once = fold_constants(g, PassContext())
    types, prod = once.values(), once.producers()
    consts = {n.out.name for n in once.nodes if n.op == "const"}
    for n in once.nodes:
        returned = n.outputs[0].name in once.outputs
        src = prod.get(n.inputs[0]) if n.inputs else None
        if n.op in ("reshape", "permute"):
            assert returned or src is None or src.op != n.op, f"unfolded chain {src} -> {n}"
        if n.op == "reshape":
            assert returned or n.out.type != types[n.inputs[0]].type, f"no-op reshape {n}"
        if n.op == "permute":
            assert returned or n.attr("dims") != tuple(range(n.out.type.rank)), f"identity permute {n}"
        if n.op == "cast":
            assert returned or n.attr("dtype") != types[n.inputs[0]].type.dtype, f"no-op cast {n}"
        if n.op == "pow":
            assert cleanup._const_value(n.inputs[1], prod) != 2 or types[n.inputs[0]].type != n.out.type
        if n.op != "const" and n.inputs and all(i in consts for i in n.inputs) and n.out.type.rank == 0:
            assert cleanup.OPS[n.op].kind != "pointwise", f"unfolded constant expression {n}"


def test_parse_of_folded_text_is_stable():
    before, _, _ = RULE_CASES["fold_const_pointwise"]
    after = apply_pass(before, "fold_constants", fold_constants)
    assert parse(print_graph(after)) == after
