"""Size report of the project: lines per package, largest files, number of ops, kernel families and
knobs (like tinygrad's sz.py). Printed by `.ci/run` so that growth is a reviewed decision.

    python tools/sz.py            # table on stdout
    python tools/sz.py --json     # the same figures as JSON
    python tools/sz.py --check    # exit 1 if a file is above the limit (run by `make lint`)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ir", "codegen", "runtime", "dsr_compiler", "tests", "bench", "examples", "tools")
FILE_LIMIT = 700     # STYLE.md: a file stays under ~700 lines (templates aside)


def code_lines(path: Path) -> int:
    """Non-blank lines that are not pure comments (docstrings count: they are read)."""
    n = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            n += 1
    return n


def package_files(pkg: str) -> list[Path]:
    base = ROOT / pkg
    if not base.is_dir():
        return []
    return sorted(p for p in base.rglob("*") if p.is_file() and p.suffix in (".py", ".j2")
                  and "__pycache__" not in p.parts)


def registry_counts() -> dict[str, int]:
    """Ops, kernel families and knobs, read from the installed package (the one op table etc.)."""
    out: dict[str, int] = {}
    try:
        from dsr_compiler import knobs
        out["knobs"] = len(knobs.KNOBS)
        from dsr_compiler.ir import ops
        out["ops"] = len(ops.OPS)
        from dsr_compiler.codegen.families import FAMILIES
        out["families"] = len(FAMILIES)
    except Exception as e:  # a report, not a gate: say what could not be counted
        out["error"] = f"{type(e).__name__}: {e}"  # type: ignore[assignment]
    return out


def report() -> dict:
    pkgs, files = {}, []
    for pkg in PACKAGES:
        fs = package_files(pkg)
        per = [(str(f.relative_to(ROOT)), code_lines(f)) for f in fs]
        files += per
        pkgs[pkg] = {"files": len(fs), "lines": sum(n for _, n in per),
                     "python_lines": sum(n for name, n in per if name.endswith(".py"))}
    files.sort(key=lambda t: -t[1])
    over = [(n, c) for n, c in files if n.endswith(".py") and c > FILE_LIMIT]
    core = sum(pkgs[p]["lines"] for p in ("ir", "codegen", "runtime"))
    return {"packages": pkgs, "largest": files[:10], "over_limit": over, "core_lines": core,
            "registries": registry_counts()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", action="store_true",
                    help=f"exit 1 if a Python file is above {FILE_LIMIT} code lines or a registry cannot be counted")
    a = ap.parse_args(argv)
    r = report()
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{'package':<14}{'files':>6}{'lines':>8}")
    for p, v in r["packages"].items():
        print(f"{p:<14}{v['files']:>6}{v['lines']:>8}")
    print(f"ir + codegen + runtime: {r['core_lines']} lines")
    print("largest files: " + ", ".join(f"{n} {c}" for n, c in r["largest"][:5]))
    if r["over_limit"]:
        print(f"over {FILE_LIMIT} lines: " + ", ".join(f"{n} {c}" for n, c in r["over_limit"]))
    print("registries: " + ", ".join(f"{k} {v}" for k, v in r["registries"].items()))
    if a.check and (r["over_limit"] or "error" in r["registries"]):
        print(f"sz: split the files above {FILE_LIMIT} lines (STYLE.md), or fix the registry count", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
