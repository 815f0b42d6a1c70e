"""Pass `quantize_fp8`: the DeepSeek-V3 FP8 block recipe as a policy over the graph's GEMMs.

Where it sits: PIPELINE after cleanup (cse, fold_constants, dce) and before fuse; it runs only
when `ctx.options["fp8"]` is true (a bool, a dict of `Fp8Policy` fields, or an `Fp8Policy`).

Every eligible `linear` (weight is a graph param, float, K a static multiple of the block)

    %y : bf16[T,N] = linear(%x, %w)                                           # mlp.w1
becomes
    %x.q, %x.s : fp8e4m3[T,K], f32[T,K/128] = quant_fp8(%x, block=128, scale_fmt=None)
    %y : bf16[T,N] = gemm_fp8(%x.q, %x.s, %w.q, %w.s, block=128)               # mlp.w1

where `%w.q` (fp8e4m3[N,K]) and `%w.s` (f32[ceil(N/128),K/128]) are new params, quantized ONCE
at compile time in 128x128 blocks (`weight_scale_inv` semantics), or taken as-is from an FP8
checkpoint loaded with `keep_fp8=True` (see ir/params.py and dsr_compiler/params.py). One
`quant_fp8` serves every GEMM that reads the same activation (w1 and w3 of a SwiGLU). A model in
f32 gets `cast(%y.bf16, f32)` after the bf16 GEMM output the contract prescribes; a bias becomes
an `add`. The original weight param leaves the graph when nothing else reads it.

Policy (`Fp8Policy`, reported in report.json options and visible as attrs in the IR): which op
classes quantize (attention projections, dense MLP, MoE experts, shared experts, other linears),
the block (128), the activation scale format (None or "ue8m0", also used for compile-time weight
scales; checkpoint scales are used as stored), GEMM tiles (block_m, block_n attrs), and `force`
(origins that must quantize: a DsrError if they cannot). High-precision islands never quantize:
the LM head (`head`, `lm_head`), the MoE router (`gate`), embeddings, norms, softmax and the
attention core (they are not `linear`s). A linear whose K is not a multiple of the block is
skipped with the note "not quantized: K=... not a multiple of 128" (an error if forced).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ..errors import DsrError
from ..graph import Graph, Node, Value
from ..ops.fp8 import SCALE_FMTS, n_blocks
from ..params import DerivedParam
from ..types import DType, TensorType, dims_equal
from .manager import PassContext

CLASSES = ("attn", "mlp", "experts", "shared_experts", "other")
HIGH_PRECISION = {"head": "the LM head", "lm_head": "the LM head", "gate": "the MoE router gate",
                  "embed": "the embedding"}


@dataclass(frozen=True)
class Fp8Policy:
    """What `quantize_fp8` quantizes and how (plain values: it prints into report.json)."""

    attn: bool = True              # MLA projections (wq_a, wq_b, wkv_a, wkv_b, wo, ...)
    mlp: bool = True               # dense SwiGLU MLP (w1, w2, w3)
    experts: bool = True           # routed MoE experts
    shared_experts: bool = True    # MoE shared experts
    other: bool = True             # any other linear with a param weight (e.g. MTP eh_proj, user modules)
    block: int = 128               # tile width of activation scales and weight blocks
    scale_fmt: str | None = None   # None: fp32 scales; "ue8m0": power-of-two scales
    block_m: int | None = None     # gemm_fp8 tile rows (None: codegen decides)
    block_n: int | None = None     # gemm_fp8 tile cols (None: codegen decides, 128)
    force: tuple[str, ...] = ()    # origins (module paths, e.g. "mlp.w2") that must quantize; a single
                                   # string is one path (never split into characters)

    def __post_init__(self) -> None:
        where = "fp8 policy"
        if isinstance(self.force, str):
            object.__setattr__(self, "force", (self.force,))
        if not isinstance(self.force, (list, tuple)):
            raise DsrError(f"fp8 policy: force must be a list of module paths such as ['mlp.w2'], got "
                           f"{type(self.force).__name__} {self.force!r}", where)
        object.__setattr__(self, "force", tuple(self.force))
        for c in CLASSES:
            if not isinstance(getattr(self, c), bool):
                raise DsrError(f"fp8 policy: {c} must be True or False, got {getattr(self, c)!r}", where)
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 16 or self.block & (self.block - 1):
            raise DsrError(f"fp8 policy: block must be a power of two >= 16, got {self.block!r}", where,
                           "DeepSeek-V3 uses 128")
        if not (self.scale_fmt is None or isinstance(self.scale_fmt, str)) or self.scale_fmt not in SCALE_FMTS:
            raise DsrError(f"fp8 policy: scale_fmt must be None or 'ue8m0', got {self.scale_fmt!r}", where)
        for k in ("block_m", "block_n"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1)):
                raise DsrError(f"fp8 policy: {k} must be None or a power of two >= 16, got {v!r}", where)
        if self.block_n is not None and self.block_n % self.block and self.block % self.block_n:
            raise DsrError(f"fp8 policy: block_n={self.block_n} and block={self.block} must divide one another",
                           where, "a quantizing GEMM epilogue needs whole scale tiles per program")
        for f in self.force:
            if not isinstance(f, str) or not f:
                raise DsrError(f"fp8 policy: force takes module paths such as 'mlp.w2', got {f!r}", where)

    @staticmethod
    def from_option(opt: Any) -> "Fp8Policy | None":
        """None (FP8 off) for False/None; the policy for True, a dict of fields, or a policy."""
        if opt is None or opt is False:
            return None
        if opt is True:
            return Fp8Policy()
        if isinstance(opt, Fp8Policy):
            return opt
        if isinstance(opt, Mapping):
            known = {f.name for f in fields(Fp8Policy)}
            bad = sorted(set(opt) - known)
            if bad:
                raise DsrError(f"fp8 policy: unknown option(s) {bad}", "fp8=...", f"known: {', '.join(sorted(known))}")
            return Fp8Policy(**dict(opt))
        raise DsrError(f"fp8 must be True/False, a dict of policy fields or an Fp8Policy, got {type(opt).__name__}",
                       "fp8=...")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["force"] = list(self.force)
        return d


def classify(origin: str) -> str:
    """The op class of a linear from its module path: a CLASSES entry or a HIGH_PRECISION key."""
    segs = [s for s in origin.split(".") if s]
    for s in reversed(segs):
        if s in HIGH_PRECISION:
            return s
    for key in ("shared_experts", "experts"):
        if key in segs:
            return key
    if "attn" in segs or "self_attn" in segs:
        return "attn"
    if "mlp" in segs or "ffn" in segs:
        return "mlp"
    return "other"


def _forced(policy: Fp8Policy, origin: str) -> bool:
    return any(origin == f or origin.startswith(f + ".") for f in policy.force)


def quantize_fp8(g: Graph, ctx: PassContext) -> Graph:
    """Rewrite eligible linears into quant_fp8 + gemm_fp8 against derived FP8 weight params."""
    policy = Fp8Policy.from_option(ctx.options.get("fp8"))
    if policy is None or g.kernels:
        return g.replace()          # a new (equal) graph: passes never hand back their input object
    b = policy.block
    params = set(g.params)
    vals = g.values()
    producers = g.producers()
    names = set(vals)

    def fresh(base: str) -> str:
        name, i = base, 0
        while name in names:
            i += 1
            name = f"{base}.{i}"
        names.add(name)
        return name

    for f in policy.force:
        if not any((n.op == "linear" or _param_matmul(n, vals, params)) and (n.origin == f or n.origin.startswith(f + "."))
                   for n in g.nodes):
            raise DsrError(f"fp8 policy: force={f!r} matches no linear of graph {g.name}",
                           "fp8 policy", "force takes module paths as printed after `#` in the IR (dsrc ir)")

    quant_of: dict[tuple[str, int, str | None], tuple[str, str]] = {}   # activation -> (codes, scales)
    weight_of: dict[tuple[str, bool], tuple[str, str]] = {}             # (weight param, transposed) -> (codes, scales)
    new_params: dict[str, list[Value]] = {}                              # after which param they go
    out_nodes: list[Node] = []
    counts = {"gemms": 0, "activation_quants": 0, "moe_expert_gemms": 0}

    def activation(x: str, origin: str) -> tuple[str, str]:
        """(codes, scales) of activation x, quantized once (before a view that keeps the last dim:
        x = reshape(norm) in the MoE block; the codes and scales are reshaped instead, which is free,
        and the producer can fuse with the quant)."""
        xt = vals[x].type
        key = (x, b, policy.scale_fmt)
        if key in quant_of:
            return quant_of[key]
        src = x
        while (p := producers.get(src)) is not None and p.op == "reshape" \
                and vals[p.inputs[0]].type.rank >= 1 and dims_equal(vals[p.inputs[0]].type.shape[-1], xt.shape[-1]):
            src = p.inputs[0]
        skey = (src, b, policy.scale_fmt)
        if skey not in quant_of:
            srct = vals[src].type
            q, s = fresh(f"{src}.q"), fresh(f"{src}.s")
            qt = TensorType(DType.fp8e4m3, srct.shape)
            st = TensorType(DType.f32, srct.shape[:-1] + (n_blocks(srct.shape[-1], b),))
            out_nodes.append(Node((Value(q, qt), Value(s, st)), "quant_fp8", (src,),
                                  {"block": b, "scale_fmt": policy.scale_fmt}, origin))
            quant_of[skey] = (q, s)
            counts["activation_quants"] += 1
        if src != x:
            q0, s0 = quant_of[skey]
            q, s = fresh(f"{x}.q"), fresh(f"{x}.s")
            st = xt.shape[:-1] + (n_blocks(xt.shape[-1], b),)
            out_nodes.append(Node((Value(q, TensorType(DType.fp8e4m3, xt.shape)),), "reshape", (q0,),
                                  {"shape": tuple(xt.shape)}, origin))
            out_nodes.append(Node((Value(s, TensorType(DType.f32, st)),), "reshape", (s0,),
                                  {"shape": tuple(st)}, origin))
            quant_of[key] = (q, s)
        return quant_of[key]

    def weight(w: str, origin: str, transposed: bool = False) -> tuple[str, str]:
        """(codes, scales) params of weight param w ([..., N, K]; `transposed`: a matmul's [K, N], whose codes
        are those of its transpose), derived once at compile time."""
        if (w, transposed) not in weight_of:
            wt = vals[w].type
            shape = (wt.shape[1], wt.shape[0]) if transposed else wt.shape
            wq, ws = fresh(f"{w}.T.q" if transposed else f"{w}.q"), fresh(f"{w}.T.s" if transposed else f"{w}.s")
            st = shape[:-2] + (n_blocks(shape[-2], b), n_blocks(shape[-1], b))
            new_params.setdefault(w, []).extend([Value(wq, TensorType(DType.fp8e4m3, shape)),
                                                 Value(ws, TensorType(DType.f32, st))])
            weight_of[(w, transposed)] = (wq, ws)
            ctx.derive(DerivedParam((wq, ws), "fp8_block_quant_t" if transposed else "fp8_block_quant", (w,),
                                    {"block": b, "scale_fmt": policy.scale_fmt}, origin))
        return weight_of[(w, transposed)]

    users = g.users()
    moe_down: dict[int, Node] = {}          # id of a moe_gemm_down node -> its FP8 replacement
    for n in g.nodes:
        if id(n) in moe_down:
            out_nodes.append(moe_down.pop(id(n)))
            continue
        if n.op == "moe_gemm_gate_up":
            down = _moe_pair(n, users, vals, params, policy, ctx)
            if down is None:
                out_nodes.append(n)
                continue
            x, rows, blk, w13 = n.inputs
            xq, xs = activation(x, n.origin)
            w13q, w13s = weight(w13, n.origin)
            w2q, w2s = weight(down.inputs[3], down.origin)
            act = n.out
            aq = Value(fresh(f"{act.name}.q"), TensorType(DType.fp8e4m3, act.type.shape))
            as_ = Value(fresh(f"{act.name}.s"), TensorType(DType.f32, act.type.shape[:-1] +
                                                            (n_blocks(act.type.shape[-1], b),)))
            out_nodes.append(Node((aq, as_), "moe_gemm_gate_up_fp8", (xq, xs, rows, blk, w13q, w13s),
                                  {"topk": n.attr("topk"), "block_m": n.attr("block_m"), "block": b,
                                   "out_dtype": act.type.dtype, "scale_fmt": policy.scale_fmt}, n.origin))
            moe_down[id(down)] = Node(down.outputs, "moe_gemm_down_fp8",
                                      (aq.name, as_.name, rows, blk, w2q, w2s, down.inputs[4]),
                                      {"block_m": down.attr("block_m"), "block": b}, down.origin)
            counts["moe_expert_gemms"] += 2
            ctx.note(f"quantized: routed experts %{act.name} = moe_gemm_gate_up @ {n.origin} and "
                     f"%{down.out.name} = moe_gemm_down @ {down.origin} -> FP8 grouped GEMMs "
                     f"(the SwiGLU product leaves the first as fp8 codes + scales)")
            continue
        if n.op != "linear" and not _param_matmul(n, vals, params):
            out_nodes.append(n)
            continue
        why = _refusal(n, vals, params, policy)
        forced = _forced(policy, n.origin)
        if why is not None:
            kind, msg = why
            if forced and kind != "policy":
                hint = ("remove it from the policy's force list" + ("" if kind == "island" else
                        f", or pad the layer to a multiple of {b} (DeepSeek's dims all are)"))
                raise DsrError(f"quantize_fp8: cannot quantize %{n.out.name} = {n.op} @ {n.origin}: {msg}",
                               f"graph {g.name}, module {n.origin}", hint)
            if not (kind == "policy" and forced):
                ctx.note(f"not quantized: %{n.out.name} = {n.op} @ {n.origin or '?'}: {msg}")
                out_nodes.append(n)
                continue
        x, w = n.inputs[0], n.inputs[1]
        wt = vals[w].type
        xq, xs = activation(x, n.origin)
        wq, ws = weight(w, n.origin, transposed=n.op == "matmul")
        y = n.out
        attrs: dict[str, Any] = {"block": b}
        if policy.block_m is not None:
            attrs["block_m"] = policy.block_m
        if policy.block_n is not None:
            attrs["block_n"] = policy.block_n
        plain = y.type.dtype is DType.bf16 and len(n.inputs) == 2
        g_out = y if plain else Value(fresh(f"{y.name}.fp8"), y.type.with_dtype(DType.bf16))
        out_nodes.append(Node((g_out,), "gemm_fp8", (xq, xs, wq, ws), attrs, n.origin))
        cur = g_out
        if len(n.inputs) == 3:      # bias: added to the bf16 GEMM result, as eager adds it to its output
            bias = n.inputs[2]
            if vals[bias].type.dtype is not DType.bf16:
                c = Value(fresh(f"{y.name}.wide"), y.type)
                out_nodes.append(Node((c,), "cast", (cur.name,), {"dtype": y.type.dtype}, n.origin))
                cur = c
            last = Value(y.name, y.type)
            out_nodes.append(Node((last,), "add", (cur.name, bias), {}, n.origin))
        elif not plain:
            out_nodes.append(Node((Value(y.name, y.type),), "cast", (cur.name,), {"dtype": y.type.dtype}, n.origin))
        counts["gemms"] += 1
        kk, nn_ = (wt.shape[0], wt.shape[1]) if n.op == "matmul" else (wt.shape[1], wt.shape[0])
        ctx.note(f"quantized: %{y.name} = {n.op} @ {n.origin or '?'} -> gemm_fp8 (K={kk}, N={nn_}; "
                 f"weights %{wq}, %{ws} derived once from %{w}{' transposed' if n.op == 'matmul' else ''} "
                 f"in {b}x{b} blocks)")
    n_done = counts["gemms"] + counts["moe_expert_gemms"]
    if not n_done:
        return g.replace()
    for k, v in counts.items():
        if v:
            ctx.count(f"quantize_fp8.{k}", v)
    used = {i for n in out_nodes for i in n.inputs} | set(g.outputs)
    inputs: list[Value] = []
    out_params: list[str] = []
    for v in g.inputs:
        if v.name not in params:
            inputs.append(v)
            continue
        if v.name in used:
            inputs.append(v)
            out_params.append(v.name)
        for nv in new_params.get(v.name, ()):
            inputs.append(nv)
            out_params.append(nv.name)
    return Graph(g.name, tuple(inputs), tuple(out_nodes), g.outputs, tuple(out_params))


def _moe_pair(n: Node, users: dict[str, list[Node]], vals: dict[str, Value], params: set[str], policy: Fp8Policy,
              ctx: PassContext) -> Node | None:
    """The moe_gemm_down reading gate_up node n's output, if the pair goes to FP8 (else a note and None)."""
    b = policy.block
    act = n.out.name
    downs = [u for u in users.get(act, []) if u.op == "moe_gemm_down" and u.inputs[0] == act]
    why = ""
    if not policy.experts:
        why = "op class 'experts' is off in the fp8 policy"
    elif len(downs) != 1 or len(users.get(act, [])) != 1:
        why = "its SwiGLU output is read by something other than one moe_gemm_down"
    elif n.inputs[3] not in params or downs[0].inputs[3] not in params:
        why = "its expert weights are not parameters"
    else:
        h, two_i = vals[n.inputs[0]].type.shape[-1], vals[n.inputs[3]].type.shape[1]
        if not (h.is_Integer and two_i.is_Integer) or int(h) % b or int(two_i) % (2 * b):
            why = f"H={h} and I={two_i}/2 must be multiples of {b}"
    if why:
        ctx.note(f"not quantized: routed experts %{act} = moe_gemm_gate_up @ {n.origin}: {why}")
        return None
    return downs[0]


def _param_matmul(n: Node, vals: dict[str, Value], params: set[str]) -> bool:
    """`x @ W` with W a 2-D parameter [K, N] (GPT-2's Conv1D through addmm): a linear with W transposed."""
    return n.op == "matmul" and len(n.inputs) == 2 and n.inputs[1] in params and vals[n.inputs[1]].type.rank == 2 \
        and vals[n.inputs[0]].type.rank >= 2


def _refusal(n: Node, vals: dict[str, Value], params: set[str], policy: Fp8Policy) -> tuple[str, str] | None:
    """Why `n` (a linear, or a matmul by a 2-D parameter) is not quantized: (kind, message), kind "policy" or
    "shape"; None if it is."""
    cls = classify(n.origin)
    if cls in HIGH_PRECISION:
        return "island", f"{HIGH_PRECISION[cls]} stays high precision (DESIGN.md section 5)"
    if not getattr(policy, cls):
        return "policy", f"op class {cls!r} is off in the fp8 policy"
    w = n.inputs[1]
    wt = vals[w].type
    if w not in params:
        return "shape", "its weight is computed in the graph, not a parameter (FP8 weights are prepared once)"
    if wt.dtype not in (DType.f32, DType.bf16, DType.f16):
        return "shape", f"weight dtype {wt.dtype.value} is not f32/bf16/f16"
    k = wt.shape[0] if n.op == "matmul" else wt.shape[1]
    if not k.is_Integer:
        return "shape", f"K={k} is not static"
    if int(k) % policy.block:
        return "shape", f"K={int(k)} not a multiple of {policy.block}"
    return None


FP8_GEMMS = ("gemm_fp8", "moe_gemm_gate_up_fp8", "moe_gemm_down_fp8")
ATTENTION_CORES = ("attention", "mla_attention")


def fp8_stages(g: Graph) -> tuple[int, bool]:
    """(the most quantized GEMMs + attention cores fed by them on one path through the graph, whether a
    MoE router reads a value carrying FP8 error). The first sizes the FP8 tolerances
    (dsr_compiler/tolerance.py); the second says when a token's expert choice may differ from eager's."""
    depth: dict[str, int] = {v.name: 0 for v in g.inputs}
    kernels = {k.name: k for k in g.kernels}
    routed = False

    def walk(nodes, depth: dict[str, int]) -> None:
        nonlocal routed
        for n in nodes:
            d = max((depth.get(i, 0) for i in n.inputs), default=0)
            if n.op == "moe_router" and d > 0:
                routed = True
            if n.op == "call":
                body = kernels[n.attr("kernel")].body
                inner = {v.name: depth.get(x, 0) for v, x in zip(body.inputs, n.inputs)}
                walk(body.nodes, inner)
                for o, bo in zip(n.outputs, body.outputs):
                    depth[o.name] = inner.get(bo, d)
                continue
            step = 1 if n.op in FP8_GEMMS or (n.op in ATTENTION_CORES and d > 0) else 0
            for o in n.outputs:
                depth[o.name] = d + step
    walk(g.nodes, depth)
    return max((depth.get(o, 0) for o in g.outputs), default=0), routed


__all__ = ["ATTENTION_CORES", "CLASSES", "FP8_GEMMS", "Fp8Policy", "HIGH_PRECISION", "classify", "fp8_stages",
           "quantize_fp8"]
