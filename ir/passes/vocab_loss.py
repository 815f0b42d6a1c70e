"""The `rewrite_vocab_loss` pass: log-probabilities of target tokens without materialized logits.

Where it sits: first in the PIPELINE (before `differentiate`, so the backward of the rewritten
form is the vocabulary-tiled one, and before fusion). It recognizes, in plain user code,

    logits = linear(h, W)            |  matmul(h, permute(W, dims=(1, 0)))      h [..., H], W [V, H]
    z      = logits, through casts to float types and scalings by 0-d constants (/ T, * 1/T)
    lsm    = log_softmax(z, dim=-1)
    picked = gather(lsm, index [..., 1], dim=-1)        (F.cross_entropy lowers to this form)

and rewrites every `picked` into `reshape(token_logprobs(h, W, reshape(index, [...]), T).logp)`
(cast back to the log_softmax dtype when that is not f32). The rewrite needs the logits to be
used only along that chain and the log-softmax only by such gathers: if anything else reads them,
they must exist anyway and the graph is left as it is (a note says why).

Numerics: `token_logprobs` computes the logits' matmul with fp32 accumulation and everything after
in fp32, as `per_token_logps` does; a chain that rounds to bf16 on the way (bf16 logits divided by T
in bf16) differs by that rounding only.
"""
from __future__ import annotations

import math

from ..graph import Graph, GraphBuilder, Node, Value
from ..ops.loss import HEAD_DTYPES, ID_DTYPES
from ..types import DType, TensorType
from .cleanup import dce
from .manager import PassContext


def _const(name: str, prod: dict[str, Node]) -> float | None:
    n = prod.get(name)
    if n is None or n.op != "const" or n.out.type.rank != 0:
        return None
    v = n.attr("value")
    return None if isinstance(v, bool) else float(v)


class _Match:
    def __init__(self, hidden: str, weight: str, temperature: float, chain: list[Node]):
        self.hidden, self.weight, self.temperature, self.chain = hidden, weight, temperature, chain


def _match_logits(lsm: Node, prod: dict[str, Node], users: dict[str, list[Node]], types: dict[str, TensorType],
                  ctx: PassContext) -> _Match | None:
    """Walk from the log_softmax's input back to the LM-head GEMM; None if it is not the pattern."""
    what = f"%{lsm.out.name} = log_softmax"
    scale = 1.0
    chain: list[Node] = [lsm]
    cur = lsm.inputs[0]
    while True:
        n = prod.get(cur)
        if n is None:
            return None
        if len(users.get(cur, [])) != 1:
            ctx.note(f"cannot rewrite {what} into token_logprobs: %{cur} has other users (the logits are needed anyway)")
            return None
        if n.op == "cast" and n.attr("dtype").is_float:
            chain.append(n)
            cur = n.inputs[0]
            continue
        if n.op in ("div", "mul") and types[n.inputs[0]].rank >= 1:
            c = _const(n.inputs[1], prod)
            if c is None or not math.isfinite(c) or c <= 0:
                return None
            scale = scale / c if n.op == "div" else scale * c
            chain.append(n)
            cur = n.inputs[0]
            continue
        if n.op == "linear" and len(n.inputs) == 2:
            h, w = n.inputs
        elif n.op == "matmul":
            h, wt = n.inputs
            p = prod.get(wt)
            if p is None or p.op != "permute" or tuple(p.attr("dims")) != (1, 0) or types[wt].rank != 2:
                return None
            w = p.inputs[0]
        else:
            return None
        ht, wtype = types[h], types[w]
        if ht.dtype not in HEAD_DTYPES or wtype.dtype != ht.dtype or wtype.rank != 2 or ht.rank < 1:
            return None
        if not (scale > 0 and math.isfinite(scale)):
            return None
        chain.append(n)
        return _Match(h, w, 1.0 / scale, chain)


def rewrite_vocab_loss(g: Graph, ctx: PassContext) -> Graph:
    """Rewrite log_softmax(LM head) gathered at target ids into token_logprobs (see module doc)."""
    if g.kernels:
        return g.replace()      # a new graph object, as every pass returns
    prod = g.producers()
    users = g.users()
    types = {v.name: v.type for v in g.inputs}
    for n in g.nodes:
        for o in n.outputs:
            types[o.name] = o.type
    outputs = set(g.outputs)
    plans: dict[int, tuple[_Match, Node]] = {}        # id(gather node) -> (match, gather)
    for n in g.nodes:
        if n.op != "log_softmax" or n.attr("dim") % types[n.inputs[0]].rank != types[n.inputs[0]].rank - 1:
            continue
        lsm_users = users.get(n.out.name, [])
        gathers = [u for u in lsm_users if u.op == "gather" and u.inputs[0] == n.out.name
                   and types[u.inputs[1]].shape[-1] == 1 and types[u.inputs[1]].dtype in ID_DTYPES]
        if not gathers:
            continue
        if len(gathers) != len(lsm_users) or n.out.name in outputs:
            ctx.note(f"cannot rewrite %{n.out.name} = log_softmax into token_logprobs: the log-softmax has "
                     "users other than single-index gathers (the logits are needed anyway)")
            continue
        m = _match_logits(n, prod, users, types, ctx)
        if m is None:
            continue
        if any(o.name in outputs for c in m.chain[1:] for o in c.outputs):
            ctx.note(f"cannot rewrite %{n.out.name} = log_softmax into token_logprobs: the graph returns the "
                     "logits (they are needed anyway)")
            continue
        for gnode in gathers:
            plans[id(gnode)] = (m, gnode)
    if not plans:
        return g.replace()
    b = GraphBuilder(g.name, list(g.inputs), list(g.params))
    b.reserve(types)
    for n in g.nodes:
        plan = plans.get(id(n))
        if plan is None:
            b.add(n)
            continue
        m, gnode = plan
        index = gnode.inputs[1]
        it = types[index]
        lead = it.shape[:-1]
        base = gnode.out.name
        ids_t = TensorType(it.dtype, lead)
        ids = b.fresh(f"{base}.ids")
        b.add(Node((Value(ids, ids_t),), "reshape", (index,), {"shape": lead}, gnode.origin))
        logp, lse = b.fresh(f"{base}.logp"), b.fresh(f"{base}.lse")
        out_t = TensorType(DType.f32, lead)
        b.add(Node((Value(logp, out_t), Value(lse, out_t)), "token_logprobs", (m.hidden, m.weight, ids),
                   {"temperature": float(m.temperature)}, gnode.origin))
        want = gnode.out.type
        if want.dtype is DType.f32:
            b.add(Node((Value(base, want),), "reshape", (logp,), {"shape": want.shape}, gnode.origin))
        else:
            shaped = b.fresh(f"{base}.f32")
            b.add(Node((Value(shaped, out_t.with_shape(want.shape)),), "reshape", (logp,), {"shape": want.shape},
                       gnode.origin))
            b.add(Node((Value(base, want),), "cast", (shaped,), {"dtype": want.dtype}, gnode.origin))
        ctx.count("rewrite_vocab_loss.token_logprobs")
    return dce(b.build(g.outputs), ctx)
