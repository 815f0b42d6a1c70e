"""End to end through the real fusion pass: every kernel it makes lowers, and a tiny runtime
that runs them in the interpreter reproduces the unfused graph."""
from __future__ import annotations

import torch
from codegen_helpers import KB, TOL, random_inputs, run_interpreted
from dsr_compiler.codegen import lower_kernel
from dsr_compiler.ir import OPS, DType, Graph, run_graph, sym
from dsr_compiler.ir.interp import bind_symbols, concrete_attr
from dsr_compiler.ir.passes import PIPELINE, PassContext, run_passes

T = sym("T")


def block_graph() -> Graph:
    kb = KB("block", "graph")
    x = kb.input("x", DType.f32, T, 64)
    wn = kb.input("norm.weight", DType.f32, 64)
    w1 = kb.input("w1", DType.f32, 96, 64)
    w3 = kb.input("w3", DType.f32, 96, 64)
    w2 = kb.input("w2", DType.f32, 64, 96)
    h = kb.op("rms_norm", x, wn, eps=1e-6)
    a = kb.op("linear", h, w1)
    b = kb.op("linear", h, w3)
    m = kb.op("mul", kb.op("silu", a), b)
    y = kb.op("add", kb.op("linear", m, w2), x)
    q = kb.op("permute", kb.op("reshape", y, shape=(T, 4, 16)), dims=(1, 0, 2))
    att = kb.op("attention", q, q, q, causal=True, scale=0.25)
    z = kb.op("reshape", kb.op("permute", att, dims=(1, 0, 2)), shape=(T, 64))
    out = kb.op("log_softmax", kb.op("mul", z, y), dim=-1, name="out")
    return kb.b.build([out])


def run_fused(g: Graph, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A minimal interpret-backend runtime: kernels through the Triton interpreter, loose ops eagerly."""
    env = {v.name: t for v, t in zip(g.inputs, inputs)}
    syms = bind_symbols([v.type for v in g.inputs], inputs)
    kernels = {k.name: (k, lower_kernel(k, i + 1)) for i, k in enumerate(g.kernels)}
    for n in g.nodes:
        args = [env[i].contiguous() for i in n.inputs]
        if n.op == "call":
            k, spec = kernels[n.attr("kernel")]
            outs = run_interpreted(k, args, spec)
        else:
            op = OPS[n.op]
            attrs = {a: concrete_attr(v, syms) for a, v in op.with_defaults(n.attr_dict).items()}
            outs = [op.reference(*args, **attrs)]
        for o, t in zip(n.outputs, outs):
            env[o.name] = t
    return [env[o] for o in g.outputs]


def test_fused_block_matches_unfused():
    g = block_graph()
    records = run_passes(g, PIPELINE, PassContext())
    fused = records[-1].graph
    families = sorted(k.family for k in fused.kernels)
    assert {"gemm", "reduction", "attention"} <= set(families), families
    for t in (1, 5):
        inputs = random_inputs(g, {"T": t}, seed=t)
        got = run_fused(fused, inputs)
        want = run_graph(g, inputs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=TOL[torch.float32]["atol"] * 10)


def test_reduction_reading_a_slice_of_a_gemm_output_matches_unfused():
    """The fuser lets a reduction read a slice of a stored value in place (the MLA KV latent)."""
    kb = KB("latent", "graph")
    x = kb.input("x", DType.f32, T, 64)
    w = kb.input("w", DType.f32, 80, 64)
    nw = kb.input("norm.weight", DType.f32, 64)
    a = kb.op("linear", x, w)
    s = kb.op("slice", a, dim=1, start=8, end=72, step=1)
    g = kb.b.build([kb.op("rms_norm", s, nw, eps=1e-6, name="out")])
    fused = run_passes(g, PIPELINE, PassContext())[-1].graph
    red = [k for k in fused.kernels if k.family == "reduction"]
    assert len(fused.kernels) == 2 and [n.op for n in red[0].body.nodes] == ["slice", "rms_norm"]
    for t in (1, 5):
        inputs = random_inputs(g, {"T": t}, seed=t)
        (want,) = run_graph(g, inputs)
        (got,) = run_fused(fused, inputs)
        torch.testing.assert_close(got, want, rtol=TOL[torch.float32]["rtol"], atol=TOL[torch.float32]["atol"])


def test_cache_write_into_one_layer_of_a_stacked_cache_matches_unfused():
    """index_copy reads layer 1 of a [2, B, S, C] cache at an offset (no slice copy kernel)."""
    from dsr_compiler.ir import parse
    g = parse("""
        graph g(%caches : f32[2,B,8,4], %pos : i64[1], %new : f32[B,1,4]) {
          %c0 : f32[1,B,8,4] = slice(%caches, dim=0, start=1, end=2, step=1)
          %c : f32[B,8,4] = reshape(%c0, shape=(B, 8, 4))
          %w : f32[B,8,4] = index_copy(%c, %pos, %new, dim=1)
          return %w
        }
    """)
    fused = run_passes(g, PIPELINE, PassContext())[-1].graph
    assert len(fused.kernels) == 1 and fused.kernels[0].family == "index_copy"
    gen = torch.Generator().manual_seed(0)
    for b, p in ((1, 0), (3, 5)):
        inputs = [torch.randn(2, b, 8, 4, generator=gen), torch.tensor([p]), torch.randn(b, 1, 4, generator=gen)]
        (want,) = run_graph(g, inputs)
        (got,) = run_fused(fused, inputs)
        assert torch.equal(got, want)
        assert torch.equal(got[:, p], inputs[2][:, 0]) and torch.equal(got[:, p + 1], inputs[0][1, :, p + 1])
