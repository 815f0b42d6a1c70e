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


def test_torch_compile_nn_rmsnorm():
    """Dynamo records nn.RMSNorm as torch.rms_norm (not F.rms_norm): it lowers to the IR's rms_norm."""
    torch._dynamo.reset()
    m = torch.nn.Sequential(torch.nn.RMSNorm(32, eps=1e-6), torch.nn.Linear(32, 16)).eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.linspace(0.5, 1.5, 32))
    f = torch.compile(m, backend="dsr", dynamic=False)
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert_close(f(x), m(x))
