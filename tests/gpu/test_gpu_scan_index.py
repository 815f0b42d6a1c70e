"""On a real GPU: the scan (`cumsum`) and advanced-indexing (`index`) kernels vs eager PyTorch on the device
(bit for bit for integers and copies; floats within fp32 summation order)."""
import torch

import dsr_compiler as dsr


class MaskCode(torch.nn.Module):
    """What transformers' mask code is made of under torch.compile: a packed-sequence scan, position ids indexed
    by broadcast aranges, and a row gather by ids."""

    def forward(self, pos, f, h, ids):
        packed = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
        b = torch.arange(pos.shape[0], device=pos.device)[:, None, None, None]
        q = torch.arange(pos.shape[1], device=pos.device)[None, None, :, None]
        kv = torch.arange(pos.shape[1], device=pos.device)[None, None, None, :]
        return packed, f.cumsum(-1), pos[b, q] >= pos[b, kv], h[ids], h[ids, -1]


def _inputs(t: int):
    g = torch.Generator().manual_seed(t)
    pos = torch.arange(t)[None].repeat(2, 1)
    pos[1, t // 2:] -= t // 2
    return tuple(x.cuda() for x in (pos, torch.randn(3, t, generator=g), torch.randn(t, 64, generator=g).bfloat16(),
                                     torch.randint(-t, t, (5, 3), generator=g)))


def test_scan_and_index_kernels_on_cuda():
    cm = dsr.compile(MaskCode(), _inputs(64), dynamic={"pos": {1: "T"}, "f": {1: "T"}, "h": {0: "T"}}, backend="cuda")
    fams = [k.spec.family for k in cm.kernels]
    assert "cumsum" in fams and "index" in fams, fams
    for t in (1, 64, 3000):                      # 3000: three 1024-wide chunks, the carry is read twice
        x = _inputs(t)
        out, ref = cm(*x), MaskCode()(*x)
        for i in (0, 2, 3, 4):
            assert out[i].dtype == ref[i].dtype and torch.equal(out[i], ref[i]), (t, i)
        torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-4)
