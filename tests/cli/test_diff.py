"""`dsrc diff DIR_A DIR_B` (dsr_compiler/diff.py): the differences between two dumps, and clean
errors for folders that are not dumps or dumps that were tampered with."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from dsr_compiler import cli


def _dsrc(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    root = tmp_path_factory.mktemp("dumps")
    for name, extra in (("f32", ["--no-fp8"]), ("fp8", []), ("bf16", ["--no-fp8", "--dtype", "bf16"])):
        assert cli.main(["compile", "--module", "mlp", "--seq", "4", "--out", str(root / name), *extra]) == 0
    return root


def test_a_dump_against_itself_has_no_differences(dumps, capsys):
    rc, out, _ = _dsrc(capsys, "diff", str(dumps / "f32"), str(dumps / "f32"), "--exit-code")
    assert rc == 0 and "no differences" in out


def test_fp8_against_f32_names_options_passes_kernels_and_totals(dumps, capsys):
    rc, out, _ = _dsrc(capsys, "diff", str(dumps / "f32"), str(dumps / "fp8"))
    assert rc == 0
    assert "options:\n  fp8: False -> {" in out
    assert "~ quantize_fp8: rewrites {} -> {" in out and "IR +" in out
    report_a = json.loads((dumps / "f32" / "report.json").read_text())
    report_b = json.loads((dumps / "fp8" / "report.json").read_text())
    names_a = {k["name"] for k in report_a["kernels"]}
    names_b = {k["name"] for k in report_b["kernels"]}
    for n in names_b - names_a:
        assert f"  + {n}\n" in out
    for n in names_a - names_b:
        assert f"  - {n}\n" in out
    assert any("gemm_fp8" in n for n in names_b - names_a)
    ratio = report_b["totals"]["bytes"] / report_a["totals"]["bytes"]
    assert f"bytes: {report_a['totals']['bytes']} -> {report_b['totals']['bytes']} ({ratio:.3g}x)" in out
    rc, _, _ = _dsrc(capsys, "diff", str(dumps / "f32"), str(dumps / "fp8"), "--exit-code")
    assert rc == 3


def test_common_kernels_show_changed_fields_and_source(dumps, capsys):
    rc, out, _ = _dsrc(capsys, "diff", str(dumps / "f32"), str(dumps / "bf16"))
    assert rc == 0
    changed = [line for line in out.splitlines() if line.startswith("  ~ k")]
    assert changed, out
    assert all("source" in line for line in changed)
    assert any("bytes_read" in line for line in changed)


def test_an_edited_generated_source_alone_is_reported(dumps, tmp_path, capsys):
    b = tmp_path / "edited"
    shutil.copytree(dumps / "f32", b)
    src = sorted((b / "kernels").glob("*.py"))[0]
    src.write_text(src.read_text() + "\n# edited\n")
    rc, out, _ = _dsrc(capsys, "diff", str(dumps / "f32"), str(b))
    assert rc == 0 and f"  ~ {src.stem}: source\n" in out


def test_a_folder_that_is_not_a_dump_is_refused(dumps, tmp_path, capsys):
    (tmp_path / "report.json").write_text("{}")
    rc, _, err = _dsrc(capsys, "diff", str(dumps / "f32"), str(tmp_path))
    assert rc == 2 and "is not a dsr dump" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["not json", "symlink", "huge", "bad kernel name", "deep"])
def test_a_damaged_report_is_a_clean_error(dumps, tmp_path, capsys, damage):
    b = tmp_path / "damaged"
    shutil.copytree(dumps / "f32", b)
    rep = b / "report.json"
    if damage == "not json":
        rep.write_text("{not json")
    elif damage == "symlink":
        rep.unlink()
        os.symlink(dumps / "f32" / "report.json", rep)
    elif damage == "huge":
        with open(rep, "ab") as f:
            f.truncate(65 << 20)                  # sparse: no disk used
    elif damage == "bad kernel name":
        r = json.loads(rep.read_text())
        r["kernels"][0]["name"] = "../../etc/passwd"
        rep.write_text(json.dumps(r))
    else:
        rep.write_text("[" * 100_000 + "]" * 100_000)
    rc, _, err = _dsrc(capsys, "diff", str(dumps / "f32"), str(b))
    assert rc == 2 and "Traceback" not in err and "report.json" in err, err


def test_html_form_lists_the_same_differences(dumps, tmp_path, capsys):
    page = tmp_path / "diff.html"
    rc, out, _ = _dsrc(capsys, "diff", str(dumps / "f32"), str(dumps / "fp8"), "--html", str(page))
    assert rc == 0
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<script" not in text
    added = [ln[4:] for ln in out.splitlines() if ln.startswith("  + ")]
    removed = [ln[4:] for ln in out.splitlines() if ln.startswith("  - ")]
    assert added and removed
    for k in added:
        assert f'<li class="add">+ {k}</li>' in text
    for k in removed:
        assert f'<li class="del">- {k}</li>' in text
    assert "<h2>options</h2>" in text and "<h2>totals</h2>" in text
