"""`dsrc` end to end: the dump layout, run --check, ir, and bad inputs (exit 2, no traceback)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsr_compiler.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("DSR_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "dsr_compiler", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=600)


def test_compile_writes_documented_layout(tmp_path):
    out = tmp_path / "d"
    r = run_cli("compile", "--module", "mlp", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "k2_gemm_fp8_swiglu_quant" in r.stdout        # --fp8 is the default (DESIGN.md section 3)
    irs = sorted(p.name for p in (out / "ir").iterdir())
    from dsr_compiler.ir.passes import PIPELINE
    names = ["trace"] + [n for n, _ in PIPELINE]
    assert irs == sorted(f"{i:02d}_{n}.{ext}" for i, n in enumerate(names) for ext in ("diff", "ir"))
    assert irs[-1].endswith("_fuse.ir")
    import dsr_compiler as dsr
    for p in (out / "ir").glob("*.ir"):
        text = p.read_text()
        assert text.startswith("# dsr-ir 1 | graph mlp")
        g = dsr.ir.parse(text)
        assert dsr.ir.parse(str(g)) == g
    rep = json.loads((out / "report.json").read_text())
    assert rep["graph"] == "mlp" and rep["kernels"]
    for k in rep["kernels"]:
        for ext in ("py", "ptx", "cubin"):
            assert (out / "kernels" / f"{k['name']}.{ext}").is_file()
        assert k["registers"] > 0 and "spills" in k and k["template"].endswith(".py.j2")
        assert k["roofline_us_h200"] > 0 and k["source_nodes"]
    ptx = (out / "kernels" / f"{rep['kernels'][0]['name']}.ptx").read_text()
    assert ".target sm_90a" in ptx


def test_run_check_interpret_exits_zero():
    r = run_cli("run", "--module", "mlp", "--backend", "interpret", "--check", "--seq", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check passed" in r.stdout and "max abs err" in r.stdout


def test_ir_after_pass_prints_parseable_ir(capsys):
    assert main(["ir", "--module", "mlp", "--after", "fuse"]) == 0
    text = capsys.readouterr().out
    import dsr_compiler as dsr
    g = dsr.ir.parse(text)
    assert g.kernels and all(n.op in ("call", "reshape", "const") for n in g.nodes)


@pytest.mark.parametrize("args, needle", [
    (["compile", "--config", "/nonexistent/config.json"], "config"),
    (["compile", "--model", "deepseek-v9"], "deepseek-v9"),
    (["compile", "--module", "nonsense"], "invalid choice"),
    (["compile", "--module", "mlp", "--batch", "0"], "--batch"),
    (["ir", "--after", "nopass"], "nopass"),
    (["compile", "--module", "grpo", "--phase", "prefill"], "--phase"),
    (["run", "--backend", "cuda", "--module", "mlp"], "cuda"),
])
def test_bad_inputs_exit_2_without_traceback(tmp_path, args, needle):
    if args[:3] == ["run", "--backend", "cuda"]:
        import torch
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("content, needle", [
    ("{not json", "JSON"),
    ('{"hidden_size": "big"}', "vocab_size"),   # the first missing field is named
    ("[1, 2]", "object"),
])
def test_bad_config_files_exit_2(tmp_path, content, needle):
    p = tmp_path / "config.json"
    p.write_text(content)
    out = tmp_path / "d"
    r = run_cli("compile", "--config", str(p), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".d.tmp-*"))  # nothing half-written


@pytest.mark.parametrize("field, value", [("num_attention_heads", -4), ("hidden_size", "big"), ("vocab_size", 12.5)])
def test_bad_field_in_real_config_exits_2(tmp_path, field, value):
    src = REPO / "dsr_compiler" / "models" / "specs" / "deepseek-v3.hf-config.json"
    d = json.loads(src.read_text())
    d[field] = value
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    r = run_cli("compile", "--config", str(p), cwd=tmp_path)
    assert r.returncode == 2 and field in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bare_run_check_is_the_decoder_layer_with_fp8():
    r = run_cli("run", "--backend", "interpret", "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check passed" in r.stdout and "FP8" in r.stdout


@pytest.mark.parametrize("bad,env", [
    (["--fp8-policy", '{"scale_fmt": "e8m0"}'], {}),           # a policy field out of its choices
    (["--fp8-policy", '{"attn": 1}'], {}),                     # a field of the wrong type
    ([], {"DSR_PTX": "gemm"}),                                 # a family without PTX templates
    ([], {"DSR_BACKEND": "gpu"}),                              # a knob out of its choices
])
def test_ir_validates_options_like_compile(bad, env, capsys, monkeypatch):
    """`dsrc ir` builds the same CompileOptions as `dsrc compile`: a bad option or knob is the same
    one-paragraph error (exit 2, no traceback) from both."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("DSR_DEBUG", raising=False)
    errors = {}
    for cmd in ("compile", "ir"):
        assert main([cmd, "--module", "mlp", *bad]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith(f"dsrc {cmd}: ")
        errors[cmd] = err.removeprefix(f"dsrc {cmd}: ")
    assert errors["ir"] == errors["compile"]
