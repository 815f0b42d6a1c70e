"""Text IR parser: the inverse of the printer, so that `parse(str(g)) == g`.

Comments (`# ...` lines) are ignored except a trailing `# origin` on a statement, which
is the node's origin. Errors name the line and column. Text IR may come from anywhere (a dump, a
bug report), so it is data: the statement structure is read with anchored regexes, dims and
attribute values with the bounded grammar of ir/dimexpr.py, and the result is verified.
"""
from __future__ import annotations

import re
from typing import Any

from .dimexpr import parse_value_text
from .errors import DsrError, ParseError
from .graph import Graph, Kernel, Node, Value
from .types import TensorType, split_top, parse_type
from .verifier import verify as verify_graph

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.]*"
_VAL_RE = re.compile(rf"%({_NAME})")
_KERNEL_RE = re.compile(rf"^kernel\s+@({_NAME})\((.*)\{{\s*$")  # signature and attrs split by _split_kernel_head
_GRAPH_RE = re.compile(rf"^graph\s+({_NAME})\((.*)\)\s*\{{\s*$")
_ATTR_KEY_RE = re.compile(r"[a-z_][a-z0-9_]*")


def _strip_comment(line: str) -> tuple[str, str]:
    """Split a line into code and trailing comment, ignoring '#' inside strings."""
    quote = None
    i = 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch == '"':
            quote = ch
        elif ch == "#":
            return line[:i].rstrip(), line[i + 1:].strip()
        i += 1
    return line.rstrip(), ""


def _what(e: Exception) -> str:
    return e.what if isinstance(e, DsrError) else str(e)


def _type(text: str, where: str) -> TensorType:
    try:
        return parse_type(text)
    except (DsrError, ValueError, TypeError) as e:  # unknown dtype, unbalanced brackets, bad dims
        raise ParseError(f"bad type {text.strip()!r}: {_what(e)}", where=where, hint="write e.g. `f32[T,256]`") from None


def _origin(comment: str, where: str) -> str:
    """A statement's trailing `# origin`: one printable line (it is echoed into generated sources)."""
    if not comment.isprintable():
        raise ParseError("origin comment holds control characters", where=where,
                         hint="origins are module paths such as `layers.0.mlp.w1`")
    return comment


def _split_kernel_head(rest: str, where: str) -> tuple[str, str]:
    """Split `sig) attrs ` at the parenthesis closing the signature (attrs may hold parens and strings)."""
    depth, quote, i = 0, None, 0
    while i < len(rest):
        ch = rest[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch == '"':
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                return rest[:i], rest[i + 1:]
            depth -= 1
        i += 1
    raise ParseError("kernel signature is not closed with ')'", where=where)


def parse_attr_value(text: str) -> Any:
    """An attribute value, read by the bounded grammar of ir/dimexpr.py (never evaluated as Python)."""
    t = text.strip()
    if not t:
        raise ParseError("empty attribute value")
    return parse_value_text(t)


def _parse_signature(text: str, where: str) -> tuple[list[Value], list[str]]:
    inputs, params = [], []
    for part in split_top(text) if text.strip() else []:
        is_param = part.startswith("param ")
        if is_param:
            part = part[len("param "):]
        m = re.fullmatch(rf"%({_NAME})\s*:\s*(.+)", part.strip())
        if not m:
            raise ParseError(f"bad parameter {part!r}", where=where, hint="write `%name : f32[T,256]`")
        inputs.append(Value(m.group(1), _type(m.group(2), where)))
        if is_param:
            params.append(m.group(1))
    return inputs, params


def _parse_node(code: str, origin: str, where: str) -> Node:
    lhs, eq, rhs = code.partition(" = ")
    if not eq:
        lhs, rhs = "", code
    outputs: list[Value] = []
    if lhs:
        names_part, colon, types_part = lhs.partition(" : ")
        if not colon:
            raise ParseError("statement needs `%out : type = op(...)`", where=where)
        names = [n.strip() for n in names_part.split(",")]
        types = split_top(types_part)
        if len(names) != len(types):
            raise ParseError(f"{len(names)} names but {len(types)} types", where=where)
        for n, t in zip(names, types):
            m = re.fullmatch(rf"%({_NAME})", n)
            if not m:
                raise ParseError(f"bad value name {n!r}", where=where)
            outputs.append(Value(m.group(1), _type(t, where)))
    rhs = rhs.strip()
    m = re.fullmatch(rf"(call\s+@({_NAME})|([a-z_][a-z0-9_]*))\((.*)\)", rhs)
    if not m:
        raise ParseError(f"cannot read op call {rhs!r}", where=where, hint="write `op(%a, %b, key=value)`")
    op = "call" if m.group(2) else m.group(3)
    inputs: list[str] = []
    attrs: list[tuple[str, Any]] = []
    if op == "call":
        attrs.append(("kernel", m.group(2)))
    for arg in split_top(m.group(4)) if m.group(4).strip() else []:
        vm = re.fullmatch(rf"%({_NAME})", arg)
        if vm:
            if attrs and op != "call" or (op == "call" and len(attrs) > 1):
                raise ParseError("value arguments must come before attributes", where=where)
            inputs.append(vm.group(1))
            continue
        key, eq2, val = arg.partition("=")
        if not eq2 or not _ATTR_KEY_RE.fullmatch(key.strip()):
            raise ParseError(f"bad argument {arg!r}", where=where)
        try:
            attrs.append((key.strip(), parse_attr_value(val)))
        except (DsrError, ValueError, TypeError) as e:
            raise ParseError(f"bad attribute value {val.strip()!r}: {_what(e)}", where=where) from None
    return Node(tuple(outputs), op, tuple(inputs), tuple(attrs), origin)


def _parse_block(lines: list[tuple[int, str]], i: int, name: str, inputs: list[Value], params: list[str],
                 kernels: list[Kernel], opened: str = "") -> tuple[Graph, int]:
    nodes: list[Node] = []
    outputs: list[str] | None = None
    while i < len(lines):
        lineno, raw = lines[i]
        code, comment = _strip_comment(raw)
        code = code.strip()
        where = f"line {lineno}: {raw.strip()}"
        i += 1
        if not code:
            continue
        if code == "}":
            if outputs is None:
                raise ParseError(f"block {name} has no return", where=where)
            return Graph(name, tuple(inputs), tuple(nodes), tuple(outputs), tuple(params), tuple(kernels)), i
        if outputs is not None:
            raise ParseError("statement after return", where=where)
        if code.startswith("return"):
            rest = code[len("return"):].strip()
            outputs = []
            for part in [p for p in rest.split(",") if p.strip()]:
                m = re.fullmatch(rf"%({_NAME})", part.strip())
                if not m:
                    raise ParseError(f"bad return value {part!r}", where=where)
                outputs.append(m.group(1))
            continue
        nodes.append(_parse_node(code, _origin(comment, where), where))
    raise ParseError(f"block {name} is not closed with '}}'", where=f"end of text; the block opens at {opened}")


def parse(text: str, verify: bool = True) -> Graph:
    """Parse text IR (as printed by `print_graph`) back into a Graph.

    Only `str` is accepted (read files yourself, choosing the encoding). Dims and attribute values
    are read by the bounded grammar of ir/dimexpr.py: nothing in the text is evaluated as Python.
    With `verify=True` (the default) the graph is checked by the verifier, so a parsed graph is
    well formed (SSA, op type rules, known kernel families); `verify=False` returns it unchecked,
    e.g. to test the verifier itself."""
    if not isinstance(text, str):
        raise TypeError(f"dsr.ir.parse takes the IR text as a str, got {type(text).__name__}"
                        + ("; decode it first, e.g. data.decode('utf-8')" if isinstance(text, (bytes, bytearray))
                           else "; read the file first, e.g. Path(p).read_text()" if hasattr(text, "__fspath__")
                           else ""))
    graph = _parse_text(text)
    return verify_graph(graph) if verify else graph


def _parse_text(text: str) -> Graph:
    lines = list(enumerate(text.splitlines(), start=1))
    kernels: list[Kernel] = []
    i = 0
    graph: Graph | None = None
    while i < len(lines):
        lineno, raw = lines[i]
        code, _ = _strip_comment(raw)
        code = code.strip()
        where = f"line {lineno}: {raw.strip()}"
        i += 1
        if not code:
            continue
        if graph is not None:
            raise ParseError("text after the graph block", where=where)
        km = _KERNEL_RE.match(code)
        if km:
            sig, attr_text = _split_kernel_head(km.group(2), where)
            ins, ps = _parse_signature(sig, where)
            kattrs: list[tuple[str, Any]] = []
            for part in split_top(attr_text.strip(), sep=" ") if attr_text.strip() else []:
                k, eq, v = part.partition("=")
                if not eq or not _ATTR_KEY_RE.fullmatch(k):
                    raise ParseError(f"bad kernel attribute {part!r}", where=where, hint="write `key=value`")
                try:
                    kattrs.append((k, parse_attr_value(v)))
                except (DsrError, ValueError, TypeError) as e:
                    raise ParseError(f"bad kernel attribute value {v!r}: {_what(e)}", where=where) from None
            d = dict(kattrs)
            if "family" not in d:
                raise ParseError("kernel needs family=...", where=where)
            body, i = _parse_block(lines, i, km.group(1), ins, ps, [], where)
            kernels.append(Kernel(km.group(1), d.pop("family"), body, tuple((k, v) for k, v in kattrs if k != "family")))
            continue
        gm = _GRAPH_RE.match(code)
        if gm:
            ins, ps = _parse_signature(gm.group(2), where)
            graph, i = _parse_block(lines, i, gm.group(1), ins, ps, kernels, where)
            continue
        raise ParseError(f"expected `kernel @name(...)` or `graph name(...)`, got {code!r}", where=where)
    if graph is None:
        raise ParseError("no graph block in text", hint="the text must contain `graph NAME(...) { ... }`")
    return graph
