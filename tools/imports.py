"""Import graph of the project's own modules: cycles, private cross-module imports, layer violations.

Reads the sources with `ast` (nothing is imported or run). Module names follow the installed layout
(ir/ -> dsr_compiler.ir, codegen/ -> dsr_compiler.codegen, runtime/ -> dsr_compiler.runtime).
Imports inside functions count too: a lazy import is still a dependency.

    python tools/imports.py           # summary
    python tools/imports.py --list    # every cycle and private import
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
MAPPING = {"ir": "dsr_compiler.ir", "codegen": "dsr_compiler.codegen", "runtime": "dsr_compiler.runtime",
           "dsr_compiler": "dsr_compiler"}
# Layers (DESIGN §2, STYLE 11): a module may import its own layer and the ones listed here.
ALLOWED = {"dsr_compiler.ir": set(), "dsr_compiler.codegen": {"dsr_compiler.ir"},
           "dsr_compiler.runtime": {"dsr_compiler.ir", "dsr_compiler.codegen"}}


def modules() -> dict[str, Path]:
    out = {}
    for top, name in MAPPING.items():
        for p in sorted((ROOT / top).rglob("*.py")):
            rel = p.relative_to(ROOT / top).with_suffix("")
            parts = [] if rel.parts == ("__init__",) else list(rel.parts)
            if parts and parts[-1] == "__init__":
                parts = parts[:-1]
            mod = ".".join([name] + parts)
            if top == "dsr_compiler" and parts and parts[0] in ("ir", "codegen", "runtime"):
                continue
            out[mod] = p
    return out


def _resolve(mod: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def edges(mods: dict[str, Path]) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """(importer, imported module) pairs and private imports (importer, module, name)."""
    es, private = [], []
    known = set(mods)
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in known:
                        es.append((mod, a.name))
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in known:
                        es.append((mod, sub))
                    elif base in known:
                        es.append((mod, base))
                        if a.name.startswith("_") and not a.name.startswith("__") and base != mod:
                            private.append((mod, base, a.name))
    return [(a, b) for a, b in es if a != b], private


def layer(mod: str) -> str:
    for name in ("dsr_compiler.ir", "dsr_compiler.codegen", "dsr_compiler.runtime"):
        if mod == name or mod.startswith(name + "."):
            return name
    return "dsr_compiler"


def analyse() -> dict:
    mods = modules()
    es, private = edges(mods)
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    g.add_edges_from(es)
    sccs = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    upward = sorted({(a, b) for a, b in es if layer(a) in ALLOWED and layer(b) != layer(a)
                     and layer(b) not in ALLOWED[layer(a)]})
    return {"modules": len(mods), "edges": len(set(es)), "cycles": sorted(sccs), "private": sorted(set(private)),
            "upward": upward}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    r = analyse()
    print(f"{r['modules']} modules, {r['edges']} import edges; cyclic groups: {len(r['cycles'])} "
          f"({sum(len(c) for c in r['cycles'])} modules); private cross-module imports: {len(r['private'])}; "
          f"imports against the layer order: {len(r['upward'])}")
    if a.list:
        for c in r["cycles"]:
            print("cycle: " + " <-> ".join(c))
        for m, b, n in r["private"]:
            print(f"private: {m} imports {b}.{n}")
        for m, b in r["upward"]:
            print(f"upward: {m} imports {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
