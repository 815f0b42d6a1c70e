"""The production quant_fp8 family (codegen/fp8_rows.py) for sm_90a without a GPU: its Triton source
compiles to PTX and cubin through `triton.compile(..., GPUTarget("cuda", 90, 32))`, its direct-PTX
template (quant_fp8_rows.ptx.j2) assembles with ptxas -arch=sm_90a, and neither spills. Run with
`-s` to see the register report."""
from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import jinja2
import pytest
from fp8_kernels import BF16, F32, dequant_kernel, quant_spec, rendered_quant
from dsr_compiler.codegen import compile_triton, lower_kernel, render
from dsr_compiler.codegen.compile import parse_ptxas_log, ptxas_path, run_ptxas
from dsr_compiler.codegen.ptx import compile_ptx_kernel, f32_hex, render_ptx
from dsr_compiler.codegen.render import FILTERS, jinja_environment

QUANT_SPECS = [quant_spec(7168), quant_spec(7168, BF16, "ue8m0")]
PTX_SPECS = [(K, dt, fmt) for K in (128, 7168) for dt in (F32, BF16) for fmt in (None, "ue8m0")]


def _ptxas_binaries() -> list[str]:
    """Every distinct ptxas around: Triton's bundled ones and the one on PATH."""
    found = [ptxas_path(90)]
    bundled = Path(found[0]).parent / "ptxas"
    found += [str(bundled)] if bundled.exists() else []
    found += [p] if (p := shutil.which("ptxas")) else []
    return list(dict.fromkeys(found))


@pytest.fixture(scope="module")
def triton_quant():
    return {s.name + s.hash(): compile_triton(s, render(s)) for s in QUANT_SPECS}


@pytest.mark.parametrize("spec", QUANT_SPECS, ids=lambda s: s.hash()[:8])
def test_triton_quant_compiles_for_sm90a(spec, triton_quant):
    c = triton_quant[spec.name + spec.hash()]
    assert ".target sm_90a" in c.ptx and f".entry {spec.name}(" in c.ptx
    assert c.cubin[:4] == b"\x7fELF"
    # exactness on the GPU rests on IEEE division and on the magic add/sub surviving codegen
    assert "div.rn.f32" in c.ptx and "div.full" not in c.ptx and "div.approx" not in c.ptx
    assert re.search(r"\bsub\.f32\b", c.ptx) and ".ftz" not in c.ptx
    assert "max.NaN.f32" in c.ptx          # NaN-propagating amax
    assert c.spills == 0 and c.stack == 0, c.ptxas_log


def test_dequant_compiles_for_sm90a():
    spec = lower_kernel(dequant_kernel(7168, BF16), 1)
    c = compile_triton(spec, render(spec))
    assert c.cubin[:4] == b"\x7fELF" and c.spills == 0


def test_native_cast_lowers_to_satfinite_cvt():
    """On a GPU `.to(tl.float8e4nv)` is cvt.rn.satfinite.e4m3x2.f32 (RNE, saturating): after
    `_fp8_e4m3_round` its input is exactly representable, so that path agrees with ours too."""
    spec = quant_spec(128)
    call = "q_code = _fp8_e4m3_quantize(tl.math.div_rn(q_v, q_s))"
    src = render(spec)
    assert src.count(call) == 1
    src = src.replace(call, "q_code = _fp8_e4m3_round(tl.math.div_rn(q_v, q_s)).to(tl.float8e4nv)"
                            ".to(tl.uint8, bitcast=True)")
    assert "cvt.rn.satfinite.e4m3x2.f32" in compile_triton(spec, src).ptx


@pytest.mark.parametrize("ptxas", _ptxas_binaries())
@pytest.mark.parametrize("K,dt,fmt", PTX_SPECS)
def test_ptx_template_assembles_for_sm90a(K, dt, fmt, ptxas):
    spec = quant_spec(K, dt, fmt)
    ptx = render_ptx(spec)
    assert "template quant_fp8_rows.ptx.j2" in ptx.splitlines()[0]
    assert ".target sm_90a" in ptx and "cvt.rn.satfinite.e4m3x2.f32" in ptx
    cubin, log, stats = run_ptxas(ptx, 90, spec.name, exe=ptxas)
    assert cubin[:4] == b"\x7fELF"
    assert f"'{spec.name}'" in log and stats["spill_stores"] == stats["spill_loads"] == stats["stack"] == 0
    assert stats["registers"] <= 64, log          # one warp per tile: no occupancy pressure below 64


def test_register_report(triton_quant):
    """ptxas -v figures for the PTX template vs Triton's PTX of the same kernel (printed with -s)."""
    rows = []
    for spec in QUANT_SPECS:
        hand, tri = compile_ptx_kernel(spec), triton_quant[spec.name + spec.hash()]
        rows.append(f"{spec.name:24s} {spec.hash()[:8]} ptx template: {hand.registers:3d} regs {hand.spills} spills | "
                    f"triton: {tri.registers:3d} regs {tri.spills} spills {tri.shared_mem} B smem "
                    f"({tri.num_warps} warps)")
        assert hand.spills == tri.spills == 0
        assert parse_ptxas_log(hand.ptxas_log)["registers"] == hand.registers
    print("\n" + "\n".join(rows))


def test_templates_render_deterministically_and_strictly():
    spec = QUANT_SPECS[1]
    assert render(spec) == render(spec) == rendered_quant(7168, BF16, "ue8m0")
    assert render_ptx(spec) == render_ptx(spec)
    head = render(spec).splitlines()[:3]
    assert head[1] == f"# kernel {spec.name} | family quant_fp8 | template quant_fp8_rows.py.j2"
    assert head[2] == f"# spec sha256 {spec.hash()}"
    ast.parse(render(lower_kernel(dequant_kernel(256, BF16), 1)))
    filters = {**FILTERS, "f32_hex": f32_hex}
    for name in ("quant_fp8_rows.py.j2", "quant_fp8_rows.ptx.j2"):
        with pytest.raises(jinja2.UndefinedError):
            jinja_environment(filters).get_template(name).render()
    assert quant_spec(256) != quant_spec(256, scale_fmt="ue8m0")
    assert quant_spec(256).hash() != quant_spec(256, scale_fmt="ue8m0").hash()
