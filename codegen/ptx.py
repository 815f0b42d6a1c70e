"""Direct PTX backend: KernelSpec -> PTX source (Jinja `*.ptx.j2`) -> ptxas -arch=sm_90a -> cubin.

Where it sits: beside the Triton path (render.py / compile.py). A family whose record
(codegen/families/) has `ptx=PtxProgram(template, program)` can be emitted as hand-structured PTX
instead of going through Triton (`PTX_FAMILIES`, in the order of the families tuple):

  pointwise  templates/pointwise.ptx.j2      fused pointwise chain; a CTA per BLOCK elements
  reduction  templates/reduction.ptx.j2      row reductions (rms_norm = "sumsq", sum, mean, amax)
                                             with prologue/epilogue; a CTA per row
  quant_fp8  templates/quant_fp8_rows.ptx.j2 1x128 FP8 activation quantization (optionally after
                                             RMSNorm and a prologue), and dequantization; a CTA per row

A PTX kernel takes exactly the arguments of its Triton twin (spec.args: tensor pointers, then
int scalars) and launches on the same grid (spec.grid) with 32 * num_warps threads, so the runtime
binds both the same way (`codegen.spec.launch_args`). The Triton twin is always built too: the
`interpret` backend runs it (Triton's interpreter cannot run PTX), the report lists both ptxas
figures, and a kernel the PTX templates cannot express falls back to it with the reason recorded.

The statements themselves are emitted by codegen/ptx_emit.py (one statement table mirroring
codegen/exprs.py); a family's program (e.g. `families.pointwise.pointwise_ptx`) lays out its blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jinja2
from dsr_compiler.ir import knobs
from dsr_compiler.ir.errors import CodegenError

from .families import FAMILIES, find_family
from .ptx_emit import PtxUnsupported, f32_hex
from .render import jinja_environment
from .spec import KernelSpec, comment_text

# The families with a direct PTX form (derived from the family records, in their order).
PTX_FAMILIES: tuple[str, ...] = tuple(f.name for f in FAMILIES if f.ptx is not None)


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    # comment: IR names/origins in `//` comments (codegen.spec)
    return jinja_environment({"f32_hex": f32_hex, "comment": comment_text})


def ptx_supported(spec: KernelSpec) -> str | None:
    """None if the PTX templates express `spec`, else why not."""
    try:
        render_ptx(spec)
    except PtxUnsupported as e:
        return e.what
    return None


def render_ptx(spec: KernelSpec) -> str:
    """PTX source (sm_90a) for `spec`; raises PtxUnsupported when the templates cannot express it."""
    fam = find_family(spec.family)
    if fam is None or fam.ptx is None:
        raise PtxUnsupported(f"ptx: kernel {spec.name}: family {spec.family} has no PTX template "
                             f"(PTX families: {', '.join(PTX_FAMILIES)})", hint="the Triton path is used")
    if len(spec.grid) != 1:
        raise PtxUnsupported(f"ptx: kernel {spec.name}: {len(spec.grid)}-D grid", hint="the Triton twin is used")
    prog = fam.ptx.program(spec)
    try:
        return _env().get_template(fam.ptx.template).render(spec=spec, prog=prog)
    except jinja2.UndefinedError as e:  # a template bug
        raise CodegenError(f"codegen: template {fam.ptx.template} failed for {spec.name}: {e.message}") from None


@dataclass(frozen=True)
class CompiledPtx:
    """A PTX-template kernel assembled by ptxas: what the cuda runtime loads (cubin) and reports."""

    name: str
    ptx: str
    cubin: bytes = field(repr=False)
    registers: int
    spill_stores: int
    spill_loads: int
    shared_mem: int
    stack: int
    threads: int
    ptxas_log: str = ""

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "registers": self.registers, "spill_stores": self.spill_stores,
                "spill_loads": self.spill_loads, "shared_mem": self.shared_mem, "stack": self.stack,
                "threads": self.threads}


def compile_ptx_kernel(spec: KernelSpec, target: str = "sm_90a") -> CompiledPtx:
    """render_ptx + ptxas -arch=sm_90a -v (registers, spills, shared memory)."""
    from .compile import parse_target, run_ptxas
    ptx = render_ptx(spec)
    cubin, log, stats = run_ptxas(ptx, parse_target(target), spec.name)
    return CompiledPtx(spec.name, ptx, cubin, stats["registers"], stats["spill_stores"], stats["spill_loads"],
                       stats["smem"], stats["stack"], 32 * spec.num_warps, log.strip())


def resolve_ptx_families(option: Any = None) -> tuple[str, ...]:
    """Families to emit as PTX: the compile option `ptx_families` (a sequence, True/"all"), else the
    DSR_PTX knob ("1"/"all" or a comma list; unset or "0": none)."""
    if option is None:
        raw = knobs.get("DSR_PTX").strip()
        option = () if raw in ("", "0") else ("all" if raw in ("1", "all") else tuple(x.strip() for x in raw.split(",")))
    if option is True or option == "all":
        return PTX_FAMILIES
    if option is False:
        return ()
    if isinstance(option, str):
        option = (option,)
    fams = tuple(option)
    bad = [f for f in fams if f not in PTX_FAMILIES]
    if bad:
        raise CodegenError(f"ptx_families: {bad} have no PTX templates", where="ptx_families / DSR_PTX",
                           hint=f"PTX families: {', '.join(PTX_FAMILIES)} (or 1/all)")
    return fams


__all__ = ["CompiledPtx", "PTX_FAMILIES", "PtxUnsupported", "compile_ptx_kernel", "f32_hex", "ptx_supported",
           "render_ptx", "resolve_ptx_families"]
