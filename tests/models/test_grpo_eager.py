"""Eager GRPO objective against an independent fp64 reference (materialized logits, explicit loops)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx
from hypothesis import given, settings
from hypothesis import strategies as st

from dsr_compiler.errors import DsrError
from dsr_compiler.models.grpo import LOSS_TYPES, GRPOLoss, group_advantages, per_token_logps

# V deliberately not a power of two
VOCABS = [3, 5, 6, 7, 11, 13, 24, 31]
EXAMPLES = max(25, settings().max_examples)     # the loaded profile (ci/dev/fuzz) may ask for more


# ---- the independent fp64 reference -------------------------------------------------------------
def ref_group_advantages(rewards, group_size, scale):
    r = [float(x) for x in rewards]
    n = len(r)

    def mean(xs):
        return sum(xs) / len(xs)

    def std(xs):        # Bessel-corrected
        m = mean(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    out = []
    for g0 in range(0, n, group_size):
        grp = r[g0:g0 + group_size]
        for x in grp:
            a = x - mean(grp)
            if scale == "group":
                a /= std(grp) + 1e-4
            elif scale == "batch":
                a /= std(r) + 1e-4
            out.append(a)
    return torch.tensor(out, dtype=torch.float64)


def ref_loss(hidden, weight, ids, mask, adv, old, ref, *, loss_type, beta, eps_lo, eps_hi, temp, max_len):
    """TRL's loss written out token by token in fp64; differentiable w.r.t. ``hidden`` and ``weight``."""
    n_seq, length, _ = hidden.shape
    logits = torch.einsum("nlh,vh->nlv", hidden.double(), weight.double()) / temp
    per_tok = [[None] * length for _ in range(n_seq)]
    for n in range(n_seq):
        a = float(adv[n])
        for t in range(length):
            row = logits[n, t]
            m = row.max().detach()
            logp = row[int(ids[n, t])] - (m + torch.log(torch.exp(row - m).sum()))
            o = logp.detach() if old is None else torch.tensor(float(old[n, t]), dtype=torch.float64)
            ratio = torch.exp(logp - o)
            r = float(ratio.detach())
            if r < 1 - eps_lo:
                clipped = torch.tensor(1 - eps_lo, dtype=torch.float64)
            elif r > 1 + eps_hi:
                clipped = torch.tensor(1 + eps_hi, dtype=torch.float64)
            else:
                clipped = ratio
            s1, s2 = ratio * a, clipped * a
            tok = -(s1 if float(s1.detach()) <= float(s2.detach()) else s2)
            if beta != 0:
                d = float(ref[n, t]) - logp
                tok = tok + beta * (torch.exp(d) - d - 1)
            per_tok[n][t] = tok
    w = [[float(mask[n, t]) for t in range(length)] for n in range(n_seq)]
    zero = torch.zeros((), dtype=torch.float64)

    def wsum(n):
        return sum((per_tok[n][t] * w[n][t] for t in range(length) if w[n][t] != 0), zero)

    total_w = sum(sum(row) for row in w)
    if loss_type == "grpo":
        return sum((wsum(n) / max(sum(w[n]), 1.0) for n in range(n_seq)), zero) / n_seq
    numer = sum((wsum(n) for n in range(n_seq)), zero)
    if loss_type == "dr_grpo":
        return numer / (n_seq * (max_len if max_len is not None else length))
    return numer / max(total_w, 1.0)            # bnpo, dapo


def ref_logps64(hidden, weight, ids, temp):
    logits = torch.einsum("...h,vh->...v", hidden.double(), weight.double()) / temp
    return torch.log_softmax(logits, -1).gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)


# ---- case generation ----------------------------------------------------------------------------
@st.composite
def grpo_cases(draw):
    c = dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        groups=draw(st.integers(1, 3)), G=draw(st.integers(1, 4)),
        L=draw(st.integers(1, 6)), H=draw(st.integers(1, 8)), V=draw(st.sampled_from(VOCABS)),
        loss_type=draw(st.sampled_from(LOSS_TYPES)),
        beta=draw(st.sampled_from([0.0, 0.04, 0.5])),
        eps_lo=draw(st.sampled_from([0.0, 0.1, 0.2])),
        eps_hi=draw(st.sampled_from([None, 0.0, 0.28])),
        temp=draw(st.sampled_from([1.0, 0.7, 1.9])),
        with_old=draw(st.booleans()), with_ref=draw(st.booleans()),
        mask_kind=draw(st.sampled_from(["prefix", "random", "weights"])),
        mask_dtype=draw(st.sampled_from([torch.bool, torch.int64, torch.float32])),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float64])),
    )
    n = c["groups"] * c["G"]
    # prefix masks: row lengths with empty rows likely
    c["lengths"] = draw(st.lists(st.integers(0, c["L"]), min_size=n, max_size=n))
    c["max_len"] = c["L"] + draw(st.sampled_from([0, 3])) if draw(st.booleans()) else None
    return c


def make_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    n, length, h, v, dtype = c["groups"] * c["G"], c["L"], c["H"], c["V"], c["dtype"]
    hidden = (torch.randn(n, length, h, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(h)).to(dtype)
    ids = torch.randint(0, v, (n, length), generator=g)
    if c["mask_kind"] == "prefix":
        mask = torch.arange(length).unsqueeze(0) < torch.tensor(c["lengths"]).unsqueeze(1)
    else:
        mask = torch.rand(n, length, generator=g) < 0.6
        mask[0] = False                                         # always one empty row
    if c["mask_kind"] == "weights":                             # a float mask weighs tokens
        mask = mask * torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (n, length), generator=g)]
    else:
        mask = mask.to(c["mask_dtype"])
    rewards = torch.randint(0, 3, (n,), generator=g).float() + torch.rand(n, generator=g)
    adv = group_advantages(rewards, c["G"], "group" if c["G"] >= 2 else "none")

    eps_hi = c["eps_lo"] if c["eps_hi"] is None else c["eps_hi"]
    logp64 = ref_logps64(hidden, weight, ids, c["temp"])
    old = None
    if c["with_old"]:
        # target ratios in [0.5, 1.6], kept >= 3e-3 away from the clip bounds (where min/clamp kink)
        target = 0.5 + 1.1 * torch.rand(n, length, generator=g, dtype=torch.float64)
        for bound in (1 - c["eps_lo"], 1 + eps_hi):
            near = (target - bound).abs() < 3e-3
            target = torch.where(near, bound + 6e-3, target)
        old = (logp64 - torch.log(target)).to(dtype)
    ref = None
    if c["with_ref"] or c["beta"] != 0:
        ref = (logp64 + 0.5 * torch.randn(n, length, generator=g, dtype=torch.float64)).to(dtype)
    return hidden, weight, ids, mask, adv, old, ref


def _grads(loss, hidden, weight):
    return torch.autograd.grad(loss, (hidden, weight), allow_unused=False)


# ---- loss and gradients vs the fp64 reference ---------------------------------------------------
@settings(max_examples=EXAMPLES)
@given(grpo_cases())
def test_loss_and_grads_match_fp64_reference(c):
    hidden, weight, ids, mask, adv, old, ref = make_inputs(c)
    mod = GRPOLoss(c["loss_type"], beta=c["beta"], epsilon=c["eps_lo"], epsilon_high=c["eps_hi"],
                   temperature=c["temp"], max_completion_length=c["max_len"])
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = mod(h, w, ids, mask, adv, old_logps=old, ref_logps=ref)
    assert loss.dim() == 0 and loss.dtype == c["dtype"]
    gh, gw = _grads(loss, h, w)

    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    eps_hi = c["eps_lo"] if c["eps_hi"] is None else c["eps_hi"]
    expect = ref_loss(h64, w64, ids, mask, adv.double(), old, ref, loss_type=c["loss_type"], beta=c["beta"],
                      eps_lo=c["eps_lo"], eps_hi=eps_hi, temp=c["temp"], max_len=c["max_len"])
    eh, ew = (torch.autograd.grad(expect, (h64, w64)) if expect.requires_grad
              else (torch.zeros_like(h64), torch.zeros_like(w64)))

    tol = dict(rtol=1e-10, atol=1e-12) if c["dtype"] == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(loss.double(), expect, **tol)
    torch.testing.assert_close(gh.double(), eh, **tol)
    torch.testing.assert_close(gw.double(), ew, **tol)


@settings(max_examples=EXAMPLES)
@given(seed=st.integers(0, 2**31 - 1), shape=st.lists(st.integers(1, 4), min_size=0, max_size=2),
       h=st.integers(1, 8), v=st.sampled_from(VOCABS), temp=st.sampled_from([1.0, 0.5, 1.7]))
def test_per_token_logps_matches_log_softmax(seed, shape, h, v, temp):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, h, generator=g) * 2
    weight = torch.randn(v, h, generator=g)
    ids = torch.randint(0, v, tuple(shape), generator=g)
    got = per_token_logps(hidden, weight, ids, temp)
    assert got.shape == tuple(shape) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_logps64(hidden, weight, ids, temp), rtol=1e-5, atol=1e-5)


def test_per_token_logps_bf16_rounds_logits_then_fp32():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 16, generator=g).bfloat16()
    weight = torch.randn(37, 16, generator=g).bfloat16()
    ids = torch.randint(0, 37, (2, 5), generator=g)
    got = per_token_logps(hidden, weight, ids, 0.8)
    assert got.dtype == torch.float32
    logits = (hidden @ weight.t()).double() / 0.8          # bf16 LM-head output, then fp32 softmax
    expect = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5)


# ---- semantics spot checks ----------------------------------------------------------------------
def _small(seed=0, n=4, length=5, h=6, v=13, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, length, h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, v, (n, length), generator=g)
    adv = torch.randn(n, generator=g, dtype=dtype)
    return hidden, weight, ids, adv


def test_old_none_is_ratio_one_with_logp_gradient():
    hidden, weight, ids, adv = _small()
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    for lt in LOSS_TYPES:
        mod = GRPOLoss(lt, epsilon=0.0)     # even with a zero-width clip range the gradient flows
        loss = mod(hidden, weight, ids, mask, adv)
        logp = per_token_logps(hidden, weight, ids)
        # value: -A per token; gradient: that of -A * logp (TRL's exp(logp - logp.detach()))
        surrogate = GRPOLoss(lt, epsilon=1e9)(hidden, weight, ids, mask, adv, old_logps=logp.detach())
        torch.testing.assert_close(loss, surrogate)
        g1 = torch.autograd.grad(loss, (hidden, weight))
        g2 = torch.autograd.grad(surrogate, (hidden, weight))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)


def test_normalizers_hand_computed():
    # old = logp (ratio 1): per-token loss = -A[n]; check each normalizer's arithmetic directly
    hidden, weight, ids, _ = _small(n=2, length=4)
    adv = torch.tensor([1.0, -3.0])
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])            # second row empty
    expect = {"grpo": (-1.0 + 0.0) / 2, "bnpo": -2.0 / 2, "dapo": -2.0 / 2, "dr_grpo": -2.0 / (2 * 4)}
    for lt, e in expect.items():
        loss = GRPOLoss(lt)(hidden, weight, ids, mask, adv)
        assert loss.item() == pytest.approx(e, abs=1e-6), lt
    loss = GRPOLoss("dr_grpo", max_completion_length=10)(hidden, weight, ids, mask, adv)
    assert loss.item() == pytest.approx(-2.0 / 20, abs=1e-6)


def test_float_mask_weighs_tokens():
    hidden, weight, ids, _ = _small(n=2, length=2)
    mask = torch.tensor([[0.5, 2.0], [0.0, 1.0]])
    adv = torch.tensor([1.0, 2.0])                  # ratio 1: per-token loss -A[n]
    expect = {"bnpo": -(0.5 + 2.0 + 2.0) / 3.5, "grpo": (-(2.5) / 2.5 - 2.0) / 2, "dr_grpo": -4.5 / 4}
    for lt, e in expect.items():
        assert GRPOLoss(lt)(hidden, weight, ids, mask, adv).item() == pytest.approx(e, abs=1e-6), lt


def test_epsilon_high_defaults_to_epsilon_and_asymmetric_clip():
    assert GRPOLoss(epsilon=0.3).epsilon_high == 0.3
    hidden, weight, ids, _ = _small(n=1, length=2)
    logp = per_token_logps(hidden, weight, ids).detach()
    mask = torch.ones(1, 2)
    # ratios 2.0 and 0.5 with A = +1: -min(r, clip(r)) -> -(1 + eps_high) and -0.5 (unclipped is smaller)
    old = logp - torch.log(torch.tensor([[2.0, 0.5]]))
    loss = GRPOLoss("bnpo", epsilon=0.2, epsilon_high=0.28)(hidden, weight, ids, mask, torch.ones(1), old_logps=old)
    assert loss.item() == pytest.approx(-(1.28 + 0.5) / 2, rel=1e-5)
    # A = -1: -min(-r, -clip(r)) = max(r, clip(r)) -> 2.0 and 1 - eps_low
    loss = GRPOLoss("bnpo", epsilon=0.2, epsilon_high=0.28)(hidden, weight, ids, mask, -torch.ones(1), old_logps=old)
    assert loss.item() == pytest.approx((2.0 + 0.8) / 2, rel=1e-5)


def test_kl_term_is_k3():
    hidden, weight, ids, _ = _small(n=1, length=3)
    logp = per_token_logps(hidden, weight, ids).detach()
    delta = torch.tensor([[0.5, -1.0, 0.0]])
    loss = GRPOLoss("bnpo", beta=0.1)(hidden, weight, ids, torch.ones(1, 3), torch.zeros(1), ref_logps=logp + delta)
    k3 = torch.exp(delta) - delta - 1
    assert loss.item() == pytest.approx(0.1 * k3.mean().item(), rel=1e-5)


# ---- group advantages ---------------------------------------------------------------------------
def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    s = math.sqrt(5.0 / 3.0)            # Bessel std of 1, 2, 3, 4
    d = torch.tensor([-1.5, -0.5, 0.5, 1.5, 0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(r, 4), d / torch.tensor([s + 1e-4] * 4 + [1e-4] * 4))
    torch.testing.assert_close(group_advantages(r, 4, "none"), d)
    sb = math.sqrt(sum((x - 3.75) ** 2 for x in r.tolist()) / 7)      # std of all rewards
    torch.testing.assert_close(group_advantages(r, 4, "batch"), d / (sb + 1e-4))
    torch.testing.assert_close(group_advantages(r, 4, True), group_advantages(r, 4, "group"))
    torch.testing.assert_close(group_advantages(r, 4, False), group_advantages(r, 4, "none"))
    # G = 2: groups (1, 2) -> std sqrt(0.5)
    a = group_advantages(torch.tensor([1.0, 2.0]), 2)
    torch.testing.assert_close(a, torch.tensor([-0.5, 0.5]) / (math.sqrt(0.5) + 1e-4))


def test_group_advantages_dtypes():
    assert group_advantages(torch.tensor([1, 2, 3, 4]), 2).dtype == torch.float32
    assert group_advantages(torch.tensor([1.0, 2.0], dtype=torch.bfloat16), 2).dtype == torch.float32
    assert group_advantages(torch.tensor([1.0, 2.0], dtype=torch.float64), 2).dtype == torch.float64


@settings(max_examples=EXAMPLES)
@given(groups=st.integers(1, 4), g=st.integers(2, 5), scale=st.sampled_from(["group", "batch", "none"]),
       data=st.data())
def test_group_advantages_match_loops(groups, g, scale, data):
    vals = data.draw(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=groups * g,
                              max_size=groups * g))
    r = torch.tensor(vals, dtype=torch.float32)
    got = group_advantages(r, g, scale)
    torch.testing.assert_close(got.double(), ref_group_advantages(vals, g, scale), rtol=1e-4, atol=1e-3)


# ---- degenerate and extreme inputs --------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.float32])
def test_all_masked_gives_exact_zero_and_zero_grads(loss_type, mask_dtype):
    hidden, weight, ids, adv = _small(n=4, length=3)
    mask = torch.zeros(4, 3, dtype=mask_dtype)
    logp = per_token_logps(hidden, weight, ids).detach()
    mod = GRPOLoss(loss_type, beta=0.3, epsilon_high=0.5, temperature=0.6)
    for old in (None, logp + 0.7):
        # padding garbage that would be inf/NaN under a plain multiply stays out of the value
        loss = mod(hidden, weight, ids, mask, adv, old_logps=old, ref_logps=logp - 0.2)
        assert loss.item() == 0.0 and not torch.isnan(loss)
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))
    loss = mod(hidden, weight, ids, mask, adv, old_logps=torch.full((4, 3), -1e30), ref_logps=logp)
    assert loss.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_extreme_logits_stay_finite(dtype, loss_type):
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(19, 8, generator=g)
    hidden = torch.randn(4, 6, 8, generator=g)
    logits = hidden @ weight.t()
    hidden = hidden * (1e4 / logits.abs().max())            # logits reach +-1e4
    hidden = hidden.to(dtype).requires_grad_(True)
    weight = weight.to(dtype).requires_grad_(True)
    ids = torch.randint(0, 19, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2, 4:] = False
    adv = torch.randn(4, generator=g)
    logp = per_token_logps(hidden, weight, ids).detach()
    assert torch.isfinite(logp).all() and (logp <= 0).all() and logp.min() < -1e3
    for old, ref, beta in ((None, None, 0.0), (logp + 0.1, logp - 0.05, 0.04)):
        loss = GRPOLoss(loss_type, beta=beta)(hidden, weight, ids, mask, adv, old_logps=old, ref_logps=ref)
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()


# ---- bad input ----------------------------------------------------------------------------------
def _good():
    g = torch.Generator().manual_seed(1)
    return dict(hidden=torch.randn(4, 3, 5, generator=g), lm_head_weight=torch.randn(7, 5, generator=g),
                completion_ids=torch.randint(0, 7, (4, 3), generator=g), completion_mask=torch.ones(4, 3),
                advantages=torch.randn(4, generator=g), old_logps=None, ref_logps=None)


BAD_FORWARD = {
    "hidden_2d": dict(hidden=torch.randn(4, 5)),
    "hidden_int": dict(hidden=torch.ones(4, 3, 5, dtype=torch.int64)),
    "hidden_empty": dict(hidden=torch.randn(0, 3, 5), completion_ids=torch.zeros(0, 3, dtype=torch.long),
                         completion_mask=torch.ones(0, 3), advantages=torch.randn(0)),
    "weight_wrong_h": dict(lm_head_weight=torch.randn(7, 6)),
    "weight_1d": dict(lm_head_weight=torch.randn(7)),
    "weight_dtype": dict(lm_head_weight=torch.randn(7, 5, dtype=torch.float64)),
    "ids_shape": dict(completion_ids=torch.zeros(4, 2, dtype=torch.long)),
    "ids_float": dict(completion_ids=torch.zeros(4, 3)),
    "ids_bool": dict(completion_ids=torch.zeros(4, 3, dtype=torch.bool)),
    "ids_too_big": dict(completion_ids=torch.full((4, 3), 7)),
    "ids_negative": dict(completion_ids=torch.full((4, 3), -1)),
    "mask_shape": dict(completion_mask=torch.ones(4, 4)),
    "mask_1d": dict(completion_mask=torch.ones(12)),
    "adv_shape": dict(advantages=torch.randn(4, 1)),
    "adv_len": dict(advantages=torch.randn(5)),
    "old_shape": dict(old_logps=torch.randn(4, 2)),
    "ref_shape": dict(ref_logps=torch.randn(3, 3)),
    "old_int": dict(old_logps=torch.zeros(4, 3, dtype=torch.long)),
}


@pytest.mark.parametrize("case", sorted(BAD_FORWARD))
def test_bad_forward_input_raises(case):
    kw = {**_good(), **BAD_FORWARD[case]}
    with pytest.raises(DsrError) as e:
        GRPOLoss("grpo")(**kw)
    assert e.value.what and e.value.hint


def test_beta_without_ref_raises_and_length_over_max():
    with pytest.raises(DsrError, match="ref_logps"):
        GRPOLoss(beta=0.1)(**_good())
    with pytest.raises(DsrError, match="max_completion_length"):
        GRPOLoss("dr_grpo", max_completion_length=2)(**_good())
    GRPOLoss(beta=0.1)(**{**_good(), "ref_logps": torch.zeros(4, 3)})          # fine with ref


@pytest.mark.parametrize("kwargs", [
    dict(loss_type="ppo"), dict(loss_type="GRPO"), dict(epsilon=-0.1), dict(epsilon_high=-0.2),
    dict(epsilon=float("nan")), dict(temperature=0.0), dict(temperature=-1.0), dict(temperature=float("nan")),
    dict(temperature=float("inf")), dict(beta=-0.1), dict(beta=float("inf")), dict(max_completion_length=0),
    dict(max_completion_length=2.5),
], ids=repr)
def test_bad_options_raise(kwargs):
    with pytest.raises(DsrError):
        GRPOLoss(**kwargs)


@pytest.mark.parametrize("args", [
    (torch.randn(6), 4, "group"), (torch.randn(6), 0, "group"), (torch.randn(6), 3, "max"),
    (torch.randn(2, 3), 3, "group"), (torch.randn(4), 1, "group"), (torch.randn(1), 1, "batch"),
    (torch.randn(0), 2, "none"), (torch.ones(4, dtype=torch.bool), 2, "none"), ([1.0, 2.0], 2, "group"),
], ids=str)
def test_bad_group_advantages_raise(args):
    with pytest.raises(DsrError):
        group_advantages(*args)


def test_group_size_one_without_scaling_is_zero():
    assert torch.equal(group_advantages(torch.tensor([3.0, -1.0]), 1, "none"), torch.zeros(2))


def test_per_token_logps_bad_temperature_and_range():
    kw = _good()
    with pytest.raises(DsrError):
        per_token_logps(kw["hidden"], kw["lm_head_weight"], kw["completion_ids"], 0.0)
    with pytest.raises(DsrError):
        per_token_logps(kw["hidden"], kw["lm_head_weight"], kw["completion_ids"] + 7)


# ---- FX: traceable, with the log-prob computation kept as one node -------------------------------
def test_fx_trace_matches_eager():
    mod = GRPOLoss("grpo", beta=0.2, epsilon_high=0.3, temperature=0.9)
    gm = torch.fx.symbolic_trace(mod, concrete_args={"old_logps": None})
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(per_token_logps) == 1
    kw = _good()
    kw.pop("old_logps")
    kw["ref_logps"] = torch.randn(4, 3)
    torch.testing.assert_close(gm(**kw), mod(**kw))
