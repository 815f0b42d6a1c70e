"""`dsrc run|compile|ir --ep N` (dsr_compiler/ep_run.py, ep_launch.py): the local launcher, torchrun,
one rank's plan, and errors reported by every rank with exit code 2 (no hang)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_cli import run_cli

pytestmark = pytest.mark.dist


def test_run_ep2_checks_every_rank():
    """A decoder layer (one decode step): attention replicated per rank, the MoE expert-parallel."""
    r = run_cli("run", "--module", "decoder", "--ep", "2", "--check", "--no-fp8")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for rank, experts in ((0, "0..7"), (1, "8..15")):
        assert f"[rank {rank}] rank {rank} of 2: inputs of its own" in out and f"experts {experts}" in out
    assert out.count("same tokens: bitwise equal") == 2 and out.count("[rank 1] check passed") == 1
    assert "exchange dispatch: buffer" in out and out.rstrip().endswith("check passed on every rank")


def test_run_ep2_under_torchrun():
    from dsr_compiler.ep_launch import free_port
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(free_port()),
                        "-m", "dsr_compiler", "run", "--module", "moe", "--ep", "2", "--ep-mode", "exact", "--check"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("bitwise equal") == 2 and "check passed on every rank" in r.stdout
    assert r.stdout.count("exchange dispatch: buffer") == 2


def test_errors_come_from_every_rank_with_exit_2():
    r = run_cli("run", "--module", "mlp", "--ep", "2")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "rank 0 of 2" in r.stderr and "rank 1 of 2" in r.stderr and "no routed MoE layer" in r.stderr
    assert "Traceback" not in r.stderr


def test_compile_one_rank_plan(tmp_path):
    r = run_cli("compile", "--module", "moe", "--ep", "4", "--ep-rank", "3", "--out", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    assert "exchange dispatch over ep4 (4 ranks)" in r.stdout
    rep = json.loads((tmp_path / "d" / "report.json").read_text())
    assert rep["options"]["ep"]["rank"] == 3 and rep["collective_totals"]["exchanges"] == 2
    assert "Expert-parallel exchanges" in (tmp_path / "d" / "report.html").read_text()
    assert (tmp_path / "d" / "ir" / "08_expert_parallel.ir").exists()
    bad = run_cli("compile", "--module", "moe", "--ep", "4", "--ep-rank", "4")
    assert bad.returncode == 2 and "rank 4 is not one of the 4 ranks" in bad.stderr
