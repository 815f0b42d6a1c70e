"""Expert parallelism over torch.distributed (gloo, interpreter), 2 and 4 local processes.

Each rank compiles the zoo MoE with `ep=N` and runs its own tokens; the output must be bitwise equal
to the single-process compiled MoE on the same tokens (the expert_parallel pass keeps every value a
row meets) and within the tolerance table of eager PyTorch (f32; FP8: the FP8-recipe eager). Also:
routing skewed onto one rank, zero tokens, both ep_modes (fixed capacity and exact size), no host sync
(fixed), ranks calling with different token counts,
and a rank that dies (a clear error on the others, not a hang). Workers: ep_workers.py.
"""
from __future__ import annotations

import time

import pytest

import dsr_compiler as dsr
from dsr_compiler.ep import EpPlan
from dsr_compiler.models import ModelConfig
from dsr_compiler.workloads import build
from ep_harness import run_ranks

pytestmark = pytest.mark.dist
CFG = ModelConfig.named("deepseek-v3-tiny")


def _warm(n: int, fp8: bool, modes: tuple[str, ...] = ("fixed",)) -> None:
    """Compile rank 0's plans here first: the ranks then share the kernel cache instead of compiling at once."""
    wl = build(CFG, "moe", 1, 8, "f32", 0)
    for mode in modes:
        dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, fp8=fp8, backend="interpret", ep=EpPlan(n, 0),
                    ep_mode=mode)
    dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, fp8=fp8, backend="interpret")


def _check(res: dict[int, dict], n: int, modes: tuple[str, ...], counts: tuple[int, ...], skew: bool) -> None:
    el = CFG.n_routed_experts // n
    for r, out in res.items():
        for mode in modes:
            assert out[f"{mode} params"] == {"experts.w13.local": (el, 2 * CFG.moe_intermediate_size, CFG.hidden_size),
                                             "experts.w2.local": (el, CFG.hidden_size, CFG.moe_intermediate_size)} or \
                set(out[f"{mode} params"]) == {"experts.w13.q.local", "experts.w13.s.local", "experts.w2.q.local",
                                               "experts.w2.s.local"}, out[f"{mode} params"]
            keys = [f"{mode} {what} T={t}" for t in counts for what in ("bitwise", "eager")]
            keys += [f"{mode} bitwise skew", f"{mode} eager skew"] if skew else []
            for k in keys:
                v = out[k]
                ok = v[0] if isinstance(v, tuple) else v
                assert ok is True, f"rank {r}: {k}: {v}"
        if skew:
            assert max(out["skew: experts hit"]) < el, out["skew: experts hit"]    # all on rank 0's experts


@pytest.mark.parametrize("fp8", [False, True], ids=["f32", "fp8"])
def test_two_ranks_match_one_process(fp8):
    counts = (8, 1) if fp8 else (8, 1, 0, 13)        # the FP8 kernels interpret slowly: fewer calls
    modes = ("fixed",) if fp8 else ("fixed", "exact")
    _warm(2, fp8, modes)
    res = run_ranks(2, "ep_workers:moe", (fp8, counts, True, not fp8, modes))
    _check(res, 2, modes, counts, True)
    for out in res.values():
        if not fp8:
            assert out["no sync: bitwise"] is True
            assert not any("local_scalar" in o or "nonzero" in o for o in out["no sync: ops"]), out["no sync: ops"]
            assert "c10d.alltoall_base_.default" in out["no sync: ops"], out["no sync: ops"]
            assert "called with different sizes" in out["mismatch"] and "rank 1: T=5" in out["mismatch"] \
                and "rank 0: T=7" in out["mismatch"], out["mismatch"]
            assert out["after mismatch: bitwise"] is True


@pytest.mark.parametrize("fp8", [False, True], ids=["f32", "fp8"])
def test_four_ranks_match_one_process(fp8):
    counts = (8,) if fp8 else (8, 3)
    modes = ("exact",) if fp8 else ("fixed",)      # both modes on 2 ranks; here one each keeps the suite short
    _warm(4, fp8, modes)
    res = run_ranks(4, "ep_workers:moe", (fp8, counts, not fp8, False, modes))
    _check(res, 4, modes, counts, not fp8)


def test_a_stalled_rank_is_a_timeout_error_on_the_others():
    _warm(2, False)
    t0 = time.monotonic()
    res = run_ranks(2, "ep_workers:stalls", (7.0,), timeout_s=2)
    out = res[0]
    assert "rank 0 of 2" in out["error text"] and "failed" in out["error text"], out
    assert 1.5 <= out["seconds"] < 6, out                    # the group's 2 s timeout, not the 7 s stall
    assert res[1] == {"stalled": True} and time.monotonic() - t0 < 120


def test_a_dead_rank_is_an_error_not_a_hang():
    _warm(2, False)
    res = run_ranks(2, "ep_workers:dies", (), timeout_s=30, may_die=(1,))
    out = res[0]
    assert "rank 0 of 2" in out["error text"] and "failed" in out["error text"], out
    assert out["seconds"] < 30 + 5, out
