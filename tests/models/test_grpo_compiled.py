"""The GRPO objective compiled with gradients (`dsr.compile(..., grad_wrt=...)`) on the interpreter
backend: loss, d hidden and d lm_head_weight against eager autograd of the zoo's GRPOLoss."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples  # noqa: E402  per-test budget from the active profile

import dsr_compiler as dsr
from dsr_compiler.grads import eager_loss_and_grads
from dsr_compiler.models.grpo import (
    LOSS_TYPES,
    GRPOLoss,
    group_advantages,
    per_token_logps,
)
from tests.tolerances import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
WRT = ("hidden", "lm_head_weight")
VOCAB_FAMILIES = {"vocab_logprobs", "vocab_grad_hidden", "vocab_grad_weight"}


def make_inputs(groups: int, group: int, length: int, h: int, v: int, seed: int, *, temperature: float = 1.0,
                old: bool = True, ref: bool = True, empty_rows: tuple[int, ...] = (), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = groups * group
    hid = torch.randn(n, length, h, generator=g).to(dtype)
    w = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype)
    ids = torch.randint(0, v, (n, length), generator=g)
    mask = (torch.rand(n, length, generator=g) > 0.25).float()
    for r in empty_rows:
        mask[r % n] = 0.0
    adv = group_advantages(torch.randn(n, generator=g), group, "group" if group > 1 else "none")
    with torch.no_grad():
        logp = per_token_logps(hid, w, ids, temperature).float()
    old_l = logp + 0.2 * torch.randn(n, length, generator=g) if old else None   # some ratios clip
    ref_l = logp + 0.3 * torch.randn(n, length, generator=g) if ref else None
    return hid, w, ids, mask, adv, old_l, ref_l


def compile_and_check(m: GRPOLoss, inputs: tuple, dtype=torch.float32) -> tuple:
    cm = dsr.compile(m, inputs, grad_wrt=WRT, backend="interpret", fp8=False)
    fams = {k.spec.family for k in cm.kernels}
    assert VOCAB_FAMILIES <= fams and "gather" not in fams
    loss, grads = cm(*inputs)
    ref_loss, ref_grads = eager_loss_and_grads(m, inputs, WRT)
    assert_close(loss, ref_loss)
    for n in WRT:
        assert grads[n].dtype == inputs[WRT.index(n)].dtype and grads[n].shape == inputs[WRT.index(n)].shape
        assert_close(grads[n], ref_grads[n], dtype)
    return cm, loss, grads


@settings(max_examples=examples(8))
@given(groups=st.integers(1, 2), group=st.sampled_from([1, 2, 3]), length=st.integers(1, 6),
       h=st.sampled_from([16, 24, 40]), v=st.sampled_from([17, 50, 97, 130]), loss_type=st.sampled_from(LOSS_TYPES),
       beta=st.sampled_from([0.0, 0.04]), eps_high=st.sampled_from([0.2, 0.28]), old=st.booleans(),
       temperature=st.sampled_from([1.0, 0.7]), empty=st.booleans(), seed=st.integers(0, 2**16))
def test_grpo_loss_and_grads_match_eager_autograd(groups, group, length, h, v, loss_type, beta, eps_high, old,
                                                  temperature, empty, seed):
    m = GRPOLoss(loss_type, beta=beta, epsilon=0.2, epsilon_high=eps_high, temperature=temperature,
                 max_completion_length=length + 2 if loss_type == "dr_grpo" else None)
    inputs = make_inputs(groups, group, length, h, v, seed, temperature=temperature, old=old, ref=beta > 0 or old,
                         empty_rows=(seed,) if empty else ())
    compile_and_check(m, inputs)


def test_grpo_bf16_head():
    m = GRPOLoss("dapo", beta=0.04, epsilon=0.2, epsilon_high=0.28, temperature=0.9)
    compile_and_check(m, make_inputs(2, 2, 5, 32, 70, 1, temperature=0.9, dtype=torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_and_an_all_masked_batch(loss_type):
    """One compile per loss type: a batch with an empty completion matches eager autograd; an
    all-masked batch gives exactly 0 with exactly zero gradients (the eager reference's contract)."""
    m = GRPOLoss(loss_type, beta=0.04, epsilon=0.2, epsilon_high=0.28, temperature=1.2)
    inputs = make_inputs(2, 2, 3, 16, 20, 2, temperature=1.2, empty_rows=(1,))
    cm, _, _ = compile_and_check(m, inputs)
    hid, w, ids, mask, adv, old, ref = inputs
    loss, grads = cm(hid, w, ids, torch.zeros_like(mask), adv, old, ref)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_extreme_logits_stay_finite():
    """Logits of magnitude ~1e4 (old log-probs = the current ones: ratios 1, no overflow in exp)."""
    m = GRPOLoss("bnpo", beta=0.0)
    hid, w, ids, mask, adv, _, _ = make_inputs(1, 2, 4, 16, 30, 3)
    w = torch.sign(w) * 1e4 / 16
    hid = torch.sign(hid)
    assert (hid @ w.T).abs().max() > 5e3
    _cm, loss, grads = compile_and_check(m, (hid, w, ids, mask, adv, None, None))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_no_vocab_sized_buffer_in_the_plan():
    """Every value the compiled graph holds between kernels is a per-token vector, a gradient, or smaller."""
    n, length, h, v = 2, 3, 16, 97
    m = GRPOLoss("grpo", beta=0.04)
    cm = dsr.compile(m, make_inputs(1, n, length, h, v, 4), grad_wrt=WRT, backend="interpret", fp8=False)
    biggest_input = max(int(x.type.numel) for x in cm.graph.inputs)
    for node in cm.graph.nodes:
        for o in node.outputs:
            assert int(o.type.numel) <= biggest_input, (node.op, str(o.type))
            assert v not in [int(d) for d in o.type.shape] or o.type.shape == (v, h), str(o.type)


def test_forward_only_compile_matches():
    m = GRPOLoss("grpo", beta=0.04, epsilon_high=0.28, temperature=0.8)
    inputs = make_inputs(2, 2, 4, 16, 40, 5, temperature=0.8)
    cm = dsr.compile(m, inputs, backend="interpret", fp8=False)
    with torch.no_grad():
        assert_close(cm(*inputs), m(*inputs))


def test_cli_run_check_compares_loss_and_both_grads(monkeypatch, capsys):
    from dsr_compiler import cli
    from dsr_compiler.models import ModelConfig
    small = ModelConfig.named("deepseek-v3-tiny").replace(hidden_size=32, vocab_size=97)
    monkeypatch.setattr(cli, "_config", lambda args: small)
    assert cli.main(["run", "--module", "grpo", "--backend", "interpret", "--check", "--seq", "3", "--no-fp8"]) == 0
    out = capsys.readouterr().out
    for what in ("loss", "dhidden", "dlm_head_weight"):
        assert f"check {what} vs eager autograd" in out
    assert "check passed" in out
