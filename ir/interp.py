"""Reference interpreter: runs any graph, at any stage of the pipeline, with torch ops.

Each op runs its eager reference from the op table; `call` runs the fused kernel's body.
This is the oracle that every pass is checked against (outputs unchanged by the pass).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import sympy
import torch

from .errors import RuntimeLaunchError

from .graph import Graph
from .ops import OPS
from .types import TensorType


def bind_symbols(types: Sequence[TensorType], tensors: Sequence[torch.Tensor], where: str = "inputs",
                 env: Mapping[sympy.Symbol, int] | None = None) -> dict:
    """Match symbolic dims against concrete shapes (extending the bindings `env`); raise on mismatch."""
    env = dict(env or {})
    for t, x in zip(types, tensors):
        if x.dim() != t.rank:
            raise RuntimeLaunchError(f"{where}: expected rank {t.rank} for {t}, got shape {tuple(x.shape)}")
        for d, n in zip(t.shape, x.shape):
            if d.is_Symbol:
                if env.setdefault(d, int(n)) != int(n):
                    raise RuntimeLaunchError(f"{where}: dim {d} is {env[d]} in one input and {n} in another")
    for t, x in zip(types, tensors):
        for d, n in zip(t.shape, x.shape):
            if not d.is_Symbol:
                want = d.subs(env)
                if not want.is_Integer or int(want) != int(n):
                    raise RuntimeLaunchError(f"{where}: expected shape {t} (= {t.concrete_shape(env) if not (set(t.free_symbols()) - set(env)) else t}), got {tuple(x.shape)}")
        if x.dtype != t.dtype.torch:
            raise RuntimeLaunchError(f"{where}: expected dtype {t.dtype.value} for {t}, got {x.dtype}")
    return env


def concrete_attr(v, env: dict):
    """Substitute bound symbols into an attribute (symbolic reshape sizes become ints)."""
    if isinstance(v, sympy.Expr):
        r = v.subs(env)
        if not r.is_Integer:
            raise RuntimeLaunchError(f"attribute {v} has unbound symbols {sorted(map(str, r.free_symbols))}")
        return int(r)
    if isinstance(v, tuple):
        return tuple(concrete_attr(x, env) for x in v)
    return v


def run_graph(g: Graph, args: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
              _sym_env: Mapping[sympy.Symbol, int] | None = None) -> list[torch.Tensor]:
    """Evaluate `g` on tensors given in `g.inputs` order (or by name). Returns the outputs.

    A kernel body runs with the caller's symbol bindings: its inputs may only carry
    expressions of a symbol (e.g. `ceiling(T/2)`), which cannot bind it by themselves."""
    if isinstance(args, Mapping):
        missing = [v.name for v in g.inputs if v.name not in args]
        if missing:
            raise RuntimeLaunchError(f"run_graph: missing inputs {missing}")
        args = [args[v.name] for v in g.inputs]
    if len(args) != len(g.inputs):
        raise RuntimeLaunchError(f"run_graph: graph {g.name} takes {len(g.inputs)} inputs, got {len(args)}")
    sym_env = bind_symbols([v.type for v in g.inputs], args, where=f"graph {g.name}", env=_sym_env)
    env: dict[str, torch.Tensor] = {v.name: a for v, a in zip(g.inputs, args)}
    kernels = {k.name: k for k in g.kernels}
    for n in g.nodes:
        ins = [env[i] for i in n.inputs]
        if n.op == "call":
            outs = run_graph(kernels[n.attr("kernel")].body, ins, sym_env)
        else:
            op = OPS[n.op]
            attrs = {k: concrete_attr(v, sym_env) for k, v in op.with_defaults(n.attr_dict).items()}
            res = op.reference(*ins, **attrs)
            outs = list(res) if isinstance(res, (tuple, list)) else [res]
        for o, t in zip(n.outputs, outs):
            env[o.name] = t
    return [env[o] for o in g.outputs]
