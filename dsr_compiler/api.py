"""The front door: `trace` and `compile`, returning a callable `CompiledModule`.

compile = trace (frontend) -> PIPELINE of passes (verified, timed) -> lower each fused
kernel to a KernelSpec -> render through its Jinja template -> triton.compile to PTX and
cubin for sm_90a (cached by content) -> a LaunchPlan run by the `cuda` or `interpret` backend.
"""
from __future__ import annotations

import hashlib
import json
import os
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
from dsr_compiler.options import TARGETS, CompileOptions  # noqa: F401  (TARGETS: the public name it had here)

H200 = {"bytes_per_s": 4.8e12, "flops_bf16": 989e12, "flops_fp8": 1979e12, "flops_f32": 67e12}


def trace(module: nn.Module, example_inputs: Sequence[Any] | torch.Tensor, dynamic: dict | None = None,
          name: str | None = None, kwargs: dict[str, Any] | None = None) -> Graph:
    """Trace `module` into the IR (see dsr_compiler.frontend). A bare tensor is one example input;
    `kwargs` are example inputs by forward parameter name."""
    from dsr_compiler.frontend import trace as _trace
    from dsr_compiler.signature import CallSignature
    _, example = CallSignature.from_example(module, _example_tuple(example_inputs), kwargs)
    return _trace(module, example, dynamic=dynamic, name=name)


def _example_tuple(example_inputs: Any) -> tuple:
    """A bare tensor is one example input (iterating it would split it into rows)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        from dsr_compiler.errors import TraceError
        raise TraceError(f"trace: example_inputs must be a tuple of example arguments, got "
                         f"{type(example_inputs).__name__}",
                         hint="pass e.g. (x,) or (x, kv_cache, pe_cache, start_pos); a single tensor is also accepted")
    return tuple(example_inputs)


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
    options: dict[str, Any]        # report form (CompileOptions.to_dict)
    params: list[torch.Tensor]
    example_env: dict[str, int]
    compile_ms: dict[str, float] = field(default_factory=dict)
    derived_params: list[dict] = field(default_factory=list)   # params computed once at compile time (ir/params.py)
    signature: Any = None          # dsr_compiler.signature.CallSignature: what a call must pass
    position_guards: tuple = ()    # signature.PositionGuard: decode positions checked on the host
    compile_options: CompileOptions | None = None
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

    def __call__(self, *args: Any, backend: str | None = None, **kwargs: Any):
        """Run with exactly the arguments the module was compiled with (dsr_compiler/signature.py)."""
        be, plan = self.plan(backend)
        data = self.graph.data_inputs
        where = f"calling the compiled {self.graph.name}"
        if self.signature is not None:
            from dsr_compiler.signature import check_positions
            bound, host = self.signature.bind(args, kwargs, data, plan.device, where)
            inputs = [bound[v.name] for v in data]
            if self.position_guards and host:
                env = bind_symbols([v.type for v in data], inputs, where=where)
                check_positions(self.position_guards, host, {str(k): v for k, v in env.items()}, where)
        else:
            if kwargs or len(args) != len(data):
                raise DsrError(f"{self.graph.name}: expected {len(data)} inputs "
                               f"({', '.join('%' + v.name for v in data)}), got {len(args)}", where=where)
            inputs = list(args)
        outs = plan.run(inputs + self._device_params[be])
        if knobs.get("DSR_DEBUG") >= 1:
            self.check()
        if self.options.get("grad_wrt"):
            from dsr_compiler.grads import split_outputs
            return split_outputs(outs, self.options["grad_wrt"])
        return outs[0] if len(outs) == 1 else tuple(outs)

    def check(self) -> None:
        """Synchronise and raise (DsrError naming the kernel, the bad value and the valid range) the
        first runtime check that a kernel flagged since the last `check()`, e.g. a decode position
        outside the KV cache; the flags are then cleared. Kernels only write their flag buffers:
        this is the one place that reads them back (a host sync), so calls stay asynchronous.
        Runs after every call under DSR_DEBUG>=1 and in `dsrc run --check`."""
        for plan in self._plans.values():
            plan.check()

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
        """Write the dump layout of DESIGN §3 (dsr_compiler/dump.py: replaces only a previous dump,
        atomically; DumpError for a folder holding other data or one that cannot be written)."""
        from dsr_compiler.dump import write_dump
        return write_dump(self, out_dir)


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


def compile(module: nn.Module, example_inputs: Sequence[Any] | torch.Tensor, *, kwargs: dict[str, Any] | None = None,
            fp8: Any = False, target: str = "sm_90a",
            backend: str | None = None, dynamic: dict | None = None, name: str | None = None,
            on_pass: Callable[[PassRecord], None] | None = None,
            grad_wrt: Sequence[str] | None = None, mla: str = "absorb", ptx_families: Any = None,
            options: CompileOptions | None = None) -> CompiledModule:
    """Compile `module` for `target`; the result runs on `backend` (auto | cuda | interpret).

    With `grad_wrt` (forward parameter names; the forward must return one scalar loss) the
    compiled module also computes the gradients: `loss, grads = cm(*inputs)` (dsr_compiler/grads.py).
    `example_inputs` is a tuple of forward's arguments (a bare tensor is one), `kwargs` more of them by
    name; the compiled module is called with the same arguments (dsr_compiler/signature.py).
    `options` (dsr_compiler/options.py), when given, replaces fp8/target/backend/mla/ptx_families."""
    from dsr_compiler.frontend import param_tensors
    if options is None:
        options = CompileOptions.make(fp8=fp8, target=target, backend=backend, mla=mla, ptx_families=ptx_families)
    from dsr_compiler.signature import CallSignature, position_guards
    signature, example_inputs = CallSignature.from_example(module, _example_tuple(example_inputs), kwargs)
    t0 = time.perf_counter()
    from dsr_compiler.frontend import trace as _trace
    trace_notes: list[str] = []
    g = _trace(module, example_inputs, dynamic=dynamic, name=name, notes=trace_notes)
    t_trace = (time.perf_counter() - t0) * 1e3
    from dsr_compiler.grads import check_grad_wrt
    wrt = check_grad_wrt(module, g, grad_wrt)
    ctx = PassContext(options=options.pass_options())
    if wrt:
        ctx.options["grad_wrt"] = wrt
    t1 = time.perf_counter()
    records = run_passes(g, list(PIPELINE), ctx, on_pass=on_pass)
    if trace_notes:       # the frontend's notes (e.g. a print() in forward) belong to the trace record
        import dataclasses
        records[0] = dataclasses.replace(records[0], notes=tuple(trace_notes))
    t_passes = (time.perf_counter() - t1) * 1e3
    final = records[-1].graph
    t2 = time.perf_counter()
    kernels = build_kernels(final, options.target, options.ptx_families)
    t_codegen = (time.perf_counter() - t2) * 1e3
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]   # None / scalars are baked in
    env = bind_symbols([v.type for v in g.inputs], tensors + param_tensors(module, g),
                       where=f"example inputs of {g.name}")
    from dsr_compiler.params import resolve_params
    params, param_origin = resolve_params(module, final, ctx.derived)
    derived = [dict(d.to_json(), source=param_origin.get(d.outputs[0], "unused")) for d in ctx.derived]
    cm = CompiledModule(
        graph=final, passes=records, kernels=kernels,
        options=options.to_dict(dynamic, wrt), compile_options=options,
        params=params, example_env={str(k): v for k, v in env.items()}, derived_params=derived, signature=signature,
        position_guards=position_guards(g),
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
        if level >= 3 and r.index > 0:          # trace notes were printed at trace time (level 1)
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


_CACHE_FILES = ("meta.json", "kernel.ptx", "kernel.cubin", "kernel.ttir", "kernel.ttgir", "kernel.llir")


def compile_cached(spec, source: str, target: str, cache) -> tuple[Any, bool]:
    """compile_triton through the content-addressed artifact cache: (CompiledKernel, was it a hit).
    An entry missing any of _CACHE_FILES, or whose meta.json does not load, is evicted and rewritten."""
    from dsr_compiler.codegen.compile import CompiledKernel, compile_triton
    from dsr_compiler.codegen.render import codegen_fingerprint
    from dsr_compiler.runtime.cache import cache_key
    key = cache_key(spec.hash() + codegen_fingerprint() + hashlib.sha256(source.encode()).hexdigest(), target)
    files = cache.get(key, required=_CACHE_FILES)
    if files is not None:
        try:
            meta = _cached_meta(files["meta.json"], CompiledKernel)
            return CompiledKernel(ptx=files["kernel.ptx"].decode(), cubin=files["kernel.cubin"],
                                  ttir=files["kernel.ttir"].decode(), ttgir=files["kernel.ttgir"].decode(),
                                  llir=files["kernel.llir"].decode(), **meta), True
        except (ValueError, TypeError, RecursionError):   # bad JSON / UTF-8 / fields: not a usable entry
            cache.evict(key)
    ck = compile_triton(spec, source, target)
    cache.put(key, {"meta.json": json.dumps(ck.meta(), sort_keys=True).encode(), "kernel.ptx": ck.ptx.encode(),
                    "kernel.cubin": ck.cubin, "kernel.ttir": ck.ttir.encode(), "kernel.ttgir": ck.ttgir.encode(),
                    "kernel.llir": ck.llir.encode()})
    return ck, False


def _cached_meta(raw: bytes, cls: type) -> dict[str, Any]:
    """meta.json of a cache entry (bytes from disk: untrusted): an object of `cls`'s scalar fields
    whose values have the field's type; TypeError otherwise."""
    import dataclasses
    meta = json.loads(raw)
    types = {f.name: f.type for f in dataclasses.fields(cls)}    # annotations are strings (__future__)
    if not isinstance(meta, dict):
        raise TypeError("meta.json is not an object")
    for k, v in meta.items():
        want = {"int": int, "str": str, "float": (int, float)}.get(types.get(k, ""))
        if want is None or not isinstance(v, want) or isinstance(v, bool):
            raise TypeError(f"meta.json field {k!r} is unknown or has the wrong type")
    return meta
