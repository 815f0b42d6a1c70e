"""transformers' dense modules and a plain nn.Sequential through dsr.compile with one symbolic token dim
(1, 8, 16 tokens from one compile; attention's `q_length > 1` branch specializes T = 1 on first use),
f32 outputs within 1e-5 relative of eager (issue 13's acceptance bound)."""
from __future__ import annotations

import pytest
import torch

import dsr_compiler as dsr
from dsr_compiler.errors import TraceError
from hf_modules import build

DENSE = ("deepseek_mlp", "deepseek_attention", "deepseek_decoder_layer", "llama_decoder_layer", "gpt2_block",
         "sequential")
ATTENTION = ("deepseek_attention", "deepseek_decoder_layer", "llama_decoder_layer", "gpt2_block")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("name", DENSE)
def test_dense_module_matches_eager(name):
    m, inputs, dyn = build(name)
    cm = dsr.compile(m, inputs(8), dynamic=dyn, backend="interpret")
    for t in (1, 8, 16):
        x = inputs(t, seed=t)
        with torch.no_grad():
            ref = m(*x)
        assert rel_err(cm(*x), ref) <= 1e-5, t
    attention = name in ATTENTION
    assert [str(g.expr) for g in cm.size_guards] == (["T > 1"] if attention else [])
    assert list(cm._specializations) == ([(False,)] if attention else [])
    fams = [k.spec.family for k in cm.kernels]
    if attention:
        assert "attention" in fams
    if name == "deepseek_decoder_layer":                   # its MoE: the recognised router + experts
        assert [f for f in fams if f.startswith("moe")] == ["moe_router", "moe_dispatch", "moe_gemm", "moe_gemm",
                                                            "moe_combine"]


def test_unsupported_module_names_the_op_and_line():
    """DeepseekV3ForCausalLM's mask utilities diff the position ids along the token dim: still refused, by op
    and source line."""
    m, inputs, dyn = build("deepseek_causal_lm")
    with pytest.raises(TraceError) as e:
        dsr.compile(m, inputs(8), dynamic=dyn, backend="interpret")
    assert "diff along the symbolic dim" in str(e.value) and "masking_utils.py" in str(e.value)


@pytest.mark.parametrize("name", [n for n in DENSE if n != "deepseek_decoder_layer"])   # its MoE: dsr.compile only
def test_dense_module_under_torch_compile(name, monkeypatch):
    """torch.compile(backend="dsr"): the second size makes Dynamo mark the token dim dynamic; the backend keeps
    it symbolic (one more compile), so a third size reuses it. Every size matches eager."""
    from dsr_compiler import api
    specs: list = []
    real = api.compile

    def recording(module, inputs, **kw):
        specs.append(kw.get("dynamic"))
        return real(module, inputs, **kw)
    monkeypatch.setattr(api, "compile", recording)
    m, inputs, _ = build(name)
    torch._dynamo.reset()
    cm = torch.compile(m, backend="dsr")
    for t in (8, 16, 1, 32):
        x = inputs(t, seed=t)
        with torch.no_grad():
            ref = m(*x)
            assert rel_err(cm(*x), ref) <= 1e-5, t
    assert specs[0] is None and specs[1] is not None, specs            # static first, then the dynamic dim
    symbols = {sym for dims in specs[1].values() for sym in dims.values()}
    assert len(symbols) == 1, specs[1]
    assert len(specs) <= 3, specs          # size 1 is a Dynamo specialization of its own (it never marks 0/1 dynamic)
    torch._dynamo.reset()
