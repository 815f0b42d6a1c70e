"""transformers' dense modules and a plain nn.Sequential through dsr.compile with one symbolic token dim
(1, 8, 16 tokens from one compile; attention's `q_length > 1` branch specializes T = 1 on first use),
f32 outputs within 1e-5 relative of eager (issue 13's acceptance bound)."""
from __future__ import annotations

import pytest
import torch

import dsr_compiler as dsr
from dsr_compiler.errors import TraceError
from hf_modules import build

DENSE = ("deepseek_mlp", "deepseek_attention", "deepseek_decoder_layer", "deepseek_causal_lm", "llama_decoder_layer",
         "gpt2_block", "sequential")
WITH_MOE = ("deepseek_decoder_layer", "deepseek_causal_lm")
ATTENTION = ("deepseek_attention", "deepseek_decoder_layer", "deepseek_causal_lm", "llama_decoder_layer", "gpt2_block")


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
    if name in WITH_MOE:                                    # its MoE layer: the recognised router + experts
        assert [f for f in fams if f.startswith("moe")] == ["moe_router", "moe_dispatch", "moe_gemm", "moe_gemm",
                                                            "moe_combine"]


def test_causal_lm_with_eager_attention():
    """attn_implementation 'eager': the causal mask is built in the graph (additive, the dtype's minimum)."""
    m, inputs, dyn = build("deepseek_causal_lm", attn="eager", num_hidden_layers=1)
    cm = dsr.compile(m, inputs(8), dynamic=dyn, backend="interpret")
    for t in (8, 3, 1):
        x = inputs(t, seed=t)
        with torch.no_grad():
            ref = m(*x)
        assert rel_err(cm(*x), ref) <= 1e-5, t


class MaskedLogits(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def test_causal_lm_with_a_padding_mask_is_refused():
    """A padding mask makes transformers' mask depend on its values: refused by name, with the line."""
    m, inputs, _ = build("deepseek_causal_lm", num_hidden_layers=1)
    ids = inputs(8)[0]
    with pytest.raises(TraceError) as e:
        dsr.compile(MaskedLogits(m.lm), (ids, torch.ones_like(ids)), backend="interpret")
    assert "create_causal_mask is compiled only for a plain causal mask: an attention_mask is passed" in str(e.value)
    assert "modeling_deepseek_v3.py" in str(e.value)


@pytest.mark.parametrize("name", [n for n in DENSE if n not in WITH_MOE])   # an MoE: dsr.compile only (see README)
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


def test_causal_lm_returns_its_model_output():
    """DeepseekV3ForCausalLM compiled as it is: the call returns transformers' MoeCausalLMOutputWithPast."""
    m, inputs, dyn = build("deepseek_causal_lm", num_hidden_layers=1)
    lm = m.lm
    cm = dsr.compile(lm, inputs(8), kwargs={"use_cache": False}, dynamic=dyn, backend="interpret")
    x = inputs(5, seed=5)
    out = cm(*x, use_cache=False)
    with torch.no_grad():
        ref = lm(*x, use_cache=False)
    assert type(out) is type(ref) and list(out.keys()) == list(ref.keys()) == ["logits"]
    assert rel_err(out.logits, ref.logits) <= 1e-5


def test_llama_layer_takes_its_position_embeddings_tuple():
    """transformers' calling convention as it is: position_embeddings=(cos, sin) is a tuple argument."""
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as ll
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=128)
    cfg._attn_implementation = "sdpa"
    layer = ll.LlamaDecoderLayer(cfg, 0).eval()
    rotary = ll.LlamaRotaryEmbedding(cfg)

    def args(t: int, seed: int = 0):
        x = torch.randn(1, t, 64, generator=torch.Generator().manual_seed(seed))
        return x, rotary(x, torch.arange(t)[None])
    x, pe = args(8)
    dyn = {"hidden_states": {1: "T"}, "position_embeddings_0": {1: "T"}, "position_embeddings_1": {1: "T"}}
    cm = dsr.compile(layer, (x,), kwargs={"position_embeddings": pe, "attention_mask": None}, dynamic=dyn,
                     backend="interpret")
    for t in (8, 1):
        x, pe = args(t, t)
        with torch.no_grad():
            ref = layer(x, position_embeddings=pe, attention_mask=None)
        assert rel_err(cm(x, position_embeddings=pe, attention_mask=None), ref) <= 1e-5
