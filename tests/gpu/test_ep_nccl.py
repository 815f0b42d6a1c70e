"""Expert parallelism on the GPU path: a one-rank NCCL group runs both exchange modes on the CUDA backend
and the output is bitwise that of the one-process plan (the multi-rank runs are tests/dist, on gloo)."""
from __future__ import annotations

import datetime

import pytest
import torch

import dsr_compiler as dsr
from dsr_compiler.models import ModelConfig
from dsr_compiler.workloads import build


@pytest.mark.parametrize("fp8", [False, True])
def test_one_rank_nccl_group(tmp_path, fp8):
    from torch import distributed as dist
    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        wl = build(ModelConfig.named("deepseek-v3-tiny"), "moe", 1, 8, "f32", 0)
        kw = dict(dynamic=wl.dynamic, backend="cuda", fp8=fp8)
        one = dsr.compile(wl.module, wl.example_inputs, **kw)
        for mode in ("fixed", "exact"):
            cm = dsr.compile(wl.module, wl.example_inputs, ep=1, ep_mode=mode, **kw)
            for t in (8, 0, 33):
                x = wl.make_inputs(t, 5)[0].cuda()
                assert torch.equal(cm(x), one(x)), (mode, t)
    finally:
        dist.destroy_process_group()
