"""Kernel family `moe_gemm_fp8`: FP8 grouped GEMMs of the routed experts (ir/ops/moe.py).

Where it sits: one record of codegen/families/ (`MOE_GEMM_FP8_FAMILY`); the fusion pass gives each op its own
kernel (family = the op's kind). Same program layout as families/moe.py's grouped GEMMs (one
program per (BM-row block of the expert-sorted layout, BN-column tile); every row of a block
belongs to expert blk[b]; unused blocks skip their K loop) with the FP8 numerics of
families/gemm_fp8.py: BLOCK_K is the 128-wide scale block, each K step's fp32 partial product is
scaled by sA[row, kb] * sB[e, n // 128, kb] and added; fp8 dots on the GPU, exact fp32 dots of
the decoded tiles under the interpreter. gate_up ends with SwiGLU and the 1x128 quant epilogue
(BLOCK_N = 128, so a program owns whole scale tiles); down multiplies by the routing weight and
scatters rows to their slots.
"""
from __future__ import annotations

import sympy
from dsr_compiler.ir.graph import Kernel
from dsr_compiler.ir.types import DType

from ..lower_common import arg_names, attr_int, fail
from ..spec import KernelSpec
from ..views import ScalarPool
from .moe import moe_spec, out_ptr, static_dim, the_moe_op
from .record import KernelFamily


def lower_moe_gemm_fp8(k: Kernel, index: int) -> KernelSpec:
    n = the_moe_op(k, ("moe_gemm_gate_up_fp8", "moe_gemm_down_fp8"))
    vals = k.body.values()
    names = arg_names(k.body)
    gate_up = n.op == "moe_gemm_gate_up_fp8"
    a_t, _, rows_t, blocks_t, w_t = (vals[i].type for i in n.inputs[:5])
    bm, block = n.attr("block_m"), n.attr("block", 128)
    if bm < 16 or bm & (bm - 1):
        raise fail(k, f"block_m={bm} must be a power of two >= 16 (a tl.dot tile)", n)
    e = static_dim(k, n, w_t.shape[0], "the expert count")
    kd = static_dim(k, n, a_t.shape[1], "the reduction dim")
    width = static_dim(k, n, w_t.shape[1], "the weight rows")
    nn_ = width // 2 if gate_up else width
    nkb = -(-kd // block)
    pool = ScalarPool()
    bn = block if gate_up else attr_int(k, "block_n", 128)
    rows = rows_t.shape[0]
    round_to = ""
    if gate_up:
        round_to = {DType.bf16: "bf16", DType.f16: "f16"}.get(n.attr("out_dtype", DType.bf16), "")
    params = (
        ("MODE", "gate_up" if gate_up else "down"), ("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK", block),
        ("N", nn_), ("KD", kd), ("NKB", nkb), ("R", pool.lit(rows)), ("EVEN_K", kd % block == 0),
        ("TOPK", n.attr("topk") if gate_up else 0), ("W_ESTRIDE", width * kd),
        ("WS_ESTRIDE", -(-width // block) * nkb), ("UP_OFF", nn_ * kd if gate_up else 0),
        ("UP_SOFF", (nn_ // block) * nkb if gate_up else 0), ("ROUND", round_to),
        ("Q_UE8M0", n.attr("scale_fmt") == "ue8m0"),
        ("A", names[("in", n.inputs[0])]), ("AS", names[("in", n.inputs[1])]),
        ("ROWS", names[("in", n.inputs[2])]), ("BLK", names[("in", n.inputs[3])]),
        ("W", names[("in", n.inputs[4])]), ("WS", names[("in", n.inputs[5])]),
        ("WTS", "" if gate_up else names[("in", n.inputs[6])]),
        ("OUT", out_ptr(k, n, 0)), ("S_OUT", out_ptr(k, n, 1) if gate_up else ""), ("NSB", nn_ // block),
    )
    if not out_ptr(k, n, 0):
        raise fail(k, f"{n.op} must return its output", n)
    slots = rows - e * (bm - 1)                 # T*k: the rows that hold real work
    flops = 2 * slots * width * kd + slots * nn_ * (9 if gate_up else 2)
    layout = 4 * (rows + blocks_t.shape[0])
    # modeled DRAM traffic: the real rows, fp8 codes + scales, and only the experts that can be hit
    w_bytes = sympy.Min(e, slots) * (width * kd + 4 * (-(-width // block)) * nkb)
    if gate_up:
        traffic = (slots * (kd + 4 * nkb) + w_bytes + layout, rows * (nn_ + 4 * (nn_ // block)))
    else:
        traffic = (slots * (kd + 4 * nkb + 4) + w_bytes + layout, slots * nn_ * 4)
    grid = blocks_t.shape[0] * ((nn_ + bn - 1) // bn)
    return moe_spec(k, index, "moe_gemm_fp8.py.j2", pool, grid, params, attr_int(k, "num_warps", 8),
                    attr_int(k, "num_stages", 3), flops, traffic)


MOE_GEMM_FP8_FAMILY = KernelFamily("moe_gemm_fp8", lower=lower_moe_gemm_fp8, template="moe_gemm_fp8.py.j2",
                                   peak="fp8")

__all__ = ["MOE_GEMM_FP8_FAMILY", "lower_moe_gemm_fp8"]
