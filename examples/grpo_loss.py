"""Example: the GRPO loss and its gradients on a batch of completions, compiled and checked against eager autograd.

    python examples/grpo_loss.py [--prompts 2] [--group 4] [--length 16]

A batch of `--prompts` prompts with `--group` sampled completions each (`N = prompts * group`
rows of `--length` positions, DeepSeek-V3-tiny widths: hidden 256, vocabulary 1024): final hidden
states, the LM head weight, completion ids and masks (completions of random length, padding
masked), group-normalized advantages from rewards, and the old / reference policies' per-token
log-probs. `GRPOLoss` (TRL's GRPOTrainer objective: clipped ratio, k3 KL penalty, loss_type
"grpo") is compiled with `grad_wrt=("hidden", "lm_head_weight")`, so one call returns the loss and
both gradients; the vocabulary is tiled inside the kernels, so the [N, L, V] logits never exist.

Prints the kernels, the loss and the error of the loss and of each gradient against eager
PyTorch autograd on the same module and inputs. Checks (exit 1 otherwise): all three within
dsr_compiler.tolerance.compare's f32 tolerance.
"""
from __future__ import annotations

import argparse
import sys

import torch

import dsr_compiler as dsr
from dsr_compiler.errors import CheckFailed, DsrError
from dsr_compiler.models import GRPOLoss, ModelConfig, group_advantages, per_token_logps
from dsr_compiler.tolerance import compare

TEMPERATURE = 0.9


def completions(prompts: int, group: int, length: int, hidden: int, vocab: int, seed: int = 0):
    """(hidden, lm_head_weight, completion_ids, completion_mask, advantages, old_logps, ref_logps)."""
    g = torch.Generator().manual_seed(seed)
    n = prompts * group
    h = torch.randn(n, length, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
    ids = torch.randint(0, vocab, (n, length), generator=g)
    lengths = torch.randint(1, length + 1, (n,), generator=g)            # each completion stops somewhere
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    rewards = torch.rand(n, generator=g)                                  # one scalar reward per completion
    adv = group_advantages(rewards, group)                                # (r - group mean) / (group std + 1e-4)
    with torch.no_grad():
        logp = per_token_logps(h, w, ids, TEMPERATURE)
    old = logp + 0.05 * torch.randn(n, length, generator=g)               # the policy that sampled: a bit stale
    ref = logp + 0.1 * torch.randn(n, length, generator=g)                # the frozen reference policy
    return h, w, ids, mask, adv, old, ref


def main(prompts: int = 2, group: int = 4, length: int = 16) -> dict:
    cfg = ModelConfig.named("deepseek-v3-tiny")
    loss_fn = GRPOLoss(loss_type="grpo", beta=0.04, epsilon=0.2, epsilon_high=0.28, temperature=TEMPERATURE)
    inputs = completions(prompts, group, length, cfg.hidden_size, cfg.vocab_size)
    cm = dsr.compile(loss_fn, inputs, grad_wrt=("hidden", "lm_head_weight"), backend="interpret")
    print(f"GRPO loss + gradients: {len(cm.kernels)} kernels ({', '.join(k.spec.family for k in cm.kernels)})")
    loss, grads = cm(*inputs)

    # eager autograd on the same module and inputs
    h = inputs[0].clone().requires_grad_(True)
    w = inputs[1].clone().requires_grad_(True)
    ref_loss = loss_fn(h, w, *inputs[2:])
    ref_dh, ref_dw = torch.autograd.grad(ref_loss, (h, w))
    ref_loss = ref_loss.detach()

    results = {}
    for what, got, want in (("loss", loss, ref_loss), ("d hidden", grads["hidden"], ref_dh),
                            ("d lm_head_weight", grads["lm_head_weight"], ref_dw)):
        r = compare(got, want)
        results[what] = r
        print(f"{what:17s} {tuple(got.shape)!s:15s} max abs err {r['max_abs']:.2e} "
              f"(tolerance atol {r['atol']:.1e} rtol {r['rtol']:.0e}){'' if r['ok'] else '  FAILED'}")
    print(f"loss {float(loss):.6f} (eager {float(ref_loss):.6f}) on {prompts} prompts x {group} completions "
          f"x {length} positions")
    if not all(r["ok"] for r in results.values()):
        raise CheckFailed("compiled GRPO loss or gradients differ from eager autograd beyond tolerance")
    print("check passed: loss and both gradients match eager autograd")
    return {"loss": float(loss), "eager_loss": float(ref_loss), "kernels": len(cm.kernels),
            **{k: r["max_abs"] for k, r in results.items()}}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=4, help="completions per prompt (TRL's num_generations)")
    p.add_argument("--length", type=int, default=16, help="completion positions")
    a = p.parse_args()
    try:
        main(a.prompts, a.group, a.length)
    except DsrError as e:
        sys.stderr.write(f"grpo_loss.py: {e}\n")
        sys.exit(e.exit_code)
