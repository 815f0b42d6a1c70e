"""The build compiles kernels on several worker processes at once (codegen/build.py, DSR_COMPILE_JOBS):
the artifacts are the same as one at a time, in kernel order; a failing kernel is the error of the
first failure in kernel order; Ctrl-C and errors leave no compile running."""
from __future__ import annotations

import time

import pytest
from codegen_helpers import KB
from dsr_compiler.codegen.build import build_kernels
from dsr_compiler.codegen import compile as cc
from dsr_compiler.ir import DType, sym
from dsr_compiler.ir.errors import CodegenError
from dsr_compiler.ir.passes import PIPELINE, PassContext, run_passes
from dsr_compiler.runtime.cache import ArtifactCache

T = sym("T")


def _graph(width: int = 64):
    kb = KB("par", "graph")
    x = kb.input("x", DType.f32, T, width)
    wn = kb.input("norm.weight", DType.f32, width)
    w1 = kb.input("w1", DType.f32, 96, width)
    w2 = kb.input("w2", DType.f32, width, 96)
    h = kb.op("rms_norm", x, wn, eps=1e-6)
    a = kb.op("silu", kb.op("linear", h, w1))
    y = kb.op("add", kb.op("linear", a, w2), x)
    out = kb.op("softmax", kb.op("mul", y, y), dim=-1, name="out")
    g = kb.b.build([out])
    return run_passes(g, PIPELINE, PassContext())[-1].graph


def _build(monkeypatch, tmp_path, jobs: int, g, **kw):
    monkeypatch.setenv("DSR_COMPILE_JOBS", str(jobs))
    seen: list[tuple[int, int, str]] = []
    arts = build_kernels(g, cache=ArtifactCache(tmp_path / f"cache{jobs}", enabled=True),
                         on_kernel=lambda i, n, name: seen.append((i, n, name)), **kw)
    return arts, seen


def test_parallel_artifacts_equal_sequential_ones_in_kernel_order(monkeypatch, tmp_path):
    g = _graph()
    assert len(g.kernels) >= 3
    one, seen1 = _build(monkeypatch, tmp_path, 1, g)
    two, seen2 = _build(monkeypatch, tmp_path, 2, g)
    names = [a.spec.name for a in one]
    assert [a.spec.name for a in two] == names and [s[2] for s in seen1] == names
    assert sorted(s[2] for s in seen2) == sorted(names) and [s[0] for s in seen2] == list(range(1, len(names) + 1))
    for a, b in zip(one, two):
        assert (a.source, a.compiled.ptx, a.compiled.registers) == (b.source, b.compiled.ptx, b.compiled.registers)
        assert not a.cached and not b.cached
    assert len(cc._WORKER) <= 2           # warm workers for the next build, never more than the jobs


def test_the_first_failing_kernel_in_order_is_the_error(monkeypatch, tmp_path):
    g = _graph()
    real = cc.compile_triton
    bad = {g.kernels[1].name, g.kernels[-1].name}

    def failing(spec, source, target="sm_90a"):
        if any(spec.name.startswith(n.split("_")[0] + "_") for n in bad):
            if spec.name.startswith("k2_"):
                time.sleep(2.0)             # the later kernel fails first; k2's error must still win
            raise CodegenError(f"codegen: broken on purpose: {spec.name}")
        return real(spec, source, target)

    monkeypatch.setattr("dsr_compiler.codegen.build.compile_triton", failing)
    with pytest.raises(CodegenError, match=r"broken on purpose: k2_"):
        _build(monkeypatch, tmp_path, 2, g)
    with pytest.raises(CodegenError, match=r"broken on purpose: k2_"):
        _build(monkeypatch, tmp_path, 1, g)


def test_bad_job_counts_are_refused(monkeypatch, tmp_path):
    for bad in ("-1", "lots", "65"):
        with pytest.raises(CodegenError, match="DSR_COMPILE_JOBS"):
            _build(monkeypatch, tmp_path, bad, _graph())


def test_ctrl_c_during_a_parallel_build_ends_every_compile(monkeypatch, tmp_path):
    import os
    import signal
    import threading

    from dsr_compiler.codegen import render as real_render
    monkeypatch.setattr("dsr_compiler.codegen.build.render",
                        lambda spec: "import time\ntime.sleep(120)\n" + real_render(spec))   # every compile hangs
    monkeypatch.setenv("DSR_COMPILE_TIMEOUT", "600")
    cc.stop_workers()
    busy: list[int] = []
    timer = threading.Timer(4.0, lambda: (busy.append(sum(p.poll() is None for p in cc._WORKER)),
                                          os.kill(os.getpid(), signal.SIGINT)))
    timer.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            _build(monkeypatch, tmp_path, 2, _graph())
    finally:
        timer.cancel()
    assert busy == [2]                                    # two compiles were running at once
    assert time.perf_counter() - t0 < 60 and cc._WORKER == []   # and both were ended, none queued after
