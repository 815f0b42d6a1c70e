"""The direct PTX backend (codegen/ptx.py, templates/*.ptx.j2): every rendered PTX assembles with
ptxas for sm_90a (registers, no spills), takes its Triton twin's arguments and grid, renders
deterministically, and says clearly why a kernel stays on Triton. Running PTX needs a GPU: the
numeric comparison of PTX kernels against their Triton twins is in tests/gpu/test_ptx_fp8_gpu.py."""
from __future__ import annotations

import re

import pytest
from codegen_helpers import KB
from dsr_compiler.codegen import lower_kernel
from dsr_compiler.codegen.ptx import (
    PTX_FAMILIES,
    PtxUnsupported,
    compile_ptx_kernel,
    f32_hex,
    ptx_supported,
    render_ptx,
    resolve_ptx_families,
)
from dsr_compiler.ir import DType
from dsr_compiler.ir.errors import CodegenError


def _pointwise():
    kb = KB("k1_pointwise_silu_gt", "pointwise")
    kb.input("x", DType.bf16, "T", 4, 64)
    kb.input("b", DType.f32, 64)
    kb.input("y", DType.f32, 4, "T", 64)
    p = kb.op("permute", "y", dims=(1, 0, 2))            # a strided operand: div/mod coordinates
    a = kb.op("add", "x", "b")                             # a broadcast operand
    s = kb.op("silu", a)
    w = kb.op("where", kb.op("gt", s, p), s, p)
    e = kb.op("exp", kb.op("neg", kb.op("abs", w)))
    return kb.kernel(kb.op("cast", kb.op("mul", e, w), dtype=DType.bf16), w)


def _rms(n: int, prologue: bool, dt=DType.bf16):
    kb = KB("k1_reduction_rms_norm", "reduction")
    kb.input("x", dt, "T", n)
    kb.input("w", dt, n)
    src = "x"
    if prologue:
        kb.input("r", dt, "T", n)
        src = kb.op("add", "x", "r")
    y = kb.op("rms_norm", src, "w", eps=1e-6)
    return kb.kernel(y, src) if prologue else kb.kernel(y)


def _row_reduce(op: str):
    kb = KB(f"k1_reduction_{op}", "reduction")
    kb.input("x", DType.f32, "T", 300)
    return kb.kernel(kb.op(op, kb.op("mul", "x", "x"), dim=-1, keepdim=True))


@pytest.mark.parametrize("make", [_pointwise, lambda: _rms(256, False), lambda: _rms(2048, True),
                                  lambda: _rms(7168, True, DType.f32), lambda: _row_reduce("sum"),
                                  lambda: _row_reduce("mean"), lambda: _row_reduce("amax")])
def test_ptx_assembles_for_sm90a_with_the_twins_signature(make):
    spec = lower_kernel(make(), 1)
    c = compile_ptx_kernel(spec)
    assert c.cubin and c.registers > 0 and c.spills == 0 and c.stack == 0
    assert c.threads == 32 * spec.num_warps
    params = re.findall(r"\.param \.(u64|u32) (\w+)", c.ptx)
    assert [n for _, n in params] == [a.name for a in spec.args]          # the Triton twin's arguments
    assert all(t == ("u64" if a.kind == "tensor" or a.scalar_dtype == "i64" else "u32")
               for (t, _), a in zip(params, spec.args))
    assert f"launch: grid ({', '.join(spec.grid)})" in c.ptx
    assert render_ptx(spec) == c.ptx                                       # deterministic
    if spec.family == "reduction" and spec.num_warps > 1:
        assert "bar.sync" in c.ptx and c.shared_mem == 4 * spec.num_warps


def test_unsupported_kernels_say_why():
    kb = KB("k1_reduction_softmax", "reduction")
    kb.input("x", DType.f32, "T", 64)
    soft = lower_kernel(kb.kernel(kb.op("softmax", "x", dim=-1)), 1)
    assert "reduction 'softmax'" in ptx_supported(soft)
    kb = KB("k1_pointwise_gelu", "pointwise")
    kb.input("x", DType.f32, "T", 64)
    gelu = lower_kernel(kb.kernel(kb.op("gelu", "x")), 1)
    assert "no PTX for gelu" in ptx_supported(gelu)
    kb = KB("k1_gemm_linear", "gemm")
    kb.input("x", DType.f32, "T", 64)
    kb.input("w", DType.f32, 32, 64)
    gemm = lower_kernel(kb.kernel(kb.op("linear", "x", "w")), 1)
    with pytest.raises(PtxUnsupported, match="family gemm has no PTX template"):
        render_ptx(gemm)


def test_family_selection_knob_and_option(monkeypatch):
    monkeypatch.delenv("DSR_PTX", raising=False)
    assert resolve_ptx_families() == ()
    monkeypatch.setenv("DSR_PTX", "1")
    assert resolve_ptx_families() == PTX_FAMILIES
    monkeypatch.setenv("DSR_PTX", "reduction, quant_fp8")
    assert resolve_ptx_families() == ("reduction", "quant_fp8")
    monkeypatch.setenv("DSR_PTX", "0")
    assert resolve_ptx_families() == ()
    assert resolve_ptx_families(("pointwise",)) == ("pointwise",)          # the compile option wins
    assert resolve_ptx_families(True) == PTX_FAMILIES
    with pytest.raises(CodegenError, match="no PTX templates"):
        resolve_ptx_families(("gemm",))


def test_f32_immediates_are_exact():
    assert f32_hex(1.0) == "0f3F800000" and f32_hex(448.0) == "0f43E00000"
    assert f32_hex(float("-inf")) == "0fFF800000"


def test_cuda_driver_launcher_fails_clearly_without_a_gpu():
    import torch
    from dsr_compiler.ir.errors import RuntimeLaunchError
    from dsr_compiler.runtime import cuda_driver
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/gpu exercises the launcher")
    with pytest.raises(RuntimeLaunchError, match="cuda-python|cuInit"):
        cuda_driver.driver()
    spec = lower_kernel(_rms(256, False), 1)
    launch = cuda_driver.load_ptx_kernel(compile_ptx_kernel(spec), spec)
    with pytest.raises(RuntimeLaunchError, match="arguments"):
        launch[(1,)](torch.zeros(1))
