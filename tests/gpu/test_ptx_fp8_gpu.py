"""GPU checks of the FP8 recipe and of the direct PTX backend (marked `gpu`; skipped without CUDA).

* every PTX-template kernel (pointwise, RMSNorm, fused RMSNorm + 1x128 quant, bare quant, dequant)
  against its Triton twin built from the same KernelSpec, launched with the same arguments and grid
  (PTX through the CUDA driver API, runtime/cuda_driver.py; needs cuda-python);
* gemm_fp8 on fp8 tensor cores vs an fp32 GEMM of the dequantized operands (calc_diff <= 1e-3) and
  vs its reference (one bf16 rounding apart);
* quantization codes on the GPU bit for bit against torch's own cast;
* the FP8 MLP block on the `cuda` backend vs eager ("fp8") and vs the simulated recipe ("fp8_sim"),
  with and without PTX kernels.
Bounds are those of tests/codegen/test_fp8_families.py and dsr_compiler/tolerance.py.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from dsr_compiler.codegen import launch_args, load_jit, lower_kernel, render  # noqa: E402
from dsr_compiler.ir import (  # noqa: E402
    DType,
    GraphBuilder,
    Kernel,
    Node,
    TensorType,
    Value,
    run_graph,
    verify,
)
from dsr_compiler.ir.interp import bind_symbols  # noqa: E402
from dsr_compiler.ir.ops import OPS  # noqa: E402
from dsr_compiler.ir.ops.fp8 import (  # noqa: E402
    calc_diff,
    dequant_fp8_ref,
    dequant_weight_ref,
    quant_fp8_ref,
    quant_weight_ref,
)

F32, BF16, F8 = DType.f32, DType.bf16, DType.fp8e4m3


def _kernel(name: str, family: str, inputs: list[tuple[str, DType, tuple]], ops: list[tuple], outputs) -> Kernel:
    b = GraphBuilder(name)
    types: dict[str, TensorType] = {}
    for n, dt, shape in inputs:
        types[n] = TensorType(dt, shape)
        b.add_input(n, types[n])
    for outs, op, ins, attrs in ops:
        ts = OPS[op].infer([types[i] for i in ins], attrs)
        b.add(Node(tuple(Value(o, t) for o, t in zip(outs, ts)), op, ins, attrs))
        types.update(zip(outs, ts))
    g = b.build(outputs)
    verify(g)
    return Kernel(name, family, g)


def _launch(k: Kernel, inputs: list[torch.Tensor], backend: str) -> list[torch.Tensor]:
    spec = lower_kernel(k, 1)
    if backend == "ptx":
        pytest.importorskip("cuda.bindings", reason="PTX launches need cuda-python")
        from dsr_compiler.codegen.ptx import compile_ptx_kernel
        from dsr_compiler.runtime.cuda_driver import load_ptx_kernel
        fn, kw = load_ptx_kernel(compile_ptx_kernel(spec), spec), {}
    else:
        fn, kw = load_jit(spec, render(spec)), {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    env = bind_symbols([v.type for v in k.body.inputs], inputs)
    vals = k.body.values()
    outs = [torch.full(vals[o].type.concrete_shape(env), float("nan"), device="cuda").to(vals[o].type.dtype.torch)
            for o in k.body.outputs]
    bufs = {v.name: x for v, x in zip(k.body.inputs, inputs)}
    bufs.update(zip(k.body.outputs, outs))
    grid, args = launch_args(spec, bufs, {s.name: v for s, v in env.items()})
    fn[grid](*args, **kw)
    torch.cuda.synchronize()
    return [o.cpu() for o in outs]


def _norm_quant(K: int, dt: DType, scale_fmt=None) -> Kernel:
    return _kernel("k1_quant_fp8_rms_norm", "quant_fp8",
                   [("x", dt, ("T", K)), ("r", dt, ("T", K)), ("w", dt, (K,))],
                   [(("h",), "add", ("x", "r"), {}), (("n",), "rms_norm", ("h", "w"), {"eps": 1e-6}),
                    (("n.q", "n.s"), "quant_fp8", ("n",), {"scale_fmt": scale_fmt})],
                   ("n.q", "n.s", "h", "n"))


def _codes_close(a: torch.Tensor, b: torch.Tensor, frac: float) -> None:
    d = (a.view(torch.uint8).int() - b.view(torch.uint8).int()).abs()
    assert int(d.max()) <= 1 and float((d != 0).float().mean()) <= frac


@pytest.mark.parametrize("K,dt,fmt", [(7168, BF16, None), (384, F32, "ue8m0"), (200, BF16, None)])
def test_ptx_norm_quant_matches_triton_twin(K, dt, fmt):
    g = torch.Generator().manual_seed(K)
    ins = [torch.randn(37, K, generator=g).to(dt.torch).cuda(), torch.randn(37, K, generator=g).to(dt.torch).cuda(),
           (1 + 0.1 * torch.randn(K, generator=g)).to(dt.torch).cuda()]
    k = _norm_quant(K, dt, fmt)
    tri, ptx = _launch(k, ins, "triton"), _launch(k, ins, "ptx")
    ref = run_graph(k.body, [x.cpu() for x in ins])
    for got in (tri, ptx):
        _codes_close(got[0], ref[0], 0.08)
        torch.testing.assert_close(got[1], ref[1], rtol=2 ** -7, atol=0.0)
        torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=0, atol=0)        # h = x + r, one rounding
        torch.testing.assert_close(got[3].float(), ref[3].float(), rtol=2e-2, atol=1e-5)
    _codes_close(ptx[0], tri[0], 0.01)


@pytest.mark.parametrize("K", [256, 320])
def test_bare_quant_codes_bit_exact_on_gpu(K):
    x = torch.randn(65, K) * torch.exp2(torch.randint(-20, 20, (65, K)).float())
    x[:, 5] = 1e30
    x[3] = 0.0
    k = _kernel("k1_quant_fp8_act", "quant_fp8", [("x", F32, ("T", K))], [(("q", "s"), "quant_fp8", ("x",), {})],
                ("q", "s"))
    q, s = quant_fp8_ref(x)
    for be in ("triton", "ptx"):
        got = _launch(k, [x.cuda()], be)
        assert torch.equal(got[0].view(torch.uint8), q.view(torch.uint8)), be
        assert torch.equal(got[1], s), be


def test_quant_codes_equal_torch_cast_at_every_rounding_edge_on_gpu():
    """The interpreter tests' edge set (tests/codegen/test_fp8_exact.py) on the GPU, Triton and PTX:
    every e4m3 value, each tie between neighbours and the floats next to both, in tiles whose 448
    makes the scale exactly 1, so every code is torch's own cast of the value."""
    grid = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    pts = torch.cat([grid, (grid[1:] + grid[:-1]) / 2])
    inf = torch.tensor(float("inf"))
    vals = torch.cat([pts, torch.nextafter(pts, inf), torch.nextafter(pts, -inf)])
    vals = vals[vals.abs() <= 448]
    vals = torch.cat([vals, -vals])
    per = 127
    n_tiles = -(-vals.numel() // per)
    body = torch.zeros(n_tiles * per)
    body[: vals.numel()] = vals
    x = torch.cat([torch.full((n_tiles, 1), 448.0), body.view(n_tiles, per)], dim=1).contiguous()
    k = _kernel("k1_quant_fp8_act", "quant_fp8", [("x", F32, ("T", 128))], [(("q", "s"), "quant_fp8", ("x",), {})],
                ("q", "s"))
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    for be in ("triton", "ptx"):
        q, s = _launch(k, [x.cuda()], be)
        assert torch.equal(s, torch.ones_like(s)), be
        assert torch.equal(q.view(torch.uint8), want), be


@pytest.mark.parametrize("out", [F32, BF16])
def test_dequant_ptx_vs_triton(out):
    q, s = quant_fp8_ref(torch.randn(9, 384) * 30)
    k = _kernel("k1_quant_fp8_dequant", "quant_fp8", [("q", F8, ("T", 384)), ("s", F32, ("T", 3))],
                [(("y",), "dequant_fp8", ("q", "s"), {"out_dtype": out})], ("y",))
    want = dequant_fp8_ref(q, s, out_dtype=out)
    for be in ("triton", "ptx"):
        (got,) = _launch(k, [q.cuda(), s.cuda()], be)
        assert torch.equal(got, want), be


def test_ptx_pointwise_and_rms_norm_vs_triton_twin():
    pw = _kernel("k1_pointwise_silu", "pointwise", [("x", BF16, ("T", 4, 64)), ("b", F32, (64,))],
                 [(("a",), "add", ("x", "b"), {}), (("s",), "silu", ("a",), {}),
                  (("c",), "cast", ("s",), {"dtype": BF16})], ("c", "s"))
    x, b = torch.randn(33, 4, 64).bfloat16().cuda(), torch.randn(64).cuda()
    for got_t, got_p in zip(_launch(pw, [x, b], "triton"), _launch(pw, [x, b], "ptx")):
        torch.testing.assert_close(got_p.float(), got_t.float(), rtol=1e-5, atol=1e-6)
    rms = _kernel("k1_reduction_rms_norm", "reduction", [("x", BF16, ("T", 2048)), ("w", BF16, (2048,))],
                  [(("y",), "rms_norm", ("x", "w"), {"eps": 1e-6})], ("y",))
    x, w = torch.randn(17, 2048).bfloat16().cuda(), torch.rand(2048).bfloat16().cuda()
    (t,), (p,) = _launch(rms, [x, w], "triton"), _launch(rms, [x, w], "ptx")
    torch.testing.assert_close(p.float(), t.float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("M,K,N", [(1, 7168, 2048), (300, 2048, 7168), (64, 512, 300)])
def test_gemm_fp8_on_tensor_cores(M, K, N):
    g = torch.Generator().manual_seed(M)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5
    xq, xs = quant_fp8_ref(x)
    wq, ws = quant_weight_ref(w)
    k = _kernel("k1_gemm_fp8_test", "gemm_fp8",
                [("xq", F8, ("T", K)), ("xs", F32, ("T", K // 128)), ("wq", F8, (N, K)), ("ws", F32, ws.shape)],
                [(("y",), "gemm_fp8", ("xq", "xs", "wq", "ws"), {})], ("y",))
    (y,) = _launch(k, [xq.cuda(), xs.cuda(), wq.cuda(), ws.cuda()], "triton")
    fp32 = dequant_fp8_ref(xq, xs) @ dequant_weight_ref(wq, ws).T
    assert calc_diff(y.float(), fp32) <= 1e-3
    (ref,) = run_graph(k.body, [xq, xs, wq, ws])
    torch.testing.assert_close(y.float(), ref.float(), rtol=2 ** -7, atol=1e-4)


@pytest.mark.parametrize("ptx", [(), ("quant_fp8", "reduction", "pointwise")])
def test_fp8_mlp_on_cuda_backend(ptx):
    if ptx:
        pytest.importorskip("cuda.bindings", reason="PTX launches need cuda-python")
    import dsr_compiler as dsr
    from dsr_compiler.models import ModelConfig
    from dsr_compiler.tolerance import compare_fp8
    from dsr_compiler.workloads import build
    wl = build(ModelConfig.named("deepseek-v3-tiny"), "mlp", 1, 64, "bf16")
    cm = dsr.compile(wl.module, wl.example_inputs, fp8=True, backend="cuda", dynamic=wl.dynamic, name="mlp",
                     ptx_families=ptx)
    x = wl.make_inputs(200, 1)[0]
    with torch.no_grad():
        y = cm(x.cuda()).cpu()
        eager = wl.module(x)
        pre = next(r.graph for r in cm.passes if r.name == "quantize_fp8")
        (sim,) = run_graph(pre, [x] + [p.cpu() for p in cm.params])
    assert compare_fp8(y, eager, "fp8")["ok"]
    assert compare_fp8(y, sim, "fp8_sim")["ok"]


def test_fp8_moe_grouped_gemms_on_cuda_backend():
    import dsr_compiler as dsr
    from dsr_compiler.models import ModelConfig
    from dsr_compiler.tolerance import compare_fp8
    from dsr_compiler.workloads import build
    wl = build(ModelConfig.named("deepseek-v3-tiny"), "moe", 1, 64, "bf16")
    cm = dsr.compile(wl.module, wl.example_inputs, fp8=True, backend="cuda", dynamic=wl.dynamic, name="moe")
    assert sum(k.spec.family == "moe_gemm_fp8" for k in cm.kernels) == 2
    x = wl.make_inputs(300, 1)[0]
    with torch.no_grad():
        y = cm(x.cuda()).cpu()
        eager = wl.module(x)
        pre = next(r.graph for r in cm.passes if r.name == "quantize_fp8")
        (sim,) = run_graph(pre, [x] + [p.cpu() for p in cm.params])
    assert compare_fp8(y, eager, "fp8")["ok"]
    assert compare_fp8(y, sim, "fp8_sim")["ok"]
