"""Reference interpreter: hand-written graphs against direct torch, symbol binding errors."""
from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from dsr_compiler.ir import parse, run_graph, sym, verify
from dsr_compiler.ir.errors import RuntimeLaunchError
from dsr_compiler.ir.interp import bind_symbols
from dsr_compiler.ir.passes import PassContext, fuse
from hypothesis import given
from strategies import concrete_inputs, graphs_with_inputs

T = sym("T")


def ir(text: str) -> str:
    return textwrap.dedent(text).strip("\n") + "\n"


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


MLP = parse(ir("""
    graph mlp(%x : f32[T,8], param %nw : f32[8], param %w1 : f32[16,8], param %w3 : f32[16,8], param %w2 : f32[8,16]) {
      %h : f32[T,8] = rms_norm(%x, %nw, eps=1e-06)  # ffn_norm
      %a : f32[T,16] = linear(%h, %w1)  # w1
      %b : f32[T,16] = linear(%h, %w3)  # w3
      %s : f32[T,16] = silu(%a)
      %m : f32[T,16] = mul(%s, %b)
      %o : f32[T,8] = linear(%m, %w2)  # w2
      %r : f32[T,8] = add(%x, %o)
      return %r, %h
    }
"""))


def test_mlp_block_matches_torch():
    x, nw, w1, w3, w2 = randn(5, 8, seed=1), randn(8, seed=2), randn(16, 8, seed=3), randn(16, 8, seed=4), randn(8, 16, seed=5)
    r, h = run_graph(verify(MLP), [x, nw, w1, w3, w2])
    h_ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * nw
    r_ref = x + (F.silu(h_ref @ w1.T) * (h_ref @ w3.T)) @ w2.T
    close(h, h_ref)
    close(r, r_ref, atol=1e-4, rtol=1e-5)


def test_inputs_by_name_and_fused_graph_agree():
    args = {"x": randn(3, 8, seed=1), "nw": randn(8, seed=2), "w1": randn(16, 8, seed=3),
            "w3": randn(16, 8, seed=4), "w2": randn(8, 16, seed=5)}
    plain = run_graph(MLP, args)
    by_order = run_graph(MLP, [args[v.name] for v in MLP.inputs])
    fused = run_graph(fuse(MLP, PassContext()), args)
    for a, b, c in zip(plain, by_order, fused):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_attention_matches_sdpa():
    g = verify(parse(ir("""
        graph attn(%q : f32[2,T,16], %k : f32[2,T,16], %v : f32[2,T,8]) {
          %o : f32[2,T,8] = attention(%q, %k, %v, causal=True, scale=0.25)
          %n : f32[2,T,8] = attention(%q, %k, %v, causal=False, scale=0.25)
          return %o, %n
        }
    """)))
    q, k, v = randn(2, 6, 16, seed=1), randn(2, 6, 16, seed=2), randn(2, 6, 8, seed=3)
    o, n = run_graph(g, [q, k, v])
    close(o, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25))
    close(n, F.scaled_dot_product_attention(q, k, v, scale=0.25))


def test_decode_attention_mask_is_aligned_to_the_end():
    g = verify(parse(ir("""
        graph dec(%q : f32[1,16], %k : f32[T,16], %v : f32[T,16]) {
          %o : f32[1,16] = attention(%q, %k, %v, causal=True, scale=0.25)
          return %o
        }
    """)))
    q, k, v = randn(1, 16, seed=1), randn(7, 16, seed=2), randn(7, 16, seed=3)
    (o,) = run_graph(g, [q, k, v])
    close(o, torch.softmax(q @ k.T * 0.25, dim=-1) @ v)   # the last query sees every key


def test_layout_ops_match_torch():
    g = verify(parse(ir("""
        graph layout(%x : f32[T,8], %c : f32[T,1]) {
          %r : f32[T,2,4] = reshape(%x, shape=(T, 2, 4))
          %p : f32[4,T,2] = permute(%r, dims=(2, 0, 1))
          %s : f32[4,T,1] = slice(%p, dim=-1, start=1, end=2)
          %t : f32[2,T,2] = slice(%p, dim=0, start=1, step=2)
          %e : f32[T,8] = expand(%c, shape=(T, 8))
          %k : f32[T,16] = cat(%x, %e, dim=1)
          %f : f32[2*T,4] = reshape(%x, shape=(2*T, 4))
          return %s, %t, %k, %f
        }
    """)))
    x, c = randn(3, 8, seed=1), randn(3, 1, seed=2)
    s, t, k, f = run_graph(g, [x, c])
    p = x.reshape(3, 2, 4).permute(2, 0, 1)
    assert torch.equal(s, p[:, :, 1:2]) and torch.equal(t, p[1::2])
    assert torch.equal(k, torch.cat([x, c.expand(3, 8)], dim=1))
    assert torch.equal(f, x.reshape(6, 4))
    assert all(o.is_contiguous() for o in (s, t, k, f))


def test_pointwise_compare_where_cast_const():
    g = verify(parse(ir("""
        graph pw(%x : f32[T,4], %y : f32[4]) {
          %z : f32[] = const(value=0.0, dtype=f32)
          %two : i32[] = const(value=2, dtype=i32)
          %m : bool[T,4] = gt(%x, %z)
          %w : f32[T,4] = where(%m, %x, %y)
          %b : bf16[T,4] = cast(%w, dtype=bf16)
          %p : f32[T,4] = pow(%x, %two)
          %d : f32[T,4] = div(%x, %two)
          %g : f32[T,4] = gelu(%x)
          %mx : f32[T,4] = maximum(%x, %y)
          return %w, %b, %p, %d, %g, %mx, %m
        }
    """)))
    x, y = randn(3, 4, seed=1), randn(4, seed=2)
    w, b, p, d, gl, mx, m = run_graph(g, [x, y])
    assert torch.equal(w, torch.where(x > 0, x, y))
    assert b.dtype == torch.bfloat16 and torch.equal(b, w.to(torch.bfloat16))
    close(p, x * x)
    assert torch.equal(d, x / 2) and d.dtype == torch.float32
    close(gl, 0.5 * x * (1 + torch.erf(x / math.sqrt(2))))
    assert torch.equal(mx, torch.maximum(x, y)) and torch.equal(m, x > 0)


def test_reductions_keepdim_and_softmax():
    g = verify(parse(ir("""
        graph red(%x : f32[2,T,8]) {
          %s : f32[2,T] = sum(%x, dim=-1)
          %m : f32[2,1,8] = mean(%x, dim=1, keepdim=True)
          %a : f32[T,8] = amax(%x, dim=0, keepdim=False)
          %p : f32[2,T,8] = softmax(%x, dim=1)
          %l : f32[2,T,8] = log_softmax(%x, dim=-1)
          return %s, %m, %a, %p, %l
        }
    """)))
    x = randn(2, 5, 8, seed=3)
    s, m, a, p, lsm = run_graph(g, [x])
    close(s, x.sum(-1))
    close(m, x.mean(1, keepdim=True))
    assert torch.equal(a, x.amax(0))
    close(p, torch.exp(x) / torch.exp(x).sum(1, keepdim=True))
    close(lsm, x - torch.logsumexp(x, -1, keepdim=True))


def test_bf16_softmax_and_rms_norm_compute_in_fp32():
    g = verify(parse(ir("""
        graph lowp(%x : bf16[T,8], %w : bf16[8]) {
          %p : bf16[T,8] = softmax(%x, dim=-1)
          %n : bf16[T,8] = rms_norm(%x, %w, eps=1e-06)
          return %p, %n
        }
    """)))
    x, w = randn(4, 8, seed=1).bfloat16(), randn(8, seed=2).bfloat16()
    p, n = run_graph(g, [x, w])
    assert torch.equal(p, torch.softmax(x.float(), -1).bfloat16())
    xf = x.float()
    assert torch.equal(n, (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).bfloat16())


def test_rope_is_a_complex_rotation_of_pairs():
    g = verify(parse(ir("""
        graph rope(%x : f32[T,2,8], %cos : f32[T,1,8], %sin : f32[T,1,8]) {
          %y : f32[T,2,8] = rope(%x, %cos, %sin)
          return %y
        }
    """)))
    x = randn(5, 2, 8, seed=1)
    angle = randn(5, 1, 4, seed=2)
    cos, sin = angle.cos().repeat_interleave(2, -1), angle.sin().repeat_interleave(2, -1)
    (y,) = run_graph(g, [x, cos, sin])
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (4, 2))) * torch.polar(torch.ones_like(angle), angle))
    close(y, ref.flatten(-2))


def test_gemms_and_embedding():
    g = verify(parse(ir("""
        graph gemm(%a : f32[3,T,4], %b : f32[4,5], %w : f32[6,4], %bias : f32[6], %emb : f32[10,4], %ids : i64[T]) {
          %m : f32[3,T,5] = matmul(%a, %b)
          %l : f32[3,T,6] = linear(%a, %w, %bias)
          %e : f32[T,4] = embedding(%emb, %ids)
          return %m, %l, %e
        }
    """)))
    a, b, w, bias, emb = randn(3, 2, 4, seed=1), randn(4, 5, seed=2), randn(6, 4, seed=3), randn(6, seed=4), randn(10, 4, seed=5)
    ids = torch.tensor([3, 9])
    m, lin, e = run_graph(g, [a, b, w, bias, emb, ids])
    close(m, torch.einsum("btk,kn->btn", a, b))
    close(lin, torch.einsum("btk,nk->btn", a, w) + bias)
    assert torch.equal(e, emb[ids])


def test_kernel_body_sees_the_callers_symbols():
    # a kernel whose inputs only carry ceiling(T/2) cannot bind T by itself
    g = verify(parse(ir("""
        kernel @k1_reduction_sum(%s : f32[ceiling(T/2),2]) family="reduction" {
          %r : f32[1,2] = sum(%s, dim=0, keepdim=True)
          return %r
        }

        graph g(%x : f32[T,2]) {
          %s : f32[ceiling(T/2),2] = slice(%x, dim=0, start=0, step=2)
          %r : f32[1,2] = call @k1_reduction_sum(%s)
          return %r
        }
    """)))
    x = randn(5, 2, seed=1)
    (r,) = run_graph(g, [x])
    close(r, x[::2].sum(0, keepdim=True))


# ----------------------------------------------------------------------------- binding errors

BIND = parse(ir("""
    graph bind(%x : f32[T,8], %y : f32[T,8], %z : f32[2*T], %i : i32[T]) {
      %a : f32[T,8] = add(%x, %y)
      return %a
    }
"""))


def _args(**over):
    args = {"x": torch.zeros(3, 8), "y": torch.zeros(3, 8), "z": torch.zeros(6), "i": torch.zeros(3, dtype=torch.int32)}
    args.update(over)
    return args


def test_binding_ok():
    (a,) = run_graph(BIND, _args())
    assert a.shape == (3, 8)
    assert bind_symbols([v.type for v in BIND.inputs], list(_args().values())) == {T: 3}


@pytest.mark.parametrize("over, what", [
    ({"x": torch.zeros(3, 8, 1)}, "expected rank 2 for f32[T,8], got shape (3, 8, 1)"),
    ({"x": torch.zeros(24)}, "expected rank 2"),
    ({"y": torch.zeros(4, 8)}, "dim T is 3 in one input and 4 in another"),
    ({"i": torch.zeros(5, dtype=torch.int32)}, "dim T is 3 in one input and 5 in another"),
    ({"x": torch.zeros(3, 7)}, "expected shape f32[T,8] (= (3, 8)), got (3, 7)"),
    ({"z": torch.zeros(7)}, "expected shape f32[2*T] (= (6,)), got (7,)"),
    ({"y": torch.zeros(3, 8, dtype=torch.float64)}, "expected dtype f32 for f32[T,8], got torch.float64"),
    ({"i": torch.zeros(3, dtype=torch.int64)}, "expected dtype i32 for i32[T], got torch.int64"),
    ({"x": torch.zeros(3, 8, dtype=torch.bfloat16)}, "expected dtype f32"),
])
def test_binding_errors(over, what):
    with pytest.raises(RuntimeLaunchError) as ei:
        run_graph(BIND, _args(**over))
    assert what in str(ei.value)
    assert "graph bind" in str(ei.value)


def test_wrong_number_of_inputs_and_missing_names():
    with pytest.raises(RuntimeLaunchError, match="takes 4 inputs, got 3"):
        run_graph(BIND, list(_args().values())[:3])
    args = _args()
    del args["z"]
    with pytest.raises(RuntimeLaunchError, match=r"missing inputs \['z'\]"):
        run_graph(BIND, args)


def test_unbindable_symbol_is_reported():
    g = parse(ir("""
        graph only_expr(%z : f32[2*T]) {
          %n : f32[2*T] = neg(%z)
          return %n
        }
    """))
    with pytest.raises(RuntimeLaunchError, match=r"expected shape f32\[2\*T\]"):
        run_graph(g, [torch.zeros(6)])


@given(graphs_with_inputs())
def test_random_graphs_run_finite(gi):
    g, args = gi
    outs = run_graph(g, args)
    assert len(outs) == len(g.outputs)
    for o, v in zip(outs, g.output_values()):
        assert o.dtype == v.type.dtype.torch
        assert o.dim() == v.type.rank
        if o.dtype.is_floating_point:
            assert torch.isfinite(o.float()).all()


def test_concrete_inputs_helper():
    g = parse(ir("""
        graph h(%x : f32[T,4], %m : bool[T], %i : i64[2], %b : bf16[B,T]) {
          return %x
        }
    """))
    xs = concrete_inputs(g, {"T": 3, "B": 2}, seed=1, positive=["b"])
    assert [tuple(x.shape) for x in xs] == [(3, 4), (3,), (2,), (2, 3)]
    assert [x.dtype for x in xs] == [torch.float32, torch.bool, torch.int64, torch.bfloat16]
    assert xs[0].abs().max() <= 1 and xs[3].min() >= 0.5
    assert all(torch.equal(a, b) for a, b in zip(xs, concrete_inputs(g, {T: 3, sym("B"): 2}, seed=1, positive=["b"])))
