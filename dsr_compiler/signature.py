"""The call contract of a CompiledModule: which forward arguments were tensors, which were baked in.

Where it sits: `api.compile` records a `CallSignature` from the module's `forward` and the example
arguments (positional and keyword); `CompiledModule.__call__` binds every call through it before
the runtime sees anything. The frontend traces tensors as graph inputs and *bakes in* everything
else (None, bools, ints, floats, strings, and the defaults of omitted parameters), so a call that
passes a different non-tensor value would silently run the wrong program. The rules:

  * `cm(*args, **kwargs)` binds like `forward(*args, **kwargs)`: too many arguments, an unknown
    or repeated keyword, or a missing argument without a default is a DsrError;
  * a tensor slot takes a tensor of the traced dtype, rank and static sizes (symbolic dims bind
    consistently across arguments); a Python number is accepted for a 0-d input (converted to its
    dtype, e.g. `start_pos=5`); anything else is a DsrError naming the parameter;
  * a baked slot takes exactly the baked value (same type, equal); an omitted argument means the
    forward's default, which must equal what was baked; a tensor where None was traced is a
    DsrError telling to recompile with a tensor example input.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dsr_compiler.errors import DsrError
from dsr_compiler.ir.graph import Value

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_NO_DEFAULT = inspect.Parameter.empty


@dataclass(frozen=True)
class Slot:
    """One forward parameter: a traced tensor input, or a value baked into the compiled graph."""

    name: str
    tensor: bool
    baked: Any = None               # the value the trace specialized on (baked slots)
    default: Any = _NO_DEFAULT      # the forward's default (used when a call omits the argument)
    keyword_only: bool = False
    tree: Any = None                # a tuple/list/dict argument holding tensors: its pytree spec ...
    leaves: tuple = ()              # ... and per leaf ("tensor", input name) or ("baked", value)


def tree_leaf_name(param: str, i: int) -> str:
    """The graph input of leaf i of a tuple/list/dict argument (`position_embeddings_0`)."""
    return f"{param}_{i}"


def tree_leaves(name: str, v: Any) -> tuple[Any, tuple] | None:
    """(spec, leaves) of an argument that is a tuple/list/dict holding at least one tensor, else None."""
    if not isinstance(v, (tuple, list, dict)):
        return None
    from torch.utils import _pytree as pytree
    flat, spec = pytree.tree_flatten(v)
    if not any(isinstance(x, torch.Tensor) for x in flat):
        return None
    return spec, tuple(("tensor", tree_leaf_name(name, i)) if isinstance(x, torch.Tensor) else ("baked", x)
                       for i, x in enumerate(flat))


@dataclass(frozen=True)
class CallSignature:
    owner: str                      # "<Class>.forward", for messages
    slots: tuple[Slot, ...]

    @property
    def positional(self) -> tuple[Slot, ...]:
        return tuple(s for s in self.slots if not s.keyword_only)

    # ------------------------------------------------------------------ compile time
    @staticmethod
    def from_example(module: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any] | None
                     ) -> tuple["CallSignature", tuple]:
        """(the signature, the positional example inputs the frontend traces). Keyword example
        arguments are placed at their parameter's position; gaps before them take the defaults."""
        if not isinstance(module, nn.Module):
            from dsr_compiler.errors import TraceError
            raise TraceError(f"trace: expected an nn.Module, got {type(module).__name__}")
        owner = f"{type(module).__name__}.forward"
        where = f"dsr.compile({type(module).__name__})"
        try:
            params = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError) as e:
            raise DsrError(f"compile: cannot read the signature of {owner}: {e}", where=where) from None
        kwargs = dict(kwargs or {})
        if not all(isinstance(k, str) for k in kwargs):
            raise DsrError("compile: kwargs must map parameter names to example values", where=where)
        pos = [p for p in params if p.kind in _POSITIONAL]
        names = [p.name for p in pos]
        for k in kwargs:
            if k not in names:
                raise DsrError(f"compile: unknown keyword argument `{k}` for {owner}", where=where,
                               hint=f"keyword example inputs name positional parameters: {', '.join(names)}")
            if names.index(k) < len(args):
                raise DsrError(f"compile: `{k}` given twice (positionally and in kwargs)", where=where)
        given = dict(zip(names, args))
        given.update(kwargs)
        last = max((names.index(k) for k in given), default=-1)
        example: list[Any] = []
        for p in pos[:last + 1]:
            if p.name in given:
                example.append(given[p.name])
            elif p.default is not _NO_DEFAULT:
                example.append(p.default)
            # else: the frontend reports the missing input
        if len(args) > len(pos):
            example.extend(args[len(pos):])          # the frontend reports the count
        slots = []
        for i, p in enumerate(params):
            if p.kind not in _POSITIONAL:
                if p.kind == p.KEYWORD_ONLY:
                    slots.append(Slot(p.name, False, p.default, p.default, keyword_only=True))
                continue
            v = example[i] if i < len(example) else p.default
            tree = tree_leaves(p.name, v)
            if tree is not None:
                slots.append(Slot(p.name, False, None, p.default, tree=tree[0], leaves=tree[1]))
                continue
            slots.append(Slot(p.name, isinstance(v, torch.Tensor), None if isinstance(v, torch.Tensor) else v,
                              p.default))
        return CallSignature(owner, tuple(slots)), tuple(example)

    # ------------------------------------------------------------------ call time
    def bind(self, args: tuple, kwargs: Mapping[str, Any], data_inputs: Sequence[Value], device: torch.device,
             where: str) -> tuple[dict[str, Any], dict[str, int | float | bool]]:
        """({tensor slot name: tensor, ready for the runtime}, {name: value of each 0-d tensor input
        known on the host (a Python number or a CPU tensor)}) for one call (DsrError on any mismatch)."""
        pos = self.positional
        if len(args) > len(pos):
            raise DsrError(f"{self.owner}: expected {len(pos)} inputs ({', '.join(s.name for s in pos)}), "
                           f"got {len(args)}", where=where, hint="call the compiled module like the original")
        by_name = {s.name: s for s in self.slots}
        values: dict[str, Any] = {s.name: a for s, a in zip(pos, args)}
        for k, v in kwargs.items():
            if k not in by_name:
                raise DsrError(f"{self.owner}: unexpected keyword argument `{k}`", where=where,
                               hint=f"parameters: {', '.join(by_name)}")
            if k in values:
                raise DsrError(f"{self.owner}: `{k}` given twice (positionally and by keyword)", where=where)
            values[k] = v
        types = {v.name: v.type for v in data_inputs}
        out: dict[str, Any] = {}
        host: dict[str, int | float | bool] = {}
        for s in self.slots:
            if s.name in values:
                v = values[s.name]
            elif s.default is not _NO_DEFAULT:
                v = s.default
            else:
                raise DsrError(f"{self.owner}: missing argument `{s.name}`", where=where)
            if s.tree is not None:
                for name, x in _tree_args(s, v, where):
                    out[name] = _tensor_arg(name, x, types[name], device, where)
                continue
            if s.tensor:
                out[s.name] = _tensor_arg(s.name, v, types[s.name], device, where)
                if types[s.name].rank == 0 and (not isinstance(v, torch.Tensor) or v.device.type == "cpu"):
                    host[s.name] = out[s.name].item() if isinstance(v, torch.Tensor) else v
            else:
                _check_baked(s, v, where)
        _check_shapes(out, types, where)
        return out, host


def _tree_args(s: Slot, v: Any, where: str) -> list[tuple[str, Any]]:
    """(input name, value) of the tensor leaves of a tuple/list/dict argument; its structure and baked leaves
    must be those of the example."""
    from torch.utils import _pytree as pytree
    flat, spec = pytree.tree_flatten(v)
    if spec != s.tree:
        def shape(t: Any) -> str:
            return f"{getattr(t.type, '__name__', 'leaf')} of {t.num_leaves} leaves"
        raise DsrError(f"`{s.name}` is a {shape(spec)}, the compiled module was traced with a {shape(s.tree)} "
                       "(or the keys differ)", where=where, hint=f"pass `{s.name}` as at compile time, or recompile")
    out = []
    for i, ((kind, what), x) in enumerate(zip(s.leaves, flat)):
        if kind == "tensor":
            out.append((what, x))
        else:
            _check_baked(Slot(f"{s.name}[leaf {i}]", False, what), x, where)
    return out


def _same_value(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:            # an exotic default: only identity counts
        return a is b


def _check_baked(s: Slot, v: Any, where: str) -> None:
    if isinstance(v, torch.Tensor):
        raise DsrError(f"`{s.name}` was {s.baked!r} at compile time (baked into the compiled graph), got a tensor",
                       where=where, hint=f"recompile with a tensor example input for `{s.name}`")
    if not _same_value(v, s.baked):
        raise DsrError(f"`{s.name}` was baked in as {s.baked!r} at compile time, got {v!r}", where=where,
                       hint=f"non-tensor arguments are compiled in: recompile with {s.name}={v!r}, or pass it as a "
                            "tensor example input to make it a runtime input")


def _tensor_arg(name: str, v: Any, t: Any, device: torch.device, where: str) -> torch.Tensor:
    if v is None:
        raise DsrError(f"`{name}` was a tensor at compile time, got None", where=where,
                       hint=f"pass a {t} tensor, or recompile with {name}=None")
    if isinstance(v, (bool, int, float)) and not isinstance(v, torch.Tensor) and t.rank == 0:
        return _number_arg(name, v, t, device, where)
    if not isinstance(v, torch.Tensor):
        raise DsrError(f"`{name}` must be a tensor, got {type(v).__name__}", where=where, hint=f"expected {t}")
    if v.dtype != t.dtype.torch:
        raise DsrError(f"`{name}`: expected dtype {t.dtype.value}, got {v.dtype}", where=where,
                       hint=f"the module was compiled for {t}; convert with .to({t.dtype.torch})")
    if v.dim() != t.rank:
        raise DsrError(f"`{name}`: expected rank {t.rank} ({t}), got shape {tuple(v.shape)}", where=where)
    if v.device.type != device.type:
        if v.dim() == 0 and v.device.type == "cpu":
            return v.to(device)              # a host scalar, as torch accepts 0-d CPU tensors
        raise DsrError(f"`{name}` is on {v.device}, the compiled module runs on {device}", where=where,
                       hint=f"move inputs with .to('{device.type}') or pick the matching backend")
    return v


def _number_arg(name: str, v: Any, t: Any, device: torch.device, where: str) -> torch.Tensor:
    dt = t.dtype.torch
    if isinstance(v, float) and not dt.is_floating_point:
        raise DsrError(f"`{name}`: expected an integer for the {t} input, got {v!r}", where=where)
    if isinstance(v, bool) and dt is not torch.bool:
        raise DsrError(f"`{name}`: expected a number for the {t} input, got {v!r}", where=where)
    try:
        return torch.tensor(v, dtype=dt, device=device)
    except (OverflowError, RuntimeError) as e:
        raise DsrError(f"`{name}`: {v!r} does not fit the {t} input ({e})", where=where) from None


def _check_shapes(tensors: Mapping[str, Any], types: Mapping[str, Any], where: str) -> None:
    """Static sizes match; each symbolic dim takes one value across all arguments."""
    seen: dict[Any, tuple[int, str]] = {}
    for name, x in tensors.items():
        t = types[name]
        for d, (dim, n) in enumerate(zip(t.shape, x.shape)):
            if dim.is_Symbol:
                prev = seen.setdefault(dim, (int(n), f"`{name}` dim {d}"))
                if prev[0] != int(n):
                    raise DsrError(f"`{name}`: dim {d} ({dim}) is {int(n)}, but {dim} is {prev[0]} in {prev[1]}",
                                   where=where, hint=f"arguments that share the dim {dim} must agree")
    env = {s: v for s, (v, _) in seen.items()}
    for name, x in tensors.items():
        t = types[name]
        want = [dim.subs(env) if not dim.is_Symbol else n for dim, n in zip(t.shape, x.shape)]
        if any(int(w) != int(n) for w, n in zip(want, x.shape) if getattr(w, "is_Integer", True)):
            shown = "[" + ", ".join(str(w) for w in want) + "]"
            raise DsrError(f"`{name}`: expected shape {shown}, got {tuple(x.shape)}", where=where,
                           hint=f"the module was compiled for {t}")


# ----------------------------------------------------------------------------- decode positions

@dataclass(frozen=True)
class PositionGuard:
    """`index_copy(x, iota(count) + %input, src, dim)` (the decode's cache write at `start_pos`):
    a host-known `input` must satisfy 0 <= input and input + count <= x.shape[dim] (`length`)."""

    input: str
    count: str                    # dim expressions, as text (sympy strings)
    length: str
    origin: str


def position_guards(g: Any) -> tuple[PositionGuard, ...]:
    """The guards of a traced graph (before passes: the cache writes are still plain index_copy ops)."""
    from dsr_compiler.ir.types import dim_str
    prod = {o.name: n for n in g.nodes for o in n.outputs}
    scalars = {v.name for v in g.data_inputs if v.type.rank == 0}

    def data_input(name: str) -> str | None:
        while name not in scalars:            # through casts (an i32 start_pos next to an i64 iota)
            n = prod.get(name)
            if n is None or n.op != "cast":
                return None
            name = n.inputs[0]
        return name
    out: list[PositionGuard] = []
    for n in g.nodes:
        if n.op != "index_copy":
            continue
        add = prod.get(n.inputs[1])
        if add is None or add.op != "add" or len(add.inputs) != 2:
            continue
        for a, b in (add.inputs, add.inputs[::-1]):
            iota, inp = prod.get(a), data_input(b)
            if iota is not None and iota.op == "iota" and inp is not None:
                x = next(v.type for v in (*g.inputs, *(o for m in g.nodes for o in m.outputs)) if v.name == n.inputs[0])
                guard = PositionGuard(inp, dim_str(iota.attr("n")), dim_str(x.shape[n.attr("dim") % x.rank]),
                                      n.origin)
                if guard not in out:
                    out.append(guard)
                break
    return tuple(out)


def check_positions(guards: Sequence[PositionGuard], host: Mapping[str, Any], env: Mapping[str, int],
                    where: str) -> None:
    """Eager's checks (models/deepseek.py `_check_decode`) for host-known positions, before any launch.
    A position that lives on the device is left to the kernel's flag (CompiledModule.check())."""
    from dsr_compiler.codegen.spec import eval_expr
    for gd in guards:
        if gd.input not in host:
            continue
        v = host[gd.input]
        at = f"{where}, the cache write of {gd.origin or 'index_copy'}"
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DsrError(f"{gd.input} must be a non-negative int, got {v!r}", where=at,
                           hint="pass the number of tokens already in the cache")
        count, length = eval_expr(gd.count, env), eval_expr(gd.length, env)
        if v + count > length:
            raise DsrError(f"cache overflow: {gd.input} {v} + {count} new tokens > cache length {length}", where=at,
                           hint="allocate a longer cache")
