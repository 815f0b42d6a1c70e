"""Frontend lowerings: sizes as trace-time values and layout (view, permute, expand, slicing,
indexing, cat, stack, split, chunk).

Where it sits: one of `frontend/lowerings/` (listed in its `__init__`); registers into
`frontend/registry.py` with `@lowers`. Each handler's signature is torch's; `cx` comes first.
"""
from __future__ import annotations

import builtins
import operator
from typing import Any, Sequence

import sympy
import torch

from dsr_compiler.ir.types import DType, TensorType, to_expr

from ..context import DEVICE, TensorRef, TraceContext, canon, has_tensor, is_symbolic, same
from ..registry import lowers


def varargs(args: tuple, kw: dict, key: str) -> tuple:
    """Sizes given as `*sizes`, one sequence, or the keyword `key` (`view(2, 3)`, `view((2, 3))`, `view(size=...)`)."""
    if kw:
        extra = [k for k in kw if k != key]
        if extra or args:
            raise TypeError(f"unexpected keyword arguments {sorted(kw)}")
        args = (kw[key],)
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    return tuple(args)


# --- shapes as trace-time values

@lowers("size")
def _size(cx: TraceContext, input: Any, dim: Any = None) -> Any:
    t = cx.tensor(input, "size").type
    if dim is None:
        return tuple(canon(d) for d in t.shape)
    return canon(t.shape[cx.norm_dim(dim, t.rank, "size")])


@lowers("dim", "ndimension")
def _ndim(cx: TraceContext, input: Any) -> int:
    return cx.tensor(input, "dim").type.rank


@lowers("numel")
def _numel(cx: TraceContext, input: Any) -> Any:
    return canon(cx.tensor(input, "numel").type.numel)


@lowers(builtins.getattr)
def _getattr(cx: TraceContext, obj: Any, name: str, *default: Any) -> Any:
    if not isinstance(obj, TensorRef):
        return getattr(obj, name, *default)
    t = obj.type
    if name == "shape":
        return tuple(canon(d) for d in t.shape)
    if name == "ndim":
        return t.rank
    if name == "dtype":
        return t.dtype.torch
    if name == "device":
        return DEVICE
    if name == "is_floating_point":
        return t.dtype.is_float
    if name == "T":
        return _permute_to(cx, obj, tuple(reversed(range(t.rank))))
    if name == "mT":
        if t.rank < 2:
            raise cx.fail(f".mT needs rank >= 2, got {t}")
        return _permute_to(cx, obj, tuple(range(t.rank - 2)) + (t.rank - 1, t.rank - 2))
    raise cx.fail(f"unsupported op Tensor.{name} (attribute)",
                  hint="supported tensor attributes: shape, ndim, dtype, device, T, mT")


# --- layout

def _resolve_sizes(cx: TraceContext, x: TensorRef, sizes: Sequence[Any], what: str) -> tuple:
    vals = [cx.size_value(s, what) for s in sizes]
    neg = [i for i, s in enumerate(vals) if isinstance(s, int) and s == -1]
    if len(neg) > 1:
        raise cx.fail(f"{what}: only one size may be -1, got {tuple(vals)}")
    if any(isinstance(s, int) and s < -1 for s in vals):
        raise cx.fail(f"{what}: negative size in {tuple(vals)}")
    if neg:
        known: Any = sympy.Integer(1)
        for i, s in enumerate(vals):
            if i != neg[0]:
                known = known * s
        if known == 0:
            raise cx.fail(f"{what}: cannot infer -1 next to a zero size in {tuple(vals)}")
        q = sympy.cancel(to_expr(x.type.numel) / known)
        num, den = sympy.fraction(q)
        if den != 1:
            raise cx.fail(f"{what}: cannot infer -1: {x.type} has {x.type.numel} elements, not a multiple of {known}",
                          hint="give the sizes explicitly")
        vals[neg[0]] = canon(q)
    return tuple(vals)


@lowers("view", "reshape")
def _view(cx: TraceContext, input: Any, *shape: Any, **kw: Any) -> TensorRef:
    x = cx.tensor(input, "view")
    try:
        sizes = varargs(shape, kw, "shape" if "shape" in kw else "size")
    except TypeError as e:
        raise cx.fail(f"view/reshape: {e}") from None
    if len(sizes) == 1 and isinstance(sizes[0], torch.dtype):
        raise cx.fail("Tensor.view(dtype) (bit reinterpretation) is not supported", hint="use .to(dtype)")
    return cx.reshape(x, _resolve_sizes(cx, x, sizes, "reshape"))


@lowers(torch.reshape)
def _torch_reshape(cx: TraceContext, input: Any, shape: Any) -> TensorRef:
    x = cx.tensor(input, "reshape")
    return cx.reshape(x, _resolve_sizes(cx, x, tuple(shape), "reshape"))


@lowers(torch.flatten, "flatten")
def _flatten(cx: TraceContext, input: Any, start_dim: Any = 0, end_dim: Any = -1) -> TensorRef:
    x = cx.tensor(input, "flatten")
    shape = x.type.shape
    if x.type.rank == 0:
        return cx.reshape(x, (1,))
    s = cx.norm_dim(start_dim, len(shape), "flatten")
    e = cx.norm_dim(end_dim, len(shape), "flatten")
    if s > e:
        raise cx.fail(f"flatten: start_dim {start_dim} comes after end_dim {end_dim}")
    n: Any = sympy.Integer(1)
    for d in shape[s:e + 1]:
        n = n * d
    return cx.reshape(x, shape[:s] + (n,) + shape[e + 1:])


@lowers(torch.unflatten, "unflatten")
def _unflatten(cx: TraceContext, input: Any, dim: Any, sizes: Any) -> TensorRef:
    x = cx.tensor(input, "unflatten")
    d = cx.norm_dim(dim, x.type.rank, "unflatten")
    part = TensorRef(x.name, TensorType(x.type.dtype, (x.type.shape[d],)))
    new = _resolve_sizes(cx, part, tuple(sizes), "unflatten")
    return cx.reshape(x, x.type.shape[:d] + tuple(to_expr(s) for s in new) + x.type.shape[d + 1:])


@lowers(torch.unsqueeze, "unsqueeze")
def _unsqueeze(cx: TraceContext, input: Any, dim: Any) -> TensorRef:
    x = cx.tensor(input, "unsqueeze")
    d = cx.norm_dim(dim, x.type.rank + 1, "unsqueeze")
    shape = list(x.type.shape)
    shape.insert(d, sympy.Integer(1))
    return cx.reshape(x, shape)


@lowers(torch.squeeze, "squeeze")
def _squeeze(cx: TraceContext, input: Any, dim: Any = None) -> TensorRef:
    x = cx.tensor(input, "squeeze")
    shape = x.type.shape
    if dim is None:
        dims = [i for i, s in enumerate(shape) if s == 1]
    else:
        raw = list(dim) if isinstance(dim, (tuple, list)) else [dim]
        dims = []
        for r in raw:
            d = cx.norm_dim(r, x.type.rank, "squeeze")
            if shape[d].free_symbols:
                raise cx.fail(f"squeeze({r}) on the symbolic dim {shape[d]}: the result rank would depend on "
                              "its runtime size", hint="reshape to the intended shape explicitly")
            if shape[d] == 1:
                dims.append(d)
    return cx.reshape(x, [s for i, s in enumerate(shape) if i not in dims])


def _permute_to(cx: TraceContext, x: TensorRef, dims: tuple[int, ...]) -> TensorRef:
    if dims == tuple(range(x.type.rank)):
        return x
    return cx.emit("permute", [x], {"dims": dims})


@lowers("permute")
def _permute(cx: TraceContext, input: Any, *dims: Any, **kw: Any) -> TensorRef:
    x = cx.tensor(input, "permute")
    try:
        raw = varargs(dims, kw, "dims")
    except TypeError as e:
        raise cx.fail(f"permute: {e}") from None
    if len(raw) != x.type.rank:
        raise cx.fail(f"permute: {len(raw)} dims for a rank-{x.type.rank} tensor")
    return _permute_to(cx, x, tuple(cx.norm_dim(d, x.type.rank, "permute") for d in raw))


@lowers(torch.permute)
def _torch_permute(cx: TraceContext, input: Any, dims: Any) -> TensorRef:
    return _permute(cx, input, *tuple(dims))


@lowers(torch.transpose, torch.swapaxes, torch.swapdims, "transpose", "swapaxes", "swapdims")
def _transpose(cx: TraceContext, input: Any, dim0: Any, dim1: Any) -> TensorRef:
    x = cx.tensor(input, "transpose")
    r = x.type.rank
    a, b = cx.norm_dim(dim0, r, "transpose"), cx.norm_dim(dim1, r, "transpose")
    perm = list(range(r))
    perm[a], perm[b] = perm[b], perm[a]
    return _permute_to(cx, x, tuple(perm))


@lowers(torch.t, "t")
def _t(cx: TraceContext, input: Any) -> TensorRef:
    x = cx.tensor(input, "t")
    if x.type.rank > 2:
        raise cx.fail(f"t() needs rank <= 2, got {x.type}", hint="use transpose(-2, -1)")
    return _permute_to(cx, x, tuple(reversed(range(x.type.rank))))


def expand_to(cx: TraceContext, x: TensorRef, sizes: Sequence[Any]) -> TensorRef:
    vals = [cx.size_value(s, "expand") for s in sizes]
    lead = len(vals) - x.type.rank
    if lead < 0:
        raise cx.fail(f"expand: {len(vals)} sizes for a rank-{x.type.rank} tensor")
    shape = []
    for i, s in enumerate(vals):
        if isinstance(s, int) and s == -1:
            if i < lead:
                raise cx.fail("expand: -1 is not allowed for new leading dims")
            shape.append(x.type.shape[i - lead])
        else:
            shape.append(to_expr(s))
    if lead == 0 and all(same(a, b) for a, b in zip(shape, x.type.shape)):
        return x
    return cx.emit("expand", [x], {"shape": tuple(canon(s) for s in shape)})


@lowers("expand")
def _expand(cx: TraceContext, input: Any, *sizes: Any, **kw: Any) -> TensorRef:
    try:
        vals = varargs(sizes, kw, "size")
    except TypeError as e:
        raise cx.fail(f"expand: {e}") from None
    return expand_to(cx, cx.tensor(input, "expand"), vals)


@lowers("expand_as")
def _expand_as(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return expand_to(cx, cx.tensor(input, "expand_as"), cx.tensor(other, "expand_as").type.shape)


@lowers(torch.broadcast_to)
def _broadcast_to(cx: TraceContext, input: Any, size: Any) -> TensorRef:
    return expand_to(cx, cx.tensor(input, "broadcast_to"), tuple(size))


def _slice_bound(cx: TraceContext, v: Any, size: Any, what: str) -> Any:
    v = canon(v)
    if isinstance(v, bool) or not isinstance(v, (int, sympy.Expr)):
        raise cx.fail(f"slice {what} must be an int, got {v!r}")
    if isinstance(v, int) and v < 0:
        if size.free_symbols:
            raise cx.fail(f"negative slice {what} {v} on the symbolic dim {size}",
                          hint="the IR's slice takes static bounds; count from the start, or make the dim static")
        return max(int(size) + v, 0)
    if isinstance(v, int):
        return v
    if same(v, size):
        return v
    raise cx.fail(f"slice {what} `{v}` is symbolic",
                  hint="the IR's slice takes static bounds; pass the sliced tensor as a forward input instead")


def norm_slice(cx: TraceContext, s: slice, size: Any) -> tuple[int, int | None, int] | None:
    step = 1 if s.step is None else cx.static_int(s.step, "slice step")
    if step < 1:
        raise cx.fail(f"slice step must be positive, got {step}")
    start = 0 if s.start is None else _slice_bound(cx, s.start, size, "start")
    stop = None if s.stop is None else _slice_bound(cx, s.stop, size, "stop")
    if not isinstance(start, int):
        raise cx.fail(f"slice start `{start}` equals the whole dim: the result is empty")
    if stop is not None and (not isinstance(stop, int) or (not size.free_symbols and stop >= int(size))):
        stop = None                                        # runs to the end
    if not size.free_symbols and start > int(size):
        start = int(size)
    if start == 0 and stop is None and step == 1:
        return None
    return start, stop, step


def _advanced_index(cx: TraceContext, x: TensorRef, items: list) -> TensorRef:
    """`x[i0, ..., ik-1]` with k integer tensors leading the index (broadcast together, the trailing dims
    kept whole): the `index` op. Other mixes of tensors with slices / None / Ellipsis and bool masks (whose
    result size depends on the values) are refused."""
    from dsr_compiler.ir.types import broadcast_shapes
    what = "advanced indexing"
    while items and isinstance(items[-1], slice) and items[-1] == slice(None):
        items = items[:-1]                                   # x[i, :] is x[i]
    if any(isinstance(it, list) for it in items):
        raise cx.fail(f"{what} with a Python list", hint="index with a tensor (torch.tensor(list))")
    items = [cx.const(canon(it), DType.i64) if isinstance(canon(it), int) and not isinstance(canon(it), bool)
             else it for it in items]                        # x[i, 3]: an int joins the tensors (torch does so)
    if not items or not all(isinstance(it, TensorRef) for it in items):
        raise cx.fail(f"{what} mixing tensors with slices, None or Ellipsis is not supported",
                      hint="index the leading dims with tensors only (x[i, j]), then slice the result")
    if any(it.type.dtype is DType.bool for it in items):
        raise cx.fail(f"{what} with a bool mask: the result's size depends on the mask's values",
                      hint="use torch.where(mask, x, 0) or multiply by the mask")
    if any(it.type.dtype.is_float for it in items):
        raise cx.fail(f"{what} with a float tensor", hint="index with integer tensors")
    if len(items) > min(x.type.rank, 8):
        raise cx.fail(f"{what}: {len(items)} index tensors for {x.type} (at most its rank, and 8)")
    try:
        shape = broadcast_shapes(*(tuple(it.type.shape) for it in items))
    except ValueError as e:
        raise cx.fail(f"{what}: the index tensors do not broadcast: {e}") from None
    idx = [expand_to(cx, it, shape) for it in items]
    return cx.emit("index", [x, *idx])


def _index_tensor(cx: TraceContext, x: TensorRef, idx: Any) -> TensorRef:
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(has_tensor(it) or isinstance(it, list) for it in items):
        return _advanced_index(cx, x, items)
    items = [canon(it) for it in items]
    if sum(it is Ellipsis for it in items) > 1:
        raise cx.fail("an index can only have one ellipsis")
    consume = sum(1 for it in items if it is not None and it is not Ellipsis)
    rank = x.type.rank
    if consume > rank:
        raise cx.fail(f"too many indices ({consume}) for a rank-{rank} tensor {x.type}")
    fill = [slice(None)] * (rank - consume)
    if Ellipsis in items:
        i = items.index(Ellipsis)
        items[i:i + 1] = fill
    else:
        items += fill
    out, plan, d = x, [], 0
    for it in items:
        if it is None:
            plan.append(None)
            continue
        size = out.type.shape[d]
        if isinstance(it, slice):
            s = norm_slice(cx, it, size)
            if s is not None:
                out = cx.emit("slice", [out], {"dim": d, "start": s[0], "end": s[1], "step": s[2]})
            plan.append(d)
        else:
            i = canon(it)
            if isinstance(i, bool) or not isinstance(i, int):
                if is_symbolic(i):
                    raise cx.fail(f"index `{i}` is symbolic", hint="the IR's slice takes static bounds")
                raise cx.fail(f"unsupported index {i!r}")
            if i < 0:
                if size.free_symbols:
                    raise cx.fail(f"negative index {i} on the symbolic dim {size}",
                                  hint="the IR's slice takes static bounds; index from the start, "
                                       "or make the dim static")
                i += int(size)
            if i < 0 or (not size.free_symbols and i >= int(size)):
                raise cx.fail(f"index {it} out of range for dim {d} of {x.type}")
            out = cx.emit("slice", [out], {"dim": d, "start": i, "end": i + 1, "step": 1})
        d += 1
    shape = [sympy.Integer(1) if p is None else out.type.shape[p] for p in plan]
    return cx.reshape(out, shape)


@lowers(operator.getitem)
def _getitem(cx: TraceContext, obj: Any, idx: Any) -> Any:
    if isinstance(obj, TensorRef):
        return _index_tensor(cx, obj, idx)
    if has_tensor(idx):
        raise cx.fail("indexing a Python container with a tensor is data-dependent")
    i = canon(idx)
    if is_symbolic(i):
        raise cx.fail(f"indexing a Python container with the symbolic `{i}`")
    return obj[i]


@lowers(torch.diff, "diff")
def _diff(cx: TraceContext, input: Any, n: Any = 1, dim: Any = -1, prepend: Any = None, append: Any = None) -> TensorRef:
    """x[1:] - x[:-1] along `dim`, n times, after cat(prepend, x, append) (torch.diff), as slices and sub."""
    x = cx.tensor(input, "diff")
    if not x.type.dtype.is_float and x.type.dtype.value not in ("i32", "i64"):
        raise cx.fail(f"diff of a {x.type.dtype.value} tensor is not supported", hint="diff integer or float tensors")
    d = cx.norm_dim(dim, x.type.rank, "diff")
    times = cx.number(n, "diff: n")
    if not isinstance(times, int) or isinstance(times, bool) or not 0 <= times <= 64:
        raise cx.fail(f"diff: n must be an int in 0..64, got {n!r}")
    parts = [cx.tensor(t, "diff: prepend/append") for t in (prepend, x, append) if t is not None]
    if len(parts) > 1:
        x = _cat(cx, parts, d)
    for _ in range(times):
        size = x.type.shape[d]
        if size.free_symbols:
            if (size - 2).is_nonnegative is not True:
                raise cx.fail(f"diff along the symbolic dim {size} of {x.type}: the result may be empty",
                              hint="the IR has no empty tensors; diff with prepend= (as transformers' mask "
                                   "utilities do), or along a static dim")
            end = -1                                     # x[:-1]: the slice keeps the size symbolic
        elif int(size) <= 1:
            raise cx.fail(f"diff of dim {d} of size {int(size)} of {x.type} gives an empty tensor",
                          hint="the IR has no empty tensors of static shape; diff a dim of size >= 2 (n times: n + 1)")
        else:
            end = int(size) - 1
        hi = cx.emit("slice", [x], {"dim": d, "start": 1, "end": None, "step": 1})
        lo = cx.emit("slice", [x], {"dim": d, "start": 0, "end": end, "step": 1})
        x = cx.binary("sub", hi, lo)
    return x


@lowers(torch.cat, torch.concat, torch.concatenate)
def _cat(cx: TraceContext, tensors: Any, dim: Any = 0) -> TensorRef:
    ts = [cx.tensor(t, "cat") for t in tensors]
    if not ts:
        raise cx.fail("cat of no tensors")
    if len(ts) == 1:
        return ts[0]
    return cx.emit("cat", ts, {"dim": cx.norm_dim(dim, ts[0].type.rank, "cat")})


@lowers(torch.stack)
def _stack(cx: TraceContext, tensors: Any, dim: Any = 0) -> TensorRef:
    ts = [cx.tensor(t, "stack") for t in tensors]
    if not ts:
        raise cx.fail("stack of no tensors")
    return _cat(cx, [_unsqueeze(cx, t, dim) for t in ts], dim)


def _pieces(cx: TraceContext, x: TensorRef, sizes: Sequence[int], d: int) -> tuple[TensorRef, ...]:
    out, start = [], 0
    for i, n in enumerate(sizes):
        last = i == len(sizes) - 1
        s = norm_slice(cx, slice(start, None if last else start + n), x.type.shape[d])
        out.append(x if s is None else cx.emit("slice", [x], {"dim": d, "start": s[0], "end": s[1], "step": 1}))
        start += n
    return tuple(out)


@lowers(torch.split, "split")
def _split(cx: TraceContext, tensor: Any, split_size_or_sections: Any = None, dim: Any = 0, *,
           split_size: Any = None) -> tuple[TensorRef, ...]:
    x = cx.tensor(tensor, "split")
    spec = split_size if split_size_or_sections is None else split_size_or_sections
    d = cx.norm_dim(dim, x.type.rank, "split")
    size = x.type.shape[d]
    if isinstance(spec, (tuple, list)):
        sizes = [cx.static_int(s, "split size") for s in spec]
        if not same(sum(sizes), size):
            raise cx.fail(f"split sizes {sizes} do not add up to dim {d} of {x.type}")
    else:
        n = cx.static_int(spec, "split size")
        total = cx.static_int(size, f"split: dim {d}")
        sizes = [n] * (total // n) + ([total % n] if total % n else [])
    return _pieces(cx, x, sizes, d)


@lowers(torch.chunk, "chunk")
def _chunk(cx: TraceContext, input: Any, chunks: Any, dim: Any = 0) -> tuple[TensorRef, ...]:
    x = cx.tensor(input, "chunk")
    d = cx.norm_dim(dim, x.type.rank, "chunk")
    n = cx.static_int(chunks, "chunks")
    total = cx.static_int(x.type.shape[d], f"chunk: dim {d}")
    step = -(-total // n)
    sizes = [min(step, total - i) for i in range(0, total, step)]
    return _pieces(cx, x, sizes, d)
