"""bench/gpu_check.py, the one script of a GPU session: without CUDA it refuses before running
anything; its `dsrc` steps are valid command lines (so a lent GPU's minutes are not lost on a typo)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("dsr_bench_gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_cuda_and_runs_nothing(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--json", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr
    assert not out.exists()


@pytest.mark.parametrize("quick", [True, False])
def test_every_dsrc_step_parses(quick):
    from dsr_compiler.cli import build_parser
    steps = _script().steps(quick)
    assert steps[0][0] == "pytest tests/gpu" and len(steps) == (4 if quick else 6)
    for name, argv, limit in steps:
        assert 0 < limit <= 300, name
        if argv[1:3] == ["-m", "dsr_compiler"]:
            ns = build_parser().parse_args(argv[3:])
            assert ns.backend == "cuda" and ns.check, name
        elif name.startswith("bench"):
            assert Path(argv[1]) == ROOT / "bench" / "gpu.py"
