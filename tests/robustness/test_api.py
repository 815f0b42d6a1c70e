"""The call contract of a CompiledModule (issue 8, "API" and the example-input items of "Silent wrong
results"): `cm(*args, **kwargs)` takes exactly what the module was compiled with, non-tensor
arguments baked in at trace time are checked at every call, and a bare tensor is one example input.

The sm_90a compile is stubbed out (`no_sm90`): these tests are about the front door and run every
kernel on the Triton interpreter; tests/codegen covers the PTX compile.
"""
from __future__ import annotations

import builtins
import os

import pytest
import torch
from torch import nn

import dsr_compiler as dsr
from dsr_compiler import knobs
from dsr_compiler.codegen import build
from dsr_compiler.errors import DsrError
from dsr_compiler.models.grpo import GRPOLoss, group_advantages, per_token_logps
from tests.tolerances import assert_close


_REAL_PRINT = builtins.print


def _rel(path: str) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


@pytest.fixture
def no_sm90(monkeypatch):
    """Skip triton.compile for sm_90a: the interpreter runs the rendered source directly."""
    monkeypatch.setattr(build, "compile_cached", lambda spec, source, target, cache: (None, False))


class Scaled(nn.Module):
    """A linear with an optional tensor and a Python scalar argument."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        y = self.lin(x) * scale
        return y if bias is None else y + bias


def _x(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _compile(module, args, **kw):
    return dsr.compile(module, args, backend="interpret", fp8=False, **kw)


def test_bare_tensor_is_one_example_input(no_sm90):
    m = Scaled().eval()
    x = _x(8, 16)
    g = dsr.trace(m, x)
    assert [v.name for v in g.data_inputs] == ["x"]
    cm = _compile(m, x)
    with torch.no_grad():
        assert_close(cm(x), m(x))


def test_grpo_compiled_with_none_accepts_the_same_arguments(no_sm90):
    g = torch.Generator().manual_seed(0)
    n, length, h, v = 2, 3, 16, 37
    hid = torch.randn(n, length, h, generator=g)
    w = torch.randn(v, h, generator=g) / 4
    ids = torch.randint(0, v, (n, length), generator=g)
    mask = torch.ones(n, length)
    adv = group_advantages(torch.randn(n, generator=g), 2, "group")
    with torch.no_grad():
        ref_l = per_token_logps(hid, w, ids, 1.0) + 0.1
    m = GRPOLoss(beta=0.04)
    args = (hid, w, ids, mask, adv, None, ref_l)
    cm = _compile(m, args)
    with torch.no_grad():
        want = m(*args)
    assert_close(cm(*args), want)
    assert_close(cm(hid, w, ids, mask, adv, ref_logps=ref_l), want)       # None is the forward's default
    with pytest.raises(DsrError, match=r"(?s)old_logps.*None.*recompile"):
        cm(hid, w, ids, mask, adv, ref_l, ref_l)


def test_keyword_arguments(no_sm90):
    m = Scaled().eval()
    x, b = _x(4, 16), _x(16, seed=1)
    cm = _compile(m, (x,), kwargs={"bias": b, "scale": 2.0})
    with torch.no_grad():
        want = m(x, bias=b, scale=2.0)
    assert [v.name for v in cm.graph.data_inputs] == ["x", "bias"]
    assert_close(cm(x, b, 2.0), want)
    assert_close(cm(x=x, bias=b, scale=2.0), want)
    assert_close(cm(x, scale=2.0, bias=b), want)
    with pytest.raises(DsrError, match=r"unexpected keyword argument `nope`"):
        cm(x, b, 2.0, nope=1)
    with pytest.raises(DsrError, match=r"`x` given twice"):
        cm(x, b, x=x)
    with pytest.raises(DsrError, match=r"compile: unknown keyword argument `nope`"):
        _compile(m, (x,), kwargs={"nope": 1})


def test_baked_scalars_are_checked_at_call_time(no_sm90):
    m = Scaled().eval()
    x = _x(4, 16)
    cm = _compile(m, (x, None, 3.0))
    with torch.no_grad():
        assert_close(cm(x, None, 3.0), m(x, None, 3.0))
    with pytest.raises(DsrError, match=r"`scale` was baked in as 3\.0 at compile time, got 2\.0"):
        cm(x, None, 2.0)
    with pytest.raises(DsrError, match=r"`scale` was baked in as 3\.0.*got 1\.0"):
        cm(x)                                      # the forward's default 1.0 is not what was compiled
    with pytest.raises(DsrError, match=r"(?s)`bias` was None at compile time.*recompile"):
        cm(x, _x(16), 3.0)
    cm1 = _compile(m, (x,))                         # omitted: the defaults are baked in
    with pytest.raises(DsrError, match=r"`scale` was baked in as 1\.0.*got 2"):
        cm1(x, None, 2)


def test_wrong_count_dtype_shape_device_name_the_parameter(no_sm90):
    m = Scaled().eval()
    x, b = _x(4, 16), _x(16, seed=1)
    cm = _compile(m, (x, b), dynamic={"x": {0: "T"}})
    cm(_x(7, 16), b)                                  # T is dynamic
    with pytest.raises(DsrError, match=r"Scaled.forward: expected 3 inputs \(x, bias, scale\), got 4"):
        cm(x, b, 1.0, 1.0)
    with pytest.raises(DsrError, match=r"missing argument `x`"):
        cm(bias=b)
    with pytest.raises(DsrError, match=r"`x`: expected dtype f32, got torch.float64"):
        cm(x.double(), b)
    with pytest.raises(DsrError, match=r"`bias`: expected shape \[16\], got \(8,\)"):
        cm(x, _x(8))
    with pytest.raises(DsrError, match=r"`x`: expected rank 2"):
        cm(_x(16), b)
    with pytest.raises(DsrError, match=r"`bias` was a tensor at compile time, got None"):
        cm(x, None)
    with pytest.raises(DsrError, match=r"`x` must be a tensor, got str"):
        cm("x", b)
    if torch.cuda.is_available():
        with pytest.raises(DsrError, match=r"`x` is on cuda"):
            cm(x.cuda(), b)


class Shift(nn.Module):
    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return x + k


def test_python_number_for_a_0d_tensor_input(no_sm90):
    cm = _compile(Shift(), (torch.arange(4), torch.tensor(2)))
    assert torch.equal(cm(torch.arange(4), 5), torch.arange(4) + 5)
    with pytest.raises(DsrError, match=r"`k`: expected an integer for the i64\[\] input, got 2\.5"):
        cm(torch.arange(4), 2.5)


# ----------------------------------------------------------------------------- print() in forward

class Chatty(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("shape", x.shape)
        return x * 2


def test_print_in_forward_is_a_trace_note(capsys):
    with knobs.scoped(DSR_DEBUG=1):
        cm = _compile(Chatty(), (_x(4),))
    line = Chatty.forward.__code__.co_firstlineno + 1
    note = f"print() at {_rel(__file__)}:{line} ran at trace time only; the compiled module does not print"
    assert note in cm.passes[0].notes and cm.passes[0].name == "trace"
    assert note in cm.report()["passes"][0]["notes"]
    assert note in capsys.readouterr().err
    assert builtins.print is _REAL_PRINT                   # restored after tracing
    g_notes: list[str] = []
    from dsr_compiler.frontend import trace as frontend_trace
    frontend_trace(Chatty(), (_x(4),), notes=g_notes)
    assert g_notes == [note]


# ----------------------------------------------------------------------------- safetensors dtypes

def test_int_or_bool_tensor_for_a_float_weight_is_refused(tmp_path):
    from dsr_compiler.models.layers import MLP
    from dsr_compiler.models.weights import load_state_dict_safetensors, quantize_fp8_blocks, save_safetensors
    prefix = "model.layers.0.mlp."
    good = {f"{prefix}{hf}.weight": torch.randn(*shape) for hf, shape in
            (("gate_proj", (32, 16)), ("up_proj", (32, 16)), ("down_proj", (16, 32)))}
    for bad_dtype in (torch.int64, torch.bool):
        tensors = dict(good)
        tensors[f"{prefix}up_proj.weight"] = torch.ones(32, 16, dtype=bad_dtype)
        path = tmp_path / f"bad_{bad_dtype}.safetensors".replace("torch.", "")
        save_safetensors(tensors, path)
        with pytest.raises(DsrError, match=rf"(?s)up_proj.weight -> w3.weight: dtype {bad_dtype}, expected torch.float32"):
            load_state_dict_safetensors(MLP(16, 32), path, prefix=prefix)
    q, s = quantize_fp8_blocks(good[f"{prefix}gate_proj.weight"])     # FP8 + scale stays accepted
    tensors = dict(good, **{f"{prefix}gate_proj.weight": q, f"{prefix}gate_proj.weight_scale_inv": s})
    save_safetensors(tensors, tmp_path / "fp8.safetensors")
    m = load_state_dict_safetensors(MLP(16, 32), tmp_path / "fp8.safetensors", prefix=prefix)
    assert m.w1.weight.dtype == torch.float32


# ----------------------------------------------------------------------------- FP8 policy and CLI options

def test_fp8_policy_force_string_is_one_path_and_fields_are_typed():
    from dsr_compiler.ir.passes import Fp8Policy
    assert Fp8Policy.from_option({"force": "mlp.w1"}).force == ("mlp.w1",)
    assert Fp8Policy.from_option({"force": ["mlp.w1", "attn.wo"]}).force == ("mlp.w1", "attn.wo")
    for bad, pattern in (({"force": 3}, r"force must be a list of module paths"),
                         ({"force": None}, r"force must be a list of module paths"),
                         ({"force": {"mlp.w1": 1}}, r"force must be a list of module paths"),
                         ({"force": ["mlp.w1", 2]}, r"force takes module paths"),
                         ({"attn": "no"}, r"attn must be True or False"),
                         ({"block": True}, r"block must be a power of two"),
                         ({"block": 128.0}, r"block must be a power of two"),
                         ({"block_m": True}, r"block_m must be None or a power of two"),
                         ({"scale_fmt": ["ue8m0"]}, r"scale_fmt must be None or 'ue8m0'")):
        with pytest.raises(DsrError, match=pattern):
            Fp8Policy.from_option(bad)


def test_no_fp8_with_fp8_policy_is_an_error(capsys):
    from dsr_compiler.cli import main
    rc = main(["compile", "--module", "mlp", "--no-fp8", "--fp8-policy", '{"attn": false}'])
    err = capsys.readouterr().err
    assert rc == 2 and "--no-fp8 and --fp8-policy contradict each other" in err


def test_dsrc_run_honours_dsr_backend(no_sm90, capsys):
    from dsr_compiler.cli import main
    if torch.cuda.is_available():
        with knobs.scoped(DSR_BACKEND="interpret"):
            rc = main(["run", "--module", "mlp", "--no-fp8", "--seq", "4"])
        assert rc == 0 and "on backend interpret" in capsys.readouterr().out
    else:
        with knobs.scoped(DSR_BACKEND="cuda"):
            rc = main(["run", "--module", "mlp", "--no-fp8", "--seq", "4"])
        assert rc == 2 and "backend 'cuda' asked for" in capsys.readouterr().err
