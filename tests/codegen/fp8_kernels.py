"""Production `quant_fp8` family kernels (codegen/fp8_rows.py, templates/quant_fp8_rows.*.j2) built by
hand for the FP8 exactness and compile tests, and run under the Triton interpreter."""
from __future__ import annotations

import torch
from codegen_helpers import run_interpreted
from dsr_compiler.codegen import lower_kernel, render
from dsr_compiler.codegen.spec import KernelSpec
from dsr_compiler.ir import DType, GraphBuilder, Kernel, Node, TensorType, Value, verify
from dsr_compiler.ir.ops import OPS

F32, BF16, F8 = DType.f32, DType.bf16, DType.fp8e4m3
DTYPES = {torch.float32: F32, torch.bfloat16: BF16}


def _kernel(name: str, inputs: list[tuple[str, DType, tuple]], op: str, attrs: dict,
            outs: tuple[str, ...]) -> Kernel:
    b = GraphBuilder(name)
    types = {}
    for n, dt, shape in inputs:
        types[n] = TensorType(dt, shape)
        b.add_input(n, types[n])
    ts = OPS[op].infer([types[n] for n, _, _ in inputs], attrs)
    b.add(Node(tuple(Value(o, t) for o, t in zip(outs, ts)), op, tuple(n for n, _, _ in inputs), attrs,
               origin=f"test.{op}"))
    g = b.build(outs)
    verify(g)
    return Kernel(name, "quant_fp8", g)


def quant_kernel(K: int, dtype: DType = F32, scale_fmt: str | None = None) -> Kernel:
    """x [T, K] -> (codes fp8e4m3 [T, K], scales f32 [T, ceil(K/128)]): the bare 1x128 quantization."""
    attrs = {"scale_fmt": scale_fmt} if scale_fmt else {}
    return _kernel("k1_quant_fp8_act", [("x", dtype, ("T", K))], "quant_fp8", attrs, ("q", "s"))


def dequant_kernel(K: int, out: DType = F32) -> Kernel:
    """(codes, scales) -> values in `out`: the inverse kernel of the family."""
    return _kernel("k1_quant_fp8_dequant", [("q", F8, ("T", K)), ("s", F32, ("T", -(-K // 128)))],
                   "dequant_fp8", {"out_dtype": out}, ("y",))


def quant_spec(K: int, dtype: DType = F32, scale_fmt: str | None = None) -> KernelSpec:
    return lower_kernel(quant_kernel(K, dtype, scale_fmt), 1)


def quant(x: torch.Tensor, scale_fmt: str | None = None, source: str | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the production quant kernel (or `source`, a variant of its rendered source) on CPU tensors."""
    k = quant_kernel(x.shape[-1], DTYPES[x.dtype], scale_fmt)
    spec = lower_kernel(k, 1)
    q, s = run_interpreted(k, [x], spec, source=source)
    return q, s


def dequant(q: torch.Tensor, s: torch.Tensor, out: DType = F32) -> torch.Tensor:
    (y,) = run_interpreted(dequant_kernel(q.shape[-1], out), [q, s])
    return y


def rendered_quant(K: int, dtype: DType = F32, scale_fmt: str | None = None) -> str:
    return render(quant_spec(K, dtype, scale_fmt))
