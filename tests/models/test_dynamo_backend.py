"""torch.compile(module, backend="dsr") runs the same pipeline (entry point torch_dynamo_backends)."""
import torch

from dsr_compiler.models import ModelConfig
from dsr_compiler.models.layers import MLPBlock
from tests.tolerances import assert_close


def test_torch_compile_backend_dsr_matches_eager():
    torch._dynamo.reset()
    cfg = ModelConfig.named("deepseek-v3-tiny").replace(hidden_size=64, intermediate_size=128)
    m = MLPBlock(cfg).eval()
    f = torch.compile(m, backend="dsr", dynamic=False)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert_close(f(x), m(x))
