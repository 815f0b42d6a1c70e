"""The FP8 recipe end to end on a zoo module (RMSNorm + SwiGLU MLP + residual, deepseek-v3-tiny widths):
compiled with fp8=True and run by the interpreter backend, checked loosely against eager in the module's
own dtype (tolerance "fp8") and tightly against eager running the same quantization (a hand-written
simulation and models/fp8_ref.py; tolerance "fp8_sim"; both derived in dsr_compiler/tolerance.py). Also:
the report, FP8 checkpoints taken as-is (keep_fp8), the DSR_PTX knob, and the CLI default (--fp8)."""
from __future__ import annotations

import json

import pytest
import torch
from dsr_compiler.ir.ops.fp8 import (
    dequant_fp8_ref,
    dequant_weight_ref,
    quant_fp8_ref,
    quant_weight_ref,
)

import dsr_compiler as dsr
from dsr_compiler.errors import DsrError
from dsr_compiler.models import ModelConfig
from dsr_compiler.models.fp8_ref import fp8_reference
from dsr_compiler.models.layers import MLPBlock
from dsr_compiler.models.weights import (
    load_state_dict_safetensors,
    quantize_fp8_blocks,
    save_safetensors,
)
from dsr_compiler.tolerance import compare_fp8
from dsr_compiler.workloads import build

CFG = ModelConfig.named("deepseek-v3-tiny")


def _simulated(m: MLPBlock, x: torch.Tensor) -> torch.Tensor:
    """The FP8 recipe written out in torch on the eager module, independent of the compiler."""
    dt = x.dtype

    def lin(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        aq, as_ = quant_fp8_ref(a)
        wq, ws = quant_weight_ref(w)
        return (dequant_fp8_ref(aq, as_) @ dequant_weight_ref(wq, ws).T).bfloat16().to(dt)
    n = m.norm(x)
    h = torch.nn.functional.silu(lin(n, m.mlp.w1.weight)) * lin(n, m.mlp.w3.weight)
    return x + lin(h, m.mlp.w2.weight)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_fp8_mlp_vs_eager_and_vs_simulated_quantization(dtype):
    wl = build(CFG, "mlp", 1, 8, dtype)
    cm = dsr.compile(wl.module, wl.example_inputs, fp8=True, backend="interpret", dynamic=wl.dynamic, name="mlp")
    x = wl.make_inputs(11, 3)[0]                       # another token count than the example's
    with torch.no_grad():
        y = cm(x)
        eager = wl.module(x)
        sim = _simulated(wl.module, x)
        recipe = fp8_reference(wl.module)(x)             # the zoo module with FP8 linears in plain torch
    loose = compare_fp8(y, eager, "fp8")
    assert loose["ok"], loose
    assert loose["calc_diff"] > 1e-5                 # it really is quantized
    for ref in (sim, recipe):
        tight = compare_fp8(y, ref, "fp8_sim")
        assert tight["ok"], tight


def test_report_plan_and_derived_params(tmp_path):
    wl = build(CFG, "mlp", 1, 8, "bf16")
    cm = dsr.compile(wl.module, wl.example_inputs, fp8={"scale_fmt": "ue8m0"}, backend="interpret",
                     dynamic=wl.dynamic, name="mlp", ptx_families=("quant_fp8", "reduction"))
    rep = cm.report()
    assert rep["options"]["fp8"]["scale_fmt"] == "ue8m0" and rep["options"]["ptx_families"] == ["quant_fp8", "reduction"]
    fams = [k["family"] for k in rep["kernels"]]
    assert fams == ["quant_fp8", "gemm_fp8", "gemm_fp8"]          # no dequant kernel anywhere in the plan
    k1 = rep["kernels"][0]
    assert k1["backend"] == "ptx" and k1["ptx_template"] == "quant_fp8_rows.ptx.j2" and k1["spills"] == 0
    assert k1["triton_twin"]["registers"] > 0 and "Triton twin" in k1["interpret_runs"]
    assert [k["backend"] for k in rep["kernels"][1:]] == ["triton", "triton"]
    assert [d["source"] for d in rep["derived_params"]] == ["compile-time"] * 3
    assert {p for d in rep["derived_params"] for p in d["outputs"]} <= set(cm.graph.params)
    assert "mlp.w1.weight" not in cm.graph.params                  # the bf16 weight is not shipped
    with torch.no_grad():                                          # the PTX kernel's Triton twin runs here
        r = compare_fp8(cm(wl.example_inputs[0]), wl.module(wl.example_inputs[0]), "fp8")
    assert r["ok"], r
    out = cm.dump(tmp_path / "d")
    names = sorted(p.name for p in (out / "kernels").iterdir())
    assert "k1_quant_fp8_rms_norm.ptx" in names and "k1_quant_fp8_rms_norm.triton.ptx" in names
    (qir,) = [p for p in (out / "ir").iterdir() if p.name.endswith("_quantize_fp8.ir")]
    assert "gemm_fp8(" in qir.read_text()
    assert json.loads((out / "report.json").read_text())["derived_params"][0]["rule"] == "fp8_block_quant"


def test_fp8_checkpoint_weights_are_used_as_stored(tmp_path):
    torch.manual_seed(0)
    m = MLPBlock(CFG).bfloat16().eval()
    ckpt = {}
    kept = {}
    for ours, hf in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        w = torch.randn_like(getattr(m.mlp, ours).weight, dtype=torch.float32) / 16
        q, s = quantize_fp8_blocks(w)
        ckpt[f"model.layers.0.mlp.{hf}.weight"], ckpt[f"model.layers.0.mlp.{hf}.weight_scale_inv"] = q, s
        kept[ours] = (q, s)
    save_safetensors(ckpt, tmp_path / "m.safetensors")
    load_state_dict_safetensors(m.mlp, tmp_path / "m.safetensors", prefix="model.layers.0.mlp.", keep_fp8=True)
    assert m.mlp.w1.weight_fp8.dtype == torch.float8_e4m3fn and m.mlp.w1.weight_scale_inv.shape == (4, 2)
    assert "mlp.w1.weight_fp8" not in m.state_dict()               # kept codes are not persistent state
    x = torch.randn(8, CFG.hidden_size).bfloat16()
    cm = dsr.compile(m, (x,), fp8=True, backend="interpret", dynamic={"x": {0: "T"}}, name="mlp")
    assert [d["source"] for d in cm.report()["derived_params"]] == ["checkpoint"] * 3
    params = dict(zip(cm.graph.params, cm.params))
    for ours, (q, s) in kept.items():
        assert torch.equal(params[f"mlp.{ours}.weight.q"].view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(params[f"mlp.{ours}.weight.s"], s)
    with torch.no_grad():
        r = compare_fp8(cm(x), m(x), "fp8")
    assert r["ok"], r
    with pytest.raises(DsrError, match="block"):
        dsr.compile(m, (x,), fp8={"block": 64}, backend="interpret", dynamic={"x": {0: "T"}})


def test_cli_defaults_to_fp8_and_checks(capsys):
    from dsr_compiler.cli import main
    assert main(["run", "--module", "mlp", "--backend", "interpret", "--check", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "fp8 tolerance" in out and "check passed" in out
    assert main(["ir", "--module", "mlp", "--after", "quantize_fp8", "--seq", "8"]) == 0
    assert "gemm_fp8(" in capsys.readouterr().out
    assert main(["ir", "--module", "mlp", "--after", "quantize_fp8", "--no-fp8", "--seq", "8"]) == 0
    assert "gemm_fp8(" not in capsys.readouterr().out
    assert main(["compile", "--module", "mlp", "--fp8-policy", "{\"scale_fmt\": 1}", "--seq", "8"]) == 2
    assert "scale_fmt" in capsys.readouterr().err
