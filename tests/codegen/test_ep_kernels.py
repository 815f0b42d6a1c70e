"""Expert-parallel kernel families (codegen/families/ep.py) on the Triton interpreter, and the layout
contract of ir/ops/ep.py checked on the references themselves.

`ep_route` (the send plan) must equal its reference exactly, for ids that fill a rank to capacity,
leave ranks empty, and include ids outside 0..E-1; `gather_rows` must copy rows bit for bit in
every dtype (FP8 codes included) and give zeros for -1.
"""
from __future__ import annotations

import pytest
import torch
from dsr_compiler.ir import DType, TensorType
from dsr_compiler.ir.ops.ep import ep_capacity, ep_route_ref, gather_rows_ref
from dsr_compiler.ir.types import sym
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples  # noqa: E402  per-test budget from the active profile

from tests.codegen.codegen_helpers import check_kernel, one_op_kernel

T = sym("T")


def _ids(tokens: int, k: int, n: int, el: int, mode: str, seed: int) -> torch.Tensor:
    """[T, k] distinct experts per token (as the router gives); `skew`: every token on rank 0's experts
    when k <= El; `bad`: some ids outside 0..E-1."""
    g = torch.Generator().manual_seed(seed)
    e = n * el
    if mode == "skew" and k <= el:
        ids = torch.stack([torch.randperm(el, generator=g)[:k] for _ in range(tokens)]) if tokens else \
            torch.zeros(0, k, dtype=torch.long)
    else:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)]) if tokens else \
            torch.zeros(0, k, dtype=torch.long)
    if mode == "bad" and tokens:
        ids[0, 0] = -1
        ids[-1, -1] = e + 3
    return ids.to(torch.int32)


@settings(max_examples=examples(12))
@given(n=st.sampled_from([1, 2, 4, 8]), el=st.sampled_from([1, 2, 4, 8]), k=st.integers(1, 4),
       tokens=st.integers(0, 40), mode=st.sampled_from(["random", "skew", "bad"]), seed=st.integers(0, 2**16))
def test_route_kernel_matches_reference(n, el, k, tokens, mode, seed):
    k = min(k, n * el)
    kern = one_op_kernel("ep_route", "ep_route", [("ids", TensorType(DType.i32, (T, k)))],
                         {"n_ranks": n, "local_experts": el})
    send, eid, pos, counts = check_kernel(kern, [_ids(tokens, k, n, el, mode, seed)])
    assert send.shape == (n * tokens * min(k, el),)
    assert int(counts.sum()) == int((send >= 0).sum())          # rows used per rank: what an exact exchange sends


def test_route_layout_contract():
    """The reference's layout, spelled out: per rank its slots ascending then -1 pads, the local expert
    id, and each slot's send row; rank 0 full to capacity, rank 2 empty, one slot sent nowhere."""
    n, el, k, tokens = 3, 2, 2, 3
    ids = torch.tensor([[0, 1], [1, 0], [0, 3], ], dtype=torch.int32)
    ids[2, 1] = 9                                           # outside 0..E-1: no rank
    send, eid, pos, counts = ep_route_ref(ids, n_ranks=n, local_experts=el)
    c = tokens * min(k, el)
    assert int(ep_capacity(tokens, k, el)) == c == 6
    assert send.tolist() == [0, 1, 2, 3, 4, -1] + [-1] * 6 + [-1] * 6
    assert eid.tolist() == [0, 1, 1, 0, 0, -1] + [-1] * 12
    assert pos.tolist() == [0, 1, 2, 3, 4, -1]
    assert counts.tolist() == [5, 0, 0]
    ids[2, 1] = 3
    send, eid, pos, counts = ep_route_ref(ids, n_ranks=n, local_experts=el)
    assert send[6:8].tolist() == [5, -1] and eid[6] == 1 and pos[5] == 6


@pytest.mark.parametrize("dtype", [DType.f32, DType.bf16, DType.fp8e4m3, DType.i32])
@pytest.mark.parametrize("div", [1, 4])
def test_gather_rows_copies_bits(dtype, div):
    g = torch.Generator().manual_seed(7)
    m, w = 6, 40
    src = torch.randn(m, w, generator=g) * 300
    src = src.to(torch.int32) if dtype is DType.i32 else src.to(dtype.torch)
    index = torch.tensor([0, -1, m * div - 1, 5, m * div, 2 * div + 1, -7], dtype=torch.int32)
    kern = one_op_kernel("gather_rows", "gather_rows", [("src", TensorType(dtype, (T, w))),
                                                        ("index", TensorType(DType.i32, (7,)))], {"div": div})
    from tests.codegen.codegen_helpers import run_interpreted
    (got,) = run_interpreted(kern, [src, index])
    want = gather_rows_ref(src, index, div=div)
    view = torch.uint8 if dtype.itemsize == 1 else (torch.int16 if dtype.itemsize == 2 else torch.int32)
    assert torch.equal(got.view(view), want.view(view))
    assert torch.equal(want[1].view(view), torch.zeros(w, dtype=view))            # -1: zeros
    assert torch.equal(want[0].view(view), src[0].view(view))
