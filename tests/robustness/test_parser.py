"""Text IR is data, never code: hostile `.ir` text gets a ParseError and executes nothing, every
input bound holds (length, nesting, digits, exponents), `parse` takes only str and verifies by
default, no project source evaluates text, and names/origins cannot escape generated sources."""
from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest
import sympy
from dsr_compiler.ir import DType, GraphBuilder, Kernel, Node, TensorType, Value, parse, print_graph, sym
from dsr_compiler.ir.dimexpr import MAX_CHARS, MAX_DEGREE, MAX_DEPTH, parse_value_text
from dsr_compiler.ir.errors import ParseError, VerifyError
from dsr_compiler.ir.types import dim_str, parse_dim, parse_type, to_expr
from dsr_compiler.ir.verifier import KERNEL_FAMILIES
from hypothesis import given
from hypothesis import strategies as st

T, B, S = sym("T"), sym("B"), sym("S")
ROOT = Path(__file__).resolve().parents[2]

GOOD = ('kernel @k1_pointwise_neg(%x : f32[T,8]) family="pointwise" {\n'
        '  %y : f32[T,8] = neg(%x)  # layers.0\n'
        '  return %y\n'
        '}\n\n'
        'graph g(%x : f32[T,8]) {\n'
        '  %y : f32[T,8] = call @k1_pointwise_neg(%x)  # layers.0\n'
        '  %r : f32[2,T,4] = reshape(%y, shape=(2, T, 4))\n'
        '  return %r\n'
        '}\n')


def payloads(canary: Path) -> list[str]:
    """Texts that `sympy.sympify` evaluates as Python; the first creates `canary` through a
    `().__class__.__base__` chain (it did before dims had their own grammar)."""
    touch = f"'touch {canary}'"
    return [
        "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'catch_warnings'][0]()"
        f"._module.__builtins__['__import__']('os').system({touch})",
        "().__class__.__base__.__subclasses__()",
        f"__import__('os').system({touch})",
        f"(lambda: __import__('os').system({touch}))()",
        "T.__class__",
        "__class__",
        "__builtins__",
        "open('/etc/passwd')",
        "'T'",
        '"T" + "1"',
        "T if T else 1",
        "[T for T in (1,)]",
        "T; 1",
        "T == 1",
    ]


# Where a hostile expression can sit in a text IR file.
PLACES = {
    "input_dim": lambda p: GOOD.replace("graph g(%x : f32[T,8])", f"graph g(%x : f32[T,{p}])"),
    "statement_dim": lambda p: GOOD.replace("%r : f32[2,T,4]", f"%r : f32[2,T,{p}]"),
    "node_attr": lambda p: GOOD.replace("shape=(2, T, 4)", f"shape={p}"),
    "tuple_attr": lambda p: GOOD.replace("shape=(2, T, 4)", f"shape=(2, {p}, 4)"),
    "kernel_attr": lambda p: GOOD.replace('family="pointwise" {', f'family="pointwise" tile={p} {{'),
    "kernel_family": lambda p: GOOD.replace('family="pointwise"', f"family={p}"),
    "kernel_dim": lambda p: GOOD.replace("@k1_pointwise_neg(%x : f32[T,8])", f"@k1_pointwise_neg(%x : f32[T,{p}])"),
}


@pytest.mark.parametrize("place", sorted(PLACES))
def test_injection_payloads_are_parse_errors_and_run_nothing(place, tmp_path):
    canary = tmp_path / "canary"
    for p in payloads(canary):
        text = PLACES[place](p)
        assert text != GOOD
        with pytest.raises(ParseError):
            parse(text)
        assert not canary.exists(), f"{place}: {p!r} ran code"


@pytest.mark.parametrize("read", [parse_dim, parse_value_text, lambda p: parse_type(f"f32[{p}]")],
                         ids=["dim", "attr", "type"])
def test_injection_payloads_in_each_reader(read, tmp_path):
    canary = tmp_path / "canary"
    for p in payloads(canary):
        with pytest.raises(ParseError):
            read(p)
        assert not canary.exists(), p


def test_the_good_text_parses():
    g = parse(GOOD)
    assert print_graph(g) == GOOD and parse(print_graph(g)) == g
    assert g.nodes[1].attr("shape") == (2, T, 4)


# ----------------------------------------------------------------------------- bounds

def _quick(fn, *args) -> Exception:
    t0 = time.perf_counter()
    with pytest.raises(ParseError) as ei:
        fn(*args)
    assert time.perf_counter() - t0 < 3.0, f"took {time.perf_counter() - t0:.1f}s"
    return ei.value


BOUNDED = {
    "deep_parens": "(" * 100_000 + "T" + ")" * 100_000,
    "deep_within_length": "(" * (MAX_DEPTH + 1) + "T" + ")" * (MAX_DEPTH + 1),
    "deep_signs": "-" * (MAX_DEPTH + 2) + "T",
    "deep_calls": "floor(" * 40 + "T" + ")" * 40,
    "deep_max": "Max(" * 30 + "T" + ", 1)" * 30,
    "long_sum": "+".join(["T"] * 50_000),
    "long_at_limit": "T+" * (MAX_CHARS // 2) + "1",
    "huge_literal": "1" + "0" * 100,
    "giant_literal": "9" * 100_000,
    "tower": "2**2**2**2**99",
    "big_exponent": "T**100000",
    "power_of_power": "(10**64)**64",
    "product_growth": "*".join(["99999999999999999999"] * 60),
    "symbolic_exponent": "2**T",
    "division_by_zero": "T/(T-T)",
    "mod_by_zero": "Mod(T, 0)",
    "too_many_max_args": "Max(" + ", ".join(f"a{i}" for i in range(40)) + ")",
    "high_degree": "*".join(["(T+1)"] * 7),
    "many_symbols": "+".join(f"a{i}" for i in range(7)),
    "many_calls": "+".join(["floor(T/2)"] * 9),
}


@pytest.mark.parametrize("case", sorted(BOUNDED))
def test_dims_are_bounded(case):
    e = _quick(parse_dim, BOUNDED[case])
    assert "RecursionError" not in repr(e)


@pytest.mark.parametrize("case", ["deep_parens", "deep_within_length", "long_sum", "giant_literal", "tower"])
def test_attrs_and_whole_files_are_bounded(case):
    p = BOUNDED[case]
    _quick(parse_value_text, p)
    _quick(parse_value_text, "(" + p + ",)")
    _quick(parse, PLACES["node_attr"](p))
    _quick(parse, PLACES["statement_dim"](p))
    nested_tuples = "(" * 100_000 + ")" * 100_000
    _quick(parse_value_text, nested_tuples)


@pytest.mark.parametrize("dim", ["(a+b+c+d+e+f+1)**6", "floor((a+b+c+d+e+f+1)**6/7)",
                                 "Mod((a+b+c+d+e+f+1)**6, 7)+Max(a,b)*ceiling(c/3)**4"])
def test_verifying_hostile_dims_is_bounded(dim):
    """Dims at the grammar's limits that disagree with the type rule: the verifier says so quickly
    (sympy.simplify took minutes on these)."""
    t0 = time.perf_counter()
    with pytest.raises(VerifyError, match="declares"):
        parse(GOOD.replace("%r : f32[2,T,4]", f"%r : f32[2,T,{dim}]"))
    assert time.perf_counter() - t0 < 5.0


_GRAMMAR_BITS = st.sampled_from(["T", "B", "0", "1", "7", "99999", "(", ")", ",", "+", "-", "*", "/", "//", "%", "**",
                                  "[", "]", '"', "\\", ".", "e", "5.", "inf", "None", "f32", "floor(", "Max(",
                                  "Mod(", "ceiling(", " ", "__class__", "'", "lambda", ":"])


@given(st.lists(_GRAMMAR_BITS, max_size=24).map("".join))
def test_any_text_reads_or_is_a_parse_error(text):
    for read in (parse_dim, parse_value_text):
        t0 = time.perf_counter()
        try:
            read(text)
        except ParseError:
            pass
        assert time.perf_counter() - t0 < 3.0


@given(st.integers(0, len(GOOD)), st.integers(0, 12), st.lists(st.one_of(_GRAMMAR_BITS, st.sampled_from(
    ["%x", "%y", "@k1_pointwise_neg", "{", "}", "\n", "#", "=", "return", "kernel", "graph", "family="])), max_size=6))
def test_mutated_ir_text_is_a_dsr_error(at, cut, bits):
    from dsr_compiler.ir.errors import DsrError
    text = GOOD[:at] + "".join(bits) + GOOD[at + cut:]
    try:
        parse(text)
    except DsrError:
        pass


def test_limits_are_generous_for_real_sizes():
    assert parse_dim("10**40") == sympy.Integer(10) ** 40
    assert parse_dim("(" * MAX_DEPTH + "T" + ")" * MAX_DEPTH) == T
    assert parse_value_text(str(1 << 70)) == 1 << 70 and parse_value_text("-9223372036854775808") == -(1 << 63)
    assert parse_dim("T**-2") == T ** -2 and parse_dim("T//4 + T%4") == sympy.floor(T / 4) + sympy.Mod(T, 4)


# ----------------------------------------------------------------------------- parse's contract

@pytest.mark.parametrize("bad", [GOOD.encode(), bytearray(GOOD.encode()), Path("g.ir"), None, 3, [GOOD]],
                         ids=["bytes", "bytearray", "path", "none", "int", "list"])
def test_parse_takes_only_str(bad):
    with pytest.raises(TypeError, match="takes the IR text as a str"):
        parse(bad)


def test_parse_verifies_by_default():
    bad = GOOD.replace("= neg(%x)  # layers.0", "= neg(%nope)  # layers.0")
    with pytest.raises(VerifyError, match="used before it is defined"):
        parse(bad)
    g = parse(bad, verify=False)
    assert g.kernels[0].body.nodes[0].inputs == ("nope",)


@pytest.mark.parametrize("family", ['"nonsense"', "nonsense", '""', '"pointwise "', "1"])
def test_unknown_kernel_family_is_a_verifier_error(family):
    text = GOOD.replace('family="pointwise"', f"family={family}")
    with pytest.raises(VerifyError, match="unknown family"):
        parse(text)
    parse(text, verify=False)       # it reads; it just is not a kernel codegen can lower


def test_kernel_families_match_the_codegen_registry():
    from dsr_compiler.codegen.families import FAMILY_NAMES
    assert sorted(FAMILY_NAMES) == sorted(KERNEL_FAMILIES)


@pytest.mark.parametrize("origin", ["a\x00b", "a\x1b[2Jb", "a\tb"])
def test_origins_are_printable(origin):
    with pytest.raises(ParseError, match="control characters"):
        parse(GOOD.replace("# layers.0\n  %r", f"# {origin}\n  %r"))


@pytest.mark.parametrize("text", ["%y : f32[T,8] = neg(%x, __class__=1)", "%y : f32[T,8] = neg(%x, k=os.system)",
                                  "%y : f32[T,8] = neg(%x, K=1)", "%y : f32[T,8] = neg(%x, k=1, k=(1)(2))"])
def test_odd_attribute_keys_and_values(text):
    with pytest.raises((ParseError, VerifyError)):     # a dunder key is only a string: the op refuses it
        parse(GOOD.replace("%y : f32[T,8] = neg(%x)", text))


def test_reserved_names_are_not_symbols():
    for name in ["floor", "Max", "ceil", "__class__", "lambda", "None", "inf", "nan", "f32", "bool", "a.b", "1T", ""]:
        with pytest.raises(ValueError):
            sym(name)


def test_to_expr_is_typed():
    assert to_expr(3) == 3 and to_expr(T) is T and to_expr("2*T") == 2 * T and to_expr(0.5) == sympy.Float(0.5)
    for bad in [None, True, [1], object(), b"T"]:
        with pytest.raises(TypeError):
            to_expr(bad)
    with pytest.raises(ParseError):
        to_expr("__import__('os')")


# ----------------------------------------------------------------------------- round trips

PRINTED_DIMS = ["T", "2*T", "B*T", "S*T", "T+1", "T-1", "8*T+16128", "256*T+65536", "Min(4,T)", "Max(4,T)",
                "ceiling(T/128)", "2*ceiling(T/32)", "ceiling(B/4)+15", "ceiling(B/16+63/4)", "T*(T+1)/2",
                "ceiling(S/64)*ceiling(T/3)", "floor(T/2)+Max(4,T)+Min(2,T)", "Mod(T,4)", "T**2", "-T", "T/2"]


@pytest.mark.parametrize("text", PRINTED_DIMS)
def test_printed_dims_read_back_as_themselves(text):
    d = parse_dim(text)
    assert dim_str(d) == text
    assert parse_dim(dim_str(d)) == d


_atoms = st.one_of(st.integers(0, 300).map(sympy.Integer), st.sampled_from([T, B, S]))


def _combine(inner: st.SearchStrategy) -> st.SearchStrategy:
    pos = st.one_of(st.integers(1, 9).map(sympy.Integer), st.sampled_from([T, B]))
    return st.one_of(
        st.tuples(inner, inner).map(lambda a: a[0] + a[1]),
        st.tuples(inner, inner).map(lambda a: a[0] - a[1]),
        st.tuples(inner, inner).map(lambda a: a[0] * a[1]),
        st.tuples(inner, pos).map(lambda a: sympy.floor(a[0] / a[1])),
        st.tuples(inner, pos).map(lambda a: sympy.ceiling(a[0] / a[1])),
        st.tuples(inner, pos).map(lambda a: sympy.Mod(a[0], a[1])),
        st.tuples(inner, inner).map(lambda a: sympy.Max(*a)),
        st.tuples(inner, inner).map(lambda a: sympy.Min(*a)),
        st.tuples(inner, st.integers(1, 3)).map(lambda a: a[0] ** a[1]),
    )


dim_exprs = st.recursive(_atoms, _combine, max_leaves=8)


def _canonical(e: sympy.Expr) -> bool:
    """False when sympy's own Min/Max folding left a number-only Min/Max inside `e` (it does, e.g.
    `Min(Mod(T, 4), Max(B, Min(32, 150)))`): such text reads back folded, equal in value only."""
    return not any(isinstance(a, (sympy.Min, sympy.Max)) and all(x.is_number for x in a.args)
                   for a in sympy.preorder_traversal(e))


def _values(e: sympy.Expr) -> list:
    return [e.xreplace({T: t, B: b, S: s}) for t, b, s in [(1, 1, 1), (5, 3, 2), (130, 7, 64)]]


def _degree(e: sympy.Expr) -> int:
    if e.is_Symbol:
        return 1
    if isinstance(e, sympy.Mul):
        return sum(_degree(a) for a in e.args)
    if isinstance(e, sympy.Pow):
        return _degree(e.base) * abs(int(e.exp))
    return max((_degree(a) for a in e.args), default=0)


@given(dim_exprs)
def test_random_dim_expressions_roundtrip(e):
    text = dim_str(e)
    if _degree(e) > MAX_DEGREE:
        with pytest.raises(ParseError, match="degree"):
            parse_dim(text)
        return
    back = parse_dim(text)
    if _canonical(e):
        assert back == e, f"{text!r} read back as {back!r}"
        assert dim_str(back) == text
        assert parse_value_text(text) == (int(e) if e.is_Integer else e)
    assert _values(back) == _values(e)
    assert parse_dim(dim_str(back)) == back          # printing what was read is a fixed point


# ----------------------------------------------------------------------------- no project source evaluates text

SOURCE_DIRS = ["dsr_compiler", "ir", "codegen", "runtime", "bench", "examples"]
_EVALUATORS = {"eval", "exec", "sympify", "parse_expr", "__import__"}
_UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "cloudpickle", "joblib"}


def forbidden_calls(source: str, filename: str = "<src>") -> list[str]:
    """Where `source` evaluates text or unpickles: eval/exec/sympify/parse_expr/__import__ (by name or
    attribute: `builtins.eval`, `sympy.sympify`), `torch.load`, pickle-like imports. `.eval()` of a
    module (an attribute call on anything but `builtins`) is fine."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in _EVALUATORS:
                found.append(f"{where} {f.id}(")
            elif isinstance(f, ast.Attribute):
                owner = f.value.id if isinstance(f.value, ast.Name) else ""
                if f.attr in _EVALUATORS - {"eval"} or (f.attr == "eval" and owner == "builtins"):
                    found.append(f"{where} {owner}.{f.attr}(")
                if f.attr == "load" and owner == "torch" or owner in _UNPICKLERS:
                    found.append(f"{where} {owner}.{f.attr}(")
        elif isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in _UNPICKLERS
                      or a.name.startswith("sympy.parsing")]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.split(".")[0] in _UNPICKLERS or mod.startswith("sympy.parsing") or \
                    any(a.name in _EVALUATORS for a in node.names):
                found.append(f"{where} from {mod} import ...")
    return found


def test_the_source_check_can_fail():
    bad = ("import sympy, pickle, builtins, torch\nfrom sympy import sympify\n"
           "sympy.sympify('x')\nsympify('x')\neval('1')\nexec('1')\nbuiltins.eval('1')\n"
           "torch.load('f')\npickle.loads(b'')\nfrom sympy.parsing.sympy_parser import parse_expr\n")
    assert len(forbidden_calls(bad)) == 10, forbidden_calls(bad)
    assert forbidden_calls("model.eval()\nre.compile('x')\ntorch.compile(m)\n") == []


def test_no_project_source_evaluates_text():
    files = [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50
    found = [hit for p in files for hit in forbidden_calls(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == [], "text evaluated as code (use dsr_compiler.ir.types.to_expr / parse_dim):\n" + "\n".join(found)


# ----------------------------------------------------------------------------- generated sources

HOSTILE = "attn\nimport os; os.system('touch /tmp/dsr_pwned')\r\nx = 1\x00 \u2028y = 2"


def _kernel(origin: str, name: str = "y") -> Kernel:
    b = GraphBuilder("k1_pointwise_neg")
    b.add_input("x", TensorType(DType.f32, (T, 8)))
    b.add(Node((Value(name, TensorType(DType.f32, (T, 8))),), "neg", ("x",), {}, origin))
    return Kernel("k1_pointwise_neg", "pointwise", b.build([name]))


def _body_dump(src: str) -> str:
    return ast.dump(ast.parse(src))


def _top_level(src: str) -> list[str]:
    """Module-level statements, identifiers aside: kinds, and imports in full."""
    tree = ast.parse(src)
    return [ast.dump(n) if isinstance(n, (ast.Import, ast.ImportFrom)) else type(n).__name__ for n in tree.body]


@pytest.mark.parametrize("what", ["origin", "value_name"])
def test_ir_text_cannot_escape_a_comment_in_generated_triton(what):
    from dsr_compiler.codegen import lower_kernel, render
    benign = render(lower_kernel(_kernel("attn"), 1))
    k = _kernel(HOSTILE) if what == "origin" else _kernel("attn", name="y\nimport sys\nz = 1\n")
    src = render(lower_kernel(k, 1))
    # Comments are not in the AST: a hostile origin may only change comment text, a hostile value
    # name only identifiers (through `ident`); no statement is added.
    if what == "origin":
        assert _body_dump(src) == _body_dump(benign)
    assert _top_level(src) == _top_level(benign)
    calls = {ast.unparse(n.func) for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)}
    assert "os.system" not in calls
    for line in src.splitlines():
        if "touch" in line or "import sys" in line or "y = 2" in line:
            assert line.lstrip().startswith("#"), line
    assert "\x00" not in src and "\r" not in src and "\u2028" not in src


def test_ir_text_cannot_escape_a_comment_in_generated_ptx():
    from dsr_compiler.codegen import lower_kernel
    from dsr_compiler.codegen.ptx import render_ptx
    ptx = render_ptx(lower_kernel(_kernel(HOSTILE), 1))
    hits = [ln for ln in ptx.splitlines() if "touch" in ln or "y = 2" in ln]
    assert hits and all(ln.lstrip().startswith("//") for ln in hits), hits
    assert ptx.isascii() and "\r" not in ptx and "\x00" not in ptx


def test_render_refuses_names_that_are_not_identifiers():
    import dataclasses

    from dsr_compiler.codegen import lower_kernel, render
    from dsr_compiler.ir.errors import CodegenError
    spec = lower_kernel(_kernel("attn"), 1)
    with pytest.raises(CodegenError, match="not a Python identifier"):
        render(dataclasses.replace(spec, name="k1():\n    pass\nimport os\ndef k2"))
    with pytest.raises(CodegenError, match="not a plain expression fragment"):
        render(dataclasses.replace(spec, params=spec.params + (("X", "0\nimport os"),)))
