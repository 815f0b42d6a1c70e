"""Frontend: nn.Module -> IR via torch.fx. Every traced graph prints with its symbolic dims, parses
back to itself, verifies, and the reference interpreter matches eager PyTorch for token counts
other than the example's (which is what proves the dim stayed symbolic)."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from dsr_compiler.ir import parse, run_graph, sym, verify
from dsr_compiler.ir.errors import TraceError
from dsr_compiler.frontend import param_tensors, trace

TOKENS = (1, 5, 17)


def _check(module: nn.Module, make_inputs, dynamic, tokens=TOKENS, example_t: int = 8, atol: float = 1e-5):
    """Trace at `example_t` tokens, then compare IR vs eager at every count in `tokens`."""
    module.eval()
    g = trace(module, make_inputs(example_t), dynamic=dynamic)
    text = str(g)
    assert "T" in text
    assert parse(text) == g
    verify(g)
    params = param_tensors(module, g)
    for t in tokens:
        inputs = make_inputs(t)
        got = run_graph(g, list(inputs) + params)
        want = module(*inputs)
        want = list(want) if isinstance(want, (tuple, list)) else [want]
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.shape == b.shape, (t, a.shape, b.shape)
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)
    return g


def ops(g) -> list[str]:
    return [n.op for n in g.nodes]


def randn(*shape):
    return lambda t: (torch.randn(*(t if s == "T" else s for s in shape)),)


# ----------------------------------------------------------------------------- modules under test

class MLP(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)))


class SwiGLU(nn.Module):
    """Fused gate/up projection split with chunk, the DeepSeek expert shape."""

    def __init__(self, dim: int = 16, inter: int = 24) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(2 * inter, dim) / 4)
        self.down = nn.Parameter(torch.randn(dim, inter) / 4)

    def forward(self, x):
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)


class RMSNorm(nn.Module):
    """A zoo-style RMSNorm: the class attribute `dsr_op` makes it a leaf."""

    dsr_op = "rms_norm"

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).type_as(x)


class NormBlock(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return x + self.proj(self.norm(x))


class Shapes(nn.Module):
    """A reshape/permute/slice chain whose sizes come from x.size(i) / x.shape[i] and -1."""

    def forward(self, x):
        T, D = x.shape
        h = x.view(T, 4, -1)                       # [T, 4, 8]
        h = h.transpose(0, 1)                      # [4, T, 8]
        h = h.permute(2, 1, 0).contiguous()        # [8, T, 4]
        h = h.reshape(8, x.size(0) * 4)            # [8, 4T]
        h = h.T.unsqueeze(0)                       # [1, 4T, 8]
        h = h.squeeze(0).flatten()                 # [32T]
        h = h.unflatten(0, (x.size(0), -1))        # [T, 32]
        a = h[:, 2:10:3]                           # [T, 3]
        b = h[..., None, -1]                       # [T, 1]
        c = h[:, 1]                                # [T]
        left, right = h.split([12, 20], dim=-1)
        e = torch.cat([a, b, c.unsqueeze(-1), left.mT.mT, right[:, :4]], dim=-1)
        f = e.unsqueeze(1).expand(-1, 2, -1).reshape(T, -1)
        return f + torch.stack([c, c], dim=1).sum(dim=1, keepdim=True)


class Pointwise(nn.Module):
    """Scalars on either side, casts, comparisons, where, reductions, softmax with dtype."""

    def forward(self, x):
        y = 2 - x * 3 + x / 4 - 1 / (x.abs() + 1)
        y = y ** 2 + torch.sqrt(x.abs() + 1e-3) + torch.exp(-x).reciprocal() + x.sigmoid() * x.tanh()
        y = torch.where(x > 0, y, -y) + torch.maximum(x, torch.zeros_like(x) if False else x * 0.5)
        y = y.masked_fill(x < -1.5, 0.0) + torch.clamp(x, min=-1.0, max=1.0)
        y = y + F.relu(x) + F.gelu(x) + torch.log(x.abs() + 1) + (x != 0).float()
        s = y.half().float()                     # a real round trip through f16
        m = s - s.amax(-1, keepdim=True)
        p = torch.softmax(m, dim=-1, dtype=torch.float32) + F.log_softmax(m, dim=-1).exp()
        return p * s.mean(-1, keepdim=True) + s.sum(-1, keepdim=True).to(torch.float32)


def rope_reference(x, cos, sin):
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rot = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * cos.float() + rot * sin.float()).to(x.dtype)


@torch.fx.wrap
def apply_rope(x, cos, sin):
    return rope_reference(x, cos, sin)


apply_rope.dsr_op = "rope"


class Attention(nn.Module):
    """Causal self-attention with rope on q and k; cos/sin are inputs of shape [T, head_dim]."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin):
        T = x.size(0)
        q = self.wq(x).view(T, self.heads, self.head_dim)
        k = self.wk(x).view(T, self.heads, self.head_dim)
        v = self.wv(x).view(T, self.heads, -1).transpose(0, 1)
        q = apply_rope(q, cos.unsqueeze(1), sin.unsqueeze(1)).transpose(0, 1)
        k = apply_rope(k, cos.unsqueeze(1), sin.unsqueeze(1)).transpose(0, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(0, 1).reshape(T, -1))


def rope_inputs(dim: int = 32, heads: int = 4):
    hd = dim // heads

    def make(t):
        ang = torch.arange(t)[:, None] * torch.rand(hd // 2)[None, :]
        cos = torch.cos(ang).repeat_interleave(2, dim=-1)
        sin = torch.sin(ang).repeat_interleave(2, dim=-1)
        return torch.randn(t, dim), cos, sin
    return make


class LM(nn.Module):
    """Embedding, nn.RMSNorm, an attention core with a head-dim scale, tied LM head."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        scores = h @ h.transpose(-2, -1) / math.sqrt(h.size(-1))
        h = torch.softmax(scores, dim=-1) @ h
        return self.head(h), h


# ----------------------------------------------------------------------------- happy paths

def test_mlp_linear_silu():
    m = MLP()
    g = _check(m, randn("T", 16), {"x": {0: "T"}})
    assert ops(g) == ["linear", "silu", "linear"]
    assert [v.name for v in g.inputs] == ["x", "w1.weight", "w1.bias", "w2.weight"]
    assert g.params == ("w1.weight", "w1.bias", "w2.weight")
    assert g.inputs[0].type.shape[0] == sym("T")
    origins = {n.op: n.origin for n in g.nodes}
    assert origins["silu"] == ""
    assert [n.origin for n in g.nodes if n.op == "linear"] == ["w1", "w2"]
    assert [t.shape for t in param_tensors(m, g)] == [(32, 16), (32,), (16, 32)]


def test_swiglu_chunk():
    g = _check(SwiGLU(), randn("T", 16), {"x": {0: "T"}})
    assert ops(g).count("slice") == 2 and "silu" in ops(g)
    assert g.params == ("gate_up", "down")


def test_rms_norm_leaf_module():
    g = _check(NormBlock(), randn("T", 16), {"x": {0: "T"}})
    assert ops(g) == ["rms_norm", "linear", "add"]
    norm = g.nodes[0]
    assert norm.attr("eps") == 1e-6 and norm.origin == "norm"
    assert g.params == ("norm.weight", "proj.weight")


def test_rms_norm_leaf_as_root():
    g = _check(RMSNorm(16), lambda t: (torch.randn(2, t, 16),), {"x": {1: "T"}})
    assert ops(g) == ["rms_norm"] and g.nodes[0].origin == ""
    assert g.params == ("weight",)


def test_zoo_rmsnorm_and_apply_rope_if_present():
    layers = pytest.importorskip("dsr_compiler.models.layers")
    if not (hasattr(layers, "RMSNorm") and hasattr(layers, "apply_rope")):
        pytest.skip("zoo layers not written yet")

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = layers.RMSNorm(16)
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)

        def forward(self, x, cos, sin):
            h = self.norm(x).view(x.size(0), 2, 8)
            return layers.apply_rope(h, cos.unsqueeze(1), sin.unsqueeze(1))

    make = rope_inputs(16, 2)
    g = _check(Block(), make, {"x": {0: "T"}, "cos": {0: "T"}, "sin": {0: "T"}})
    assert [op for op in ops(g) if op in ("rms_norm", "rope")] == ["rms_norm", "rope"]
    assert g.params == ("norm.weight",)


def test_shape_chain_from_sizes():
    g = _check(Shapes(), randn("T", 32), {"x": {0: "T"}})
    assert {"reshape", "permute", "slice", "cat", "expand"} <= set(ops(g))
    assert any(isinstance(n.attr("shape"), tuple) and sym("T") in n.attr("shape") for n in g.nodes)


def test_pointwise_reductions_softmax():
    g = _check(Pointwise(), randn("T", 12), {"x": {0: "T"}})
    have = set(ops(g))
    assert {"const", "pow", "where", "cast", "amax", "softmax", "log_softmax", "mean", "sum", "gelu"} <= have
    casts = [n.attr("dtype").value for n in g.nodes if n.op == "cast"]
    assert casts == ["f32", "f16", "f32"]             # (x != 0).float(), then .half().float()


def test_attention_with_rope_and_causal_sdpa():
    m = Attention()
    g = _check(m, rope_inputs(), {"x": {0: "T"}, "cos": {0: "T"}, "sin": {0: "T"}})
    assert ops(g).count("rope") == 2
    att = [n for n in g.nodes if n.op == "attention"]
    assert len(att) == 1 and att[0].attr("causal") is True
    assert att[0].attr("scale") == pytest.approx(1 / math.sqrt(8))
    assert [v.name for v in g.data_inputs] == ["x", "cos", "sin"]


def test_embedding_rmsnorm_tied_head_two_outputs():
    m = LM()
    g = _check(m, lambda t: (torch.randint(0, 50, (t,)),), {"ids": {0: "T"}}, atol=1e-4)
    assert ops(g)[:2] == ["embedding", "rms_norm"]
    assert g.params == ("embed.weight", "norm.weight")          # the tied head reuses embed.weight
    assert len(g.outputs) == 2


def test_static_trace_and_graph_name():
    g = trace(MLP(), (torch.randn(3, 16),), name="mlp block")
    assert g.name == "mlp_block"
    assert g.inputs[0].type.shape == (3, 16)
    assert parse(str(g)) == g


def test_batch_and_seq_symbols_and_shared_symbol():
    class Add(nn.Module):
        def forward(self, x, y):
            return x + y

    g = trace(Add(), (torch.randn(2, 5, 4), torch.randn(2, 5, 4)),
              dynamic={"x": {0: "B", 1: "S"}, "y": {0: "B", -2: "S"}})
    assert str(g.nodes[0].out.type) == "f32[B,S,4]"
    with pytest.raises(TraceError, match="symbol S is 5"):
        trace(Add(), (torch.randn(2, 5, 4), torch.randn(2, 6, 4)), dynamic={"x": {1: "S"}, "y": {1: "S"}})


def test_static_control_flow_and_python_math_on_sizes():
    class M(nn.Module):
        def forward(self, x):
            assert x.size(-1) == 8
            if x.size(-1) % 2 == 0 and x.size(0) >= 1:          # decidable: T >= 1
                x = x * (1.0 / math.sqrt(x.size(-1)))
            return x.view(*x.shape[:-1], 2, -1).sum(-1)

    g = _check(M(), randn("T", 8), {"x": {0: "T"}})
    assert ops(g) == ["const", "mul", "reshape", "sum"]


def test_scalar_example_inputs_are_baked_in():
    class M(nn.Module):
        def forward(self, x, scale: float, bias=None):
            return x * scale if bias is None else x + bias

    g = trace(M(), (torch.randn(3, 4), 0.5))
    assert [v.name for v in g.inputs] == ["x"]
    assert g.nodes[0].attr("value") == 0.5


def test_noop_casts_and_identities_emit_nothing():
    class M(nn.Module):
        def forward(self, x):
            return x.float().contiguous().to(torch.float32).clone().detach().type_as(x).relu()

    g = trace(M(), (torch.randn(3, 4),))
    # detach is an identity in value but not in derivative: it stays as stop_gradient (which the
    # `differentiate` pass removes after using it)
    assert ops(g) == ["stop_gradient", "relu"]


def test_names_are_fx_names_and_helpers_are_suffixed():
    g = trace(MLP(), (torch.randn(3, 16),))
    g2 = trace(nn.Sequential(nn.Linear(4, 4), nn.SiLU()), (torch.randn(2, 4),))
    assert [n.out.name for n in g.nodes] == ["w1", "silu", "w2"]
    assert g2.params == ("0.weight", "0.bias")
    assert [n.origin for n in g2.nodes] == ["0", "1"]


# ----------------------------------------------------------------------------- errors

class Inner(nn.Module):
    def forward(self, x):
        return torch.cumprod(x, 0)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blk = nn.ModuleDict({"inner": Inner()})

    def forward(self, x):
        return self.blk["inner"](x) + 1


def test_unsupported_op_names_op_and_module_path():
    with pytest.raises(TraceError) as e:
        trace(Outer(), (torch.randn(4, 3),), dynamic={"x": {0: "T"}})
    text = str(e.value)
    assert "torch.cumprod" in text
    assert "blk.inner" in text and "Inner" in text
    assert re.search(r"test_frontend\.py:\d+ in forward: `[^`]*cumprod", text), text   # the user's source line
    assert "nearest of the" in text and "supported ops:" in text
    hint = text.split("supported ops:", 1)[1].split(";")[0]
    named = [n.strip() for n in hint.split(",")]
    assert len(named) == 10 and "torch.cummax" not in named           # ten names, not all ~230
    assert any(n.endswith("cumsum") for n in named), named           # the nearest by name: cumsum and kin


def test_unsupported_method_hint_names_the_nearest():
    from dsr_compiler.frontend.registry import supported_hint, supported_names
    assert len(supported_names()) > 100
    hint = supported_hint("Tensor.cosh")
    named = [n.strip() for n in hint.split("supported ops:", 1)[1].split(";")[0].split(",")]
    assert len(named) == 10 and len(set(named)) == 10


def test_tracing_records_locations_without_importing_inductor():
    """FX's own stack recording symbolizes through torch._inductor (~1.5 s of imports per process);
    the tracer records the one user frame it needs itself."""
    import subprocess
    import sys
    code = ("import sys, torch; from dsr_compiler.frontend import trace\n"
            "g = trace(torch.nn.Linear(8, 4), (torch.randn(2, 8),))\n"
            "print(sorted(m for m in sys.modules if m.startswith(('torch._inductor', 'torch._dynamo'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_unsupported_method_and_module():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.GroupNorm(2, 4)

        def forward(self, x):
            return self.ln(x)

    with pytest.raises(TraceError, match=r"unsupported module torch.nn.GroupNorm[\s\S]*`ln`"):
        trace(M(), (torch.randn(2, 4),))

    class N(nn.Module):
        def forward(self, x):
            return x.cumprod(0)

    with pytest.raises(TraceError, match=r"Tensor.cumprod"):
        trace(N(), (torch.randn(2, 4),))


def test_wrong_number_of_example_inputs():
    with pytest.raises(TraceError, match="takes 1 positional input"):
        trace(MLP(), (torch.randn(3, 16), torch.randn(3, 16)))
    with pytest.raises(TraceError, match="needs input"):
        trace(Attention(), (torch.randn(3, 32),))


def test_unsupported_dtype():
    with pytest.raises(TraceError, match=r"input `x` has unsupported dtype torch.float64"):
        trace(MLP(), (torch.randn(3, 16, dtype=torch.float64),))
    with pytest.raises(TraceError, match="unsupported dtype torch.float64"):
        class M(nn.Module):
            def forward(self, x):
                return x.double()
        trace(M(), (torch.randn(3),))


def test_sdpa_attn_mask_and_misaligned_causal():
    class Masked(nn.Module):          # attn_mask is supported (tests/models/test_layer_norm_addmm.py) ...
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)

    q = torch.randn(2, 4, 8)
    with pytest.raises(TraceError, match="attn_mask together with is_causal=True"):    # ... but not with both
        trace(Masked(), (q, q, q, torch.ones(4, 4, dtype=torch.bool)))

    class IntMask(nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(TraceError, match="attn_mask must be bool or float"):
        trace(IntMask(), (q, q, q, torch.ones(4, 4, dtype=torch.int32)))

    class Causal(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    kv = torch.randn(2, 6, 8)
    with pytest.raises(TraceError, match="top-left aligned"):
        trace(Causal(), (q, kv, kv))


def test_control_flow_on_symbolic_dim_and_on_values():
    class OnSize(nn.Module):
        def forward(self, x):
            return x * 2 if x.size(0) > 1 else x

    with pytest.raises(TraceError, match=r"symbolic size condition `T > 1`"):
        trace(OnSize(), (torch.randn(4, 3),), dynamic={"x": {0: "T"}})
    trace(OnSize(), (torch.randn(4, 3),))                # static: decided at trace time

    class OnValue(nn.Module):
        def forward(self, x):
            return x if x.sum(-1).amax(0) > 0 else -x

    with pytest.raises(TraceError, match="data-dependent"):
        trace(OnValue(), (torch.randn(4, 3),))

    class NeedsInt(nn.Module):
        def forward(self, x):
            return x * float(x.size(0))

    with pytest.raises(TraceError, match="symbolic size `T`"):
        trace(NeedsInt(), (torch.randn(4, 3),), dynamic={"x": {0: "T"}})


def test_in_place_ops_and_tensor_constants():
    class InPlace(nn.Module):
        def forward(self, x):
            return x.add_(1)

    with pytest.raises(TraceError, match="in-place op Tensor.add_"):
        trace(InPlace(), (torch.randn(3),))

    class SetItem(nn.Module):
        def forward(self, x):
            x[0] = 1.0
            return x

    with pytest.raises(TraceError, match="setitem"):
        trace(SetItem(), (torch.randn(3),))

    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.randn(3)

        def forward(self, x):
            return x + self.table

    with pytest.raises(TraceError, match="register_buffer"):
        trace(Const(), (torch.randn(3),))


def test_type_rule_rejection_names_op_and_module():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 4)

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(TraceError, match=r"op `linear` rejects its inputs[\s\S]*`proj`"):
        trace(Bad(), (torch.randn(3, 5),))


def test_unsupported_slicing_and_gelu_tanh_and_dynamic_spec():
    class SliceT(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cos", torch.randn(64, 4))

        def forward(self, x):
            return x * self.cos[: x.size(0)]

    with pytest.raises(TraceError, match="symbolic"):
        trace(SliceT(), (torch.randn(5, 4),), dynamic={"x": {0: "T"}})
    g = trace(SliceT(), (torch.randn(5, 4),))             # static: fine
    assert g.params == ("cos",)

    class Gelu(nn.Module):
        def forward(self, x):
            return F.gelu(x, approximate="sigmoid")

    with pytest.raises(TraceError, match="use 'none' or 'tanh'"):
        trace(Gelu(), (torch.randn(3),))
    with pytest.raises(TraceError, match="unknown input"):
        trace(MLP(), (torch.randn(3, 16),), dynamic={"y": {0: "T"}})
    with pytest.raises(TraceError, match="rank 2"):
        trace(MLP(), (torch.randn(3, 16),), dynamic={"x": {2: "T"}})


def test_rms_norm_eps_none():
    with pytest.raises(TraceError, match="eps=None") as e:
        trace(nn.RMSNorm(8), (torch.randn(2, 8),))
    assert "eps" in e.value.hint


def test_errors_pickle():
    import pickle
    with pytest.raises(TraceError) as e:
        trace(Outer(), (torch.randn(4, 3),))
    again = pickle.loads(pickle.dumps(e.value))
    assert str(again) == str(e.value)
