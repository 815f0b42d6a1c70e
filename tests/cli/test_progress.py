"""Progress lines (dsr_compiler/progress.py): on a terminal, after a delay, a line per stage and kernel
rewritten in place and cleared at the end; nothing when stderr is not a terminal or with --quiet."""
from __future__ import annotations

import io
import re

import pytest

from dsr_compiler import cli
from dsr_compiler.progress import Progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_on_a_terminal_are_rewritten_and_cleared():
    s = FakeTTY()
    p = Progress(s, enabled=True, after_s=0.0)
    p.stage("trace")
    p.step("codegen", 2, 29, "k2_gemm_fp8")
    assert s.getvalue().count("\r") == 2 and "trace" in s.getvalue() and "codegen 2/29 k2_gemm_fp8" in s.getvalue()
    p.done()
    assert s.getvalue().endswith("\r") and s.getvalue().rsplit("\r", 2)[-2].strip() == ""


@pytest.mark.parametrize("stream,quiet", [(io.StringIO(), False), (FakeTTY(), True)])
def test_nothing_off_a_terminal_or_when_quiet(stream, quiet):
    p = Progress.for_cli(quiet=quiet, stream=stream)
    p.after_s = 0.0
    p.stage("trace")
    p.done()
    assert stream.getvalue() == ""


def test_nothing_before_the_delay():
    s = FakeTTY()
    p = Progress(s, enabled=True, after_s=3600.0)
    p.stage("trace")
    p.done()
    assert s.getvalue() == ""


@pytest.mark.parametrize("quiet", [False, True])
def test_dsrc_compile_reports_stages_and_kernels(monkeypatch, quiet):
    s = FakeTTY()

    def for_cli(cls, quiet: bool = False, stream=None):
        return cls(s, enabled=not quiet, after_s=0.0)
    monkeypatch.setattr(Progress, "for_cli", classmethod(for_cli))
    argv = ["compile", "--module", "mlp", "--seq", "4"] + (["--quiet"] if quiet else [])
    assert cli.main(argv) == 0
    out = s.getvalue()
    if quiet:
        assert out == ""
        return
    for stage in ("trace", "passes", "params"):
        assert f"] {stage}" in out
    # kernels compile on parallel workers (codegen/build.py): the count rises in order, the names come as they finish
    assert "codegen 1/3 k" in out and "codegen 3/3 k" in out
    assert all(re.search(rf"codegen [123]/3 k{i}_", out) for i in (1, 2, 3)), out
    assert out.rsplit("\r", 2)[-2].strip() == ""    # cleared before the summary


def test_dsrc_bench_names_each_measurement(monkeypatch, capsys):
    s = FakeTTY()

    def for_cli(cls, quiet: bool = False, stream=None):
        return cls(s, enabled=not quiet, after_s=0.0)
    monkeypatch.setattr(Progress, "for_cli", classmethod(for_cli))
    assert cli.main(["bench", "--module", "mlp", "--seq", "4", "--no-fp8"]) == 0
    out = s.getvalue()
    for part in ("eager ATen count", "cold compile", "warm compile", "torch.compile (inductor)"):
        assert f"] {part}: start" in out, part
    assert "cold compile: trace" in out and "cold compile: codegen 1/" in out and "warm compile: passes" in out
    assert out.rsplit("\r", 2)[-2].strip() == ""    # cleared before the figures are printed
    assert "compile time: cold" in capsys.readouterr().out
