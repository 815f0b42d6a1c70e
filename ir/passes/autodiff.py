"""The `differentiate` pass: gradients of a scalar loss, appended to the graph as IR.

Where it sits: in the PIPELINE after `rewrite_vocab_loss` (so `log_softmax(LM head)` gathered at
the targets is already `token_logprobs`) and before cleanup and fusion, which treat the backward
like any other code: its pointwise and reduction parts fuse into kernels, `token_logprobs`'
backward becomes the two vocabulary-tiled gradient kernels. Without `grad_wrt` in the pass
options it only removes `stop_gradient` nodes (identities in value).

Scope: reverse mode for a graph whose one output is a 0-d float loss, with respect to named float
inputs (`ctx.options["grad_wrt"]`); the result returns the loss, then one gradient per name (the
input's dtype and shape). The derivative rules live on the ops (`OpDef.vjp`, ir/ops/core.py and
ir/ops/loss.py); this pass walks the graph backwards and calls them. It covers the ops that losses
are written with, not general autodiff: a node on a path from a `grad_wrt` input to the loss whose
op has no rule (`vjp is None`) is a GradError naming it. The rules follow torch's autograd
formulas, including its conventions at ties, so results match eager `loss.backward()`:

    add/sub/neg/mul/div, exp, log, sqrt, reciprocal, sigmoid, tanh, pow(x, 0-d const)
    maximum/minimum     ties split the gradient in halves; against a 0-d constant (what clamp,
                        clamp_min, clamp_max lower to) they pass it where x >= lo (x <= hi), as clamp
    where(c, a, b)      a where c, b elsewhere; cast: back to the input dtype
    sum/mean(dim)       expand (mean: / n, static n); reshape/expand/permute: their inverses
    stop_gradient       zero (Tensor.detach); comparisons and integer/bool values carry none
    token_logprobs      token_logprobs_grad_hidden / _grad_weight with the saved logsumexp

Gradients that reach an input through broadcasting are summed over the broadcast dims. An input
the loss does not depend on gets zeros (torch would give None).
"""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import GradError
from ..graph import Graph, GraphBuilder, Node, Value
from ..ops import OPS, differentiable_ops, dims_equal
from ..types import DType, TensorType
from .manager import PassContext


def strip_stop_gradient(g: Graph, ctx: PassContext) -> Graph:
    """Replace every `stop_gradient(x)` by x (it is an identity in value)."""
    subst: dict[str, str] = {}
    kept: list[Node] = []
    for n in g.nodes:
        ins = tuple(subst.get(i, i) for i in n.inputs)
        if n.op == "stop_gradient":
            subst[n.out.name] = ins[0]
            ctx.count("differentiate.stop_gradient_removed")
            continue
        kept.append(n.replace(inputs=ins) if ins != n.inputs else n)
    if not subst:
        return g.replace()      # a new graph object, as every pass returns
    outs = tuple(subst.get(o, o) for o in g.outputs)
    if len(set(outs)) != len(outs) or any(o in {v.name for v in g.inputs} for o in outs if o not in g.outputs):
        # keep a returned stop_gradient whose removal would return an input or a value twice
        return g.replace()
    return g.replace(nodes=tuple(kept), outputs=outs)


def differentiate(g: Graph, ctx: PassContext) -> Graph:
    """Append d loss / d input for each name in ctx.options["grad_wrt"] (see module doc)."""
    wrt = tuple(ctx.options.get("grad_wrt") or ())
    if not wrt or g.kernels:
        return strip_stop_gradient(g, ctx)
    return strip_stop_gradient(_Backward(g, wrt, ctx).run(), ctx)


class _Backward:
    def __init__(self, g: Graph, wrt: Sequence[str], ctx: PassContext) -> None:
        self.g, self.wrt, self.ctx = g, tuple(wrt), ctx
        self.types: dict[str, TensorType] = {v.name: v.type for v in g.inputs}
        for n in g.nodes:
            for o in n.outputs:
                self.types[o.name] = o.type
        self.prod = g.producers()
        self.b = GraphBuilder(g.name, list(g.inputs), list(g.params), list(g.nodes))
        self.b.reserve(self.types)
        self.origin = ""
        self.needed: set[str] = set()

    # --- emission helpers (types from the op table); the ops' derivative rules (`OpDef.vjp`) call them
    def emit(self, op: str, ins: Sequence[str], attrs: dict | None = None, hint: str = "grad") -> str:
        attrs = attrs or {}
        (t,) = OPS[op].infer([self.types[i] for i in ins], attrs)[:1]
        name = self.b.fresh(hint)
        self.b.add(Node((Value(name, t),), op, tuple(ins), attrs, self.origin))
        self.types[name] = t
        return name

    def const(self, value: float, dtype: DType) -> str:
        return self.emit("const", (), {"value": float(value), "dtype": dtype}, "grad.c")

    def zeros_like(self, x: str) -> str:
        t = self.types[x]
        z = self.const(0.0, t.dtype if t.dtype.is_float else DType.f32)
        if t.rank == 0:
            return z
        return self.emit("where", (self.emit("eq", (x, x)), z, z), hint=f"{x}.zeros")

    def to_type(self, grad: str, target: TensorType, hint: str) -> str:
        """Sum `grad` over the dims broadcasting added, then cast to the target dtype."""
        gt = self.types[grad]
        extra = gt.rank - target.rank
        for _ in range(extra):
            grad = self.emit("sum", (grad,), {"dim": 0, "keepdim": False}, hint)
        gt = self.types[grad]
        for d in range(target.rank):
            if dims_equal(target.shape[d], 1) and not dims_equal(gt.shape[d], 1):
                grad = self.emit("sum", (grad,), {"dim": d, "keepdim": True}, hint)
        gt = self.types[grad]
        if not dims_equal(gt.shape, target.shape):
            raise GradError(f"differentiate: gradient {gt} does not reduce to {target}", where=f"%{grad}")
        if gt.dtype != target.dtype:
            grad = self.emit("cast", (grad,), {"dtype": target.dtype}, hint)
        return grad

    # --- the sweep
    def run(self) -> Graph:
        g = self.g
        if len(g.outputs) != 1:
            raise GradError(f"differentiate: the graph returns {len(g.outputs)} values; grad_wrt needs one scalar loss",
                            where=f"graph {g.name}", hint="return only the loss from forward()")
        loss = g.outputs[0]
        lt = self.types[loss]
        if lt.rank != 0 or not lt.dtype.is_float:
            raise GradError(f"differentiate: the loss %{loss} is {lt}; grad_wrt needs a 0-d float loss",
                            where=f"graph {g.name}", hint="reduce the loss to a scalar (sum or mean) in forward()")
        inputs = {v.name: v for v in g.inputs}
        for w in self.wrt:
            if w not in inputs:
                raise GradError(f"differentiate: grad_wrt names %{w}, which is not an input of graph {g.name}",
                                hint="inputs: " + ", ".join(inputs))
            if not inputs[w].type.dtype.is_float:
                raise GradError(f"differentiate: grad_wrt input %{w} is {inputs[w].type}, not a float tensor")
        # values that depend on a grad_wrt input through differentiable edges
        active: set[str] = set(self.wrt)
        for n in g.nodes:
            if n.op == "stop_gradient" or not any(i in active for i in n.inputs):
                continue
            for o in n.outputs:
                if o.type.dtype.is_float:
                    active.add(o.name)
        # ... and reach the loss
        needed: set[str] = self.needed
        if loss in active:
            needed.add(loss)
        for n in reversed(g.nodes):
            if any(o.name in needed for o in n.outputs) and n.op != "stop_gradient":
                needed.update(i for i in n.inputs if i in active)
        grads: dict[str, list[str]] = {}
        if loss in active:
            grads[loss] = [self.const(1.0, lt.dtype)]
        for n in reversed(g.nodes):
            outs = [o.name for o in n.outputs]
            if not any(o in grads for o in outs):
                continue
            if not any(i in needed for i in n.inputs):
                continue
            self.origin = n.origin
            vjp = OPS[n.op].vjp
            if vjp is None:
                raise GradError(f"differentiate: no derivative rule for `{n.op}` (%{outs[0]}), which lies between "
                                f"the grad_wrt inputs and the loss",
                                where=f"graph {g.name}, node %{outs[0]} = {n.op}" + (f" ({n.origin})" if n.origin else ""),
                                hint="rules exist for: " + ", ".join(differentiable_ops())
                                + "; log_softmax(h @ W.T) gathered at targets is rewritten to token_logprobs first")
            gs = [self._total(grads, o) for o in outs]
            for inp, gi in vjp(self, n, gs):
                if inp in needed and gi is not None:
                    grads.setdefault(inp, []).append(gi)
        results = []
        for w in self.wrt:
            self.origin = ""
            tot = self._total(grads, w) if w in grads else None
            res = self.zeros_like(w) if tot is None else self.to_type(tot, inputs[w].type, f"{w}.grad")
            if inputs[w].type.dtype != self.types[res].dtype:
                res = self.emit("cast", (res,), {"dtype": inputs[w].type.dtype}, f"{w}.grad")
            results.append(res)
        self.ctx.count("differentiate.gradients", len(results))
        return self.b.build(tuple(g.outputs) + tuple(results))

    def _total(self, grads: dict[str, list[str]], name: str) -> str | None:
        parts = grads.get(name)
        if not parts:
            return None
        acc = parts[0]
        for p in parts[1:]:
            acc = self.emit("add", (acc, p), hint=f"{name}.grad")
        grads[name] = [acc]
        return acc
