"""Running N expert-parallel ranks: the process group from the environment, and the local launcher.

`dsrc run --ep N` (cli.py) starts N copies of itself with torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) on this machine; under torchrun the same variables come from
torchrun, so a rank runs the same code either way. Every value read from the environment is checked
(a DsrError naming the variable, before any work). The group's timeout is the knob
DSR_EP_TIMEOUT_S: a rank that dies or stops calling makes the others fail with an error within it,
never hang. The launcher waits for every rank; when one fails it gives the others a grace period to
report their own error, then stops them, and exits with the first failure's code.
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from typing import Sequence

from dsr_compiler import knobs
from dsr_compiler.errors import DsrError

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MAX_RANKS = 64            # local processes the launcher starts at most
GRACE_S = 30.0            # after a rank fails, how long the others may take to report theirs


def in_group_env() -> bool:
    """True when this process is one rank of a launch (torchrun's or ours)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def env_int(name: str, lo: int, hi: int) -> int:
    raw = os.environ.get(name, "")
    try:
        v = int(raw)
    except ValueError:
        v = None
    if v is None or not lo <= v <= hi:
        raise DsrError(f"environment variable {name}={raw!r} is not an int in {lo}..{hi}",
                       hint="set by torchrun or `dsrc run --ep N`; unset it to run on one process")
    return v


def init_group(n_ranks: int, backend: str = "gloo"):
    """Initialise the default process group from the environment for an `--ep n_ranks` run; returns it."""
    from torch import distributed as dist
    world = env_int("WORLD_SIZE", 1, 1 << 16)
    rank = env_int("RANK", 0, world - 1)
    env_int("MASTER_PORT", 1, 65535)        # 0 (torchrun --master-port 0) leaves the ranks unable to meet
    if not os.environ.get("MASTER_ADDR"):
        raise DsrError("environment variable MASTER_ADDR is not set", hint="set by torchrun or `dsrc run --ep N`")
    if world != n_ranks:
        raise DsrError(f"--ep {n_ranks}, but this launch has WORLD_SIZE={world} ranks",
                       hint=f"start {n_ranks} ranks (torchrun --nproc-per-node {n_ranks}) or pass --ep {world}")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=knobs.get("DSR_EP_TIMEOUT_S"))
        try:
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        except Exception as e:
            raise DsrError(f"rank {rank} of {world}: cannot join the process group ({backend}): "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
                           hint="check MASTER_ADDR/MASTER_PORT and that every rank was started; "
                                f"the wait is bounded by DSR_EP_TIMEOUT_S={knobs.get('DSR_EP_TIMEOUT_S')}") from None
    return dist.group.WORLD


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n_ranks: int, argv: Sequence[str], grace_s: float = GRACE_S) -> int:
    """Run `python -m dsr_compiler *argv` as ranks 0..n-1 of a local gloo group; the first failing exit code."""
    if not 1 <= n_ranks <= MAX_RANKS:
        raise DsrError(f"--ep {n_ranks}: the local launcher starts 1..{MAX_RANKS} processes",
                       hint="use torchrun for more ranks or several machines")
    port = free_port()
    procs = []
    for r in range(n_ranks):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n_ranks), LOCAL_WORLD_SIZE=str(n_ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "dsr_compiler", *argv], env=env))
    failed_at: float | None = None
    first_bad = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [c for c in codes if c not in (None, 0)]
            if bad and failed_at is None:
                failed_at, first_bad = time.monotonic(), bad[0]
            if all(c is not None for c in codes):
                break
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                print(f"dsrc: stopped the ranks still running {grace_s:.0f} s after the first failure", file=sys.stderr)
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.kill()
        raise
    for p in procs:
        p.wait()
    if failed_at is not None:
        return first_bad if first_bad > 0 else 1
    return max((p.returncode for p in procs), default=0)


__all__ = ["ENV", "MAX_RANKS", "env_int", "free_port", "in_group_env", "init_group", "launch"]
