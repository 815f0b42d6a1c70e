"""Environment faults are clean errors (exit 2, what / where / hint) or, for the artifact cache,
warnings: never tracebacks with exit 1 after the whole compile.

Tests run as root here, and root ignores permission bits (chmod 0o500 does not stop it), so
"read-only" and "no permission" are simulated by monkeypatching the calls that would fail
(os.access, writes raising OSError(EROFS / EACCES)), "full" by a write raising OSError(ENOSPC),
and "a cache folder that is a file" is real.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import dsr_compiler.dump as dump_mod
from dsr_compiler import cli
from dsr_compiler.dump import DumpError
from dsr_compiler.runtime import cache as cache_mod
from dsr_compiler.runtime.cache import CacheWarning
from tests.robustness.io_helpers import compile_tiny, report_graph, siblings, snapshot

MLP = ["compile", "--module", "mlp", "--no-fp8"]


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache_env(warm_cache, monkeypatch):
    monkeypatch.setenv("DSR_CACHE_DIR", str(warm_cache))
    monkeypatch.delenv("DSR_DEBUG", raising=False)


def _no_compile(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("compile work started before --out was checked")
    monkeypatch.setattr(cli, "_workload", boom)


def _enospc_on(suffix: str, monkeypatch):
    """Writes of files ending in `suffix` fail as on a full disk."""
    real = Path.write_bytes

    def full(self, data):
        if self.name.endswith(suffix):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", full)


def test_unwritable_out_parent_is_refused_before_compiling(tmp_path, monkeypatch, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(dump_mod.os, "access",
                        lambda p, mode, **k: False if Path(p) == parent else real_access(p, mode, **k))
    _no_compile(monkeypatch)
    assert cli.main([*MLP, "--out", str(parent / "d")]) == 2
    err = capsys.readouterr().err
    assert "no write permission" in err and str(parent) in err and "hint:" in err and "Traceback" not in err
    assert list(parent.iterdir()) == []


def test_full_disk_while_dumping_keeps_previous_dump(tmp_path, monkeypatch, warm_cache):
    out = tmp_path / "d"
    compile_tiny(warm_cache, name="first").dump(out)
    before = snapshot(out)
    cm = compile_tiny(warm_cache, name="second")
    _enospc_on(".cubin", monkeypatch)
    with pytest.raises(DumpError, match="No space left on device") as ei:
        cm.dump(out)
    assert "free some disk space" in ei.value.hint
    assert snapshot(out) == before and report_graph(out) == "first" and siblings(out) == []


def test_full_disk_through_the_cli_exits_2_without_traceback(tmp_path, monkeypatch, capsys):
    _enospc_on(".cubin", monkeypatch)       # hits both the cache's kernel.cubin and the dump's <name>.cubin
    out = tmp_path / "d"
    rc = cli.main([*MLP, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "No space left on device" in err and "hint:" in err and "Traceback" not in err
    assert not out.exists() and siblings(out) == []


def test_cache_dir_that_is_a_file_warns_and_compiles(tmp_path, monkeypatch):
    f = tmp_path / "cachefile"
    f.write_text("not a folder")
    with pytest.warns(CacheWarning, match="artifact cache"):
        cm = compile_tiny(f)
    assert cm.kernels and f.read_text() == "not a folder"


def test_read_only_cache_dir_warns_and_compiles(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    root.mkdir()

    real = cache_mod.tempfile.mkdtemp

    def read_only(suffix=None, prefix=None, dir=None):   # only folders created inside the cache fail
        if dir is not None and root in Path(dir).parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(suffix, prefix, dir)
    monkeypatch.setattr(cache_mod.tempfile, "mkdtemp", read_only)
    with pytest.warns(CacheWarning, match="Read-only file system"):
        cm = compile_tiny(root)
    assert cm.kernels and not any(k.cached for k in cm.kernels)


def test_unreadable_cache_entry_warns_and_compiles(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    compile_tiny(root)                                   # a valid entry on disk

    def denied(p, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
    monkeypatch.setattr(cache_mod, "_read_file", denied)
    with pytest.warns(CacheWarning, match="Permission denied"):
        cm = compile_tiny(root)
    assert cm.kernels and not any(k.cached for k in cm.kernels)
    assert list(root.glob("??/*/manifest.json"))        # an unreadable entry is not deleted


def test_read_only_generated_source_folder_falls_back_to_a_private_one(tmp_path, monkeypatch):
    """codegen writes each kernel's Triton source under <cache>/triton_src before importing it; a
    read-only cache used to stop the compile there with a raw OSError."""
    import tempfile

    import torch
    from torch import nn

    from dsr_compiler.codegen import compile as codegen_compile
    root = tmp_path / "cache"
    (root / "triton_src").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(codegen_compile.os, "access",
                        lambda p, mode, **k: False if Path(p) == root / "triton_src" else real_access(p, mode, **k))

    class Fresh(nn.Module):          # a kernel this process has not imported yet
        def forward(self, x):
            return torch.relu(x) * 7.25 + 0.5
    assert compile_tiny(root, Fresh()).kernels
    assert list((root / "triton_src").iterdir()) == []
    src = codegen_compile._PRIVATE_SRC
    assert src is not None and src.parent == Path(tempfile.gettempdir()) and src.name.startswith("dsr_triton_src_")
    assert src.stat().st_mode & 0o077 == 0       # private: the source written there is imported


def test_oserror_escaping_a_command_is_exit_2_with_where(monkeypatch, capsys):
    def denied(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/config.json")
    monkeypatch.setattr(cli, "cmd_compile", denied)
    assert cli.main(["compile"]) == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and "/data/config.json" in err and "hint:" in err and "Traceback" not in err


def test_cache_dir_that_is_a_file_through_the_cli_is_one_warning_line(tmp_path, monkeypatch, capsys):
    f = tmp_path / "cachefile"
    f.write_text("x")
    monkeypatch.setenv("DSR_CACHE_DIR", str(f))
    assert cli.main([*MLP, "--out", str(tmp_path / "d")]) == 0
    err = capsys.readouterr().err
    assert err.count("dsrc: warning: artifact cache") == 1 and "Traceback" not in err, err
    assert (tmp_path / "d" / ".dsr-dump").is_file() and f.read_text() == "x"


def test_closed_stdout_pipe_is_quiet(monkeypatch, capsys):
    """`dsrc ir | head -1`: the reader leaves early; not an error report, not exit 2."""
    def piped(args):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")
    monkeypatch.setattr(cli, "cmd_ir", piped)
    assert cli.main(["ir"]) == 141
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name,value", [("DSR_DEBUG", "abc"), ("DSR_DEBUG", "-5"), ("DSR_DEBUG", "8"),
                                        ("DSR_NO_CACHE", "yes"), ("DSR_NO_CACHE", "2"), ("DSR_BACKEND", "tpu")])
def test_malformed_knob_is_a_clean_error_without_traceback(name, value, capsys, monkeypatch):
    """A knob value outside its documented range is refused with the knob's help (exit 2), and a bad
    DSR_DEBUG does not switch tracebacks on while it is being reported."""
    from dsr_compiler import cli
    monkeypatch.setenv(name, value)
    rc = cli.main(["ir", "--module", "mlp", "--no-fp8"])
    err = capsys.readouterr().err
    assert rc == 2 and name in err and "Traceback" not in err, err
