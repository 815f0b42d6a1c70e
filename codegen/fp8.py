"""FP8 (e4m3fn) activation quantization: the `quant_fp8` kernel family.

Sits in codegen next to the generic families (spec.py / lower.py / render.py): it generates the
FP8 activation quantization that the `quantize_fp8` pass (DESIGN.md section 1) asks for. It renders
`templates/quant_fp8.py.j2` (Triton) and `templates/quant_fp8.ptx.j2` (hand-written PTX for
sm_90a) from a frozen `QuantFp8Spec`, runs the Triton source under the interpreter, compiles it for
sm_90a without a GPU, and assembles PTX with ptxas. It also holds the eager torch references the
tests compare against.

Numeric contract (DESIGN.md section 5), per 1 x `block` tile of a row:
    s = max(amax(|x|), 1e-4) / 448            (fp32; scale_fmt "ue8m0": s = 2^ceil(log2 s))
    q = torch.clamp(x / s, -448, 448).to(torch.float8_e4m3fn)
Codes are equal to torch's bit for bit on every backend. Triton's interpreter casts f32 -> fp8
wrongly (triton issue #8322), so the Triton kernels never cast to fp8: `fp8_macros.j2` rounds onto
the e4m3 grid in fp32 with an exact "add and subtract a magic constant" step whose constant is
built from the exponent bits, then writes the code with integer ops (see that file). The PTX
kernel uses the hardware `cvt.rn.satfinite.e4m3x2.f32`, which is RNE with saturation.

NaN policy: a NaN input gives a NaN code (0x7F, or 0xFF when the NaN's sign bit is set) and,
through the NaN-propagating amax, makes the whole tile's scale NaN, as in torch. The scale itself
is never NaN otherwise (amax >= 0, clamped to 1e-4); an inf input makes s = inf, its own code NaN
(inf / inf) and the tile's other codes 0, again as torch. The sign of a NaN produced by
arithmetic (inf / inf) is not specified by IEEE 754 (x86 gives -NaN, NVIDIA +NaN), so tests
compare NaN codes by class (`code & 0x7F == 0x7F`), everything else bit for bit.
"""
from __future__ import annotations

import ast
import atexit
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import jinja2
import torch

from dsr_compiler.ir.errors import CodegenError
from dsr_compiler.ir.ops.fp8 import E4M3_MAX, SCALE_FLOOR

from .compile import _interpret_env

TEMPLATES = Path(__file__).parent / "templates"
_IN_DTYPES = ("f32", "bf16")
_TRITON_PTR = {"f32": "*fp32", "bf16": "*bf16", "fp8e4m3": "*fp8e4nv"}
_TORCH = {"f32": torch.float32, "bf16": torch.bfloat16, "fp8e4m3": torch.float8_e4m3fn}


# ----------------------------------------------------------------------------- spec

@dataclass(frozen=True)
class QuantFp8Spec:
    """One quant_fp8-family kernel: plain values only, so it prints, hashes and round-trips.

    op "quant": x [M, K] `in_dtype` -> q [M, K] fp8e4m3, s [M, K/block] f32.
    op "dequant": q [M, K] fp8e4m3, s [M, K/block] f32 -> y [M, K] `out_dtype`.
    M is a runtime argument; K is static. `block_m` rows per Triton program; `num_warps` warps per
    program (Triton) or per CTA (PTX, one warp per row tile).
    """

    name: str
    op: str = "quant"
    K: int = 128
    in_dtype: str = "f32"
    out_dtype: str = "fp8e4m3"
    block: int = 128
    scale_fmt: str | None = None
    block_m: int = 16
    num_warps: int = 4
    source_nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def bad(why: str) -> CodegenError:
            return CodegenError(f"codegen: quant_fp8 kernel {self.name}: {why}",
                                hint="see DESIGN.md section 5 for the FP8 contract")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise bad(f"name {self.name!r} is not an identifier")
        if self.op == "quant":
            if self.in_dtype not in _IN_DTYPES or self.out_dtype != "fp8e4m3":
                raise bad(f"quant maps f32|bf16 -> fp8e4m3, got {self.in_dtype} -> {self.out_dtype}")
        elif self.op == "dequant":
            if self.in_dtype != "fp8e4m3" or self.out_dtype not in _IN_DTYPES:
                raise bad(f"dequant maps fp8e4m3 -> f32|bf16, got {self.in_dtype} -> {self.out_dtype}")
        else:
            raise bad(f"op must be quant or dequant, got {self.op!r}")
        if self.block <= 0 or self.block & (self.block - 1):
            raise bad(f"block {self.block} is not a power of two")
        if self.K <= 0 or self.K % self.block:
            raise bad(f"K={self.K} is not a positive multiple of the tile width {self.block}")
        if self.scale_fmt not in (None, "ue8m0"):
            raise bad(f"scale_fmt must be None or 'ue8m0', got {self.scale_fmt!r}")
        if self.block_m <= 0 or self.block_m & (self.block_m - 1):
            raise bad(f"block_m {self.block_m} is not a power of two")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise bad(f"num_warps {self.num_warps} is not a power of two <= 32")

    @property
    def arg_names(self) -> tuple[str, ...]:
        return ("x_ptr", "q_ptr", "s_ptr", "M") if self.op == "quant" else ("q_ptr", "s_ptr", "y_ptr", "M")

    @property
    def signature(self) -> dict[str, str]:
        """The `triton.compile` signature, in argument order."""
        if self.op == "quant":
            return {"x_ptr": _TRITON_PTR[self.in_dtype], "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "M": "i32"}
        return {"q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "y_ptr": _TRITON_PTR[self.out_dtype], "M": "i32"}

    @property
    def signature_text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.signature.items())

    def grid(self, M: int) -> tuple[int, int]:
        """Triton grid: (row blocks, tile columns)."""
        return (-(-M // self.block_m), self.K // self.block)

    def ptx_grid(self, M: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """PTX launch: (grid, block); one warp per (row, tile column)."""
        return (-(-M // self.num_warps), self.K // self.block, 1), (32 * self.num_warps, 1, 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def quant_spec(K: int, in_dtype: str = "f32", *, block: int = 128, scale_fmt: str | None = None,
               block_m: int = 16, num_warps: int = 4, name: str | None = None) -> QuantFp8Spec:
    tag = f"{in_dtype}_k{K}" + (f"_{scale_fmt}" if scale_fmt else "")
    return QuantFp8Spec(name=name or f"quant_fp8_{tag}", op="quant", K=K, in_dtype=in_dtype,
                        out_dtype="fp8e4m3", block=block, scale_fmt=scale_fmt, block_m=block_m,
                        num_warps=num_warps)


def dequant_spec(K: int, out_dtype: str = "f32", *, block: int = 128, block_m: int = 16,
                 num_warps: int = 4, name: str | None = None) -> QuantFp8Spec:
    return QuantFp8Spec(name=name or f"dequant_fp8_{out_dtype}_k{K}", op="dequant", K=K,
                        in_dtype="fp8e4m3", out_dtype=out_dtype, block=block, block_m=block_m,
                        num_warps=num_warps)


# ----------------------------------------------------------------------------- rendering

@lru_cache(maxsize=1)
def template_env() -> jinja2.Environment:
    """The Jinja environment for FP8 templates: StrictUndefined, loader on codegen/templates."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                              autoescape=False)


def render_quant(spec: QuantFp8Spec | None = None, **kwargs) -> str:
    """Triton source of a quant/dequant kernel (`spec`, or `quant_spec(**kwargs)`); ast-checked."""
    if spec is None:
        spec = quant_spec(**kwargs)
    elif kwargs:
        raise TypeError("render_quant takes a spec or keyword arguments, not both")
    src = template_env().get_template("quant_fp8.py.j2").render(spec=spec, spec_hash=spec.hash())
    try:
        ast.parse(src)
    except SyntaxError as e:  # a template bug, not a user error
        raise CodegenError(f"codegen: quant_fp8.py.j2 rendered invalid Python for {spec.name}: {e}") from e
    return src


def render_quant_ptx(spec: QuantFp8Spec) -> str:
    """Hand-written PTX (sm_90a) of a quant kernel; assemble with `assemble_ptx` before use."""
    if spec.op != "quant" or spec.block != 128:
        raise CodegenError(f"codegen: quant_fp8.ptx.j2 renders op quant with 1x128 tiles, "
                           f"got {spec.op} 1x{spec.block}", hint="use the Triton template for other tile widths")
    return template_env().get_template("quant_fp8.ptx.j2").render(spec=spec, spec_hash=spec.hash())


# ----------------------------------------------------------------------------- torch references

def e4m3_ref(x: torch.Tensor) -> torch.Tensor:
    """torch's own saturating cast: clamp to +-448, then RNE to float8_e4m3fn (NaN stays NaN)."""
    return torch.clamp(x.float(), -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def pow2_ceil_ref(s: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(s)) for positive fp32 s, exactly (from the bits; NaN and inf kept)."""
    bits = s.float().contiguous().view(torch.int32)
    up = ((bits >> 23) + ((bits & 0x7FFFFF) != 0).to(torch.int32)) << 23
    return torch.where(torch.isnan(s), s, up.view(torch.float32))


def quant_fp8_ref(x: torch.Tensor, block: int = 128,
                  scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager DeepSeek 1 x `block` quantization: (codes float8_e4m3fn [M, K], scales f32 [M, K/block])."""
    M, K = x.shape
    if K % block:
        raise ValueError(f"K={K} is not a multiple of block={block}")
    xf = x.float().reshape(M, K // block, block)
    s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_FLOOR) / E4M3_MAX
    if scale_fmt == "ue8m0":
        s = pow2_ceil_ref(s)
    elif scale_fmt is not None:
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    q = e4m3_ref(xf / s)
    return q.reshape(M, K), s.reshape(M, K // block)


def dequant_fp8_ref(q: torch.Tensor, s: torch.Tensor, block: int = 128,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes x scale per 1 x `block` tile, in fp32, then one cast to `out_dtype`."""
    M, K = q.shape
    y = q.float().reshape(M, K // block, block) * s.float().reshape(M, K // block, 1)
    return y.reshape(M, K).to(out_dtype)


# ----------------------------------------------------------------------------- loading and running

_TMPDIR: Path | None = None
_MODULES: dict[tuple[str, bool], ModuleType] = {}


def _tmpdir() -> Path:
    global _TMPDIR
    if _TMPDIR is None:
        _TMPDIR = Path(tempfile.mkdtemp(prefix="dsr_fp8_"))
        atexit.register(shutil.rmtree, _TMPDIR, True)
    return _TMPDIR


def interpret_env(on: bool = True) -> AbstractContextManager[None]:
    """Set (`on`) or clear TRITON_INTERPRET for the duration of the block and restore the previous
    value after (codegen/compile.py's `_interpret_env`).

    Triton reads it when a @triton.jit decorator runs (interpreter or compiler) and again, lazily,
    inside an interpreted launch (e.g. importing gluon asserts it), so both import and launch of
    interpreted kernels happen inside this block."""
    return _interpret_env(on)


def load_source(source: str, interpret: bool = True) -> ModuleType:
    """Import rendered Triton source as a module (with `interpret`: under TRITON_INTERPRET=1, see
    `interpret_env`). The file stays on disk for the process lifetime (Triton reads the source of
    jitted functions back through `inspect`); modules are cached by source hash."""
    key = (hashlib.sha256(source.encode()).hexdigest(), interpret)
    if key in _MODULES:
        return _MODULES[key]
    modname = f"_dsr_fp8_{key[0][:16]}_{'interp' if interpret else 'gpu'}"
    path = _tmpdir() / f"{modname}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(modname, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        with interpret_env(interpret):
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(modname, None)
        raise
    _MODULES[key] = module
    return module


def launch_interpreted(source: str, name: str, grid: tuple[int, ...], *args: object) -> None:
    """Import `source` for the interpreter (cached) and run kernel `name` on CPU tensors."""
    kernel = getattr(load_source(source, interpret=True), name)
    with interpret_env(True):
        kernel[grid](*args)


def _check_2d(t: torch.Tensor, what: str, spec: QuantFp8Spec) -> int:
    if t.dim() != 2 or t.shape[1] != spec.K or not t.is_contiguous():
        raise CodegenError(f"codegen: {spec.name}: {what} must be a contiguous [M, {spec.K}] tensor, "
                           f"got {tuple(t.shape)} (contiguous={t.is_contiguous()})")
    return t.shape[0]


def quant_fp8_interpret(x: torch.Tensor, spec: QuantFp8Spec | None = None,
                        **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the quant kernel under the Triton interpreter on CPU tensors -> (codes, scales)."""
    if spec is None:
        dt = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(x.dtype)
        if dt is None:
            raise CodegenError(f"codegen: quant_fp8 takes f32 or bf16 input, got {x.dtype}")
        spec = quant_spec(x.shape[-1], dt, **kwargs)
    if x.dtype != _TORCH[spec.in_dtype]:
        raise CodegenError(f"codegen: {spec.name} expects {spec.in_dtype} input, got {x.dtype}")
    M = _check_2d(x, "x", spec)
    q = torch.empty(M, spec.K, dtype=torch.float8_e4m3fn)
    s = torch.empty(M, spec.K // spec.block, dtype=torch.float32)
    if M:
        launch_interpreted(render_quant(spec), spec.name, spec.grid(M), x, q, s, M)
    return q, s


def dequant_fp8_interpret(q: torch.Tensor, s: torch.Tensor, spec: QuantFp8Spec | None = None,
                          **kwargs) -> torch.Tensor:
    """Run the dequant kernel under the Triton interpreter -> y [M, K] (f32 or bf16)."""
    if spec is None:
        spec = dequant_spec(q.shape[-1], **kwargs)
    M = _check_2d(q, "q", spec)
    if q.dtype != torch.float8_e4m3fn or s.dtype != torch.float32 or tuple(s.shape) != (M, spec.K // spec.block):
        raise CodegenError(f"codegen: {spec.name}: want q float8_e4m3fn [M, K] and s f32 [M, K/{spec.block}], "
                           f"got {q.dtype} {tuple(q.shape)} and {s.dtype} {tuple(s.shape)}")
    y = torch.empty(M, spec.K, dtype=_TORCH[spec.out_dtype])
    if M:
        launch_interpreted(render_quant(spec), spec.name, spec.grid(M), q, s.contiguous(), y, M)
    return y


# ----------------------------------------------------------------------------- compiling and assembling

@dataclass(frozen=True)
class PtxasReport:
    """What `ptxas -v` says about one kernel."""

    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    log: str

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


@dataclass(frozen=True)
class CompiledTriton:
    """triton.compile output: `asm` holds every stage (ttir, ttgir, llir, ptx, cubin)."""

    name: str
    ptx: str
    cubin: bytes
    asm: dict
    num_warps: int
    shared_bytes: int               # dynamic shared memory Triton requests at launch


_HEADER = re.compile(r"^# dsr_compiler generated .*\| kernel (\w+) \|", re.M)
_SIG = re.compile(r"^# signature: (.*)$", re.M)
_WARPS = re.compile(r"^# launch: num_warps=(\d+)", re.M)


def compile_ptx(source: str, arch: int = 90, *, name: str | None = None,
                signature: dict[str, str] | None = None, num_warps: int | None = None) -> CompiledTriton:
    """Compile rendered Triton source for `GPUTarget("cuda", arch, 32)` (no GPU needed) -> PTX + cubin.

    The kernel name, signature and num_warps come from the source's header lines unless given
    (num_warps defaults to 4 without a header). Pointer arguments are declared 16-byte aligned
    (torch allocations are), as Triton's launcher would specialize them.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if name is None or signature is None:
        head, sig = _HEADER.search(source), _SIG.search(source)
        if not head or not sig:
            raise CodegenError("codegen: compile_ptx needs a rendered source with `kernel` and `signature` "
                               "header lines, or explicit name= and signature=")
        name = name or head.group(1)
        signature = signature or dict(item.split("=", 1) for item in sig.group(1).split())
    if num_warps is None:
        w = _WARPS.search(source)
        num_warps = int(w.group(1)) if w else 4
    fn = getattr(load_source(source, interpret=False), name)
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
    try:
        compiled = triton.compile(ASTSource(fn, signature, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps})
    except Exception as e:
        raise CodegenError(f"codegen: triton.compile failed for {name} (sm_{arch}): {e}") from e
    asm = dict(compiled.asm)
    return CompiledTriton(name=name, ptx=asm["ptx"], cubin=asm["cubin"], asm=asm, num_warps=num_warps,
                          shared_bytes=int(compiled.metadata.shared))


def ptxas_path(arch: int = 90) -> str:
    """The ptxas Triton itself uses for `arch` (bundled with Triton; for sm_90+ that is its CUDA 13
    `ptxas-blackwell`, which accepts the PTX version Triton emits), else the first on PATH."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(arch).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - any failure here means: fall back to PATH
        pass
    found = shutil.which("ptxas")
    if not found:
        raise CodegenError("codegen: ptxas not found", hint="install triton (bundles ptxas) or the CUDA toolkit")
    return found


_REGS = re.compile(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", re.S)
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> PtxasReport:
    regs, stack = _REGS.search(log), _STACK.search(log)
    if not regs or not stack:
        raise CodegenError(f"codegen: cannot read registers/spills from the ptxas log:\n{log}")
    smem = _SMEM.search(log)
    return PtxasReport(kernel=regs.group(1), registers=int(regs.group(2)), stack_bytes=int(stack.group(1)),
                       spill_stores=int(stack.group(2)), spill_loads=int(stack.group(3)),
                       shared_bytes=int(smem.group(1)) if smem else 0, log=log)


def assemble_ptx(ptx: str, arch: str = "sm_90a", ptxas: str | None = None) -> tuple[bytes, PtxasReport]:
    """`ptxas -arch=<arch> -v` on PTX text -> (cubin, report). Raises CodegenError with the log.

    `ptxas` defaults to the one Triton uses for `arch` (`ptxas_path`)."""
    with tempfile.TemporaryDirectory(prefix="dsr_ptxas_") as d:
        src, out = Path(d) / "k.ptx", Path(d) / "k.cubin"
        src.write_text(ptx)
        tool = ptxas or ptxas_path(int(re.sub(r"\D", "", arch)))
        proc = subprocess.run([tool, f"-arch={arch}", "-v", str(src), "-o", str(out)],
                              capture_output=True, text=True, timeout=120)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise CodegenError(f"codegen: ptxas -arch={arch} rejected the PTX (exit {proc.returncode})",
                               where=log.strip())
        return out.read_bytes(), parse_ptxas_log(log)


__all__ = ["CompiledTriton", "E4M3_MAX", "PtxasReport", "QuantFp8Spec", "SCALE_FLOOR", "assemble_ptx",
           "compile_ptx", "dequant_fp8_interpret", "dequant_fp8_ref", "dequant_spec", "e4m3_ref", "interpret_env",
           "launch_interpreted", "load_source", "parse_ptxas_log", "pow2_ceil_ref", "ptxas_path",
           "quant_fp8_interpret", "quant_fp8_ref", "quant_spec", "render_quant", "render_quant_ptx", "template_env"]
