"""`dsrc ir --dot` (ir/dot.py): the fused graph as Graphviz dot, one box per kernel, typed edges."""
from __future__ import annotations

import re

from dsr_compiler import cli
from dsr_compiler.ir.dot import _q

# a statement: `"a" [attrs];` or `"a" -> "b" [attrs];` with double-quoted, escaped strings
_STR = r'"(?:[^"\\]|\\.)*"'
_ATTRS = rf'\[(?:[a-z]+=(?:{_STR}|[A-Za-z0-9#.]+)(?:, )?)+\]'
_NODE = re.compile(rf"  {_STR} {_ATTRS};")
_EDGE = re.compile(rf"  {_STR} -> {_STR} {_ATTRS};")


def _dot(capsys, *argv: str) -> str:
    assert cli.main(["ir", "--module", "mlp", "--dot", *argv]) == 0
    return capsys.readouterr().out


def test_fused_mlp_as_dot(capsys):
    out = _dot(capsys)
    lines = out.splitlines()
    assert lines[0] == 'digraph "mlp" {' and lines[-1] == "}"
    body = [ln for ln in lines[1:-1] if not ln.startswith(("  rankdir", "  node [", "  edge ["))]
    assert all(_NODE.fullmatch(ln) or _EDGE.fullmatch(ln) for ln in body), [
        ln for ln in body if not (_NODE.fullmatch(ln) or _EDGE.fullmatch(ln))]
    kernels = re.findall(r'label="(k\d+_[a-z0-9_]+)\\n([a-z0-9_]+) \(\d+ ops\)"', out)
    assert [f for _, f in kernels] == ["quant_fp8", "gemm_fp8", "gemm_fp8"], kernels
    assert 'label="fp8e4m3[T,256]"' in out and "doubleoctagon" in out
    declared = set(re.findall(rf"^  ({_STR}) \[", out, re.M))
    used = {s for e in re.findall(rf"^  ({_STR}) -> ({_STR})", out, re.M) for s in e}
    assert used <= declared


def test_dot_after_a_pass_shows_its_ops(capsys):
    out = _dot(capsys, "--after", "trace", "--no-fp8")
    assert 'label="rms_norm"' in out and 'label="linear"' in out and "fillcolor=\"#dbe9f6\"" not in out


def test_strings_are_escaped():
    assert _q('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
