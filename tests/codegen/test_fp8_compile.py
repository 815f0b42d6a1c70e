"""quant_fp8 for sm_90a without a GPU: the Triton source compiles to PTX and cubin through
`triton.compile(..., GPUTarget("cuda", 90, 32))`, the hand-written PTX template assembles with
ptxas -arch=sm_90a, and neither spills. Run with `-s` to see the register report."""
from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import jinja2
import pytest

from dsr_compiler.codegen import fp8

QUANT_SPECS = [fp8.quant_spec(7168), fp8.quant_spec(7168, "bf16", scale_fmt="ue8m0")]
PTX_SPECS = [fp8.quant_spec(K, dt, scale_fmt=fmt) for K in (128, 7168) for dt in ("f32", "bf16")
             for fmt in (None, "ue8m0")]


def _ptxas_binaries() -> list[str]:
    """Every distinct ptxas around: Triton's bundled ones and the one on PATH."""
    found = [fp8.ptxas_path(90)]
    bundled = Path(found[0]).parent / "ptxas"
    found += [str(bundled)] if bundled.exists() else []
    found += [p] if (p := shutil.which("ptxas")) else []
    return list(dict.fromkeys(found))


@pytest.fixture(scope="module")
def triton_quant():
    return {s.name: fp8.compile_ptx(fp8.render_quant(s)) for s in QUANT_SPECS}


@pytest.mark.parametrize("spec", QUANT_SPECS, ids=lambda s: s.name)
def test_triton_quant_compiles_for_sm90a(spec, triton_quant):
    c = triton_quant[spec.name]
    assert ".target sm_90a" in c.ptx and f".entry {spec.name}(" in c.ptx
    assert c.cubin[:4] == b"\x7fELF"
    # exactness on the GPU rests on IEEE division and on the magic add/sub surviving codegen
    assert "div.rn.f32" in c.ptx and "div.full" not in c.ptx and "div.approx" not in c.ptx
    assert re.search(r"\bsub\.f32\b", c.ptx) and ".ftz" not in c.ptx
    assert "max.NaN.f32" in c.ptx          # NaN-propagating amax
    _, rep = fp8.assemble_ptx(c.ptx)
    assert rep.spills == 0 and rep.stack_bytes == 0


def test_dequant_compiles_for_sm90a():
    spec = fp8.dequant_spec(7168, "bf16")
    c = fp8.compile_ptx(fp8.render_quant(spec))
    assert c.cubin[:4] == b"\x7fELF"
    assert fp8.assemble_ptx(c.ptx)[1].spills == 0


def test_native_cast_lowers_to_satfinite_cvt():
    """On a GPU `.to(tl.float8e4nv)` is cvt.rn.satfinite.e4m3x2.f32 (RNE, saturating): after
    `_fp8_e4m3_round` its input is exactly representable, so that path agrees with ours too."""
    src = fp8.template_env().from_string(
        "import triton\nimport triton.language as tl\n{% import 'fp8_macros.j2' as fp8 %}\n"
        "\n{{ fp8.helpers() }}\n\n\n"
        "@triton.jit\ndef cast_probe(x_ptr, q_ptr):\n"
        "    o = tl.arange(0, 128)\n"
        "    tl.store(q_ptr + o, _fp8_e4m3_round(tl.load(x_ptr + o)).to(tl.float8e4nv))\n").render()
    c = fp8.compile_ptx(src, name="cast_probe", signature={"x_ptr": "*fp32", "q_ptr": "*fp8e4nv"})
    assert "cvt.rn.satfinite.e4m3x2.f32" in c.ptx


@pytest.mark.parametrize("ptxas", _ptxas_binaries())
@pytest.mark.parametrize("spec", PTX_SPECS, ids=lambda s: s.name)
def test_ptx_template_assembles_for_sm90a(spec, ptxas):
    ptx = fp8.render_quant_ptx(spec)
    assert ptx.splitlines()[0].startswith("// dsr_compiler generated | template quant_fp8.ptx.j2")
    assert ".target sm_90a" in ptx and "cvt.rn.satfinite.e4m3x2.f32" in ptx
    cubin, rep = fp8.assemble_ptx(ptx, ptxas=ptxas)
    assert cubin[:4] == b"\x7fELF"
    assert rep.kernel == spec.name and rep.spills == 0 and rep.stack_bytes == 0
    assert rep.registers <= 32, rep.log


def test_register_report(triton_quant):
    """ptxas -v figures for the PTX template vs Triton's PTX of the same kernel (printed with -s)."""
    rows = []
    for spec in QUANT_SPECS:
        _, hand = fp8.assemble_ptx(fp8.render_quant_ptx(spec))
        _, tri = fp8.assemble_ptx(triton_quant[spec.name].ptx)
        rows.append(f"{spec.name:32s} ptx template: {hand.registers:3d} regs {hand.spills} spills | "
                    f"triton: {tri.registers:3d} regs {tri.spills} spills {triton_quant[spec.name].shared_bytes} B smem "
                    f"({triton_quant[spec.name].num_warps} warps)")
        assert hand.spills == tri.spills == 0
    print("\n" + "\n".join(rows))


def test_templates_render_deterministically_and_strictly():
    spec = QUANT_SPECS[1]
    assert fp8.render_quant(spec) == fp8.render_quant(spec)
    assert fp8.render_quant_ptx(spec) == fp8.render_quant_ptx(spec)
    head = fp8.render_quant(spec).splitlines()[:2]
    assert head[0] == (f"# dsr_compiler generated | template quant_fp8.py.j2 | kernel {spec.name} | op quant"
                       f" | spec {spec.hash()[:16]}")
    assert head[1] == "# signature: x_ptr=*bf16 q_ptr=*fp8e4nv s_ptr=*fp32 M=i32"
    assert fp8.compile_ptx(fp8.render_quant(fp8.quant_spec(128, num_warps=2))).num_warps == 2
    ast.parse(fp8.render_quant(fp8.dequant_spec(256, "bf16")))
    for name in ("quant_fp8.py.j2", "quant_fp8.ptx.j2"):
        with pytest.raises(jinja2.UndefinedError):
            fp8.template_env().get_template(name).render(spec_hash="0" * 64)
    assert fp8.quant_spec(256) != fp8.quant_spec(256, scale_fmt="ue8m0")
    assert fp8.quant_spec(256).hash() != fp8.quant_spec(256, scale_fmt="ue8m0").hash()
