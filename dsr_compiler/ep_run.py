"""`dsrc run --ep N`: the compiled module's experts spread over N ranks, each checked.

Outside a launch, this starts N local ranks of itself (dsr_compiler/ep_launch.py; gloo, or NCCL with
`--backend cuda`). Inside one (our launcher or torchrun), each rank:
1. builds the workload (the same seeded weights on every rank) and compiles it twice: with
   `ep=N` (its experts, its plan) and on one process (every expert); the ranks then agree that all
   compiles succeeded (one all_gather), so a rank whose compile failed never leaves the others
   waiting in an exchange;
2. runs its own tokens (inputs seeded by --seed and the rank) through both and, with --check, checks
   that the two outputs are bitwise equal and that the output is within the tolerance table of eager
   PyTorch (the same checks and lines as one-process `dsrc run --check`);
3. sends what it printed to rank 0, which prints every rank's lines in rank order.
Every rank exits with the worst code of all ranks, so the launcher and torchrun see the failure.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys

from dsr_compiler.errors import DsrError
from dsr_compiler.ep_launch import env_int, in_group_env, init_group, launch

RANK_SEED = 7919      # inputs of rank r: seed + r * RANK_SEED


def run_ep(args, cli) -> int:
    """`cli`: the helpers of dsr_compiler/cli.py this needs (workload, require_weights, compile, run_and_check)."""
    if not in_group_env():
        return launch(args.ep, args.argv)
    import torch
    from torch import distributed as dist
    from dsr_compiler.runtime.device import resolve_backend
    be = resolve_backend(args.backend or "auto")
    if be == "cuda":
        local = env_int("LOCAL_RANK", 0, 1 << 16) if os.environ.get("LOCAL_RANK") else 0
        torch.cuda.set_device(local % max(1, torch.cuda.device_count()))
    init_group(args.ep, "nccl" if be == "cuda" else "gloo")
    try:
        return _rank(args, cli, dist)
    finally:
        # on every path, errors included: a group left to the interpreter's exit takes its threads down
        # with std::terminate (seen as "terminate called without an active exception" and a changed exit code)
        if dist.is_initialized():
            dist.destroy_process_group()


def _rank(args, cli, dist) -> int:
    rank, n = dist.get_rank(), dist.get_world_size()
    out, err = io.StringIO(), None
    try:
        with contextlib.redirect_stdout(out):
            wl = cli.workload(args, seed=args.seed)
            cli.require_weights(wl, "run")
            cm = cli.compile(args, wl, ep=n)
            one = cli.compile(args, wl) if args.check else None
    except DsrError as e:
        err = e
    oks = [None] * n
    dist.all_gather_object(oks, err is None)
    if err is not None or not all(oks):
        # every rank is past the gather before any tears the group down: a peer still receiving when the
        # group goes away dies in gloo's thread (std::terminate), and its exit code is lost
        dist.barrier()
        if err is not None:
            sys.stderr.write(f"dsrc run: rank {rank} of {n}: {err}\n")
            return err.exit_code
        return 2                                # another rank reported its own error
    rc = 0
    try:
        with contextlib.redirect_stdout(out):
            inputs = wl.make_inputs(args.batch * args.seq, args.seed + RANK_SEED * rank)
            ep_opt = cm.options["ep"]
            print(f"rank {rank} of {n}: inputs of its own (seed {args.seed + RANK_SEED * rank}), "
                  f"{len(cm.kernels)} kernels, {_experts(cm)}")
            for e in cm.report().get("collectives", ()):
                print(f"  exchange {e['direction']}: buffer {e['buffer_bytes']} bytes, sends {e['sent_bytes']} bytes "
                      f"(payload {e.get('payload_bytes', '?')} bytes) per step over {ep_opt['group']}")
            if one is not None:
                rc = max(rc, _bitwise(cm, one, inputs, args))
            try:
                rc = max(rc, cli.run_and_check(args, wl, cm, inputs))
            except DsrError as e:
                print(f"dsrc run: {e}")
                rc = max(rc, e.exit_code)
    except DsrError as e:                       # an exchange failed: the group may be gone, report here
        sys.stdout.write(_prefixed(rank, out.getvalue()))
        sys.stderr.write(f"dsrc run: rank {rank} of {n}: {e}\n")
        return e.exit_code
    every = [None] * n
    dist.all_gather_object(every, (rank, rc, out.getvalue()))
    worst = max(r for _, r, _ in every)
    if rank == 0:
        for r, _, text in sorted(every):
            sys.stdout.write(_prefixed(r, text))
        if args.check:
            print("check passed on every rank" if worst == 0 else "check failed on some rank")
    dist.barrier()
    return worst


def _experts(cm) -> str:
    sl = [d for d in cm.derived_params if d["rule"] == "expert_slice"]
    if not sl:
        return "no routed experts"
    a = sl[0]["attrs"]
    return f"experts {a['start']}..{a['stop'] - 1} of each MoE layer"


def _bitwise(cm, one, inputs, args) -> int:
    import torch
    be, _ = cm.plan(args.backend)
    dev = "cuda" if be == "cuda" else "cpu"
    a = cm(*[x.to(dev) for x in inputs], backend=be)
    b = one(*[x.to(dev) for x in inputs], backend=be)
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    same = all(torch.equal(x, y) for x, y in zip(a, b))
    worst = max((float((x.float() - y.float()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
    print(f"check vs the same module compiled on one process (every expert), same tokens: "
          f"{'bitwise equal' if same else f'DIFFERENT (max abs {worst:.3e})'}")
    return 0 if same else 1


def _prefixed(rank: int, text: str) -> str:
    return "".join(f"[rank {rank}] {line}\n" for line in text.splitlines())


__all__ = ["run_ep"]
