"""Expert-parallel figures: modeled bytes per rank per step at DeepSeek-V3 width, measured gloo steps.

    python bench/ep_figures.py [--tokens 128] [--steps 5] [--ranks 2,4] [--no-measure]

1. Modeled (no GPU, no Triton compile): the full-width DeepSeek-V3 MoE layer (meta weights, FP8 recipe)
   traced and run through the passes with the expert-parallel plan of rank 0 of N = 8, 16, 64; the
   exchanges' sizes come from the plan's own IR (dsr_compiler/ep.py `exchanges`) at T tokens per rank:
   the fixed-capacity buffers, the bytes a rank sends per step (its whole buffer but its own block),
   and the payload (the T*k slot rows routing fills). Beside them, DeepEP V1's published low-latency
   figures (H800, CX7 400 Gb/s, 128 tokens per rank, 7168 hidden, top-8, FP8 dispatch, BF16 combine;
   deepseek-ai/DeepEP docs/legacy.md), whose latency x bandwidth is the bytes it moves per rank.
2. Measured: the tiny MoE compiled with ep=N on N local gloo processes (the Triton interpreter), the
   median step time per rank next to the same module compiled on one process and eager PyTorch on the
   same tokens, in the same processes; and the time spent inside the two exchanges.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch

# DeepEP V1 low-latency kernels (docs/legacy.md): EP -> (dispatch us, dispatch GB/s, combine us, combine GB/s)
DEEPEP_LL = {8: (77, 98, 114, 127), 16: (118, 63, 195, 74), 64: (173, 43, 314, 46)}


def modeled(tokens: int) -> None:
    from dsr_compiler import ep as ep_mod
    from dsr_compiler.ep import EpPlan, exchanges
    from dsr_compiler.frontend import trace
    from dsr_compiler.ir.passes import PIPELINE, PassContext, run_passes
    from dsr_compiler.models.config import ModelConfig
    from dsr_compiler.options import CompileOptions
    from dsr_compiler.workloads import build
    cfg = ModelConfig.named("deepseek-v3")
    wl = build(cfg, "moe", 1, 16, "bf16", 0)
    g = trace(wl.module, wl.example_inputs, dynamic=wl.dynamic, name="moe")
    k = cfg.num_experts_per_tok
    print(f"DeepSeek-V3 MoE layer (E={cfg.n_routed_experts}, k={k}, H={cfg.hidden_size}, FP8 dispatch), "
          f"T={tokens} tokens per rank per step; bytes per rank per step (MB = 1e6 B)")
    head = ("EP", "E/N", "C rows", "disp row B", "comb row B", "buffers MB", "sends MB fixed", "sends MB exact",
            "payload MB", "DeepEP LL MB", "DeepEP LL us")
    rows = [head]
    for n in (8, 16, 64):
        sent = {}
        for mode in ("fixed", "exact"):
            info = ep_mod.resolve(EpPlan(n, 0), mode)
            opts = CompileOptions.make(fp8=True).pass_options()
            opts["ep"] = info.pass_option()
            final = run_passes(g, ep_mod.pipeline(list(PIPELINE), info), PassContext(options=opts))[-1].graph
            ex = exchanges(final, {"T": tokens})
            sent[mode] = ex[0]["sent_bytes"] + ex[1]["sent_bytes"]
        d, c = ex[0], ex[1]
        dee = DEEPEP_LL.get(n)
        dee_mb = f"{(dee[0] * dee[1] + dee[2] * dee[3]) / 1e3:.1f}" if dee else "-"
        dee_us = f"{dee[0]} + {dee[2]}" if dee else "-"
        rows.append((str(n), str(cfg.n_routed_experts // n), str(d["capacity"]), str(d["row_bytes"]),
                     str(c["row_bytes"]), f"{(d['buffer_bytes'] + c['buffer_bytes']) / 1e6:.1f}",
                     f"{sent['fixed'] / 1e6:.1f}", f"{sent['exact'] / 1e6:.1f}",
                     f"{(d['payload_bytes'] + c['payload_bytes']) / 1e6:.1f}", dee_mb, dee_us))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(x.rjust(w) for x, w in zip(r, widths)))
    print("  (fixed: every exchange moves its whole buffer but its own block, no host sync; exact: the counts, then\n"
          "   the slot rows bound for other ranks, (N-1)/N of the payload under uniform routing, one host sync per\n"
          "   exchange. Dispatch row: FP8 codes + f32 scales + expert id + routing weight; combine row: the f32 expert\n"
          "   output, which keeps the sum over the k slots bitwise that of one process; DeepEP combines in BF16)")


def _rank(rank: int, n: int, port: int, tokens: int, steps: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from torch import distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=n, timeout=datetime.timedelta(seconds=120))
    import dsr_compiler as dsr
    from dsr_compiler.models import ModelConfig
    from dsr_compiler.runtime import collective
    from dsr_compiler.workloads import build
    wl = build(ModelConfig.named("deepseek-v3-tiny"), "moe", 1, 8, "f32", 0)
    cm = dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, backend="interpret", ep=n)
    cm_exact = dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, backend="interpret", ep=n,
                           ep_mode="exact")
    one = dsr.compile(wl.module, wl.example_inputs, dynamic=wl.dynamic, backend="interpret")
    x = wl.make_inputs(tokens, 11 + rank)[0]
    spent = [0.0]
    orig = collective.CollectiveStep.run

    def timed(self, ins):
        t0 = time.perf_counter()
        try:
            return orig(self, ins)
        finally:
            spent[0] += time.perf_counter() - t0
    collective.CollectiveStep.run = timed

    def median_ms(f) -> float:
        f()
        ts = []
        for _ in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            f()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    with torch.no_grad():
        eager = median_ms(lambda: wl.module(x))
    single = median_ms(lambda: one(x))
    spent[0] = 0.0
    ep = median_ms(lambda: cm(x))
    exch = spent[0] * 1e3 / (steps + 1)
    spent[0] = 0.0
    ep_exact = median_ms(lambda: cm_exact(x))
    exch_exact = spent[0] * 1e3 / (steps + 1)
    q.put((rank, eager, single, ep, exch, ep_exact, exch_exact))
    dist.barrier()
    dist.destroy_process_group()


def measured(ranks: list[int], tokens: int, steps: int) -> None:
    import torch.multiprocessing as mp
    from dsr_compiler.ep_launch import free_port
    print(f"\nmeasured: tiny MoE (16 experts, top-4, H=256, f32), {tokens} tokens per rank, Triton interpreter on "
          f"{os.cpu_count()} CPUs, gloo; median of {steps} steps (ms)")
    print("  ranks  rank  eager  one-process  ep fixed  (exchanges)  ep exact  (exchanges)  fixed/eager  "
          "fixed/one-process")
    for n in ranks:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        port = free_port()
        ps = [ctx.Process(target=_rank, args=(r, n, port, tokens, steps, q)) for r in range(n)]
        for p in ps:
            p.start()
        res = sorted(q.get(timeout=900) for _ in range(n))
        for p in ps:
            p.join(timeout=60)
        for r, eager, single, ep, exch, epx, exchx in res:
            print(f"  {n:5d}  {r:4d}  {eager:5.1f}  {single:11.1f}  {ep:8.1f}  {exch:11.2f}  {epx:8.1f}  {exchx:11.2f}  "
                  f"{ep / eager:11.1f}  {ep / single:17.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128, help="tokens per rank of the modeled V3 step (default 128)")
    ap.add_argument("--measure-tokens", type=int, default=32, help="tokens per rank of the measured steps")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--no-measure", action="store_true")
    a = ap.parse_args()
    modeled(a.tokens)
    if not a.no_measure:
        measured([int(x) for x in a.ranks.split(",")], a.measure_tokens, a.steps)


if __name__ == "__main__":
    main()
