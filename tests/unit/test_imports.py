"""Import graph of the project (tools/imports.py, read with `ast`, nothing imported): what the
restructuring fixed stays fixed.

Pinned here for the whole project (every module under dsr_compiler/, ir/, codegen/, runtime/):
no import cycle, no private name (`_foo`) imported across modules, no import against the layer
order (`ir` <- `codegen` <- `runtime` <- `dsr_compiler`), and one Jinja environment factory and one
ptxas wrapper in codegen.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FRONTEND = "dsr_compiler.frontend"


def _tool():
    spec = importlib.util.spec_from_file_location("dsr_tools_imports", ROOT / "tools" / "imports.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def report() -> dict:
    return _tool().analyse()


def test_the_analysis_sees_every_layer(report):
    mods = _tool().modules()
    for name in ("frontend.tracer", "frontend.context", "frontend.registry", "frontend.lowerings.moe",
                 "ir.ops._def", "ir.ops.core", "ir.passes.fuse.rules", "ir.knobs",
                 "codegen.families", "codegen.families.record", "codegen.families.moe", "codegen.lower_common",
                 "codegen.build", "runtime.cache", "runtime.plan", "api", "options", "report", "dump",
                 "workloads", "workloads.moe"):
        assert f"dsr_compiler.{name}" in mods, name
    assert report["modules"] == len(mods) > 100


def test_no_import_cycle(report):
    assert report["cycles"] == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in report["cycles"])


def test_no_private_import_across_modules(report):
    assert report["private"] == [], "private cross-module imports (make the name public and document it): " + \
        ", ".join(f"{m} imports {b}.{n}" for m, b, n in report["private"])


def test_no_import_against_the_layer_order(report):
    assert report["upward"] == [], "lower layers import upward: " + ", ".join(f"{a} -> {b}" for a, b in report["upward"])


def test_codegen_has_one_jinja_environment_and_one_ptxas_wrapper():
    sources = {p.name: p.read_text() for p in (ROOT / "codegen").glob("*.py")}
    envs = [n for n, t in sources.items() for _ in range(t.count("jinja2.Environment("))]
    assert envs == ["render.py"], f"Jinja environments built in {envs}: use render.jinja_environment"
    runs = [n for n, t in sources.items() if "ptxas" in t and "subprocess.run(" in t]
    assert runs == ["compile.py"], f"ptxas run from {runs}: use compile.run_ptxas"


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """The analysis reports a cycle and a private import when the sources have them."""
    tool = _tool()
    pkg = tmp_path / "dsr_compiler" / "frontend"
    pkg.mkdir(parents=True)
    (tmp_path / "dsr_compiler" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import _helper\n")
    (pkg / "b.py").write_text("from . import a\n\ndef _helper():\n    return a\n")
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    r = tool.analyse()
    assert [f"{FRONTEND}.a", f"{FRONTEND}.b"] in r["cycles"]
    assert (f"{FRONTEND}.a", f"{FRONTEND}.b", "_helper") in r["private"]
