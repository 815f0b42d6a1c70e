"""`--module grpo` (the zoo's GRPO objective with gradients for hidden and LM head) and `--module mtp`.

Listed in `workloads.TABLE`. Shapes follow the
model config: `N = batch * GROUP` completions (`GROUP` per prompt, consecutive), `L = seq` positions,
`H = hidden_size`, `V = vocab_size`; the forward takes the final hidden states, the LM head weight,
the completion ids and mask, the group-normalized advantages and the old / reference log-probs.
The workload differentiates the loss w.r.t. `hidden` and `lm_head_weight` (`grad_wrt`), so
`dsrc run --module grpo --check` compares the loss and both gradients with eager autograd.

Inputs are realistic: hidden states ~ unit RMS, an LM head scaled like a trained one, completion
masks that are prefixes of random length (an empty completion is possible), old log-probs = the
current ones plus a little noise (a slightly stale policy, so some ratios clip), reference
log-probs likewise. Configs whose LM head exceeds `MAX_REAL_HEAD_ELEMENTS` (deepseek-v3:
129,280 x 7,168) build their example inputs on the meta device: they compile, but cannot run here.
"""
from __future__ import annotations

import torch

from dsr_compiler.errors import DsrError
from dsr_compiler.models import ModelConfig
from .base import Workload, init_weights, param_bytes
from .mla import layer_elements
from .moe import MAX_REAL_EXPERT_ELEMENTS, expert_elements

GROUP = 4                       # completions per prompt (TRL's num_generations)
MAX_REAL_HEAD_ELEMENTS = 1 << 27
GRPO_OPTIONS = {"loss_type": "grpo", "beta": 0.04, "epsilon": 0.2, "epsilon_high": 0.28, "temperature": 0.9}
GRAD_WRT = ("hidden", "lm_head_weight")


def grpo_inputs(n: int, length: int, hidden: int, vocab: int, dtype: torch.dtype, seed: int,
                temperature: float = 1.0, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """(hidden, lm_head_weight, completion_ids, completion_mask, advantages, old_logps, ref_logps)."""
    from dsr_compiler.models.grpo import group_advantages, per_token_logps
    if device == "meta":
        f = {"device": "meta"}
        return (torch.empty(n, length, hidden, dtype=dtype, **f), torch.empty(vocab, hidden, dtype=dtype, **f),
                torch.empty(n, length, dtype=torch.int64, **f), torch.empty(n, length, **f), torch.empty(n, **f),
                torch.empty(n, length, **f), torch.empty(n, length, **f))
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, length, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(dtype)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    lengths = torch.randint(0, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.float32)
    rewards = torch.randn(n, generator=g)
    adv = group_advantages(rewards, GROUP if n % GROUP == 0 else 1, "group" if n % GROUP == 0 else "none")
    with torch.no_grad():
        logp = per_token_logps(h, w, ids, temperature).float()
    old = logp + 0.05 * torch.randn(n, length, generator=g)
    ref = logp + 0.1 * torch.randn(n, length, generator=g)
    return h, w, ids, mask, adv, old, ref


def build_grpo(cfg: ModelConfig, batch: int, seq: int, dtype: torch.dtype, seed: int) -> Workload:
    from dsr_compiler.models.grpo import GRPOLoss
    m = GRPOLoss(**GRPO_OPTIONS)
    n, hid, voc = batch * GROUP, cfg.hidden_size, cfg.vocab_size
    big = voc * hid > MAX_REAL_HEAD_ELEMENTS

    def make(tokens: int, s: int) -> tuple[torch.Tensor, ...]:
        if big:
            raise DsrError(f"--module grpo: the LM head of this config ({voc} x {hid}) is too large to run on "
                           "the interpreter here; it is compile-only", where="--module grpo",
                           hint="use `dsrc compile` for it, or a smaller config (--model deepseek-v3-tiny)")
        return grpo_inputs(n, max(1, tokens // batch), hid, voc, dtype, s, GRPO_OPTIONS["temperature"])
    example = grpo_inputs(n, seq, hid, voc, dtype, seed, device="meta") if big else make(batch * seq, seed)
    return Workload("grpo", m, example, {}, make, grad_wrt=GRAD_WRT)


def grpo_bytes(cfg: ModelConfig, batch: int, seq: int, isz: int, phase: str | None) -> dict[str, int]:
    n, hid, voc = batch * GROUP, cfg.hidden_size, cfg.vocab_size
    if voc * hid > MAX_REAL_HEAD_ELEMENTS:      # example inputs on the meta device: compile-only
        return {}
    return {"example inputs": n * seq * (hid * isz + 8 + 3 * 4) + n * 4 + voc * hid * isz,
            "logits to draw the old/ref log-probs": n * seq * voc * (isz + 4)}


def build_mtp(cfg: ModelConfig, batch: int, seq: int, dtype: torch.dtype, seed: int) -> Workload:
    """`--module mtp`: DeepSeek-V3's MTP loss (all MTP depths of the config, lambda 0.3) on the
    main model's final hidden states; the per-depth log-probs use the same vocabulary-tiled
    `token_logprobs` kernel as GRPO. Forward only: the decoder layer (MLA, MoE) has no derivative
    rules, so no gradients are asked for."""
    from dsr_compiler.models.deepseek import DeepSeekModel
    from dsr_compiler.models.mtp import MTPLoss, make_mtp_modules
    big = expert_elements(cfg) > MAX_REAL_EXPERT_ELEMENTS or cfg.vocab_size * cfg.hidden_size > MAX_REAL_HEAD_ELEMENTS
    # the main model only lends its embedding and LM head: build it with as few layers as the config allows
    main_cfg = cfg.replace(num_hidden_layers=max(1, cfg.first_k_dense_replace))
    if big:
        with torch.device("meta"):
            m = MTPLoss(DeepSeekModel(main_cfg), make_mtp_modules(cfg), lam=0.3)
    else:
        m = MTPLoss(DeepSeekModel(main_cfg), make_mtp_modules(cfg), lam=0.3)
        init_weights(m, seed)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("e_score_correction_bias"):
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    m = m.to(dtype).eval()

    def make(tokens: int, s: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(s)
        length = max(1, tokens // batch)
        h = torch.randn(batch, length, cfg.hidden_size, generator=g).to(dtype)
        toks = torch.randint(0, cfg.vocab_size, (batch, length), generator=g)
        mask = (torch.rand(batch, length, generator=g) > 0.2).to(torch.float32)
        return h, toks, mask
    if big:
        example = (torch.empty(batch, seq, cfg.hidden_size, dtype=dtype, device="meta"),
                   torch.empty(batch, seq, dtype=torch.int64, device="meta"), torch.empty(batch, seq, device="meta"))
    else:
        example = make(batch * seq, seed)
    return Workload("mtp", m, example, {}, make)


def mtp_bytes(cfg: ModelConfig, batch: int, seq: int, isz: int, phase: str | None) -> dict[str, int]:
    h = cfg.hidden_size
    if expert_elements(cfg) > MAX_REAL_EXPERT_ELEMENTS or cfg.vocab_size * h > MAX_REAL_HEAD_ELEMENTS:
        return {}                               # module and example inputs on the meta device
    trunk = sum(layer_elements(cfg, i) for i in range(max(1, cfg.first_k_dense_replace)))
    mtp = cfg.num_nextn_predict_layers * (layer_elements(cfg, cfg.num_hidden_layers - 1) + 2 * h * h)
    return {"params": param_bytes(trunk + mtp + 2 * cfg.vocab_size * h, isz),
            "example inputs": batch * seq * (h * isz + 8 + 4)}


__all__ = ["GRAD_WRT", "GROUP", "GRPO_OPTIONS", "MAX_REAL_HEAD_ELEMENTS", "build_grpo", "build_mtp", "grpo_bytes",
           "grpo_inputs", "mtp_bytes"]
