"""The front door: `trace` and `compile`, returning a callable `CompiledModule`.

compile = options (options.py, validated once) -> trace (frontend) -> PIPELINE of passes (verified,
timed) -> build every fused kernel (codegen/build.py: KernelSpec, Jinja template, triton.compile to
PTX and cubin for sm_90a through the artifact cache) -> a LaunchPlan run by the `cuda` or
`interpret` backend. The report, roofline and DSR_DEBUG ladder live in report.py, the dump in dump.py.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dsr_compiler import knobs
from dsr_compiler.errors import DsrError
from dsr_compiler.ir import Graph
from dsr_compiler.ir.interp import bind_symbols
from dsr_compiler.ir.passes import PIPELINE, PassContext, PassRecord, run_passes
from dsr_compiler.codegen.build import KernelArtifact
from dsr_compiler.options import TARGETS, CompileOptions  # noqa: F401  (TARGETS: the public name it had here)

from dsr_compiler.report import H200  # noqa: F401  (the public name it had here)


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


#: compiles one CompiledModule may add for sizes its size guards exclude (CompiledModule._specialized)
MAX_SPECIALIZATIONS = 8


@dataclass
class CompiledModule:
    """A compiled module: call it like the original (with the same non-parameter inputs)."""

    graph: Graph
    passes: list[PassRecord]
    kernels: list[KernelArtifact]  # codegen/build.py
    options: dict[str, Any]        # report form (CompileOptions.to_dict)
    params: list[torch.Tensor]
    example_env: dict[str, int]
    compile_ms: dict[str, float] = field(default_factory=dict)
    derived_params: list[dict] = field(default_factory=list)   # params computed once at compile time (ir/params.py)
    signature: Any = None          # dsr_compiler.signature.CallSignature: what a call must pass
    position_guards: tuple = ()    # signature.PositionGuard: decode positions checked on the host
    compile_options: CompileOptions | None = None
    ep: Any = None                 # dsr_compiler.ep.ExpertParallel when the experts are spread over ranks
    size_guards: tuple = ()        # frontend.context.SizeGuard: the sizes this graph holds for (see __call__)
    out_structure: Any = None      # frontend.context.OutputStructure: forward's result rebuilt (dicts, ModelOutput)
    _respecialize: Callable[[tuple, dict], "CompiledModule"] | None = None
    _specializations: dict[tuple, "CompiledModule"] = field(default_factory=dict)
    _plans: dict[str, Any] = field(default_factory=dict)
    _device_params: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def plan(self, backend: str | None = None):
        from dsr_compiler.runtime.device import resolve_backend
        from dsr_compiler.runtime.launch import build_plan
        be = resolve_backend(backend or self.options["backend"])
        if be not in self._plans:
            self._plans[be] = build_plan(self.graph, self.kernels, be, self.ep)
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
            if self.size_guards:
                env = bind_symbols([v.type for v in data], inputs, where=where)
                if not all(g.holds(env) for g in self.size_guards):
                    return self._specialized(env, args, kwargs, where)(*args, backend=backend, **kwargs)
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
        if self.out_structure is not None and not self.out_structure.plain():
            return self.out_structure.build(outs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _specialized(self, env: dict, args: tuple, kwargs: dict, where: str) -> "CompiledModule":
        """The compile for sizes where a size guard of this one fails (forward branched on a symbolic size at
        trace time, e.g. transformers' `q_length > 1`): traced again with these arguments as the example, so
        the branch goes the other way, once per combination of guard outcomes (at most MAX_SPECIALIZATIONS)."""
        key = tuple(g.holds(env) for g in self.size_guards)
        hit = self._specializations.get(key)
        if hit is not None:
            return hit
        failed = "; ".join(g.text() for g in self.size_guards if not g.holds(env))
        if self._respecialize is None:
            raise DsrError(f"{self.graph.name}: this plan holds only where {failed}, and it cannot be compiled "
                           "again for these sizes", where=where, hint="compile with example inputs of these sizes")
        if len(self._specializations) >= MAX_SPECIALIZATIONS:
            raise DsrError(f"{self.graph.name}: sizes {dict((str(k), v) for k, v in env.items())} need another "
                           f"specialization (not {failed}), and {MAX_SPECIALIZATIONS} exist already", where=where,
                           hint="mark fewer dims dynamic, or compile one module per size class")
        spec = self._respecialize(args, kwargs)
        if not all(g.holds(env) for g in spec.size_guards):
            raise DsrError(f"{self.graph.name}: compiled again for sizes {dict((str(k), v) for k, v in env.items())}, "
                           "its guards still fail", where=where)
        self._specializations[key] = spec
        return spec

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
        """report.json's content: options, passes, per-kernel figures and H200 rooflines (dsr_compiler/report.py)."""
        from dsr_compiler.report import build_report
        return build_report(self)

    def dump(self, out_dir: str | os.PathLike) -> Path:
        """Write the dump layout of DESIGN §3 (dsr_compiler/dump.py: replaces only a previous dump,
        atomically; DumpError for a folder holding other data or one that cannot be written)."""
        from dsr_compiler.dump import write_dump
        return write_dump(self, out_dir)


def compile(module: nn.Module, example_inputs: Sequence[Any] | torch.Tensor, *, kwargs: dict[str, Any] | None = None,
            fp8: Any = False, target: str = "sm_90a",
            backend: str | None = None, dynamic: dict | None = None, name: str | None = None,
            on_pass: Callable[[PassRecord], None] | None = None,
            grad_wrt: Sequence[str] | None = None, mla: str = "absorb", ptx_families: Any = None,
            options: CompileOptions | None = None, progress: Any = None, ep: Any = None,
            ep_mode: str = "fixed") -> CompiledModule:
    """Compile `module` for `target`; the result runs on `backend` (auto | cuda | interpret).

    With `grad_wrt` (forward parameter names; the forward must return one scalar loss) the
    compiled module also computes the gradients: `loss, grads = cm(*inputs)` (dsr_compiler/grads.py).
    `example_inputs` is a tuple of forward's arguments (a bare tensor is one), `kwargs` more of them by
    name; the compiled module is called with the same arguments (dsr_compiler/signature.py).
    `options` (dsr_compiler/options.py), when given, replaces fp8/target/backend/mla/ptx_families.
    `progress` (dsr_compiler/progress.py `Progress`, as `dsrc` passes it) gets a line per stage and kernel.
    `ep` (a torch.distributed ProcessGroup, an int N for the initialised default group, or
    dsr_compiler.ep.EpPlan) spreads the routed experts over the group's ranks (dsr_compiler/ep.py);
    `ep_mode` "fixed" (default: fixed-capacity exchanges, no host sync) or "exact" (only the routed rows
    move, one host sync per exchange)."""
    from dsr_compiler.codegen.build import build_kernels
    from dsr_compiler.frontend import param_tensors
    from dsr_compiler.runtime.cache import ArtifactCache
    if options is None:
        options = CompileOptions.make(fp8=fp8, target=target, backend=backend, mla=mla, ptx_families=ptx_families)
    from dsr_compiler import ep as _ep
    ep_info = _ep.resolve(ep, ep_mode)                       # before the trace: a bad `ep` costs nothing
    from dsr_compiler.signature import CallSignature, position_guards
    signature, example_inputs = CallSignature.from_example(module, _example_tuple(example_inputs), kwargs)
    t0 = time.perf_counter()
    from dsr_compiler.frontend import trace as _trace
    trace_notes: list[str] = []
    if progress is not None:
        progress.stage("trace")
    guards: list = []
    structure: list = []
    g = _trace(module, example_inputs, dynamic=dynamic, name=name, notes=trace_notes, guards=guards,
               structure=structure)
    for guard in guards:
        trace_notes.append(f"specialized: {guard.text()}; a call with sizes where it is not compiles another "
                           "specialization on first use")
    t_trace = (time.perf_counter() - t0) * 1e3
    from dsr_compiler.grads import check_grad_wrt
    wrt = check_grad_wrt(module, g, grad_wrt)
    ctx = PassContext(options=options.pass_options())
    if wrt:
        ctx.options["grad_wrt"] = wrt
    if ep_info is not None:
        ctx.options["ep"] = ep_info.pass_option()
    t1 = time.perf_counter()
    if progress is not None:
        progress.stage("passes")
    records = run_passes(g, _ep.pipeline(list(PIPELINE), ep_info), ctx, on_pass=on_pass)
    if trace_notes:       # the frontend's notes (e.g. a print() in forward) belong to the trace record
        import dataclasses
        records[0] = dataclasses.replace(records[0], notes=tuple(trace_notes))
    t_passes = (time.perf_counter() - t1) * 1e3
    final = records[-1].graph
    t2 = time.perf_counter()
    on_kernel = None if progress is None else (lambda i, n, k: progress.step("codegen", i, n, k))
    kernels = build_kernels(final, options.target, options.ptx_families, ArtifactCache(), on_kernel=on_kernel)
    t_codegen = (time.perf_counter() - t2) * 1e3
    from torch.utils import _pytree as pytree
    tensors = [x for v in example_inputs for x in (pytree.tree_leaves(v) if isinstance(v, (tuple, list, dict))
                                                   else [v]) if isinstance(x, torch.Tensor)]   # None / scalars baked
    env = bind_symbols([v.type for v in g.inputs], tensors + param_tensors(module, g, meta=True),
                       where=f"example inputs of {g.name}")
    if progress is not None:
        progress.stage("params")
    from dsr_compiler.params import resolve_params
    from dsr_compiler.frontend import derived_declarations
    declared = derived_declarations(module, g) + list(ctx.derived)     # the frontend's first: passes use them
    params, param_origin = resolve_params(module, final, declared)
    derived = [dict(d.to_json(), source=param_origin.get(d.outputs[0], "unused")) for d in declared]
    cm = CompiledModule(
        graph=final, passes=records, kernels=kernels,
        options={**options.to_dict(dynamic, wrt), **({"ep": ep_info.to_dict()} if ep_info else {})},
        compile_options=options, ep=ep_info,
        params=params, example_env={str(k): v for k, v in env.items()}, derived_params=derived, signature=signature,
        position_guards=position_guards(g),
        compile_ms={"trace": t_trace, "passes": t_passes, "codegen": t_codegen,
                    "total": (time.perf_counter() - t0) * 1e3},
        size_guards=tuple(guards), out_structure=structure[0] if structure else None)
    if guards:
        def respecialize(args: tuple, call_kwargs: dict) -> CompiledModule:
            return compile(module, args, kwargs=call_kwargs or None, dynamic=dynamic, name=name, grad_wrt=grad_wrt,
                           options=options, ep=ep, ep_mode=ep_mode)
        cm._respecialize = respecialize
    if knobs.get("DSR_DEBUG") >= 1:
        from dsr_compiler.report import debug_log
        debug_log(cm)
    return cm
