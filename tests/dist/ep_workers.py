"""What each rank runs in tests/dist/test_expert_parallel.py (through ep_harness.run_ranks)."""
from __future__ import annotations

import copy
import os

import torch

import dsr_compiler as dsr
from dsr_compiler.models import ModelConfig
from dsr_compiler.tolerance import compare, compare_fp8
from dsr_compiler.workloads import build

from dispatch_recorder import SYNC_METHODS, DispatchRecorder

CFG = ModelConfig.named("deepseek-v3-tiny")          # 16 routed experts, top-4, 4 groups (top-2 kept)


def _inputs(wl, tokens: int, rank: int, salt: int) -> torch.Tensor:
    return wl.make_inputs(tokens, 1000 * salt + 17 * rank + tokens)[0]


def _eager_ok(module, x, y, fp8: bool) -> tuple[bool, float]:
    with torch.no_grad():
        if fp8:
            from dsr_compiler.models.fp8_ref import fp8_reference
            r = compare_fp8(y, fp8_reference(module)(x), "fp8_sim")
        else:
            r = compare(y, module(x))
    return bool(r["ok"]), float(r["max_abs"])


def _skewed(module, rank_of_all: int, n: int):
    """A copy whose correction bias sends every token to the experts of one rank (bias: selection only)."""
    m = copy.deepcopy(module)
    el = CFG.n_routed_experts // n
    with torch.no_grad():
        m.gate.e_score_correction_bias[rank_of_all * el:(rank_of_all + 1) * el] += 10.0
    return m


def moe(rank: int, n: int, fp8: bool, token_counts: tuple[int, ...], skew: bool, extras: bool,
        modes: tuple[str, ...] = ("fixed",)) -> dict:
    """Per ep_mode and token count: the EP output vs the single-process compiled MoE (bitwise) and vs eager."""
    wl = build(CFG, "moe", 1, 8, "f32", 0)
    kw = dict(dynamic=wl.dynamic, fp8=fp8, backend="interpret")
    one = dsr.compile(wl.module, wl.example_inputs, **kw)
    out: dict = {}
    for mode in modes:
        cm = dsr.compile(wl.module, wl.example_inputs, ep=n, ep_mode=mode, **kw)
        out[f"{mode} params"] = {p: tuple(t.shape) for p, t in zip(cm.graph.params, cm.params) if "local" in p}
        for t in token_counts:
            x = _inputs(wl, t, rank, 1)
            y = cm(x)
            out[f"{mode} bitwise T={t}"] = torch.equal(y, one(x))
            out[f"{mode} eager T={t}"] = _eager_ok(wl.module, x, y, fp8) if t else (y.shape == (0, CFG.hidden_size), 0.0)
        if extras and mode == "fixed":
            out.update(_extras(cm, one, wl, rank, n))
    if skew:                             # every token of every rank goes to rank 0's experts
        m = _skewed(wl.module, 0, n)
        one_s = dsr.compile(m, wl.example_inputs, **kw)
        x = _inputs(wl, 8, rank, 2)
        with torch.no_grad():
            ids = m.gate(x)[1]
        out["skew: experts hit"] = sorted(set(ids.flatten().tolist()))
        for mode in modes:
            y = dsr.compile(m, wl.example_inputs, ep=n, ep_mode=mode, **kw)(x)
            out[f"{mode} bitwise skew"] = torch.equal(y, one_s(x))
            out[f"{mode} eager skew"] = _eager_ok(m, x, y, fp8)
    return out


def _extras(cm, one, wl, rank: int, n: int) -> dict:
    from dsr_compiler.errors import DsrError
    out: dict = {}
    x = _inputs(wl, 6, rank, 3)
    cm(x)                                            # sizes agreed once for T=6
    orig = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def sync(*a, **k):
        raise AssertionError("host sync inside the expert-parallel MoE")
    try:
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, sync)
        with DispatchRecorder() as rec:
            y = cm(x)
    finally:
        for name, f in orig.items():
            setattr(torch.Tensor, name, f)
    out["no sync: ops"] = sorted(rec.ops)
    out["no sync: bitwise"] = torch.equal(y, one(x))
    # different token counts on different ranks: the same clear error on every rank, then the plan still works
    t = 5 if rank == n - 1 else 7
    try:
        cm(_inputs(wl, t, rank, 4))
        out["mismatch"] = "no error"
    except DsrError as e:
        out["mismatch"] = str(e)
    x = _inputs(wl, 7, rank, 5)
    out["after mismatch: bitwise"] = torch.equal(cm(x), one(x))
    return out


def stalls(rank: int, n: int, stall_s: float) -> dict:
    """The last rank stays alive but stops calling; the others must fail at the group's timeout, not hang."""
    from dsr_compiler.errors import DsrError
    import time
    wl = build(CFG, "moe", 1, 8, "f32", 0)
    cm = dsr.compile(wl.module, wl.example_inputs, ep=n, dynamic=wl.dynamic, backend="interpret")
    x = _inputs(wl, 4, rank, 6)
    cm(x)
    if rank == n - 1:
        time.sleep(stall_s)
        return {"stalled": True}
    t0 = time.monotonic()
    try:
        cm(x)
        return {"error text": "no error", "seconds": time.monotonic() - t0}
    except DsrError as e:
        return {"error text": str(e), "seconds": time.monotonic() - t0}


def dies(rank: int, n: int) -> dict:
    """The last rank exits abruptly before a call; every other rank must get a clear error, not hang."""
    from dsr_compiler.errors import DsrError
    import time
    wl = build(CFG, "moe", 1, 8, "f32", 0)
    cm = dsr.compile(wl.module, wl.example_inputs, ep=n, dynamic=wl.dynamic, backend="interpret")
    x = _inputs(wl, 4, rank, 6)
    cm(x)
    if rank == n - 1:
        os._exit(3)
    t0 = time.monotonic()
    try:
        cm(_inputs(wl, 4, rank, 7))
        return {"error text": "no error", "seconds": time.monotonic() - t0}
    except DsrError as e:
        return {"error text": str(e), "seconds": time.monotonic() - t0}
