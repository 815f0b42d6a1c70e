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


def test_torch_compile_lifts_constants_built_in_forward():
    """Position ids from torch.arange(n) (n static under Dynamo) and torch.ones(...) are built from Python
    numbers alone: the backend evaluates them once as buffers of the graph; a random one is refused."""
    import pytest

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            pos = torch.arange(x.shape[0], dtype=torch.float32)
            return self.lin(x) + pos[:, None] * torch.ones(8)

    torch._dynamo.reset()
    m = M().eval()
    f = torch.compile(m, backend="dsr", dynamic=False)
    with torch.no_grad():
        for t in (5, 7):                      # a recompile per shape, each with its own constants
            x = torch.randn(t, 8)
            assert_close(f(x), m(x))

    class Noisy(torch.nn.Module):
        def forward(self, x):
            return x + torch.rand(4)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="random"):
        torch.compile(Noisy(), backend="dsr", dynamic=False)(torch.randn(4))


def test_torch_compile_refuses_a_huge_constant_before_allocating_it():
    """A constant built in forward is sized on the meta device first: 2^40 elements is refused, not allocated."""
    import pytest

    class Huge(torch.nn.Module):
        def forward(self, x):
            return x + torch.zeros(1 << 40)[:4]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="over 16,777,216 elements"):
        torch.compile(Huge(), backend="dsr", dynamic=False)(torch.randn(4))


def test_torch_compile_keeps_dynamo_dynamic_dims_symbolic(monkeypatch):
    """A dim Dynamo marks dynamic (mark_dynamic, or its automatic dynamic after a second size) stays symbolic:
    one compile serves every size, the SymInt graph input is read from the tensor's dim."""
    from dsr_compiler import api
    specs = []
    real = api.compile
    monkeypatch.setattr(api, "compile", lambda module, inputs, **kw: specs.append(kw.get("dynamic")) or
                        real(module, inputs, **kw))
    torch._dynamo.reset()

    class Reshaping(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(32, 32)

        def forward(self, x):
            b, t, h = x.shape
            return self.lin(x).reshape(b * t, h).view(b, t, h) * 2

    m = Reshaping().eval()
    f = torch.compile(m, backend="dsr")
    for t in (3, 5, 9, 17):
        x = torch.randn(2, t, 32)
        with torch.no_grad():
            assert_close(f(x), m(x))
    assert len(specs) == 2 and specs[0] is None, specs
    assert [list(d) for d in specs[1].values()] == [[1]], specs
    torch._dynamo.reset()


class _CumprodInside(torch.nn.Module):
    def forward(self, x):
        return torch.cumprod(x, 0)


class _Outer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _CumprodInside()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(self.lin(x))


def test_torch_compile_errors_name_the_user_line_and_module():
    """Under Dynamo, a trace error points at the user's source line and module path behind the graph node
    (not at the generated graph code, and not at `gm`)."""
    import pytest
    torch._dynamo.reset()
    with pytest.raises(Exception) as e:
        torch.compile(_Outer(), backend="dsr", dynamic=False)(torch.randn(3, 4))
    msg = str(e.value)
    assert "unsupported op torch.cumprod" in msg
    assert "module path `inner` (_CumprodInside)" in msg and "test_dynamo_backend.py" in msg, msg
    assert "return torch.cumprod(x, 0)" in msg and "dynamo.py" not in msg
    torch._dynamo.reset()
