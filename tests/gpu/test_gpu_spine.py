"""On a real GPU: the compiled spine (cuda backend) vs eager PyTorch on the same device."""
import pytest
import torch

import dsr_compiler as dsr
from dsr_compiler.models import ModelConfig
from dsr_compiler.models.layers import MLPBlock
from tests.tolerances import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model", ["deepseek-v3-tiny", "deepseek-v3"])
def test_mlp_block_cuda_matches_eager(model, dtype):
    cfg = ModelConfig.named(model)
    torch.manual_seed(0)
    m = MLPBlock(cfg).to(dtype).cuda().eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    x0 = torch.randn(16, cfg.hidden_size, device="cuda", dtype=dtype)
    cm = dsr.compile(m, (x0,), dynamic={"x": {0: "T"}}, backend="cuda")
    for t in (1, 7, 128, 333):
        x = torch.randn(t, cfg.hidden_size, device="cuda", dtype=dtype)
        with torch.no_grad():
            ref = m(x)
        assert_close(cm(x), ref)
