"""Frontend: tensors allocated in forward and filled by slice assignment, as functional updates.

Where it sits: one of `frontend/lowerings/` (listed in its `__init__`). Registers the allocations
`Tensor.new_empty/new_zeros/new_ones/new_full` and `torch.zeros_like/ones_like/empty_like/full_like`
(a constant broadcast to the shape; `new_empty`/`empty_like` read as zeros, where torch leaves the memory
undefined), and the writes `view.copy_(src)` and `x[idx] = src` into such a tensor. transformers'
DeepSeek MLA builds its keys this way (`expand_kv`):

    key_states = kv_nope.new_empty(*kv_nope.shape[:-1], nope + rope)
    key_states[..., :nope].copy_(k_nope)
    key_states[..., nope:].copy_(k_rot)

The IR is SSA, so a write makes a new value: the written region is replaced by `src` (broadcast, cast to
the tensor's dtype) with slices and `cat` along each indexed dim, and the tensor's FX node is rebound to
the new value, so every later read sees the write (`TraceContext.rebind`). What is refused, with a
TraceError naming the line:
- a write into anything but a tensor allocated in forward (an input, a parameter, an intermediate: the
  compiled graph would not update the caller's tensor, or an alias the trace does not track);
- an index other than basic slices (step 1) and `...` (an int index, `None`, a tensor index), and a slice
  of part of a symbolic dim (the region's size would depend on the runtime size);
- reading, after a write, a view of the tensor taken before it (`view`, `transpose`, `x[...]`, ...): it
  would hold the old values (`TraceContext.stale`).
"""
from __future__ import annotations

import operator
from typing import Any

import sympy
import torch
import torch.fx as fx

from dsr_compiler.ir.types import DType, to_expr

from ..context import TensorRef, TraceContext, canon, has_tensor
from ..registry import lowers, lowers_inplace
from .shape import expand_to, norm_slice, varargs

#: Tensor methods / torch functions whose result may share memory with their input: after a write into a
#: tensor allocated in forward, such results taken before the write are stale.
ALIASING = frozenset({
    "view", "view_as", "reshape", "transpose", "permute", "expand", "expand_as", "narrow", "split", "chunk",
    "unsqueeze", "squeeze", "flatten", "unflatten", "t", "unbind", "movedim", "select", "diagonal", "unfold",
    "as_strided", "contiguous", "detach", "getitem", "__getitem__", "T", "mT", "real", "swapaxes", "to"})


def _fill(cx: TraceContext, value: Any, dtype: DType, shape: tuple) -> TensorRef:
    v = cx.number(value, "fill value")
    if dtype.is_float:
        v = float(v)
    elif dtype is DType.bool:
        v = bool(v)
    else:
        if isinstance(v, float) and not v.is_integer():
            raise cx.fail(f"fill value {v} for a {dtype.value} tensor")
        v = int(v)
    c = cx.const(v, dtype)
    out = expand_to(cx, c, shape) if shape else c
    cx.fresh.add(cx.current_node())
    return out


def _alloc(cx: TraceContext, like: Any, sizes: tuple, dtype: Any, value: Any, what: str) -> TensorRef:
    x = cx.tensor(like, what)
    dt = x.type.dtype if dtype is None else cx.dtype(dtype)
    shape = tuple(to_expr(cx.size_value(s, f"{what}: size")) for s in sizes)
    return _fill(cx, value, dt, shape)


def _check_kw(cx: TraceContext, what: str, kw: dict) -> Any:
    extra = set(kw) - {"dtype", "device", "requires_grad", "layout", "pin_memory", "memory_format"}
    if extra:
        raise cx.fail(f"{what}: unsupported keyword arguments {sorted(extra)}")
    return kw.get("dtype")


def _sizes(cx: TraceContext, what: str, sizes: tuple, kw: dict) -> tuple:
    try:
        return varargs(sizes, {k: v for k, v in kw.items() if k == "size"}, "size")
    except TypeError as e:
        raise cx.fail(f"{what}: {e}") from None


@lowers("new_empty")
def _new_empty(cx: TraceContext, input: Any, *size: Any, **kw: Any) -> TensorRef:
    dtype = _check_kw(cx, "new_empty", {k: v for k, v in kw.items() if k != "size"})
    return _alloc(cx, input, _sizes(cx, "new_empty", size, kw), dtype, 0, "new_empty")


@lowers("new_zeros")
def _new_zeros(cx: TraceContext, input: Any, *size: Any, **kw: Any) -> TensorRef:
    dtype = _check_kw(cx, "new_zeros", {k: v for k, v in kw.items() if k != "size"})
    return _alloc(cx, input, _sizes(cx, "new_zeros", size, kw), dtype, 0, "new_zeros")


@lowers("new_ones")
def _new_ones(cx: TraceContext, input: Any, *size: Any, **kw: Any) -> TensorRef:
    dtype = _check_kw(cx, "new_ones", {k: v for k, v in kw.items() if k != "size"})
    return _alloc(cx, input, _sizes(cx, "new_ones", size, kw), dtype, 1, "new_ones")


@lowers("new_full")
def _new_full(cx: TraceContext, input: Any, size: Any, fill_value: Any, **kw: Any) -> TensorRef:
    dtype = _check_kw(cx, "new_full", kw)
    return _alloc(cx, input, tuple(size), dtype, fill_value, "new_full")


def _like(value: Any, what: str):
    def lower(cx: TraceContext, input: Any, *args: Any, **kw: Any) -> TensorRef:
        fill = value
        if value is None:                         # full_like(input, fill_value)
            if len(args) != 1:
                raise cx.fail(f"{what}: expected (input, fill_value)")
            fill, args = args[0], ()
        if args:
            raise cx.fail(f"{what}: unexpected positional arguments {args!r}")
        dtype = _check_kw(cx, what, kw)
        x = cx.tensor(input, what)
        return _alloc(cx, x, x.type.shape, dtype, fill, what)
    return lower


lowers(torch.zeros_like)(_like(0, "zeros_like"))
lowers(torch.empty_like)(_like(0, "empty_like"))
lowers(torch.ones_like)(_like(1, "ones_like"))
lowers(torch.full_like)(_like(None, "full_like"))


# ----------------------------------------------------------------------------- writes

def _region(cx: TraceContext, base: TensorRef, idx: Any) -> list[tuple[int, int, int | None]]:
    """[(dim, start, stop)] of a basic-slice index into `base` (stop None: to the end); dims not listed are whole."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if has_tensor(items) or any(isinstance(it, list) for it in items):
        raise cx.fail("assignment through a tensor or list index is not supported",
                      hint="assign through basic slices (x[..., a:b] = y), or build the tensor with torch.cat")
    items = [canon(it) for it in items]
    rank = base.type.rank
    if sum(it is Ellipsis for it in items) > 1:
        raise cx.fail("an index can only have one ellipsis")
    if any(not isinstance(it, slice) and it is not Ellipsis for it in items):
        raise cx.fail(f"assignment through the index {tuple(items)!r}: only slices (step 1) and `...` are supported",
                      hint="write x[..., a:b] = y, or build the tensor with torch.cat / torch.where")
    n = sum(1 for it in items if it is not Ellipsis)
    if n > rank:
        raise cx.fail(f"too many indices ({n}) for a rank-{rank} tensor {base.type}")
    if Ellipsis in items:
        i = items.index(Ellipsis)
        items[i:i + 1] = [slice(None)] * (rank - n)
    else:
        items += [slice(None)] * (rank - n)
    out = []
    for d, it in enumerate(items):
        s = norm_slice(cx, it, base.type.shape[d])
        if s is None:
            continue
        if s[2] != 1:
            raise cx.fail(f"assignment through a slice with step {s[2]} is not supported", hint="use step 1")
        if base.type.shape[d].free_symbols:
            raise cx.fail(f"assignment into part of the symbolic dim {base.type.shape[d]} of {base.type} (the region's "
                          "size would depend on the runtime size)",
                          hint="assign whole symbolic dims (x[:, :] / x[..., a:b] on static dims only)")
        out.append((d, s[0], s[1]))
    return out


def _same(a: Any, b: Any) -> bool:
    return sympy.simplify(to_expr(a) - to_expr(b)) == 0


def _slice(cx: TraceContext, x: TensorRef, d: int, lo: int, hi: int | None) -> TensorRef:
    """x[lo:hi] along d, folded where the allocation's history makes it free: a slice of a broadcast constant
    is that constant broadcast to the smaller shape, a slice of a `cat` on piece boundaries is those pieces
    (so writes that cover the whole allocation leave only the cat of what was written)."""
    n, _ = cx.producer(x.name)
    end = x.type.shape[d] if hi is None else sympy.Integer(hi)
    shape = list(x.type.shape)
    shape[d] = sympy.simplify(end - lo)
    if n is not None and n.op == "expand":
        c, cv = cx.producer(n.inputs[0])
        if c is not None and c.op == "const":
            return expand_to(cx, TensorRef(cv.name, cv.type), tuple(canon(v) for v in shape))
    if n is not None and n.op == "cat" and n.attr("dim") % x.type.rank == d:
        at, picked = sympy.Integer(0), []
        for name in n.inputs:
            _, pv = cx.producer(name)
            if pv is None:
                break
            stop = at + pv.type.shape[d]
            if picked or _same(at, lo):
                picked.append(TensorRef(pv.name, pv.type))
                if _same(stop, end):
                    return picked[0] if len(picked) == 1 else cx.emit("cat", picked, {"dim": d})
            at = stop
    return cx.emit("slice", [x], {"dim": d, "start": lo, "end": hi, "step": 1})


def _replace(cx: TraceContext, base: TensorRef, region: list, src: TensorRef) -> TensorRef:
    """`base` with `region` replaced by `src` (already of the region's shape and base's dtype): slices + cat."""
    if not region:
        return src
    (d, lo, hi), rest = region[0], region[1:]
    size = base.type.shape[d]
    new_mid = _replace(cx, _slice(cx, base, d, lo, hi), rest, src) if rest else src
    parts = []
    if lo > 0:
        parts.append(_slice(cx, base, d, 0, lo))
    parts.append(new_mid)
    if hi is not None and not (not size.free_symbols and hi >= int(size)):
        parts.append(_slice(cx, base, d, hi, None))
    return parts[0] if len(parts) == 1 else cx.emit("cat", parts, {"dim": d})


def write(cx: TraceContext, target: fx.Node, idx: Any, value: Any, what: str) -> TensorRef:
    """Write `value` into `target[idx]` (target: a tensor allocated in forward, or a slice view of one);
    rebinds the allocation's FX node to the new value and returns the written region's new value."""
    base_node, region_idx = target, idx
    view = cx.views.get(target)
    if view is not None:
        if idx not in ((), Ellipsis):
            raise cx.fail(f"{what}: a write through a slice of a slice is not supported",
                          hint="index the allocated tensor once: x[..., a:b] = y")
        base_node, region_idx = view
    if base_node not in cx.fresh:
        raise cx.fail(f"{what}: in-place write into a tensor that forward did not allocate (an input, a parameter "
                      "or a computed value): the compiled graph is functional and would not update it",
                      hint="allocate it in forward (x.new_zeros(...), torch.zeros_like(x)) and write into that, or "
                           "build the value with torch.cat / torch.where")
    base = cx.tensor(cx.env[base_node], what)
    region = _region(cx, base, region_idx)
    shape = list(base.type.shape)
    for d, lo, hi in region:
        end = shape[d] if hi is None else sympy.Integer(hi)
        shape[d] = sympy.simplify(end - lo)
    src = value if isinstance(value, TensorRef) else cx.operand(value, base.type, f"{what}: value")
    src = cx.cast(src, base.type.dtype)
    src = expand_to(cx, src, tuple(canon(s) for s in shape))
    cx.rebind(base_node, _replace(cx, base, region, src), ALIASING)
    return src


@lowers_inplace("copy_")
def lower_copy_(cx: TraceContext, args: tuple, kwargs: dict) -> TensorRef:
    if len(args) != 2 or set(kwargs) - {"non_blocking"}:
        raise cx.fail("Tensor.copy_ takes (src[, non_blocking])")
    cx.tensor(args[0], "copy_")
    return write(cx, cx.current_node().args[0], Ellipsis, args[1], "Tensor.copy_")


@lowers_inplace(operator.setitem)
def lower_setitem(cx: TraceContext, args: tuple, kwargs: dict) -> None:
    if len(args) != 3 or kwargs:
        raise cx.fail("operator.setitem takes (x, index, value)")
    target, idx, value = args
    cx.tensor(target, "x[...] = y")
    write(cx, cx.current_node().args[0], idx, value, "x[...] = y")


__all__ = ["ALIASING", "lower_copy_", "lower_setitem", "write"]
