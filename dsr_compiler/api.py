"""The front door: `trace` and `compile`, returning a callable `CompiledModule`.

compile = trace (frontend) -> PIPELINE of passes (verified, timed) -> lower each fused
kernel to a KernelSpec -> render through its Jinja template -> triton.compile to PTX and
cubin for sm_90a (cached by content) -> a LaunchPlan run by the `cuda` or `interpret` backend.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import sympy
import torch
from torch import nn

from dsr_compiler import knobs
from dsr_compiler.errors import DsrError
from dsr_compiler.ir import Graph
from dsr_compiler.ir.interp import bind_symbols
from dsr_compiler.ir.passes import PIPELINE, PassContext, PassRecord, run_passes
from dsr_compiler.ir.printer import header_line, print_graph

H200 = {"bytes_per_s": 4.8e12, "flops_bf16": 989e12, "flops_fp8": 1979e12, "flops_f32": 67e12}
TARGETS = ("sm_90a",)


def trace(module: nn.Module, example_inputs: Sequence[torch.Tensor], dynamic: dict | None = None,
          name: str | None = None) -> Graph:
    """Trace `module` into the IR (see dsr_compiler.frontend)."""
    from dsr_compiler.frontend import trace as _trace
    return _trace(module, tuple(example_inputs), dynamic=dynamic, name=name)


@dataclass
class KernelArtifact:
    spec: Any              # codegen.spec.KernelSpec
    source: str            # rendered Triton source
    compiled: Any          # codegen.compile.CompiledKernel (ptx, cubin, registers, spills, ...)
    compile_ms: float
    cached: bool
    ptx: Any = None        # codegen.ptx.CompiledPtx when the kernel runs as direct PTX (backend "ptx")
    ptx_note: str = ""     # why a kernel of a PTX-selected family stayed on Triton

    @property
    def backend(self) -> str:
        return "ptx" if self.ptx is not None else "triton"


@dataclass
class CompiledModule:
    """A compiled module: call it like the original (with the same non-parameter inputs)."""

    graph: Graph
    passes: list[PassRecord]
    kernels: list[KernelArtifact]
    options: dict[str, Any]
    params: list[torch.Tensor]
    example_env: dict[str, int]
    compile_ms: dict[str, float] = field(default_factory=dict)
    derived_params: list[dict] = field(default_factory=list)   # params computed once at compile time (ir/params.py)
    _plans: dict[str, Any] = field(default_factory=dict)
    _device_params: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def plan(self, backend: str | None = None):
        from dsr_compiler.runtime.device import resolve_backend
        from dsr_compiler.runtime.launch import build_plan
        be = resolve_backend(backend or self.options["backend"])
        if be not in self._plans:
            self._plans[be] = build_plan(self.graph, self.kernels, be)
            dev = self._plans[be].device
            self._device_params[be] = [p.detach().to(dev).contiguous() for p in self.params]
        return be, self._plans[be]

    def __call__(self, *inputs: torch.Tensor, backend: str | None = None):
        be, plan = self.plan(backend)
        n_data = len(self.graph.data_inputs)
        if len(inputs) != n_data:
            raise DsrError(f"{self.graph.name}: expected {n_data} inputs "
                           f"({', '.join('%' + v.name for v in self.graph.data_inputs)}), got {len(inputs)}")
        outs = plan.run(list(inputs) + self._device_params[be])
        if self.options.get("grad_wrt"):
            from dsr_compiler.grads import split_outputs
            return split_outputs(outs, self.options["grad_wrt"])
        return outs[0] if len(outs) == 1 else tuple(outs)

    # ------------------------------------------------------------------ reporting
    def report(self) -> dict[str, Any]:
        env = {sympy.Symbol(k, integer=True, positive=True): v for k, v in self.example_env.items()}
        kernels = []
        for k in self.kernels:
            s, c = k.spec, k.compiled
            br = _eval(s.bytes_read, env)
            bw = _eval(s.bytes_written, env)
            fl = _eval(s.flops, env)
            peak_key = _peak_key(s)
            roof = max((br + bw) / H200["bytes_per_s"], fl / H200[peak_key]) * 1e6
            p = k.ptx
            kernels.append({
                "name": s.name, "template": s.template, "family": s.family, "backend": k.backend,
                "source_nodes": list(s.source_nodes), "grid": list(s.grid),
                "grid_at_example": [_eval(x, env) for x in s.grid],
                "num_warps": s.num_warps, "registers": (p or c).registers, "spills": (p or c).spills,
                "shared_mem": (p or c).shared_mem, "bytes_read": br, "bytes_written": bw, "flops": fl,
                **({"ptx_template": _ptx_template(s.family),
                    "triton_twin": {"template": s.template, "registers": c.registers, "spills": c.spills,
                                    "shared_mem": c.shared_mem},
                    "interpret_runs": "the Triton twin (same KernelSpec): the interpreter cannot run PTX"}
                   if p is not None else {}),
                **({"ptx_fallback": k.ptx_note} if k.ptx_note else {}),
                "bytes_read_expr": s.bytes_read, "bytes_written_expr": s.bytes_written, "flops_expr": s.flops,
                "roofline_us_h200": roof, "roofline_peak": peak_key, "compile_ms": round(k.compile_ms, 1), "cached": k.cached,
                "spec_hash": s.hash(),
            })
        return {
            "graph": self.graph.name,
            "options": self.options,
            "example_sizes": self.example_env,
            "passes": [{"index": r.index, "name": r.name, "ms": round(r.ms, 3), "notes": list(r.notes),
                        "rewrites": dict(r.counts)} for r in self.passes],
            "compile_ms": {k: round(v, 1) for k, v in self.compile_ms.items()},
            "kernels": kernels,
            "totals": {"kernels": len(kernels), "bytes": sum(k["bytes_read"] + k["bytes_written"] for k in kernels),
                       "flops": sum(k["flops"] for k in kernels),
                       "roofline_us_h200": sum(k["roofline_us_h200"] for k in kernels)},
            "h200": H200,
            "derived_params": self.derived_params,
        }

    def dump(self, out_dir: str | os.PathLike) -> Path:
        """Write the dump layout of DESIGN §3 atomically (temporary folder, then rename)."""
        out = Path(out_dir)
        parent = out.parent if str(out.parent) else Path(".")
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        try:
            (tmp / "ir").mkdir()
            (tmp / "kernels").mkdir()
            total = len(self.passes) - 1
            prev = ""
            for r in self.passes:
                text = print_graph(r.graph, header_line(r.graph, r.index, total, r.name, r.ms))
                stem = f"{r.index:02d}_{r.name}"
                (tmp / "ir" / f"{stem}.ir").write_text(text)
                body = text.split("\n", 1)[1]
                diff = difflib.unified_diff(prev.splitlines(keepends=True), body.splitlines(keepends=True),
                                            fromfile="previous", tofile=stem)
                (tmp / "ir" / f"{stem}.diff").write_text("".join(diff))
                prev = body
            for k in self.kernels:
                (tmp / "kernels" / f"{k.spec.name}.py").write_text(k.source)
                twin = ".triton" if k.ptx is not None else ""   # a PTX kernel: <name>.ptx is the template's
                (tmp / "kernels" / f"{k.spec.name}{twin}.ptx").write_text(k.compiled.ptx)
                (tmp / "kernels" / f"{k.spec.name}{twin}.cubin").write_bytes(k.compiled.cubin)
                if k.ptx is not None:
                    (tmp / "kernels" / f"{k.spec.name}.ptx").write_text(k.ptx.ptx)
                    (tmp / "kernels" / f"{k.spec.name}.cubin").write_bytes(k.ptx.cubin)
            (tmp / "report.json").write_text(json.dumps(self.report(), indent=2, sort_keys=False, default=str) + "\n")
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
                os.replace(out, old / "d")
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return out


def _ptx_template(family: str) -> str:
    from dsr_compiler.codegen.ptx import PTX_TEMPLATES
    return PTX_TEMPLATES[family]


def _peak_key(spec: Any) -> str:
    """Which H200 FLOP ceiling bounds a kernel: fp8 tensor cores for FP8 GEMMs, fp32 CUDA cores when a
    float operand is f32 (f32 dots run in "ieee" precision), else bf16 tensor cores."""
    if spec.family in ("gemm_fp8", "moe_gemm_fp8"):
        return "flops_fp8"
    from dsr_compiler.ir.types import DType
    if any(a.kind == "tensor" and a.role == "in" and a.dtype is DType.f32 for a in spec.args):
        return "flops_f32"
    return "flops_bf16"


def _eval(expr: Any, env: dict) -> int | float:
    from dsr_compiler.ir.types import to_expr
    e = to_expr(expr)
    v = e.subs({sympy.Symbol(s.name, integer=True, positive=True): val for s, val in env.items()}) if e.free_symbols else e
    return int(v) if v.is_Integer else float(v)


def compile(module: nn.Module, example_inputs: Sequence[torch.Tensor], *, fp8: Any = False, target: str = "sm_90a",
            backend: str | None = None, dynamic: dict | None = None, name: str | None = None,
            on_pass: Callable[[PassRecord], None] | None = None,
            grad_wrt: Sequence[str] | None = None, mla: str = "absorb", ptx_families: Any = None) -> CompiledModule:
    """Compile `module` for `target`; the result runs on `backend` (auto | cuda | interpret).

    With `grad_wrt` (forward parameter names; the forward must return one scalar loss) the
    compiled module also computes the gradients: `loss, grads = cm(*inputs)` (dsr_compiler/grads.py)."""
    from dsr_compiler.frontend.trace import param_tensors
    from dsr_compiler.runtime.device import BACKENDS
    backend = backend or knobs.get("DSR_BACKEND")
    if target not in TARGETS:
        raise DsrError(f"unknown target {target!r}", hint=f"supported: {', '.join(TARGETS)}")
    if backend not in BACKENDS:
        raise DsrError(f"unknown backend {backend!r}", hint=f"use one of {', '.join(BACKENDS)}")
    if mla not in ("naive", "absorb"):
        raise DsrError(f"unknown MLA form mla={mla!r}",
                       hint="mla='absorb' (decode attends to the latent cache; default) or 'naive' (expand it)")
    from dsr_compiler.ir.passes import Fp8Policy
    policy = Fp8Policy.from_option(fp8)    # fp8: False | True | dict of policy fields | Fp8Policy
    from dsr_compiler.codegen.ptx import resolve_ptx_families
    ptx = resolve_ptx_families(ptx_families)   # None: the DSR_PTX knob
    t0 = time.perf_counter()
    g = trace(module, example_inputs, dynamic=dynamic, name=name)
    t_trace = (time.perf_counter() - t0) * 1e3
    from dsr_compiler.grads import check_grad_wrt
    wrt = check_grad_wrt(module, g, grad_wrt)
    ctx = PassContext(options={"fp8": policy or False, "target": target, "mla": mla})
    if wrt:
        ctx.options["grad_wrt"] = wrt
    t1 = time.perf_counter()
    records = run_passes(g, list(PIPELINE), ctx, on_pass=on_pass)
    t_passes = (time.perf_counter() - t1) * 1e3
    final = records[-1].graph
    t2 = time.perf_counter()
    kernels = build_kernels(final, target, ptx)
    t_codegen = (time.perf_counter() - t2) * 1e3
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]   # None / scalars are baked in
    env = bind_symbols([v.type for v in g.inputs], tensors + param_tensors(module, g),
                       where=f"example inputs of {g.name}")
    from dsr_compiler.params import resolve_params
    params, param_origin = resolve_params(module, final, ctx.derived)
    derived = [dict(d.to_json(), source=param_origin.get(d.outputs[0], "unused")) for d in ctx.derived]
    cm = CompiledModule(
        graph=final, passes=records, kernels=kernels,
        options={"fp8": policy.to_dict() if policy else False, "ptx_families": list(ptx), "target": target,
                 "backend": backend,
                 "dynamic": dynamic or {}, "mla": mla,
                 **({"grad_wrt": list(wrt)} if wrt else {})},
        params=params, example_env={str(k): v for k, v in env.items()}, derived_params=derived,
        compile_ms={"trace": t_trace, "passes": t_passes, "codegen": t_codegen,
                    "total": (time.perf_counter() - t0) * 1e3})
    if knobs.get("DSR_DEBUG") >= 1:
        _debug_log(cm)
    return cm


def _debug_log(cm: CompiledModule) -> None:
    """The DSR_DEBUG ladder (STYLE.md): 1 summary, 2 timings, 3 fusion decisions, 4 generated source,
    5 IR per pass, 6 rewrite matches, 7 PTX. Written to stderr."""
    import sys
    level = knobs.get("DSR_DEBUG")
    w = sys.stderr.write
    w(f"[dsr] {cm.graph.name}: {len(cm.kernels)} kernels "
      f"({', '.join(k.spec.name for k in cm.kernels)}); compile {cm.compile_ms['total']:.0f} ms\n")
    total = len(cm.passes) - 1
    for r in cm.passes:
        if level >= 2:
            w(f"[dsr] pass {r.index}/{total} {r.name}: {r.ms:.2f} ms\n")
        if level >= 3:
            for note in r.notes:
                w(f"[dsr]   {note}\n")
        if level >= 6:
            for rule, n in r.counts:
                w(f"[dsr]   rewrite {rule}: {n} match(es)\n")
        if level >= 5:
            w(print_graph(r.graph, header_line(r.graph, r.index, total, r.name, r.ms)))
    for k in cm.kernels:
        if level >= 2:
            w(f"[dsr] kernel {k.spec.name}: {k.compile_ms:.0f} ms{' (cache hit)' if k.cached else ''}\n")
        if level >= 4:
            w(f"[dsr] ---- {k.spec.name} source ----\n{k.source}\n")
        if level >= 7:
            w(f"[dsr] ---- {k.spec.name} PTX ----\n{k.compiled.ptx}\n")


def build_kernels(g: Graph, target: str = "sm_90a", ptx_families: Sequence[str] = ()) -> list[KernelArtifact]:
    """Lower, render and compile (through the artifact cache) every kernel of a fused graph; kernels of
    `ptx_families` are also emitted as direct PTX (codegen/ptx.py) next to their Triton twin."""
    from dsr_compiler.codegen.ptx import PtxUnsupported, compile_ptx_kernel
    from dsr_compiler.codegen.lower import lower_kernel
    from dsr_compiler.codegen.render import render
    from dsr_compiler.runtime.cache import ArtifactCache
    cache = ArtifactCache()
    out = []
    for i, k in enumerate(g.kernels, start=1):
        spec = lower_kernel(k, i)
        source = render(spec)
        t = time.perf_counter()
        compiled, cached = compile_cached(spec, source, target, cache)
        ptx, note = None, ""
        if spec.family in ptx_families:
            try:
                ptx = compile_ptx_kernel(spec, target)
            except PtxUnsupported as e:
                note = e.what
        out.append(KernelArtifact(spec, source, compiled, (time.perf_counter() - t) * 1e3, cached, ptx, note))
    return out


def compile_cached(spec, source: str, target: str, cache) -> tuple[Any, bool]:
    """compile_triton through the content-addressed artifact cache: (CompiledKernel, was it a hit)."""
    from dsr_compiler.codegen.compile import CompiledKernel, compile_triton
    from dsr_compiler.codegen.render import codegen_fingerprint
    from dsr_compiler.runtime.cache import cache_key
    key = cache_key(spec.hash() + codegen_fingerprint() + hashlib.sha256(source.encode()).hexdigest(), target)
    files = cache.get(key)
    if files is not None:
        meta = json.loads(files["meta.json"])
        return CompiledKernel(ptx=files["kernel.ptx"].decode(), cubin=files["kernel.cubin"],
                              ttir=files["kernel.ttir"].decode(), ttgir=files["kernel.ttgir"].decode(),
                              llir=files["kernel.llir"].decode(), **meta), True
    ck = compile_triton(spec, source, target)
    cache.put(key, {"meta.json": json.dumps(ck.meta(), sort_keys=True).encode(), "kernel.ptx": ck.ptx.encode(),
                    "kernel.cubin": ck.cubin, "kernel.ttir": ck.ttir.encode(), "kernel.ttgir": ck.ttgir.encode(),
                    "kernel.llir": ck.llir.encode()})
    return ck, False
