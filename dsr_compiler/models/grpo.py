"""Eager GRPO objective: group-normalized advantages and the clipped-surrogate loss of TRL's GRPOTrainer.

Where it sits: the eager reference for ``--module grpo`` that the compiled chunked-vocabulary
kernel (DESIGN.md §4) is checked against, and what the frontend traces. Written as plain tensor
code: the checks of concrete inputs are skipped while FX traces (inputs are ``Proxy`` objects),
and the rest has no data-dependent control flow.

Semantics (TRL's GRPOTrainer, token-level importance sampling):

* ``group_advantages``: rewards in consecutive groups of ``G``; ``A = r - mean_group(r)``, divided
  by ``std + 1e-4`` where std is Bessel-corrected over the group (``"group"``) or over all the
  rewards (``"batch"``; the std of the rewards themselves, not of ``A``), or not divided
  (``"none"``). Computed in fp32 (fp64 rewards stay fp64).
* ``per_token_logps``: ``hidden[n, t]`` predicts ``completion_ids[n, t]`` (the caller has already
  dropped the last position, as TRL does with ``logits[:, :-1]``); the logits ``hidden @ W.T`` are
  produced in the input dtype (like an LM head), upcast to fp32, divided by ``temperature``, and
  ``logp = logit[id] - logsumexp(logits)``. The log-softmax never exponentiates an unshifted logit,
  so logits of magnitude 1e4 stay finite.
* ``GRPOLoss``: ``ratio = exp(logp - old)`` (``old = logp.detach()`` when not given: ratio 1 in
  value, gradient of ``logp``); ``clipped = clamp(ratio, 1 - eps_low, 1 + eps_high)``; per-token
  loss ``-min(ratio * A, clipped * A) + beta * k3`` with ``k3 = exp(ref - logp) - (ref - logp) - 1``;
  the normalizers:

  ========  =================================================================================
  grpo      per sequence ``sum(mask * l) / max(sum(mask), 1)``, then the mean over all N sequences
            (empty sequences count, contributing 0)
  bnpo      ``sum(mask * l) / max(sum(mask), 1)``
  dr_grpo   ``sum(mask * l) / (N * L)``, ``L = max_completion_length`` if given else the tensor's L
  dapo      ``sum(mask * l) / max(sum(mask), 1)``: TRL divides by the active-token count of the
            global batch; the batch given here is the global batch, so it equals bnpo
  ========  =================================================================================

  Masks may be bool, integer or float (a float mask weights tokens). Masked-out tokens contribute
  exactly 0 (selected away with ``where``, so a non-finite value there cannot leak into the sum).
  An all-masked batch gives exactly 0.0 (the denominators are clamped to 1, so it is ``0 / 1``;
  for dr_grpo ``0 / (N * L)``) with exactly zero gradients, never NaN.
"""
from __future__ import annotations

import math

import torch
import torch.fx
from torch import nn

from dsr_compiler.errors import DsrError

__all__ = ["LOSS_TYPES", "SCALE_REWARDS", "GRPOLoss", "group_advantages", "per_token_logps"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and narrower floats (and integers); fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(x) -> str:
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _is_real_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ---- advantages ---------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str | bool = "group") -> torch.Tensor:
    """Group-relative advantages ``[N]`` from rewards ``[N]`` laid out as ``N / group_size`` consecutive groups.

    ``scale_rewards``: ``"group"`` (divide by the group's std + 1e-4), ``"batch"`` (by the std of all
    N rewards + 1e-4) or ``"none"``; TRL's legacy booleans ``True``/``False`` mean group/none. The
    std is Bessel-corrected, so ``"group"`` needs ``group_size >= 2`` and ``"batch"`` needs ``N >= 2``.
    Returns fp32 (fp64 for fp64 rewards).
    """
    where = "group_advantages"
    if scale_rewards is True:
        scale_rewards = "group"
    elif scale_rewards is False:
        scale_rewards = "none"
    if scale_rewards not in SCALE_REWARDS:
        raise DsrError(f"unknown scale_rewards {scale_rewards!r}", where=where,
                       hint=f"use one of {', '.join(SCALE_REWARDS)}")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or rewards.dtype in (torch.bool,) \
            or rewards.is_complex():
        got = f"{_shape(rewards)} {rewards.dtype}" if isinstance(rewards, torch.Tensor) else _shape(rewards)
        raise DsrError(f"rewards must be a 1-D real tensor [N], got {got}", where=where,
                       hint="pass one scalar reward per completion")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise DsrError(f"group_size must be a positive int, got {group_size!r}", where=where,
                       hint="pass the number of completions per prompt (TRL's num_generations)")
    n = rewards.size(0)
    if n == 0 or n % group_size != 0:
        raise DsrError(f"{n} rewards do not split into groups of {group_size}", where=where,
                       hint="N must be a positive multiple of group_size (completions of a prompt are consecutive)")
    if scale_rewards == "group" and group_size < 2:
        raise DsrError("scale_rewards='group' needs group_size >= 2 (Bessel-corrected std of one sample)",
                       where=where, hint="use group_size >= 2 or scale_rewards='none'")
    if scale_rewards == "batch" and n < 2:
        raise DsrError("scale_rewards='batch' needs at least 2 rewards (Bessel-corrected std of one sample)",
                       where=where, hint="pass more rewards or scale_rewards='none'")
    r = rewards.to(_compute_dtype(rewards.dtype))
    grouped = r.view(-1, group_size)
    adv = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(n)
    if scale_rewards == "group":
        std = grouped.std(dim=1, unbiased=True, keepdim=True).expand_as(grouped).reshape(n)
    elif scale_rewards == "batch":
        std = r.std(unbiased=True)
    else:
        return adv
    return adv / (std + STD_EPS)


# ---- per-token log-probabilities ----------------------------------------------------------------
def _check_logps_inputs(hidden, weight, ids, temperature, where: str) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1 or not hidden.is_floating_point():
        raise DsrError(f"hidden must be a floating tensor [..., H], got {_shape(hidden)}", where=where,
                       hint="pass the final hidden states (after the last norm)")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point() \
            or weight.size(1) != hidden.size(-1) or weight.size(0) < 1:
        raise DsrError(f"lm_head_weight must be a floating tensor [V, {hidden.size(-1)}], got {_shape(weight)}",
                       where=where, hint="pass the LM head weight [vocab, hidden] (nn.Linear layout)")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise DsrError(f"hidden ({hidden.dtype}, {hidden.device}) and lm_head_weight ({weight.dtype}, "
                       f"{weight.device}) differ in dtype or device", where=where,
                       hint="cast both to the same dtype on the same device")
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.is_complex() \
            or ids.dtype == torch.bool or tuple(ids.shape) != tuple(hidden.shape[:-1]):
        got = f"{_shape(ids)} {ids.dtype}" if isinstance(ids, torch.Tensor) else _shape(ids)
        raise DsrError(f"completion_ids must be an integer tensor {list(hidden.shape[:-1])}, got {got}",
                       where=where, hint="one token id per hidden-state position (int64)")
    if ids.device != hidden.device:
        raise DsrError(f"completion_ids on {ids.device}, hidden on {hidden.device}", where=where,
                       hint="move the inputs to one device")
    if ids.numel() and (bool((ids < 0).any()) or bool((ids >= weight.size(0)).any())):
        lo, hi = int(ids.min()), int(ids.max())
        raise DsrError(f"completion_ids out of range [0, {weight.size(0)}): min {lo}, max {hi}", where=where,
                       hint="ids must index rows of lm_head_weight (pad with any valid id and mask it out)")
    if not _is_real_number(temperature) or temperature <= 0:
        raise DsrError(f"temperature must be a finite number > 0, got {temperature!r}", where=where,
                       hint="use the sampling temperature of the rollouts (1.0 if unsure)")


def per_token_logps(hidden: torch.Tensor, lm_head_weight: torch.Tensor, completion_ids: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax((hidden @ W.T).float() / temperature)[id]`` for every position: ``[...]`` from ``hidden [..., H]``.

    Computed in fp32 (fp64 for fp64 inputs) from materialized logits; the compiled version tiles
    the vocabulary with an online logsumexp and must agree with this to tolerance.
    """
    if not isinstance(hidden, torch.fx.Proxy):
        _check_logps_inputs(hidden, lm_head_weight, completion_ids, temperature, "per_token_logps")
    logits = torch.matmul(hidden, lm_head_weight.t())
    logits = logits.to(_compute_dtype(logits.dtype)) / temperature
    target = torch.gather(logits, -1, completion_ids.long().unsqueeze(-1)).squeeze(-1)
    return target - torch.logsumexp(logits, dim=-1)


# one call_function node under FX (the frontend maps it to the chunked-vocabulary kernel)
torch.fx.wrap("per_token_logps")
per_token_logps.dsr_op = "token_logprobs"  # type: ignore[attr-defined]


# ---- the loss -----------------------------------------------------------------------------------
class GRPOLoss(nn.Module):
    """TRL GRPOTrainer loss from final hidden states and the LM head; ``forward`` returns a scalar.

    ``forward(hidden [N, L, H], lm_head_weight [V, H], completion_ids [N, L], completion_mask [N, L],
    advantages [N], old_logps=None [N, L], ref_logps=None [N, L])``. ``ref_logps`` is required when
    ``beta != 0`` and ignored otherwise. The loss is fp32 (fp64 for fp64 inputs).
    """

    def __init__(self, loss_type: str = "dapo", beta: float = 0.0, epsilon: float = 0.2,
                 epsilon_high: float | None = None, temperature: float = 1.0,
                 max_completion_length: int | None = None) -> None:
        super().__init__()
        where = "GRPOLoss"
        if loss_type not in LOSS_TYPES:
            raise DsrError(f"unknown loss_type {loss_type!r}", where=where, hint=f"use one of {', '.join(LOSS_TYPES)}")
        if not _is_real_number(beta) or beta < 0:
            raise DsrError(f"beta must be a finite number >= 0, got {beta!r}", where=where,
                           hint="beta weighs the k3 KL penalty against the reference policy (0 disables it)")
        for name, eps in (("epsilon", epsilon), ("epsilon_high", epsilon_high)):
            if eps is not None and (not _is_real_number(eps) or eps < 0):
                raise DsrError(f"{name} must be a finite number >= 0, got {eps!r}", where=where,
                               hint="the ratio is clipped to [1 - epsilon, 1 + epsilon_high]")
        if not _is_real_number(temperature) or temperature <= 0:
            raise DsrError(f"temperature must be a finite number > 0, got {temperature!r}", where=where,
                           hint="use the sampling temperature of the rollouts (1.0 if unsure)")
        if max_completion_length is not None and (isinstance(max_completion_length, bool)
                                                  or not isinstance(max_completion_length, int)
                                                  or max_completion_length < 1):
            raise DsrError(f"max_completion_length must be a positive int or None, got {max_completion_length!r}",
                           where=where, hint="dr_grpo divides by N * max_completion_length")
        self.loss_type = loss_type
        self.beta = float(beta)
        self.epsilon_low = float(epsilon)
        self.epsilon_high = float(epsilon if epsilon_high is None else epsilon_high)
        self.temperature = float(temperature)
        self.max_completion_length = max_completion_length

    def extra_repr(self) -> str:
        return (f"loss_type={self.loss_type!r}, beta={self.beta}, epsilon=({self.epsilon_low}, {self.epsilon_high}), "
                f"temperature={self.temperature}, max_completion_length={self.max_completion_length}")

    def _check(self, hidden, weight, ids, mask, advantages, old_logps, ref_logps) -> None:
        where = "GRPOLoss.forward"
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
            raise DsrError(f"hidden must be a floating tensor [N, L, H], got {_shape(hidden)}", where=where,
                           hint="pass the final hidden states of the completion positions")
        n, length, _ = hidden.shape
        if n < 1 or length < 1:
            raise DsrError(f"empty batch: hidden is {_shape(hidden)}", where=where,
                           hint="pass at least one completion with at least one position")
        if self.max_completion_length is not None and length > self.max_completion_length:
            raise DsrError(f"completion length {length} exceeds max_completion_length {self.max_completion_length}",
                           where=where, hint="truncate the completions or raise max_completion_length")
        _check_logps_inputs(hidden, weight, ids, self.temperature, where)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (n, length) or mask.is_complex():
            raise DsrError(f"completion_mask must be [{n}, {length}] (bool, int or float), got {_shape(mask)}",
                           where=where, hint="1 for completion tokens that count, 0 for padding")
        if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) != (n,) \
                or advantages.dtype == torch.bool or advantages.is_complex():
            raise DsrError(f"advantages must be a real tensor [{n}], got {_shape(advantages)}", where=where,
                           hint="one advantage per completion, e.g. from group_advantages(rewards, G)")
        if self.beta != 0.0 and ref_logps is None:
            raise DsrError(f"beta={self.beta} needs ref_logps", where=where,
                           hint="pass the reference policy's per-token log-probs, or use beta=0")
        for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps)):
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (n, length)
                                  or not t.is_floating_point()):
                raise DsrError(f"{name} must be a floating tensor [{n}, {length}] or None, got {_shape(t)}",
                               where=where, hint="per-token log-probs of the completion tokens")
        for name, t in (("completion_mask", mask), ("advantages", advantages), ("old_logps", old_logps),
                        ("ref_logps", ref_logps)):
            if t is not None and t.device != hidden.device:
                raise DsrError(f"{name} on {t.device}, hidden on {hidden.device}", where=where,
                               hint="move the inputs to one device")

    def forward(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor, completion_ids: torch.Tensor,
                completion_mask: torch.Tensor, advantages: torch.Tensor,
                old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(hidden, torch.fx.Proxy):
            self._check(hidden, lm_head_weight, completion_ids, completion_mask, advantages, old_logps, ref_logps)
        logp = per_token_logps(hidden, lm_head_weight, completion_ids, self.temperature)   # [N, L] fp32
        old = logp.detach() if old_logps is None else old_logps.type_as(logp)
        adv = advantages.type_as(logp).unsqueeze(1)
        ratio = torch.exp(logp - old)
        clipped = torch.clamp(ratio, 1.0 - self.epsilon_low, 1.0 + self.epsilon_high)
        loss = -torch.minimum(ratio * adv, clipped * adv)
        if self.beta != 0.0:
            delta = ref_logps.type_as(logp) - logp
            loss = loss + self.beta * (torch.exp(delta) - delta - 1.0)
        mask = completion_mask.type_as(logp)
        # masked-out tokens contribute exactly 0 even if their loss is not finite
        masked = torch.where(completion_mask != 0, loss, 0.0) * mask
        if self.loss_type == "grpo":
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        if self.loss_type == "dr_grpo":
            length = self.max_completion_length if self.max_completion_length is not None else loss.size(1)
            return masked.sum() / (loss.size(0) * length)
        # bnpo, and dapo (normalized by the active tokens of the whole -- here global -- batch)
        return masked.sum() / mask.sum().clamp(min=1.0)
