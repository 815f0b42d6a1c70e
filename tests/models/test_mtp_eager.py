"""Eager Multi-Token Prediction: module shapes, the loss against an independent fp64 re-implementation,
gradients, and HF-named checkpoints (``model.layers.{num_hidden_layers + d}.*``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dsr_compiler.errors import DsrError
from dsr_compiler.models import (DeepSeekModel, ModelConfig, MoE, MTPLoss, MTPModule, final_hidden,
                                 load_state_dict_safetensors, make_mtp_modules, mtp_cross_entropies, mtp_loss,
                                 save_safetensors)
from dsr_compiler.models.weights import (dequantize_fp8_blocks, mtp_hf_to_ours, mtp_ours_to_hf, ours_to_hf,
                                         quantize_fp8_blocks)

TINY = ModelConfig.named("deepseek-v3-tiny")          # 2 layers, MTP depth 1
TINY_D2 = TINY.replace(num_nextn_predict_layers=2)    # two sequential depths
# The zoo keeps RMSNorm, RoPE and routing in fp32 even for fp64 modules (DESIGN.md §5), while the
# reference below is fp64 throughout: agreement is to ~1e-7 relative, far below any semantic error.
F64_TOL = dict(rtol=2e-6, atol=1e-7)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(b: int, s: int, seed: int, cfg: ModelConfig = TINY) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (b, s), generator=_gen(seed))


def _randomize_norms(*modules: nn.Module, seed: int = 0) -> None:
    """Non-trivial RMSNorm weights, so that e.g. swapping enorm and hnorm changes the result."""
    g = _gen(seed)
    with torch.no_grad():
        for m in modules:
            for name, p in m.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.5 * torch.rand(p.shape, generator=g))


def _build(cfg: ModelConfig, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = DeepSeekModel(cfg)
    mtps = make_mtp_modules(cfg)
    _randomize_norms(model, *mtps, seed=seed)
    return model.to(dtype), mtps.to(dtype)


# ---- the independent reference: explicit loops over depths and positions, fp64 ------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean() + eps) * w


def _reference_loss(model: DeepSeekModel, mtps, tokens: torch.Tensor, lam: float, mask=None,
                    prefix_runs: bool = False) -> torch.Tensor:
    """DeepSeek-V3 §2.2 written out: depth k predicts t_{i+k+1} from h^{k-1}_i and Emb(t_{i+k}).

    ``prefix_runs``: compute each h^k_i by running the decoder layer on positions 0..i only (slow;
    shows that only earlier positions matter, so truncating to the valid positions is exact).
    """
    model, mtps = model.double(), [m.double() for m in mtps]
    eps = model.cfg.rms_norm_eps
    b_sz, s = tokens.shape
    emb, w_head = model.embed.weight, model.head.weight
    with torch.no_grad():
        h_prev = emb[tokens]
        for layer in model.layers:          # the main trunk; no final norm (h^0)
            h_prev = layer(h_prev)
        ces = []
        for k, mod in enumerate(mtps, start=1):
            n = s - 1 - k
            if n <= 0:
                ces.append(torch.zeros((), dtype=torch.float64))
                continue
            h_new = torch.zeros(b_sz, n, model.cfg.hidden_size, dtype=torch.float64)
            num = torch.zeros((), dtype=torch.float64)
            den = torch.zeros((), dtype=torch.float64)
            for b in range(b_sz):
                x = torch.stack([
                    mod.eh_proj.weight @ torch.cat([_rms(emb[tokens[b, i + k]], mod.enorm.weight, eps),
                                                    _rms(h_prev[b, i], mod.hnorm.weight, eps)])
                    for i in range(n)])
                full = None if prefix_runs else mod.layer(x[None])[0]
                for i in range(n):
                    # causal: position i's output only depends on positions <= i
                    h_new[b, i] = mod.layer(x[None, :i + 1])[0, i] if prefix_runs else full[i]
                    z = w_head @ _rms(h_new[b, i], mod.shared_head.norm.weight, eps)
                    target = int(tokens[b, i + k + 1])
                    weight = 1.0 if mask is None else float(mask[b, i + k + 1])
                    nll = torch.logsumexp(z, 0) - z[target]
                    if weight != 0.0:
                        num = num + weight * nll
                    den = den + weight
            ces.append(num / max(float(den), 1.0))
            h_prev = h_new
    return lam / len(mtps) * sum(ces)


# ---- module -------------------------------------------------------------------------------------
def test_module_structure_and_shapes():
    model, mtps = _build(TINY_D2)
    assert len(mtps) == 2
    for d, m in enumerate(mtps):
        assert m.depth_index == d and m.layer_id == TINY_D2.num_hidden_layers + d
        assert isinstance(m.layer.ffn, MoE)
        assert m.eh_proj.weight.shape == (TINY.hidden_size, 2 * TINY.hidden_size) and m.eh_proj.bias is None
        assert m.checkpoint_prefix == f"model.layers.{2 + d}."
    # the shared embedding / head are not owned by the MTP module
    assert not any(k.startswith(("embed", "head", "shared_head.head")) for k in mtps[0].state_dict())
    tokens = _tokens(2, 5, seed=1)
    h = final_hidden(model, tokens)
    assert h.shape == (2, 5, TINY.hidden_size)
    assert torch.equal(model.head(model.norm(h)), model(tokens))     # pre-norm hidden of the same trunk
    logits, h_out = mtps[0](h, tokens, model.embed, model.head)
    assert logits.shape == (2, 5, TINY.vocab_size) and h_out.shape == h.shape
    assert torch.equal(logits, model.head(mtps[0].shared_head.norm(h_out)))
    assert torch.equal(h_out, mtps[0].hidden(h, tokens, model.embed))
    logits2, _ = mtps[1](h_out, tokens, model.embed, model.head)
    assert logits2.shape == logits.shape and torch.isfinite(logits2).all()


def test_module_embedding_first_in_concat():
    model, mtps = _build(TINY)
    m = mtps[0]
    tokens = _tokens(1, 4, seed=2)
    h = final_hidden(model, tokens)
    captured = {}
    m.eh_proj.register_forward_pre_hook(lambda mod, inp: captured.update(x=inp[0]))
    m(h, tokens, model.embed, model.head)
    x = captured["x"]
    torch.testing.assert_close(x[..., :TINY.hidden_size], m.enorm(model.embed(tokens)), rtol=0, atol=0)
    torch.testing.assert_close(x[..., TINY.hidden_size:], m.hnorm(h), rtol=0, atol=0)


def test_module_bad_inputs():
    model, mtps = _build(TINY)
    h = torch.zeros(1, 4, TINY.hidden_size)
    with pytest.raises(DsrError, match="next_tokens"):
        mtps[0](h, torch.zeros(1, 3, dtype=torch.long), model.embed, model.head)
    with pytest.raises(DsrError, match=r"bad h"):
        mtps[0](torch.zeros(1, 4, 7), torch.zeros(1, 4, dtype=torch.long), model.embed, model.head)
    with pytest.raises(DsrError, match="depth_index"):
        MTPModule(TINY, -1)


# ---- loss ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [TINY, TINY_D2], ids=["D1", "D2"])
def test_loss_matches_reference_fp64(cfg):
    model, mtps = _build(cfg, seed=3, dtype=torch.float64)
    tokens = _tokens(2, 6, seed=4)
    loss = mtp_loss(final_hidden(model, tokens), tokens, model, mtps, lam=0.3)
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    ref = _reference_loss(model, mtps, tokens, lam=0.3, prefix_runs=cfg.num_nextn_predict_layers == 2)
    torch.testing.assert_close(loss.detach(), ref, **F64_TOL)
    # the module form and the per-depth list agree
    torch.testing.assert_close(MTPLoss(model, mtps, lam=0.3)(final_hidden(model, tokens), tokens).detach(), ref,
                               **F64_TOL)
    ces = mtp_cross_entropies(final_hidden(model, tokens), tokens, model.embed, model.head, mtps)
    assert len(ces) == cfg.num_nextn_predict_layers
    assert all(2.0 < float(c.detach()) < 20.0 for c in ces)   # around ln(1024) ~ 6.9 for random weights


def test_loss_fp32_close_to_fp64_reference():
    model, mtps = _build(TINY_D2, seed=5)
    tokens = _tokens(2, 6, seed=6)
    loss = mtp_loss(final_hidden(model, tokens), tokens, model, mtps, lam=0.1)
    assert loss.dtype == torch.float32
    ref = _reference_loss(model, mtps, tokens, lam=0.1)
    torch.testing.assert_close(loss.detach().double(), ref, rtol=1e-4, atol=1e-5)


def test_loss_mask_and_short_sequences():
    model, mtps = _build(TINY_D2, seed=7, dtype=torch.float64)
    tokens = _tokens(2, 7, seed=8)
    h = final_hidden(model, tokens)
    mask = torch.ones(2, 7)
    mask[0, 4], mask[1, 6], mask[1, 3] = 0.0, 0.0, 0.5            # a weighted and two dropped targets
    ref = _reference_loss(model, mtps, tokens, lam=0.3, mask=mask)
    torch.testing.assert_close(mtp_loss(h, tokens, model, mtps, mask=mask).detach(), ref, **F64_TOL)
    # everything masked (a bool mask): exactly 0, never NaN
    assert float(mtp_loss(h, tokens, model, mtps, mask=torch.zeros(2, 7, dtype=torch.bool)).detach()) == 0.0
    # S = 3: depth 2 has no target (t_{i+3}) and contributes exactly 0; depth 1 has one position
    short = tokens[:, :3]
    ces = mtp_cross_entropies(final_hidden(model, short), short, model.embed, model.head, mtps)
    assert float(ces[1]) == 0.0 and float(ces[0].detach()) > 0.0
    torch.testing.assert_close((0.3 / 2 * (ces[0] + ces[1])).detach(),
                               _reference_loss(model, mtps, short, lam=0.3), **F64_TOL)


def test_loss_valid_positions_only():
    """Changing the last token changes depth-1's target only at the last valid position; the last
    two hidden positions of h^0 never enter depth 1 (no target)."""
    model, mtps = _build(TINY, seed=9)
    tokens = _tokens(1, 6, seed=10)
    h = final_hidden(model, tokens).detach().requires_grad_(True)
    mtp_loss(h, tokens, model, mtps).backward()
    assert h.grad[:, :4].abs().sum() > 0
    assert torch.equal(h.grad[:, 4:], torch.zeros_like(h.grad[:, 4:]))


def test_gradients_flow():
    model, mtps = _build(TINY, seed=11)
    tokens = _tokens(2, 5, seed=12)
    loss = mtp_loss(final_hidden(model, tokens), tokens, model, mtps)
    loss.backward()
    m = mtps[0]
    for name, p in [("eh_proj", m.eh_proj.weight), ("enorm", m.enorm.weight), ("hnorm", m.hnorm.weight),
                    ("shared_head.norm", m.shared_head.norm.weight), ("layer.attn.wq_a", m.layer.attn.wq_a.weight),
                    ("embed", model.embed.weight), ("head", model.head.weight),
                    ("trunk", model.layers[0].attn.wkv_a.weight)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model.norm.weight.grad is None      # the main final norm is not on the MTP path


def test_loss_bad_inputs():
    model, mtps = _build(TINY)
    tokens = _tokens(1, 5, seed=13)
    h = final_hidden(model, tokens)
    with pytest.raises(DsrError, match="main_hidden"):
        mtp_loss(h[:, :4], tokens, model, mtps)
    with pytest.raises(DsrError, match="mtp_modules"):
        mtp_loss(h, tokens, model, [])
    with pytest.raises(DsrError, match="lam"):
        mtp_loss(h, tokens, model, mtps, lam=float("nan"))
    with pytest.raises(DsrError, match="mask"):
        mtp_loss(h, tokens, model, mtps, mask=torch.ones(1, 4))
    with pytest.raises(DsrError, match="tokens"):
        mtp_loss(h, tokens.float(), model, mtps)


# ---- checkpoints --------------------------------------------------------------------------------
def test_mtp_name_mapping():
    cases = {
        "eh_proj.weight": "eh_proj.weight",
        "enorm.weight": "enorm.weight",
        "hnorm.weight": "hnorm.weight",
        "shared_head.norm.weight": "shared_head.norm.weight",
        "input_layernorm.weight": "layer.attn_norm.weight",
        "post_attention_layernorm.weight": "layer.ffn_norm.weight",
        "self_attn.kv_a_proj_with_mqa.weight": "layer.attn.wkv_a.weight",
        "self_attn.q_a_layernorm.weight": "layer.attn.q_norm.weight",
        "mlp.gate.weight": "layer.ffn.gate.weight",
        "mlp.gate.e_score_correction_bias": "layer.ffn.gate.e_score_correction_bias",
        "mlp.experts.15.down_proj.weight": "layer.ffn.experts.15.w2.weight",
        "mlp.shared_experts.up_proj.weight": "layer.ffn.shared_experts.w3.weight",
    }
    for hf, ours in cases.items():
        assert mtp_hf_to_ours(hf) == ours and mtp_ours_to_hf(ours, "model.layers.61.") == "model.layers.61." + hf
    # every MTPModule tensor has a distinct HF name that maps back
    names = MTPModule(TINY).state_dict()
    hf = {mtp_ours_to_hf(k) for k in names}
    assert len(hf) == len(names) and {mtp_hf_to_ours(h) for h in hf} == set(names)


MTP_FP8 = ("eh_proj.weight", "layer.ffn.experts.3.w1.weight")


def _hf_checkpoint(model: DeepSeekModel, mtps, shared_copies: bool = True) -> dict[str, torch.Tensor]:
    """HF DeepSeek-V3 names for the model and its MTP layers; MTP_FP8 weights become FP8 (+ scale)."""
    out = {ours_to_hf(k): v.clone() for k, v in model.state_dict().items()}
    for m in mtps:
        pre = m.checkpoint_prefix
        for name, t in m.state_dict().items():
            if name in MTP_FP8:
                q, s = quantize_fp8_blocks(t)
                with torch.no_grad():
                    t.copy_(dequantize_fp8_blocks(q, s))
                out[mtp_ours_to_hf(name, pre)], out[mtp_ours_to_hf(name, pre) + "_scale_inv"] = q, s
            else:
                out[mtp_ours_to_hf(name, pre)] = t.clone()
        if shared_copies:
            out[pre + "embed_tokens.weight"] = model.embed.weight.detach().clone()
            out[pre + "shared_head.head.weight"] = model.head.weight.detach().clone()
    return out


def test_checkpoint_roundtrip_model_with_mtp(tmp_path):
    src, src_mtp = _build(TINY_D2, seed=14)
    tensors = _hf_checkpoint(src, src_mtp)
    assert tensors["model.layers.2.eh_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.3.mlp.experts.3.gate_proj.weight_scale_inv" in tensors
    path = tmp_path / "model.safetensors"
    save_safetensors(tensors, path)
    # without mtp= the MTP layers are unknown tensors, and the hint says how to load them
    with pytest.raises(DsrError, match="unknown") as e:
        load_state_dict_safetensors(DeepSeekModel(TINY_D2), path)
    assert "mtp=" in str(e.value) and "model.layers.2.eh_proj.weight" in str(e.value)
    torch.manual_seed(99)
    dst, dst_mtp = DeepSeekModel(TINY_D2), make_mtp_modules(TINY_D2)
    assert load_state_dict_safetensors(dst, path, mtp=dst_mtp) is dst
    for a, b in [(src, dst), *zip(src_mtp, dst_mtp)]:
        for name, t in a.state_dict().items():
            assert torch.equal(b.state_dict()[name], t), name
    tokens = _tokens(2, 6, seed=15)
    assert torch.equal(mtp_loss(final_hidden(dst, tokens), tokens, dst, dst_mtp),
                       mtp_loss(final_hidden(src, tokens), tokens, src, src_mtp))
    h = final_hidden(src, tokens)
    assert torch.equal(dst_mtp[1](h, tokens, dst.embed, dst.head)[0], src_mtp[1](h, tokens, src.embed, src.head)[0])


def test_checkpoint_mtp_module_alone(tmp_path):
    src, src_mtp = _build(TINY, seed=16)
    save_safetensors(_hf_checkpoint(src, src_mtp), tmp_path / "m.safetensors")
    tokens = _tokens(1, 5, seed=17)
    h = final_hidden(src, tokens)
    want = src_mtp[0](h, tokens, src.embed, src.head)[0]
    # default prefix is the module's own (model.layers.2.); the shared copies are skipped
    m1 = load_state_dict_safetensors(MTPModule(TINY), tmp_path / "m.safetensors")
    m2 = load_state_dict_safetensors(MTPModule(TINY), tmp_path / "m.safetensors", prefix="model.layers.2.")
    for m in (m1, m2):
        assert torch.equal(m(h, tokens, src.embed, src.head)[0], want)
    # shared=(embed, head): the copies load into the given modules
    embed, head = nn.Embedding(TINY.vocab_size, TINY.hidden_size), nn.Linear(TINY.hidden_size, TINY.vocab_size,
                                                                             bias=False)
    m3 = load_state_dict_safetensors(MTPModule(TINY), tmp_path / "m.safetensors", shared=(embed, head))
    assert torch.equal(embed.weight, src.embed.weight) and torch.equal(head.weight, src.head.weight)
    assert torch.equal(m3(h, tokens, embed, head)[0], want)
    # a checkpoint without the copies still loads with the default shared="skip"
    save_safetensors(_hf_checkpoint(src, src_mtp, shared_copies=False), tmp_path / "n.safetensors")
    load_state_dict_safetensors(MTPModule(TINY), tmp_path / "n.safetensors")
    with pytest.raises(DsrError, match="2 missing") as e:
        load_state_dict_safetensors(MTPModule(TINY), tmp_path / "n.safetensors", shared=(embed, head))
    assert "model.layers.2.embed_tokens.weight" in str(e.value)
    assert "model.layers.2.shared_head.head.weight" in str(e.value)


def test_checkpoint_mtp_mismatches_reported_together(tmp_path):
    src, src_mtp = _build(TINY, seed=18)
    tensors = _hf_checkpoint(src, src_mtp)
    del tensors["model.layers.2.enorm.weight"]                                       # missing
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]                       # missing
    tensors["model.layers.2.bogus.weight"] = torch.zeros(3)                          # unknown
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(256, 512)                 # unknown (a 2nd depth)
    tensors["model.layers.2.hnorm.weight"] = torch.zeros(7)                          # mis-shaped
    tensors["model.layers.2.shared_head.head.weight"] = torch.zeros(10, 256)        # mis-shaped shared copy
    path = tmp_path / "bad.safetensors"
    save_safetensors(tensors, path)
    with pytest.raises(DsrError) as e:
        load_state_dict_safetensors(DeepSeekModel(TINY), path, mtp=make_mtp_modules(TINY))
    msg = str(e.value)
    for needle in ("2 missing", "2 mis-shaped", "2 unknown", "model.layers.2.enorm.weight -> mtp.0.enorm.weight",
                   "model.layers.2.mlp.experts.5.up_proj.weight -> mtp.0.layer.ffn.experts.5.w3.weight",
                   "model.layers.2.bogus.weight", "model.layers.3.eh_proj.weight",
                   "model.layers.2.hnorm.weight -> mtp.0.hnorm.weight: shape (7,), expected (256,)",
                   "shared_head.head.weight (shared copy, not loaded): shape (10, 256)", "MTPModule", str(path)):
        assert needle in msg, (needle, msg)
    # the same checkpoint against one MTPModule (its own prefix): the other depth is simply not selected
    with pytest.raises(DsrError) as e:
        load_state_dict_safetensors(MTPModule(TINY), path)
    msg = str(e.value)
    for needle in ("2 missing", "2 mis-shaped", "1 unknown", "model.layers.2.enorm.weight -> enorm.weight",
                   "model.layers.2.bogus.weight"):
        assert needle in msg, (needle, msg)
    load_state_dict_safetensors(DeepSeekModel(TINY), path, strict=False)   # the main model alone still loads


def test_checkpoint_mtp_argument_errors(tmp_path):
    src, src_mtp = _build(TINY_D2, seed=19)
    save_safetensors(_hf_checkpoint(src, src_mtp), tmp_path / "m.safetensors")
    path = tmp_path / "m.safetensors"
    with pytest.raises(DsrError, match="expected layer 2"):
        load_state_dict_safetensors(DeepSeekModel(TINY_D2), path, mtp=[MTPModule(TINY_D2, 1)])
    with pytest.raises(DsrError, match="whole DeepSeekModel"):
        load_state_dict_safetensors(MoE(TINY_D2), path, prefix="model.layers.1.mlp.", mtp=[MTPModule(TINY_D2)])
    with pytest.raises(DsrError, match="shared"):
        load_state_dict_safetensors(MTPModule(TINY_D2), path, shared="load")
    with pytest.raises(DsrError, match="MTPModule alone"):
        load_state_dict_safetensors(DeepSeekModel(TINY_D2), path, mtp=make_mtp_modules(TINY_D2),
                                    shared=(src.embed, src.head))
    # one depth given, two stored: the second is unknown unless strict=False
    with pytest.raises(DsrError, match="unknown"):
        load_state_dict_safetensors(DeepSeekModel(TINY_D2), path, mtp=[MTPModule(TINY_D2, 0)])
    load_state_dict_safetensors(DeepSeekModel(TINY_D2), path, mtp=[MTPModule(TINY_D2, 0)], strict=False)
