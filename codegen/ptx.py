"""Direct PTX backend: KernelSpec -> PTX source (Jinja `*.ptx.j2`) -> ptxas -arch=sm_90a -> cubin.

Where it sits: beside the Triton path (render.py / compile.py). For the families in
`PTX_FAMILIES` a kernel can be emitted as hand-structured PTX instead of going through Triton:

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

Statements come from the same KernelSpec body program that the Triton templates render (one
statement table: `_EMIT` below mirrors codegen/exprs.py for the subset PTX covers). Registers are
scalar (one element per thread per loop step): floats are f32, booleans predicates, indices u64.
Float math is IEEE round-to-nearest (`add.rn`, `div.rn`, never contracted into FMAs); exp/log
use the approximate SFU instructions (as Triton's tl.exp does), rsqrt is `rsqrt.approx` (as
tl.rsqrt); FP8 codes come from `cvt.rn.satfinite.e4m3x2.f32` (torch's clamp + RNE cast, NaN kept).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import jinja2
from dsr_compiler.ir import knobs
from dsr_compiler.ir.errors import CodegenError
from dsr_compiler.ir.types import DType

from .render import jinja_environment
from .spec import KernelSpec, Stmt, comment_text

PTX_FAMILIES = ("pointwise", "reduction", "quant_fp8")
PTX_TEMPLATES = {"pointwise": "pointwise.ptx.j2", "reduction": "reduction.ptx.j2",
                 "quant_fp8": "quant_fp8_rows.ptx.j2"}
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


class PtxUnsupported(CodegenError):
    """The PTX templates cannot express this kernel (the Triton twin is used; the reason is reported)."""


def f32_hex(v: float) -> str:
    """A PTX fp32 immediate (0fXXXXXXXX), exact for every fp32 value incl. inf/nan."""
    return "0f" + struct.pack(">f", float(v)).hex().upper()


@dataclass
class _Emitter:
    """Scalar PTX for statement blocks. `axes` maps template coordinate names (offs, row, cols) to
    u64 registers; `scalars` maps scalar argument names to u64 registers; `ptrs` pointer args to
    their (global) u64 registers and element dtype."""

    spec: KernelSpec
    axes: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    var: dict[str, tuple[str, str]] = field(default_factory=dict)     # stmt var -> (register, kind f32|pred|u64)
    scalars: dict[str, str] = field(default_factory=dict)
    ptrs: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, DType] = field(default_factory=dict)
    labels: int = 0

    PREFIX = {"f32": "%f", "pred": "%p", "u64": "%rd", "b32": "%r", "b16": "%h"}

    def reg(self, kind: str) -> str:
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        return f"{self.PREFIX[kind]}{n}"

    def label(self, base: str) -> str:
        self.labels += 1
        return f"{base}_{self.labels}"

    def emit(self, text: str) -> None:
        self.lines.append("\t" + text)

    def decls(self) -> list[str]:
        types = {"f32": ".f32", "pred": ".pred", "u64": ".b64", "b32": ".b32", "b16": ".b16"}
        return [f"\t.reg {types[k]} \t{self.PREFIX[k]}<{max(n, 1)}>;" for k, n in sorted(self.counts.items())]

    # --- operands
    def fail(self, s: Stmt | None, why: str) -> PtxUnsupported:
        at = f" (statement {s.op} -> {s.out})" if s is not None else ""
        return PtxUnsupported(f"ptx: kernel {self.spec.name}: {why}{at}",
                              hint="the Triton twin of this kernel is used instead")

    def int_operand(self, text: str, s: Stmt | None = None) -> str:
        """A u64 register or immediate for an index literal / scalar arg / coordinate variable."""
        text = text.strip()
        if text.lstrip("-").isdigit():
            v = int(text)
            if v < 0:
                raise self.fail(s, f"negative index literal {v}")
            return str(v)
        if text in self.scalars:
            return self.scalars[text]
        if text in self.axes:
            return self.axes[text]
        if text in self.var and self.var[text][1] == "u64":
            return self.var[text][0]
        raise self.fail(s, f"index term {text!r} is not a variable the PTX templates know")

    def f32(self, name: str, s: Stmt) -> str:
        r = self.var.get(name)
        if r is None:
            raise self.fail(s, f"uses {name!r} before it is defined")
        if r[1] != "f32":
            raise self.fail(s, f"{name} is {r[1]}, not a float")
        return r[0]

    def new(self, s: Stmt, kind: str = "f32") -> str:
        r = self.reg(kind)
        self.var[s.out] = (r, kind)
        return r

    def widen16(self, r: str, h: str, dt: DType) -> None:
        """f32 register r = the bf16 or f16 value in b16 register h (a bf16 is an f32's high half)."""
        if dt is DType.bf16:
            w = self.reg("b32")
            self.emit(f"cvt.u32.u16 \t{w}, {h};")
            self.emit(f"shl.b32 \t{w}, {w}, 16;")
            self.emit(f"mov.b32 \t{r}, {w};")
        else:
            self.emit(f"cvt.f32.f16 \t{r}, {h};")

    def address(self, s: Stmt) -> str:
        ptr = s.attr("ptr")
        if ptr not in self.ptrs:
            raise self.fail(s, f"unknown pointer {ptr}")
        dt = self.dtypes[ptr]
        idx = self.reg("u64")
        self.emit(f"mov.u64 \t{idx}, {self.int_operand(s.attr('offset', '0') or '0', s)};")
        for var, stride in s.attr("terms"):
            if stride == "0":
                continue
            v = self.int_operand(var, s)
            st = self.int_operand(stride, s)
            if not v.startswith("%"):
                raise self.fail(s, f"index term {var!r} is a literal")
            self.emit(f"mad.lo.u64 \t{idx}, {v}, {st}, {idx};")
        addr = self.reg("u64")
        self.emit(f"mad.lo.u64 \t{addr}, {idx}, {dt.itemsize}, {self.ptrs[ptr]};")
        return addr

    def check_mask(self, s: Stmt, allowed: Sequence[str]) -> None:
        m = s.attr("mask", "") or ""
        if m and m not in allowed:
            raise self.fail(s, f"mask {m!r} differs from the kernel's element mask")

    # --- statements
    def stmt(self, s: Stmt, masks: Sequence[str]) -> None:
        op = s.op
        if op == "coord":
            a = self.int_operand(s.attr("axis"), s)
            r = self.reg("u64")
            inner, size = self.int_operand(s.attr("inner"), s), self.int_operand(s.attr("size"), s)
            if inner == "1":
                self.emit(f"mov.u64 \t{r}, {a};")
            else:
                self.emit(f"div.u64 \t{r}, {a}, {inner};")
            if not s.attr("outer"):
                self.emit(f"rem.u64 \t{r}, {r}, {size};")
            self.var[s.out] = (r, "u64")
            return
        if op == "load":
            self.check_mask(s, masks)
            if s.args:
                raise self.fail(s, "gather loads (indices computed in the kernel) are not in the PTX templates")
            dt = s.dtype
            addr = self.address(s)
            r = self.new(s)
            if dt is DType.f32:
                self.emit(f"ld.global.nc.f32 \t{r}, [{addr}];")
            elif dt in (DType.bf16, DType.f16):
                h = self.reg("b16")
                self.emit(f"ld.global.nc.b16 \t{h}, [{addr}];")
                self.widen16(r, h, dt)
            else:
                raise self.fail(s, f"loads of {dt.value if dt else '?'} are not in the PTX templates (floats only)")
            return
        if op == "store":
            self.check_mask(s, masks)
            v = self.f32(s.args[0], s)
            self.store_f32(s, self.address(s), v, s.dtype)
            return
        if op == "const":
            if s.dtype is None or not s.dtype.is_float:
                raise self.fail(s, "non-float constants are not in the PTX templates")
            self.emit(f"mov.f32 \t{self.new(s)}, {f32_hex(s.attr('value'))};")
            return
        if op == "convert":
            if s.attr("to") != "f32" or s.attr("from") != "f32":
                raise self.fail(s, f"conversion {s.attr('from')} -> {s.attr('to')}")
            self.var[s.out] = self.var[s.args[0]]
            return
        fn = _EMIT.get(op)
        if fn is None:
            raise self.fail(s, f"no PTX for {op}")
        fn(self, s)

    def store_f32(self, s: Stmt | None, addr: str, v: str, dt: DType | None) -> None:
        if dt is DType.f32:
            self.emit(f"st.global.f32 \t[{addr}], {v};")
        elif dt is DType.bf16:
            h = self.reg("b16")
            self.emit(f"cvt.rn.bf16.f32 \t{h}, {v};")
            self.emit(f"st.global.b16 \t[{addr}], {h};")
        elif dt is DType.f16:
            h = self.reg("b16")
            self.emit(f"cvt.rn.f16.f32 \t{h}, {v};")
            self.emit(f"st.global.b16 \t[{addr}], {h};")
        else:
            raise self.fail(s, f"stores of {dt.value if dt else '?'} are not in the PTX templates (floats only)")

    def block(self, stmts: Sequence[Stmt], masks: Sequence[str]) -> list[str]:
        start = len(self.lines)
        for s in stmts:
            self.stmt(s, masks)
        out = self.lines[start:]
        del self.lines[start:]
        return out

    def int_to_f32(self, text: str, s: Stmt) -> str:
        v = self.int_operand(text, s)
        if not v.startswith("%"):
            return f32_hex(float(int(v)))
        r = self.reg("f32")
        self.emit(f"cvt.rn.f32.u64 \t{r}, {v};")
        return r


# ----------------------------------------------------------------------------- the statement table

def _bin(instr: str):
    def f(e: _Emitter, s: Stmt) -> None:
        a, b = (e.f32(x, s) for x in s.args)
        e.emit(f"{instr} \t{e.new(s)}, {a}, {b};")
    return f


def _un(instr: str):
    def f(e: _Emitter, s: Stmt) -> None:
        e.emit(f"{instr} \t{e.new(s)}, {e.f32(s.args[0], s)};")
    return f


def _exp_of(e: _Emitter, x: str, neg: bool = False) -> str:
    """e^x (or e^-x) via ex2.approx on x * log2(e)."""
    t = e.reg("f32")
    e.emit(f"mul.rn.f32 \t{t}, {x}, {f32_hex(-LOG2E if neg else LOG2E)};")
    e.emit(f"ex2.approx.f32 \t{t}, {t};")
    return t


def _exp(e: _Emitter, s: Stmt) -> None:
    t = _exp_of(e, e.f32(s.args[0], s))
    e.var[s.out] = (t, "f32")


def _log(e: _Emitter, s: Stmt) -> None:
    t = e.reg("f32")
    e.emit(f"lg2.approx.f32 \t{t}, {e.f32(s.args[0], s)};")
    e.emit(f"mul.rn.f32 \t{e.new(s)}, {t}, {f32_hex(LN2)};")


def _sigmoid_like(times_x: bool):
    def f(e: _Emitter, s: Stmt) -> None:
        x = e.f32(s.args[0], s)
        t = _exp_of(e, x, neg=True)
        e.emit(f"add.rn.f32 \t{t}, {t}, 0f3F800000;")
        e.emit(f"div.rn.f32 \t{e.new(s)}, {x if times_x else '0f3F800000'}, {t};")
    return f


def _tanh(e: _Emitter, s: Stmt) -> None:
    x = e.f32(s.args[0], s)
    t = e.reg("f32")
    e.emit(f"mul.rn.f32 \t{t}, {x}, {f32_hex(-2.0 * LOG2E)};")
    e.emit(f"ex2.approx.f32 \t{t}, {t};")
    e.emit(f"add.rn.f32 \t{t}, {t}, 0f3F800000;")
    e.emit(f"div.rn.f32 \t{t}, 0f40000000, {t};")
    e.emit(f"sub.rn.f32 \t{e.new(s)}, {t}, 0f3F800000;")


def _relu(e: _Emitter, s: Stmt) -> None:
    e.emit(f"max.NaN.f32 \t{e.new(s)}, {e.f32(s.args[0], s)}, 0f00000000;")


def _cmp(cond: str):
    def f(e: _Emitter, s: Stmt) -> None:
        a, b = (e.f32(x, s) for x in s.args)
        e.emit(f"setp.{cond}.f32 \t{e.new(s, 'pred')}, {a}, {b};")
    return f


def _where(e: _Emitter, s: Stmt) -> None:
    c = e.var.get(s.args[0])
    if c is None or c[1] != "pred":
        raise e.fail(s, "where needs a predicate condition")
    a, b = (e.f32(x, s) for x in s.args[1:])
    e.emit(f"selp.f32 \t{e.new(s)}, {a}, {b}, {c[0]};")


def _cast(e: _Emitter, s: Stmt) -> None:
    to = s.attr("to")
    x = e.f32(s.args[0], s)
    if to is DType.f32:
        e.var[s.out] = (x, "f32")
    elif to in (DType.bf16, DType.f16):
        h = e.reg("b16")
        e.emit(f"cvt.rn.{to.value}.f32 \t{h}, {x};")
        e.widen16(e.new(s), h, to)
    else:
        raise e.fail(s, f"cast to {to.value}")


def _rms_finish(e: _Emitter, s: Stmt) -> None:
    acc = e.f32(s.args[0], s)
    n = e.int_to_f32(s.args[1], s)
    t = e.reg("f32")
    e.emit(f"div.rn.f32 \t{t}, {acc}, {n};")
    e.emit(f"add.rn.f32 \t{t}, {t}, {f32_hex(float(s.args[2]))};")
    e.emit(f"rsqrt.approx.f32 \t{e.new(s)}, {t};")


def _rms_apply(e: _Emitter, s: Stmt) -> None:
    x, r, w = (e.f32(a, s) for a in s.args)
    t = e.reg("f32")
    e.emit(f"mul.rn.f32 \t{t}, {x}, {r};")
    e.emit(f"mul.rn.f32 \t{e.new(s)}, {t}, {w};")


def _mean_finish(e: _Emitter, s: Stmt) -> None:
    e.emit(f"div.rn.f32 \t{e.new(s)}, {e.f32(s.args[0], s)}, {e.int_to_f32(s.args[1], s)};")


def _alias(e: _Emitter, s: Stmt) -> None:
    e.var[s.out] = (e.f32(s.args[0], s), "f32")


_EMIT = {
    "add": _bin("add.rn.f32"), "sub": _bin("sub.rn.f32"), "mul": _bin("mul.rn.f32"), "div": _bin("div.rn.f32"),
    "maximum": _bin("max.NaN.f32"), "minimum": _bin("min.NaN.f32"),
    "neg": _un("neg.f32"), "abs": _un("abs.f32"), "sqrt": _un("sqrt.rn.f32"), "rsqrt": _un("rsqrt.approx.f32"),
    "reciprocal": _un("rcp.rn.f32"), "exp": _exp, "log": _log, "sigmoid": _sigmoid_like(False),
    "silu": _sigmoid_like(True), "tanh": _tanh, "relu": _relu, "cast": _cast, "where": _where,
    "lt": _cmp("lt"), "le": _cmp("le"), "gt": _cmp("gt"), "ge": _cmp("ge"), "eq": _cmp("eq"),
    "stop_gradient": _alias,
    "rms_finish": _rms_finish, "rms_apply": _rms_apply, "sum_finish": _alias, "amax_finish": _alias,
    "mean_finish": _mean_finish,
}


# ----------------------------------------------------------------------------- programs per family

@dataclass(frozen=True)
class PtxProgram:
    """What a PTX template renders besides the spec: parameter loads, register declarations, and
    the emitted statement blocks (plain strings: the template only places them)."""

    params: tuple[str, ...]          # `.param` declarations in spec.args order
    prologue: tuple[str, ...]        # load every param into a register
    decls: tuple[str, ...]
    blocks: tuple[tuple[str, tuple[str, ...]], ...]
    regs: tuple[tuple[str, str], ...]   # named registers the template uses (name -> register)
    threads: int

    def block(self, name: str) -> tuple[str, ...]:
        return dict(self.blocks).get(name, ())

    def r(self, name: str) -> str:
        return dict(self.regs)[name]


def _setup(spec: KernelSpec, axes: Sequence[str]) -> tuple[_Emitter, list[str], list[str]]:
    e = _Emitter(spec)
    params, pro = [], []
    for a in spec.args:
        if a.kind == "tensor":
            params.append(f"\t.param .u64 {a.name}")
            r = e.reg("u64")
            pro += [f"\tld.param.u64 \t{r}, [{a.name}];", f"\tcvta.to.global.u64 \t{r}, {r};"]
            e.ptrs[a.name] = r
            assert a.dtype is not None
            e.dtypes[a.name] = a.dtype
        else:
            wide = a.scalar_dtype == "i64"
            params.append(f"\t.param .{'u64' if wide else 'u32'} {a.name}")
            r = e.reg("u64")
            if wide:
                pro.append(f"\tld.param.u64 \t{r}, [{a.name}];")
            else:
                w = e.reg("b32")
                pro += [f"\tld.param.u32 \t{w}, [{a.name}];", f"\tcvt.u64.u32 \t{r}, {w};"]
            e.scalars[a.name] = r
    for ax in axes:
        e.axes[ax] = e.reg("u64")
    return e, params, pro


def _program(e: _Emitter, params: list[str], pro: list[str], blocks: dict[str, list[str]],
             regs: dict[str, str], threads: int) -> PtxProgram:
    return PtxProgram(tuple(params), tuple(pro), tuple(e.decls()), tuple((k, tuple(v)) for k, v in blocks.items()),
                      tuple(regs.items()), threads)


def _operand(e: _Emitter, text: Any) -> str:
    return e.int_operand(str(text))


def _pointwise_program(spec: KernelSpec) -> PtxProgram:
    if spec.param("I64", False) is not True and spec.param("I64", False) is not False:
        raise PtxUnsupported(f"ptx: kernel {spec.name}: unknown index width")
    e, params, pro = _setup(spec, ["offs"])
    regs = {"offs": e.axes["offs"], "numel": _operand(e, spec.param("NUMEL")), "i": e.reg("b32"),
            "pid": e.reg("u64"), "p": e.reg("pred"), "t": e.reg("b32")}
    blocks = {"coords": e.block(spec.block("coords"), ("mask",)), "main": e.block(spec.block("main"), ("mask",))}
    return _program(e, params, pro, blocks, regs, 32 * spec.num_warps)


def _pass2_with_pass1(spec: KernelSpec) -> list[Stmt]:
    """pass2 statements, preceded by the pass1 statements they read (PTX always loops over the row,
    so nothing a pass1 step computed per element survives into pass2)."""
    p1, p2 = list(spec.block("pass1")), list(spec.block("pass2"))
    own = {s.out for s in p2 if s.out}
    defs = {s.out: i for i, s in enumerate(p1) if s.out and s.out not in own}
    need: set[int] = set()
    stack = [a for s in p2 for a in s.args]
    while stack:
        a = stack.pop()
        i = defs.get(a)
        if i is not None and i not in need:
            need.add(i)
            stack.extend(p1[i].args)
    return [p1[i] for i in sorted(need)] + p2


def _reduction_program(spec: KernelSpec) -> PtxProgram:
    red = spec.param("RED")
    if red not in ("sum", "sumsq", "max"):
        raise PtxUnsupported(f"ptx: kernel {spec.name}: reduction {red!r} is not in the PTX templates "
                             "(sum, sum of squares, max)", hint="the Triton twin is used instead")
    e, params, pro = _setup(spec, ["row", "cols"])
    regs = {"row": e.axes["row"], "cols": e.axes["cols"], "n": _operand(e, spec.param("N")),
            "acc": e.reg("f32"), "tmp": e.reg("f32"), "p": e.reg("pred"), "lane": e.reg("b32"),
            "warp": e.reg("b32"), "tid": e.reg("b32"), "a32": e.reg("b32"), "a64": e.reg("u64")}
    coords = e.block(spec.block("coords"), ())
    saved = dict(e.var)
    pass1 = e.block(spec.block("pass1"), ("cmask",))
    src = e.var.get(spec.param("RED_SRC"))
    if src is None or src[1] != "f32":
        raise PtxUnsupported(f"ptx: kernel {spec.name}: reduced value is not a float", hint="Triton twin used")
    regs["src"] = src[0]
    e.var = dict(saved)
    e.var["r_acc"] = (regs["acc"], "f32")
    e.var["r_max"] = (regs["acc"], "f32")
    finish = e.block(spec.block("finish"), ())
    after_finish = dict(e.var)
    pass2 = e.block(_pass2_with_pass1(spec), ("cmask",))
    e.var = after_finish
    return _program(e, params, pro, {"coords": coords, "pass1": pass1, "finish": finish, "pass2": pass2},
                    regs, 32 * spec.num_warps)


def _quant_rows_program(spec: KernelSpec) -> PtxProgram:
    block = spec.param("BLOCK")
    if block != 128:
        raise PtxUnsupported(f"ptx: kernel {spec.name}: the PTX quant template takes 1x128 tiles, got {block}",
                             hint="the Triton twin is used instead")
    e, params, pro = _setup(spec, ["row", "cols"])
    regs = {"row": e.axes["row"], "cols": e.axes["cols"], "n": _operand(e, spec.param("N")),
            "nkb": _operand(e, spec.param("NKB")), "acc": e.reg("f32"), "tmp": e.reg("f32"), "p": e.reg("pred"),
            "q": e.reg("pred"), "lane": e.reg("b32"), "warp": e.reg("b32"), "tid": e.reg("b32"), "kb": e.reg("u64"),
            "j": e.reg("b32"), "a32": e.reg("b32"), "a64": e.reg("u64"), "s": e.reg("f32"), "amax": e.reg("f32"),
            "v0": e.reg("f32"), "v1": e.reg("f32"), "v2": e.reg("f32"), "v3": e.reg("f32"),
            "h0": e.reg("b16"), "h1": e.reg("b16")}
    blocks: dict[str, list[str]] = {"coords": e.block(spec.block("coords"), ())}
    for name in ("q_ptr", "s_ptr", "y_ptr"):
        regs[name] = ""
    if spec.param("MODE") == "dequant":
        regs["q_ptr"] = e.ptrs[spec.param("Q_IN")]
        regs["s_ptr"] = e.ptrs[spec.param("S_IN")]
        regs["y_ptr"] = e.ptrs[spec.param("Y_OUT")]
        return _program(e, params, pro, blocks, regs, 32 * spec.num_warps)
    saved = dict(e.var)
    if spec.param("NORM"):
        blocks["pass1"] = e.block(spec.block("pass1"), ("cmask",))
        src = e.var.get(spec.param("RED_SRC"))
        if src is None or src[1] != "f32":
            raise PtxUnsupported(f"ptx: kernel {spec.name}: normalized value is not a float", hint="Triton twin used")
        regs["src"] = src[0]
        e.var = dict(saved)
        e.var["r_acc"] = (regs["acc"], "f32")
        blocks["finish"] = e.block(spec.block("finish"), ())
    after = dict(e.var)
    # pass 2 runs once per element j = 0..3 of a lane's slice of the tile (cols = kb*128 + lane + 32 j)
    for j in range(4):
        e.var = dict(after)
        lines = e.block(_pass2_with_pass1(spec), ("cmask",))
        q = e.var.get(spec.param("QSRC"))
        if q is None or q[1] != "f32":
            raise PtxUnsupported(f"ptx: kernel {spec.name}: quantized value is not a float", hint="Triton twin used")
        lines.append(f"\tmov.f32 \t{regs[f'v{j}']}, {q[0]};")
        blocks[f"pass2_{j}"] = lines
    e.var = after
    regs["q_ptr"] = e.ptrs.get(spec.param("Q_OUT"), "")
    regs["s_ptr"] = e.ptrs.get(spec.param("S_OUT"), "")
    return _program(e, params, pro, blocks, regs, 32 * spec.num_warps)


_PROGRAMS = {"pointwise": _pointwise_program, "reduction": _reduction_program, "quant_fp8": _quant_rows_program}


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
    if spec.family not in _PROGRAMS:
        raise PtxUnsupported(f"ptx: kernel {spec.name}: family {spec.family} has no PTX template "
                             f"(PTX families: {', '.join(PTX_FAMILIES)})", hint="the Triton path is used")
    if len(spec.grid) != 1:
        raise PtxUnsupported(f"ptx: kernel {spec.name}: {len(spec.grid)}-D grid", hint="the Triton twin is used")
    prog = _PROGRAMS[spec.family](spec)
    try:
        return _env().get_template(PTX_TEMPLATES[spec.family]).render(spec=spec, prog=prog)
    except jinja2.UndefinedError as e:  # a template bug
        raise CodegenError(f"codegen: template {PTX_TEMPLATES[spec.family]} failed for {spec.name}: {e.message}") from None


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


__all__ = ["CompiledPtx", "PTX_FAMILIES", "PTX_TEMPLATES", "PtxProgram", "PtxUnsupported", "compile_ptx_kernel",
           "f32_hex", "ptx_supported", "render_ptx", "resolve_ptx_families"]
