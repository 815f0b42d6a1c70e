"""Knobs: typed parsing, scoping, and the DSR_DEBUG ladder of dsr.compile."""
import pytest
import torch

import dsr_compiler as dsr
from dsr_compiler import knobs
from dsr_compiler.models import ModelConfig
from dsr_compiler.models.layers import MLPBlock


def test_bad_knob_value_is_a_user_error():
    with knobs.scoped(DSR_DEBUG="lots"), pytest.raises(dsr.DsrError, match="DSR_DEBUG"):
        knobs.get("DSR_DEBUG")


def test_unknown_knob_is_refused():
    with pytest.raises(KeyError):
        knobs.get("DSR_NOPE")


def test_debug_ladder_and_backend_knob(capsys):
    m = MLPBlock(ModelConfig.named("deepseek-v3-tiny").replace(hidden_size=64, intermediate_size=128)).eval()
    x = torch.randn(3, 64)
    with knobs.scoped(DSR_DEBUG=4, DSR_BACKEND="interpret"):
        cm = dsr.compile(m, (x,), dynamic={"x": {0: "T"}})
    err = capsys.readouterr().err
    assert f"{len(cm.kernels)} kernels" in err                      # 1: summary
    assert "pass 1/" in err and " ms" in err                         # 2: timings
    assert "---- k1_" in err and "@triton.jit" in err                # 4: generated source
    assert "# dsr-ir 1" not in err                                   # 5 not reached
    assert cm.options["backend"] == "interpret"
    with knobs.scoped(DSR_DEBUG=0):
        dsr.compile(m, (x,), dynamic={"x": {0: "T"}}, backend="interpret")
    assert capsys.readouterr().err == ""
