"""Printer/parser: the text IR round-trips (`parse(str(g)) == g`), prints deterministically,
and parse errors name the line."""
from __future__ import annotations

import re
import textwrap

import pytest
import sympy
from dsr_compiler.ir import (
    DType,
    Graph,
    GraphBuilder,
    Kernel,
    Node,
    TensorType,
    Value,
    parse,
    parse_type,
    print_graph,
    sym,
)
from dsr_compiler.ir.errors import ParseError
from dsr_compiler.ir.passes import PIPELINE, run_passes
from dsr_compiler.ir.printer import format_attr, header_line
from hypothesis import given
from hypothesis import strategies as st
from strategies import attr_names, attr_values, graphs, origins, tensor_types

T, B = sym("T"), sym("B")


def ir(text: str) -> str:
    return textwrap.dedent(text).strip("\n") + "\n"


def assert_roundtrip(g: Graph, verify: bool = True) -> str:
    """`verify=False` only for graphs of made-up ops (`custom_op`), which the verifier refuses."""
    text = print_graph(g)
    back = parse(text, verify=verify)
    assert back == g, f"round trip changed the graph:\n{text}\n---\n{print_graph(back)}"
    assert print_graph(back) == text
    return text


MLP = ir("""
    graph mlp(%x : f32[T,256], param %norm.weight : f32[256], param %w1 : f32[512,256], param %w3 : f32[512,256], param %w2 : f32[256,512]) {
      %h : f32[T,256] = rms_norm(%x, %norm.weight, eps=1e-06)  # layers.0.ffn_norm
      %a : f32[T,512] = linear(%h, %w1)  # layers.0.mlp.w1
      %b : f32[T,512] = linear(%h, %w3)  # layers.0.mlp.w3
      %s : f32[T,512] = silu(%a)  # layers.0.mlp
      %m : f32[T,512] = mul(%s, %b)  # layers.0.mlp
      %o : f32[T,256] = linear(%m, %w2)  # layers.0.mlp.w2
      %r : f32[T,256] = add(%x, %o)
      return %r
    }
""")

FUSED = ir("""
    kernel @k1_reduction_rms_norm(%x : f32[T,8], %w : f32[8]) family="reduction" {
      %y : f32[T,8] = rms_norm(%x, %w, eps=1e-06)  # model.norm
      return %y
    }

    kernel @k2_pointwise_mul_add(%y : f32[T,8], %z : bf16[T,8]) family="pointwise" {
      %c : f32[] = const(value=0.5, dtype=f32)
      %a : f32[T,8] = mul(%y, %c)
      %b : f32[T,8] = add(%a, %z)
      return %a, %b
    }

    graph g(%x : f32[T,8], %z : bf16[T,8], param %w : f32[8]) {
      %y : f32[T,8] = call @k1_reduction_rms_norm(%x, %w)  # model.norm
      %a, %b : f32[T,8], f32[T,8] = call @k2_pointwise_mul_add(%y, %z)
      %r : f32[2,T,4] = reshape(%b, shape=(2, T, 4))
      return %r, %a
    }
""")


# ----------------------------------------------------------------------------- hand-written graphs

@pytest.mark.parametrize("text", [MLP, FUSED], ids=["mlp", "fused"])
def test_text_roundtrips_exactly(text):
    g = parse(text)
    assert print_graph(g) == text
    assert_roundtrip(g)


def test_parsed_graph_structure():
    g = parse(MLP)
    assert g.name == "mlp"
    assert [v.name for v in g.inputs] == ["x", "norm.weight", "w1", "w3", "w2"]
    assert g.params == ("norm.weight", "w1", "w3", "w2")
    assert g.inputs[0].type == TensorType(DType.f32, (T, 256))
    assert g.nodes[0].attr("eps") == 1e-06
    assert g.nodes[0].origin == "layers.0.ffn_norm"
    assert g.nodes[6].origin == ""
    assert g.outputs == ("r",)


def test_kernels_and_calls_parse():
    g = parse(FUSED)
    assert [k.name for k in g.kernels] == ["k1_reduction_rms_norm", "k2_pointwise_mul_add"]
    assert g.kernels[1].family == "pointwise"
    assert g.kernels[1].body.outputs == ("a", "b")
    call = g.nodes[1]
    assert call.op == "call" and call.attr("kernel") == "k2_pointwise_mul_add"
    assert [o.name for o in call.outputs] == ["a", "b"]
    assert g.nodes[2].attr("shape") == (2, T, 4)


def test_comments_and_header_are_ignored():
    g = parse(MLP)
    text = header_line(g, 3, 8, "fuse", 0.71) + "\n# a comment line\n\n" + MLP.replace("{\n", "{\n  # inside\n", 1)
    assert text.startswith("# dsr-ir 1 | graph mlp | after 3/8 fuse (0.7 ms) | verify ok")
    assert parse(text) == g
    assert print_graph(g, header="# dsr-ir 1 | graph mlp") == "# dsr-ir 1 | graph mlp\n" + MLP


def _node_with(attrs: dict, origin: str = "") -> Graph:
    b = GraphBuilder("attrs")
    b.add_input("x", TensorType(DType.f32, (T, 4)))
    b.add(Node((Value("y", TensorType(DType.f32, (T, 4))),), "custom_op", ("x",), attrs, origin))
    return b.build(["y"])


ATTR_CASES = {
    "ints": ({"a": 0, "b": 7, "c": 1 << 70}, "a=0, b=7, c=1180591620717411303424"),
    "negative_ints": ({"dim": -1, "start": -12}, "dim=-1, start=-12"),
    "floats": ({"eps": 1e-06, "s": 0.5, "big": 1e30, "neg": -2.5, "whole": 3.0}, "eps=1e-06, s=0.5, big=1e+30, neg=-2.5, whole=3.0"),
    "inf": ({"lo": float("-inf"), "hi": float("inf")}, "lo=-inf, hi=inf"),
    "tiny": ({"d": 5e-324, "z": -0.0}, "d=5e-324, z=-0.0"),
    "strings": ({"s": 'say "hi" # not a comment', "e": ""}, r's="say \"hi\" # not a comment", e=""'),
    "odd_quotes": ({"s": 'a"b, c=(d'}, r's="a\"b, c=(d"'),
    "backslash": ({"s": "C:\\temp\\", "t": "it's"}, r's="C:\\temp\\", t="it' + "'" + 's"'),
    "bools_none": ({"causal": True, "keepdim": False, "end": None}, "causal=True, keepdim=False, end=None"),
    "dtypes": ({"dtype": DType.bf16, "to": DType.fp8e4m3}, "dtype=bf16, to=fp8e4m3"),
    "tuples": ({"shape": (2 * T, 4), "one": (3,), "empty": (), "nested": ((1, -2), (T + 1,), ("x", None))},
               'shape=(2*T, 4), one=(3,), empty=(), nested=((1, -2), (T+1,), ("x", None))'),
    "symbolic": ({"n": T, "m": B * T, "k": T - 1}, "n=T, m=B*T, k=T-1"),
    "list_becomes_tuple": ({"dims": [1, 0]}, "dims=(1, 0)"),
}


@pytest.mark.parametrize("case", sorted(ATTR_CASES))
def test_attribute_kinds_roundtrip(case):
    attrs, printed = ATTR_CASES[case]
    g = _node_with(attrs)
    text = assert_roundtrip(g, verify=False)
    assert f"custom_op(%x, {printed})" in text


def test_sympy_integer_attrs_become_ints():
    g = _node_with({"shape": (sympy.Integer(4), T)})
    assert g.nodes[0].attr("shape") == (4, T)
    assert type(g.nodes[0].attr("shape")[0]) is int
    assert_roundtrip(g, verify=False)


@pytest.mark.parametrize("origin", ["layers.0.mlp.w1", "model.layers.11.attn.wq_a", "a#b", "x = y(z)"])
def test_origins_roundtrip(origin):
    g = _node_with({"k": 1}, origin)
    text = assert_roundtrip(g, verify=False)
    assert text.splitlines()[1].endswith(f"  # {origin}")


def test_kernel_attributes_roundtrip():
    body = parse(ir("""
        graph k1_pointwise_neg(%x : f32[T]) {
          %y : f32[T] = neg(%x)
          return %y
        }
    """))
    k = Kernel("k1_pointwise_neg", "pointwise", body,
               {"tile": (64, 128), "note": 'a) b "c" #d', "warps": 4, "hint": T})
    top = parse("graph g(%x : f32[T]) {\n  %y : f32[T] = call @k1_pointwise_neg(%x)\n  return %y\n}\n",
                verify=False)   # the kernel is attached below
    g = top.replace(kernels=(k,))
    text = assert_roundtrip(g)
    assert 'family="pointwise" tile=(64, 128) note="a) b \\"c\\" #d" warps=4 hint=T {' in text


def test_symbolic_and_odd_shapes_roundtrip():
    b = GraphBuilder("shapes")
    x = b.add_input("x", TensorType(DType.f32, (T, 8)))
    types = [TensorType(DType.f32, ()), TensorType(DType.bool, (2 * T, B * T, 1)),
             TensorType(DType.fp8e5m2, (sympy.ceiling(T / 2), sympy.Min(4, T))), TensorType(DType.i64, (T + 1,))]
    for i, t in enumerate(types):
        b.add(Node((Value(f"v{i}", t),), "custom_op", (x.name,)))
    b.add(Node(tuple(Value(f"m{i}", t) for i, t in enumerate(types)), "multi", ("x", "v0")))
    assert_roundtrip(b.build(["v0", "m3"]), verify=False)


@given(tensor_types())
def test_types_roundtrip(t):
    assert parse_type(str(t)) == t
    assert " " not in str(t)


@given(st.dictionaries(attr_names, attr_values, max_size=4), origins)
def test_random_attributes_roundtrip(attrs, origin):
    assert_roundtrip(_node_with(attrs, origin), verify=False)


@given(graphs())
def test_random_graphs_roundtrip(g):
    assert_roundtrip(g)


@given(graphs(max_steps=6))
def test_random_graphs_roundtrip_after_each_pass(g):
    for rec in run_passes(g, PIPELINE):
        assert_roundtrip(rec.graph)


# ----------------------------------------------------------------------------- determinism

def test_printing_is_deterministic():
    g1, g2 = parse(FUSED), parse(FUSED)
    assert g1 is not g2
    assert print_graph(g1) == print_graph(g1) == print_graph(g2) == str(g1)
    assert not re.search(r"0x[0-9a-f]{6,}|object at|/tmp|/work", print_graph(g1))


@given(graphs())
def test_printing_random_graphs_is_deterministic(g):
    text = print_graph(g)
    assert print_graph(g) == text
    assert print_graph(parse(text)) == text
    assert "object at" not in text and "0x" not in text


def test_format_attr_rejects_unprintable_values():
    with pytest.raises(TypeError):
        format_attr(object())
    with pytest.raises(TypeError):
        Node((), "custom_op", (), {"bad": {1: 2}})


# ----------------------------------------------------------------------------- parse errors

GOOD = "graph g(%x : f32[T,8]) {\n  %y : f32[T,8] = neg(%x)\n  return %y\n}\n"

PARSE_ERRORS = {
    "bad_type_in_signature": ("graph g(%x : f33[T,8]) {\n  return %x\n}\n", 1, "bad type"),
    "bad_type_in_statement": ("graph g(%x : f32[T,8]) {\n  %y : f32[T,8 = neg(%x)\n  return %y\n}\n", 2, "bad type"),
    "bad_dim": ("graph g(%x : f32[T,8]) {\n  %y : f32[T,(8] = neg(%x)\n  return %y\n}\n", 2, "bad type"),
    "missing_return": ("graph g(%x : f32[T,8]) {\n  %y : f32[T,8] = neg(%x)\n}\n", 3, "no return"),
    "unclosed_block": ("graph g(%x : f32[T,8]) {\n  %y : f32[T,8] = neg(%x)\n  return %y\n", 1, "not closed"),
    "unclosed_kernel": ("kernel @k(%x : f32[T]) family=\"pointwise\" {\n  return %x\n", 1, "not closed"),
    "unknown_top_level": ("# header\nfunc g(%x : f32[T,8]) {\n  return %x\n}\n", 2, "expected `kernel"),
    "unknown_statement": ("graph g(%x : f32[T,8]) {\n  %y : f32[T,8] = neg %x\n  return %y\n}\n", 2, "cannot read op call"),
    "untyped_statement": ("graph g(%x : f32[T,8]) {\n  %y = neg(%x)\n  return %y\n}\n", 2, "needs `%out : type"),
    "names_types_mismatch": ("graph g(%x : f32[T,8]) {\n  %y, %z : f32[T,8] = neg(%x)\n  return %y\n}\n", 2, "2 names but 1 types"),
    "bad_value_name": ("graph g(%x : f32[T,8]) {\n  y : f32[T,8] = neg(%x)\n  return y\n}\n", 2, "bad value name"),
    "attr_before_value": ("graph g(%x : f32[T,8]) {\n  %y : f32[T,8] = add(%x, k=1, %x)\n  return %y\n}\n", 2, "before attributes"),
    "bad_argument": ("graph g(%x : f32[T,8]) {\n  %y : f32[T,8] = neg(%x, 3)\n  return %y\n}\n", 2, "bad argument"),
    "bad_attr_value": ("graph g(%x : f32[T,8]) {\n  %y : f32[T,8] = neg(%x, k=1+)\n  return %y\n}\n", 2, "bad attribute value"),
    "bad_param": ("graph g(x : f32[T,8]) {\n  return %x\n}\n", 1, "bad parameter"),
    "bad_return": ("graph g(%x : f32[T,8]) {\n  return x\n}\n", 2, "bad return value"),
    "statement_after_return": ("graph g(%x : f32[T,8]) {\n  return %x\n  %y : f32[T,8] = neg(%x)\n}\n", 3, "after return"),
    "text_after_graph": (GOOD + "graph h(%x : f32[T]) {\n  return %x\n}\n", 5, "text after the graph"),
    "kernel_without_family": ("kernel @k(%x : f32[T]) {\n  return %x\n}\n" + GOOD, 1, "family"),
    "bad_kernel_attr": ("kernel @k(%x : f32[T]) family=\"pointwise\" tile {\n  return %x\n}\n" + GOOD, 1, "bad kernel attribute"),
}


@pytest.mark.parametrize("case", sorted(PARSE_ERRORS))
def test_parse_errors_name_the_line(case):
    text, line, what = PARSE_ERRORS[case]
    with pytest.raises(ParseError) as ei:
        parse(text)
    msg = str(ei.value)
    assert what in msg
    assert f"line {line}:" in msg, msg


def test_parse_error_without_graph():
    with pytest.raises(ParseError, match="no graph block"):
        parse("# only a comment\n\n")


def test_parse_error_is_picklable():
    import pickle
    with pytest.raises(ParseError) as ei:
        parse(PARSE_ERRORS["bad_type_in_statement"][0])
    again = pickle.loads(pickle.dumps(ei.value))
    assert str(again) == str(ei.value)


# ----------------------------------------------------------------------------- the zoo's IR

@pytest.mark.parametrize("module, phase, fp8", [("decoder", "decode", True), ("decoder", "prefill", False),
                                                ("moe", None, True)])
def test_zoo_ir_roundtrips_verified_after_every_pass(module, phase, fp8):
    """Every dim and attribute the printer emits for real models (ceiling(T/128), 8*T+16128, Min(16,4*T),
    kernel families, FP8 policies) reads back exactly through the expression grammar, and verifies."""
    from dsr_compiler.frontend import trace
    from dsr_compiler.ir.passes import Fp8Policy
    from dsr_compiler.ir.passes.manager import PassContext
    from dsr_compiler.models import ModelConfig
    from dsr_compiler.workloads import build
    wl = build(ModelConfig.named("deepseek-v3-tiny"), module, 1, 8, **({"phase": phase} if phase else {}))
    g = trace(wl.module, wl.example_inputs, dynamic=wl.dynamic, name=wl.name)
    ctx = PassContext(options={"fp8": Fp8Policy.from_option(fp8) or False, "target": "sm_90a", "mla": "absorb"})
    for r in run_passes(g, list(PIPELINE), ctx):
        assert_roundtrip(r.graph)
