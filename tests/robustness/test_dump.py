"""`dsrc compile --out PATH` / `cm.dump(PATH)` never deletes what it did not create.

It replaces only a previous dump (the `.dsr-dump` marker, written last); everything else at PATH is
a DumpError (exit 2) raised before any compile work, and an interrupt between the two renames of a
dump leaves the previous dump or the new one at PATH, never neither.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsr_compiler import cli
from dsr_compiler.dump import MARKER, DumpError, check_out_dir, is_dump
from tests.robustness.io_helpers import compile_tiny, report_graph, siblings, snapshot

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def cms(cache_dir):
    """Two compiled modules with different graph names: which dump is at PATH is visible."""
    return compile_tiny(cache_dir, name="first"), compile_tiny(cache_dir, name="second")


@pytest.fixture(autouse=True)
def _cache_env(cache_dir, monkeypatch):
    monkeypatch.setenv("DSR_CACHE_DIR", str(cache_dir))


def _no_compile(monkeypatch):
    """Any compile work after the --out check fails the test: the check must come first."""
    def boom(*a, **k):
        raise AssertionError("compile work started before --out was checked")
    monkeypatch.setattr(cli, "_workload", boom)
    monkeypatch.setattr(cli, "_compile", boom)


def test_dump_writes_marker_last_and_replaces_a_previous_dump(tmp_path, cms):
    out = tmp_path / "d"
    cms[0].dump(out)
    marker = json.loads((out / MARKER).read_text())
    assert marker["format"] == "dsr-dump" and marker["version"] == 1 and is_dump(out)
    assert report_graph(out) == "first" and (out / "ir").is_dir() and (out / "kernels").is_dir()
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask     # the umask is honoured (mkdtemp would give 0700)
    cms[1].dump(out)
    assert report_graph(out) == "second" and is_dump(out) and siblings(out) == []


def test_empty_folder_may_be_used(tmp_path, cms):
    out = tmp_path / "empty"
    out.mkdir()
    cms[0].dump(out)
    assert is_dump(out)


def test_file_at_out_is_refused_and_kept(tmp_path, cms):
    f = tmp_path / "notes.txt"
    f.write_text("precious")
    with pytest.raises(DumpError, match="is a file") as ei:
        cms[0].dump(f)
    assert str(f) in str(ei.value) and ei.value.hint
    assert f.read_text() == "precious" and siblings(f) == []


def test_non_dump_folder_is_refused_and_kept(tmp_path, cms):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "main.py").write_text("print('hi')\n")
    (src / "report.json").write_text("{}")      # looks like a dump, but has no marker
    before = snapshot(src)
    with pytest.raises(DumpError, match="not a dsr dump") as ei:
        cms[0].dump(src)
    assert str(src) in str(ei.value)
    assert snapshot(src) == before and siblings(src) == []


def test_forged_or_oversized_marker_is_not_a_dump(tmp_path, cms):
    d = tmp_path / "forged"
    d.mkdir()
    (d / "keep.txt").write_text("x")
    (d / MARKER).write_text("not json")
    with pytest.raises(DumpError):
        cms[0].dump(d)
    (d / MARKER).write_text(json.dumps({"format": "dsr-dump", "pad": "x" * 10_000}))
    with pytest.raises(DumpError):
        cms[0].dump(d)
    (d / MARKER).write_text("[" * 4000)                   # small, but nested past the recursion limit
    with pytest.raises(DumpError):
        cms[0].dump(d)
    (d / MARKER).write_bytes(b"\xff\xfe")                  # not UTF-8
    with pytest.raises(DumpError):
        cms[0].dump(d)
    assert (d / "keep.txt").read_text() == "x"


def test_symlink_is_refused(tmp_path, cms):
    real = tmp_path / "real"
    cms[0].dump(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    before = snapshot(real)
    with pytest.raises(DumpError, match="symbolic link"):
        cms[1].dump(link)
    assert snapshot(real) == before and link.is_symlink()


@pytest.mark.parametrize("rel", [".", "..", "../.."])
def test_cwd_and_its_ancestors_are_refused(tmp_path, cms, monkeypatch, rel):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "file.txt").write_text("x")
    monkeypatch.chdir(work)
    with pytest.raises(DumpError, match="current directory"):
        cms[0].dump(rel)
    assert (work / "file.txt").read_text() == "x"
    assert not [p for p in tmp_path.rglob(".*") if ".old-" in p.name or ".tmp-" in p.name]


def test_cache_folder_and_folders_around_it_are_refused(tmp_path, cms, cache_dir):
    before = snapshot(cache_dir)
    for bad in (cache_dir, cache_dir.parent, cache_dir / "inside"):
        with pytest.raises(DumpError, match="artifact cache"):
            cms[0].dump(bad)
    assert snapshot(cache_dir) == before


def test_parent_that_is_a_file_is_refused(tmp_path, cms):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(DumpError, match="is a file"):
        cms[0].dump(f / "d")
    assert f.read_text() == "x"


def test_interrupt_while_writing_keeps_previous_dump(tmp_path, cms, monkeypatch):
    out = tmp_path / "d"
    cms[0].dump(out)
    before = snapshot(out)

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(type(cms[1]), "report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cms[1].dump(out)
    assert snapshot(out) == before and siblings(out) == []


def test_interrupt_between_the_two_renames_keeps_previous_dump(tmp_path, cms, monkeypatch):
    import dsr_compiler.dump as dump_mod
    out = tmp_path / "d"
    cms[0].dump(out)
    before = snapshot(out)
    real = {"rename": os.rename, "replace": os.replace}
    calls = []

    def patched(kind):
        def move(src, dst):
            calls.append((src, dst))
            if Path(dst) == out and Path(src).name.startswith(".d.tmp-") and len(calls) == 2:
                raise KeyboardInterrupt               # previous -> aside done, new -> PATH: Ctrl-C
            return real[kind](src, dst)
        return move
    for kind in real:                                 # whichever of the two the writer uses
        monkeypatch.setattr(dump_mod.os, kind, patched(kind))
    monkeypatch.setattr(dump_mod, "_exchange", lambda a, b: False, raising=False)  # no renameat2 here
    with pytest.raises(KeyboardInterrupt):
        cms[1].dump(out)
    assert len(calls) >= 3                           # the previous dump was put back
    assert snapshot(out) == before and siblings(out) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
@pytest.mark.parametrize("when", ["before", "after"])
def test_atomic_exchange_interrupted_around_it_leaves_one_whole_dump(tmp_path, cms, monkeypatch, when):
    import dsr_compiler.dump as dump_mod
    out = tmp_path / "d"
    cms[0].dump(out)
    before = snapshot(out)
    real = dump_mod._exchange
    used = []

    def exchange(a, b):
        if when == "before":
            raise KeyboardInterrupt
        used.append(real(a, b))
        raise KeyboardInterrupt                      # swapped; Ctrl-C before the previous dump is removed
    monkeypatch.setattr(dump_mod, "_exchange", exchange)
    with pytest.raises(KeyboardInterrupt):
        cms[1].dump(out)
    if when == "before":
        assert snapshot(out) == before
    else:
        assert used == [True] and report_graph(out) == "second" and is_dump(out)
    assert siblings(out) == []


def test_stale_leftovers_with_marker_are_cleaned_others_kept(tmp_path, cms):
    out = tmp_path / "d"
    cms[0].dump(out)
    dead = 2 ** 22 + 12345                           # above pid_max's default: no such process
    stale = tmp_path / f".d.old-{dead}-{'a' * 12}"
    cms[0].dump(stale)                               # a dump left behind by a killed process
    foreign = tmp_path / f".d.tmp-{dead}-{'b' * 12}"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not yours")   # same name pattern, no marker: kept
    cms[1].dump(out)
    assert not stale.exists() and (foreign / "mine.txt").read_text() == "not yours"
    assert report_graph(out) == "second"


def test_cli_refuses_before_compiling(tmp_path, monkeypatch, capsys):
    _no_compile(monkeypatch)
    f = tmp_path / "file"
    f.write_text("x")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("x")
    for bad in (f, src):
        assert cli.main(["compile", "--module", "mlp", "--no-fp8", "--out", str(bad)]) == 2
        err = capsys.readouterr().err
        assert str(bad) in err and "hint:" in err
    assert f.read_text() == "x" and (src / "a.py").read_text() == "x"


def test_check_out_dir_accepts_new_empty_and_dump_folders(tmp_path, cms):
    assert check_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()           # the check creates nothing
    (tmp_path / "e").mkdir()
    check_out_dir(tmp_path / "e")
    cms[0].dump(tmp_path / "dd")
    check_out_dir(tmp_path / "dd")


def test_out_dot_in_a_real_process_is_a_clean_error(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1", DSR_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("DSR_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "dsr_compiler", "compile", "--module", "mlp", "--no-fp8", "--out", "."],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "current directory" in r.stderr and "Traceback" not in r.stderr and "EBUSY" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_removal_cut_short_keeps_the_marker_and_is_cleaned_next_time(tmp_path, cms, monkeypatch):
    import dsr_compiler.dump as dump_mod
    out = tmp_path / "d"
    cms[0].dump(out)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(dump_mod.shutil, "rmtree", interrupted)   # Ctrl-C while the previous dump is removed
    with pytest.raises(KeyboardInterrupt):
        cms[1].dump(out)
    monkeypatch.undo()
    assert report_graph(out) == "second"
    (left,) = siblings(out)
    assert is_dump(out.parent / left)                # deleted marker last: still recognisably ours
    cms[0].dump(out)
    assert siblings(out) == [] and report_graph(out) == "first"


@pytest.mark.parametrize("bad", ["a" * 5000, "x/" + "a" * 300, "b/" * 2100, "a\0b", "", "  "])
def test_unusable_paths_are_short_clean_errors(tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DumpError) as ei:
        check_out_dir(bad)
    assert len(str(ei.value)) < 1000 and "\0" not in str(ei.value)
    assert list(tmp_path.iterdir()) == []
