"""Golden snapshots: the rendered source of one representative kernel per family, byte for byte.

Every kernel family that the tiny zoo plans produce is rendered (Triton, and PTX for the PTX
families) from the fused graphs of a fixed list of workloads; the first kernel of each family (in
that order) is compared with `tests/codegen/golden/<family>.py.golden` (and `<family>.ptx.golden`). A template or
lowering change then shows up in review as a diff of these files. Refresh after an intended change:

    DSR_UPDATE_GOLDEN=1 python -m pytest -q tests/codegen/test_golden.py

Only lowering and rendering run here (no Triton compile, no ptxas): a few seconds.
"""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from dsr_compiler.ep import EpPlan

GOLDEN = Path(__file__).parent / "golden"
# (module, fp8, phase, mla): the plans whose kernels cover every family, cheapest first.
PLANS = (
    ("mlp", False, None, "absorb"),
    ("mlp", True, None, "absorb"),
    ("moe", False, None, "absorb"),
    ("moe", True, None, "absorb"),
    ("mla", False, "decode", "absorb"),
    ("mla", False, "prefill", "absorb"),
    ("grpo", False, None, "absorb"),
)


class _Gather(torch.nn.Module):
    """A plain torch.gather whose source is read elsewhere too: stays a `gather` kernel."""

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.gather(x, -1, idx), x * 2.0


class _Cumsum(torch.nn.Module):
    """transformers' packed-sequence scan: a cumsum of a bool mask along a symbolic dim."""

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return (pos != 1).cumsum(-1)


class _Index(torch.nn.Module):
    """Advanced indexing of a symbolic-length table by a tensor and an int: the `index` op."""

    def forward(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return h[ids, 1]


def _graphs():
    """(graph, grad_wrt) of every plan, then the dense attention example, a plain gather and a cumsum."""
    import dsr_compiler as dsr
    from dsr_compiler.models import ModelConfig
    from dsr_compiler.workloads import build
    cfg = ModelConfig.named("deepseek-v3-tiny")
    for module, fp8, phase, mla in PLANS:
        wl = build(cfg, module, 1, 8, "f32", 0, phase=phase)
        yield dsr.trace(wl.module, wl.example_inputs, dynamic=wl.dynamic, name=wl.name), fp8, mla, wl.grad_wrt, None
    sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
    try:
        from dense_attention import DYNAMIC, DenseAttentionBlock, init_weights
    finally:
        sys.path.pop(0)
    from dsr_compiler.models.layers import precompute_rope
    block = init_weights(DenseAttentionBlock(64, 2, 32), 0).eval()
    cos, sin = precompute_rope(32, 10000.0, 8)
    yield dsr.trace(block, (torch.randn(1, 8, 64), cos, sin), dynamic=DYNAMIC, name="dense_attention"), False, "absorb", \
        (), None
    yield (dsr.trace(_Gather(), (torch.randn(4, 16), torch.zeros(4, 3, dtype=torch.int64)),
                     dynamic={"x": {0: "T"}, "idx": {0: "T"}}, name="gather"), False, "absorb", (), None)
    yield (dsr.trace(_Cumsum(), (torch.zeros(1, 8, dtype=torch.int64),), dynamic={"pos": {1: "T"}}, name="cumsum"),
           False, "absorb", (), None)
    yield (dsr.trace(_Index(), (torch.randn(8, 3, 4), torch.zeros(2, 5, dtype=torch.int64)), dynamic={"h": {0: "T"}},
                     name="index"), False, "absorb", (), None)
    wl = build(cfg, "moe", 1, 8, "f32", 0)          # expert parallelism: rank 1 of 2 (ep_route, gather_rows)
    yield (dsr.trace(wl.module, wl.example_inputs, dynamic=wl.dynamic, name="moe_ep"), True, "absorb", (),
           EpPlan(2, 1))


@lru_cache(maxsize=1)
def representative_kernels() -> dict[str, object]:
    """family -> KernelSpec of its first kernel over PLANS (then the dense attention block, a gather and an
    expert-parallel MoE)."""
    from dsr_compiler import ep as ep_mod
    from dsr_compiler.codegen.lower import lower_kernel
    from dsr_compiler.ir.passes import PIPELINE, Fp8Policy, PassContext, run_passes
    out: dict[str, object] = {}
    for g, fp8, mla, grad_wrt, ep in _graphs():
        opts = {"fp8": Fp8Policy.from_option(fp8) or False, "mla": mla}
        if grad_wrt:
            opts["grad_wrt"] = tuple(grad_wrt)
        info = ep_mod.resolve(ep)
        if info is not None:
            opts["ep"] = info.pass_option()
        final = run_passes(g, ep_mod.pipeline(list(PIPELINE), info), PassContext(options=opts))[-1].graph
        for i, k in enumerate(final.kernels, start=1):
            if k.family not in out:
                out[k.family] = lower_kernel(k, i)
    return out


def _check(path: Path, text: str) -> None:
    if os.environ.get("DSR_UPDATE_GOLDEN") == "1":
        path.write_text(text)
        return
    assert path.exists(), f"no golden file {path.name}: run with DSR_UPDATE_GOLDEN=1 to create it"
    expected = path.read_text()
    if text != expected:
        import difflib
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True), text.splitlines(keepends=True),
                                            fromfile=f"golden/{path.name}", tofile="rendered", n=2))
        pytest.fail(f"rendered source of {path.name} changed (DSR_UPDATE_GOLDEN=1 refreshes it if intended):\n"
                    + diff[:4000])


def test_every_family_has_a_representative():
    from dsr_compiler.codegen.families import FAMILY_NAMES
    missing = sorted(set(FAMILY_NAMES) - set(representative_kernels()))
    assert missing == [], f"families without a golden kernel: {missing}"


def test_triton_sources_match_golden():
    from dsr_compiler.codegen.render import render
    for family, spec in sorted(representative_kernels().items()):
        _check(GOLDEN / f"{family}.py.golden", render(spec))


def test_ptx_sources_match_golden():
    from dsr_compiler.codegen.ptx import PTX_FAMILIES, PtxUnsupported, render_ptx
    for family in PTX_FAMILIES:
        spec = representative_kernels().get(family)
        if spec is None:
            continue
        try:
            text = render_ptx(spec)
        except PtxUnsupported:
            continue
        _check(GOLDEN / f"{family}.ptx.golden", text)
