"""Vocabulary-tiled loss kernels (codegen/families/vocab_loss.py) in the Triton interpreter vs the op table's
eager references (which materialize the logits), and compiled for sm_90a at DeepSeek-V3 shapes."""
from __future__ import annotations

import pytest
import torch
from dsr_compiler.codegen import (
    compile_triton,
    lower_kernel,
    render,
)
from dsr_compiler.ir import (
    OPS,
    DType,
    GraphBuilder,
    Kernel,
    Node,
    TensorType,
    Value,
    run_graph,
    sym,
    verify,
)
from dsr_compiler.ir.errors import CodegenError
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples  # noqa: E402  per-test budget from the active profile

from tests.codegen.codegen_helpers import check_kernel, run_interpreted
from tests.tolerances import assert_close

# masked-off lanes compute exp/log on the loads' `other=0`: numpy warns, harmlessly
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

T = sym("T")
f32, bf16 = DType.f32, DType.bf16


def vocab_kernel(op: str, family: str, hdt: DType, lead: tuple, h: int, v: int, temperature: float,
                 outputs: tuple[int, ...] = (0,), **attrs) -> Kernel:
    """A one-op kernel body: token_logprobs (outputs picks logp/lse) or one of its gradients."""
    b = GraphBuilder(f"k1_{family}_{op}")
    types: dict[str, TensorType] = {}

    def inp(name: str, t: TensorType) -> str:
        b.add_input(name, t)
        types[name] = t
        return name
    ins = []
    if op != "token_logprobs":
        ins.append(inp("g", TensorType(f32, lead)))
    ins += [inp("hidden", TensorType(hdt, lead + (h,))), inp("weight", TensorType(hdt, (v, h))),
            inp("ids", TensorType(DType.i64, lead))]
    if op != "token_logprobs":
        ins.append(inp("lse", TensorType(f32, lead)))
    a = {"temperature": temperature}
    outs = OPS[op].infer([types[i] for i in ins], a)
    names = ["logp", "lse_out"][:len(outs)] if op == "token_logprobs" else ["grad"]
    b.add(Node(tuple(Value(n, t) for n, t in zip(names, outs)), op, tuple(ins), a, "test"))
    g = b.build(tuple(names[i] for i in outputs))
    verify(g)
    return Kernel(b.name, family, g, attrs)


def head_inputs(lead: tuple, h: int, v: int, dt: DType, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hid = (torch.randn(*lead, h, generator=gen) * scale).to(dt.torch)
    w = (torch.randn(v, h, generator=gen) / h ** 0.5).to(dt.torch)
    ids = torch.randint(0, v, lead, generator=gen)
    return [hid, w, ids]


def check(k: Kernel, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return check_kernel(k, inputs, finite=True)


@settings(max_examples=examples(10))
@given(nt=st.integers(1, 40), h=st.sampled_from([16, 20, 48]), v=st.sampled_from([16, 17, 50, 97]),
       block_v=st.sampled_from([16, 32]), temperature=st.sampled_from([1.0, 0.7, 1.3]), seed=st.integers(0, 99))
def test_logprobs_and_grads_match_reference(nt, h, v, block_v, temperature, seed):
    """Several vocabulary / token / H tiles (V, H and NT not multiples of them), both outputs."""
    lead = (nt,)
    tiles = {"block_t": 16, "block_v": block_v, "block_k": 16, "block_h": 16}
    hid, w, ids = head_inputs(lead, h, v, f32, seed)
    _logp, lse = check(vocab_kernel("token_logprobs", "vocab_logprobs", f32, lead, h, v, temperature, (0, 1), **tiles),
                      [hid, w, ids])
    g = torch.randn(lead, generator=torch.Generator().manual_seed(seed + 1))
    g[0] = 0.0                                           # a masked-out token
    args = [g, hid, w, ids, lse]
    check(vocab_kernel("token_logprobs_grad_hidden", "vocab_grad_hidden", f32, lead, h, v, temperature, **tiles), args)
    check(vocab_kernel("token_logprobs_grad_weight", "vocab_grad_weight", f32, lead, h, v, temperature, **tiles), args)


def test_logprobs_match_autograd_of_per_token_logps():
    """The kernels' math is the derivative of the zoo's per_token_logps (not only of the op reference)."""
    from dsr_compiler.models.grpo import per_token_logps
    lead, h, v, t = (2, 5), 24, 37, 0.8
    hid, w, ids = head_inputs(lead, h, v, f32, 3)
    tiles = {"block_t": 16, "block_v": 16, "block_k": 16, "block_h": 16}
    logp, lse = run_interpreted(vocab_kernel("token_logprobs", "vocab_logprobs", f32, lead, h, v, t, (0, 1), **tiles),
                                [hid, w, ids])
    hr, wr = hid.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = per_token_logps(hr, wr, ids, t)
    g = torch.randn(lead)
    dh, dw = torch.autograd.grad((ref * g).sum(), (hr, wr))
    assert_close(logp, ref.detach())
    args = [g, hid, w, ids, lse]
    (gh,) = run_interpreted(vocab_kernel("token_logprobs_grad_hidden", "vocab_grad_hidden", f32, lead, h, v, t,
                                         **tiles), args)
    (gw,) = run_interpreted(vocab_kernel("token_logprobs_grad_weight", "vocab_grad_weight", f32, lead, h, v, t,
                                         **tiles), args)
    assert_close(gh, dh)
    assert_close(gw, dw)


def test_bf16_head():
    lead, h, v = (19,), 32, 70
    hid, w, ids = head_inputs(lead, h, v, bf16, 5)
    tiles = {"block_t": 16, "block_v": 32, "block_k": 16, "block_h": 16}
    _logp, lse = check(vocab_kernel("token_logprobs", "vocab_logprobs", bf16, lead, h, v, 1.0, (0, 1), **tiles),
                      [hid, w, ids])
    g = torch.randn(lead)
    for op, fam in (("token_logprobs_grad_hidden", "vocab_grad_hidden"),
                    ("token_logprobs_grad_weight", "vocab_grad_weight")):
        k = vocab_kernel(op, fam, bf16, lead, h, v, 1.0, **tiles)
        (got,) = run_interpreted(k, [g, hid, w, ids, lse])
        (want,) = run_graph(k.body, [g, hid, w, ids, lse])
        assert_close(got, want, torch.bfloat16)    # dlogits is rounded to bf16 for the tensor-core dot


def test_bf16_persistent_programs_loop_over_blocks_with_one_workspace_slot_each():
    """3 programs for 5 token blocks / 4 vocabulary blocks: a slot is zeroed and reused per block."""
    lead, h, v = (70,), 24, 61
    hid, w, ids = head_inputs(lead, h, v, bf16, 8)
    tiles = {"block_t": 16, "block_v": 16, "block_k": 16, "block_h": 16, "programs": 3}
    _logp, lse = run_interpreted(vocab_kernel("token_logprobs", "vocab_logprobs", bf16, lead, h, v, 1.1, (0, 1),
                                             **tiles), [hid, w, ids])
    g = torch.randn(lead)
    for op, fam in (("token_logprobs_grad_hidden", "vocab_grad_hidden"),
                    ("token_logprobs_grad_weight", "vocab_grad_weight")):
        k = vocab_kernel(op, fam, bf16, lead, h, v, 1.1, **tiles)
        spec = lower_kernel(k, 1)
        assert spec.grid == ("3",) and [a.shape for a in spec.tensor_args if a.role == "scratch"] == [("48", "24")]
        (got,) = run_interpreted(k, [g, hid, w, ids, lse])
        (want,) = run_graph(k.body, [g, hid, w, ids, lse])
        assert_close(got, want, torch.bfloat16)


def test_extreme_logits_stay_finite():
    """Logits of magnitude 1e4: the online logsumexp never exponentiates an unshifted logit."""
    lead, h, v = (9,), 16, 40
    hid, w, ids = head_inputs(lead, h, v, f32, 7)
    w = torch.sign(w) * 2500.0 / h ** 0.5 * 4          # |logit| up to ~1e4
    hid = torch.sign(hid)
    z = hid @ w.T
    assert z.abs().max() > 5e3
    tiles = {"block_t": 16, "block_v": 16, "block_k": 16, "block_h": 16}
    _logp, lse = check(vocab_kernel("token_logprobs", "vocab_logprobs", f32, lead, h, v, 1.0, (0, 1), **tiles),
                      [hid, w, ids])
    g = torch.ones(lead)
    check(vocab_kernel("token_logprobs_grad_hidden", "vocab_grad_hidden", f32, lead, h, v, 1.0, **tiles),
          [g, hid, w, ids, lse])


def test_symbolic_tokens_and_only_lse_output():
    k = vocab_kernel("token_logprobs", "vocab_logprobs", f32, (T,), 16, 33, 1.0, (1,), block_v=16)
    spec = lower_kernel(k, 1)
    assert [a.name for a in spec.scalar_args] == ["s_T"]
    assert "tl.store(logp" not in render(spec)
    for t in (1, 18):
        hid, w, ids = head_inputs((t,), 16, 33, f32, t)
        check(k, [hid, w, ids])


def test_out_of_range_id_gives_nan():
    lead, h, v = (4,), 16, 20
    hid, w, ids = head_inputs(lead, h, v, f32, 1)
    ids[2] = v + 3
    (logp,) = run_interpreted(vocab_kernel("token_logprobs", "vocab_logprobs", f32, lead, h, v, 1.0), [hid, w, ids])
    assert torch.isnan(logp[2]) and torch.isfinite(logp[[0, 1, 3]]).all()


def test_gather_kernel():
    b = GraphBuilder("k1_gather_gather")
    b.add_input("x", TensorType(f32, (T, 30)))
    b.add_input("index", TensorType(DType.i64, (T, 3)))
    b.add(Node((Value("out", TensorType(f32, (T, 3))),), "gather", ("x", "index"), {"dim": -1}, "test"))
    k = Kernel("k1_gather_gather", "gather", verify(b.build(("out",))))
    x = torch.randn(7, 30)
    idx = torch.randint(0, 30, (7, 3))
    (got,) = run_interpreted(k, [x, idx])
    assert torch.equal(got, torch.gather(x, -1, idx))


def test_bad_tiles_are_refused():
    k = vocab_kernel("token_logprobs", "vocab_logprobs", f32, (8,), 16, 33, 1.0, block_v=24)
    with pytest.raises(CodegenError, match="block_v=24 must be a power of two"):
        lower_kernel(k, 1)


@pytest.mark.parametrize("op,family", [("token_logprobs", "vocab_logprobs"),
                                       ("token_logprobs_grad_hidden", "vocab_grad_hidden"),
                                       ("token_logprobs_grad_weight", "vocab_grad_weight")])
def test_compiles_for_sm90a_at_deepseek_v3_shapes(op, family):
    """V = 129,280 (not a multiple of any tile), H = 7,168, bf16, symbolic token count: PTX and a
    cubin without spills, and no buffer but the per-token vectors and the gradients."""
    k = vocab_kernel(op, family, bf16, (T,), 7168, 129280, 0.9)
    spec = lower_kernel(k, 1)
    ck = compile_triton(spec, render(spec), target="sm_90a")
    assert ck.cubin and ".target sm_90a" in ck.ptx
    assert ck.spills == 0, ck.ptxas_log
    assert ck.shared_mem <= 228 * 1024
