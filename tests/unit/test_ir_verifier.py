"""Verifier: SSA well-formedness and the op table's type rules; failures show the IR window
with the bad statement marked `>>`."""
from __future__ import annotations

import pickle
import textwrap

import pytest
from dsr_compiler.ir import DType, Graph, Kernel, TensorType, Value, parse, verify
from dsr_compiler.ir.errors import DsrError, VerifyError
from hypothesis import given
from strategies import graphs


def ir(text: str) -> str:
    return textwrap.dedent(text).strip("\n") + "\n"


GOOD = ir("""
    kernel @k1_pointwise_exp(%a : f32[T,8]) family="pointwise" {
      %e : f32[T,8] = exp(%a)
      return %e
    }

    graph g(%x : f32[T,8], param %w : f32[4,8]) {
      %a : f32[T,8] = neg(%x)
      %e : f32[T,8] = call @k1_pointwise_exp(%a)
      %s : f32[T,8] = softmax(%e, dim=-1)
      %l : f32[T,4] = linear(%s, %w)
      %m : f32[T,1] = sum(%l, dim=1, keepdim=True)
      return %m
    }
""")


def bad(old: str, new: str) -> str:
    """GOOD with one statement replaced (the replacement must be exact)."""
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


# (text, expected message fragment, the statement the >> marker must point at)
NODE_ERRORS = {
    "use_before_def": (bad("%a : f32[T,8] = neg(%x)", "%a : f32[T,8] = neg(%s)"),
                       "%s is used before it is defined", "%a : f32[T,8] = neg(%s)"),
    "self_use": (bad("%a : f32[T,8] = neg(%x)", "%a : f32[T,8] = neg(%a)"),
                 "%a is used before it is defined", "%a : f32[T,8] = neg(%a)"),
    "double_definition": (bad("%s : f32[T,8] = softmax", "%a : f32[T,8] = softmax").replace("linear(%s", "linear(%a"),
                          "%a is defined twice", "%a : f32[T,8] = softmax(%e, dim=-1)"),
    "redefines_input": (bad("%a : f32[T,8] = neg(%x)", "%x : f32[T,8] = neg(%x)")
                        .replace("call @k1_pointwise_exp(%a)", "call @k1_pointwise_exp(%x)"),
                        "%x is defined twice", "%x : f32[T,8] = neg(%x)"),
    "unknown_op": (bad("softmax(%e, dim=-1)", "frobnicate(%e, dim=-1)"),
                   "unknown op 'frobnicate'", "frobnicate(%e, dim=-1)"),
    "too_many_inputs": (bad("neg(%x)", "neg(%x, %x)"), "neg takes 1 inputs, got 2", "neg(%x, %x)"),
    "too_few_inputs": (bad("linear(%s, %w)", "linear(%s)"), "linear takes 2..3 inputs, got 1", "linear(%s)"),
    "wrong_declared_shape": (bad("%l : f32[T,4] = linear", "%l : f32[T,8] = linear"),
                             "linear declares f32[T,8] but its type rule gives f32[T,4]", "%l : f32[T,8] = linear(%s, %w)"),
    "wrong_declared_dtype": (bad("%a : f32[T,8] = neg", "%a : bf16[T,8] = neg"),
                             "neg declares bf16[T,8] but its type rule gives f32[T,8]", "%a : bf16[T,8] = neg(%x)"),
    "wrong_declared_rank": (bad("%m : f32[T,1] = sum", "%m : f32[T] = sum"),
                            "sum declares f32[T] but its type rule gives f32[T,1]", "%m : f32[T] = sum(%l, dim=1, keepdim=True)"),
    "type_rule_rejects_inputs": (bad("neg(%x)", "add(%x, %w)"), "add: cannot broadcast dims T and 4", "add(%x, %w)"),
    "type_rule_rejects_dtype": (bad("neg(%x)", "neg(%x)\n  %xb : bf16[T,8] = cast(%x, dtype=bf16)")
                                .replace("linear(%s, %w)", "linear(%xb, %w)"),
                                "linear: x and weight need the same float dtype, got bf16 and f32", "linear(%xb, %w)"),
    "unknown_attribute": (bad("softmax(%e, dim=-1)", "softmax(%e, dim=-1, temperature=2.0)"),
                          "softmax has no attribute 'temperature'", "softmax(%e, dim=-1, temperature=2.0)"),
    "attribute_wrong_type": (bad("softmax(%e, dim=-1)", "softmax(%e, dim=1.5)"),
                             "attribute dim=1.5 should be int", "softmax(%e, dim=1.5)"),
    "attribute_wrong_type_bool": (bad("keepdim=True", 'keepdim="yes"'),
                                  "attribute keepdim='yes' should be bool", 'sum(%l, dim=1, keepdim="yes")'),
    "missing_attribute": (bad("softmax(%e, dim=-1)", "softmax(%e)"), "softmax needs attribute 'dim'", "softmax(%e)"),
    "attribute_out_of_range": (bad("softmax(%e, dim=-1)", "softmax(%e, dim=2)"), "dim 2 out of range for rank 2",
                               "softmax(%e, dim=2)"),
    "undefined_kernel": (bad("call @k1_pointwise_exp(%a)", "call @k9_pointwise_exp(%a)"),
                         "call to undefined kernel @k9_pointwise_exp", "call @k9_pointwise_exp(%a)"),
    "call_argument_type": (bad("%a : f32[T,8] = neg(%x)", "%a : f32[T,8] = neg(%x)\n  %b : bf16[T,8] = cast(%a, dtype=bf16)")
                           .replace("call @k1_pointwise_exp(%a)", "call @k1_pointwise_exp(%b)"),
                           "call @k1_pointwise_exp: argument types ['bf16[T,8]'] do not match the kernel's ['f32[T,8]']",
                           "call @k1_pointwise_exp(%b)"),
    "call_argument_count": (bad("call @k1_pointwise_exp(%a)", "call @k1_pointwise_exp(%a, %x)"),
                            "do not match the kernel's", "call @k1_pointwise_exp(%a, %x)"),
    "call_result_type": (bad("%e : f32[T,8] = call", "%e : f32[T,4] = call"),
                         "call declares f32[T,4] but its type rule gives f32[T,8]", "%e : f32[T,4] = call"),
}


@pytest.mark.parametrize("case", sorted(NODE_ERRORS))
def test_verifier_catches_and_marks_the_statement(case):
    text, what, marked = NODE_ERRORS[case]
    g = parse(text, verify=False)   # the verifier under test reports it
    with pytest.raises(VerifyError) as ei:
        verify(g)
    err = ei.value
    msg = str(err)
    assert err.what.startswith("verify: ")
    assert what in msg, msg
    assert "in graph g, statement" in msg
    marked_lines = [ln for ln in msg.splitlines() if ln.lstrip().startswith(">> ")]
    assert len(marked_lines) == 1, msg
    assert marked in marked_lines[0], msg


def test_window_shows_neighbours_only():
    lines = [f"  %v{i} : f32[4] = neg(%v{i - 1})" for i in range(1, 12)]
    lines[6] = "  %v7 : f32[5] = neg(%v6)"
    text = "graph long(%v0 : f32[4]) {\n" + "\n".join(lines) + "\n  return %v11\n}\n"
    with pytest.raises(VerifyError) as ei:
        verify(parse(text))
    window = ei.value.where
    assert "statement 6:" in window
    assert ">> %v7 : f32[5] = neg(%v6)" in window
    shown = [ln.strip().lstrip(">").strip() for ln in window.splitlines()[1:]]
    assert shown == [f"%v{i} : f32[{5 if i == 7 else 4}] = neg(%v{i - 1})" for i in range(4, 11)]


def test_error_inside_kernel_names_the_kernel():
    text = GOOD.replace("%e : f32[T,8] = exp(%a)", "%e : f32[T,8] = exp(%q)")
    with pytest.raises(VerifyError) as ei:
        verify(parse(text))
    msg = str(ei.value)
    assert "%q is used before it is defined (inside kernel @k1_pointwise_exp)" in msg
    assert ">> %e : f32[T,8] = exp(%q)" in msg
    assert "in graph k1_pointwise_exp, statement 0" in msg


def test_graph_returning_undefined_value():
    with pytest.raises(VerifyError, match=r"graph g returns undefined %nope"):
        verify(parse(GOOD.replace("return %m\n}", "return %m, %nope\n}")))


def test_kernel_returning_undefined_value():
    with pytest.raises(VerifyError, match=r"graph k1_pointwise_exp returns undefined %zz \(inside kernel @k1_pointwise_exp\)"):
        verify(parse(GOOD.replace("return %e\n}", "return %zz\n}")))


def test_graph_returning_nothing():
    with pytest.raises(VerifyError, match="returns nothing"):
        verify(parse("graph g(%x : f32[4]) {\n  return\n}\n"))


def test_kernel_defined_twice():
    g = parse(GOOD)
    g2 = g.replace(kernels=g.kernels * 2)
    with pytest.raises(VerifyError, match="kernel @k1_pointwise_exp defined twice"):
        verify(g2)


def test_nested_kernels_rejected():
    g = parse(GOOD)
    k = g.kernels[0]
    nested = Kernel(k.name, k.family, k.body.replace(kernels=(k,)))
    with pytest.raises(VerifyError, match="defines nested kernels"):
        verify(g.replace(kernels=(nested,)))


def test_input_declared_twice_and_param_not_input():
    g = parse(GOOD)
    with pytest.raises(VerifyError, match="input %x declared twice"):
        verify(g.replace(inputs=g.inputs + (Value("x", TensorType(DType.f32, (4,))),)))
    with pytest.raises(VerifyError, match="param %bias is not an input"):
        verify(g.replace(params=("w", "bias")))


def test_good_graph_passes_and_is_returned():
    g = parse(GOOD)
    assert verify(g) is g


def test_symbolically_equal_types_are_accepted():
    # (T+1)*2 and 2*T+2 are the same size; the verifier compares dims by simplification
    text = ir("""
        graph g(%x : f32[2*T+2]) {
          %y : f32[2,T+1] = reshape(%x, shape=(2, T+1))
          %z : f32[2*T+2] = reshape(%y, shape=(2*T+2,))
          return %z
        }
    """)
    verify(parse(text))


def test_verify_error_is_a_picklable_dsr_error():
    with pytest.raises(VerifyError) as ei:
        verify(parse(NODE_ERRORS["unknown_op"][0]))
    err = ei.value
    assert isinstance(err, DsrError) and err.exit_code == 2
    assert err.hint == "ops are declared in ir/ops/"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is VerifyError and str(again) == str(err)


@given(graphs())
def test_random_graphs_verify(g: Graph):
    assert verify(g) is g
