"""Property tests of the `cumsum` and `index` kernels against torch (hypothesis: shapes, dtypes, chunk
boundaries, negative and out-of-order indices). Integers and copies bit for bit; floats within fp32 summation
order. `make fuzz` runs many more examples."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import dsr_compiler as dsr

DTYPES = {"bool": torch.bool, "i32": torch.int32, "f32": torch.float32, "bf16": torch.bfloat16}


class CumsumLast(nn.Module):
    def forward(self, x):
        return x.cumsum(-1)


@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), n=st.sampled_from([1, 5, 1023, 1024, 1025, 2100]),
       dt=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16))
def test_cumsum_kernel_matches_torch(lead, n, dt, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, n)
    x = torch.randn(shape, generator=g)
    x = (x > 0) if dt == "bool" else (x * 8).to(DTYPES[dt]) if dt == "i32" else x.to(DTYPES[dt])
    cm = dsr.compile(CumsumLast(), (x,), backend="interpret")
    out = cm(x)
    if dt in ("bool", "i32"):
        assert out.dtype == torch.int64 and torch.equal(out, x.cumsum(-1))
    else:                       # fp32 accumulation, rounded once per position to the input dtype
        ref = torch.cumsum(x.float(), -1)
        assert out.dtype == x.dtype
        torch.testing.assert_close(out.float(), ref.to(x.dtype).float(), rtol=1e-5, atol=1e-5 * n ** 0.5)


class Take(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x, i, j):
        return x[i] if self.k == 1 else x[i, j]


@given(k=st.integers(1, 2), rows=st.integers(1, 9), cols=st.integers(1, 6), width=st.integers(1, 5),
       ishape=st.lists(st.integers(1, 4), min_size=1, max_size=3), dt=st.sampled_from(sorted(DTYPES)),
       seed=st.integers(0, 2**16))
def test_index_kernel_matches_torch(k, rows, cols, width, ishape, dt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, width, generator=g)
    x = (x > 0) if dt == "bool" else x.to(DTYPES[dt])
    i = torch.randint(-rows, rows, tuple(ishape), generator=g)
    j = torch.randint(-cols, cols, tuple(ishape[-1:]), generator=g).int()      # broadcasts against i
    cm = dsr.compile(Take(k), (x, i, j), backend="interpret")
    out, ref = cm(x, i, j), Take(k)(x, i, j)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
