"""Helpers for codegen tests: build fused kernel bodies by hand, run them in the interpreter."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from dsr_compiler.codegen import launch_args, load_interpreted, lower_kernel, render
from dsr_compiler.codegen.spec import KernelSpec, eval_expr
from dsr_compiler.ir import OPS, DType, Graph, GraphBuilder, Kernel, Node, TensorType, Value, run_graph, verify
from dsr_compiler.ir.interp import bind_symbols
from dsr_compiler.tolerance import TOLERANCES as TOL  # noqa: F401  the one table, re-exported for tests
from dsr_compiler.tolerance import compare, tol


class KB:
    """Kernel-body builder: every node's type comes from the op table (so bodies verify)."""

    def __init__(self, name: str, family: str) -> None:
        self.name, self.family = name, family
        self.b = GraphBuilder(name)
        self.types: dict[str, TensorType] = {}

    def input(self, name: str, dtype: DType, *shape: Any) -> str:
        t = TensorType(dtype, tuple(shape))
        self.b.add_input(name, t)
        self.types[name] = t
        return name

    def op(self, op: str, *inputs: str, name: str | None = None, **attrs: Any) -> str:
        """A one-output op; its name."""
        (out,) = self.ops(op, *inputs, outs=(name,) if name else None, **attrs)
        return out

    def ops(self, op: str, *inputs: str, outs: Sequence[str] | None = None, **attrs: Any) -> tuple[str, ...]:
        """Any op (quant_fp8 has two outputs); the names of its outputs (`outs`, or fresh ones)."""
        ts = OPS[op].infer([self.types[i] for i in inputs], attrs)
        names = tuple(outs) if outs else tuple(self.b.fresh(op) for _ in ts)
        self.b.add(Node(tuple(Value(n, t) for n, t in zip(names, ts)), op, tuple(inputs), attrs, origin=f"test.{op}"))
        self.types.update(zip(names, ts))
        return names

    def kernel(self, *outputs: str, **attrs: Any) -> Kernel:
        g = self.b.build(outputs)
        verify(g)
        return Kernel(self.name, self.family, g, attrs)


def one_op_kernel(op: str, family: str, inputs: Sequence[tuple[str, TensorType]], attrs: dict,
                  outputs: Sequence[int] | None = None) -> Kernel:
    """A kernel holding one op (as the fusion pass makes the MoE/vocab kernels); its outputs `out0`,
    `out1`, ... (those at `outputs`, default all) are the kernel's."""
    kb = KB(f"k1_{family}_{op}", family)
    for name, t in inputs:
        kb.input(name, t.dtype, *t.shape)
    n_out = len(OPS[op].infer([t for _, t in inputs], attrs))
    outs = kb.ops(op, *(n for n, _ in inputs), outs=[f"out{j}" for j in range(n_out)], **attrs)
    return kb.kernel(*(outs if outputs is None else [outs[j] for j in outputs]))


def random_inputs(k: Kernel | Graph, sizes: dict[str, int], seed: int = 0,
                  positive: Sequence[str] = ()) -> list[torch.Tensor]:
    """Seeded inputs for a kernel body (or graph); `positive` names inputs drawn in [0.5, inf)."""
    gen = torch.Generator().manual_seed(seed)
    env = {s: v for s, v in sizes.items()}
    out = []
    g = k.body if isinstance(k, Kernel) else k
    for v in g.inputs:
        shape = tuple(int(d.subs({sym: env[str(sym)] for sym in d.free_symbols})) for d in v.type.shape)
        dt = v.type.dtype
        if dt.is_float:
            x = torch.randn(shape, generator=gen)
            if v.name in positive:
                x = x.abs() + 0.5
            out.append(x.to(dt.torch))
        elif dt is DType.bool:
            out.append(torch.rand(shape, generator=gen) > 0.5)
        else:
            out.append(torch.randint(0, 7, shape, generator=gen, dtype=dt.torch))
    return out


def run_interpreted(k: Kernel, inputs: list[torch.Tensor], spec: KernelSpec | None = None,
                    source: str | None = None) -> list[torch.Tensor]:
    """Lower, render (or take `source`: a variant of the rendered kernel) and run `k` on CPU tensors."""
    spec = spec or lower_kernel(k, 1)
    src = source if source is not None else render(spec)
    fn = load_interpreted(spec, src)
    env = bind_symbols([v.type for v in k.body.inputs], inputs)
    vals = k.body.values()
    outs = [torch.full(vals[o].type.concrete_shape(env), float("nan") if vals[o].type.dtype.is_float else 0,
                       dtype=vals[o].type.dtype.torch) for o in k.body.outputs]
    buffers = {v.name: x for v, x in zip(k.body.inputs, inputs)}
    buffers.update({o: t for o, t in zip(k.body.outputs, outs)})
    for a in spec.tensor_args:   # workspaces hold garbage on purpose: a kernel reads only what it wrote
        if a.role == "scratch":
            junk = float("nan") if a.dtype.is_float else 12345   # int workspaces: a count no test reaches
            buffers[a.value] = torch.full(tuple(eval_expr(d, env) for d in a.shape), junk, dtype=a.dtype.torch)
        elif a.role == "check":  # the runtime-owned error flag (index_copy): zero means no error
            buffers[a.value] = torch.zeros(tuple(eval_expr(d, env) for d in a.shape), dtype=a.dtype.torch)
    grid, args = launch_args(spec, buffers, env)
    fn[grid](*args)
    return outs


def check_kernel(k: Kernel, inputs: list[torch.Tensor], rtol: float | None = None, atol: float | None = None,
                 finite: bool = False) -> list[torch.Tensor]:
    """Run `k` in the interpreter and compare every output with the reference interpreter (the
    tolerance table, or explicit `rtol`/`atol`); `finite`: float outputs must also be finite.
    Returns the kernel's outputs."""
    got = run_interpreted(k, inputs)
    want = run_graph(k.body, inputs)
    for name, g, w in zip(k.body.outputs, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        if not w.dtype.is_floating_point:
            assert torch.equal(g, w), f"%{name}: integer/bool outputs differ:\n{g}\nvs\n{w}"
            continue
        if finite:
            assert torch.isfinite(g).all(), f"%{name} has non-finite values"
        if rtol is None and atol is None:
            r = compare(g, w)
            assert r["ok"], (f"%{name}: max abs {r['max_abs']:.3g}, max rel {r['max_rel']:.3g} beyond "
                             f"atol {r['atol']:.3g} rtol {r['rtol']:.3g} {r.get('reason', '')}")
            continue
        # An explicit override replaces the table's value (atol is absolute then, as the caller states).
        t = tol(w.dtype, float(w.float().nan_to_num(0.0).abs().max()) if w.numel() else 0.0)
        t.update({k: v for k, v in (("rtol", rtol), ("atol", atol)) if v is not None})
        torch.testing.assert_close(g.float(), w.float(), equal_nan=True,
                                   msg=lambda m, name=name: f"%{name}: {m}", **t)
    return got
