"""Run a function on N local ranks of a gloo process group (spawned processes), collect what each returns.

`run_ranks(n, "module:function", args)` starts n spawned processes; each joins a gloo group (timeout
`timeout_s`), imports the function by name (this folder is on the children's sys.path) and calls
`fn(rank, n, *args)`; the returned dict (or the error's traceback) comes back through a queue.
Every wait is bounded: a rank that never reports is killed at the deadline and reported as such.
"""
from __future__ import annotations

import datetime
import importlib
import os
import queue
import time
import traceback

import torch.multiprocessing as mp

from dsr_compiler.ep_launch import free_port


def _entry(rank: int, n: int, port: int, target: str, args: tuple, timeout_s: float, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(n))
    try:
        from torch import distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=n, timeout=datetime.timedelta(seconds=timeout_s))
        mod, fn = target.split(":")
        out = getattr(importlib.import_module(mod), fn)(rank, n, *args)
        q.put((rank, out))
    except BaseException:
        q.put((rank, {"error": traceback.format_exc()}))
    finally:
        try:
            from torch import distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(n: int, target: str, args: tuple = (), timeout_s: float = 60.0, deadline_s: float = 300.0,
              may_die: tuple[int, ...] = ()) -> dict[int, dict]:
    """{rank: its result dict}; ranks in `may_die` may exit without one."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, n, port, target, args, timeout_s, q), daemon=True) for r in range(n)]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    end = time.monotonic() + deadline_s
    want = n - len(may_die)
    while len([r for r in results if r not in may_die]) < want and time.monotonic() < end:
        try:
            rank, out = q.get(timeout=0.5)
            results[rank] = out
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and q.empty():
                break
    for p in procs:
        p.join(timeout=max(0.0, min(10.0, end - time.monotonic())))
        if p.is_alive():
            p.kill()
            p.join()
    missing = [r for r in range(n) if r not in results and r not in may_die]
    assert not missing, f"ranks {missing} reported nothing (exit codes {[p.exitcode for p in procs]})"
    errors = {r: o["error"] for r, o in results.items() if "error" in o}
    assert not errors, "\n".join(f"--- rank {r}:\n{e}" for r, e in errors.items())
    return results
