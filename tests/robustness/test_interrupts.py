"""Ctrl-C is never wrapped, swallowed or blamed on the user's model: `dsrc` exits 130 and leaves
nothing half-written (no partial dump, no cache temporary folder).

A real Ctrl-C during tracing used to come out as "trace: forward() raised AttributeError ...
partially initialized module 'torch._dynamo'" (exit 2) or vanish entirely: torch.fx captures a
stack for every node through a C++ helper that lazily imports torch._inductor / torch._dynamo,
and that layer swallows a KeyboardInterrupt raised inside the import. The tests below reproduce it
with a forward() that delivers a real SIGINT and swallows the KeyboardInterrupt, as torch does.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dsr_compiler as dsr
from dsr_compiler import cli
from dsr_compiler.errors import DsrError
from dsr_compiler.models.layers import MLPBlock
from tests.robustness.io_helpers import compile_tiny, report_graph, siblings, snapshot

MLP = ["compile", "--module", "mlp", "--no-fp8"]


def _swallowed_sigint() -> None:
    """A real SIGINT whose KeyboardInterrupt a library below us swallows."""
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        pass


class RaisesInterrupt(nn.Module):
    def forward(self, x):
        raise KeyboardInterrupt


class SwallowsThenFails(nn.Module):
    def forward(self, x):
        _swallowed_sigint()
        raise AttributeError("partially initialized module 'torch._dynamo' has no attribute 'utils'")


class SwallowsThenContinues(nn.Module):
    def forward(self, x):
        _swallowed_sigint()
        return torch.relu(x)


class RaisesSystemExit(nn.Module):
    def forward(self, x):
        raise SystemExit(3)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _env(cache_dir, monkeypatch):
    monkeypatch.setenv("DSR_CACHE_DIR", str(cache_dir))
    monkeypatch.delenv("DSR_DEBUG", raising=False)


def _cache_leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".tmp-*")]


@pytest.mark.parametrize("module", [RaisesInterrupt, SwallowsThenFails, SwallowsThenContinues])
def test_interrupt_in_forward_is_keyboard_interrupt_not_trace_error(module):
    with pytest.raises(KeyboardInterrupt) as ei:
        dsr.trace(module(), (torch.randn(2, 4),))
    assert not isinstance(ei.value, DsrError)


def test_system_exit_in_forward_is_not_wrapped():
    with pytest.raises(SystemExit):
        dsr.trace(RaisesSystemExit(), (torch.randn(2, 4),))


def test_sigint_handler_is_restored_after_tracing():
    before = signal.getsignal(signal.SIGINT)
    dsr.trace(nn.ReLU(), (torch.randn(2, 4),))
    with pytest.raises(KeyboardInterrupt):
        dsr.trace(SwallowsThenContinues(), (torch.randn(2, 4),))
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("forward", ["raise", "swallow"])
def test_cli_interrupt_while_tracing_exits_130_and_writes_nothing(tmp_path, monkeypatch, capsys, cache_dir, forward):
    def fwd(self, x):
        if forward == "swallow":
            _swallowed_sigint()
            raise AttributeError("module 'torch._dynamo' has no attribute 'guards'")
        raise KeyboardInterrupt
    monkeypatch.setattr(MLPBlock, "forward", fwd)
    out = tmp_path / "d"
    assert cli.main([*MLP, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "AttributeError" not in err and "forward() raised" not in err
    assert not out.exists() and siblings(out) == [] and _cache_leftovers(cache_dir) == []


def test_cli_interrupt_between_dump_renames_keeps_previous_dump(tmp_path, monkeypatch, cache_dir):
    import dsr_compiler.dump as dump_mod
    out = tmp_path / "d"
    compile_tiny(cache_dir, name="previous").dump(out)
    before = snapshot(out)
    real = {"rename": os.rename, "replace": os.replace}
    hit = []

    def patched(kind):
        def move(src, dst):
            if Path(dst) == out and Path(src).name.startswith(".d.tmp-"):
                hit.append(src)          # previous dump moved aside; Ctrl-C before the new one lands
                raise KeyboardInterrupt
            return real[kind](src, dst)
        return move
    for kind in real:                    # whichever of the two the writer uses
        monkeypatch.setattr(dump_mod.os, kind, patched(kind))
    monkeypatch.setattr(dump_mod, "_exchange", lambda a, b: False, raising=False)   # the two-rename path
    assert cli.main([*MLP, "--out", str(out)]) == 130
    assert hit
    assert snapshot(out) == before and report_graph(out) == "previous" and siblings(out) == []


def test_cli_interrupt_during_cache_put_leaves_no_temporary_folder(tmp_path, monkeypatch):
    cold = tmp_path / "cold-cache"           # a cold cache: every kernel is put
    monkeypatch.setenv("DSR_CACHE_DIR", str(cold))
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name == "kernel.cubin":
            raise KeyboardInterrupt
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    out = tmp_path / "d"
    assert cli.main([*MLP, "--out", str(out)]) == 130
    assert _cache_leftovers(cold) == [] and not out.exists() and siblings(out) == []


def test_real_sigint_in_a_real_process_exits_130_without_traceback(tmp_path):
    """The exit status and stderr as a shell sees them: a real SIGINT delivered during tracing."""
    code = ("import os, signal, sys\n"
            "from dsr_compiler.models.layers import MLPBlock\n"
            "def fwd(self, x):\n"
            "    try:\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "    except KeyboardInterrupt:\n"
            "        pass\n"                  # swallowed, as torch's C++ stack capture does
            "    raise AttributeError(\"partially initialized module 'torch._dynamo'\")\n"
            "MLPBlock.forward = fwd\n"
            "from dsr_compiler.cli import main\n"
            f"sys.exit(main({[*MLP, '--out', str(tmp_path / 'd')]!r}))\n")
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1", DSR_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("DSR_DEBUG", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=300)
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "AttributeError" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
