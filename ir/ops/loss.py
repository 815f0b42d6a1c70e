"""Loss ops of the op table: vocabulary-chunked log-probabilities, their gradients, `gather`,
and `stop_gradient`.

Where it sits: the last module of the op table (`ir/ops/__init__.py` imports it after `mla.py`).
The frontend lowers the zoo's wrapped `per_token_logps` (and, through the `rewrite_vocab_loss`
pass, plain `log_softmax(hidden @ W.T / T)` gathered at target ids or `F.cross_entropy`) to
`token_logprobs`; the `differentiate` pass emits the two gradient ops; codegen lowers each in its
own kernel family (codegen/families/vocab_loss.py): the vocabulary is tiled with an online logsumexp, so
the `[tokens, V]` logits never exist in memory. The eager references below materialize the
logits: they are the numeric contract the kernels are checked against.

    token_logprobs(hidden[..., H], weight[V, H], ids[...], temperature=T) -> (logp f32[...], lse f32[...])
        z = (hidden @ weight.T in the input dtype).float() / T      (as models.grpo.per_token_logps)
        lse = logsumexp(z, -1);  logp = z[id] - lse
    token_logprobs_grad_hidden(g f32[...], hidden, weight, ids, lse, temperature=T) -> hidden.dtype[..., H]
    token_logprobs_grad_weight(g f32[...], hidden, weight, ids, lse, temperature=T) -> weight.dtype[V, H]
        dlogits = (onehot(id) - exp(z - lse)) * g / T     (the derivative of logp w.r.t. hidden @ W.T)
        grad_hidden = dlogits @ weight;  grad_weight = sum over tokens of dlogits^T hidden
        (fp32 accumulation, one rounding to the output dtype at the end)
    gather(x[..., V], index[..., K], dim=-1) -> x.dtype[..., K]        torch.gather along the last dim
    stop_gradient(x) -> x                     value unchanged; the `differentiate` pass gives it no derivative

Ids must lie in [0, V) (the eager `per_token_logps` checks it; the kernels cannot without a host
sync): a compiled `token_logprobs` returns NaN for an id outside the vocabulary.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import GradError
from ..types import DType, TensorType
from ._def import (
    POINTWISE,
    AttrSpec,
    GradBuilder,
    OpDef,
    TypeRuleError,
    dims_equal,
    norm_dim,
    register,
    single_output_vjp,
)

if TYPE_CHECKING:
    from ..graph import Node

# Op kinds: each becomes its own kernel (family = kind) in the fusion pass.
VOCAB_LOGPROBS = "vocab_logprobs"
VOCAB_GRAD_HIDDEN = "vocab_grad_hidden"
VOCAB_GRAD_WEIGHT = "vocab_grad_weight"
GATHER = "gather"
HEAD_DTYPES = (DType.f32, DType.bf16, DType.f16)
ID_DTYPES = (DType.i32, DType.i64)


# ----------------------------------------------------------------------------- eager references

def _logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / T, produced like an LM head: the matmul in the input dtype, then upcast."""
    return torch.matmul(hidden, weight.t()).float() / temperature


def token_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                       temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    z = _logits(hidden, weight, temperature)
    lse = torch.logsumexp(z, dim=-1)
    target = torch.gather(z, -1, ids.long().unsqueeze(-1)).squeeze(-1)
    return target - lse, lse


def dlogits_ref(g: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """d(sum g * logp) / d(hidden @ W.T) in fp32: (onehot - softmax) * g / T, materialized."""
    z = _logits(hidden, weight, temperature)
    p = torch.exp(z - lse.float().unsqueeze(-1))
    onehot = torch.nn.functional.one_hot(ids.long(), weight.shape[0]).float()
    return (onehot - p) * (g.float() / temperature).unsqueeze(-1)


def token_logprobs_grad_hidden_ref(g, hidden, weight, ids, lse, temperature: float) -> torch.Tensor:
    return torch.matmul(dlogits_ref(g, hidden, weight, ids, lse, temperature), weight.float()).to(hidden.dtype)


def token_logprobs_grad_weight_ref(g, hidden, weight, ids, lse, temperature: float) -> torch.Tensor:
    dl = dlogits_ref(g, hidden, weight, ids, lse, temperature).reshape(-1, weight.shape[0])
    return torch.matmul(dl.t(), hidden.reshape(-1, hidden.shape[-1]).float()).to(weight.dtype)


# ----------------------------------------------------------------------------- type rules

def _check_head(op: str, hidden: TensorType, weight: TensorType, ids: TensorType, a: Mapping[str, Any]) -> None:
    if hidden.rank < 1 or hidden.dtype not in HEAD_DTYPES:
        raise TypeRuleError(f"{op}: hidden must be a float tensor [..., H] (f32/bf16/f16), got {hidden}")
    if weight.rank != 2 or weight.dtype != hidden.dtype or not dims_equal(weight.shape[1], hidden.shape[-1]):
        raise TypeRuleError(f"{op}: weight must be {hidden.dtype.value}[V, {hidden.shape[-1]}], got {weight}")
    if ids.dtype not in ID_DTYPES or ids.rank != hidden.rank - 1 or \
            not dims_equal(ids.shape, hidden.shape[:-1]):
        lead = ",".join(str(d) for d in hidden.shape[:-1])
        raise TypeRuleError(f"{op}: ids must be i32/i64[{lead}] (one id per hidden row), got {ids}")
    t = a["temperature"]
    if isinstance(t, bool) or not math.isfinite(float(t)) or float(t) <= 0:
        raise TypeRuleError(f"{op}: temperature must be a finite number > 0, got {t!r}")


def _token_logprobs_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    hidden, weight, ids = ts
    _check_head("token_logprobs", hidden, weight, ids, a)
    out = TensorType(DType.f32, hidden.shape[:-1])
    return (out, out)


def _grad_rule(which: str):
    op = f"token_logprobs_grad_{which}"

    def rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
        g, hidden, weight, ids, lse = ts
        _check_head(op, hidden, weight, ids, a)
        for nm, t in (("g", g), ("lse", lse)):
            if t.dtype is not DType.f32 or not dims_equal(t.shape, ids.shape):
                raise TypeRuleError(f"{op}: {nm} must be f32 with the ids' shape {ids}, got {t}")
        return (hidden,) if which == "hidden" else (weight,)
    return rule


def _gather_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x, index = ts
    d = norm_dim(a["dim"], x.rank, "gather")
    if x.rank < 1 or d != x.rank - 1:
        raise TypeRuleError(f"gather: only the last dim is supported (dim={a['dim']} of {x})")
    if index.dtype not in ID_DTYPES or index.rank != x.rank or \
            not dims_equal(index.shape[:-1], x.shape[:-1]):
        raise TypeRuleError(f"gather: index must be i32/i64 with x's leading dims [{','.join(map(str, x.shape[:-1]))}, K], "
                            f"got {index}")
    return (TensorType(x.dtype, index.shape),)


def _stop_gradient_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    return (ts[0],)


# ----------------------------------------------------------------------------- derivative rules

def _token_logprobs_vjp(b: GradBuilder, n: Node, gs: Sequence[str | None]) -> list[tuple[str, str | None]]:
    """The two vocabulary-tiled gradient ops, with the saved logsumexp (no rule through the lse output)."""
    g_logp, g_lse = gs
    if g_lse is not None:
        raise GradError("differentiate: the loss depends on token_logprobs' logsumexp output, which has no rule",
                        where=f"node %{n.outputs[1].name}")
    if g_logp is None:
        return []
    h, w, ids = n.inputs
    lse = n.outputs[1].name
    attrs = {"temperature": n.attr("temperature")}
    out: list[tuple[str, str | None]] = []
    if h in b.needed:
        out.append((h, b.emit("token_logprobs_grad_hidden", (g_logp, h, w, ids, lse), attrs, f"{h}.grad")))
    if w in b.needed:
        out.append((w, b.emit("token_logprobs_grad_weight", (g_logp, h, w, ids, lse), attrs, f"{w}.grad")))
    return out


@single_output_vjp
def _stop_gradient_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list[tuple[str, str | None]]:
    return []           # Tensor.detach: the derivative is zero


_T = {"temperature": AttrSpec((float,), doc="logits are divided by it (sampling temperature, > 0)")}

register(OpDef("token_logprobs", VOCAB_LOGPROBS, (3, 3), _token_logprobs_rule, token_logprobs_ref, attrs=_T,
               n_outputs=2, vjp=_token_logprobs_vjp,
               doc="(log_softmax(hidden @ W.T / T)[id], logsumexp) per row, fp32, vocabulary-tiled online logsumexp"))
register(OpDef("token_logprobs_grad_hidden", VOCAB_GRAD_HIDDEN, (5, 5), _grad_rule("hidden"),
               token_logprobs_grad_hidden_ref, attrs=_T,
               doc="d(sum g*logp)/d hidden = ((onehot - softmax) * g / T) @ W, logits recomputed by tiles"))
register(OpDef("token_logprobs_grad_weight", VOCAB_GRAD_WEIGHT, (5, 5), _grad_rule("weight"),
               token_logprobs_grad_weight_ref, attrs=_T,
               doc="d(sum g*logp)/d W = sum_tokens ((onehot - softmax) * g / T)^T hidden, logits recomputed by tiles"))
register(OpDef("gather", GATHER, (2, 2), _gather_rule,
               lambda x, index, dim: torch.gather(x, dim, index.long()),
               attrs={"dim": AttrSpec((int,))}, doc="torch.gather along the last dim"))
register(OpDef("stop_gradient", POINTWISE, (1, 1), _stop_gradient_rule, lambda x: x.clone(), vjp=_stop_gradient_vjp,
               doc="x (Tensor.detach): the value passes, the derivative is zero"))
