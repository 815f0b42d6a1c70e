"""Decode positions (issue 8, "Silent wrong results"): a position outside the KV cache is never a
silent NaN or a dropped row. A host-known position (Python int, CPU tensor) is checked before any
launch with eager's message; a device-side index out of range sets the kernel's error flag, which
`cm.check()` raises (after every call under DSR_DEBUG>=1, and in `dsrc run --check`).

The sm_90a compile is stubbed out (`no_sm90`): the kernels run on the Triton interpreter;
`test_index_copy_with_flag_compiles_for_sm90a` compiles the flagged kernel for real.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dsr_compiler as dsr
from dsr_compiler import api, knobs
from dsr_compiler.codegen import build
from dsr_compiler.errors import DsrError
from dsr_compiler.models import MLA, ModelConfig
from dsr_compiler.models.steps import DecodeStep
from dsr_compiler.workloads import init_weights
from tests.tolerances import assert_close

CFG = ModelConfig.named("deepseek-v3-tiny").replace(hidden_size=64, num_attention_heads=2)
S_MAX = 8


@pytest.fixture
def no_sm90(monkeypatch):
    monkeypatch.setattr(build, "compile_cached", lambda spec, source, target, cache: (None, False))


def _args(start, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 1, CFG.hidden_size, generator=g), torch.randn(1, S_MAX, CFG.kv_lora_rank, generator=g),
            torch.randn(1, S_MAX, CFG.qk_rope_head_dim, generator=g), start)


@pytest.fixture(scope="module")
def decode():
    m = MLA(CFG)
    init_weights(m, 0)
    step = DecodeStep(m.eval()).eval()
    mp = pytest.MonkeyPatch()
    mp.setattr(build, "compile_cached", lambda spec, source, target, cache: (None, False))
    try:
        cm = dsr.compile(step, _args(torch.tensor(3)), backend="interpret", fp8=False)
    finally:
        mp.undo()
    return step, cm


def test_python_int_position_is_accepted_like_eager(decode):
    step, cm = decode
    args = _args(5, seed=1)
    with torch.no_grad():
        want = step(*args)
    for got, ref in zip(cm(*args), want):
        assert_close(got, ref)
    cm.check()


@pytest.mark.parametrize("start", [-1, torch.tensor(-1)], ids=["int", "cpu_tensor"])
def test_negative_host_position_raises_before_launch(decode, start):
    step, cm = decode
    with pytest.raises(DsrError, match=r"start_pos must be a non-negative int, got -1"):
        cm(*_args(start))
    cm.check()                       # nothing was launched: no flag set


@pytest.mark.parametrize("start", [S_MAX, torch.tensor(S_MAX + 3)], ids=["int", "cpu_tensor"])
def test_position_past_the_cache_raises_like_eager(decode, start):
    step, cm = decode
    v = int(start)
    with pytest.raises(DsrError, match=rf"cache overflow: start_pos {v} \+ 1 new tokens > cache length {S_MAX}"):
        cm(*_args(start))
    if isinstance(start, int):       # eager's own message is the reference
        with pytest.raises(DsrError, match=rf"cache overflow: start_pos {v} \+ 1 new tokens > cache length {S_MAX}"):
            step(*_args(start))
    cm.check()


class IndexWrite(nn.Module):
    """An index_copy whose index is an input tensor: no host-side guard, only the kernel's flag."""

    def forward(self, cache: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return cache.index_copy(1, index, rows)


def _write_args(index: list[int]):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, S_MAX, 4, generator=g), torch.tensor(index), torch.randn(2, len(index), 4, generator=g)


@pytest.mark.parametrize("bad", [-3, S_MAX, 100])
def test_device_index_out_of_range_sets_the_flag(no_sm90, bad):
    cm = dsr.compile(IndexWrite(), _write_args([1, 2]), backend="interpret", fp8=False)
    kernel = next(k.spec.name for k in cm.kernels if k.spec.family == "index_copy")
    out = cm(*_write_args([1, bad]))                     # no host sync on the call path
    assert out.shape == (2, S_MAX, 4)
    with pytest.raises(DsrError, match=rf"kernel {kernel} got index {bad}, outside the valid range \[0, {S_MAX}\)"):
        cm.check()
    cm.check()                                           # check() clears the flag
    cm(*_write_args([0, S_MAX - 1]))                     # the edges are valid
    cm.check()


def test_debug_checks_after_every_call(no_sm90):
    cm = dsr.compile(IndexWrite(), _write_args([1, 2]), backend="interpret", fp8=False)
    with knobs.scoped(DSR_DEBUG=1):
        with pytest.raises(DsrError, match=r"got index -1, outside the valid range \[0, 8\)"):
            cm(*_write_args([-1, 2]))


def test_dsrc_run_check_synchronises(monkeypatch, no_sm90, capsys):
    from dsr_compiler.cli import main
    calls = []
    real = api.CompiledModule.check
    monkeypatch.setattr(api.CompiledModule, "check", lambda self: (calls.append(1), real(self))[1])
    rc = main(["run", "--module", "mla", "--no-fp8", "--seq", "8", "--backend", "interpret", "--check"])
    assert rc == 0 and calls, capsys.readouterr().out


def test_index_copy_with_flag_compiles_for_sm90a():
    cm = dsr.compile(IndexWrite(), _write_args([1, 2]), backend="interpret", fp8=False)
    k = next(k for k in cm.kernels if k.spec.family == "index_copy")
    assert [a.role for a in k.spec.tensor_args].count("check") == 1
    assert k.compiled.spills == 0 and ".entry" in k.compiled.ptx


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_position_is_flagged_on_the_device(decode):
    """On the GPU a device-side position is not read on the call path: the kernel flags it."""
    step, _ = decode
    cm = dsr.compile(step, _args(torch.tensor(3)), backend="cuda", fp8=False)
    x, kv, pe, _ = _args(0)
    cm(x.cuda(), kv.cuda(), pe.cuda(), torch.tensor(S_MAX - 1, device="cuda"))
    cm.check()
    cm(x.cuda(), kv.cuda(), pe.cuda(), torch.tensor(-1, device="cuda"))
    with pytest.raises(DsrError, match=rf"got index -1, outside the valid range \[0, {S_MAX}\)"):
        cm.check()
    with pytest.raises(DsrError, match=r"start_pos must be a non-negative int, got -2"):
        cm(x.cuda(), kv.cuda(), pe.cuda(), -2)          # host-known: checked before launching
