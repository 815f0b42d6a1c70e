"""Rendering: KernelSpec -> Triton source through one Jinja template per family.

Sits between lowering and compiling. A spec's template must be its family's (the records in
codegen/families/, `TEMPLATE_FAMILY`). The Jinja environment uses StrictUndefined; the
only context a template sees is the frozen spec (`spec`) plus the pure filters below
(statement rendering comes from `codegen/exprs.py`, the one expression table). Rendered
source is parsed with `ast` before anyone uses it; a failure is a CodegenError that shows
the offending generated line.
"""
from __future__ import annotations

import ast
import hashlib
import keyword
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import jinja2
from dsr_compiler.ir.errors import CodegenError
from dsr_compiler.ir.types import DType

from .exprs import TL_DTYPE, helpers_for, index_expr, render_stmt, store_value
from .families import TEMPLATE_DIR, TEMPLATE_FAMILY
from .spec import KernelSpec, Stmt, comment_text

# ----------------------------------------------------------------------------- pure filters

def _stmts(block: Iterable[Stmt], indent: int = 4) -> str:
    pad = " " * indent
    lines = [pad + line for s in block for line in render_stmt(s).splitlines()]
    return "\n".join(lines)   # an empty block renders as a blank line (never a loop's only body)


def _index(terms: tuple, offset: str = "0") -> str:
    return index_expr(tuple(tuple(t) for t in terms), offset)


def _helpers(spec: KernelSpec) -> list[str]:
    ops = {s.op for _, block in spec.body for s in block}
    return [h.rstrip("\n") for h in helpers_for(ops)]


def _tl_dtype(dt: DType) -> str:
    return TL_DTYPE[dt]


FILTERS = {"stmts": _stmts, "index": _index, "helpers": _helpers, "tl_dtype": _tl_dtype,
           "store_value": store_value, "comment": comment_text}


def jinja_environment(filters: dict | None = None) -> jinja2.Environment:
    """codegen's one Jinja environment factory: templates/ loader, StrictUndefined, no autoescape,
    plus `filters` (the Triton templates get FILTERS, the PTX templates theirs, codegen/ptx.py)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(filters or {})
    return env


_ENV = jinja_environment(FILTERS)


def render(spec: KernelSpec) -> str:
    """Triton source for `spec` (parsed with `ast` before it is returned)."""
    fam = TEMPLATE_FAMILY.get(spec.template)
    if fam is None:
        raise CodegenError(f"codegen: kernel {spec.name}: no template {spec.template!r}",
                           hint=f"registered: {', '.join(sorted(TEMPLATE_FAMILY))}")
    if fam != spec.family:
        raise CodegenError(f"codegen: kernel {spec.name}: template {spec.template} is for {fam}, "
                           f"the spec's family is {spec.family}")
    _check_identifiers(spec)
    try:
        src = _ENV.get_template(spec.template).render(spec=spec)
    except (jinja2.UndefinedError, KeyError) as e:
        msg = e.message if isinstance(e, jinja2.UndefinedError) else str(e.args[0])
        raise CodegenError(f"codegen: template {spec.template} failed for {spec.name}: {msg}",
                           hint="the spec lacks a parameter the template needs (see codegen/families/)") from None
    try:
        ast.parse(src)
    except SyntaxError as e:
        lines = src.splitlines()
        lo = max(0, (e.lineno or 1) - 3)
        window = "\n".join(f"  {'>>' if i + 1 == e.lineno else '  '} {i + 1:4d} | {lines[i]}"
                           for i in range(lo, min(len(lines), (e.lineno or 1) + 2)))
        raise CodegenError(f"codegen: template {spec.template} rendered invalid Python for {spec.name}: {e.msg}",
                           where=window,
                           hint="a template or the expression table (codegen/exprs.py) is wrong") from None
    return src


# Template parameters that are text are identifiers or expressions built by the lowering
# (`offs_m[:, None] * 0`, `float("nan")`; names only through `ident`): one line, no `;`, `#` or
# backslash, so none can end a statement or open a comment.
_CODE_FRAGMENT = re.compile(r"[A-Za-z0-9_.\[\]+\-*/%(), :<>=&|~\"]*")


def _check_identifiers(spec: KernelSpec) -> None:
    """Names written into code (the kernel and its arguments) must be plain identifiers, and text
    parameters plain expression fragments; text from the IR or the user's modules reaches sources
    only through `ident` (names) and the `comment` filter (origins), so nothing in an input can
    become a statement."""
    for what, name in [("kernel name", spec.name)] + [("argument name", a.name) for a in spec.args]:
        if not (isinstance(name, str) and name.isidentifier() and name.isascii()) or keyword.iskeyword(name):
            raise CodegenError(f"codegen: kernel {comment_text(spec.name)}: {what} {name!r} is not a Python identifier",
                               hint="names come from codegen.spec.ident / the lowering's kernel name")
    stack = [(k, v) for k, v in spec.params]
    while stack:
        k, v = stack.pop()
        if isinstance(v, (tuple, list)):
            stack += [(k, x) for x in v]
        elif isinstance(v, str) and not _CODE_FRAGMENT.fullmatch(v):
            raise CodegenError(f"codegen: kernel {comment_text(spec.name)}: template parameter {k} = {v!r} "
                               "is not a plain expression fragment")


@lru_cache(maxsize=None)
def codegen_fingerprint() -> str:
    """sha256 over codegen's sources and templates. A KernelSpec hash says *what* to generate,
    this says *how*: an artifact cache keys on both (plus Triton/torch/target versions). Every source
    counts, the family modules under codegen/families/ included."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for p in sorted([*root.rglob("*.py"), *TEMPLATE_DIR.glob("*.j2")]):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


__all__ = ["FILTERS", "TEMPLATE_DIR", "codegen_fingerprint", "jinja_environment", "render"]
