"""topk / scatter(_) / one_hot along a static last dim as existing IR ops (frontend/lowerings/select.py):
DeepSeek's group-limited routing written in plain torch, vs eager, 1..13 tokens from one compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsr_compiler as dsr
from dsr_compiler.errors import TraceError


class GroupRouter(nn.Module):
    """transformers' DeepseekV3TopkRouter's selection, op for op (8 experts in 2 groups, top-2 of the kept group)."""

    def forward(self, x, b):
        s = x.sigmoid()
        sc = s + b
        gs = sc.view(-1, 2, 4).topk(2, dim=-1)[0].sum(dim=-1)
        gi = torch.topk(gs, k=1, dim=-1, sorted=False)[1]
        gm = torch.zeros_like(gs)
        gm.scatter_(1, gi, 1)
        keep = gm.unsqueeze(-1).expand(-1, 2, 4).reshape(-1, 8)
        sc = sc.masked_fill(~keep.bool(), float("-inf"))
        ids = torch.topk(sc, k=2, dim=-1, sorted=False)[1]
        return s.gather(1, ids), ids, F.one_hot(ids, num_classes=9), x.topk(3, largest=False), \
            torch.scatter(x, 1, ids, 0.5)


def test_group_limited_routing_in_plain_torch():
    m = GroupRouter()
    b = torch.randn(8) * 0.1
    cm = dsr.compile(m, (torch.randn(6, 8), b), dynamic={"x": {0: "T"}}, backend="interpret")
    for t in (1, 6, 13):
        x = torch.randn(t, 8)
        (w, ids, oh, (lv, li), sc), (rw, rids, roh, (rlv, rli), rsc) = cm(x, b), m(x, b)   # forward's nesting
        assert ids.dtype == rids.dtype == torch.int64 and oh.dtype == torch.int64
        order, rorder = ids.sort(-1), rids.sort(-1)           # sorted=False: compare as sets
        assert torch.equal(order.values, rorder.values)
        torch.testing.assert_close(w.gather(-1, order.indices), rw.gather(-1, rorder.indices))
        assert torch.equal(oh.sum(1), roh.sum(1))
        torch.testing.assert_close(lv, rlv)
        assert torch.equal(li, rli)                           # sorted (ascending for largest=False)
        torch.testing.assert_close(sc, rsc)


def test_topk_ties_take_the_lower_index_and_minus_inf_rows_stay_distinct():
    class Ties(nn.Module):
        def forward(self, x):
            return torch.topk(x, 3, dim=-1)
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [float("-inf")] * 4])
    v, i = dsr.compile(Ties(), (x,), backend="interpret")(x)
    assert i.tolist() == [[1, 2, 0], [0, 1, 2]]
    assert v[0].tolist() == [3.0, 3.0, 1.0]


@pytest.mark.parametrize("fn, match", [
    (lambda x: torch.topk(x, 2, dim=0), "only the last dim"),
    (lambda x: F.one_hot(x.long()), "needs num_classes"),
    (lambda x: x.scatter_(1, x.long(), 1.0), "did not allocate"),
])
def test_refused(fn, match):
    class M(nn.Module):
        def forward(self, x):
            return fn(x)
    with pytest.raises(TraceError, match=match):
        dsr.trace(M(), (torch.randn(4, 8),))


def test_transformers_router_without_recognition(monkeypatch):
    """With the MoE recognizers off, transformers' DeepSeek router still compiles, through these ops."""
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "thirdparty"))
    from hf_modules import build
    from dsr_compiler.frontend import context
    monkeypatch.setattr(context, "RECOGNIZERS", {})
    m, inputs, _ = build("deepseek_moe")
    gate = m.gate
    cm = dsr.compile(gate, (inputs(8)[0].view(8, -1),), dynamic={"hidden_states": {0: "T"}}, backend="interpret")
    assert "moe_router" not in [k.spec.family for k in cm.kernels]
    for t in (1, 5):
        x = inputs(t, seed=t)[0].view(t, -1)
        with torch.no_grad():
            logits, w, ids = gate(x)
        cl, cw, cids = cm(x)
        torch.testing.assert_close(cl, logits)
        o, co = ids.sort(-1), cids.sort(-1)
        assert torch.equal(o.values, co.values)
        torch.testing.assert_close(cw.gather(-1, co.indices), w.gather(-1, o.indices))


class Scans(nn.Module):
    """transformers' packed-sequence scan and friends: cumsum of bool / int / float along the last dim."""

    def forward(self, pos, f, h):
        packed = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
        return packed, pos.cumsum(dim=1), torch.cumsum(f, -1), h.cumsum(-1), torch.cumsum(pos, -1, dtype=torch.float32)


@pytest.mark.parametrize("t", [1, 7, 1500])          # 1500: two 1024-wide chunks, the carry between them is read
def test_cumsum_matches_torch(t):
    g = torch.Generator().manual_seed(t)

    def inputs(n: int):
        pos = torch.arange(n, dtype=torch.int32)[None].repeat(2, 1)
        pos[1, n // 2:] -= n // 2                                # a second packed sequence in row 1
        return (pos, torch.randn(2, 3, n, generator=g), torch.randn(2, n, generator=g).bfloat16())
    cm = dsr.compile(Scans(), inputs(8), dynamic={"pos": {1: "T"}, "f": {2: "T"}, "h": {1: "T"}}, backend="interpret")
    x = inputs(t)
    out, ref = cm(*x), Scans()(*x)
    for i in (0, 1):                                           # integers: exact, int64 as torch gives them
        assert out[i].dtype == ref[i].dtype == torch.int64 and torch.equal(out[i], ref[i]), i
    assert (ref[0][1, t // 2:] == (1 if t > 1 else 0)).all() or t == 1
    torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=1e-5 * t ** 0.5)
    assert out[3].dtype == torch.bfloat16                      # fp32 accumulation, rounded once per position
    torch.testing.assert_close(out[3].float(), torch.cumsum(x[2].float(), -1).bfloat16().float(), rtol=0, atol=0)
    torch.testing.assert_close(out[4], ref[4])
    assert "cumsum" in [k.spec.family for k in cm.kernels]


def test_cumsum_along_another_dim_is_refused():
    class M(nn.Module):
        def forward(self, x):
            return x.cumsum(0)
    with pytest.raises(TraceError) as e:
        dsr.compile(M(), (torch.randn(4, 3),), backend="interpret")
    assert "cumsum along dim 0" in str(e.value) and "movedim" in str(e.value)


class Sorts(nn.Module):
    def forward(self, x):
        v, i = x.sort(dim=-1)
        dv, di = torch.sort(x, descending=True, stable=True)
        return v, i, dv, di, x.argsort(-1, descending=True)


def test_sort_matches_torch_stable_sort():
    """sort / argsort along a static last dim (<= 64): values and int64 indices as torch's stable sort, ties
    (rounded scores repeat) in their original order, 1..9 rows from one compile."""
    def inputs(t: int):
        return (torch.randint(-3, 4, (t, 2, 6), generator=torch.Generator().manual_seed(t)).float() / 2,)
    cm = dsr.compile(Sorts(), inputs(4), dynamic={"x": {0: "T"}}, backend="interpret")
    for t in (1, 4, 9):
        x = inputs(t)[0]
        v, i, dv, di, ai = cm(x)
        rv, ri = torch.sort(x, dim=-1, stable=True)
        rdv, rdi = torch.sort(x, dim=-1, descending=True, stable=True)
        assert torch.equal(v, rv) and torch.equal(i, ri) and i.dtype == torch.int64
        assert torch.equal(dv, rdv) and torch.equal(di, rdi) and torch.equal(ai, rdi)


def test_sort_of_a_wide_dim_is_refused():
    class M(nn.Module):
        def forward(self, x):
            return x.sort()[0]
    with pytest.raises(TraceError) as e:
        dsr.compile(M(), (torch.randn(2, 65),), backend="interpret")
    assert "sort along a dim of 65 elements: at most 64" in str(e.value)
