"""Launch plan: the compiled graph's top level as a list of steps over buffers.

Steps are kernel launches (a generated kernel, its argument binding and grid), free views
(`reshape` of a contiguous buffer), constants and collectives (runtime/collective.py). Symbolic sizes are bound once per call
from the input shapes; scalar arguments and grids are sympy expressions compiled to
Python functions when the plan is built. Nothing here reads device memory back to the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import sympy
import torch

from dsr_compiler.codegen.spec import eval_expr, launch_args
from dsr_compiler.ir.errors import RuntimeLaunchError
from dsr_compiler.ir.graph import Graph, Node, Value
from dsr_compiler.ir.interp import bind_symbols, concrete_attr

from .collective import CollectiveStep, agree


@dataclass
class KernelStep:
    name: str
    spec: Any                                # codegen.spec.KernelSpec
    fn: Any                                  # launchable: fn[grid](*args)
    outputs: list[Value]
    launch_kw: dict


@dataclass
class ViewStep:
    node: Node


@dataclass
class ConstStep:
    node: Node


class LaunchPlan:
    def __init__(self, graph: Graph, steps: list, device: torch.device, ep: Any = None):
        self.graph = graph
        self.ep = ep                      # dsr_compiler.ep.ExpertParallel of the collective steps, or None
        self._agreed: set[tuple] = set()  # symbol values every rank has been seen to call with
        self.steps = steps
        self.device = device
        syms: set[sympy.Symbol] = set()
        for v in graph.inputs:
            syms |= v.type.free_symbols()
        self.symbols = sorted(syms, key=lambda s: s.name)
        # runtime-check flags, one per (kernel, check arg): (step, arg, buffer)
        self.flags: list[tuple[KernelStep, Any, torch.Tensor]] = [
            (st, a, torch.zeros(2, dtype=torch.int64, device=device))
            for st in steps if isinstance(st, KernelStep) for a in st.spec.tensor_args if a.role == "check"]
        self._last_env: dict[str, int] = {}

    def check(self) -> None:
        """Raise (and clear) the first runtime check a kernel flagged since the last check()."""
        failed = []
        for step, a, buf in self.flags:
            code, value = (int(x) for x in buf.tolist())     # the host sync, here only
            if code:
                buf.zero_()
                failed.append((step, a, code, value))
        if not failed:
            return
        step, a, code, value = failed[0]
        try:
            bound = f"{eval_expr(a.expr, self._last_env)}"
        except Exception:                   # an unbound symbol: show the expression
            bound = a.expr
        more = f" ({len(failed) - 1} more kernel(s) flagged too)" if len(failed) > 1 else ""
        raise RuntimeLaunchError(
            f"{self.graph.name}: kernel {step.name} got index {value}, outside the valid range [0, {bound}){more}",
            where=f"kernel {step.name} (IR nodes {', '.join(step.spec.source_nodes)})",
            hint="a decode position must satisfy 0 <= start_pos and start_pos + new tokens <= cache length; "
                 "the outputs of that call are not valid")

    def run(self, args: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        g = self.graph
        if len(args) != len(g.inputs):
            raise RuntimeLaunchError(f"{g.name}: expected {len(g.inputs)} tensors, got {len(args)}")
        for v, a in zip(g.inputs, args):
            if not isinstance(a, torch.Tensor):
                raise RuntimeLaunchError(f"{g.name}: input %{v.name} must be a tensor, got {type(a).__name__}")
            if a.device.type != self.device.type:
                raise RuntimeLaunchError(f"{g.name}: input %{v.name} is on {a.device}, the plan runs on {self.device}",
                                         hint=f"move inputs with .to('{self.device}') or pick the matching --backend")
        env_sym = bind_symbols([v.type for v in g.inputs], args, where=f"inputs of {g.name}")
        names_env = {s.name: v for s, v in env_sym.items()}
        env: dict[str, torch.Tensor] = {v.name: a.contiguous() for v, a in zip(g.inputs, args)}
        self._last_env = names_env
        for _, a, buf in self.flags:
            env[a.value] = buf
        collectives = [st for st in self.steps if isinstance(st, CollectiveStep)]
        if collectives and (key := tuple(sorted(names_env.items()))) not in self._agreed:
            agree(self.ep, names_env, g.name)          # once per new shape: the ranks' sizes must match
            self._agreed.add(key)
        for step in self.steps:
            if isinstance(step, KernelStep):
                for o in step.outputs:
                    env[o.name] = torch.empty(o.type.concrete_shape(env_sym), dtype=o.type.dtype.torch,
                                              device=self.device)
                scratch = [a for a in step.spec.tensor_args if a.role == "scratch"]
                for a in scratch:   # a workspace lives for its launch only (e.g. fp32 gradient accumulators)
                    env[a.value] = torch.empty(tuple(eval_expr(d, names_env) for d in a.shape),
                                               dtype=a.dtype.torch, device=self.device)
                grid, call_args = launch_args(step.spec, env, names_env)
                for a in scratch:
                    del env[a.value]
                if any(x <= 0 for x in grid):
                    continue  # empty problem (e.g. zero tokens): nothing to launch
                step.fn[grid](*call_args, **step.launch_kw)
                del call_args
            elif isinstance(step, ViewStep):
                n = step.node
                shape = concrete_attr(n.attr("shape"), env_sym)
                env[n.out.name] = env[n.inputs[0]].view(shape)
            elif isinstance(step, CollectiveStep):
                outs = step.run([env[i] for i in step.node.inputs])
                for o, t in zip(step.node.outputs, outs):
                    env[o.name] = t
            elif isinstance(step, ConstStep):
                n = step.node
                env[n.out.name] = torch.tensor(n.attr("value"), dtype=n.attr("dtype").torch, device=self.device)
        return [env[o] for o in g.outputs]
